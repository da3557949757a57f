package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestVersionIsStamped builds kiln the way the Makefile does, with a
// version and a commit stamped in, and reads them back through kiln
// version, kiln version -o json and kiln --version.
func TestVersionIsStamped(t *testing.T) {
	makefile, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	const stamp = "-X main.version=$(VERSION) -X main.commit=$(COMMIT)"
	if !strings.Contains(string(makefile), stamp) {
		t.Fatalf("the Makefile no longer stamps bin/kiln with %q: update this test and version.go together", stamp)
	}
	bin := filepath.Join(t.TempDir(), "kiln")
	build := exec.Command("go", "build", "-ldflags", "-X main.version=v0.9.1-3-gabc1234 -X main.commit=abc1234def", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	want := "kiln v0.9.1-3-gabc1234 (commit abc1234def, go"
	for _, args := range [][]string{{"version"}, {"--version"}} {
		out, err := exec.Command(bin, args...).Output()
		if err != nil || !strings.HasPrefix(string(out), want) {
			t.Errorf("kiln %s: %q (%v), want it to start with %q", strings.Join(args, " "), out, err, want)
		}
	}
	out, err := exec.Command(bin, "version", "-o", "json").Output()
	if err != nil {
		t.Fatal(err)
	}
	var b buildInfo
	if err := json.Unmarshal(out, &b); err != nil || b.Version != "v0.9.1-3-gabc1234" || b.Commit != "abc1234def" || !strings.HasPrefix(b.Go, "go1.") {
		t.Errorf("kiln version -o json: %s (%v)", out, err)
	}
}

// TestVersionUnstamped: a kiln built without the stamp says what it does
// not know instead of printing an empty version.
func TestVersionUnstamped(t *testing.T) {
	r := kiln(t, "version")
	r.expect(t, 0)
	if !strings.HasPrefix(r.stdout, "kiln ") || strings.Contains(r.stdout, "kiln  ") || !strings.Contains(r.stdout, "(commit ") {
		t.Errorf("kiln version: %q", r.stdout)
	}
	if v := kiln(t, "--version"); v.stdout != r.stdout {
		t.Errorf("kiln --version %q differs from kiln version %q", v.stdout, r.stdout)
	}
}
