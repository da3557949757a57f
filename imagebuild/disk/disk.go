// Package disk reads a disk image's partition table, tells which
// filesystem each partition holds, and reads files from squashfs. It is
// the only package that imports go-diskfs.
//
// kiln uses go-diskfs to read GPT, which it does soundly, and never to
// write: it does not write btrfs at all, and writing into an existing
// ext4 or FAT filesystem made by the standard tools leaves errors that
// e2fsck and fsck.vfat report (DESIGN.md section 5). Filesystems are
// changed with the tools made for them (see imagebuild/bake).
package disk

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strings"

	diskfs "github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/backend/file"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/filesystem/fat16"
	"github.com/diskfs/go-diskfs/filesystem/fat32"
	"github.com/diskfs/go-diskfs/filesystem/squashfs"
	"github.com/diskfs/go-diskfs/partition/gpt"
)

// Partition is one GPT entry.
type Partition struct {
	Index int    `json:"index"`
	Name  string `json:"name"`
	Type  string `json:"type"`
	GUID  string `json:"guid"`
	// Start and Size are in bytes.
	Start int64 `json:"start"`
	Size  int64 `json:"size"`
}

// Layout is a disk's GPT: its GUID and partitions.
type Layout struct {
	GUID       string      `json:"guid"`
	SectorSize int         `json:"sectorSize"`
	Partitions []Partition `json:"partitions"`
}

// NotAnImage restates a Read error of a file that is no disk image at
// all, with what to give instead.
func NotAnImage(err error) error {
	return fmt.Errorf("not a disk image kiln can bake (%v): give the vendor's image file, raw or compressed with bzip2, xz or zstd", err)
}

// Read reads the GPT of the image at path.
func Read(path string) (*Layout, error) {
	d, err := diskfs.Open(path, diskfs.WithOpenMode(diskfs.ReadOnly))
	if err != nil {
		return nil, fmt.Errorf("open disk image %s: %w", path, err)
	}
	defer d.Close()
	t, err := d.GetPartitionTable()
	if err != nil {
		return nil, fmt.Errorf("read partition table of %s: %w", path, err)
	}
	g, ok := t.(*gpt.Table)
	if !ok {
		return nil, fmt.Errorf("%s has a %s partition table, not GPT: is it the vendor's disk image?", path, t.Type())
	}
	if g.RecoveredFromBackup {
		return nil, fmt.Errorf("%s: the primary GPT is damaged (only the backup is valid): the base image is corrupt", path)
	}
	l := &Layout{GUID: strings.ToUpper(g.GUID), SectorSize: g.LogicalSectorSize}
	for _, p := range g.Partitions {
		if p == nil || p.Type == gpt.Unused {
			continue
		}
		l.Partitions = append(l.Partitions, Partition{
			Index: p.Index,
			Name:  p.Name,
			Type:  strings.ToUpper(string(p.Type)),
			GUID:  strings.ToUpper(p.GUID),
			Start: int64(p.Start) * int64(g.LogicalSectorSize),
			Size:  int64(p.End-p.Start+1) * int64(g.LogicalSectorSize),
		})
	}
	return l, nil
}

// ByName returns the partition with the given GPT name.
func (l *Layout) ByName(name string) (Partition, error) {
	var names []string
	for _, p := range l.Partitions {
		if p.Name == name {
			return p, nil
		}
		names = append(names, p.Name)
	}
	return Partition{}, fmt.Errorf("no partition named %s (the image has %s)", name, strings.Join(names, ", "))
}

// Same reports how other differs from l: disk GUID, and each partition's
// GUID, type, name and extent. Nil means identical.
func (l *Layout) Same(other *Layout) error {
	var errs []error
	if l.GUID != other.GUID {
		errs = append(errs, fmt.Errorf("disk GUID changed: %s -> %s", l.GUID, other.GUID))
	}
	if len(l.Partitions) != len(other.Partitions) {
		errs = append(errs, fmt.Errorf("partition count changed: %d -> %d", len(l.Partitions), len(other.Partitions)))
	} else {
		for i, p := range l.Partitions {
			if q := other.Partitions[i]; p != q {
				errs = append(errs, fmt.Errorf("partition %d changed: %+v -> %+v", p.Index, p, q))
			}
		}
	}
	return errors.Join(errs...)
}

// removableBootLoaders are the UEFI specification's default boot loader
// names (section 3.5.1.1, "removable media"): firmware of each machine type
// starts \EFI\BOOT\BOOT<type>.EFI, so a bootable image carries the one of
// the architecture it is built for.
var removableBootLoaders = map[string]string{"BOOTX64.EFI": "amd64", "BOOTAA64.EFI": "arm64"}

