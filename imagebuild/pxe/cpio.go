package pxe

import (
	"compress/gzip"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// CPIO writes a newc ("070701") archive, the format the Linux kernel
// unpacks as an initramfs. Parent directories are added before their
// files; every entry is owned by root.
type CPIO struct {
	w    io.Writer
	ino  int
	off  int64
	dirs map[string]bool
	err  error
}

// NewCPIO starts an archive on w.
func NewCPIO(w io.Writer) *CPIO { return &CPIO{w: w, dirs: map[string]bool{}} }

// Dir adds a directory (and its parents).
func (c *CPIO) Dir(name string, perm fs.FileMode) {
	name = strings.Trim(path.Clean(name), "/")
	if name == "." || c.dirs[name] {
		return
	}
	if parent := path.Dir(name); parent != "." {
		c.Dir(parent, 0o755)
	}
	c.dirs[name] = true
	c.entry(name, 0o040000|uint32(perm.Perm()), nil)
}

// File adds a regular file, with its parent directories (mode 0755).
func (c *CPIO) File(name string, perm fs.FileMode, data []byte) {
	name = strings.Trim(path.Clean(name), "/")
	if parent := path.Dir(name); parent != "." {
		c.Dir(parent, 0o755)
	}
	c.entry(name, 0o100000|uint32(perm.Perm()), data)
}

// Close writes the trailer; it reports the first write error.
func (c *CPIO) Close() error {
	c.entry("TRAILER!!!", 0, nil)
	return c.err
}

func (c *CPIO) entry(name string, mode uint32, data []byte) {
	if c.err != nil {
		return
	}
	c.ino++
	nlink := 1
	if mode&0o040000 != 0 {
		nlink = 2
	}
	// Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize,
	// devmajor, devminor, rdevmajor, rdevminor, namesize, check.
	c.write([]byte(fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\x00",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0, name)))
	c.pad()
	c.write(data)
	c.pad()
}

func (c *CPIO) write(b []byte) {
	if c.err != nil || len(b) == 0 {
		return
	}
	n, err := c.w.Write(b)
	c.off += int64(n)
	c.err = err
}

func (c *CPIO) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

// ConfigInitramfs is a gzip-compressed newc archive holding config at
// name (Flatcar: oem/config.ign; Fedora CoreOS: config.ign), mode 0600:
// appended to the OS's initramfs, it gives the live system its config
// with no config server.
func ConfigInitramfs(w io.Writer, name string, config []byte) error {
	zw, err := gzip.NewWriterLevel(w, gzip.BestCompression)
	if err != nil {
		return err
	}
	c := NewCPIO(zw)
	c.File(name, 0o600, config)
	if err := c.Close(); err != nil {
		return err
	}
	return zw.Close()
}
