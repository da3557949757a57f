#!/usr/bin/env bash
# Fetches NetworkManager's nm-initrd-generator for the network oracle
# (test/oracle/network_test.go): the program Fedora CoreOS's initramfs runs
# to turn dracut's ip=, vlan= and nameserver= kernel arguments into
# NetworkManager connections. It comes from Debian's network-manager
# package, which is only downloaded and unpacked here, never installed (its
# maintainer scripts would start daemons on the test host). Its libraries
# are those of libnm0 (gir1.2-nm-1.0, .ci/install-deps).
#
# Usage: test/tools/nm-initrd-generator.sh
# Output: ${KILN_TOOLS_DIR:-$HOME/.cache/kiln-tools}/bin/nm-initrd-generator
# (left alone, with no network and no apt, when it is already there).
set -euo pipefail

BIN="${KILN_TOOLS_DIR:-$HOME/.cache/kiln-tools}/bin"
out="$BIN/nm-initrd-generator"
[[ -x "$out" ]] && exit 0

die() { printf '[nm-initrd-generator] ERROR: %s\n' "$*" >&2; exit 1; }
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
	die "apt-get and dpkg-deb are needed (a Debian host)"
mkdir -p "$BIN"
tmp=$(mktemp -d "$BIN/.nm-initrd-generator.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root network-manager >/dev/null) ||
	die "apt-get download network-manager failed (is the Debian archive reachable? apt-get update first)"
dpkg-deb -x "$tmp"/network-manager_*.deb "$tmp/root"
mv "$tmp/root/usr/lib/NetworkManager/nm-initrd-generator" "$out.tmp"
mv "$out.tmp" "$out"
printf '[nm-initrd-generator] %s from network-manager %s\n' "$out" "$(dpkg-deb -f "$tmp"/network-manager_*.deb Version)" >&2
