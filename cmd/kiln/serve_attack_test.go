package main

// Attacks on a real kiln serve (the command, its listener and its limits)
// by a stranger on the provisioning network. Each test names the attack
// and what it did before it was closed.

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/pxe"
	"github.com/kilnproject/kiln/imagebuild/serve"
	"github.com/kilnproject/kiln/imagebuild/serve/servetest"
)

// get sends one request and drains the answer.
func (p *serveProc) get(t *testing.T, method, path string, header ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, p.server+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// Before: a token sent where it does not belong (as a MAC, in the path, to
// another endpoint) was logged in clear, six lines for one set of
// requests. After: no secret of the bundle reaches either log, whatever
// the request looks like.
func TestAttackSecretsInLogs(t *testing.T) {
	dir, m := pxeBundle(t)
	accessLog := filepath.Join(t.TempDir(), "access.log")
	p := startServe(t, "--bundle", dir, "--access-log", accessLog, "--pool", "worker")
	cp1, _ := m.Node("cp1")
	w1, _ := m.Node("w1")
	secrets := map[string]string{"cp1 token": cp1.Token, "w1 report key": w1.ReportKey, "status token": m.StatusToken}
	for _, r := range [][]string{
		{"GET", pxe.ScriptPath + "?mac=" + cp1.Token},
		{"GET", pxe.ScriptPath + "?mac=" + strings.ToUpper(cp1.Token)},
		{"GET", pxe.ConfigPath + "cp1/" + cp1.Token},
		{"GET", pxe.ConfigPath + cp1.Token},
		{"GET", pxe.ConfigPath + "cp1?mac=" + cp1.Token + "&token=" + cp1.Token},
		{"GET", pxe.ConfigPath + "cp1?token=" + cp1.Token + ";mac=52-54-00-00-00-01"},
		{"GET", pxe.ConfigPath + "cp1%2F" + cp1.Token},
		{"POST", pxe.ReportPath + w1.ReportKey},
		{"POST", pxe.ReportPath + "w1/" + w1.ReportKey},
		{"GET", pxe.StatusPath + "?token=" + m.StatusToken},
		{"GET", "/" + m.StatusToken},
		{"GET", pxe.StatusPath, "Authorization", m.StatusToken},
		{"GET", pxe.AssetPath + w1.ReportKey},
	} {
		if code, _ := p.get(t, r[0], r[1], r[2:]...); code < 400 {
			t.Errorf("%s %s: %d, want a refusal", r[0], r[1], code)
		}
	}
	p.stop(t)
	logged, err := os.ReadFile(accessLog)
	if err != nil {
		t.Fatal(err)
	}
	all := string(logged) + p.out.String() + p.errOut.String()
	if strings.Count(string(logged), "\n") < 12 {
		t.Fatalf("access log has too few lines to judge:\n%s", logged)
	}
	for what, secret := range secrets {
		for _, line := range strings.Split(all, "\n") {
			if strings.Contains(strings.ToLower(line), secret) {
				t.Errorf("%s logged: %s", what, line)
			}
		}
	}
}

// post sends a report from 127.0.0.1.
func (p *serveProc) post(t *testing.T, path, body string) int {
	t.Helper()
	return p.postFrom(t, "127.0.0.1", path, body)
}

// postFrom sends a report from a loopback address of its own: a machine
// of its own to the server.
func (p *serveProc) postFrom(t *testing.T, from, path, body string) int {
	t.Helper()
	c, err := p.dialFrom(t, from)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req, err := http.NewRequest(http.MethodPost, p.server+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Close = true
	if err := req.Write(c); err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// configURL is what a node's script points Ignition at.
func configURL(n *pxe.Node, mac string) string {
	return pxe.ConfigPath + n.Name + "?mac=" + mac + "&token=" + n.Token
}

// Before: anyone holding a role default's report key (it is on every live
// worker's /proc/cmdline) filled the report table (8192 records), after
// which an installed control plane's report was answered 204 and dropped,
// so its config with the cluster keys stayed on offer; 1500 reports made
// the state file 92 MB. After: reports on a role default never displace
// another entry's, a live worker's reports (which decide nothing) give
// way to new ones, records that gate what a machine is served are capped
// per address and never dropped, a report that is not kept is answered
// 503, and records are bounded.
func TestAttackReportFlood(t *testing.T) {
	dir, m := pxeBundle(t)
	p := startServe(t, "--bundle", dir, "--pool", "worker")
	cp1, _ := m.Node("cp1")
	worker, _ := m.Node("default-worker")
	flood := strings.Repeat("x", 60<<10)
	report := func(n *pxe.Node, from, host, phase string) int {
		return p.postFrom(t, from, pxe.ReportPath+n.Name+"?key="+n.ReportKey,
			fmt.Sprintf(`{"node":%q,"phase":%q,"state":"done","lastError":%q}`, host, phase, flood))
	}
	// Invented live workers, from many addresses, in progress or done:
	// the oldest give way, none is refused.
	sent := 2*serve.MaxReports + 10
	for i := range sent {
		phase := "kubeadm-join"
		if i%2 == 1 {
			phase = "done"
		}
		from := fmt.Sprintf("127.1.%d.%d", i/serve.MaxReportsPerClient/250, i/serve.MaxReportsPerClient%250+1)
		if code := report(worker, from, fmt.Sprintf("ghost-%d", i), phase); code != http.StatusNoContent {
			t.Fatalf("report %d: %d", i, code)
		}
	}
	// A real worker that reports now is kept.
	if code := report(worker, "127.0.0.9", "real-worker", "done"); code != http.StatusNoContent {
		t.Errorf("a real worker's report after the flood: %d, want 204", code)
	}
	// The inventory's control plane is untouched by all of it.
	if code := p.post(t, pxe.ReportPath+"cp1?key="+cp1.ReportKey+"&mac="+cp1.MAC, `{"phase":"installed","state":"done"}`); code != http.StatusNoContent {
		t.Fatalf("cp1's installed report: %d", code)
	}
	if code, _ := p.get(t, "GET", configURL(cp1, cp1.MAC)); code != http.StatusGone {
		t.Errorf("cp1's config after it installed: %d, want 410", code)
	}
	p.stop(t)
	fi, err := os.Stat(filepath.Join(dir, pxe.StateDir, "reports.json"))
	if err != nil {
		t.Fatal(err)
	}
	if limit := int64(serve.MaxReports+len(m.Nodes)) * 3 << 10; fi.Size() > limit {
		t.Errorf("reports.json is %d bytes after the flood, more than %d", fi.Size(), limit)
	}
	t.Logf("reports.json after %d reports of 60 KiB: %.1f MiB", sent+2, float64(fi.Size())/(1<<20))

	// On a control plane's role default, "joined" gates its keys: those
	// records are never dropped, and one address holds at most
	// MaxReportsPerClient of them.
	dir, m = servetest.NewBundle(t,
		pxe.Node{Name: "cp1", Role: nodeconfig.RoleInit, MAC: "52:54:00:00:00:01"},
		pxe.Node{Name: "default-control-plane", Role: nodeconfig.RoleControlPlane, Default: true},
	)
	p = startServe(t, "--bundle", dir, "--pool", "control-plane")
	cp, _ := m.Node("default-control-plane")
	for i := range serve.MaxReportsPerClient {
		if code := report(cp, "127.0.0.2", fmt.Sprintf("forged-%d", i), "done"); code != http.StatusNoContent {
			t.Fatalf("done report %d: %d", i, code)
		}
	}
	if code := report(cp, "127.0.0.2", "one-more", "done"); code != http.StatusServiceUnavailable {
		t.Errorf("a report past the address's cap: %d, want 503", code)
	}
	if code := report(cp, "127.0.0.2", "forged-7", "done"); code != http.StatusNoContent {
		t.Errorf("a kept machine's next report: %d, want 204", code)
	}
	if code := report(cp, "127.0.0.3", "real-cp", "done"); code != http.StatusNoContent {
		t.Errorf("another machine's report: %d, want 204", code)
	}
	p.stop(t)
	var rs struct{ Reports []struct{ Host string } }
	data, err := os.ReadFile(filepath.Join(dir, pxe.StateDir, "reports.json"))
	if err == nil {
		err = json.Unmarshal(data, &rs)
	}
	if err != nil || len(rs.Reports) != serve.MaxReportsPerClient+1 {
		t.Errorf("reports.json holds %d records (%v), want %d", len(rs.Reports), err, serve.MaxReportsPerClient+1)
	}
}

// stolenConfig does what a stranger on the provisioning network can: ask
// for the script of a MAC, and fetch the config it points at.
func (p *serveProc) stolenConfig(t *testing.T, mac string) (int, string) {
	t.Helper()
	code, script := p.get(t, "GET", pxe.ScriptPath+"?mac="+mac)
	url := regexp.MustCompile(`/config/[^ ]+token=[0-9a-f]+`).FindString(script)
	if code != http.StatusOK || url == "" {
		t.Fatalf("script of %s: %d %s", mac, code, script)
	}
	return p.get(t, "GET", url)
}

// Before: anyone naming a control plane's MAC got its config with every
// cluster key, as often as asked, and with --pool control-plane any
// invented MAC did. After: a key-carrying config is handed out once per
// arming; kiln status says who took it, and kiln rearm allows one more.
func TestAttackKeysHandedOutOnce(t *testing.T) {
	dir, _ := servetest.NewBundle(t,
		pxe.Node{Name: "cp1", Role: nodeconfig.RoleInit, MAC: "52:54:00:00:00:01"},
		pxe.Node{Name: "default-control-plane", Role: nodeconfig.RoleControlPlane, Default: true},
		pxe.Node{Name: "default-worker", Role: nodeconfig.RoleWorker, Default: true},
	)
	p := startServe(t, "--bundle", dir, "--pool", "control-plane")
	if code, _ := p.stolenConfig(t, "52:54:00:00:00:01"); code != http.StatusOK {
		t.Fatalf("first fetch of cp1: %d", code) // the first to ask still wins
	}
	for range 3 {
		if code, body := p.stolenConfig(t, "52:54:00:00:00:01"); code != http.StatusGone || !strings.Contains(body, "kiln rearm cp1") {
			t.Errorf("cp1 fetched again: %d %s", code, body)
		}
	}
	if code, _ := p.stolenConfig(t, "02:00:00:00:00:01"); code != http.StatusOK {
		t.Fatalf("first pool machine: %d", code)
	}
	// The next one gets no entry at all: the pool's only role is spent.
	if code, _ := p.get(t, "GET", pxe.ScriptPath+"?mac=02:00:00:00:00:02"); code != http.StatusNotFound {
		t.Errorf("second invented MAC after the control plane's keys were taken: %d, want 404", code)
	}

	// The operator sees it: who took which keys, and when.
	r := kiln(t, "status", "--bundle", dir, "--server", p.server, "-o", "json")
	r.expect(t, 0)
	var st serve.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatal(err)
	}
	taken := map[string]string{}
	for _, n := range st.Nodes {
		if n.Config.Taken != nil {
			taken[n.Name] = n.Config.Taken.From + " " + n.Config.Taken.MAC
		}
	}
	if taken["cp1"] != "127.0.0.1 52:54:00:00:00:01" || taken["default-control-plane"] != "127.0.0.1 02:00:00:00:00:01" || len(taken) != 2 {
		t.Errorf("status does not say who took the keys: %v", taken)
	}
	r = kiln(t, "status", "--bundle", dir, "--server", p.server)
	if !regexp.MustCompile(`(?m)^cp1 +init +52:54:00:00:00:01 +install +given \d+s ago to 127\.0\.0\.1, 3 refused \(last \d+s ago from 127\.0\.0\.1\) `).MatchString(r.stdout) {
		t.Errorf("status table:\n%s", r.stdout)
	}

	// Re-arming allows exactly one more delivery.
	r = kiln(t, "rearm", "cp1", "--bundle", dir, "--server", p.server)
	r.expect(t, 0)
	if !strings.HasPrefix(r.stdout, "re-armed cp1: ") {
		t.Errorf("kiln rearm printed %q", r.stdout)
	}
	if code, _ := p.stolenConfig(t, "52:54:00:00:00:01"); code != http.StatusOK {
		t.Errorf("cp1 after kiln rearm: %d", code)
	}
	if code, _ := p.stolenConfig(t, "52:54:00:00:00:01"); code != http.StatusGone {
		t.Errorf("cp1 twice after one kiln rearm: %d", code)
	}
	if r := kiln(t, "rearm", "default-worker", "--bundle", dir, "--server", p.server); r.code != 0 || !strings.Contains(r.stdout, "needs no arming") {
		t.Errorf("kiln rearm of a worker entry: %d %q", r.code, r.stdout)
	}
	kiln(t, "rearm", "cp9", "--bundle", dir, "--server", p.server).expect(t, exitInput, `no node "cp9"`)
	kiln(t, "rearm", "cp1", "--mac", "zz", "--bundle", dir, "--server", p.server).expect(t, exitInput, "--mac")
	kiln(t, "rearm", "cp1", "--mac", "52:54:00:00:00:99", "--bundle", dir, "--server", p.server).expect(t, exitInput, "is not cp1's")
	kiln(t, "rearm", "--bundle", dir, "--server", p.server).expect(t, exitInput, "takes 1 argument")
	wrong := filepath.Join(t.TempDir(), "token")
	os.WriteFile(wrong, []byte("not-the-token\n"), 0o600)
	kiln(t, "rearm", "cp1", "--server", p.server, "--token-file", wrong).expect(t, exitInput, "refused the status token")
	if code, _ := p.get(t, "POST", pxe.ArmPath+"cp1"); code != http.StatusUnauthorized {
		t.Errorf("re-arm without the status token: %d, want 401", code)
	}
	if code, _ := p.stolenConfig(t, "52:54:00:00:00:01"); code != http.StatusGone {
		t.Errorf("a refused re-arm armed cp1: %d", code)
	}

	// What was handed out stays handed out across a restart.
	p.stop(t)
	p = startServe(t, "--bundle", dir, "--pool", "control-plane")
	if code, _ := p.stolenConfig(t, "52:54:00:00:00:01"); code != http.StatusGone {
		t.Errorf("cp1 after a restart: %d", code)
	}
}

// dialFrom opens a connection to the server from a loopback address of
// the test's choosing (127.0.0.0/8 is all local), so one test plays many
// machines.
func (p *serveProc) dialFrom(t *testing.T, from string) (net.Conn, error) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	return d.Dial("tcp", strings.TrimPrefix(p.server, "http://"))
}

// quickGet is a GET of path from address from that must be answered
// within limit.
func (p *serveProc) quickGet(t *testing.T, from, path string, limit time.Duration) (int, error) {
	t.Helper()
	c, err := p.dialFrom(t, from)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(limit))
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n", path)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// bigAsset makes the bundle's initramfs 64 MiB (sparse), more than the
// kernel's socket buffers hold, so a client that stops reading stalls
// its download.
func bigAsset(t *testing.T, dir string, m *pxe.Manifest) string {
	t.Helper()
	a, _ := m.Asset(pxe.AssetInitramfs)
	if err := os.Truncate(filepath.Join(dir, "assets", a.File), 64<<20); err != nil {
		t.Fatal(err)
	}
	return pxe.AssetPath + a.File
}

// Before: MaxConns (4096) downloads that one machine started and never
// read blocked accept, and every other machine's /boot.ipxe timed out;
// such a download was kept for hours. After: one address holds at most
// MaxConnsPerClient connections (the rest are closed at once), scripts
// keep coming, and a stalled download is dropped once it falls below
// --min-rate.
func TestAttackIdleDownloads(t *testing.T) {
	dir, m := pxeBundle(t)
	asset := bigAsset(t, dir, m)
	p := startServe(t, "--bundle", dir, "--min-rate", "1024") // a MiB a second
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range serve.MaxConns {
		c, err := p.dialFrom(t, "127.0.0.1")
		if err != nil {
			t.Fatalf("connection %d: %v", len(conns), err)
		}
		conns = append(conns, c)
		// Never read: the server's writes stall once the buffers fill.
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: kiln\r\n\r\n", asset)
	}
	for i, from := range []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"} {
		start := time.Now()
		code, err := p.quickGet(t, from, pxe.EntryPath, 3*time.Second)
		if err != nil || code != http.StatusOK {
			t.Fatalf("machine %d's /boot.ipxe during the flood: %d %v", i, code, err)
		}
		t.Logf("/boot.ipxe from %s during the flood: %s", from, time.Since(start).Round(time.Millisecond))
	}
	// The flooder's own connections beyond its share were closed: count
	// the ones still answering after the stall limit, with a margin.
	time.Sleep(4 * time.Second)
	open := 0
	buf := make([]byte, 1<<20)
	for _, c := range conns {
		for {
			// What the kernel buffered drains at once; then a closed
			// download ends, a held one times out.
			c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			if _, err := c.Read(buf); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					open++
				}
				break
			}
		}
	}
	if open != 0 {
		t.Errorf("%d stalled downloads still held after 4 s at --min-rate 1024", open)
	}
	if !strings.Contains(p.errOut.String(), "closed connections from 127.0.0.1: it holds 64 connections already") {
		t.Errorf("the refusals were not logged:\n%s", p.errOut.String())
	}
}

