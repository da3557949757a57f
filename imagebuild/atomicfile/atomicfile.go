// Package atomicfile writes files so that a reader never sees a half-written
// one: data goes to a temporary file in the same folder, is synced, and is
// renamed over the target.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// Write stores data at path with perm. Unless replace is set, an existing
// file is an error naming the flag that allows replacing it.
func Write(path string, data []byte, perm os.FileMode, replace bool) error {
	if !replace {
		if _, err := os.Lstat(path); err == nil {
			return fault.Wrap(fault.Input, fmt.Errorf("%s already exists: pass --force to replace it", path))
		}
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
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if _, err := f.Write(data); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write %s: %w", path, err))
	}
	if err := f.Sync(); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write %s: %w", path, err))
	}
	if err := f.Close(); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write %s: %w", path, err))
	}
	if err := os.Rename(tmp, path); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write %s: %w", path, err))
	}
	ok = true
	return nil
}
