package bake

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/kilnproject/kiln/imagebuild/disk"
	"github.com/kilnproject/kiln/imagebuild/fault"
)

// file is one file kiln puts into a filesystem; its parent directories
// must exist or be listed as dirs.
type file struct {
	path string // relative to the filesystem root, "/"-separated
	data []byte
	// src, if set, is a host file whose content is copied instead of data
	// (large files: an air-gapped node's payload).
	src  string
	mode fs.FileMode
	// merge appends data to the file's existing content, if the
	// filesystem has the file (GRUB settings: Fedora CoreOS's
	// ignition.firstboot, Flatcar's OEM grub.cfg); an existing file is
	// left as it is when data is empty.
	merge bool
}

type dir struct {
	path string
	mode fs.FileMode
}

// writeExt4 writes dirs and files into the ext4 filesystem image part
// with debugfs, owned by root, then proves the result: e2fsck -fn is
// clean and every file reads back byte-identical with its mode.
//
// debugfs (e2fsprogs) is used rather than go-diskfs, which corrupts
// existing mke2fs filesystems in common cases (DESIGN.md section 5).
func writeExt4(ctx context.Context, r Runner, part, work string, dirs []dir, files []file) error {
	var script strings.Builder
	own := func(p string, mode fs.FileMode, typ int) {
		fmt.Fprintf(&script, "set_inode_field %s mode 0%o\nset_inode_field %s uid 0\nset_inode_field %s gid 0\n", p, typ|int(mode.Perm()), p, p)
	}
	for _, d := range dirs {
		fmt.Fprintf(&script, "mkdir %s\n", d.path)
		own(d.path, d.mode, 0o40000)
	}
	skip := map[int]bool{}
	for i := range files {
		f := &files[i]
		if !f.merge {
			continue
		}
		if out, _ := r.Run(ctx, debugfs.name, "-R", "stat "+f.path, part); len(bytes.TrimSpace(out)) == 0 {
			continue // no such file
		}
		old, err := r.Run(ctx, debugfs.name, "-R", "cat "+f.path, part)
		if err != nil {
			return fault.Wrap(fault.IO, fmt.Errorf("read %s: %w", f.path, err))
		}
		skip[i] = len(f.data) == 0
		f.data = append(old, f.data...)
	}
	for i, f := range files {
		if skip[i] {
			continue
		}
		host := filepath.Join(work, fmt.Sprintf("ext4-%d", i))
		if err := os.WriteFile(host, f.data, 0o600); err != nil {
			return fault.Wrap(fault.IO, err)
		}
		fmt.Fprintf(&script, "rm %s\nwrite %s %s\n", f.path, host, f.path)
		own(f.path, f.mode, 0o100000)
	}
	cmds := filepath.Join(work, "debugfs.cmds")
	if err := os.WriteFile(cmds, []byte(script.String()), 0o600); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if _, err := r.Run(ctx, debugfs.name, "-w", "-f", cmds, part); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write ext4 filesystem: %w", err))
	}
	if _, err := r.Run(ctx, e2fsck.name, "-fn", part); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("e2fsck finds the written filesystem damaged (please report this): %w", err))
	}
	for _, d := range dirs {
		if err := checkExt4Mode(ctx, r, part, d.path, d.mode); err != nil {
			return err
		}
	}
	for i, f := range files {
		got, err := r.Run(ctx, debugfs.name, "-R", "cat "+f.path, part)
		if err != nil {
			return fault.Wrap(fault.IO, fmt.Errorf("read back %s: %w", f.path, err))
		}
		if skip[i] {
			continue
		}
		if !bytes.Equal(got, f.data) {
			return fault.Wrap(fault.IO, fmt.Errorf("read back %s: content differs from what was written", f.path))
		}
		if err := checkExt4Mode(ctx, r, part, f.path, f.mode); err != nil {
			return err
		}
	}
	return nil
}

var debugfsMode = regexp.MustCompile(`Mode:\s+0?([0-7]+)`)

func checkExt4Mode(ctx context.Context, r Runner, part, p string, mode fs.FileMode) error {
	out, err := r.Run(ctx, debugfs.name, "-R", "stat "+p, part)
	m := debugfsMode.FindSubmatch(out)
	if err != nil || m == nil || string(m[1]) != fmt.Sprintf("%o", mode.Perm()) {
		return fault.Wrap(fault.IO, fmt.Errorf("read back %s: want mode %o, debugfs says %q (%v)", p, mode.Perm(), m, err))
	}
	return nil
}

