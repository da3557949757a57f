// Package atomicfile writes files so that a reader never sees a half-written
// one: data goes to a temporary file in the same folder, is synced, and is
// renamed over the target.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// Write stores data at path with perm. Unless replace is set, an existing
// file is an error naming the flag that allows replacing it; the check and
// the write are one step (a hard link never replaces a file).
func Write(path string, data []byte, perm os.FileMode, replace bool) error {
	exists := func() error {
		return fault.Wrap(fault.Input, fmt.Errorf("%s already exists: pass --force to replace it", path))
	}
	if _, err := os.Lstat(path); err == nil && !replace {
		return exists()
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write %s: %w", path, err))
	}
	tmp := f.Name()
	defer os.Remove(tmp) // a no-op once the file has been renamed
	if err := writeAndSync(f, data, perm); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write %s: %w", path, err))
	}
	if replace {
		err = os.Rename(tmp, path)
	} else if err = os.Link(tmp, path); errors.Is(err, fs.ErrExist) {
		return exists()
	}
	if err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write %s: %w", path, err))
	}
	return fault.Wrap(fault.IO, syncDir(dir))
}

func writeAndSync(f *os.File, data []byte, perm os.FileMode) error {
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// syncDir makes a rename or link in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// ReplaceDir puts the finished folder tmp in place of dir: dir is moved
// aside, tmp renamed to dir, and only then the old one deleted; if the
// rename fails the old folder comes back. tmp must be beside dir.
func ReplaceDir(tmp, dir string) error {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return fault.Wrap(fault.IO, os.Rename(tmp, dir))
	}
	old := tmp + ".old"
	if err := os.Rename(dir, old); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("replace %s: %w", dir, err))
	}
	if err := os.Rename(tmp, dir); err != nil {
		if rerr := os.Rename(old, dir); rerr != nil {
			return fault.Wrap(fault.IO, fmt.Errorf("replace %s: %w; the previous one is in %s", dir, err, old))
		}
		return fault.Wrap(fault.IO, fmt.Errorf("replace %s: %w", dir, err))
	}
	return fault.Wrap(fault.IO, os.RemoveAll(old))
}