// Before: with --pool, 4096 invented MACs from one machine took every
// assignment kiln serve keeps, and pool slots with them. After: one
// address gets at most MaxAssignmentsPerClient; other machines are still
// assigned.
func TestAttackMACFlood(t *testing.T) {
	dir, _ := pxeBundle(t)
	p := startServe(t, "--bundle", dir, "--pool", "worker")
	got := 0
	for i := range 200 {
		code, err := p.quickGet(t, "127.0.0.1", fmt.Sprintf("%s?mac=02:00:00:00:%02x:%02x", pxe.ScriptPath, i/256, i%256), 3*time.Second)
		switch {
		case err != nil:
			t.Fatal(err)
		case code == http.StatusOK:
			got++
		case code != http.StatusServiceUnavailable:
			t.Fatalf("invented MAC %d: %d", i, code)
		}
	}
	if got != serve.MaxAssignmentsPerClient {
		t.Errorf("one address got %d assignments, want %d", got, serve.MaxAssignmentsPerClient)
	}
	if code, err := p.quickGet(t, "127.0.0.2", pxe.ScriptPath+"?mac=52:54:00:aa:bb:cc", 3*time.Second); err != nil || code != http.StatusOK {
		t.Errorf("another machine during the flood: %d %v", code, err)
	}
}
