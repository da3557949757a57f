// Package sparse copies and writes disk images without filling their
// holes: a vendor image of 8 GiB holds well under 1 GiB of data, and
// kiln keeps it that way in its cache and its outputs.
package sparse

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Extent is a range of a file that holds data.
type Extent struct{ Off, Len int64 }

// Extents lists f's data ranges, in order, using SEEK_DATA/SEEK_HOLE.
// On a filesystem without hole support the whole file is one extent.
func Extents(f *os.File) ([]Extent, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := fi.Size()
	var out []Extent
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return []Extent{{0, size}}, nil
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("find holes: %w", err)
		}
		out = append(out, Extent{data, hole - data})
		off = hole
	}
	return out, nil
}

// Clone makes dst a copy of src: a reflink when the filesystem can share
// blocks (instant), otherwise a copy of src's data extents only, in
// chunks of 64 MiB between which it stops if ctx is done. It reports
// which it did.
func Clone(ctx context.Context, dst *os.File, src *os.File) (reflinked bool, err error) {
	if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err == nil {
		return true, nil
	}
	fi, err := src.Stat()
	if err != nil {
		return false, err
	}
	if err := dst.Truncate(0); err != nil {
		return false, err
	}
	exts, err := Extents(src)
	if err != nil {
		return false, err
	}
	const chunk = 64 << 20
	for _, e := range exts {
		for off := e.Off; off < e.Off+e.Len; off += chunk {
			if err := ctx.Err(); err != nil {
				return false, err
			}
			if err := copyRange(dst, off, src, off, min(chunk, e.Off+e.Len-off)); err != nil {
				return false, err
			}
		}
	}
	return false, dst.Truncate(fi.Size())
}

// copyRange copies n bytes of src at soff to dst at doff, in the kernel
// (copy_file_range) where it can.
func copyRange(dst *os.File, doff int64, src *os.File, soff, n int64) error {
	w := io.NewOffsetWriter(dst, doff)
	r := io.NewSectionReader(src, soff, n)
	if _, err := io.Copy(w, r); err != nil {
		return fmt.Errorf("copy %d bytes at %d: %w", n, soff, err)
	}
	return nil
}

// ReplaceRegion makes dst's bytes [off, off+size) equal to src (whose
// size must be size): the region is first turned into a hole (or zeroed
// where punching holes is not supported), then src's data extents are
// written into it.
func ReplaceRegion(dst *os.File, off, size int64, src *os.File) error {
	fi, err := src.Stat()
	if err != nil {
		return err
	}
	if fi.Size() != size {
		return fmt.Errorf("replacement is %d bytes, region is %d", fi.Size(), size)
	}
	if err := unix.Fallocate(int(dst.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, size); err != nil {
		if err := zero(dst, off, size); err != nil {
			return err
		}
	}
	exts, err := Extents(src)
	if err != nil {
		return err
	}
	for _, e := range exts {
		if err := copyRange(dst, off+e.Off, src, e.Off, e.Len); err != nil {
			return err
		}
	}
	return nil
}

func zero(f *os.File, off, size int64) error {
	buf := make([]byte, 1<<20)
	for size > 0 {
		n := min(size, int64(len(buf)))
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return err
		}
		off += n
		size -= n
	}
	return nil
}

// BlockSize is the granularity at which Writer leaves holes.
const BlockSize = 4096

// Writer writes a stream to a file, seeking over every all-zero block
// instead of writing it, so the file stays sparse. Close sets the final
// size (a trailing hole has no block to write).
type Writer struct {
	f   *os.File
	off int64
	buf []byte // a partial block carried between writes
}

// NewWriter writes to f from offset 0.
func NewWriter(f *os.File) *Writer { return &Writer{f: f} }

func (w *Writer) Write(p []byte) (int, error) {
	n := len(p)
	if len(w.buf) > 0 {
		k := min(BlockSize-len(w.buf), len(p))
		w.buf = append(w.buf, p[:k]...)
		p = p[k:]
		if len(w.buf) < BlockSize {
			return n, nil
		}
		if err := w.block(w.buf); err != nil {
			return 0, err
		}
		w.buf = w.buf[:0]
	}
	for len(p) >= BlockSize {
		if err := w.block(p[:BlockSize]); err != nil {
			return 0, err
		}
		p = p[BlockSize:]
	}
	w.buf = append(w.buf, p...)
	return n, nil
}

func (w *Writer) block(b []byte) error {
	if !allZero(b) {
		if _, err := w.f.WriteAt(b, w.off); err != nil {
			return err
		}
	}
	w.off += int64(len(b))
	return nil
}

// Close writes the last partial block and sets the file's size. It does
// not close the file.
func (w *Writer) Close() error {
	if len(w.buf) > 0 {
		if err := w.block(w.buf); err != nil {
			return err
		}
		w.buf = nil
	}
	return w.f.Truncate(w.off)
}

// Size is how many bytes were written so far.
func (w *Writer) Size() int64 { return w.off + int64(len(w.buf)) }

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// ExtractRegion makes dst (empty) a sparse copy of src's bytes
// [off, off+size): only src's data extents in that range are copied.
func ExtractRegion(dst, src *os.File, off, size int64) error {
	exts, err := Extents(src)
	if err != nil {
		return err
	}
	for _, e := range exts {
		from, to := max(e.Off, off), min(e.Off+e.Len, off+size)
		if from < to {
			if err := copyRange(dst, from-off, src, from, to-from); err != nil {
				return err
			}
		}
	}
	return dst.Truncate(size)
}
