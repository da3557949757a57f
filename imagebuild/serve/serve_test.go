package serve_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/pxe"
	"github.com/kilnproject/kiln/imagebuild/serve"
	"github.com/kilnproject/kiln/imagebuild/serve/servetest"
)

const (
	macInit   = "52:54:00:00:00:01"
	macWorker = "52:54:00:00:00:02"
)

// inventory has an init node and a worker with MACs, a control plane and
// a worker without (pool slots), and the role defaults kiln pxe adds.
func inventory(t *testing.T) string {
	dir, _ := servetest.NewBundle(t,
		pxe.Node{Name: "cp1", Role: nodeconfig.RoleInit, MAC: macInit},
		pxe.Node{Name: "cp2", Role: nodeconfig.RoleControlPlane},
		pxe.Node{Name: "w1", Role: nodeconfig.RoleWorker, MAC: macWorker},
		pxe.Node{Name: "w2", Role: nodeconfig.RoleWorker},
		pxe.Node{Name: "default-control-plane", Role: nodeconfig.RoleControlPlane, Default: true},
		pxe.Node{Name: "default-worker", Role: nodeconfig.RoleWorker, Default: true},
	)
	return dir
}

// defaults has no init node in the inventory, so it has default-init.
func defaults(t *testing.T) string {
	dir, _ := servetest.NewBundle(t,
		pxe.Node{Name: "w1", Role: nodeconfig.RoleWorker, MAC: macWorker},
		pxe.Node{Name: "default-init", Role: nodeconfig.RoleInit, Default: true},
		pxe.Node{Name: "default-control-plane", Role: nodeconfig.RoleControlPlane, Default: true},
		pxe.Node{Name: "default-worker", Role: nodeconfig.RoleWorker, Default: true},
	)
	return dir
}

// env is a running server on a bundle.
type env struct {
	t           *testing.T
	dir         string
	m           *pxe.Manifest
	srv         *serve.Server
	ts          *httptest.Server
	log, access *servetest.Buffer
	// from is the loopback address requests come from (default
	// 127.0.0.1): machines are told apart by address.
	from string
}

func start(t *testing.T, dir string, pool ...nodeconfig.Role) *env {
	t.Helper()
	e := &env{t: t, dir: dir, log: &servetest.Buffer{}, access: &servetest.Buffer{}}
	var err error
	e.srv, err = serve.New(serve.Options{Dir: dir, Pool: pool, Log: e.log, AccessLog: e.access})
	if err != nil {
		t.Fatal(err)
	}
	e.m = e.srv.Manifest()
	e.ts = httptest.NewServer(e.srv)
	t.Cleanup(e.stop)
	return e
}

// stop closes the server (idempotent) and checks no secret was logged.
func (e *env) stop() {
	e.t.Helper()
	if e.ts == nil {
		return
	}
	e.ts.Close()
	if err := e.srv.Close(); err != nil {
		e.t.Error(err)
	}
	e.ts = nil
	logs := e.log.String() + e.access.String()
	secrets := []string{e.m.StatusToken}
	for _, n := range e.m.Nodes {
		secrets = append(secrets, n.Token, n.ReportKey)
	}
	for _, s := range secrets {
		if strings.Contains(logs, s) {
			e.t.Errorf("a log holds the secret %q:\n%s", s, logs)
		}
	}
}

func (e *env) node(name string) *pxe.Node {
	n, ok := e.m.Node(name)
	if !ok {
		e.t.Fatalf("no node %s", name)
	}
	return n
}

// do sends a request with its path exactly as given: no client cleans
// or escapes it.
func (e *env) do(method, path string, body []byte, header ...string) (int, string, http.Header) {
	e.t.Helper()
	d := net.Dialer{}
	if e.from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(e.from)}
	}
	conn, err := d.Dial("tcp", e.ts.Listener.Addr().String())
	if err != nil {
		e.t.Fatal(err)
	}
	defer conn.Close()
	var req bytes.Buffer
	fmt.Fprintf(&req, "%s %s HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\nContent-Length: %d\r\n", method, path, len(body))
	for i := 0; i+1 < len(header); i += 2 {
		fmt.Fprintf(&req, "%s: %s\r\n", header[i], header[i+1])
	}
	req.WriteString("\r\n")
	req.Write(body)
	if _, err := conn.Write(req.Bytes()); err != nil {
		e.t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.StatusCode, string(b), resp.Header
}

