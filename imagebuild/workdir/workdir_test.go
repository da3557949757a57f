package workdir

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSweepRemovesOnlyOrphans: a folder or file whose lock is free (its
// process died) goes, with a note of its size; one held by a live run, or
// just made and not locked yet, stays.
func TestSweepRemovesOnlyOrphans(t *testing.T) {
	parent := t.TempDir()
	live, err := Make(parent, ".kiln-work-*")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Remove()
	liveFile, err := File(parent, ".kiln-work-*")
	if err != nil {
		t.Fatal(err)
	}
	defer liveFile.Close()

	// A killed run: its lock file is there, nobody holds it.
	dead := filepath.Join(parent, ".kiln-work-dead")
	os.MkdirAll(dead, 0o755)
	os.WriteFile(filepath.Join(dead, lockName), nil, 0o600)
	os.WriteFile(filepath.Join(dead, "part.img"), bytes.Repeat([]byte{1}, 3<<20), 0o600)
	deadFile := filepath.Join(parent, ".kiln-work-deadfile")
	os.WriteFile(deadFile, []byte("half an image"), 0o600)
	// Without a lock file: made a moment ago by another run, or a folder
	// that is no work folder (a bundle's previous copy, Released).
	foreign := filepath.Join(parent, ".kiln-work-1234.old")
	os.MkdirAll(foreign, 0o755)
	os.Chtimes(foreign, time.Now(), time.Now().Add(-time.Hour))
	other := filepath.Join(parent, "keep.img")
	os.WriteFile(other, nil, 0o600)

	var log bytes.Buffer
	if err := Sweep(parent, ".kiln-work-*", &log); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dead, deadFile} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("orphan %s kept", p)
		}
	}
	for _, p := range []string{live.Path, liveFile.Name(), foreign, other} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s removed: %v", p, err)
		}
	}
	if !strings.Contains(log.String(), "removed "+dead+" (3 MiB), left by a kiln run that was killed") {
		t.Errorf("log: %q", log.String())
	}
	if err := live.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(live.Path); err == nil {
		t.Error("Remove left the folder")
	}
	if err := Sweep(filepath.Join(parent, "none"), "*", &log); err != nil {
		t.Errorf("missing parent: %v", err)
	}
}
