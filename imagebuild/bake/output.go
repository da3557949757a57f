package bake

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/kilnproject/kiln/imagebuild/cancel"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/progress"
	"github.com/kilnproject/kiln/imagebuild/sparse"
)

// Compression formats for --compress.
var Compressions = []string{"zst", "xz"}

// summary is what one pass over the finished image gives.
type summary struct {
	sha256      string
	bmap        []byte
	mapped      int64 // bytes in mapped blocks
	compressed  string
	compressSum string
}

// bmapBlock is the bmap's block size.
const bmapBlock = 4096

// summarize reads the finished image once: its sha256, a bmap (format
// 2.0, sha256 per range) of its data blocks, and, if compress is set, a
// compressed copy written to compressedPath.
func summarize(ctx context.Context, img *os.File, compress, compressedPath string, prog io.Writer) (*summary, error) {
	fi, err := img.Stat()
	if err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	size := fi.Size()
	exts, err := sparse.Extents(img)
	if err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	// Whole blocks, merged.
	var ranges []sparse.Extent
	for _, e := range exts {
		from := e.Off / bmapBlock * bmapBlock
		to := min((e.Off+e.Len+bmapBlock-1)/bmapBlock*bmapBlock, size)
		if n := len(ranges); n > 0 && ranges[n-1].Off+ranges[n-1].Len >= from {
			ranges[n-1].Len = max(ranges[n-1].Off+ranges[n-1].Len, to) - ranges[n-1].Off
			continue
		}
		ranges = append(ranges, sparse.Extent{Off: from, Len: to - from})
	}

	whole := sha256.New()
	sinks := []io.Writer{whole}
	var cw io.WriteCloser
	var cfile *os.File
	csum := sha256.New()
	if compress != "" {
		if cfile, err = os.OpenFile(compressedPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600); err != nil {
			return nil, fault.Wrap(fault.IO, err)
		}
		defer cfile.Close()
		if cw, err = compressor(ctx, compress, io.MultiWriter(cfile, csum)); err != nil {
			return nil, err
		}
		sinks = append(sinks, cw)
	}
	label := "hash"
	if compress != "" {
		label = "hash and compress (" + compress + ")"
	}
	meter := progress.New(prog, label, size)
	sinks = append(sinks, meter)
	out := io.MultiWriter(sinks...)

	var body strings.Builder
	var mapped int64
	zeros := make([]byte, 1<<20)
	pos := int64(0)
	writeZeros := func(n int64) error {
		for n > 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
			k := min(n, int64(len(zeros)))
			if _, err := out.Write(zeros[:k]); err != nil {
				return err
			}
			n -= k
		}
		return nil
	}
	for _, r := range ranges {
		if err := writeZeros(r.Off - pos); err != nil {
			return nil, ioOrStop(ctx, err)
		}
		rh := sha256.New()
		if _, err := io.Copy(io.MultiWriter(out, rh), cancel.Reader(ctx, io.NewSectionReader(img, r.Off, r.Len))); err != nil {
			return nil, ioOrStop(ctx, fmt.Errorf("read image: %w", err))
		}
		first, last := r.Off/bmapBlock, (r.Off+r.Len-1)/bmapBlock
		span := fmt.Sprintf("%d-%d", first, last)
		if first == last {
			span = fmt.Sprint(first)
		}
		fmt.Fprintf(&body, "        <Range chksum=\"%x\"> %s </Range>\n", rh.Sum(nil), span)
		mapped += r.Len
		pos = r.Off + r.Len
	}
	if err := writeZeros(size - pos); err != nil {
		return nil, ioOrStop(ctx, err)
	}
	meter.Done()
	s := &summary{sha256: hex.EncodeToString(whole.Sum(nil)), mapped: mapped}
	if cw != nil {
		if err := cw.Close(); err != nil {
			return nil, ioOrStop(ctx, fmt.Errorf("compress: %w", err))
		}
		if err := cfile.Sync(); err != nil {
			return nil, fault.Wrap(fault.IO, err)
		}
		s.compressed, s.compressSum = compressedPath, hex.EncodeToString(csum.Sum(nil))
	}
	s.bmap = bmapDoc(size, mapped, body.String())
	return s, nil
}

// ioOrStop marks err as an I/O fault, unless ctx ended (the user stopped
// kiln: the error is then context.Canceled's, as the exit code wants).
func ioOrStop(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fault.Wrap(fault.IO, err)
}