func (e *env) get(path string) (int, string) {
	e.t.Helper()
	code, body, _ := e.do(http.MethodGet, path, nil)
	return code, body
}

// script asks for a MAC's script and checks it is the node's.
func (e *env) script(mac, want string) {
	e.t.Helper()
	code, body := e.get(pxe.ScriptPath + "?mac=" + mac)
	norm, _ := pxe.NormalizeMAC(mac)
	if code != http.StatusOK || body != e.m.Script(e.node(want), norm) {
		e.t.Fatalf("script for %s: %d\n%s\nwant %s's script", mac, code, body, want)
	}
}

func configPath(n *pxe.Node, mac, token string) string {
	return pxe.ConfigPath + n.Name + "?mac=" + mac + "&token=" + token
}

func (e *env) report(n *pxe.Node, body string) {
	e.t.Helper()
	if code, resp, _ := e.do(http.MethodPost, pxe.ReportPath+n.Name+"?key="+n.ReportKey, []byte(body)); code != http.StatusNoContent {
		e.t.Fatalf("report %s: %d %s", n.Name, code, resp)
	}
}

// arm re-arms an entry through the server, as kiln rearm does, and
// checks how many installed machines it cleared.
func (e *env) arm(name, mac string, cleared int) {
	e.t.Helper()
	path := pxe.ArmPath + name
	if mac != "" {
		path += "?mac=" + mac
	}
	code, body, _ := e.do(http.MethodPost, path, nil, "Authorization", "Bearer "+e.m.StatusToken)
	var got serve.ArmResult
	if code != http.StatusOK || json.Unmarshal([]byte(body), &got) != nil || got.Node != name || got.Cleared != cleared {
		e.t.Fatalf("arm %s %s: %d %s, want %d cleared", name, mac, code, body, cleared)
	}
}

func (e *env) status() serve.Status {
	e.t.Helper()
	code, body, _ := e.do(http.MethodGet, pxe.StatusPath, nil, "Authorization", "Bearer "+e.m.StatusToken)
	if code != http.StatusOK {
		e.t.Fatalf("status: %d %s", code, body)
	}
	var st serve.Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		e.t.Fatal(err)
	}
	return st
}

func TestScripts(t *testing.T) {
	e := start(t, inventory(t))
	if code, body := e.get(pxe.EntryPath); code != http.StatusOK || body != pxe.EntryScript() {
		t.Fatalf("entry script: %d %s", code, body)
	}
	e.script("52-54-00-00-00-01", "cp1")
	e.script(macInit, "cp1")
	e.script("52-54-00-00-00-02", "w1")
	if code, _ := e.get(pxe.ScriptPath + "?mac=nonsense"); code != http.StatusBadRequest {
		t.Errorf("bad MAC: %d, want 400", code)
	}
	if code, _ := e.get(pxe.ScriptPath); code != http.StatusBadRequest {
		t.Errorf("no MAC: %d, want 400", code)
	}
	if code, _ := e.get(pxe.ScriptPath + "?mac=52-54-00-99-99-99"); code != http.StatusNotFound {
		t.Errorf("unknown MAC without a pool: %d, want 404", code)
	}
	if !strings.Contains(e.log.String(), "unknown MAC 52:54:00:99:99:99") {
		t.Errorf("unknown MAC not logged:\n%s", e.log)
	}
	if code, _, h := e.do(http.MethodPost, pxe.ScriptPath+"?mac="+macInit, nil); code != http.StatusMethodNotAllowed || h.Get("Allow") != "GET, HEAD" {
		t.Errorf("POST script: %d, Allow %q", code, h.Get("Allow"))
	}
}

