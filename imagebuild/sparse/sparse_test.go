package sparse

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

func create(t *testing.T, name string) *os.File {
	f, err := os.Create(filepath.Join(t.TempDir(), name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func read(t *testing.T, f *os.File) []byte {
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// image is 1 MiB of zeros, 8 KiB of data, 1 MiB of zeros, 100 bytes.
func image() []byte {
	b := make([]byte, 2<<20+8192+100)
	for i := 1 << 20; i < 1<<20+8192; i++ {
		b[i] = byte(i)
	}
	copy(b[len(b)-100:], bytes.Repeat([]byte{7}, 100))
	return b
}

func TestWriterLeavesHoles(t *testing.T) {
	src := image()
	f := create(t, "w")
	w := NewWriter(f)
	for off := 0; off < len(src); off += 3000 { // writes that straddle blocks
		w.Write(src[off:min(off+3000, len(src))])
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(t, f), src) {
		t.Fatal("content differs")
	}
	exts, err := Extents(f)
	if err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, e := range exts {
		data += e.Len
	}
	if data >= 1<<20 {
		t.Errorf("%d data bytes mapped for 8 KiB of data: holes were filled (%v)", data, exts)
	}
}

func TestCloneAndRegions(t *testing.T) {
	src := image()
	a := create(t, "a")
	w := NewWriter(a)
	w.Write(src)
	w.Close()
	b := create(t, "b")
	if _, err := Clone(context.Background(), b, a); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(t, b), src) {
		t.Fatal("clone differs")
	}
	region := create(t, "region")
	if err := ExtractRegion(region, b, 1<<20, 8192); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(t, region), src[1<<20:1<<20+8192]) {
		t.Fatal("extracted region differs")
	}
	repl := create(t, "repl")
	repl.Write(bytes.Repeat([]byte{9}, 4096))
	repl.Truncate(8192)
	if err := ReplaceRegion(b, 1<<20, 8192, repl); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(src)
	copy(want[1<<20:], append(bytes.Repeat([]byte{9}, 4096), make([]byte, 4096)...))
	if !bytes.Equal(read(t, b), want) {
		t.Fatal("replaced region differs")
	}
	if err := ReplaceRegion(b, 0, 100, repl); err == nil {
		t.Error("size mismatch accepted")
	}
}
