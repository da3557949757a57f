#!/usr/bin/env bash
# Fetches what the image oracle's QEMU boots need (test/image/qemu_test.go):
# Debian's cloud kernel (vmlinuz and its modules) and busybox-static, for
# amd64 and arm64, from the Debian archive with apt-get download.
#
# Usage: test/tools/qemu-kernels.sh [amd64] [arm64]     (no arguments: both)
#
# Output: ${KILN_TOOLS_DIR:-$HOME/.cache/kiln-tools}/qemu/<arch>/
#   vmlinuz, modules/ (the package's lib/modules/<version>), busybox, version
# An arch already there is left alone, with no network and no apt: delete
# its folder to fetch the current kernel again. Each arch is unpacked to a
# temporary folder and renamed into place, so a folder that exists is whole.
# Fetching arm64 packages on an amd64 host adds the arm64 dpkg architecture
# (dpkg --add-architecture arm64; apt-get update), which needs root; the
# packages are only downloaded and unpacked here, never installed.
set -euo pipefail

DIR="${KILN_TOOLS_DIR:-$HOME/.cache/kiln-tools}/qemu"

die() { printf '[qemu-kernels] ERROR: %s\n' "$*" >&2; exit 1; }
log() { printf '[qemu-kernels] %s\n' "$*" >&2; }

fetch() {
	local arch=$1 out="$DIR/$1"
	[[ -f "$out/version" ]] && return 0
	command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
		die "apt-get and dpkg-deb are needed to fetch the $arch kernel (a Debian host)"
	if [[ "$arch" != "$(dpkg --print-architecture)" ]] &&
		! dpkg --print-foreign-architectures | grep -qx "$arch"; then
		((EUID == 0)) || die "run as root once: dpkg --add-architecture $arch && apt-get update"
		log "adding the $arch dpkg architecture"
		dpkg --add-architecture "$arch"
		apt-get update -qq || die "apt-get update failed (is the Debian archive reachable?)"
	fi
	# The metapackage names the current kernel ABI: linux-image-6.1.0-N-cloud-<arch>.
	kernel_pkg() {
		apt-cache depends "linux-image-cloud-$arch:$arch" 2>/dev/null |
			sed -n 's/^ *Depends: \(linux-image-[0-9][^:]*\).*/\1/p' | head -n1
	}
	local kpkg
	kpkg=$(kernel_pkg)
	if [[ -z "$kpkg" ]] && ((EUID == 0)); then
		log "no linux-image-cloud-$arch:$arch in the apt lists: apt-get update"
		apt-get update -qq || die "apt-get update failed (is the Debian archive reachable?)"
		kpkg=$(kernel_pkg)
	fi
	[[ -n "$kpkg" ]] || die "no linux-image-cloud-$arch:$arch in the apt lists: run apt-get update (as root)"
	log "fetching $kpkg and busybox-static for $arch"
	local tmp
	tmp=$(mktemp -d "$DIR/.fetch-$arch.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$kpkg:$arch" "busybox-static:$arch" >/dev/null) ||
		die "apt-get download $kpkg:$arch busybox-static:$arch failed (is the Debian archive reachable?)"
	mkdir "$tmp/root" "$tmp/$arch"
	for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
	local kver=${kpkg#linux-image-}
	mv "$tmp/root/boot/vmlinuz-$kver" "$tmp/$arch/vmlinuz"
	mv "$tmp/root/lib/modules/$kver" "$tmp/$arch/modules"
	mv "$tmp/root/bin/busybox" "$tmp/$arch/busybox"
	echo "$kpkg busybox-static $(dpkg-deb -f "$tmp"/busybox-static_*.deb Version)" >"$tmp/$arch/version"
	mv "$tmp/$arch" "$out"
	rm -rf "$tmp"
	trap - EXIT
	log "$arch: $(cat "$out/version")"
}

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9 # one fetch at a time (util-linux)
archs=("$@")
((${#archs[@]})) || archs=(amd64 arm64)
for a in "${archs[@]}"; do
	case "$a" in
	amd64 | arm64) fetch "$a" ;;
	*) die "unknown arch $a (amd64 or arm64)" ;;
	esac
done
