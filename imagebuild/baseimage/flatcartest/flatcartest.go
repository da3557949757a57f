// Package flatcartest makes Flatcar-like release files for tests, with
// the standard tools: a PXE initramfs whose /usr names its release.
package flatcartest

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Initramfs is a Flatcar-like PXE initramfs: usr.squashfs (mksquashfs,
// squashfs-tools) holding lib/os-release with VERSION_ID=version, in a
// newc cpio (GNU cpio), gzipped.
func Initramfs(t testing.TB, version string) []byte {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "usr", "lib"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "usr", "lib", "os-release"), []byte("ID=flatcar\nVERSION="+version+"\nVERSION_ID="+version+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", "mksquashfs usr usr.squashfs -quiet -noappend -comp xz >/dev/null && echo usr.squashfs | cpio --quiet -o -H newc | gzip -9 > initramfs.cpio.gz")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make a Flatcar PXE initramfs: %v\n%s", err, out)
	}
	data, err := os.ReadFile(filepath.Join(dir, "initramfs.cpio.gz"))
	if err != nil {
		t.Fatal(err)
	}
	return data
}
