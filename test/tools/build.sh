#!/usr/bin/env bash
# Build the third-party "oracle" binaries that kiln's tests use as
# independent checkers, from their upstream Go modules (via the Go module
# proxy). See test/tools/README.md.
#
# Usage: test/tools/build.sh [ignition] [matchbox] [containerd-v2.X.Y] [kubeadm-v1.X.Y ...] [rehearsal-v1.X.Y ...]
#   No arguments builds ignition, matchbox, containerd (CONTAINERD_VERSION)
#   and kubeadm for every KUBEADM_VERSIONS entry.
#   rehearsal-v1.X.Y builds kubeadm, kube-apiserver, kube-controller-manager,
#   kube-scheduler (all from k8s.io/kubernetes@v1.X.Y) and the etcd that
#   kubeadm of that minor deploys (go.etcd.io/etcd/server/v3); also single
#   targets kube-apiserver-v1.X.Y ..., etcd-v3.X.Y.
#
# Output: ${KILN_TOOLS_DIR:-$HOME/.cache/kiln-tools}/bin/{ignition,matchbox,kubeadm-vX.Y.Z,kube-*-vX.Y.Z,etcd-vX.Y.Z}
# A tool whose stamp matches its recipe is not rebuilt. Binaries are built to
# a temporary name and renamed into place, so bin/ never holds a partial file.
set -euo pipefail

IGNITION_VERSION=v2.24.0
MATCHBOX_VERSION=v0.11.0
CONTAINERD_VERSION=v2.2.9
KUBEADM_VERSIONS=(v1.33.13 v1.34.4 v1.35.4 v1.36.3 v1.37.2)
# Newer Go toolchain that the go command may fetch from the module proxy; used
# only when an upstream go.mod needs a newer Go than the local one.
FALLBACK_TOOLCHAIN=go1.27.3
# Bump when the recipe changes in a way that should force rebuilds.
RECIPE_REV=1

TOOLS_DIR=${KILN_TOOLS_DIR:-$HOME/.cache/kiln-tools}
BIN_DIR=$TOOLS_DIR/bin
SRC_DIR=$TOOLS_DIR/src
LOG_DIR=$TOOLS_DIR/log

log() { printf '[kiln-tools] %s\n' "$*" >&2; }
die() { printf '[kiln-tools] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
	echo "usage: $0 [ignition] [matchbox] $(printf '[kubeadm-%s] ' "${KUBEADM_VERSIONS[@]}")" >&2
	echo "       [kube-apiserver-v1.X.Y] [kube-controller-manager-v1.X.Y] [kube-scheduler-v1.X.Y]" >&2
	echo "       [etcd-v3.X.Y] [rehearsal-v1.X.Y (kubeadm, control plane and etcd of a release)]" >&2
	echo "       [containerd-v2.X.Y (containerd, ctr, containerd-shim-runc-v2)]" >&2
	echo "  no arguments builds ignition, matchbox, containerd-$CONTAINERD_VERSION and the kubeadms; output goes to $BIN_DIR" >&2
}

command -v go >/dev/null || die "go not found in PATH"

# Isolate the tool builds from whatever module/workspace the caller is in.
export GOWORK=off
export GOFLAGS="-buildvcs=false -modcacherw"
export GO111MODULE=on

# run LOGFILE CMD... : run a command with its output in LOGFILE; show the tail on failure.
run() {
	local logfile=$1
	shift
	printf '\n$ %s\n' "$*" >>"$logfile"
	if ! "$@" >>"$logfile" 2>&1; then
		log "command failed: $*"
		log "last lines of $logfile:"
		tail -n 40 "$logfile" >&2
		return 1
	fi
}

# go_line_of GOMOD : print the "go" version of a go.mod file.
go_line_of() { awk '$1 == "go" { print $2; exit }' "$1"; }

