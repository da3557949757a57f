//go:build oracle

package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// BenchmarkServeVsNginx loads kiln serve and Debian's nginx, one after the
// other in the same run, on loopback with the same files: 1000 concurrent
// clients each fetch their iPXE script and then the 64 MiB initramfs.
// It prints throughput and p99 latencies, and kiln's as ratios of nginx's.
//
//	go test -tags oracle -run '^$' -bench ServeVsNginx -benchtime 1x ./test/image/
func BenchmarkServeVsNginx(b *testing.B) {
	const clients, workers = 1000, 4
	if _, err := exec.LookPath("nginx"); err != nil {
		b.Fatal("nginx not found: install Debian's nginx (.ci/install-deps)")
	}
	dir := b.TempDir()
	cf := newCluster(b, dir, "flatcar", "kubernetes-sysext")
	var nodes strings.Builder
	nodes.WriteString("nodes:\n")
	for i := 1; i <= workers; i++ {
		fmt.Fprintf(&nodes, "  - {name: w-%d, role: worker, mac: \"52:54:00:00:01:%02x\"}\n", i, i)
	}
	appendFile(b, cf, nodes.String())
	kernel, initramfs := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initramfs.img")
	writeRandom(b, kernel, 1<<20)
	writeRandom(b, initramfs, 64<<20)
	kilnPort, nginxPort := freePort(b), freePort(b)
	bundle := filepath.Join(dir, "bundle")
	kilnOK(b, nil, "-c", cf, "pxe", "--dest", bundle, "--server-url", fmt.Sprintf("http://127.0.0.1:%d", kilnPort), "--kernel", kernel, "--initramfs", initramfs)
	m, err := pxe.ReadManifest(bundle)
	if err != nil {
		b.Fatal(err)
	}
	asset, _ := m.Asset(pxe.AssetInitramfs)

	// nginx serves the same bytes: the scripts kiln pxe wrote (identical
	// to what kiln serve renders) and the bundle's assets.
	www := filepath.Join(dir, "nginx", "www")
	os.MkdirAll(filepath.Join(www, "ipxe"), 0o755)
	os.Symlink(filepath.Join(bundle, "assets"), filepath.Join(www, "assets"))
	var kilnTargets, nginxTargets []target
	for i := 1; i <= workers; i++ {
		n, _ := m.Node(fmt.Sprintf("w-%d", i))
		script, err := os.ReadFile(filepath.Join(bundle, "ipxe", n.Name+".ipxe"))
		if err != nil {
			b.Fatal(err)
		}
		os.WriteFile(filepath.Join(www, "ipxe", n.Name+".ipxe"), script, 0o644)
		kilnTargets = append(kilnTargets, target{fmt.Sprintf("http://127.0.0.1:%d%s?mac=%s", kilnPort, pxe.ScriptPath, n.MAC), script})
		nginxTargets = append(nginxTargets, target{fmt.Sprintf("http://127.0.0.1:%d/ipxe/%s.ipxe", nginxPort, n.Name), script})
	}
	startServe(b, bundle, kilnPort)
	startNginx(b, filepath.Join(dir, "nginx"), nginxPort)

	b.ResetTimer()
	for b.Loop() {
		k := load(b, clients, kilnTargets, fmt.Sprintf("http://127.0.0.1:%d%s%s", kilnPort, pxe.AssetPath, asset.File), asset.Size)
		n := load(b, clients, nginxTargets, fmt.Sprintf("http://127.0.0.1:%d/assets/%s", nginxPort, asset.File), asset.Size)
		fmt.Printf("PXE load: %d clients, each its script then the %d MiB initramfs, on loopback\n", clients, asset.Size>>20)
		fmt.Printf("  kiln serve: %s\n  nginx:      %s\n", k, n)
		fmt.Printf("  kiln/nginx: throughput %.2f, p99 script latency %.2f, p99 initramfs latency %.2f\n",
			k.throughput()/n.throughput(), k.p99(k.script)/n.p99(n.script), k.p99(k.initramfs)/n.p99(n.initramfs))
		b.ReportMetric(k.throughput()/n.throughput(), "throughput-ratio")
		b.ReportMetric(k.p99(k.script)/n.p99(n.script), "p99-script-ratio")
		b.ReportMetric(k.p99(k.initramfs)/n.p99(n.initramfs), "p99-initramfs-ratio")
	}
}

