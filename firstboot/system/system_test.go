package system

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRoot(t *testing.T) {
	dir := t.TempDir()
	r := Root(dir)
	if err := r.MkdirAll("/var/lib/kiln", 0o700); err != nil {
		t.Fatal(err)
	}
	if err := r.Replace("/var/lib/kiln/state.json", []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, "var/lib/kiln/state.json"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("%v %v", fi, err)
	}
	if err := r.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("WriteFile created a file: %v", err)
	}
	if err := r.WriteFile("/var/lib/kiln/state.json", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if data, _ := r.ReadFile("/var/lib/kiln/state.json"); string(data) != "x" {
		t.Errorf("read %q", data)
	}
	if entries, _ := r.ReadDir("/var/lib/kiln"); len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
}

func TestDialSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "sock")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	r := Root(dir)
	l, err := net.Listen("unix", filepath.Join(dir, "containerd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.DialSocket(context.Background(), "/containerd.sock"); err != nil {
		t.Errorf("listening socket: %v", err)
	}
	// A socket file nobody listens on, as left by a runtime that died.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Stat(filepath.Join(dir, "containerd.sock")); err != nil {
		t.Fatal(err)
	}
	if err := r.DialSocket(context.Background(), "/containerd.sock"); err == nil {
		t.Error("a stale socket accepted a connection")
	}
	if err := r.DialSocket(context.Background(), "/missing.sock"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing socket: %v", err)
	}
}

func TestPickMAC(t *testing.T) {
	mac := func(s string) net.HardwareAddr { m, _ := net.ParseMAC(s); return m }
	ifs := []net.Interface{
		{Index: 3, Name: "eth1", HardwareAddr: mac("52:54:00:00:00:03")},
		{Index: 1, Name: "lo", Flags: net.FlagLoopback, HardwareAddr: mac("00:00:00:00:00:01")},
		{Index: 2, Name: "wg0"},
		{Index: 4, Name: "eth0", HardwareAddr: mac("52:54:00:AB:00:04")},
		// A bridge created before the NICs were probed.
		{Index: 0, Name: "br0", HardwareAddr: mac("02:42:00:00:00:09")},
	}
	nics := func(name string) bool { return strings.HasPrefix(name, "eth") }
	got, err := PickMAC(ifs, nics)
	if err != nil || got != "525400000003" {
		t.Errorf("%q %v", got, err)
	}
	// Without a physical interface, the first with a MAC address.
	got, err = PickMAC(ifs, func(string) bool { return false })
	if err != nil || got != "024200000009" {
		t.Errorf("no physical interface: %q %v", got, err)
	}
	if _, err := PickMAC(nil, nics); err == nil {
		t.Error("no error without interfaces")
	}
}

func TestReporterNeverBlocks(t *testing.T) {
	release := make(chan struct{})
	got := make(chan string, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b := make([]byte, 16)
		n, _ := r.Body.Read(b)
		got <- string(b[:n])
		<-release
	}))
	defer srv.Close()
	defer close(release)
	rep := NewReporter(srv.URL, time.Minute)
	start := time.Now()
	for _, s := range []string{"1", "2", "3", "4"} {
		rep.Report([]byte(s))
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Report blocked for %s", d)
	}
	if first := <-got; first < "1" || first > "4" {
		t.Errorf("first report %q", first)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	rep.Close(ctx) // the server hangs: Close gives up at the deadline
}

func TestClockSleepStopsOnCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := (Clock{}).Sleep(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Errorf("%v", err)
	}
}