func TestPoolAssignment(t *testing.T) {
	dir := inventory(t)
	e := start(t, dir, nodeconfig.RoleWorker, nodeconfig.RoleControlPlane)
	// Slots in the manifest's order, then the first pool role's default.
	e.script("52-54-00-00-10-01", "cp2")
	e.script("52-54-00-00-10-02", "w2")
	e.script("52-54-00-00-10-03", "default-worker")
	e.script("52-54-00-00-10-04", "default-worker")
	e.script("52-54-00-00-10-01", "cp2")
	e.script(macInit, "cp1")
	e.stop()

	// A new server on the same bundle remembers.
	e = start(t, dir, nodeconfig.RoleWorker, nodeconfig.RoleControlPlane)
	e.script("52-54-00-00-10-02", "w2")
	e.script("52-54-00-00-10-01", "cp2")
	e.script("52-54-00-00-10-05", "default-worker")
	st := e.status()
	var w2 serve.NodeStatus
	for _, n := range st.Nodes {
		if n.Name == "w2" {
			w2 = n
		}
	}
	if len(w2.Assigned) != 1 || w2.Assigned[0].MAC != "52:54:00:00:10:02" {
		t.Errorf("status of w2: %+v", w2)
	}
	e.stop()

	// Without the pool, remembered assignments still hold; new MACs do not.
	e = start(t, dir)
	e.script("52-54-00-00-10-03", "default-worker")
	if code, _ := e.get(pxe.ScriptPath + "?mac=52-54-00-00-10-06"); code != http.StatusNotFound {
		t.Errorf("new MAC without a pool: %d, want 404", code)
	}
}

func TestPoolInitDefaultOnce(t *testing.T) {
	dir := defaults(t)
	e := start(t, dir, nodeconfig.RoleInit, nodeconfig.RoleWorker)
	e.script("52-54-00-00-20-01", "default-init")
	e.script("52-54-00-00-20-02", "default-worker")
	e.stop()
	e = start(t, dir, nodeconfig.RoleInit, nodeconfig.RoleWorker)
	e.script("52-54-00-00-20-03", "default-worker")
	e.script("52-54-00-00-20-01", "default-init")
	e.stop()
	e = start(t, dir, nodeconfig.RoleInit)
	if code, _ := e.get(pxe.ScriptPath + "?mac=52-54-00-00-20-04"); code != http.StatusNotFound {
		t.Errorf("second init machine: %d, want 404", code)
	}
}

func TestPoolNeedsAnEntry(t *testing.T) {
	_, err := serve.New(serve.Options{Dir: inventory(t), Pool: []nodeconfig.Role{nodeconfig.RoleInit}})
	if err == nil || !strings.Contains(err.Error(), "pool role init") {
		t.Fatalf("pool init with an inventory init node: %v", err)
	}
}

func TestConfig(t *testing.T) {
	e := start(t, inventory(t), nodeconfig.RoleControlPlane)
	cp1, w1, cp2 := e.node("cp1"), e.node("w1"), e.node("cp2")
	slot := "52:54:00:00:30:01"
	e.script(slot, "cp2")

	for name, c := range map[string]struct {
		n             *pxe.Node
		mac, token, h string
	}{
		"cp1":  {cp1, macInit, cp1.Token, "application/json"},
		"w1":   {w1, "52-54-00-00-00-02", w1.Token, "application/json"},
		"slot": {cp2, slot, cp2.Token, "application/json"},
	} {
		code, body, h := e.do(http.MethodGet, configPath(c.n, c.mac, c.token), nil)
		want, _ := os.ReadFile(filepath.Join(e.dir, c.n.Config))
		if code != http.StatusOK || body != string(want) || h.Get("Content-Type") != c.h || h.Get("Cache-Control") != "no-store" {
			t.Errorf("%s: %d %q %v", name, code, body, h)
		}
	}

	var refusals []string
	for _, p := range []string{
		configPath(cp1, macWorker, cp1.Token),           // someone else's MAC
		configPath(cp1, macInit, w1.Token),              // someone else's token
		configPath(cp1, macWorker, w1.Token),            // another node's MAC and token
		configPath(cp1, macInit, ""),                    // no token
		configPath(cp1, "", cp1.Token),                  // no MAC
		configPath(cp2, "52:54:00:00:30:02", cp2.Token), // unassigned MAC for a slot
		configPath(cp2, macInit, cp2.Token),             // inventory MAC for a slot
		pxe.ConfigPath + "nobody?mac=" + macInit + "&token=" + cp1.Token,
		pxe.ConfigPath + "?mac=" + macInit + "&token=" + cp1.Token,
		pxe.ConfigPath + "../" + configPath(cp1, macInit, cp1.Token),
	} {
		code, body := e.get(p)
		if code != http.StatusForbidden {
			t.Errorf("%s: %d, want 403", p, code)
		}
		refusals = append(refusals, body)
	}
	for _, b := range refusals[1:] {
		if b != refusals[0] {
			t.Errorf("refusals differ: %q vs %q", b, refusals[0])
		}
	}
	for _, why := range []string{"wrong token", "no token", "is not cp1's", "no such node"} {
		if !strings.Contains(e.log.String(), why) {
			t.Errorf("log lacks the cause %q:\n%s", why, e.log)
		}
	}
	e.stop()
	if want := " GET /config/cp1?mac=" + macInit + "&token= 403 "; !strings.Contains(e.access.String(), want) {
		t.Errorf("access log lacks the missing token as missing, %q:\n%s", want, e.access)
	}
	if want := " GET /config/cp1?mac=" + macInit + "&token=REDACTED 200 "; !strings.Contains(e.access.String(), want) {
		t.Errorf("access log lacks %q:\n%s", want, e.access)
	}
}

