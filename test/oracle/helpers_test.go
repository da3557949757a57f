//go:build oracle

// Package oracle checks what kiln writes with tools nobody here wrote: the
// real Ignition binary and real kubeadm, built from their Go modules by
// test/tools/build.sh. Run with `make oracle`.
package oracle

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// repo is the repository root, two levels up from this package.
var repo, _ = filepath.Abs("../..")

// tool returns the path of an oracle tool built by test/tools/build.sh.
func tool(t *testing.T, name string) string {
	t.Helper()
	dir := os.Getenv("KILN_TOOLS_DIR")
	if dir == "" {
		home, _ := os.UserHomeDir()
		dir = filepath.Join(home, ".cache", "kiln-tools")
	}
	p := filepath.Join(dir, "bin", name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("oracle tool %s missing: run test/tools/build.sh (or make oracle): %v", name, err)
	}
	return p
}

// kilnBin is the kiln binary built by make build.
func kilnBin(t *testing.T) string {
	t.Helper()
	p := filepath.Join(repo, "bin", "kiln")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s missing: run make build first", p)
	}
	return p
}

// kiln runs the kiln binary and returns its standard output.
func kiln(t *testing.T, args ...string) []byte {
	t.Helper()
	var stderr bytes.Buffer
	cmd := exec.Command(kilnBin(t), args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kiln %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// newCluster runs kiln init in a fresh folder and returns the cluster file.
func newCluster(t *testing.T, args ...string) string {
	t.Helper()
	dir := t.TempDir()
	kiln(t, append([]string{"init", "oracle", "--endpoint", "lb.oracle.test:6443", "--dest", dir}, args...)...)
	return filepath.Join(dir, "cluster.yaml")
}

// editCluster changes a cluster file through a generic YAML map.
func editCluster(t *testing.T, path string, edit func(m map[string]any)) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	out, err := yaml.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
}

func run(t *testing.T, name string, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	return cmd.CombinedOutput()
}

// execIgnition builds the command for one Ignition stage; state, cache and
// the neednet flag live in dir, not in /run.
func execIgnition(bin, stage, root, dir string) *exec.Cmd {
	return exec.Command(bin, "-platform", "file", "-stage", stage, "-root", root,
		"-config-cache", filepath.Join(dir, "config.json"),
		"-neednet", filepath.Join(dir, "neednet"),
		"-state-file", filepath.Join(dir, "state"),
		"-log-to-stdout")
}
