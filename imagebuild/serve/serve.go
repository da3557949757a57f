// Package serve is kiln serve: the HTTP boot server for a bundle made by
// kiln pxe. It answers iPXE with each machine's script, hands out configs
// to the machine they are for, serves the boot assets, and records the
// first-boot agents' reports. What it learns (pool assignments, reports)
// is kept under the bundle's state/ folder, so it survives restarts and
// rebuilds of the bundle.
package serve

import (
	"cmp"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// Phases the server acts on.
const (
	// PhaseInstalled is what the kiln installer reports once the OS and
	// the node's config are on the disk.
	PhaseInstalled = "installed"
	// PhaseDone is the agent's last phase: the node is in the cluster.
	PhaseDone = "done"
)

const (
	// writeTimeout bounds writing any answer but a file. There is no
	// server-wide WriteTimeout: it would cut off a slow download of a big
	// initramfs or rootfs. Files are sent in paceChunk pieces instead,
	// each within paceChunk at Options.MinRate.
	writeTimeout = time.Minute
	// DefaultMinRate is the slowest download kept, in bytes per second
	// over each paceChunk (32 s per MiB): a client that stays connected
	// but stops reading is dropped within that.
	DefaultMinRate = 32 << 10
	paceChunk      = 1 << 20
	// MaxDownloads is how many files are sent at once: the rest of
	// MaxConns is left for scripts, configs and reports, which a
	// download beyond it (answered 503) cannot crowd out.
	MaxDownloads = MaxConns - 512
	// ShutdownGrace is how long a shutdown waits for running requests.
	ShutdownGrace = 10 * time.Second
	// maxReport is the largest report body accepted.
	maxReport = 64 << 10
)

// Options say what to serve.
type Options struct {
	// Dir is the bundle kiln pxe wrote.
	Dir string
	// Pool lists the roles an unknown machine may be given: first a free
	// inventory node without a MAC of one of them (in the manifest's
	// order), else the first of these roles that has a role default.
	Pool []nodeconfig.Role
	// AccessLog gets one line per request; Log gets the server's notices
	// (unknown machines, refusals, assignments). Both may be nil.
	AccessLog, Log io.Writer
	// MinRate is the slowest download kept, in bytes per second
	// (default DefaultMinRate).
	MinRate int64
}

// Server serves one bundle. It is an http.Handler; Serve runs it.
type Server struct {
	dir  string
	m    *pxe.Manifest
	pool []nodeconfig.Role
	// assets maps each asset's URL path to its file: requests are looked
	// up, never joined onto the filesystem.
	assets map[string]string
	log    *log.Logger
	access *log.Logger
	// minRate is Options.MinRate; downloads counts the files being sent.
	minRate   int64
	downloads atomic.Int64

	// mu guards what the server learns; see state.go.
	mu         sync.Mutex
	assigned   map[string]*assignment // by MAC
	reports    map[string]*record     // by reportKey
	configs    map[string]*configLog  // by entry name
	dirty      bool                   // reports or configs changed since written
	configsSeq uint64                 // counts changes of configs
	// configsMu orders writers of configs.json; configsWritten is the
	// change it holds.
	configsMu      sync.Mutex
	configsWritten uint64
	flushTimer     *time.Timer
	flushMu        sync.Mutex // one writer of reports.json at a time
	unlock         func()     // releases the bundle's state lock
	clientLines    clientLines
}

// New reads the bundle's manifest and the server's state.
func New(o Options) (*Server, error) {
	m, err := pxe.ReadManifest(o.Dir)
	if err != nil {
		return nil, err
	}
	secrets := []string{m.StatusToken}
	for _, n := range m.Nodes {
		secrets = append(secrets, n.Token, n.ReportKey)
	}
	s := &Server{
		dir:     o.Dir,
		m:       m,
		minRate: cmp.Or(o.MinRate, DefaultMinRate),
		assets:  map[string]string{},
		log:     log.New(newRedactor(orDiscard(o.Log), secrets), "kiln serve: ", log.LstdFlags),
		access:  log.New(newRedactor(orDiscard(o.AccessLog), secrets), "", 0),
	}
	for _, a := range m.Assets {
		s.assets[pxe.AssetPath+a.File] = filepath.Join(o.Dir, "assets", a.File)
	}
	for _, r := range o.Pool {
		if !slices.ContainsFunc(m.Nodes, func(n pxe.Node) bool { return n.Role == r && n.MAC == "" }) {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("pool role %s: the bundle has no %s entry without a MAC (inventory node or role default): drop it from the pool or rebuild the bundle with kiln pxe", r, r))
		}
		if !slices.Contains(s.pool, r) {
			s.pool = append(s.pool, r)
		}
	}
	if slices.ContainsFunc(s.pool, nodeconfig.Role.IsControlPlane) {
		s.log.Printf("warning: --pool %v hands control-plane configs (cluster keys) to unknown machines: keep this network closed", s.pool)
	}
	if s.unlock, err = pxe.LockState(o.Dir); err != nil {
		return nil, err
	}
	if err := s.load(); err != nil {
		s.unlock()
		return nil, err
	}
	return s, nil
}