func TestInstalledNodes(t *testing.T) {
	e := start(t, inventory(t))
	cp1, w1 := e.node("cp1"), e.node("w1")
	e.report(cp1, `{"phase":"installed","state":"done"}`)
	e.report(w1, `{"phase":"done","state":"done","node":"w1"}`)
	// The init node boots from its disk and its keys stay here.
	if code, body := e.get(pxe.ScriptPath + "?mac=" + macInit); code != http.StatusOK || body != pxe.LocalBootScript(cp1) {
		t.Errorf("installed init script: %d %s", code, body)
	}
	if code, body := e.get(configPath(cp1, macInit, cp1.Token)); code != http.StatusGone || !strings.Contains(body, "run kiln rearm cp1") {
		t.Errorf("installed init config: %d %s", code, body)
	}
	// A live worker boots from the network every time.
	e.script(macWorker, "w1")
	if code, _ := e.get(configPath(w1, macWorker, w1.Token)); code != http.StatusOK {
		t.Errorf("done worker config: %d", code)
	}
	// An unauthenticated client learns nothing from a retired config.
	if code, _ := e.get(configPath(cp1, macInit, w1.Token)); code != http.StatusForbidden {
		t.Errorf("retired config with a wrong token: %d, want 403", code)
	}
}

// A role default is many machines: what one reports does not stop the
// others.
func TestDefaultMachinesApart(t *testing.T) {
	dir := defaults(t)
	e := start(t, dir, nodeconfig.RoleControlPlane)
	n := e.node("default-control-plane")
	// Two machines on one role default, at their own addresses.
	a, b := "52:54:00:00:40:01", "52:54:00:00:40:02"
	ipA, ipB := "127.0.0.2", "127.0.0.3"
	e.from = ipA
	e.script(a, n.Name)
	e.from = ipB
	e.script(b, n.Name)
	e.from = ipA
	if code, _ := e.get(configPath(n, a, n.Token)); code != http.StatusOK {
		t.Fatalf("config for %s: %d", a, code)
	}
	e.report(n, `{"phase":"installed","state":"done"}`)
	if code, body := e.get(pxe.ScriptPath + "?mac=" + a); body != pxe.LocalBootScript(n) {
		t.Errorf("installed machine's script: %d %s", code, body)
	}
	if code, _ := e.get(configPath(n, a, n.Token)); code != http.StatusGone {
		t.Errorf("installed machine's config: %d, want 410", code)
	}
	// The keys went to a: b waits for the operator.
	e.from = ipB
	e.script(b, n.Name)
	if code, _ := e.get(configPath(n, b, n.Token)); code != http.StatusGone {
		t.Errorf("other machine's config before a re-arm: %d, want 410", code)
	}
	e.arm(n.Name, "", 0)
	if code, _ := e.get(configPath(n, b, n.Token)); code != http.StatusOK {
		t.Errorf("other machine's config after a re-arm: %d", code)
	}
	// Re-arming the entry leaves a installed; naming its MAC does not.
	e.from = ipA
	if _, body := e.get(pxe.ScriptPath + "?mac=" + a); body != pxe.LocalBootScript(n) {
		t.Errorf("installed machine's script after a re-arm of its entry:\n%s", body)
	}
	e.arm(n.Name, a, 1)
	if _, body := e.get(pxe.ScriptPath + "?mac=" + a); body == pxe.LocalBootScript(n) {
		t.Errorf("re-armed machine %s still boots its disk", a)
	}
	if code, _ := e.get(configPath(n, a, n.Token)); code != http.StatusOK {
		t.Errorf("re-armed machine's config: %d", code)
	}
	e.report(n, `{"phase":"installed","state":"done"}`)
	// The agent's first report continues the installer's record.
	e.from = ipA
	e.report(n, `{"phase":"kubeadm-join","state":"failed","node":"lab-cp-a","lastError":"etcd unhealthy","attempt":2}`)
	e.stop()

	e = start(t, dir)
	e.from = ipB
	e.script(b, n.Name)
	e.from = ipA
	if code, body := e.get(pxe.ScriptPath + "?mac=" + a); body != pxe.LocalBootScript(n) {
		t.Errorf("after a restart, installed machine's script: %d %s", code, body)
	}
	var got serve.NodeStatus
	for _, ns := range e.status().Nodes {
		if ns.Name == n.Name {
			got = ns
		}
	}
	if len(got.Assigned) != 2 || len(got.Reports) != 1 {
		t.Fatalf("status of %s: %+v", n.Name, got)
	}
	if r := got.Reports[0]; r.Host != "lab-cp-a" || r.From != ipA || r.Phase != "kubeadm-join" || r.State != "failed" || r.LastError != "etcd unhealthy" || !r.ConfigRetired {
		t.Errorf("report: %+v", r)
	}
}

