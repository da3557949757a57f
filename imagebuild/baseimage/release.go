package baseimage

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/cavaliergopher/cpio"

	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/disk"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/sparse"
)

// The release a Flatcar disk image holds is VERSION_ID in /usr/lib/os-release,
// on its USR-A partition (lib/os-release there): btrfs, ext2 or ext4.
const (
	usrPartition = "USR-A"
	osRelease    = "lib/os-release"
)

// FlatcarImageVersion reads the release a Flatcar disk image holds from
// its own /usr (VERSION_ID of /usr/lib/os-release on USR-A), with btrfs
// restore or debugfs on a sparse copy of the partition made in work.
// Unlike the version a download's URL names, it is covered by the
// image's signature.
func FlatcarImageVersion(ctx context.Context, raw, work string) (string, error) {
	l, err := disk.Read(raw)
	if err != nil {
		return "", fault.Wrap(fault.Download, err)
	}
	p, err := l.ByName(usrPartition)
	if err != nil {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s: %w: is it a Flatcar disk image?", raw, err))
	}
	f, err := os.Open(raw)
	if err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	defer f.Close()
	section := io.NewSectionReader(f, p.Start, p.Size)
	fsys, err := disk.Sniff(section)
	if err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	dir, err := os.MkdirTemp(work, ".usr-")
	if err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	defer os.RemoveAll(dir)
	part := filepath.Join(dir, "usr.img")
	if err := copySparse(part, section); err != nil {
		return "", err
	}
	tool, pkg := "btrfs", "btrfs-progs"
	if fsys.Kind == disk.FSExt4 {
		tool, pkg = "debugfs", "e2fsprogs"
	}
	if _, err := exec.LookPath(tool); err != nil {
		return "", fault.Wrap(fault.Environment, fmt.Errorf("%s not found: kiln reads the release from the image's /usr with it; install %s", tool, pkg))
	}
	var data []byte
	switch fsys.Kind {
	case disk.FSBtrfs:
		out := filepath.Join(dir, "usr")
		if err = os.Mkdir(out, 0o700); err == nil {
			err = run(ctx, "btrfs", "restore", "--path-regex", "^/(|lib(|/os-release))$", part, out)
		}
		if err == nil {
			data, err = os.ReadFile(filepath.Join(out, osRelease))
		}
	case disk.FSExt4:
		data, err = exec.CommandContext(ctx, "debugfs", "-R", "cat /"+osRelease, part).Output()
	default:
		err = fmt.Errorf("it holds no btrfs or ext filesystem")
	}
	if err != nil {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s: read /usr/%s from %s: %w", raw, osRelease, usrPartition, err))
	}
	v := osReleaseField(data, "VERSION_ID")
	if v == "" {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s: /usr/%s on %s names no VERSION_ID: is it a Flatcar disk image?", raw, osRelease, usrPartition))
	}
	return v, nil
}

// FlatcarCompressedImageVersion reads the release of a compressed Flatcar
// disk image (what flatcar-install downloads) without decompressing all
// of it: the partition table, then the stream up to the end of USR-A, go
// into a sparse file of the disk's size in work, read as
// FlatcarImageVersion does.
func FlatcarCompressedImageVersion(ctx context.Context, p, work string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	defer f.Close()
	r, _, err := Decompress(ctx, f)
	if err != nil {
		return "", err
	}
	defer r.Close()
	head := make([]byte, 1<<20)
	if _, err := io.ReadFull(r, head); err != nil {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s: %w", p, err))
	}
	// The GPT header (LBA 1) names the backup header's LBA, the disk's
	// last sector.
	if string(head[512:520]) != "EFI PART" {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s holds no GPT disk: is it a Flatcar image?", p))
	}
	size := (int64(binary.LittleEndian.Uint64(head[512+32:])) + 1) * 512
	tmp, err := os.CreateTemp(work, ".head-*.raw")
	if err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if _, err := tmp.Write(head); err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	if err := tmp.Truncate(size); err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	l, err := disk.Read(tmp.Name())
	if err != nil {
		return "", fault.Wrap(fault.Download, err)
	}
	usr, err := l.ByName(usrPartition)
	if err != nil || usr.Start < int64(len(head)) {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s: no %s after the partition table (%v): is it a Flatcar image?", p, usrPartition, err))
	}
	if _, err := io.CopyN(io.Discard, r, usr.Start-int64(len(head))); err != nil {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s: %w", p, err))
	}
	// Only data is written: the file stays sparse where USR-A is empty.
	buf, zeros := head, make([]byte, len(head))
	for off := usr.Start; off < usr.Start+usr.Size; {
		n, err := io.ReadFull(r, buf[:min(int64(len(buf)), usr.Start+usr.Size-off)])
		if err != nil {
			return "", fault.Wrap(fault.Download, fmt.Errorf("%s: read %s: %w", p, usrPartition, err))
		}
		if !bytes.Equal(buf[:n], zeros[:n]) {
			if _, err := tmp.WriteAt(buf[:n], off); err != nil {
				return "", fault.Wrap(fault.IO, err)
			}
		}
		off += int64(n)
		if err := ctx.Err(); err != nil {
			return "", err
		}
	}
	return FlatcarImageVersion(ctx, tmp.Name(), work)
}

