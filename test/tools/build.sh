#!/usr/bin/env bash
# Build the third-party "oracle" binaries that kiln's tests use as
# independent checkers, from their upstream Go modules (via the Go module
# proxy). See test/tools/README.md.
#
# Usage: test/tools/build.sh [ignition] [matchbox] [containerd-v2.X.Y] [kubeadm-v1.X.Y ...] [rehearsal-v1.X.Y ...]
#   No arguments builds ignition, matchbox, containerd (CONTAINERD_VERSION)
#   and kubeadm for every KUBEADM_VERSIONS entry.
#   rehearsal-v1.X.Y builds what the rehearsal runs today for that release:
#   kubeadm, kubectl, kube-apiserver, kube-controller-manager, kube-scheduler
#   (all from k8s.io/kubernetes@v1.X.Y) and the etcd that kubeadm of that
#   minor deploys. node-v1.X.Y builds what a real node adds (for the
#   real-node rehearsal; make does not build it yet): kubelet, kube-proxy,
#   the CoreDNS of that minor, containerd, runc, the CNI plugins, the
#   flannel CNI plugin and flanneld (versions below). Also single targets kubelet-v1.X.Y ...,
#   etcd-v3.X.Y, runc-v1.X.Y, cni-plugins-v1.X.Y, cni-flannel-v0.X.Y,
#   flanneld-v0.X.Y, coredns-v1.X.Y.
#
# Output: ${KILN_TOOLS_DIR:-$HOME/.cache/kiln-tools}/bin/{ignition,matchbox,kubeadm-vX.Y.Z,kube*-vX.Y.Z,etcd-vX.Y.Z,
#   containerd-vX.Y.Z,runc-vX.Y.Z,cni-PLUGIN-vX.Y.Z,flanneld-vX.Y.Z,coredns-vX.Y.Z}
# A tool whose stamp matches its recipe is not rebuilt. Binaries are built to
# a temporary name and renamed into place, so bin/ never holds a partial file.
set -euo pipefail

IGNITION_VERSION=v2.24.0
MATCHBOX_VERSION=v0.11.0
CONTAINERD_VERSION=v2.2.9
# The rehearsal's node runtime next to containerd: runc (newest v1.3.x the
# proxy serves; containerd v2.2.9 itself pins v1.3.6), the CNI plugins kiln
# installs on Fedora CoreOS (profiles/os/fcos.yaml), the flannel CNI plugin
# (flannel-io/cni-plugin is refused by the proxy; containernetworking/plugins
# v0.9.1 is the last release with plugins/meta/flannel, same contract) and
# flanneld (manifests/images.yaml).
RUNC_VERSION=v1.3.7
CNI_PLUGINS_VERSION=v1.9.1
CNI_PLUGINS=(bridge host-local loopback portmap)
CNI_FLANNEL_VERSION=v0.9.1
FLANNEL_VERSION=v0.28.4
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
	echo "       [kubelet-v1.X.Y] [kube-proxy-v1.X.Y] [etcd-v3.X.Y] [coredns-v1.X.Y]" >&2
	echo "       [containerd-v2.X.Y (containerd, ctr, containerd-shim-runc-v2)] [runc-v1.X.Y]" >&2
	echo "       [cni-plugins-v1.X.Y (cni-{${CNI_PLUGINS[*]}}-v1.X.Y)] [cni-flannel-v0.X.Y] [flanneld-v0.X.Y]" >&2
	echo "       [rehearsal-v1.X.Y (kubeadm, kubectl, control plane and etcd of a release)]" >&2
	echo "       [node-v1.X.Y (kubelet, kube-proxy, coredns of a release; containerd-$CONTAINERD_VERSION, runc-$RUNC_VERSION," >&2
	echo "        cni-plugins-$CNI_PLUGINS_VERSION, cni-flannel-$CNI_FLANNEL_VERSION, flanneld-$FLANNEL_VERSION)]" >&2
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
# build_single NAME MOD VER PKG CGO LDFLAGS LOGFILE [GOBUILDFLAG...]: build
# package PKG of MOD@VER (already fetched: UP_GOMOD is its go.mod) in a
# throwaway module with upstream's go line, passing the GOBUILDFLAGs (-tags,
# -buildmode) to go build; sets BUILT to the temporary binary. GOMOD_EXTRA,
# if set, is appended to that go.mod (e.g. a require that lifts a dependency
# version the module proxy refuses; the caller's stamp key must name it).
build_single() {
	local name=$1 mod=$2 ver=$3 pkg=$4 cgo=$5 ldflags=$6 logfile=$7
	shift 7
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
		[[ -z "${GOMOD_EXTRA:-}" ]] || printf '\n%s\n' "$GOMOD_EXTRA"
	} >"$dir/go.mod"
	BUILT=$(new_tmp "$name")
	TMP_FILES+=("$BUILT")
	# (&& chains: set -e does not apply inside a `( ... ) || die` list.)
	(
		cd "$dir" &&
			run "$logfile" go get "$pkg@$ver" &&
			CGO_ENABLED=$cgo run "$logfile" go build -trimpath "$@" -ldflags "$ldflags" -o "$BUILT" "$pkg"
	) || die "$name $ver: build failed (full log: $logfile)"
}