func TestAssets(t *testing.T) {
	e := start(t, inventory(t))
	initramfs := e.m.Assets[1]
	want, err := os.ReadFile(filepath.Join(e.dir, "assets", initramfs.File))
	if err != nil {
		t.Fatal(err)
	}
	p := pxe.AssetPath + initramfs.File
	code, body, h := e.do(http.MethodGet, p, nil)
	if code != http.StatusOK || body != string(want) || h.Get("Content-Type") != "application/octet-stream" || h.Get("Last-Modified") == "" {
		t.Fatalf("GET %s: %d, %d bytes, %v", p, code, len(body), h)
	}
	code, body, h = e.do(http.MethodGet, p, nil, "Range", "bytes=1000-1999")
	if code != http.StatusPartialContent || body != string(want[1000:2000]) || h.Get("Content-Range") != fmt.Sprintf("bytes 1000-1999/%d", servetest.Initramfs) {
		t.Errorf("range: %d, %d bytes, %v", code, len(body), h)
	}
	code, _, h = e.do(http.MethodGet, p, nil, "If-Modified-Since", h.Get("Last-Modified"))
	if code != http.StatusNotModified {
		t.Errorf("If-Modified-Since: %d, want 304", code)
	}
	code, body, h = e.do(http.MethodHead, p, nil)
	if code != http.StatusOK || body != "" || h.Get("Content-Length") != fmt.Sprint(servetest.Initramfs) {
		t.Errorf("HEAD: %d %q %v", code, body, h)
	}
	if code, _, _ := e.do(http.MethodPut, p, nil); code != http.StatusMethodNotAllowed {
		t.Errorf("PUT: %d, want 405", code)
	}
}

