package bake

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/ulikunitz/xz"
)

func TestBmapChecksum(t *testing.T) {
	doc := bmapDoc(10000, 4096, "        <Range chksum=\"ab\"> 0 </Range>\n")
	m := regexp.MustCompile(`<BmapFileChecksum> ([0-9a-f]{64}) </BmapFileChecksum>`).FindSubmatch(doc)
	if m == nil {
		t.Fatalf("no checksum:\n%s", doc)
	}
	zeroed := bytes.Replace(doc, m[1], []byte(strings.Repeat("0", 64)), 1)
	sum := sha256.Sum256(zeroed)
	if hex.EncodeToString(sum[:]) != string(m[1]) {
		t.Error("BmapFileChecksum is not the sha256 of the zeroed document")
	}
	for _, want := range []string{"<ImageSize> 10000 </ImageSize>", "<BlocksCount> 3 </BlocksCount>", "<MappedBlocksCount> 1 </MappedBlocksCount>"} {
		if !bytes.Contains(doc, []byte(want)) {
			t.Errorf("bmap lacks %s", want)
		}
	}
}

func TestParallelXZRoundTrip(t *testing.T) {
	data := append(make([]byte, 3*xzChunk+5), []byte("tail of the image")...)
	copy(data[xzChunk:], bytes.Repeat([]byte("data"), 1000))
	var out bytes.Buffer
	w := newParallelXZ(context.Background(), &out, 2)
	for off := 0; off < len(data); off += 1 << 20 {
		w.Write(data[off:min(off+1<<20, len(data))])
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := xz.NewReader(&out)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("round trip: %v (%d of %d bytes)", err, len(got), len(data))
	}
}

func TestSummarizeMapsDataOnly(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img")
	f, _ := os.Create(p)
	defer f.Close()
	f.WriteAt(bytes.Repeat([]byte{1}, 5000), 1<<20)
	f.Truncate(4 << 20)
	s, err := summarize(context.Background(), f, "zst", p+".zst", io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	whole, _ := os.ReadFile(p)
	if sum := sha256.Sum256(whole); hex.EncodeToString(sum[:]) != s.sha256 {
		t.Error("sha256 differs from the file's")
	}
	if s.mapped != 8192 || !bytes.Contains(s.bmap, []byte("> 256-257 <")) {
		t.Errorf("mapped %d bytes, bmap:\n%s", s.mapped, s.bmap)
	}
}