// bmapDoc renders a bmap file (format 2.0, as bmaptool reads it). Its
// BmapFileChecksum is the sha256 of the document with that field's value
// set to 64 zeros.
func bmapDoc(size, mapped int64, ranges string) []byte {
	blocks := (size + bmapBlock - 1) / bmapBlock
	doc := fmt.Sprintf(`<?xml version="1.0" ?>
<!-- Block map written by kiln build-image: flash with
     bmaptool copy IMAGE DEVICE (bmaptool finds this file beside IMAGE) -->
<bmap version="2.0">
    <ImageSize> %d </ImageSize>
    <BlockSize> %d </BlockSize>
    <BlocksCount> %d </BlocksCount>
    <MappedBlocksCount> %d </MappedBlocksCount>
    <ChecksumType> sha256 </ChecksumType>
    <BmapFileChecksum> %s </BmapFileChecksum>
    <BlockMap>
%s    </BlockMap>
</bmap>
`, size, bmapBlock, blocks, (mapped+bmapBlock-1)/bmapBlock, strings.Repeat("0", 64), ranges)
	sum := sha256.Sum256([]byte(doc))
	return bytes.Replace([]byte(doc), []byte(strings.Repeat("0", 64)), []byte(hex.EncodeToString(sum[:])), 1)
}

// compressor returns a multi-threaded compressing writer; xz's stops
// waiting for its workers when ctx is done.
func compressor(ctx context.Context, format string, w io.Writer) (io.WriteCloser, error) {
	switch format {
	case "zst":
		return zstd.NewWriter(w, zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)), zstd.WithEncoderLevel(zstd.SpeedDefault))
	case "xz":
		return newParallelXZ(ctx, w, runtime.GOMAXPROCS(0)), nil
	default:
		return nil, fault.Wrap(fault.Input, fmt.Errorf("--compress %q: use zst or xz", format))
	}
}

// parallelXZ compresses fixed-size chunks as independent xz streams on
// several cores and writes them in order. Concatenated streams are one
// valid .xz file (xz -d and bmaptool read it).
type parallelXZ struct {
	// ctx ends the waits for workers: a 16 MiB chunk takes seconds.
	ctx     context.Context
	w       io.Writer
	buf     []byte
	pending []chan result
	sem     chan struct{}
	// zero is the compressed form of an all-zero chunk: disk images are
	// mostly holes, and compressing each of them again is slow.
	zero []byte
}

type result struct {
	data []byte
	err  error
}

const xzChunk = 16 << 20

func newParallelXZ(ctx context.Context, w io.Writer, workers int) *parallelXZ {
	return &parallelXZ{ctx: ctx, w: w, sem: make(chan struct{}, max(workers, 1))}
}

func (p *parallelXZ) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		k := min(xzChunk-len(p.buf), len(b))
		p.buf = append(p.buf, b[:k]...)
		b = b[k:]
		if len(p.buf) == xzChunk {
			if err := p.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

// flush starts compressing the buffered chunk and writes out finished
// chunks while too many are in flight.
func (p *parallelXZ) flush() error {
	chunk := p.buf
	p.buf = make([]byte, 0, xzChunk)
	ch := make(chan result, 1)
	p.pending = append(p.pending, ch)
	if len(chunk) == xzChunk && len(bytes.Trim(chunk, "\x00")) == 0 {
		if p.zero == nil {
			z, err := xzChunkOf(chunk)
			if err != nil {
				return err
			}
			p.zero = z
		}
		ch <- result{p.zero, nil}
		return nil
	}
	select {
	case p.sem <- struct{}{}:
	case <-p.ctx.Done():
		return p.ctx.Err()
	}
	go func() {
		defer func() { <-p.sem }()
		data, err := xzChunkOf(chunk)
		ch <- result{data, err}
	}()
	for len(p.pending) > cap(p.sem) {
		if err := p.drainOne(); err != nil {
			return err
		}
	}
	return nil
}

func (p *parallelXZ) drainOne() error {
	var r result
	select {
	case r = <-p.pending[0]:
	case <-p.ctx.Done():
		return p.ctx.Err()
	}
	p.pending = p.pending[1:]
	if r.err != nil {
		return r.err
	}
	_, err := p.w.Write(r.data)
	return err
}

// xzChunkOf compresses one chunk as a complete xz stream.
func xzChunkOf(chunk []byte) ([]byte, error) {
	var out bytes.Buffer
	zw, err := xz.NewWriter(&out)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(chunk); err != nil {
		return nil, err
	}
	err = zw.Close()
	return out.Bytes(), err
}

func (p *parallelXZ) Close() error {
	if len(p.buf) > 0 {
		if err := p.flush(); err != nil {
			return err
		}
	}
	for len(p.pending) > 0 {
		if err := p.drainOne(); err != nil {
			return err
		}
	}
	return nil
}