func TestNothingElseIsServed(t *testing.T) {
	e := start(t, inventory(t))
	if err := os.MkdirAll(filepath.Join(e.dir, pxe.StateDir), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(e.dir, pxe.StateDir, "assignments.json"), []byte("{}"), 0o600)
	kernel := e.m.Assets[0].File
	for _, p := range []string{
		"/", "/assets", "/assets/", "/assets/../bundle.json", "/assets/%2e%2e/bundle.json",
		"/assets/..%2fbundle.json", "/assets%2f" + kernel, "/assets/%2F" + kernel, "/assets/" + kernel + "/",
		"/assets/./" + kernel, "/assets//" + kernel, "/bundle.json", "//bundle.json", "/configs/cp1.ign",
		"/state/assignments.json", "/boot.ipxe/x", "/statusx",
	} {
		if code, body := e.get(p); code != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404 (%.60q)", p, code, body)
		}
	}
}

func TestReportsAndStatus(t *testing.T) {
	dir := inventory(t)
	e := start(t, dir)
	w1 := e.node("w1")
	if code, _, _ := e.do(http.MethodPost, pxe.ReportPath+"w1?key=wrong", []byte(`{}`)); code != http.StatusForbidden {
		t.Errorf("bad key: %d, want 403", code)
	}
	if code, _, _ := e.do(http.MethodPost, pxe.ReportPath+"nobody?key="+w1.ReportKey, []byte(`{}`)); code != http.StatusForbidden {
		t.Errorf("unknown node: %d, want 403", code)
	}
	big := `{"phase":"x","lastError":"` + strings.Repeat("a", 64<<10) + `"}`
	if code, _, _ := e.do(http.MethodPost, pxe.ReportPath+"w1?key="+w1.ReportKey, []byte(big)); code != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized report: %d, want 413", code)
	}
	if code, _, _ := e.do(http.MethodPost, pxe.ReportPath+"w1?key="+w1.ReportKey, []byte(`not json`)); code != http.StatusBadRequest {
		t.Errorf("not JSON: %d, want 400", code)
	}
	if code, _ := e.get(pxe.ReportPath + "w1?key=" + w1.ReportKey); code != http.StatusMethodNotAllowed {
		t.Errorf("GET report: %d, want 405", code)
	}
	e.report(w1, `{"node":"w1","role":"worker","cluster":"lab","phase":"kubeadm-join","state":"retrying","attempt":3,"lastError":"token expired","permanent":true,"updated":"2026-01-02T03:04:05Z","tokenTimeLeft":"0s"}`)

	for _, h := range [][]string{nil, {"Authorization", "Bearer wrong"}, {"Authorization", e.m.StatusToken}} {
		if code, _, _ := e.do(http.MethodGet, pxe.StatusPath, nil, h...); code != http.StatusUnauthorized {
			t.Errorf("status with %v: %d, want 401", h, code)
		}
	}
	if code, _, _ := e.do(http.MethodPost, pxe.ReportPath+"w1", []byte(`{}`)); code != http.StatusForbidden {
		t.Errorf("no key: %d, want 403", code)
	}
	for _, why := range []string{"w1\" from 127.0.0.1:", ": unknown node or wrong key", ": no key", ": no status token (Authorization: Bearer)", ": a wrong status token"} {
		if !strings.Contains(e.log.String(), why) {
			t.Errorf("log lacks %q:\n%s", why, e.log)
		}
	}
	check := func(st serve.Status) {
		t.Helper()
		if st.Cluster != "lab" || len(st.Nodes) != len(e.m.Nodes) {
			t.Fatalf("status: %+v", st)
		}
		for _, n := range st.Nodes {
			if n.Name == "w1" && (n.MAC != macWorker || n.Mode != pxe.ModeLive || len(n.Reports) != 1 ||
				n.Reports[0].Phase != "kubeadm-join" || n.Reports[0].LastError != "token expired" || !n.Reports[0].Permanent ||
				n.Reports[0].SecondsSinceReport < 0 || n.Reports[0].SecondsSinceReport > 60) {
				t.Errorf("w1: %+v", n)
			}
			if n.Name == "cp1" && len(n.Reports) != 0 {
				t.Errorf("cp1 has reports: %+v", n)
			}
		}
	}
	check(e.status())

	// Written within the debounce delay, without a shutdown.
	reports := filepath.Join(dir, pxe.StateDir, "reports.json")
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(reports); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("reports.json not written")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if fi, _ := os.Stat(reports); fi.Mode().Perm() != 0o600 {
		t.Errorf("reports.json mode %v", fi.Mode())
	}
	e.stop()
	if want := " POST /report/w1?key=REDACTED 204 "; !strings.Contains(e.access.String(), want) {
		t.Errorf("access log lacks %q:\n%s", want, e.access)
	}
	check(start(t, dir).status())
}