# build_go_tool NAME KEY MOD VER PKG CGO LDFLAGS VERIFY [PREPARE [GOBUILDFLAG...]]:
# build package PKG of MOD@VER into bin/NAME unless its stamp already says KEY
# (which must name any GOBUILDFLAGs). PREPARE ("" for none) runs once the
# module is fetched (UP_DIR holds it), VERIFY on the built binary; both get
# the binary or nothing, then the log file.
build_go_tool() {
	local name=$1 key=$2 mod=$3 ver=$4 pkg=$5 cgo=$6 ldflags=$7 verify=$8 prepare=${9:-}
	shift $(($# < 9 ? $# : 9))
	if already_built "$name" "$key"; then
		log "$name $ver: up to date ($BIN_DIR/$name)"
		return 0
	fi
	local start=$SECONDS logfile=$LOG_DIR/$name.log
	log "$name $ver: building (log: $logfile)"
	: >"$logfile"
	fetch_module "$mod" "$ver"
	[[ -z "$prepare" ]] || "$prepare" "$logfile"
	build_single "$name" "$mod" "$ver" "$pkg" "$cgo" "$ldflags" "$logfile" "$@"
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
# for each CMD (kubeadm, kube-apiserver, kube-controller-manager, kubectl,
# kube-scheduler, kubelet, kube-proxy) not already up to date; one `go build`
# for all of them.
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

	local outdir=$BIN_DIR/.kubernetes-$ver.tmp.$$ pkgs=() all=()
	rm -rf "$BIN_DIR/.kubernetes-$ver.tmp."*
	TMP_FILES+=("$outdir")
	mkdir -p "$outdir"
	for cmd in "${todo[@]}"; do pkgs+=("$mod/cmd/$cmd"); done
	# go get every requested command, built or not: which packages it sees
	# decides the go.mod (the required versions of staging modules, which
	# the binaries' build info records), so a rebuild of some of them matches
	# a build of all of them.
	for cmd in "$@"; do all+=("$mod/cmd/$cmd@$ver"); done
	# Upstream builds these static (CGO_ENABLED=0), all but the kubelet, which
	# hack/lib/golang.sh links with cgo; it builds and runs without (DESIGN
	# §7b), so it joins the others. One go build shares the compile of the
	# packages they have in common.
	(
		cd "$dir" &&
			run "$logfile" go get "${all[@]}" &&
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

# ---------------------------------------------------------------- runc
# build_runc VER : github.com/opencontainers/runc@VER (its module root is the
# runc main package) into bin/runc-VER, like upstream's `make runc`: cgo
# (libcontainer/nsenter is C), tags seccomp and urfave_cli_no_docs, a
# dynamic PIE that links libseccomp.so.2. No ldflags: the version is
# upstream's embedded VERSION file, and main.gitCommit stays empty (the
# module proxy does not give the commit). runc's go.mod has no replace or
# exclude directives, so the scratch module resolves upstream's versions.
build_runc() {
	local ver=$1 mod=github.com/opencontainers/runc tags="seccomp urfave_cli_no_docs"
	[[ "$ver" =~ ^v1\.[0-9]+\.[0-9]+$ ]] || die "bad runc version '$ver' (want v1.MINOR.PATCH)"
	RUNC_WANT=${ver#v} build_go_tool "runc-$ver" "runc $ver recipe=$RECIPE_REV tags=$tags buildmode=pie ldflags=" \
		"$mod" "$ver" "$mod" 1 "" verify_runc prepare_runc -tags "$tags" -buildmode=pie
}

prepare_runc() {
	command -v gcc >/dev/null || die "runc needs cgo: gcc not found (run .ci/install-deps)"
	pkg-config --exists libseccomp ||
		die "runc needs libseccomp's headers and pkg-config file (Debian: libseccomp-dev; run .ci/install-deps)"
	[[ "$(cat "$UP_DIR/VERSION")" == "$RUNC_WANT" ]] ||
		die "runc: its VERSION file says '$(cat "$UP_DIR/VERSION")', want '$RUNC_WANT'"
}

verify_runc() {
	local out
	out=$("$1" --version 2>>"$2") || die "runc: built binary does not run (see $2)"
	printf '%s\n' "$out" >>"$2"
	grep -qx "runc version $RUNC_WANT" <<<"$out" || die "runc: 'runc --version' does not report $RUNC_WANT (see $2)"
	# runc prints its libseccomp version only when built with the seccomp tag.
	grep -q '^libseccomp: ' <<<"$out" || die "runc: built without seccomp support (see $2)"
}

# ---------------------------------------------------------------- CNI plugins
# build_cni VER PLUGIN... : each PLUGIN of github.com/containernetworking/
# plugins@VER into bin/cni-PLUGIN-VER (static, no cgo, as upstream's release).
# Flat names with their own stamps, like every other tool here; a node's CNI
# bin dir (/opt/cni/bin) gets them under their plain names.
build_cni() {
	local ver=$1 mod=github.com/containernetworking/plugins plugin
	shift
	[[ "$ver" =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "bad CNI plugins version '$ver' (want vX.Y.Z)"
	local ldflags="-s -w -X $mod/pkg/utils/buildversion.BuildVersion=$ver"
	for plugin in "$@"; do
		CNI_WANT="CNI $plugin plugin $ver" build_go_tool "cni-$plugin-$ver" "cni-$plugin $ver recipe=$RECIPE_REV ldflags=$ldflags" \
			"$mod" "$ver" "$mod/plugins/$(cni_plugin_dir "$plugin")/$plugin" 0 "$ldflags" verify_cni
	done
}

# cni_plugin_dir PLUGIN : the plugins/ subdirectory that holds PLUGIN.
cni_plugin_dir() {
	case "$1" in
	bridge | loopback | ptp | macvlan | ipvlan | vlan | host-device | dummy | tap) echo main ;;
	host-local | dhcp | static) echo ipam ;;
	portmap | flannel | bandwidth | firewall | tuning | sbr | vrf) echo meta ;;
	*) die "unknown CNI plugin '$1'; add it to cni_plugin_dir in $0" ;;
	esac
}

verify_cni() {
	local out
	# With no CNI_COMMAND a plugin prints its "about" string on stderr;
	# CNI_COMMAND=VERSION must answer with the spec versions it supports.
	out=$(env -i "$1" 2>&1) || true
	printf '%s\n' "$out" >>"$2"
	grep -qF "$CNI_WANT" <<<"$out" || die "CNI plugin $1 does not report '$CNI_WANT' (see $2)"
	env -i CNI_COMMAND=VERSION "$1" </dev/null 2>>"$2" | grep -q '"supportedVersions"' ||
		die "CNI plugin $1: CNI_COMMAND=VERSION failed (see $2)"
}

# ---------------------------------------------------------------- flanneld
# build_flanneld VER : github.com/flannel-io/flannel@VER (its module root is
# the flanneld main package) into bin/flanneld-VER, like upstream's
# dist/flanneld on amd64: cgo (the udp backend's proxy is C, and on amd64
# the package does not build without it) linked static. The vxlan backend
# needs none of that, but main.go links every backend, the Tencent Cloud
# one too: the proxy refuses tencentcloud/common v1.3.79 (flannel v0.28.4's
# pin; 403 "not available"), so the scratch module requires the nearest
# later version it serves (only that backend uses it).
build_flanneld() {
	local ver=$1 mod=github.com/flannel-io/flannel
	[[ "$ver" =~ ^v0\.[0-9]+\.[0-9]+$ ]] || die "bad flannel version '$ver' (want v0.MINOR.PATCH)"
	local ldflags="-s -w -X $mod/pkg/version.Version=$ver -extldflags=-static"
	local extra="require github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/common v1.3.103"
	FLANNEL_WANT=$ver GOMOD_EXTRA=$extra build_go_tool "flanneld-$ver" "flanneld $ver recipe=$RECIPE_REV ldflags=$ldflags gomod=$extra" \
		"$mod" "$ver" "$mod" 1 "$ldflags" verify_flanneld prepare_flanneld
}

prepare_flanneld() {
	command -v gcc >/dev/null || die "flanneld needs cgo: gcc not found (run .ci/install-deps)"
	[[ -f "$(gcc -print-file-name=libc.a)" ]] || die "flanneld links static: no libc.a (Debian: libc6-dev; run .ci/install-deps)"
	grep -Eq '^[[:space:]]*var[[:space:]]+Version[[:space:]]*=' "$UP_DIR/pkg/version/version.go" ||
		die "flannel $FLANNEL_WANT: pkg/version has no Version variable; update the ldflags in $0"
}

verify_flanneld() {
	local got
	got=$("$1" --version 2>&1) || die "flanneld: built binary does not run (see $2)"
	printf '%s\n' "$got" >>"$2"
	[[ "$got" == "$FLANNEL_WANT" ]] || die "flanneld: 'flanneld --version' reports '$got', want '$FLANNEL_WANT'"
	# It goes into a single-binary image: no ELF interpreter allowed.
	if command -v readelf >/dev/null && readelf -l "$1" | grep -q 'Requesting program interpreter'; then
		die "flanneld: $1 is dynamically linked, want static"
	fi
}

# ---------------------------------------------------------------- coredns
# build_coredns VER : github.com/coredns/coredns@VER (its module root is the
# coredns main package; the generated plugin lists are in the module) into
# bin/coredns-VER, like upstream's `make`: CGO_ENABLED=0, -s -w and the
# Makefile's GOTAGS. coremain.GitCommit stays empty (no commit from the proxy).
build_coredns() {
	local ver=$1 mod=github.com/coredns/coredns tags=""
	[[ "$ver" =~ ^v1\.([0-9]+)\.[0-9]+$ ]] || die "bad CoreDNS version '$ver' (want v1.MINOR.PATCH)"
	((BASH_REMATCH[1] < 14)) || tags=grpcnotrace # GOTAGS?= in upstream's Makefile since v1.14
	COREDNS_WANT=${ver#v} COREDNS_TAGS=$tags build_go_tool "coredns-$ver" "coredns $ver recipe=$RECIPE_REV tags=$tags ldflags=-s -w" \
		"$mod" "$ver" "$mod" 0 "-s -w" verify_coredns prepare_coredns -tags "$tags"
}

prepare_coredns() {
	local up_tags
	up_tags=$(sed -n 's/^GOTAGS?=//p' "$UP_DIR/Makefile")
	[[ "$up_tags" == "$COREDNS_TAGS" ]] ||
		die "coredns $COREDNS_WANT: upstream's Makefile has GOTAGS '$up_tags', the recipe '$COREDNS_TAGS'; update build_coredns in $0"
}

verify_coredns() {
	local got
	got=$("$1" -version 2>>"$2") || die "coredns: built binary does not run (see $2)"
	printf '%s\n' "$got" >>"$2"
	[[ "$(head -n1 <<<"$got")" == "CoreDNS-$COREDNS_WANT" ]] || die "coredns: 'coredns -version' reports '$(head -n1 <<<"$got")', want 'CoreDNS-$COREDNS_WANT'"
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

# coredns_for VER : the CoreDNS release that kubeadm of Kubernetes VER deploys
# (manifests/kubeadm-images.yaml, which the oracle checks against kubeadm).
coredns_for() {
	case "$1" in
	v1.33.*) echo v1.12.0 ;;
	v1.34.*) echo v1.12.1 ;;
	v1.35.*) echo v1.13.1 ;;
	v1.36.*) echo v1.14.2 ;;
	v1.37.*) echo v1.14.6 ;;
	*) die "no CoreDNS version known for Kubernetes $1; add it to coredns_for in $0" ;;
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
	kubelet-v1.* | kube-proxy-v1.*) ;;
	rehearsal-v1.*) ;; # kubeadm, kubectl, the control plane and etcd of that release
	node-v1.*) ;;      # kubelet, kube-proxy, CoreDNS and the node runtime of that release
	etcd-v3.* | containerd-v2.* | runc-v* | cni-*-v* | flanneld-v* | coredns-v*) ;;
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
	kubeadm-* | kubectl-* | kube-apiserver-* | kube-controller-manager-* | kube-scheduler-* | kubelet-* | kube-proxy-*)
		build_k8s "v${t##*-v}" "${t%-v*}" ;;
	rehearsal-*)
		v=${t#rehearsal-}
		build_k8s "$v" kubeadm kubectl kube-apiserver kube-controller-manager kube-scheduler
		build_etcd "$(etcd_for "$v")"
		;;
	node-*)
		v=${t#node-}
		build_k8s "$v" kubelet kube-proxy
		build_coredns "$(coredns_for "$v")"
		build_containerd "$CONTAINERD_VERSION"
		build_runc "$RUNC_VERSION"
		build_cni "$CNI_PLUGINS_VERSION" "${CNI_PLUGINS[@]}"
		build_cni "$CNI_FLANNEL_VERSION" flannel
		build_flanneld "$FLANNEL_VERSION"
		;;
	etcd-*) build_etcd "${t#etcd-}" ;;
	containerd-*) build_containerd "${t#containerd-}" ;;
	runc-*) build_runc "${t#runc-}" ;;
	cni-plugins-*) build_cni "${t#cni-plugins-}" "${CNI_PLUGINS[@]}" ;;
	cni-*)
		v=v${t##*-v}
		p=${t%-v*}
		build_cni "$v" "${p#cni-}"
		;;
	flanneld-*) build_flanneld "${t#flanneld-}" ;;
	coredns-*) build_coredns "${t#coredns-}" ;;
	esac
done
log "done: $BIN_DIR"
