//go:build oracle

package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coreos/ignition/v2/config/v3_4"

	"github.com/kilnproject/kiln/imagebuild/pxe"
	"github.com/kilnproject/kiln/test/testport"
)

// The network-boot oracle: QEMU's iPXE ROM (Debian's ipxe-qemu) is a real
// PXE client, under SeaBIOS and under UEFI (Debian's OVMF). It gets
// slirp's DHCP offer naming kiln serve's entry script on the host's
// loopback (10.0.2.2 inside the VM), chain-loads its own script by MAC, and
// boots the kernel and initramfs kiln serve hands it: Debian's cloud kernel
// with a busybox initramfs that prints a marker and its kernel command
// line, then fetches the config URL it was given. Under UEFI the kernel's
// EFI stub finds the initramfs only through the script's initrd= name.

const (
	knownMAC   = "52:54:00:12:34:56"
	unknownMAC = "52:54:00:99:99:99"
	// pxeTimeout bounds one network boot; measured ~8 s (refusal ~6 s).
	pxeTimeout = 3 * time.Minute
)

// markerInit is the test initramfs's /init: print the marker and the
// command line, bring up the NIC with slirp's fixed address, fetch the
// config URL from the command line and print its sha256.
const markerInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo 1 >/proc/sys/kernel/printk
echo KILN-PXE-MARKER
for m in /lib/modules/*.ko; do insmod "$m" || echo "KILN-FAILED insmod $m"; done
set -f # the command line holds a ?, which must not glob
cmdline=$(cat /proc/cmdline)
echo "KILN-CMDLINE $cmdline"
for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
for a in $cmdline; do case "$a" in ignition.config.url=*) url="${a#ignition.config.url=}";; esac; done
if wget -q -O /config.ign "$url"; then
	echo "KILN-CONFIG-SHA256 $(sha256sum /config.ign | cut -d' ' -f1)"
else
	echo "KILN-FAILED wget $url"
fi
echo KILN-DONE
poweroff -f
`

func TestRealPXEClient(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatal("qemu-system-x86_64 not found: install Debian's qemu-system-x86 and ipxe-qemu (.ci/install-deps)")
	}
	for _, f := range []string{"/usr/lib/ipxe/qemu/efi-virtio.rom", ovmf} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("%s missing: install Debian's ipxe-qemu and ovmf (.ci/install-deps)", f)
		}
	}
	if out, err := exec.Command(filepath.Join(repo, "test", "tools", "qemu-kernels.sh"), "amd64").CombinedOutput(); err != nil {
		t.Fatalf("test/tools/qemu-kernels.sh: %v\n%s", err, out)
	}
	kdir := filepath.Join(toolsDir(), "amd64")
	dir := t.TempDir()
	initrd := filepath.Join(dir, "marker.cpio")
	writeInitramfs(t, initrd, kdir, markerInit, []string{"virtio_pci", "virtio_net"})

	cf := newCluster(t, dir, "flatcar", "kubernetes-sysext")
	appendFile(t, cf, "nodes:\n  - {name: cp-1, role: init, mac: \"52:54:00:00:00:01\"}\n  - {name: w-1, role: worker, mac: \""+knownMAC+"\"}\n")
	port, mbPort := freePort(t), freePort(t)
	bundle := filepath.Join(dir, "bundle")
	kilnOK(t, nil, "-c", cf, "pxe", "--dest", bundle, "--server-url", fmt.Sprintf("http://10.0.2.2:%d", port),
		"--matchbox-url", fmt.Sprintf("http://10.0.2.2:%d", mbPort),
		"--kernel", filepath.Join(kdir, "vmlinuz"), "--initramfs", initrd,
		"--kernel-arg", "console=ttyS0", "--kernel-arg", "panic=-1", "--kernel-arg", "loglevel=4")
	m, err := pxe.ReadManifest(bundle)
	if err != nil {
		t.Fatal(err)
	}
	w1, _ := m.Node("w-1")
	config, _ := os.ReadFile(filepath.Join(bundle, w1.Config))
	accessLog := startServe(t, bundle, port)
	kernel, _ := m.Asset(pxe.AssetKernel)
	initramfs, _ := m.Asset(pxe.AssetInitramfs)
	cmdline := "initrd=marker.cpio flatcar.first_boot=1 console=ttyS0 panic=-1 loglevel=4 ignition.config.url=" + m.ConfigURL(w1, knownMAC)
	for _, fw := range []struct {
		name string
		args []string
		// want: the command line as the kernel sees it (iPXE's EFI
		// loader puts the image's name first), and what the firmware's
		// kernel says.
		cmdline, says string
	}{
		{"bios", nil, cmdline, "Probing EDD"},
		{"efi", []string{"-bios", ovmf}, "vmlinuz " + cmdline, "EFI stub: Loaded initrd from command line option"},
	} {
		t.Run(fw.name, func(t *testing.T) {
			seen := len(readLines(t, accessLog))
			start := time.Now()
			console := pxeBoot(t, port, knownMAC, "KILN-DONE", fw.args...)
			t.Logf("%s PXE boot of %s: %s", fw.name, knownMAC, time.Since(start).Round(100*time.Millisecond))
			for _, want := range []string{fw.says, "KILN-PXE-MARKER", "KILN-CMDLINE " + fw.cmdline + "\n", fmt.Sprintf("KILN-CONFIG-SHA256 %x\n", sha256.Sum256(config)), "KILN-DONE"} {
				if !strings.Contains(console, want) {
					t.Errorf("console lacks %q; console:\n%s", want, console)
				}
			}
			if strings.Contains(console, "KILN-FAILED") {
				t.Errorf("the guest reported a failure; console:\n%s", console)
			}
			expectRequests(t, accessLog, seen, []string{
				"GET /boot.ipxe 200",
				"GET /ipxe?mac=52-54-00-12-34-56 200",
				"GET /assets/" + kernel.File + " 200",
				"GET /assets/" + initramfs.File + " 200",
				"GET /config/w-1?mac=52-54-00-12-34-56&token=REDACTED 200",
			})

			seen = len(readLines(t, accessLog))
			console = pxeBoot(t, port, unknownMAC, "Could not boot", fw.args...)
			if strings.Contains(console, "KILN-PXE-MARKER") || !strings.Contains(console, "not in the cluster's inventory") {
				t.Errorf("a VM with an unknown MAC was not refused; console:\n%s", console)
			}
			expectRequests(t, accessLog, seen, []string{"GET /boot.ipxe 200", "GET /ipxe?mac=52-54-00-99-99-99 404"})
		})
	}

	// The matchbox export, served by the real matchbox: the known MAC
	// boots with w-1's config, any other MAC with the worker default's
	// (the catch-all group). Matchbox re-encodes configs, so the guest's
	// bytes are compared with what matchbox serves the host, and that with
	// the bundle's config as Ignition reads it.
	t.Run("matchbox", func(t *testing.T) {
		startMatchbox(t, bundle, mbPort)
		for mac, node := range map[string]string{knownMAC: "w-1", unknownMAC: "default-worker"} {
			n, _ := m.Node(node)
			hyp := strings.ReplaceAll(mac, ":", "-")
			console := pxeBoot(t, mbPort, mac, "KILN-DONE")
			served := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/ignition?mac=%s", mbPort, hyp))
			want, err := os.ReadFile(filepath.Join(bundle, n.Config))
			if err != nil {
				t.Fatal(err)
			}
			sameIgnition(t, served, want)
			for _, want := range []string{
				"KILN-CMDLINE initrd=marker.cpio flatcar.first_boot=1 console=ttyS0 panic=-1 loglevel=4 ignition.config.url=http://10.0.2.2:" + fmt.Sprint(mbPort) + "/ignition?uuid=",
				"&mac=" + hyp + "\n",
				fmt.Sprintf("KILN-CONFIG-SHA256 %x\n", sha256.Sum256(served)),
			} {
				if !strings.Contains(console, want) {
					t.Errorf("%s via matchbox: console lacks %q; console:\n%s", mac, want, console)
				}
			}
		}
	})
}

// startMatchbox runs the real matchbox (test/tools/build.sh matchbox) on
// the bundle's export and assets until the test ends.
func startMatchbox(t testing.TB, bundle string, port int) {
	t.Helper()
	bin := filepath.Join(filepath.Dir(toolsDir()), "bin", "matchbox")
	cmd := exec.Command(bin, "-address", fmt.Sprintf("127.0.0.1:%d", port),
		"-data-path", filepath.Join(bundle, pxe.MatchboxDir), "-assets-path", filepath.Join(bundle, "assets"))
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("%v: build it with test/tools/build.sh matchbox (make oracle does)", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			c.Close()
			return
		}
		if i > 200 {
			t.Fatalf("matchbox is not listening after 10 s:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func httpGet(t testing.TB, url string) []byte {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v", url, resp.Status, err)
	}
	return body
}

// sameIgnition: both parse as Ignition 3.4 configs, and they are equal.
func sameIgnition(t testing.TB, got, want []byte) {
	t.Helper()
	g, rg, err1 := v3_4.Parse(got)
	w, rw, err2 := v3_4.Parse(want)
	if err1 != nil || err2 != nil || len(rg.Entries)+len(rw.Entries) > 0 {
		t.Fatalf("parse: %v %v %s %s", err1, err2, rg, rw)
	}
	if !reflect.DeepEqual(g, w) {
		t.Errorf("matchbox serves a config that differs from the bundle's (%d vs %d bytes)", len(got), len(want))
	}
}

// ovmf is Debian's UEFI firmware for QEMU (package ovmf).
const ovmf = "/usr/share/ovmf/OVMF.fd"

// pxeBoot network-boots a q35 VM (SeaBIOS, or the firmware in args) with a
// virtio NIC of the given MAC from kiln serve on the host's port, and
// returns its serial console once QEMU exits or a line contains stop (QEMU
// is then killed).
func pxeBoot(t testing.TB, port int, mac, stop string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), pxeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
		"-M", "q35", "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
		// Network only; a failed boot reboots at once and -no-reboot ends QEMU.
		"-boot", "order=n,reboot-timeout=0",
		"-netdev", fmt.Sprintf("user,id=n0,bootfile=http://10.0.2.2:%d%s", port, pxe.EntryPath),
		"-device", "virtio-net-pci,netdev=n0,mac="+mac)
	cmd.Args = append(cmd.Args, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var console strings.Builder
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	// iPXE and SeaBIOS end lines with CR and erase with "\b \b".
	sc.Split(func(data []byte, atEOF bool) (int, []byte, error) {
		for i, b := range data {
			if b == '\n' || b == '\r' {
				return i + 1, data[:i], nil
			}
		}
		if atEOF && len(data) > 0 {
			return len(data), data, nil
		}
		return 0, nil, nil
	})
	for sc.Scan() {
		line := strings.ReplaceAll(sc.Text(), "\b \b", "")
		if line == "" {
			continue
		}
		console.WriteString(line + "\n")
		if strings.Contains(line, stop) {
			cmd.Process.Kill()
			break
		}
	}
	cmd.Wait()
	if ctx.Err() != nil {
		t.Fatalf("QEMU did not finish within %s; console:\n%s", pxeTimeout, console.String())
	}
	return console.String()
}

// startServe runs kiln serve on the bundle and stops it with SIGTERM when
// the test ends, expecting a clean exit. It returns the access log's path.
func startServe(t testing.TB, bundle string, port int, args ...string) string {
	t.Helper()
	accessLog := filepath.Join(t.TempDir(), "access.log")
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.Command(filepath.Join(repo, "bin", "kiln"), append([]string{"serve", "--bundle", bundle, "--listen", addr, "--access-log", accessLog}, args...)...)
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("kiln serve did not stop cleanly on SIGTERM: %v\n%s", err, stderr.String())
			}
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Errorf("kiln serve ignored SIGTERM for 30 s\n%s", stderr.String())
		}
	})
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return accessLog
		}
		select {
		case err := <-done:
			t.Fatalf("kiln serve exited: %v\n%s", err, stderr.String())
		case <-time.After(50 * time.Millisecond):
		}
		if i > 200 {
			t.Fatalf("kiln serve is not listening on %s after 10 s\n%s", addr, stderr.String())
		}
	}
}

// expectRequests checks the access log's requests after the first skip
// lines: "METHOD URI STATUS" each, in order, and nothing else.
func expectRequests(t testing.TB, accessLog string, skip int, want []string) {
	t.Helper()
	var got []string
	for _, line := range readLines(t, accessLog)[skip:] {
		// time remote method uri status bytes duration
		if f := strings.Fields(line); len(f) >= 5 {
			got = append(got, strings.Join(f[2:5], " "))
		}
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("requests:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

func readLines(t testing.TB, p string) []string {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) == 0 {
		return nil
	}
	return strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
}

// freePort is a port for a kiln serve the test starts later, that no
// other test's connection takes meanwhile (testport.Unassigned).
func freePort(t testing.TB) int {
	t.Helper()
	addr, err := testport.Unassigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(port)
	return n
}

func appendFile(t testing.TB, p, text string) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(text); err != nil {
		t.Fatal(err)
	}
}

// TestPXEDownloadsVerified: kiln pxe downloads the release's network-boot
// files from a mirror, verified (Flatcar: SHA-512 from each file's .DIGESTS
// and its OpenPGP signature; Fedora CoreOS: the stream's sha256), and the
// bundle's assets are the published bytes; a tampered or wrongly signed
// file is refused (exit 5) and no bundle is written.
func TestPXEDownloadsVerified(t *testing.T) {
	e := setup(t)
	t.Cleanup(func() { e.publish(t, e.flatcarBz2, e.sign(t, e.gnupg, e.flatcarBz2)) })
	env := []string{"SSL_CERT_FILE=" + e.certFile}
	pxeArgs := func(cluster, out string, extra ...string) []string {
		return append([]string{"-c", cluster, "pxe", "--dest", out, "--server-url", "http://10.0.0.5:8080", "--cache-dir", t.TempDir(), "-o", "json"}, extra...)
	}
	flatcarOut := filepath.Join(t.TempDir(), "b")
	kilnOK(t, env, pxeArgs(e.flCluster, flatcarOut, "--mirror", e.srv.URL+"/{channel}", "--insecure-mirror", "--signing-key", e.goodKey)...)
	fcosOut := filepath.Join(t.TempDir(), "b")
	kilnOK(t, env, pxeArgs(e.fcCluster, fcosOut, "--profile", "fcos-x86_64", "--mirror", e.srv.URL, "--insecure-mirror")...)
	for _, b := range []struct{ dir, version string }{{flatcarOut, flatcarVersion}, {fcosOut, "42.1"}} {
		m, err := pxe.ReadManifest(b.dir)
		if err != nil {
			t.Fatal(err)
		}
		if m.OSVersion != b.version || len(m.Assets) < 2 {
			t.Errorf("%s: version %s, assets %v", b.dir, m.OSVersion, m.Assets)
		}
		for _, a := range m.Assets {
			got, _ := os.ReadFile(filepath.Join(b.dir, "assets", a.File))
			if want := pxeFiles[filepath.Base(a.File)]; want == nil || string(got) != string(want) {
				t.Errorf("%s: asset %s is not the published file", b.dir, a.File)
			}
		}
	}

	rel := "/stable/amd64-usr/" + flatcarVersion + "/flatcar_production_pxe.vmlinuz"
	kernel := pxeFiles["flatcar_production_pxe.vmlinuz"]
	tampered := append(bytes.Clone(kernel), '!')
	for _, c := range []struct {
		name        string
		served, sig []byte
		want        string
	}{
		{"tampered", tampered, e.sign(t, e.gnupg, tampered), "corrupt"},
		{"wrongly signed", kernel, e.sign(t, e.wrongSigner, kernel), "signature does not verify"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e.publishFlatcarFile(t, rel, kernel, c.served, c.sig)
			out := filepath.Join(t.TempDir(), "b")
			r := kilnRun(t, env, pxeArgs(e.flCluster, out, "--mirror", e.srv.URL+"/{channel}", "--insecure-mirror", "--signing-key", e.goodKey)...)
			if r.code != 5 || !strings.Contains(r.stderr, c.want) {
				t.Fatalf("exit %d, want 5 mentioning %q\n%s", r.code, c.want, r.stderr)
			}
			if _, err := os.Stat(out); err == nil {
				t.Error("a refused download still wrote a bundle")
			}
		})
	}
}
