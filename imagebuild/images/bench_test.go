package images

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// BenchmarkColdPull times kiln's pull of 8 two-arch images (amd64 only, 2
// layers of 8 MiB each) from a local registry into an empty cache, against
// go-containerregistry's own remote -> OCI layout copy of the same images
// (what `crane pull --format oci` does), in the same run. It reports both
// and their ratio: the cost of kiln's own hashing and atomic writes.
//
//	go test -run '^$' -bench ColdPull -benchtime 3x ./imagebuild/images/
func BenchmarkColdPull(b *testing.B) {
	ctx := context.Background()
	reg := newTestRegistry(b)
	var entries []Entry
	for i := range 8 {
		ref, digest := reg.pushIndex(b, "bench/image"+string(rune('a'+i)), 2, 8<<20)
		entries = append(entries, entry(ref, digest))
	}
	var kiln, ggcr time.Duration
	var bytes int64
	for b.Loop() {
		st := &Store{Dir: b.TempDir()}
		start := time.Now()
		res, err := st.Pull(ctx, entries, []string{"amd64"}, newRegistry(b), io.Discard)
		if err != nil {
			b.Fatal(err)
		}
		kiln += time.Since(start)
		bytes = 0
		for _, r := range res {
			bytes += r.Bytes
		}

		start = time.Now()
		p, err := layout.Write(b.TempDir(), empty.Index)
		if err != nil {
			b.Fatal(err)
		}
		for _, e := range entries {
			ref, _ := name.NewDigest(e.Reference[:len(e.Reference)-len(":v1")] + "@" + e.Digest)
			img, err := remote.Image(ref, remote.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"}))
			if err != nil {
				b.Fatal(err)
			}
			if err := p.AppendImage(img); err != nil {
				b.Fatal(err)
			}
		}
		ggcr += time.Since(start)
	}
	n := float64(b.N)
	b.ReportMetric(kiln.Seconds()/n, "kiln-s/pull")
	b.ReportMetric(ggcr.Seconds()/n, "ggcr-s/pull")
	b.ReportMetric(kiln.Seconds()/ggcr.Seconds(), "kiln/ggcr")
	b.ReportMetric(float64(bytes)/(1<<20)/(kiln.Seconds()/n), "kiln-MiB/s")
}
