// Package system holds the agent's real side effects: commands, the
// filesystem under a root directory, the clock, network interfaces and the
// status reporter. The agent package owns the interfaces they satisfy and
// keeps fakes beside them.
package system

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	"github.com/kilnproject/kiln/firstboot/agent"
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

// Open opens name for reading.
func (r Root) Open(name string) (io.ReadCloser, error) { return os.Open(r.path(name)) }

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

// RemoveAll removes a file or a folder tree and syncs its parent folder,
// so that the removal survives a power loss.
func (r Root) RemoveAll(name string) error {
	p := r.path(name)
	if err := os.RemoveAll(p); err != nil {
		return err
	}
	dir, err := os.Open(filepath.Dir(p))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
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

// Interfaces lists the network interfaces that are up, with the prefixes of
// their addresses.
func Interfaces() ([]agent.Interface, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []agent.Interface
	for _, i := range ifs {
		if i.Flags&net.FlagUp == 0 || i.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := i.Addrs()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", i.Name, err)
		}
		ai := agent.Interface{Name: i.Name}
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil {
				ai.Prefixes = append(ai.Prefixes, p)
			}
		}
		out = append(out, ai)
	}
	return out, nil
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

// Etcd edits etcd's membership through the JSON gateway of etcd's v3 API
// (POST /v3/cluster/member/list and /remove on a client URL), so the agent
// needs no etcd client library.
type Etcd struct {
	Timeout time.Duration
}

// etcdMember is a member in the gateway's JSON (uint64 IDs are strings).
type etcdMember struct {
	ID       string   `json:"ID"`
	Name     string   `json:"name"`
	PeerURLs []string `json:"peerURLs"`
}

// RemoveMember removes the member with peerURL, asking each endpoint in
// turn until one answers.
func (e Etcd) RemoveMember(ctx context.Context, c agent.EtcdClient, peerURL string) (bool, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(c.CA) {
		return false, errors.New("etcd CA: no PEM certificate")
	}
	cert, err := tls.X509KeyPair(c.Cert, c.Key)
	if err != nil {
		return false, fmt.Errorf("etcd client certificate: %w", err)
	}
	client := &http.Client{Timeout: e.Timeout, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
	}}
	defer client.CloseIdleConnections()
	post := func(endpoint, api string, in, out any) error {
		body, err := json.Marshal(in)
		if err != nil {
			return err
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint+api, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s%s: %s: %s", endpoint, api, resp.Status, bytes.TrimSpace(data))
		}
		return json.Unmarshal(data, out)
	}
	var errs []error
	for _, ep := range c.Endpoints {
		var list struct {
			Members []etcdMember `json:"members"`
		}
		if err := post(ep, "/v3/cluster/member/list", struct{}{}, &list); err != nil {
			errs = append(errs, err)
			continue
		}
		i := slices.IndexFunc(list.Members, func(m etcdMember) bool { return slices.Contains(m.PeerURLs, peerURL) })
		if i < 0 {
			return false, nil
		}
		var out struct{}
		if err := post(ep, "/v3/cluster/member/remove", map[string]string{"ID": list.Members[i].ID}, &out); err != nil {
			errs = append(errs, err)
			continue
		}
		return true, nil
	}
	return false, errors.Join(errs...)
}