type target struct {
	url  string
	want []byte
}

type loadResult struct {
	wall              time.Duration
	bytes             int64
	script, initramfs []time.Duration
}

func (r loadResult) throughput() float64 { return float64(r.bytes) / r.wall.Seconds() }

func (r loadResult) p99(d []time.Duration) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)*99/100].Seconds()
}

func (r loadResult) String() string {
	return fmt.Sprintf("%.2f GiB in %.1f s = %.2f GiB/s; p99 script %.1f ms, p99 initramfs %.2f s",
		float64(r.bytes)/(1<<30), r.wall.Seconds(), r.throughput()/(1<<30), r.p99(r.script)*1000, r.p99(r.initramfs))
}

// load runs the clients at once, each a machine of its own: its own
// connection from its own loopback address (127.1.X.Y; kiln serve limits
// connections per client address, as it should for machines): each GETs
// a script (checked byte for byte), then the initramfs (length checked).
func load(b *testing.B, clients int, scripts []target, initramfsURL string, size int64) loadResult {
	b.Helper()
	res := loadResult{script: make([]time.Duration, clients), initramfs: make([]time.Duration, clients)}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		errs  []error
		total int64
	)
	get := func(client *http.Client, url string) ([]byte, int64, error) {
		resp, err := client.Get(url)
		if err != nil {
			return nil, 0, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, 0, fmt.Errorf("%s: %s", url, resp.Status)
		}
		if resp.ContentLength >= 0 && resp.ContentLength < 1<<20 {
			body, err := io.ReadAll(resp.Body)
			return body, int64(len(body)), err
		}
		n, err := io.Copy(io.Discard, resp.Body)
		return nil, n, err
	}
	start := time.Now()
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 1, byte(i/250), byte(i%250+1))}}
			tr := &http.Transport{DialContext: d.DialContext, DisableCompression: true}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr, Timeout: 10 * time.Minute}
			tg := scripts[i%len(scripts)]
			t0 := time.Now()
			body, n1, err := get(client, tg.url)
			res.script[i] = time.Since(t0)
			if err == nil && !bytes.Equal(body, tg.want) {
				err = fmt.Errorf("%s: wrong script", tg.url)
			}
			var n2 int64
			if err == nil {
				t0 = time.Now()
				_, n2, err = get(client, initramfsURL)
				res.initramfs[i] = time.Since(t0)
				if err == nil && n2 != size {
					err = fmt.Errorf("initramfs: %d of %d bytes", n2, size)
				}
			}
			mu.Lock()
			total += n1 + n2
			if err != nil {
				errs = append(errs, err)
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.wall, res.bytes = time.Since(start), total
	if len(errs) > 0 {
		b.Fatalf("%d of %d clients failed, first: %v", len(errs), clients, errs[0])
	}
	return res
}

func writeRandom(t testing.TB, p string, n int) {
	t.Helper()
	data := make([]byte, n)
	rand.Read(data)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// startNginx runs Debian's nginx in the foreground on prefix/www with
// sendfile, two workers (one per core) and an access log, as kiln serve
// has; it is stopped when the benchmark ends.
func startNginx(t testing.TB, prefix string, port int) {
	t.Helper()
	conf := fmt.Sprintf(`daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 8192;
user root;
error_log stderr warn;
pid nginx.pid;
events { worker_connections 4096; }
http {
	access_log access.log;
	client_body_temp_path body_temp;
	proxy_temp_path proxy_temp;
	fastcgi_temp_path fastcgi_temp;
	uwsgi_temp_path uwsgi_temp;
	scgi_temp_path scgi_temp;
	default_type application/octet-stream;
	sendfile on;
	tcp_nopush on;
	server {
		listen 127.0.0.1:%d;
		root www;
		disable_symlinks off;
	}
}
`, port)
	if err := os.WriteFile(filepath.Join(prefix, "nginx.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, "nginx", "-e", "stderr", "-p", prefix, "-c", filepath.Join(prefix, "nginx.conf"))
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGQUIT) }
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); cmd.Wait() })
	for i := 0; ; i++ {
		if resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/ipxe/w-1.ipxe", port)); err == nil {
			resp.Body.Close()
			return
		}
		if i > 200 {
			t.Fatalf("nginx did not start:\n%s", stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