// copySparse copies r to a new file at p, leaving zero blocks as holes.
func copySparse(p string, r io.Reader) error {
	out, err := os.Create(p)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	defer out.Close()
	w := sparse.NewWriter(out)
	if _, err := io.Copy(w, r); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	return fault.Wrap(fault.IO, w.Close())
}

// osReleaseField is a field of an os-release file (KEY=value, the value
// maybe quoted).
func osReleaseField(data []byte, key string) string {
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), key+"="); ok {
			return strings.Trim(v, `"'`)
		}
	}
	return ""
}

// FlatcarPXEVersion reads the release a Flatcar PXE initramfs holds: the
// gzip-compressed newc cpio carries /usr as usr.squashfs, whose
// lib/os-release names it (VERSION_ID). work holds a copy of the squashfs
// while it is read.
func FlatcarPXEVersion(_ context.Context, initramfs, work string) (string, error) {
	f, err := os.Open(initramfs)
	if err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s: %w: is it a Flatcar PXE initramfs?", initramfs, err))
	}
	cr := cpio.NewReader(zr)
	for {
		h, err := cr.Next()
		if err == io.EOF {
			return "", fault.Wrap(fault.Download, fmt.Errorf("%s holds no %s: is it a Flatcar PXE initramfs?", initramfs, usrSquashfs))
		}
		if err != nil {
			return "", fault.Wrap(fault.Download, fmt.Errorf("%s: read cpio: %w", initramfs, err))
		}
		if strings.TrimLeft(h.Name, "./") != usrSquashfs {
			continue
		}
		tmp, err := os.CreateTemp(work, ".usr-*.squashfs")
		if err != nil {
			return "", fault.Wrap(fault.IO, err)
		}
		defer os.Remove(tmp.Name())
		defer tmp.Close()
		if _, err := io.Copy(tmp, cr); err != nil {
			return "", fault.Wrap(fault.Download, fmt.Errorf("%s: read %s: %w", initramfs, usrSquashfs, err))
		}
		data, err := disk.SquashfsFile(tmp, osRelease)
		if err != nil {
			return "", fault.Wrap(fault.Download, fmt.Errorf("%s: %w", initramfs, err))
		}
		v := osReleaseField(data, "VERSION_ID")
		if v == "" {
			return "", fault.Wrap(fault.Download, fmt.Errorf("%s: /usr/%s in %s names no VERSION_ID", initramfs, osRelease, usrSquashfs))
		}
		return v, nil
	}
}

// usrSquashfs is /usr in a Flatcar PXE initramfs.
const usrSquashfs = "usr.squashfs"

// bindVersion binds a cached Flatcar file to the release it was fetched
// as: the version read from the file itself by read (once, kept beside
// it as FILE.version) must be rel.Version. A mirror that serves an older
// signed release under a newer release's name is refused here.
func (c *Cache) bindVersion(ctx context.Context, p string, rel *Release, read func(ctx context.Context, p, work string) (string, error)) error {
	side := p + ".version"
	have, err := os.ReadFile(side)
	if errors.Is(err, fs.ErrNotExist) {
		v, err := read(ctx, p, filepath.Dir(p))
		if err != nil {
			return err
		}
		have = []byte(v + "\n")
		if err := atomicfile.Write(side, have, 0o644, true); err != nil {
			return fault.Wrap(fault.IO, err)
		}
	} else if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if v := strings.TrimSpace(string(have)); v != rel.Version {
		return fault.Wrap(fault.Download, fmt.Errorf("%s is Flatcar %s inside (its /usr/%s), not %s as its URL says: the server serves another signed release under this release's name; use the release server or a mirror you trust", rel.URL, v, osRelease, rel.Version))
	}
	return nil
}

// run runs a tool, its output in the error.
func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}