// Serve returns when its context ends and writes the reports.
func TestServeShutdown(t *testing.T) {
	dir := inventory(t)
	srv, err := serve.New(serve.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	w1, _ := srv.Manifest().Node("w1")
	resp, err := http.Post("http://"+ln.Addr().String()+pxe.ReportPath+"w1?key="+w1.ReportKey, "application/json", strings.NewReader(`{"phase":"done","state":"done"}`))
	if err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("report: %v %v", err, resp)
	}
	resp.Body.Close()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, pxe.StateDir, "reports.json"))
	if err != nil || !strings.Contains(string(data), `"phase": "done"`) {
		t.Fatalf("reports after shutdown: %v\n%s", err, data)
	}
}

// Behind one address (a NAT or proxy), a role default's machines are told
// apart by the MAC their installer names.
func TestDefaultMachinesBehindOneAddress(t *testing.T) {
	e := start(t, defaults(t), nodeconfig.RoleControlPlane)
	n := e.node("default-control-plane")
	a, b := "52:54:00:00:50:01", "52:54:00:00:50:02"
	for _, mac := range []string{a, b} {
		e.script(mac, n.Name)
		if code, _ := e.get(configPath(n, mac, n.Token)); code != http.StatusOK {
			t.Fatalf("config for %s: %d", mac, code)
		}
		e.arm(n.Name, "", 0)
	}
	installed := []byte(`{"phase":"installed","state":"done"}`)
	if code, body, _ := e.do(http.MethodPost, pxe.ReportPath+n.Name+"?key="+n.ReportKey+"&mac=52-54-00-00-50-01", installed); code != http.StatusNoContent {
		t.Fatalf("installer report: %d %s", code, body)
	}
	if _, body := e.get(pxe.ScriptPath + "?mac=" + a); body != pxe.LocalBootScript(n) {
		t.Errorf("installed machine %s is not sent to its disk:\n%s", a, body)
	}
	if code, _ := e.get(configPath(n, a, n.Token)); code != http.StatusGone {
		t.Errorf("installed machine's config: %d, want 410", code)
	}
	e.script(b, n.Name)
	if code, _ := e.get(configPath(n, b, n.Token)); code != http.StatusOK {
		t.Errorf("the other machine at the same address lost its config: %d", code)
	}
	// A report naming a MAC that is not the entry's is refused.
	if code, _, _ := e.do(http.MethodPost, pxe.ReportPath+n.Name+"?key="+n.ReportKey+"&mac=52-54-00-00-50-99", installed); code != http.StatusForbidden {
		t.Errorf("report naming a foreign MAC: %d, want 403", code)
	}
	e.arm(n.Name, "", 0)
	if code, _ := e.get(configPath(n, b, n.Token)); code != http.StatusOK {
		t.Errorf("a report naming a foreign MAC retired %s: %d", b, code)
	}
	if !strings.Contains(e.log.String(), "MAC 52:54:00:00:50:99 is not default-control-plane's") {
		t.Errorf("the foreign MAC was not logged:\n%s", e.log.String())
	}
	// Re-arming one machine leaves the other installed one at its disk.
	if code, body, _ := e.do(http.MethodPost, pxe.ReportPath+n.Name+"?key="+n.ReportKey+"&mac="+b, installed); code != http.StatusNoContent {
		t.Fatalf("installer report of %s: %d %s", b, code, body)
	}
	e.arm(n.Name, a, 1)
	if _, body := e.get(pxe.ScriptPath + "?mac=" + b); body != pxe.LocalBootScript(n) {
		t.Errorf("re-arming %s sent %s at the same address back to its installer:\n%s", a, b, body)
	}
}

