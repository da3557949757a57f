//go:build oracle

package image

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The signal tests: a Ctrl-C or SIGTERM at any point of a bake (while the
// base image decompresses, while it is copied and changed, while the
// result is hashed and compressed) stops kiln within a second, exit 130,
// "interrupted, nothing written", with nothing left in the destination or
// the cache's work files. A SIGKILLed bake's work folder is removed by the
// next bake, which says so. A bake that cannot fit is refused as a full
// disk.

// stopTimeout is how long kiln may take to exit after the signal.
const stopTimeout = time.Second

// bakeUntil starts a bake that decompresses an xz base image into a fresh
// cache and compresses its result with xz, sends sig after delay, and
// returns the exit code, stderr and the time from the signal to the exit
// (0 if it finished first).
func bakeUntil(t testing.TB, e *env, base, dest, cache string, delay time.Duration, sig syscall.Signal) (int, string, time.Duration) {
	t.Helper()
	cmd := exec.Command(filepath.Join(repo, "bin", "kiln"), "-c", e.flCluster, "build-image", "--role", "worker", "--profile", "flatcar-amd64",
		"--base-image", base, "--cache-dir", cache, "--dest", dest, "--compress", "xz")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var took time.Duration
	select {
	case err := <-done:
		return exitCode(t, err), stderr.String(), 0
	case <-time.After(delay):
	}
	sent := time.Now()
	cmd.Process.Signal(sig)
	select {
	case err := <-done:
		took = time.Since(sent)
		return exitCode(t, err), stderr.String(), took
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%s after %s: kiln still running 30 s later\n%s", sig, delay, stderr.String())
	}
	return 0, "", 0
}

func exitCode(t testing.TB, err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0
}

func TestInterruptedBakeLeavesNothing(t *testing.T) {
	e := setup(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "flatcar.img.xz")
	os.WriteFile(base, must(t, "xz", "-T0", "-c", e.flatcar.path), 0o644)

	// A whole bake first, to know how long one takes here.
	start := time.Now()
	if code, stderr, _ := bakeUntil(t, e, base, filepath.Join(dir, "whole"), filepath.Join(dir, "whole-cache"), time.Hour, syscall.SIGINT); code != 0 {
		t.Fatalf("reference bake: exit %d\n%s", code, stderr)
	}
	whole := time.Since(start)
	t.Logf("a whole bake takes %s", whole.Round(time.Millisecond))

	stopped := 0
	for i, frac := range []float64{0.05, 0.2, 0.4, 0.6, 0.8, 0.95} {
		sig := []syscall.Signal{syscall.SIGINT, syscall.SIGTERM}[i%2]
		delay := time.Duration(frac * float64(whole))
		dest, cache := filepath.Join(dir, "dest", sig.String()+delay.String()), filepath.Join(dir, "cache", sig.String()+delay.String())
		code, stderr, took := bakeUntil(t, e, base, dest, cache, delay, sig)
		last := stderr
		if lines := strings.Split(strings.TrimSpace(stderr), "\n"); len(lines) > 0 {
			last = lines[len(lines)-1]
		}
		t.Logf("%s after %s: exit %d in %s, last line %q", sig, delay.Round(time.Millisecond), code, took.Round(time.Millisecond), last)
		if code == 0 {
			continue // it finished first
		}
		stopped++
		if code != 130 || last != "kiln: interrupted, nothing written" {
			t.Errorf("%s after %s: exit %d, want 130 and \"interrupted, nothing written\"\n%s", sig, delay, code, stderr)
		}
		if took > stopTimeout {
			t.Errorf("%s after %s: kiln took %s to stop, more than %s", sig, delay, took, stopTimeout)
		}
		if entries, _ := os.ReadDir(dest); len(entries) > 0 {
			t.Errorf("%s after %s: the destination holds %v", sig, delay, names(entries))
		}
		if left, _ := filepath.Glob(filepath.Join(cache, "base", ".unpack-*")); len(left) > 0 {
			t.Errorf("%s after %s: the cache holds %v", sig, delay, left)
		}
	}
	if stopped < 4 {
		t.Errorf("only %d of 6 signals came before the bake ended", stopped)
	}
}

func names(entries []os.DirEntry) []string {
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// TestKilledBakeIsSweptUp: a SIGKILLed bake (or a second Ctrl-C) leaves
// its work folder; the next bake into the same folder removes it and says
// how big it was.
func TestKilledBakeIsSweptUp(t *testing.T) {
	e := setup(t)
	dir := t.TempDir()
	dest := filepath.Join(dir, "out")
	cmd := exec.Command(filepath.Join(repo, "bin", "kiln"), "-c", e.flCluster, "build-image", "--role", "worker", "--profile", "flatcar-amd64",
		"--base-image", e.flatcar.path, "--cache-dir", filepath.Join(dir, "cache"), "--dest", dest, "--compress", "xz")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill it once its work folder exists.
	deadline := time.Now().Add(30 * time.Second)
	var work []string
	for len(work) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		work, _ = filepath.Glob(filepath.Join(dest, ".kiln-work-*"))
	}
	time.Sleep(300 * time.Millisecond)
	cmd.Process.Kill()
	cmd.Wait()
	if len(work) == 0 {
		t.Fatalf("no work folder appeared\n%s", stderr.String())
	}
	if _, err := os.Stat(work[0]); err != nil {
		t.Fatalf("the killed bake left no work folder to sweep: %v", err)
	}
	_, r := e.build(t, e.flCluster, "--role", "worker", "--profile", "flatcar-amd64", "--base-image", e.flatcar.path, "--cache-dir", filepath.Join(dir, "cache"), "--dest", dest)
	if r.code != 0 || !strings.Contains(r.stderr, "removed "+work[0]+" (") || !strings.Contains(r.stderr, "MiB), left by a kiln run that was killed") {
		t.Fatalf("next bake: exit %d, did not say it removed %s:\n%s", r.code, work[0], r.stderr)
	}
	if left, _ := filepath.Glob(filepath.Join(dest, ".kiln-work-*")); len(left) > 0 {
		t.Errorf("work folders left: %v", left)
	}
}

// TestBakeOnAFullDisk: a destination too small for the bake (a 64 MiB
// tmpfs) is refused before anything is written, as a full disk, with how
// much more it needs.
func TestBakeOnAFullDisk(t *testing.T) {
	e := setup(t)
	dest := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", dest).CombinedOutput(); err != nil {
		t.Fatalf("mount a small tmpfs: %v\n%s", err, out)
	}
	defer exec.Command("umount", dest).Run()
	_, r := e.build(t, e.flCluster, "--role", "worker", "--profile", "flatcar-amd64", "--base-image", e.flatcar.path, "--cache-dir", t.TempDir(), "--dest", dest)
	if r.code != 6 || !strings.Contains(r.stderr, "kiln: no space left in "+dest+": needs ") || !strings.Contains(r.stderr, " MiB more") {
		t.Fatalf("exit %d, want 6 and \"no space left in %s: needs N MiB more\"\n%s", r.code, dest, r.stderr)
	}
	if entries, _ := os.ReadDir(dest); len(entries) > 0 {
		t.Errorf("the destination holds %v", names(entries))
	}
}
