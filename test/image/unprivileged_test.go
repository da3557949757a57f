//go:build oracle

package image

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// nobody is the unprivileged user the bakes run as.
const nobody = 65534

// asNobody runs bin/kiln as the unprivileged user nobody (setpriv: uid,
// gid and no supplementary groups), with HOME in dir.
func asNobody(t testing.TB, e *env, dir string, args ...string) result {
	t.Helper()
	cmd := exec.Command("setpriv", append([]string{fmt.Sprintf("--reuid=%d", nobody), fmt.Sprintf("--regid=%d", nobody), "--clear-groups", "--", filepath.Join(repo, "bin", "kiln")}, args...)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "SSL_CERT_FILE=" + e.certFile}
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{code, out.String(), errb.String()}
}

// nobodysCopy copies a cluster folder (its secrets too) to a folder of
// nobody's and returns the copy's cluster file.
func nobodysCopy(t testing.TB, cluster string) (string, string) {
	t.Helper()
	home, err := os.MkdirTemp("", "kiln-nobody-") // t.TempDir's parent is root's only
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(home) })
	must(t, "cp", "-a", filepath.Dir(cluster), filepath.Join(home, "cluster"))
	must(t, "chown", "-R", fmt.Sprintf("%d:%d", nobody, nobody), home)
	return home, filepath.Join(home, "cluster", filepath.Base(cluster))
}

// Before: a Flatcar bake as a normal user failed in btrfs restore (it
// restores owners), and a root-less mkfs.btrfs would have stored the
// builder's uid on config.ign. After: Flatcar and Fedora CoreOS bakes run
// unprivileged, and every file kiln writes into the image is root's.
func TestBakeUnprivileged(t *testing.T) {
	e := setup(t)
	os.Chmod(e.dir, 0o755) // the fixtures' folder: the signing key, the CA
	for _, c := range []struct {
		name, cluster string
		args          []string
	}{
		{"flatcar", e.flCluster, []string{"--profile", "flatcar-amd64", "--mirror", e.srv.URL + "/{channel}", "--insecure-mirror", "--signing-key", e.goodKey}},
		{"fcos", e.fcCluster, []string{"--profile", "fcos-x86_64", "--mirror", e.srv.URL, "--insecure-mirror"}},
		{"rpi4", e.flCluster, nil}, // offline, from files: arguments below
	} {
		t.Run(c.name, func(t *testing.T) {
			home, cluster := nobodysCopy(t, c.cluster)
			dest := filepath.Join(home, "out")
			if c.name == "rpi4" {
				base, zipPath, _ := rpi4Inputs(t, e)
				for _, f := range []*string{&base, &zipPath} {
					must(t, "cp", *f, home)
					*f = filepath.Join(home, filepath.Base(*f))
				}
				must(t, "chown", "-R", fmt.Sprintf("%d:%d", nobody, nobody), home)
				c.args = []string{"--profile", "flatcar-rpi4", "--base-image", base, "--firmware", zipPath}
			}
			r := asNobody(t, e, home, append([]string{"-c", cluster, "build-image", "--role", "init", "--dest", dest}, c.args...)...)
			if r.code != 0 {
				t.Fatalf("build-image as nobody: exit %d\n%s", r.code, r.stderr)
			}
			img := filepath.Join(dest, "lab-init-"+map[string]string{"flatcar": "flatcar-amd64", "fcos": "fcos-x86_64", "rpi4": "flatcar-rpi4"}[c.name]+".img")
			fi, err := os.Stat(img)
			if err != nil {
				entries, _ := os.ReadDir(dest)
				t.Fatalf("%v (dest holds %v)", err, entries)
			}
			if st := fi.Sys().(*syscall.Stat_t); st.Uid != nobody {
				t.Errorf("the image is owned by %d, want nobody's", st.Uid)
			}
			if c.name != "fcos" {
				checkRootOwnedBtrfs(t, extract(t, img, "OEM"))
				return
			}
			boot := extract(t, img, "boot")
			for _, p := range []string{"ignition", "ignition/config.ign"} {
				if st := string(must(t, "debugfs", "-R", "stat "+p, boot)); !strings.Contains(st, "User:     0   Group:     0") {
					t.Errorf("%s is not root's:\n%s", p, st)
				}
			}
		})
	}
}

// kiln pxe runs unprivileged too: download, verify, bundle.
func TestPXEUnprivileged(t *testing.T) {
	e := setup(t)
	os.Chmod(e.dir, 0o755)
	home, cluster := nobodysCopy(t, e.flCluster)
	bundle := filepath.Join(home, "pxe")
	r := asNobody(t, e, home, "-c", cluster, "pxe", "--dest", bundle, "--server-url", "http://10.0.0.5:8080",
		"--mirror", e.srv.URL+"/{channel}", "--insecure-mirror", "--signing-key", e.goodKey)
	if r.code != 0 {
		t.Fatalf("kiln pxe as nobody: exit %d\n%s", r.code, r.stderr)
	}
	if _, err := pxe.ReadManifest(bundle); err != nil {
		t.Fatal(err)
	}
}

// checkRootOwnedBtrfs reads a btrfs image back with btrfs restore (as
// root, owners included) and wants every file root's.
func checkRootOwnedBtrfs(t testing.TB, fs string) {
	t.Helper()
	back := t.TempDir()
	must(t, "btrfs", "restore", "-m", fs, back)
	n := 0
	filepath.Walk(back, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == back {
			return err
		}
		n++
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s in the OEM btrfs is owned by %d:%d, want root's", strings.TrimPrefix(p, back), st.Uid, st.Gid)
		}
		return nil
	})
	if n == 0 {
		t.Error("the OEM btrfs holds no files")
	}
}
