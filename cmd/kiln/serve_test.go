package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/pxe"
	"github.com/kilnproject/kiln/imagebuild/serve"
	"github.com/kilnproject/kiln/imagebuild/serve/servetest"
	"github.com/kilnproject/kiln/test/testport"
)

func pxeBundle(t *testing.T) (string, *pxe.Manifest) {
	return servetest.NewBundle(t,
		pxe.Node{Name: "cp1", Role: nodeconfig.RoleInit, MAC: "52:54:00:00:00:01"},
		pxe.Node{Name: "w1", Role: nodeconfig.RoleWorker, MAC: "52:54:00:00:00:02"},
		pxe.Node{Name: "default-worker", Role: nodeconfig.RoleWorker, Default: true},
	)
}

// serveProc is kiln serve run as the command line runs it: its real
// listener, limits and signal handling.
type serveProc struct {
	server      string // http://127.0.0.1:PORT
	out, errOut servetest.Buffer
	exit        chan int
	stopped     bool
}

// startServe runs kiln serve with args (and --listen 127.0.0.1:0) and
// waits for the address it prints.
func startServe(t *testing.T, args ...string) *serveProc {
	t.Helper()
	p := &serveProc{exit: make(chan int, 1)}
	go func() {
		p.exit <- run(append([]string{"serve", "--listen", "127.0.0.1:0"}, args...), &p.out, &p.errOut)
	}()
	// The command prints its address once the signal handler is set.
	addr := regexp.MustCompile(`on http://(127\.0\.0\.1:\d+);`)
	for deadline := time.Now().Add(10 * time.Second); p.server == ""; time.Sleep(5 * time.Millisecond) {
		select {
		case code := <-p.exit:
			t.Fatalf("kiln serve exited %d: %s", code, p.errOut.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("kiln serve printed no address:\n%s\n%s", p.out.String(), p.errOut.String())
		}
		if match := addr.FindStringSubmatch(p.out.String()); match != nil {
			p.server = "http://" + match[1]
		}
	}
	t.Cleanup(func() {
		if !p.stopped {
			p.stop(t)
		}
	})
	return p
}

// stop sends SIGTERM, as a service manager does, and expects a clean exit.
func (p *serveProc) stop(t *testing.T) {
	t.Helper()
	p.stopped = true
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-p.exit:
		if code != exitOK {
			t.Fatalf("kiln serve exited %d after SIGTERM: %s", code, p.errOut.String())
		}
	case <-time.After(serve.ShutdownGrace + 5*time.Second):
		t.Fatal("kiln serve did not stop on SIGTERM")
	}
}

