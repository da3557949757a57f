package baseimage

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"os/exec"
	"testing"
)

// TestDecompressBothWays: bzip2 and xz streams made by the system's own
// compressors decode to the original through the parallel tools and,
// with PATH emptied, through Go's decoders; a corrupted stream fails
// both ways; closing early stops the tool.
func TestDecompressBothWays(t *testing.T) {
	raw := make([]byte, 3<<20)
	rand.Read(raw[:1<<20])
	copy(raw[2<<20:], bytes.Repeat([]byte("kiln "), 1<<20/5))
	for _, c := range []struct{ kind, compress, tool string }{
		{"bzip2", "bzip2", "lbzip2"}, {"xz", "xz", "xz"}, {"zstd", "zstd", ""},
	} {
		cmd := exec.Command(c.compress, "-c")
		cmd.Stdin = bytes.NewReader(raw)
		packed, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v", c.compress, err)
		}
		for _, path := range []string{"system", "go"} {
			t.Run(c.kind+"-"+path, func(t *testing.T) {
				if path == "go" {
					t.Setenv("PATH", t.TempDir())
				} else if c.tool != "" {
					if _, err := exec.LookPath(c.tool); err != nil {
						t.Fatalf("%s not installed (.ci/install-deps)", c.tool)
					}
				}
				r, kind, err := Decompress(context.Background(), bytes.NewReader(packed))
				if err != nil || kind != c.kind {
					t.Fatalf("kind %q, %v", kind, err)
				}
				_, viaTool := r.(*toolReader)
				if viaTool != (path == "system" && c.tool != "") {
					t.Errorf("decoded by a tool: %v", viaTool)
				}
				got, err := io.ReadAll(r)
				r.Close()
				if err != nil || !bytes.Equal(got, raw) {
					t.Fatalf("decoded %d bytes, %v; want the %d original bytes", len(got), err, len(raw))
				}
				bad := bytes.Clone(packed)
				bad[len(bad)/2] ^= 0xff
				r, _, err = Decompress(context.Background(), bytes.NewReader(bad))
				if err == nil {
					_, err = io.ReadAll(r)
					r.Close()
				}
				if err == nil {
					t.Error("a corrupted stream decoded without an error")
				}
				r, _, _ = Decompress(context.Background(), bytes.NewReader(packed))
				io.ReadFull(r, make([]byte, 10))
				r.Close()
				// 3 MiB of output cannot fit the pipe: the tool was still
				// writing, so Close must have killed it.
				if tr, ok := r.(*toolReader); ok && (tr.cmd.ProcessState == nil || tr.cmd.ProcessState.Exited()) {
					t.Errorf("Close did not stop the tool: %v", tr.cmd.ProcessState)
				}
			})
		}
	}
}