// BootArch says which architecture the disk image f (with layout l) boots
// on: the kiln arch (amd64, arm64) of the default boot loader on its EFI
// system partition (FAT16 or FAT32), and that file's path. It returns ""
// when there is no EFI system partition or no such loader on it; an
// error when the partition cannot be read.
func BootArch(f *os.File, l *Layout) (arch, loader string, err error) {
	for _, p := range l.Partitions {
		if p.Type != strings.ToUpper(string(gpt.EFISystemPartition)) {
			continue
		}
		b := file.New(f, true)
		var fsys filesystem.FileSystem
		if fs32, err := fat32.Read(b, p.Size, p.Start, 512); err == nil {
			fsys = fs32
		} else if fs16, err16 := fat16.Read(b, p.Size, p.Start, 512); err16 == nil {
			fsys = fs16
		} else {
			return "", "", fmt.Errorf("read the EFI system partition %s: %v", p.Name, errors.Join(err, err16))
		}
		// Paths as io/fs has them: ".", then "EFI/BOOT". FAT names are
		// case-insensitive: find EFI/BOOT in any case.
		dirs, err := fsys.ReadDir(".")
		if err != nil {
			return "", "", fmt.Errorf("read the EFI system partition %s: %w", p.Name, err)
		}
		var path []string
		for _, want := range []string{"EFI", "BOOT"} {
			i := slices.IndexFunc(dirs, func(d fs.DirEntry) bool { return d.IsDir() && strings.EqualFold(d.Name(), want) })
			if i < 0 {
				return "", "", nil
			}
			path = append(path, dirs[i].Name())
			if dirs, err = fsys.ReadDir(strings.Join(path, "/")); err != nil {
				return "", "", fmt.Errorf("read the EFI system partition %s: %w", p.Name, err)
			}
		}
		for _, d := range dirs {
			if a, ok := removableBootLoaders[strings.ToUpper(d.Name())]; ok && !d.IsDir() {
				return a, "/" + strings.Join(append(path, d.Name()), "/"), nil
			}
		}
		return "", "", nil
	}
	return "", "", nil
}

// Filesystem kinds Sniff recognises.
const (
	FSUnknown = "unknown"
	FSBtrfs   = "btrfs"
	FSExt4    = "ext4"
	FSFAT     = "vfat"
)

// FS is what a partition's superblock says.
type FS struct {
	Kind  string
	Label string
	// UUID is the filesystem UUID (btrfs and ext4), lower case.
	UUID string
}

// Sniff reads the superblock at the start of r (a partition) and returns
// its filesystem kind, label and UUID.
func Sniff(r io.ReaderAt) (FS, error) {
	buf := make([]byte, 0x10000+0x1000)
	n, err := r.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return FS{}, fmt.Errorf("read superblock: %w", err)
	}
	buf = buf[:n]
	cstr := func(b []byte) string { return string(bytes.TrimRight(b, "\x00 ")) }
	uuid := func(b []byte) string {
		h := hex.EncodeToString(b[:16])
		return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
	}
	const btrfsSB, extSB = 0x10000, 1024
	switch {
	case len(buf) >= btrfsSB+0x12b+256 && string(buf[btrfsSB+0x40:btrfsSB+0x48]) == "_BHRfS_M":
		return FS{FSBtrfs, cstr(buf[btrfsSB+0x12b : btrfsSB+0x12b+256]), uuid(buf[btrfsSB+0x20:])}, nil
	case len(buf) >= extSB+0x88 && binary.LittleEndian.Uint16(buf[extSB+0x38:]) == 0xEF53:
		return FS{FSExt4, cstr(buf[extSB+0x78 : extSB+0x88]), uuid(buf[extSB+0x68:])}, nil
	case len(buf) >= 512 && buf[510] == 0x55 && buf[511] == 0xAA && string(buf[0x52:0x57]) == "FAT32":
		return FS{Kind: FSFAT, Label: cstr(buf[0x47:0x52])}, nil
	case len(buf) >= 512 && buf[510] == 0x55 && buf[511] == 0xAA && string(buf[0x36:0x39]) == "FAT":
		return FS{Kind: FSFAT, Label: cstr(buf[0x2b:0x36])}, nil
	}
	return FS{Kind: FSUnknown}, nil
}

// SquashfsFile reads the file at name (a slash-separated path without a
// leading slash) from the squashfs filesystem that is all of f.
func SquashfsFile(f *os.File, name string) ([]byte, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	sq, err := squashfs.Read(file.New(f, true), fi.Size(), 0, 0)
	if err != nil {
		return nil, fmt.Errorf("read squashfs %s: %w", f.Name(), err)
	}
	r, err := sq.Open(name)
	if err != nil {
		return nil, fmt.Errorf("squashfs %s: %s: %w", f.Name(), name, err)
	}
	defer r.Close()
	return io.ReadAll(r)
}