// TestServe runs kiln serve as the command line does, reports to it,
// asks kiln status, and stops it with SIGTERM.
func TestServe(t *testing.T) {
	dir, m := pxeBundle(t)
	accessLog := filepath.Join(t.TempDir(), "access.log")
	p := startServe(t, "--bundle", dir, "--access-log", accessLog, "--pool", "worker")
	server, out, errOut := p.server, &p.out, &p.errOut
	if !strings.Contains(out.String(), "nodes use http://10.0.0.5:8080") || !strings.Contains(errOut.String(), "nodes use port 8080") {
		t.Errorf("no server URL or port warning:\n%s\n%s", out.String(), errOut.String())
	}

	w1, _ := m.Node("w1")
	resp, err := http.Post(server+pxe.ReportPath+"w1?key="+w1.ReportKey, "application/json",
		strings.NewReader(`{"node":"w1","phase":"kubeadm-join","state":"retrying","lastError":"connection refused\nretrying","attempt":2}`))
	if err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("report: %v %v", err, resp)
	}
	resp.Body.Close()
	if resp, err = http.Get(server + pxe.ScriptPath + "?mac=52-54-00-00-00-09"); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("pool machine's script: %v %v", err, resp)
	}
	resp.Body.Close()

	r := kiln(t, "status", "--bundle", dir, "--server", server)
	r.expect(t, 0)
	if !regexp.MustCompile(`(?m)^w1 +worker +52:54:00:00:00:02 +live +- +kubeadm-join +retrying +\d+s ago +connection refused retrying$`).MatchString(r.stdout) ||
		!regexp.MustCompile(`(?m)^cp1 +init +52:54:00:00:00:01 +install +armed +- +- +never$`).MatchString(r.stdout) ||
		!regexp.MustCompile(`(?m)^default-worker +worker +52:54:00:00:00:09 +live +- +- +- +never`).MatchString(r.stdout) {
		t.Errorf("status table:\n%s", r.stdout)
	}
	r = kiln(t, "status", "--bundle", dir, "--server", server, "-o", "json")
	r.expect(t, 0)
	var st serve.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || len(st.Nodes) != 3 || st.Nodes[1].Reports[0].LastError != "connection refused\nretrying" {
		t.Errorf("status JSON: %v\n%s", err, r.stdout)
	}
	wrong := filepath.Join(t.TempDir(), "token")
	os.WriteFile(wrong, []byte("not-the-token\n"), 0o600)
	kiln(t, "status", "--server", server, "--token-file", wrong).expect(t, exitInput, "refused the status token")
	right := filepath.Join(t.TempDir(), "token")
	os.WriteFile(right, []byte(m.StatusToken+"\n"), 0o600)
	kiln(t, "status", "--server", server, "--token-file", right).expect(t, 0)

	p.stop(t)
	if !strings.Contains(errOut.String(), "kiln serve: stopped; assignments and reports are saved in") {
		t.Errorf("no word at SIGTERM:\n%s", errOut.String())
	}
	state, err := os.ReadFile(filepath.Join(dir, pxe.StateDir, "reports.json"))
	if err != nil || !strings.Contains(string(state), "kubeadm-join") {
		t.Errorf("reports not saved at shutdown: %v\n%s", err, state)
	}
	logged, err := os.ReadFile(accessLog)
	if err != nil || !strings.Contains(string(logged), "POST /report/w1?key=REDACTED 204") {
		t.Errorf("access log: %v\n%s", err, logged)
	}
	for _, secret := range []string{w1.ReportKey, m.StatusToken} {
		if strings.Contains(string(logged)+out.String()+errOut.String()+r.stdout, secret) {
			t.Errorf("kiln serve or status printed a secret")
		}
	}
}

