package baseimage

import (
	"bufio"
	"bytes"
	"compress/bzip2"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"runtime"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// Compression formats, by their magic numbers.
var magics = []struct {
	kind  string
	magic []byte
}{
	{"bzip2", []byte("BZh")},
	{"xz", []byte{0xFD, '7', 'z', 'X', 'Z', 0}},
	{"zstd", []byte{0x28, 0xB5, 0x2F, 0xFD}},
}

// Sniff reads the start of r and names its compression: bzip2, xz, zstd,
// or raw (none of them).
func Sniff(r io.Reader) (string, error) {
	head := make([]byte, 6)
	n, err := io.ReadFull(r, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return "", err
	}
	return kindOf(head[:n]), nil
}

func kindOf(head []byte) string {
	for _, m := range magics {
		if bytes.HasPrefix(head, m.magic) {
			return m.kind
		}
	}
	return "raw"
}

// parallelTools are the system decompressors Decompress prefers, on all
// cores: Go's bzip2 and xz decoders are single-threaded (Flatcar ships
// bzip2, Fedora CoreOS xz). lbzip2 decodes any bzip2 stream in parallel;
// xz (5.4 and later) decodes the blocks of a multi-block file in parallel.
var parallelTools = map[string][]string{
	"bzip2": {"lbzip2", "-dc", "-n"},
	"xz":    {"xz", "-dc", "-T"},
}

// Decompress sniffs r's format (bzip2, xz, zstd, or none) and returns a
// reader of the decompressed data and the format's name. bzip2 and xz go
// through the system's parallel decompressor (parallelTools) when it is on
// PATH, else through Go's decoders; zstd through klauspost/compress on
// every core. Close stops the decompression (a tool is killed) and must
// always be called; ctx cancelled kills a tool too.
func Decompress(ctx context.Context, r io.Reader) (io.ReadCloser, string, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	magic, _ := br.Peek(6)
	kind := kindOf(magic)
	if tool, ok := parallelTools[kind]; ok {
		if path, err := exec.LookPath(tool[0]); err == nil {
			tr, err := startTool(ctx, br, path, append(tool[1:], fmt.Sprint(runtime.NumCPU()))...)
			if err != nil {
				return nil, "", err // not a typed nil inside the interface
			}
			return tr, kind, nil
		}
	}
	switch kind {
	case "bzip2":
		return io.NopCloser(bzip2.NewReader(br)), kind, nil
	case "xz":
		xr, err := xz.NewReader(br)
		if err != nil {
			return nil, "", fault.Wrap(fault.Download, fmt.Errorf("read xz: %w", err))
		}
		return io.NopCloser(xr), kind, nil
	case "zstd":
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(runtime.GOMAXPROCS(0)), zstd.WithDecoderMaxWindow(1<<31))
		if err != nil {
			return nil, "", fault.Wrap(fault.Download, fmt.Errorf("read zstd: %w", err))
		}
		return zr.IOReadCloser(), kind, nil
	}
	return io.NopCloser(br), kind, nil
}

// toolReader reads a decompressor's standard output; at its end, the
// tool's exit status (and standard error) is the reader's error.
type toolReader struct {
	cmd     *exec.Cmd
	out     io.ReadCloser
	stderr  bytes.Buffer
	once    sync.Once
	waitErr error
}

func startTool(ctx context.Context, in io.Reader, path string, args ...string) (*toolReader, error) {
	t := &toolReader{cmd: exec.CommandContext(ctx, path, args...)}
	t.cmd.Stdin = in
	t.cmd.Stderr = &t.stderr
	var err error
	if t.out, err = t.cmd.StdoutPipe(); err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	if err := t.cmd.Start(); err != nil {
		return nil, fault.Wrap(fault.IO, fmt.Errorf("start %s: %w", path, err))
	}
	return t, nil
}

func (t *toolReader) Read(p []byte) (int, error) {
	n, err := t.out.Read(p)
	if errors.Is(err, io.EOF) {
		if werr := t.wait(); werr != nil {
			return n, werr
		}
	}
	return n, err
}

// wait reaps the tool once: a non-zero exit is a corrupt stream.
func (t *toolReader) wait() error {
	t.once.Do(func() {
		if err := t.cmd.Wait(); err != nil {
			t.waitErr = fmt.Errorf("%s: %v: %s", t.cmd.Args[0], err, strings.TrimSpace(t.stderr.String()))
		}
	})
	return t.waitErr
}

// Close kills the tool if it still runs and reaps it.
func (t *toolReader) Close() error {
	if t.cmd.ProcessState == nil {
		t.cmd.Process.Kill()
	}
	t.out.Close()
	t.wait()
	return nil
}