// A key-carrying config is used up by a delivery only: a HEAD, a failed
// save or a missing file leave it armed.
func TestArmingSpentOnlyByADelivery(t *testing.T) {
	dir := inventory(t)
	e := start(t, dir)
	cp1 := e.node("cp1")
	p := configPath(cp1, macInit, cp1.Token)
	for range 2 {
		if code, _, _ := e.do(http.MethodHead, p, nil); code != http.StatusOK {
			t.Fatalf("HEAD: %d", code)
		}
	}
	// configs.json cannot be replaced while a folder is in its place.
	state := filepath.Join(dir, pxe.StateDir, "configs.json")
	if err := os.MkdirAll(filepath.Join(state, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if code, body := e.get(p); code != http.StatusInternalServerError {
		t.Fatalf("GET with the state unwritable: %d %s", code, body)
	}
	os.RemoveAll(state)
	config := filepath.Join(dir, cp1.Config)
	if err := os.Rename(config, config+".away"); err != nil {
		t.Fatal(err)
	}
	if code, body := e.get(p); code != http.StatusInternalServerError {
		t.Fatalf("GET with the config missing: %d %s", code, body)
	}
	os.Rename(config+".away", config)
	if code, _ := e.get(p); code != http.StatusOK {
		t.Fatalf("first delivery: %d, want 200", code)
	}
	if code, _ := e.get(p); code != http.StatusGone {
		t.Fatalf("second delivery: %d, want 410", code)
	}
	if st := e.status(); st.Nodes[0].Name != "cp1" || st.Nodes[0].Config.Fetches != 1 {
		t.Errorf("status counts %+v, want one delivery", st.Nodes[0].Config)
	}
}

// A re-arm is on disk when it is answered: a server killed right after
// still serves the installed machine its installer.
func TestArmIsDurable(t *testing.T) {
	dir := inventory(t)
	e := start(t, dir)
	cp1 := e.node("cp1")
	e.report(cp1, `{"phase":"installed","state":"done"}`)
	if err := e.srv.Flush(); err != nil {
		t.Fatal(err)
	}
	e.arm("cp1", "", 1)
	// Read the state as a new server would, without closing this one.
	data, err := os.ReadFile(filepath.Join(dir, pxe.StateDir, "reports.json"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(data), `"retired": true`) {
		t.Errorf("reports.json after a re-arm still holds a retired record:\n%s", data)
	}
}

// A flood of bad requests from one address does not fill the server's
// log; another machine's refusals are still logged.
func TestRefusalsLoggedBoundedPerAddress(t *testing.T) {
	e := start(t, inventory(t))
	cp1 := e.node("cp1")
	for range 100 {
		if code, _ := e.get(configPath(cp1, macInit, "wrong")); code != http.StatusForbidden {
			t.Fatalf("wrong token: %d", code)
		}
	}
	e.from = "127.0.0.2"
	e.get(configPath(cp1, macInit, "wrong"))
	lines := strings.Count(e.log.String(), "refused config \"cp1\" to 127.0.0.1:")
	if lines != 20 || !strings.Contains(e.log.String(), "no more lines about this address this minute") {
		t.Errorf("%d refusals of 127.0.0.1 logged, want 20 and a note:\n%s", lines, e.log)
	}
	if !strings.Contains(e.log.String(), "refused config \"cp1\" to 127.0.0.2:") {
		t.Errorf("the other address's refusal was not logged")
	}
}

// A pool of control-plane,worker gives the control plane's role default
// to one machine per arming; the next machines become workers, not
// control planes that would only get 410.
func TestPoolFallsThroughSpentKeys(t *testing.T) {
	e := start(t, defaults(t), nodeconfig.RoleControlPlane, nodeconfig.RoleWorker)
	cp := e.node("default-control-plane")
	e.script("52:54:00:00:60:01", cp.Name)
	if code, _ := e.get(configPath(cp, "52:54:00:00:60:01", cp.Token)); code != http.StatusOK {
		t.Fatalf("first machine's config: %d", code)
	}
	e.script("52:54:00:00:60:02", "default-worker")
	e.arm(cp.Name, "", 0)
	e.script("52:54:00:00:60:03", cp.Name)
}