func orDiscard(w io.Writer) io.Writer {
	if w == nil {
		return io.Discard
	}
	return w
}

// Manifest is the bundle's manifest the server answers from.
func (s *Server) Manifest() *pxe.Manifest { return s.m }

// Serve answers on ln until ctx ends, then shuts down: running requests
// get ShutdownGrace to finish, and the state is written.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		// Request bodies are reports of at most 64 KiB.
		ReadTimeout:    30 * time.Second,
		IdleTimeout:    2 * time.Minute,
		MaxHeaderBytes: 16 << 10,
		ErrorLog:       s.log,
	}
	done := make(chan error, 1)
	go func() { done <- hs.Serve(limitListener(ln, MaxConns, MaxConnsPerClient, s.log)) }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), ShutdownGrace)
		if errors.Is(hs.Shutdown(sctx), context.DeadlineExceeded) {
			s.log.Printf("requests still running after %s were cut off", ShutdownGrace)
			hs.Close()
		}
		cancel()
		if err = <-done; errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
	}
	return errors.Join(fault.Wrap(fault.Environment, err), s.Close())
}

// ServeHTTP answers one request and logs it.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	lw := &logWriter{ResponseWriter: w}
	// Fails only where there is no connection (httptest recorders).
	_ = http.NewResponseController(w).SetWriteDeadline(start.Add(writeTimeout))
	s.route(lw, r)
	s.access.Printf("%s %s %s %s %d %d %s", start.UTC().Format("2006-01-02T15:04:05.000Z"), r.RemoteAddr, r.Method,
		loggedURI(r), lw.code(), lw.bytes, time.Since(start).Round(time.Microsecond))
}

var (
	readOnly = []string{http.MethodGet, http.MethodHead}
	postOnly = []string{http.MethodPost}
)

func (s *Server) route(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	switch {
	case r.URL.RawPath != "":
		// Every path here is plain: an encoded slash or dot names nothing.
		http.NotFound(w, r)
	case p == pxe.EntryPath:
		if allow(w, r, readOnly) {
			text(w, http.StatusOK, pxe.EntryScript())
		}
	case p == pxe.ScriptPath:
		if allow(w, r, readOnly) {
			s.script(w, r)
		}
	case strings.HasPrefix(p, pxe.ConfigPath):
		if allow(w, r, readOnly) {
			s.config(w, r, strings.TrimPrefix(p, pxe.ConfigPath))
		}
	case strings.HasPrefix(p, pxe.AssetPath):
		if allow(w, r, readOnly) {
			s.asset(w, r)
		}
	case strings.HasPrefix(p, pxe.ReportPath):
		if allow(w, r, postOnly) {
			s.report(w, r, strings.TrimPrefix(p, pxe.ReportPath))
		}
	case p == pxe.StatusPath:
		if allow(w, r, readOnly) && s.operator(w, r) {
			s.status(w, r)
		}
	case strings.HasPrefix(p, pxe.ArmPath):
		if allow(w, r, postOnly) && s.operator(w, r) {
			s.arm(w, r, strings.TrimPrefix(p, pxe.ArmPath))
		}
	default:
		http.NotFound(w, r)
	}
}

