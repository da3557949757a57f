//go:build oracle

package image

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDemoOffline runs the README's main job, make demo, with no way out
// to the internet (every download goes to a closed proxy port): without
// local copies it must name both files and where they go; with them in
// place it must bake the image without a single download.
func TestDemoOffline(t *testing.T) {
	e := setup(t)
	dir := t.TempDir()
	demo := filepath.Join(dir, "demo")
	gocache, err := exec.Command("go", "env", "GOCACHE").Output()
	if err != nil {
		t.Fatal(err)
	}
	makeDemo := func() (string, int) {
		cmd := exec.Command("make", "-C", repo, "demo", "DEMO="+demo)
		cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(dir, "cache"), "GOCACHE="+strings.TrimSpace(string(gocache)),
			"HTTPS_PROXY=http://127.0.0.1:9", "HTTP_PROXY=http://127.0.0.1:9", "NO_PROXY=", "no_proxy=")
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), 0
	}

	out, code := makeDemo()
	if code == 0 {
		t.Fatalf("make demo offline with no local copies succeeded:\n%s", out)
	}
	sysext, base := filepath.Join(demo, "kubernetes-sysext.raw"), filepath.Join(demo, "flatcar_production_image.bin.bz2")
	for _, want := range []string{
		"kiln: download https://extensions.flatcar.org/extensions/kubernetes-v1.37.2-x86-64.raw",
		"make demo: a download failed (offline?)",
		"  " + sysext + "  the Kubernetes sysext, from the URL in kiln's message above",
		"  " + base + "  the Flatcar image, from https://stable.release.flatcar-linux.net/amd64-usr/current/flatcar_production_image.bin.bz2",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("make demo offline does not say %q:\n%s", want, out)
		}
	}

	artifact := []byte("stand-in Kubernetes sysext\n")
	if err := os.WriteFile(sysext, artifact, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(base, e.flatcarBz2, 0o644); err != nil {
		t.Fatal(err)
	}
	out, code = makeDemo()
	if code != 0 {
		t.Fatalf("make demo offline with both files: exit %d\n%s", code, out)
	}
	if !strings.Contains(out, "make demo: using "+sysext) || !strings.Contains(out, "make demo: using "+base) || strings.Contains(out, "download https://") {
		t.Errorf("make demo did not say it used the local copies, or tried a download:\n%s", out)
	}
	img := filepath.Join(demo, "demo-init-flatcar-amd64.img")
	br := bakeResult{Image: img, Bmap: strings.TrimSuffix(img, ".img") + ".bmap", SHA256File: strings.TrimSuffix(img, ".img") + ".sha256", Touched: []string{"OEM"}}
	checkImage(t, e, br, e.flatcar, "init", "amd64")
	cf := filepath.Join(demo, "cluster.yaml")
	checkFlatcar(t, e, br, e.flatcar, cf, "init", "amd64")
	if c, _ := os.ReadFile(cf); !bytes.Contains(c, []byte("url: https://extensions.flatcar.org/extensions/kubernetes-v1.37.2-x86-64.raw")) {
		t.Errorf("the demo cluster's sysext pin is not the vendor URL:\n%s", c)
	}
}