// rebuildBtrfs makes a new btrfs image at out, the size of part, with
// part's label and UUID, every file part holds, plus files.
//
// go-diskfs cannot write btrfs and no tool adds a file to an unmounted
// btrfs, so kiln reads everything out with `btrfs restore` (metadata,
// symlinks and xattrs kept) and builds the filesystem afresh with
// `mkfs.btrfs --rootdir`. Keeping btrfs (rather than switching OEM to
// ext4, which Flatcar's initrd also mounts) keeps the partition exactly
// the kind Flatcar ships, for its own tools and for GRUB.
func rebuildBtrfs(ctx context.Context, r Runner, part, out, work string, fsys disk.FS, files []file) error {
	tree := filepath.Join(work, "oem")
	if err := os.Mkdir(tree, 0o755); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if _, err := asRootOwner(ctx, r, btrfs.name, "restore", "-m", "-S", "-x", part, tree); err != nil {
		return fault.Wrap(cmp.Or(fault.KindOf(err), fault.Download), fmt.Errorf("read the base image's OEM btrfs: %w", err))
	}
	fi, err := os.Stat(part)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if err := checkFits(tree, files, fi.Size()); err != nil {
		return err
	}
	for i := range files {
		f := &files[i]
		p := filepath.Join(tree, filepath.FromSlash(f.path))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return fault.Wrap(fault.IO, err)
		}
		if f.merge {
			old, err := os.ReadFile(p)
			if err != nil && !os.IsNotExist(err) {
				return fault.Wrap(fault.IO, err)
			}
			f.data = append(old, f.data...)
		}
		if err := f.writeTo(p); err != nil {
			return fault.Wrap(fault.IO, err)
		}
		if err := os.Chmod(p, f.mode); err != nil {
			return fault.Wrap(fault.IO, err)
		}
	}
	nf, err := os.Create(out)
	if err == nil {
		err = nf.Truncate(fi.Size())
		nf.Close()
	}
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if _, err := asRootOwner(ctx, r, mkfsBtrfs.name, "-q", "-f", "-L", fsys.Label, "-U", fsys.UUID, "--rootdir", tree, out); err != nil {
		return fault.Wrap(cmp.Or(fault.KindOf(err), fault.IO), fmt.Errorf("build the OEM btrfs: %w", err))
	}
	if _, err := r.Run(ctx, btrfs.name, "check", "--readonly", out); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("btrfs check finds the new OEM filesystem damaged (please report this): %w", err))
	}
	back := filepath.Join(work, "oem-readback")
	if err := os.Mkdir(back, 0o755); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if _, err := r.Run(ctx, btrfs.name, "restore", out, back); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("read back the OEM btrfs: %w", err))
	}
	for _, f := range files {
		same, err := f.sameAs(filepath.Join(back, filepath.FromSlash(f.path)))
		if err != nil || !same {
			return fault.Wrap(fault.IO, fmt.Errorf("read back %s from the new OEM btrfs: content differs (%v)", f.path, err))
		}
	}
	return nil
}

// writeTo writes the file's content (data, or a copy of src) to p.
func (f file) writeTo(p string) error {
	if f.src == "" {
		return os.WriteFile(p, f.data, f.mode)
	}
	in, err := os.Open(f.src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, f.mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// sameAs reports whether the file at p holds the file's content.
func (f file) sameAs(p string) (bool, error) {
	if f.src == "" {
		got, err := os.ReadFile(p)
		return err == nil && bytes.Equal(got, f.data), err
	}
	a, err := fileSHA256(f.src)
	if err != nil {
		return false, err
	}
	b, err := fileSHA256(p)
	return err == nil && bytes.Equal(a, b), err
}

func fileSHA256(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

// checkFits refuses, before anything is copied, a tree plus files that a
// new btrfs of size bytes cannot hold: their bytes plus a tenth for
// btrfs's metadata and 32 MiB of reserve.
func checkFits(tree string, files []file, size int64) error {
	var used int64
	for _, f := range files {
		if f.src == "" {
			used += int64(len(f.data))
			continue
		}
		fi, err := os.Stat(f.src)
		if err != nil {
			return fault.Wrap(fault.IO, err)
		}
		used += fi.Size()
	}
	err := filepath.WalkDir(tree, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err == nil {
			used += fi.Size()
		}
		return err
	})
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	need := used + used/10 + 32<<20
	if need > size {
		return fault.Wrap(fault.Input, fmt.Errorf("the OEM partition (%d MiB) cannot hold its files and the payload (%d MiB, about %d MiB with btrfs's overhead): Flatcar releases from 4593 on have a 1 GiB OEM partition (os.version), or build without airgap",
			size>>20, used>>20, need>>20))
	}
	return nil
}

// copyFAT copies the tree at src to the root of the FAT filesystem image
// part with mtools, replacing files of the same name, then proves the
// result: fsck.vfat -n is clean and every file reads back identical.
//
// mtools is used rather than go-diskfs, whose writes into an existing
// FAT32 fail fsck.vfat (DESIGN.md section 5).
func copyFAT(ctx context.Context, r Runner, part, src string) error {
	entries, err := os.ReadDir(src)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	args := []string{"-i", part, "-s", "-o", "-Q", "-m"}
	for _, e := range entries {
		args = append(args, filepath.Join(src, e.Name()))
	}
	if _, err := r.Run(ctx, mcopy.name, append(args, "::/")...); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("copy firmware to the FAT partition: %w", err))
	}
	if _, err := r.Run(ctx, fsckVfat.name, "-n", part); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("fsck.vfat finds the FAT partition damaged after copying: %w", err))
	}
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		want, err := os.ReadFile(p)
		if err != nil {
			return fault.Wrap(fault.IO, err)
		}
		got, err := r.Run(ctx, mcopy.name, "-n", "-i", part, "::/"+path.Clean(filepath.ToSlash(rel)), "-")
		if err != nil || !bytes.Equal(got, want) {
			return fault.Wrap(fault.IO, fmt.Errorf("read back %s from the FAT partition: content differs (%v)", rel, err))
		}
		return nil
	})
}