func allow(w http.ResponseWriter, r *http.Request, methods []string) bool {
	if slices.Contains(methods, r.Method) {
		return true
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	return false
}

// busy answers 503 with Retry-After (seconds) and closes the connection:
// a client refused for want of room does not keep a connection either.
func busy(w http.ResponseWriter, retryAfter int, msg string) {
	w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
	w.Header().Set("Connection", "close")
	http.Error(w, msg, http.StatusServiceUnavailable)
}

// text answers with a plain-text body that must not be cached: scripts
// carry tokens and change as machines install.
func text(w http.ResponseWriter, code int, body string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	io.WriteString(w, body)
}

// script answers iPXE with the script of the machine with ?mac=.
func (s *Server) script(w http.ResponseWriter, r *http.Request) {
	mac, err := pxe.NormalizeMAC(r.URL.Query().Get("mac"))
	if err != nil {
		http.Error(w, "kiln: ?mac=: "+err.Error(), http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	n, a, err := s.nodeFor(mac, host(r.RemoteAddr))
	installed := n != nil && n.Mode == pxe.ModeInstall && s.retired(n, mac, a)
	s.mu.Unlock()
	switch {
	case err != nil:
		s.logFrom(host(r.RemoteAddr), "assign %s: %v", mac, err)
		busy(w, 60, "kiln: no assignment for "+mac+" (see kiln serve's log)")
	case n == nil:
		s.logFrom(host(r.RemoteAddr), "unknown MAC %s (from %s): add it to the cluster file's nodes[].mac and rebuild with kiln pxe, or run kiln serve with --pool", mac, r.RemoteAddr)
		http.Error(w, "kiln: unknown MAC "+mac, http.StatusNotFound)
	case installed:
		s.logFrom(host(r.RemoteAddr), "%s (%s) is installed: it boots from its disk", n.Name, mac)
		text(w, http.StatusOK, pxe.LocalBootScript(n))
	default:
		text(w, http.StatusOK, s.m.Script(n, mac))
	}
}

// config serves a node's config to the machine it is for: only with the
// node's MAC (or one assigned to it) and its token. Every refusal looks
// the same to the client; the log says why.
func (s *Server) config(w http.ResponseWriter, r *http.Request, name string) {
	q := r.URL.Query()
	refuse := func(why string) {
		s.logFrom(host(r.RemoteAddr), "refused config %q to %s: %s", name, r.RemoteAddr, why)
		http.Error(w, "kiln: config refused", http.StatusForbidden)
	}
	n, ok := s.m.Node(name)
	if !ok {
		refuse("no such node")
		return
	}
	if token := q.Get("token"); token == "" {
		refuse("no token")
		return
	} else if subtle.ConstantTimeCompare([]byte(token), []byte(n.Token)) != 1 {
		refuse("wrong token")
		return
	}
	mac, err := pxe.NormalizeMAC(q.Get("mac"))
	if err != nil {
		refuse(err.Error())
		return
	}
	s.mu.Lock()
	a := s.assigned[mac]
	if n.MAC != mac && (n.MAC != "" || a == nil || a.Node != n.Name) {
		s.mu.Unlock()
		refuse(fmt.Sprintf("MAC %s is not %s's", mac, n.Name))
		return
	}
	if t, gone := s.taken(n, mac, a); gone {
		if r.Method == http.MethodGet {
			s.refusedDelivery(n, Fetch{From: host(r.RemoteAddr), MAC: mac, At: time.Now().UTC()})
		}
		s.mu.Unlock()
		why := "it reported installed or joined"
		if t != nil {
			why = fmt.Sprintf("fetched by %s (MAC %s) at %s", t.From, t.MAC, t.At.Format(time.RFC3339))
		}
		s.logFrom(host(r.RemoteAddr), "refused config %s to %s (%s): its cluster keys were handed out already (%s); to serve them once more, run kiln rearm %s --bundle DIR", n.Name, mac, r.RemoteAddr, why, n.Name)
		http.Error(w, fmt.Sprintf("kiln: %s's config holds cluster keys and was handed out already (%s); it is served once per arming: to rebuild this machine, run kiln rearm %s --bundle DIR on the server", n.Name, why, n.Name), http.StatusGone)
		return
	}
	// The file is opened first: a delivery that cannot be sent does not
	// use up the arming.
	f, fi, err := s.open(filepath.Join(s.dir, n.Config))
	if err != nil {
		s.mu.Unlock()
		http.Error(w, "kiln: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	if r.Method == http.MethodGet {
		if err := s.deliver(n, a, Fetch{From: host(r.RemoteAddr), MAC: mac, At: time.Now().UTC()}); err != nil {
			s.log.Printf("config %s for %s: %v", n.Name, mac, err)
			http.Error(w, "kiln: could not save state (see kiln serve's log)", http.StatusInternalServerError)
			return
		}
		if n.Role.IsControlPlane() {
			s.log.Printf("handed %s's config (cluster keys) to %s (%s): it is not served again until kiln rearm %s", n.Name, mac, r.RemoteAddr, n.Name)
		}
	} else {
		s.mu.Unlock()
	}
	w.Header().Set("Cache-Control", "no-store")
	s.send(w, r, f, fi, "application/json")
}

// asset serves a file the manifest lists under assets/, unless
// MaxDownloads are being sent.
func (s *Server) asset(w http.ResponseWriter, r *http.Request) {
	file, ok := s.assets[r.URL.Path]
	if !ok {
		http.NotFound(w, r)
		return
	}
	if s.downloads.Add(1) > MaxDownloads {
		s.downloads.Add(-1)
		busy(w, 10, fmt.Sprintf("kiln: %d downloads are running, the most kiln serve sends at once: retry", MaxDownloads))
		return
	}
	defer s.downloads.Add(-1)
	s.serveFile(w, r, file, "application/octet-stream")
}

// serveFile serves a file with Range and conditional requests.
func (s *Server) serveFile(w http.ResponseWriter, r *http.Request, path, contentType string) {
	f, fi, err := s.open(path)
	if err != nil {
		http.Error(w, "kiln: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	s.send(w, r, f, fi, contentType)
}

// open opens a regular file of the bundle; its error is for the client,
// the log says more.
func (s *Server) open(path string) (*os.File, fs.FileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		s.log.Printf("%v: the bundle is incomplete, rebuild it with kiln pxe", err)
		return nil, nil, errors.New("file missing on the server")
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		s.log.Printf("%s: not a regular file (%v): rebuild the bundle with kiln pxe", path, err)
		return nil, nil, errors.New("file unreadable on the server")
	}
	return f, fi, nil
}

// send answers with an open file; http.ServeContent over an *os.File lets
// the kernel copy it (sendfile), paced so that a reader that stalls is
// dropped.
func (s *Server) send(w http.ResponseWriter, r *http.Request, f *os.File, fi fs.FileInfo, contentType string) {
	w.Header().Set("Content-Type", contentType)
	http.ServeContent(&paced{ResponseWriter: w, chunkTime: time.Duration(paceChunk * int64(time.Second) / s.minRate)}, r, "", fi.ModTime(), f)
}

// paced sends a body in paceChunk pieces, each with a write deadline of
// chunkTime: a slow download goes on as long as it keeps the minimum
// rate, a stalled one fails at the next deadline. Whole pieces still go
// through the connection's ReadFrom (sendfile).
type paced struct {
	http.ResponseWriter
	chunkTime time.Duration
}

func (p *paced) Write(b []byte) (int, error) {
	_ = http.NewResponseController(p.ResponseWriter).SetWriteDeadline(time.Now().Add(p.chunkTime + time.Duration(len(b))*p.chunkTime/paceChunk))
	return p.ResponseWriter.Write(b)
}

func (p *paced) ReadFrom(r io.Reader) (int64, error) {
	rf, ok := p.ResponseWriter.(io.ReaderFrom)
	if !ok {
		return io.Copy(struct{ io.Writer }{p}, r)
	}
	// One LimitedReader over the file, as sendfile wants it.
	remain := int64(-1)
	if lr, ok := r.(*io.LimitedReader); ok {
		r, remain = lr.R, lr.N
	}
	var total int64
	for remain != 0 {
		n := int64(paceChunk)
		if remain > 0 {
			n = min(n, remain)
		}
		_ = http.NewResponseController(p.ResponseWriter).SetWriteDeadline(time.Now().Add(p.chunkTime))
		k, err := rf.ReadFrom(&io.LimitedReader{R: r, N: n})
		total += k
		if remain > 0 {
			remain -= k
		}
		if err != nil || k < n {
			return total, err
		}
	}
	return total, nil
}

// Unwrap lets http.ResponseController reach the connection.
func (p *paced) Unwrap() http.ResponseWriter { return p.ResponseWriter }

// report records a node's status.
func (s *Server) report(w http.ResponseWriter, r *http.Request, name string) {
	n, ok := s.m.Node(name)
	key := r.URL.Query().Get("key")
	if !ok || key == "" || subtle.ConstantTimeCompare([]byte(key), []byte(n.ReportKey)) != 1 {
		why := "unknown node or wrong key"
		if key == "" {
			why = "no key"
		}
		s.logFrom(host(r.RemoteAddr), "refused report for %q from %s: %s", name, r.RemoteAddr, why)
		http.Error(w, "kiln: report refused", http.StatusForbidden)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxReport))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		http.Error(w, fmt.Sprintf("kiln: report larger than %d bytes", maxReport), http.StatusRequestEntityTooLarge)
		return
	}
	var st nodeconfig.Status
	if err == nil {
		err = json.Unmarshal(body, &st)
	}
	if err != nil {
		http.Error(w, "kiln: report: "+err.Error()+": send the agent's status as JSON", http.StatusBadRequest)
		return
	}
	// The installer names the MAC it booted with (?mac=): that tells a
	// role default's machines apart even behind one address.
	mac := ""
	if v := r.URL.Query().Get("mac"); v != "" {
		if mac, err = pxe.NormalizeMAC(v); err != nil {
			http.Error(w, "kiln: report ?mac=: "+err.Error(), http.StatusBadRequest)
			return
		}
		if !s.boundTo(n, mac) {
			s.logFrom(host(r.RemoteAddr), "refused report for %s from %s: MAC %s is not %s's", n.Name, r.RemoteAddr, mac, n.Name)
			http.Error(w, "kiln: report refused", http.StatusForbidden)
			return
		}
	}
	if err := s.record(n, st, host(r.RemoteAddr), mac, time.Now()); err != nil {
		busy(w, 60, "kiln: report not stored: "+err.Error()+" (see kiln serve's log)")
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// operator reports whether the request carries the bundle's status
// token (Authorization: Bearer), and answers 401 if not.
func (s *Server) operator(w http.ResponseWriter, r *http.Request) bool {
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if strings.EqualFold(scheme, "Bearer") && subtle.ConstantTimeCompare([]byte(token), []byte(s.m.StatusToken)) == 1 {
		return true
	}
	why := "a wrong status token"
	if !strings.EqualFold(scheme, "Bearer") || token == "" {
		why = "no status token (Authorization: Bearer)"
	}
	s.logFrom(host(r.RemoteAddr), "refused %s %s to %s: %s", r.Method, r.URL.Path, r.RemoteAddr, why)
	w.Header().Set("WWW-Authenticate", `Bearer realm="kiln"`)
	http.Error(w, "kiln: this needs Authorization: Bearer with the bundle's statusToken", http.StatusUnauthorized)
	return false
}

// ArmResult answers ArmPath.
type ArmResult struct {
	Node string `json:"node"`
	MAC  string `json:"mac,omitempty"`
	// HoldsKeys: an init or control-plane config, handed out once per
	// arming; other configs are served on every boot and need no arming.
	HoldsKeys bool `json:"holdsKeys"`
	// Cleared counts the machines that had reported installed or done and
	// will be provisioned again.
	Cleared int `json:"cleared"`
}

// arm re-arms a node for kiln rearm.
func (s *Server) arm(w http.ResponseWriter, r *http.Request, name string) {
	mac := r.URL.Query().Get("mac")
	cleared, err := s.Arm(name, mac, time.Now())
	switch {
	case fault.KindOf(err) == fault.Input:
		http.Error(w, "kiln: "+err.Error(), http.StatusBadRequest)
	case err != nil:
		s.log.Printf("re-arm %s: %v", name, err)
		http.Error(w, "kiln: could not save state (see kiln serve's log)", http.StatusInternalServerError)
	default:
		if mac != "" {
			mac, _ = pxe.NormalizeMAC(mac)
		}
		n, _ := s.m.Node(name)
		writeJSON(w, ArmResult{Node: name, MAC: mac, HoldsKeys: n.Role.IsControlPlane(), Cleared: cleared})
	}
}

// writeJSON answers with v as JSON, not to be cached.
func writeJSON(w http.ResponseWriter, v any) {
	body, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	w.Write(append(body, '\n'))
}

// status answers with every node's state, for kiln status.
func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, s.snapshot(time.Now()))
}

// host is the address part of a RemoteAddr.
func host(remoteAddr string) string {
	h, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		return remoteAddr
	}
	return h
}

// Connection limits: each connection holds a file descriptor, and a
// download may be kept open for long by a slow reader. One client address
// may hold MaxConnsPerClient; all together MaxConns. A connection beyond
// either is closed at once, so the accept loop never waits and other
// machines' scripts keep being served.
const (
	MaxConns          = 4096
	MaxConnsPerClient = 64
)

// limitListener enforces MaxConns and MaxConnsPerClient on ln; refusals
// are logged at most once a minute per address.
func limitListener(ln net.Listener, total, perClient int, logger *log.Logger) net.Listener {
	return &limited{Listener: ln, total: total, perClient: perClient, log: logger, open: map[string]int{}, noted: map[string]time.Time{}}
}

type limited struct {
	net.Listener
	total, perClient int
	log              *log.Logger

	mu    sync.Mutex
	count int
	open  map[string]int       // by client address
	noted map[string]time.Time // when a refusal was last logged
}

func (l *limited) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		addr := host(c.RemoteAddr().String())
		if why := l.admit(addr); why != "" {
			c.Close()
			l.refused(addr, why)
			continue
		}
		return &limitedConn{Conn: c, release: func() { l.release(addr) }}, nil
	}
}

// admit takes a slot for a connection from addr, or says why not.
func (l *limited) admit(addr string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.open[addr] >= l.perClient:
		return fmt.Sprintf("it holds %d connections already, the most one client gets", l.perClient)
	case l.count >= l.total:
		return fmt.Sprintf("%d connections are open, the most kiln serve keeps", l.total)
	}
	l.open[addr]++
	l.count++
	return ""
}

func (l *limited) release(addr string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.count--
	if l.open[addr]--; l.open[addr] == 0 {
		delete(l.open, addr)
	}
}

func (l *limited) refused(addr, why string) {
	l.mu.Lock()
	now := time.Now()
	quiet := now.Sub(l.noted[addr]) < time.Minute
	if !quiet {
		if len(l.noted) > 4096 {
			clear(l.noted)
		}
		l.noted[addr] = now
	}
	l.mu.Unlock()
	if !quiet {
		l.log.Printf("closed connections from %s: %s (logged once a minute)", addr, why)
	}
}

type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// ReadFrom keeps the kernel's file-to-socket copy (sendfile) that net/http
// finds on the connection.
func (c *limitedConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}
