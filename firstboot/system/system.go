// Package system holds the agent's real side effects: commands, the
// filesystem under a root directory, the clock, network interfaces and the
// status reporter. The agent package owns the interfaces they satisfy and
// keeps fakes beside them.
package system

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"
)

// Exec runs commands found on PATH.
type Exec struct{}

// Run runs one command; cancelling ctx kills it.
func (Exec) Run(ctx context.Context, name string, args ...string) (stdout, stderr []byte, err error) {
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	cmd.WaitDelay = 5 * time.Second
	err = cmd.Run()
	return out.Bytes(), errOut.Bytes(), err
}

// Root is the node's filesystem as seen from a root directory: "/" on a
// node, a temporary directory in tests. Names are absolute node paths.
type Root string

func (r Root) path(name string) string { return filepath.Join(string(r), name) }

// ReadFile reads a file.
func (r Root) ReadFile(name string) ([]byte, error) { return os.ReadFile(r.path(name)) }

// WriteFile overwrites an existing file in place, as /proc/sys files must
// be written; it never creates one.
func (r Root) WriteFile(name string, data []byte) error {
	f, err := os.OpenFile(r.path(name), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Replace writes a file atomically and durably: a power loss leaves the old
// or the new content, never a torn file.
func (r Root) Replace(name string, data []byte, perm fs.FileMode) error {
	p := r.path(name)
	f, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
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
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), p); err != nil {
		return err
	}
	dir, err := os.Open(filepath.Dir(p))
	if err != nil {
		return err
	}
	defer dir.Close()
	return dir.Sync()
}

// MkdirAll creates a directory and its parents.
func (r Root) MkdirAll(name string, perm fs.FileMode) error { return os.MkdirAll(r.path(name), perm) }

// Stat describes a file.
func (r Root) Stat(name string) (fs.FileInfo, error) { return os.Stat(r.path(name)) }

// ReadDir lists a directory.
func (r Root) ReadDir(name string) ([]fs.DirEntry, error) { return os.ReadDir(r.path(name)) }

// DialSocket connects to a unix socket and hangs up.
func (r Root) DialSocket(ctx context.Context, name string) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", r.path(name))
	if err != nil {
		return err
	}
	return conn.Close()
}

// Clock is the system clock.
type Clock struct{}

// Now returns the current time.
func (Clock) Now() time.Time { return time.Now() }

// Sleep waits for d or until ctx ends.
func (Clock) Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// FirstMAC returns the MAC address of the first physical network interface
// (by index), or of the first non-loopback one when none is physical, as
// 12 lowercase hex digits.
func FirstMAC() (string, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return "", fmt.Errorf("list network interfaces: %w", err)
	}
	return PickMAC(ifs, hasDevice)
}

// hasDevice reports whether a network interface is a device (it has
// /sys/class/net/<name>/device), not a bridge, bond, veth or tunnel that
// software creates with a random or borrowed MAC address.
func hasDevice(name string) bool {
	_, err := os.Stat(filepath.Join("/sys/class/net", name, "device"))
	return err == nil
}

// PickMAC chooses the MAC address FirstMAC reports: physical interfaces
// come first.
func PickMAC(ifs []net.Interface, physical func(name string) bool) (string, error) {
	ifs = slices.Clone(ifs)
	slices.SortFunc(ifs, func(a, b net.Interface) int { return a.Index - b.Index })
	var fallback string
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback != 0 || len(i.HardwareAddr) == 0 {
			continue
		}
		mac := fmt.Sprintf("%x", []byte(i.HardwareAddr))
		if physical(i.Name) {
			return mac, nil
		}
		if fallback == "" {
			fallback = mac
		}
	}
	if fallback != "" {
		return fallback, nil
	}
	return "", errors.New("no network interface with a MAC address: set hostname.name in the node metadata")
}

// Reporter POSTs status documents to a URL in the background. Report never
// blocks: while one POST is in flight, only the newest waiting document is
// kept.
type Reporter struct {
	url     string
	client  *http.Client
	pending chan []byte
	done    chan struct{}
}

// NewReporter starts a reporter; each POST gives up after timeout.
func NewReporter(url string, timeout time.Duration) *Reporter {
	r := &Reporter{
		url:     url,
		client:  &http.Client{Timeout: timeout},
		pending: make(chan []byte, 1),
		done:    make(chan struct{}),
	}
	go r.loop()
	return r
}

// Report queues a JSON document, replacing one still waiting.
func (r *Reporter) Report(body []byte) {
	for {
		select {
		case r.pending <- body:
			return
		default:
		}
		select {
		case <-r.pending:
		default:
		}
	}
}

// Close sends what is still queued, waiting at most until ctx ends.
func (r *Reporter) Close(ctx context.Context) {
	close(r.pending)
	select {
	case <-r.done:
	case <-ctx.Done():
	}
}

func (r *Reporter) loop() {
	defer close(r.done)
	for body := range r.pending {
		// Errors are dropped on purpose: reporting never blocks a join,
		// and the status file on the node holds the same document.
		resp, err := r.client.Post(r.url, "application/json", bytes.NewReader(body))
		if err == nil {
			resp.Body.Close()
		}
	}
}
