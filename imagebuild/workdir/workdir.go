// Package workdir makes the hidden work folders and files that long
// operations build their outputs in, and removes those a killed run left
// behind.
//
// Each holds an advisory lock (flock(2)) for as long as its process
// lives. The kernel drops the lock when the process ends, however it ends
// (SIGKILL, power loss of a container), so a free lock marks an orphan:
// Sweep removes it and says so.
package workdir

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// lockName is the lock file inside a work folder.
const lockName = ".lock"

// Dir is a work folder held by this process.
type Dir struct {
	Path string
	lock *os.File
}

// Make creates a work folder in parent, named as os.MkdirTemp names it
// from pattern, and locks it. The lock file is locked under another name
// and then renamed into place, so a Sweep running at the same time (in
// this process or another) never finds it there unlocked.
func Make(parent, pattern string) (*Dir, error) {
	dir, err := os.MkdirTemp(parent, pattern)
	if err != nil {
		return nil, err
	}
	lock, err := os.CreateTemp(dir, lockName+"-*")
	if err == nil {
		if err = unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err == nil {
			err = os.Rename(lock.Name(), filepath.Join(dir, lockName))
		}
		if err != nil {
			lock.Close()
		}
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("lock work folder %s: %w", dir, err)
	}
	return &Dir{Path: dir, lock: lock}, nil
}

// Remove deletes the folder and drops its lock.
func (d *Dir) Remove() error {
	err := os.RemoveAll(d.Path)
	d.lock.Close()
	return err
}

// Release drops the lock and its file, leaving the folder: for a work
// folder that becomes the output itself (renamed into place next).
func (d *Dir) Release() error {
	err := os.Remove(filepath.Join(d.Path, lockName))
	d.lock.Close()
	return err
}

// File creates a work file in dir, named as os.CreateTemp names it from
// pattern, and locks it; closing it drops the lock.
func File(dir, pattern string) (*os.File, error) {
	f, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return f, nil
}

// Sweep removes the entries of parent matching pattern (filepath.Match,
// as "*" for os.MkdirTemp's random part) that were made by Make or File
// and that no live process holds, and reports each on w with its size. A
// folder without a lock file is never touched. A missing parent is no
// error.
func Sweep(parent, pattern string, w io.Writer) error {
	matches, err := filepath.Glob(filepath.Join(parent, pattern))
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range matches {
		fi, err := os.Lstat(p)
		if err != nil || !orphan(p, fi) {
			continue
		}
		size := usage(p)
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
			continue
		}
		fmt.Fprintf(w, "removed %s (%d MiB), left by a kiln run that was killed\n", p, size>>20)
	}
	return errors.Join(errs...)
}

// orphan reports whether no live process holds p.
func orphan(p string, fi fs.FileInfo) bool {
	lockPath := p
	switch {
	case fi.IsDir():
		lockPath = filepath.Join(p, lockName)
	case !fi.Mode().IsRegular():
		return false
	}
	// A folder without its lock file is not one of ours, or no longer
	// a work folder (Release: it is becoming an output).
	f, err := os.OpenFile(lockPath, os.O_RDWR, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return false // held: its run is alive
	}
	return true
}

// usage is the space p's files take on disk, in bytes.
func usage(p string) int64 {
	var n int64
	filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				if st, ok := fi.Sys().(*syscall.Stat_t); ok {
					n += st.Blocks * 512
				}
			}
		}
		return nil
	})
	return n
}
