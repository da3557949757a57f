package agent

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"sync"
	"testing/fstest"
	"time"

	"github.com/kilnproject/kiln/firstboot/endpoint"
)

// fakeFS is an in-memory FS.
type fakeFS struct{ m fstest.MapFS }

func newFakeFS() *fakeFS { return &fakeFS{m: fstest.MapFS{}} }

func rel(name string) string { return strings.TrimPrefix(name, "/") }

func (f *fakeFS) ReadFile(name string) ([]byte, error)    { return f.m.ReadFile(rel(name)) }
func (f *fakeFS) Open(name string) (io.ReadCloser, error) { return f.m.Open(rel(name)) }
func (f *fakeFS) Stat(name string) (fs.FileInfo, error)   { return f.m.Stat(rel(name)) }
func (f *fakeFS) ReadDir(name string) ([]fs.DirEntry, error) {
	return f.m.ReadDir(rel(name))
}

func (f *fakeFS) WriteFile(name string, data []byte) error {
	mf, ok := f.m[rel(name)]
	if !ok {
		return &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	mf.Data = append([]byte(nil), data...)
	return nil
}

func (f *fakeFS) Replace(name string, data []byte, perm fs.FileMode) error {
	dir := rel(name[:strings.LastIndex(name, "/")])
	if fi, err := f.m.Stat(dir); dir != "" && (err != nil || !fi.IsDir()) {
		return &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	f.m[rel(name)] = &fstest.MapFile{Data: append([]byte(nil), data...), Mode: perm}
	return nil
}

func (f *fakeFS) RemoveAll(name string) error {
	for k := range f.m {
		if k == rel(name) || strings.HasPrefix(k, rel(name)+"/") {
			delete(f.m, k)
		}
	}
	return nil
}

func (f *fakeFS) MkdirAll(name string, perm fs.FileMode) error {
	p := rel(name)
	for p != "" && p != "." {
		if _, ok := f.m[p]; !ok {
			f.m[p] = &fstest.MapFile{Mode: fs.ModeDir | perm}
		}
		i := strings.LastIndex(p, "/")
		if i < 0 {
			break
		}
		p = p[:i]
	}
	return nil
}

func (f *fakeFS) put(name, data string, perm fs.FileMode) {
	f.MkdirAll(name[:strings.LastIndex(name, "/")], 0o755)
	f.m[rel(name)] = &fstest.MapFile{Data: []byte(data), Mode: perm}
}

func (f *fakeFS) has(name string) bool { _, ok := f.m[rel(name)]; return ok }

func (f *fakeFS) read(name string) string {
	if mf, ok := f.m[rel(name)]; ok {
		return string(mf.Data)
	}
	return ""
}

// fakeClock advances only when slept on.
type fakeClock struct {
	now    time.Time
	slept  []time.Duration
	onTick func(*fakeClock)
}

func (c *fakeClock) Now() time.Time { return c.now }
func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.slept = append(c.slept, d)
	c.now = c.now.Add(d)
	if c.onTick != nil {
		c.onTick(c)
	}
	if len(c.slept) > 100000 {
		return fmt.Errorf("fake clock: too many sleeps (endless wait?)")
	}
	return nil
}

// fakeRunner answers commands with a handler and records them.
type fakeRunner struct {
	calls  []string
	handle func(line string) (stdout, stderr string, err error)
}

func (f *fakeRunner) Run(_ context.Context, name string, args ...string) ([]byte, []byte, error) {
	line := strings.Join(append([]string{name}, args...), " ")
	f.calls = append(f.calls, line)
	if f.handle == nil {
		return nil, nil, nil
	}
	out, errOut, err := f.handle(line)
	return []byte(out), []byte(errOut), err
}

func (f *fakeRunner) count(prefix string) int {
	n := 0
	for _, c := range f.calls {
		if strings.HasPrefix(c, prefix) {
			n++
		}
	}
	return n
}

// bootstraps counts kubeadm init and join runs.
func (f *fakeRunner) bootstraps() int { return f.count("kubeadm init") + f.count("kubeadm join") }

// fakeProber returns results in turn, repeating the last.
type fakeProber struct {
	results []endpoint.Result
	n       int
}

func (p *fakeProber) Probe(context.Context) endpoint.Result {
	r := p.results[min(p.n, len(p.results)-1)]
	p.n++
	return r
}

// fakeReporter keeps what it was given.
type fakeReporter struct {
	mu     sync.Mutex
	bodies []string
	closed bool
}

func (r *fakeReporter) Report(b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.bodies = append(r.bodies, string(b))
}

func (r *fakeReporter) Close(context.Context) { r.closed = true }