func TestServeBadInput(t *testing.T) {
	dir, _ := pxeBundle(t)
	kiln(t, "serve").expect(t, exitInput, "--bundle is required")
	kiln(t, "serve", "--bundle", t.TempDir()).expect(t, exitInput, "not a kiln PXE bundle")
	kiln(t, "serve", "--bundle", dir, "--pool", "worker,boss").expect(t, exitInput, "--pool")
	kiln(t, "serve", "--bundle", dir, "--pool", "init").expect(t, exitInput, "pool role init")
	kiln(t, "serve", "--bundle", dir, "--listen", "18080").expect(t, exitInput, "give HOST:PORT, such as :8080")
	kiln(t, "serve", "--bundle", dir, "--min-rate", "0").expect(t, exitInput, "--min-rate 0: give 1 to 8192")
	kiln(t, "serve", "--bundle", dir, "--min-rate", "100000").expect(t, exitInput, "--min-rate 100000")
	if r := kiln(t, "serve", "--help"); strings.Contains(r.stdout, "--secrets") || !strings.Contains(r.stdout, "--min-rate") {
		t.Errorf("serve --help offers flags it does not read:\n%s", r.stdout)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	kiln(t, "serve", "--bundle", dir, "--listen", ln.Addr().String()).expect(t, exitEnvironment, "--listen")
	kiln(t, "serve", "--bundle", dir, "--listen", "127.0.0.1:0", "--tls-proxy").expect(t, exitInput, "--tls-proxy: the bundle's nodes use http://10.0.0.5:8080, plain HTTP")

	// A bundle whose nodes use https:// is refused before kiln serve
	// listens, unless a TLS proxy is said to forward to it.
	manifest := filepath.Join(dir, pxe.ManifestFile)
	data, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(manifest, bytes.Replace(data, []byte(`"http://10.0.0.5:8080"`), []byte(`"https://boot.lab.test"`), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	kiln(t, "serve", "--bundle", dir, "--listen", ln.Addr().String()).
		expect(t, exitInput, "the bundle's nodes use https://boot.lab.test, but kiln serve speaks plain HTTP", "--tls-proxy")
	p := startServe(t, "--bundle", dir, "--tls-proxy")
	if !strings.Contains(p.out.String(), "nodes use https://boot.lab.test") || strings.Contains(p.errOut.String(), "warning") {
		t.Errorf("kiln serve --tls-proxy:\n%s\n%s", p.out.String(), p.errOut.String())
	}
}

func TestStatusErrors(t *testing.T) {
	dir, _ := pxeBundle(t)
	kiln(t, "status").expect(t, exitInput, "--bundle DIR")
	kiln(t, "status", "--bundle", dir, "--token-file", "x").expect(t, exitInput, "one of them")
	kiln(t, "status", "--token-file", filepath.Join(dir, "none")).expect(t, exitInput, "--token-file")
	kiln(t, "status", "--bundle", dir, "--server", "10.0.0.5:8080").expect(t, exitInput, "--server")
	addr, release, err := testport.Refusing()
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	kiln(t, "status", "--bundle", dir, "--server", "http://"+addr).expect(t, exitEnvironment, "cannot reach kiln serve at http://"+addr)
}

func TestStatusTable(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	st := &serve.Status{Time: now, Nodes: []serve.NodeStatus{
		{Name: "w2", Role: nodeconfig.RoleWorker, Mode: pxe.ModeLive},
		{Name: "cp2", Role: nodeconfig.RoleControlPlane, Mode: pxe.ModeInstall,
			Config: serve.ConfigStatus{HoldsKeys: true, Taken: &serve.Fetch{From: "10.0.0.12", At: now.Add(-time.Hour)}, Fetches: 1}},
		{Name: "cp3", Role: nodeconfig.RoleControlPlane, Mode: pxe.ModeInstall, Config: serve.ConfigStatus{HoldsKeys: true}},
		{Name: "cp4", Role: nodeconfig.RoleControlPlane, Mode: pxe.ModeInstall, Config: serve.ConfigStatus{HoldsKeys: true},
			Reports: []serve.Report{{Phase: "done", State: "done", SecondsSinceReport: 7200, ConfigRetired: true}}},
		{Name: "default-worker", Role: nodeconfig.RoleWorker, Mode: pxe.ModeLive, Default: true,
			Config:   serve.ConfigStatus{Fetches: 3, Last: []serve.Fetch{{At: now.Add(-time.Hour)}, {At: now.Add(-5 * time.Minute)}}},
			Assigned: []serve.Assignment{{MAC: "52:54:00:00:00:0a"}, {MAC: "52:54:00:00:00:0b"}},
			Reports: []serve.Report{
				{Host: "lab-worker-a", Phase: "done", State: "done", SecondsSinceReport: 7200},
				{From: "10.0.0.9", Phase: "kubeadm-join", State: "failed", SecondsSinceReport: 90, LastError: strings.Repeat("x", 100)},
			}},
	}}
	got := statusTable(st)
	for _, want := range []string{
		`(?m)^NAME +ROLE +MAC +MODE +CONFIG +PHASE +STATE +LAST-REPORT +LAST-ERROR$`,
		`(?m)^w2 +worker +- +live +- +- +- +never$`,
		`(?m)^default-worker/lab-worker-a +worker +2 machines +live +3 fetched, last 5m ago +done +done +2h ago$`,
		`(?m)^default-worker/10\.0\.0\.9 +worker +2 machines +live +3 fetched, last 5m ago +kubeadm-join +failed +1m ago +x{59}…$`,
		`(?m)^cp2 +control-plane +- +install +given 1h ago to 10\.0\.0\.12 +- +- +never$`,
		`(?m)^cp3 +control-plane +- +install +armed +- +- +never$`,
		`(?m)^cp4 +control-plane +- +install +retired +done +done +2h ago$`,
	} {
		if !regexp.MustCompile(want).MatchString(got) {
			t.Errorf("table lacks %s:\n%s", want, got)
		}
	}
}
