package bake

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/kilnproject/kiln/imagebuild/disk"
	"github.com/kilnproject/kiln/imagebuild/fault"
)

// space is what a bake needs of its output folder's filesystem and what
// that filesystem had free when the bake started, in bytes.
type space struct {
	dir        string
	need, free int64
}

// estimateSpace sizes a bake before it starts: the copy of the base image
// (its allocated blocks; nothing when it lies on the output's filesystem,
// which may share its blocks by reflink), each partition the bake touches
// twice (extracted, and rebuilt for btrfs), the compressed image (at most
// half the base's blocks, as zstd and xz do on these images) and 16 MiB of
// small files. It is an estimate, not a promise: a bake that runs out
// anyway is reported by noSpace.
func estimateSpace(o Options, l *disk.Layout) (space, error) {
	dir := filepath.Dir(o.Output)
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return space{}, fault.Wrap(fault.IO, err)
	}
	s := space{dir: dir, free: int64(fs.Bavail) * fs.Bsize, need: 16 << 20}
	var base, out syscall.Stat_t
	if err := syscall.Stat(o.Base, &base); err != nil {
		return space{}, fault.Wrap(fault.Input, fmt.Errorf("base image: %w", err))
	}
	if err := syscall.Stat(dir, &out); err == nil && out.Dev != base.Dev {
		s.need += base.Blocks * 512
	}
	if o.Compress != "" {
		s.need += base.Blocks * 512 / 2
	}
	parts := []string{o.Target.Inject.Partition}
	if o.Target.Firmware != nil {
		parts = append(parts, o.Target.Firmware.Partition)
	}
	for _, name := range parts {
		if p, err := l.ByName(name); err == nil {
			s.need += 2 * p.Size
		}
	}
	return s, nil
}

// check refuses a bake that cannot fit.
func (s space) check() error {
	if s.free < s.need {
		return s.full(errors.New("not enough free space to start"))
	}
	return nil
}

// noSpace restates err, if it is the filesystem running full (ENOSPC,
// or a tool saying so), in the bake's terms; otherwise it returns err.
func (s space) noSpace(err error) error {
	if err == nil || !errors.Is(err, syscall.ENOSPC) && !strings.Contains(err.Error(), "No space left on device") {
		return err
	}
	return s.full(err)
}

func (s space) full(cause error) error {
	const mib = 1 << 20
	more := max((s.need-s.free+mib-1)/mib, 1)
	return fault.Wrap(fault.IO, fmt.Errorf("no space left in %s: needs %d MiB more (a bake needs about %d MiB there, %d MiB were free; free some or bake into another --dest): %w",
		s.dir, more, s.need/mib, s.free/mib, cause))
}