# pick_toolchain REQUIRED : export GOTOOLCHAIN so that the go command is new enough.
pick_toolchain() {
	local required=$1 local_v
	local_v=$(GOTOOLCHAIN=local go env GOVERSION)
	local_v=${local_v#go}
	if [[ "$(printf '%s\n%s\n' "$required" "$local_v" | sort -V | head -n1)" == "$required" ]]; then
		export GOTOOLCHAIN=local
	else
		log "upstream needs go >= $required, local is $local_v: using GOTOOLCHAIN=$FALLBACK_TOOLCHAIN"
		export GOTOOLCHAIN=$FALLBACK_TOOLCHAIN
	fi
}

# Module queries run in a scratch module of our own, so that they never touch
# the go.mod/go.sum of a module that happens to contain KILN_TOOLS_DIR.
probe() {
	mkdir -p "$SRC_DIR/.probe"
	[[ -f "$SRC_DIR/.probe/go.mod" ]] || echo "module kiln.invalid/probe" >"$SRC_DIR/.probe/go.mod"
	(cd "$SRC_DIR/.probe" && GOTOOLCHAIN=local "$@")
}

# fetch_module MODULE VERSION : download MODULE@VERSION into the module cache;
# sets UP_GOMOD (its go.mod), UP_DIR (its source) and UP_TIME (commit time, UTC).
fetch_module() {
	local out
	out=$(probe go mod download -json "$1@$2" 2>&1) ||
		die "cannot download $1@$2 from the module proxy: $out"
	UP_GOMOD=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$out")
	UP_DIR=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$out")
	[[ -f "$UP_GOMOD" && -d "$UP_DIR" ]] || die "cannot locate $1@$2 in the module cache"
	UP_TIME=$(probe go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' "$1@$2") ||
		die "cannot read the info of $1@$2"
}

# already_built NAME KEY : true when bin/NAME exists and was built with KEY.
already_built() {
	[[ -x "$BIN_DIR/$1" && -f "$BIN_DIR/.$1.stamp" && "$(cat "$BIN_DIR/.$1.stamp")" == "$2" ]]
}

# new_tmp NAME : print a fresh temporary path in bin/ (hidden; removed on exit),
# after deleting leftovers of killed runs (we hold the lock, so none is live).
new_tmp() {
	rm -f "$BIN_DIR/.$1.tmp."*
	echo "$BIN_DIR/.$1.tmp.$$"
}

# install_binary NAME TMPFILE KEY : move a finished build into place, then stamp it.
install_binary() {
	chmod 0755 "$2"
	mv -f "$2" "$BIN_DIR/$1"
	printf '%s\n' "$3" >"$BIN_DIR/.$1.stamp.tmp.$$"
	mv -f "$BIN_DIR/.$1.stamp.tmp.$$" "$BIN_DIR/.$1.stamp"
}

TMP_FILES=()
cleanup() { local f; for f in "${TMP_FILES[@]+"${TMP_FILES[@]}"}"; do rm -rf "$f"; done; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- ignition
# build_single NAME MOD VER PKG CGO LDFLAGS LOGFILE: build package PKG of
# MOD@VER (already fetched: UP_GOMOD is its go.mod) in a throwaway module
# with upstream's go line; sets BUILT to the temporary binary.
build_single() {
	local name=$1 mod=$2 ver=$3 pkg=$4 cgo=$5 ldflags=$6 logfile=$7
	local dir=$SRC_DIR/$name
	pick_toolchain "$(go_line_of "$UP_GOMOD")"
	rm -rf "$dir"
	mkdir -p "$dir"
	{
		echo "// Generated by kiln test/tools/build.sh; do not edit."
		echo "module kiln.invalid/tools/$name"
		echo
		echo "go $(go_line_of "$UP_GOMOD")"
		echo
		echo "require $mod $ver"
	} >"$dir/go.mod"
	BUILT=$(new_tmp "$name")
	TMP_FILES+=("$BUILT")
	# (&& chains: set -e does not apply inside a `( ... ) || die` list.)
	(
		cd "$dir" &&
			run "$logfile" go get "$pkg@$ver" &&
			CGO_ENABLED=$cgo run "$logfile" go build -trimpath -ldflags "$ldflags" -o "$BUILT" "$pkg"
	) || die "$name $ver: build failed (full log: $logfile)"
}

# build_go_tool NAME KEY MOD VER PKG CGO LDFLAGS VERIFY [PREPARE]: build
# package PKG of MOD@VER into bin/NAME unless its stamp already says KEY.
# PREPARE runs once the module is fetched (UP_DIR holds it), VERIFY on the
# built binary; both get the binary or nothing, then the log file.
build_go_tool() {
	local name=$1 key=$2 mod=$3 ver=$4 pkg=$5 cgo=$6 ldflags=$7 verify=$8 prepare=${9:-}
	if already_built "$name" "$key"; then
		log "$name $ver: up to date ($BIN_DIR/$name)"
		return 0
	fi
	local start=$SECONDS logfile=$LOG_DIR/$name.log
	log "$name $ver: building (log: $logfile)"
	: >"$logfile"
	fetch_module "$mod" "$ver"
	[[ -z "$prepare" ]] || "$prepare" "$logfile"
	build_single "$name" "$mod" "$ver" "$pkg" "$cgo" "$ldflags" "$logfile"
	"$verify" "$BUILT" "$logfile"
	install_binary "$name" "$BUILT" "$key"
	log "$name $ver: built $BIN_DIR/$name in $((SECONDS - start))s"
}

build_ignition() {
	local mod=github.com/coreos/ignition/v2 ver=$IGNITION_VERSION
	local ldflags="-X $mod/internal/distro.selinuxRelabel=false -X $mod/internal/version.Raw=$ver"
	# $mod/internal is the `ignition` main package (upstream ./build uses it too).
	build_go_tool ignition "ignition $ver recipe=$RECIPE_REV ldflags=$ldflags" "$mod" "$ver" "$mod/internal" 1 "$ldflags" \
		verify_ignition prepare_ignition
}

prepare_ignition() {
	command -v gcc >/dev/null || die "ignition needs cgo: gcc not found (run .ci/install-deps)"
	echo '#include <blkid/blkid.h>' | gcc -E -x c - >/dev/null 2>&1 ||
		die "ignition needs <blkid/blkid.h> (Debian: libblkid-dev; run .ci/install-deps)"
	# The variables the ldflags set must exist, or -X would silently do nothing.
	grep -Eq '^[[:space:]]*selinuxRelabel[[:space:]]*=' "$UP_DIR/internal/distro/distro.go" ||
		die "ignition $IGNITION_VERSION: internal/distro has no selinuxRelabel variable; update the ldflags in $0"
	grep -Eq '^[[:space:]]*Raw[[:space:]]*=' "$UP_DIR/internal/version/version.go" ||
		die "ignition $IGNITION_VERSION: internal/version has no Raw variable; update the ldflags in $0"
}

verify_ignition() {
	"$1" -version >>"$2" 2>&1 || die "ignition: built binary does not run (see $2)"
}

# ---------------------------------------------------------------- kubernetes
# build_k8s VER CMD... : build k8s.io/kubernetes/cmd/CMD at VER into bin/CMD-VER,
# for each CMD (kubeadm, kube-apiserver, kube-controller-manager,
# kubectl, kube-scheduler) not already up to date; one `go build` for all of them.
build_k8s() {
	local ver=$1 mod=k8s.io/kubernetes
	shift
	[[ "$ver" =~ ^v1\.([0-9]+)\.([0-9]+)(-[0-9A-Za-z.-]+)?$ ]] || die "bad Kubernetes version '$ver' (want v1.MINOR.PATCH)"
	local minor=${BASH_REMATCH[1]}
	local staging_ver=v0.${ver#v1.} # k8s.io/* staging modules are tagged v0.MINOR.PATCH
	local vpkg cmd
	local ldflags="-s -w"
	for vpkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
		ldflags+=" -X $vpkg.gitVersion=$ver -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
	done
	local todo=() names=()
	for cmd in "$@"; do
		if already_built "$cmd-$ver" "$cmd $ver recipe=$RECIPE_REV ldflags=$ldflags"; then
			log "$cmd-$ver: up to date ($BIN_DIR/$cmd-$ver)"
		else
			todo+=("$cmd")
			names+=("$cmd-$ver")
		fi
	done
	((${#todo[@]} > 0)) || return 0
	local key_ldflags=$ldflags

	local start=$SECONDS dir=$SRC_DIR/kubernetes-$ver logfile=$LOG_DIR/kubernetes-$ver.log
	log "${names[*]}: building (log: $logfile)"
	: >"$logfile"
	fetch_module "$mod" "$ver"
	local up=$UP_GOMOD
	# buildDate = the release commit's time, so rebuilds are reproducible.
	for vpkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
		ldflags+=" -X $vpkg.buildDate=$UP_TIME"
	done
	pick_toolchain "$(go_line_of "$up")"

	# Replace directives: upstream points each staging module at ./staging/src/...;
	# we pin it to the published staging module at the matching v0.X.Y instead.
	# Any non-local upstream replace is copied as is.
	local replaces
	replaces=$(awk -v sv="$staging_ver" '
		function emit(lhs, rhs) {
			if (rhs ~ /^\.\/staging\/src\//) { print "\t" lhs " => " lhs " " sv }
			else if (rhs ~ /^(\.|\/)/) { print "LOCAL " lhs " => " rhs }
			else { print "\t" lhs " => " rhs }
		}
		/^replace[[:space:]]*\($/ { inblk = 1; next }
		inblk && /^\)/ { inblk = 0; next }
		inblk && /=>/ { sub(/\/\/.*/, ""); split($0, p, "=>"); gsub(/^[ \t]+|[ \t]+$/, "", p[1]); gsub(/^[ \t]+|[ \t]+$/, "", p[2]); emit(p[1], p[2]); next }
		/^replace[[:space:]].*=>/ { sub(/\/\/.*/, ""); sub(/^replace[[:space:]]+/, ""); split($0, p, "=>"); gsub(/^[ \t]+|[ \t]+$/, "", p[1]); gsub(/^[ \t]+|[ \t]+$/, "", p[2]); emit(p[1], p[2]) }
	' "$up")
	if grep -q '^LOCAL' <<<"$replaces"; then
		die "$mod@$ver has a local replace that is not a staging module: $(grep '^LOCAL' <<<"$replaces" | head -n1)"
	fi
	local nstaging
	nstaging=$(grep -c " $staging_ver\$" <<<"$replaces" || true)
	((nstaging > 10)) || die "$mod@$ver: found only $nstaging staging replaces in its go.mod; the recipe needs updating"

	rm -rf "$dir"
	mkdir -p "$dir"
	{
		echo "// Generated by kiln test/tools/build.sh; do not edit."
		echo "module kiln.invalid/tools/kubernetes-$ver"
		echo
		echo "go $(go_line_of "$up")"
		# Keep upstream's GODEBUG defaults: the main module's godebug lines decide them.
		awk '/^godebug[[:space:]]*\(/ { blk = 1 } blk || /^godebug[[:space:]]/ { print } blk && /^\)/ { blk = 0 }' "$up"
		echo
		echo "require $mod $ver"
		echo
		echo "replace ("
		printf '%s\n' "$replaces"
		echo ")"
	} >"$dir/go.mod"
	log "kubernetes-$ver: pinned $nstaging staging modules to $staging_ver"

	local outdir=$BIN_DIR/.kubernetes-$ver.tmp.$$ pkgs=()
	rm -rf "$BIN_DIR/.kubernetes-$ver.tmp."*
	TMP_FILES+=("$outdir")
	mkdir -p "$outdir"
	for cmd in "${todo[@]}"; do pkgs+=("$mod/cmd/$cmd"); done
	# Upstream builds these static (CGO_ENABLED=0). One go build shares the
	# compile of the packages they have in common.
	(
		cd "$dir" &&
			run "$logfile" go get "${pkgs[@]/%/@$ver}" &&
			CGO_ENABLED=0 run "$logfile" go build -trimpath -ldflags "$ldflags" -o "$outdir/" "${pkgs[@]}"
	) || die "${names[*]}: build failed (full log: $logfile)"
	local got
	for cmd in "${todo[@]}"; do
		if [[ $cmd == kubeadm ]]; then
			got=$("$outdir/$cmd" version -o short 2>>"$logfile") || die "$cmd-$ver: built binary does not run (see $logfile)"
		elif [[ $cmd == kubectl ]]; then
			got=$("$outdir/$cmd" version --client 2>>"$logfile") || die "$cmd-$ver: built binary does not run (see $logfile)"
			got=$(awk '/^Client Version:/ { print $3 }' <<<"$got")
		else
			got=$("$outdir/$cmd" --version 2>>"$logfile") || die "$cmd-$ver: built binary does not run (see $logfile)"
			got=${got#Kubernetes }
		fi
		[[ "$got" == "$ver" ]] || die "$cmd-$ver: the binary reports version '$got', want '$ver'"
		install_binary "$cmd-$ver" "$outdir/$cmd" "$cmd $ver recipe=$RECIPE_REV ldflags=$key_ldflags"
	done
	rm -rf "$outdir"
	log "${names[*]}: built in $((SECONDS - start))s"
}

# ---------------------------------------------------------------- etcd
# build_etcd VER : go.etcd.io/etcd/server/v3 (its main package is the module
# root) at VER into bin/etcd-VER.
build_etcd() {
	local ver=$1 mod=go.etcd.io/etcd/server/v3
	[[ "$ver" =~ ^v3\.[0-9]+\.[0-9]+$ ]] || die "bad etcd version '$ver' (want v3.MINOR.PATCH)"
	ETCD_WANT=$ver build_go_tool "etcd-$ver" "etcd $ver recipe=$RECIPE_REV ldflags=-s -w" "$mod" "$ver" "$mod" 0 "-s -w" verify_etcd
}

verify_etcd() {
	local got
	got=$("$1" --version 2>>"$2" | awk '/^etcd Version:/ { print "v" $3 }') || true
	[[ "$got" == "$ETCD_WANT" ]] || die "etcd: 'etcd --version' reports '$got', want '$ETCD_WANT'"
}

# ---------------------------------------------------------------- containerd
# build_containerd VER : containerd, ctr and containerd-shim-runc-v2 of
# github.com/containerd/containerd/v2@VER into bin/NAME-VER (static, no cgo,
# as the oracle's image-import test and the rehearsal's nodes run them).
build_containerd() {
	local ver=$1 mod=github.com/containerd/containerd/v2 cmd
	[[ "$ver" =~ ^v2\.[0-9]+\.[0-9]+$ ]] || die "bad containerd version '$ver' (want v2.MINOR.PATCH)"
	for cmd in containerd ctr containerd-shim-runc-v2; do
		CONTAINERD_WANT=${ver#v} build_go_tool "$cmd-$ver" "$cmd $ver recipe=$RECIPE_REV ldflags=-s -w" "$mod" "$ver" "$mod/cmd/$cmd" 0 "-s -w" verify_containerd
	done
}

verify_containerd() {
	local flag=--version
	[[ $1 != *containerd-shim* ]] || flag=-v # the shim has Go's flag package
	"$1" $flag 2>>"$2" | grep -q "$CONTAINERD_WANT" || die "containerd: $1 $flag does not report $CONTAINERD_WANT (see $2)"
}

# ---------------------------------------------------------------- matchbox
# build_matchbox : the matchbox network-boot server (github.com/poseidon/
# matchbox), which reads kiln pxe's matchbox export in the oracle tests.
build_matchbox() {
	local mod=github.com/poseidon/matchbox ver=$MATCHBOX_VERSION
	build_go_tool matchbox "matchbox $ver recipe=$RECIPE_REV ldflags=-s -w" "$mod" "$ver" "$mod/cmd/matchbox" 0 "-s -w" verify_matchbox
}

verify_matchbox() {
	"$1" -help >>"$2" 2>&1 || die "matchbox: built binary does not run (see $2)"
}

# etcd_for VER : the etcd release that kubeadm of Kubernetes VER deploys.
etcd_for() {
	case "$1" in
	v1.33.*) echo v3.5.24 ;; # DefaultEtcdVersion in kubeadm's constants.go of each minor
	v1.34.*) echo v3.6.5 ;;
	v1.37.*) echo v3.7.0 ;;
	*) die "no etcd version known for Kubernetes $1; add it to etcd_for in $0" ;;
	esac
}

# ---------------------------------------------------------------- main
targets=("$@")
if ((${#targets[@]} == 0)); then
	targets=(ignition matchbox "containerd-$CONTAINERD_VERSION")
	for v in "${KUBEADM_VERSIONS[@]}"; do targets+=("kubeadm-$v"); done
fi
for t in "${targets[@]}"; do
	case "$t" in
	-h | --help) usage; exit 0 ;;
	ignition | matchbox) ;;
	kubeadm-v1.* | kubectl-v1.* | kube-apiserver-v1.* | kube-controller-manager-v1.* | kube-scheduler-v1.*) ;;
	rehearsal-v1.*) ;; # kubeadm, the three control-plane components and etcd of that release
	etcd-v3.* | containerd-v2.*) ;;
	*) usage; die "unknown tool '$t'" ;;
	esac
done

mkdir -p "$BIN_DIR" "$SRC_DIR" "$LOG_DIR"
# One build at a time per tools dir (parallel test runs may call this script).
exec 9>"$TOOLS_DIR/.lock"
if ! flock -n 9; then
	log "another build holds $TOOLS_DIR/.lock; waiting"
	flock 9
fi

for t in "${targets[@]}"; do
	case "$t" in
	ignition) build_ignition ;;
	matchbox) build_matchbox ;;
	kubeadm-* | kubectl-* | kube-apiserver-* | kube-controller-manager-* | kube-scheduler-*)
		build_k8s "v${t##*-v}" "${t%-v*}" ;;
	rehearsal-*)
		v=${t#rehearsal-}
		build_k8s "$v" kubeadm kubectl kube-apiserver kube-controller-manager kube-scheduler
		build_etcd "$(etcd_for "$v")"
		;;
	etcd-*) build_etcd "${t#etcd-}" ;;
	containerd-*) build_containerd "${t#containerd-}" ;;
	esac
done
log "done: $BIN_DIR"
