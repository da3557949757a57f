package main

// Provisioning as a network-booted Flatcar machine is provisioned (issue
// 15): every node gets its Ignition config and its air-gapped payload from
// a real `kiln serve`, and the real Ignition binary applies them to a
// per-node root directory.
//
// The flow, per scenario and per node:
//
//  1. airgapCluster: the cluster kilnInit made gets its control planes'
//     MACs in the inventory (kiln serve finds a machine by the MAC it
//     boots from), `airgap: true`, and every image pinned and pulled from
//     an OCI image layout (`kiln images pin/pull --from`) into a kiln
//     cache.
//  2. startServe: `kiln pxe` builds the bundle (stand-in Flatcar PXE
//     kernel and initramfs: nothing boots them; the Kubernetes sysext
//     stand-in kilnInit pinned; per role images-ROLE.tar from the image
//     cache), init and control-plane booting live (see startServe), then a
//     real `kiln serve --pool worker` on the bridge address.
//  3. provision: inside the node's network namespace (so kiln serve sees
//     the node's own address) and a private mount namespace, what iPXE and
//     Flatcar's initramfs would do: GET /boot.ipxe, chain to
//     /ipxe?mac=<the node's MAC>, GET the kernel and initramfs it names,
//     take the kernel command line (with ignition.config.url=) from the
//     script and bind it over /proc/cmdline, then run the real Ignition
//     (-platform metal, -root ROOT) through the stages of a Flatcar first
//     boot: fetch-offline (signals neednet: the config URL is http), fetch
//     (the cmdline provider fetches the config from kiln serve with the
//     node's MAC and token), kargs, disks, mount (no-ops: kiln's configs
//     have no kernel arguments, disks or filesystems, which provision
//     checks before running them against this host), files (every file,
//     directory, link and unit; http sources, the payload included, are
//     fetched from kiln serve and checked against their hashes) and umount.
//
// `rehearsal provision check` runs all of it on a network of its own
// (bridge kph0, namespaces kph-*, 10.213.78.0/24) and checks every root
// against the config kiln serve served.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"sigs.k8s.io/yaml"
)

const (
	// servePort is where kiln serve listens on the bridge address.
	servePort = 8088
	// serveProcName is kiln serve's entry in env.procs.
	serveProcName = "kiln-serve"
	// The stand-in boot files carry Flatcar's file names: the iPXE
	// script's initrd= argument is the initramfs's base name.
	pxeKernelName    = "flatcar_production_pxe.vmlinuz"
	pxeInitramfsName = "flatcar_production_pxe_image.cpio.gz"
	// provisionTimeout bounds one node's provisioning.
	provisionTimeout = 5 * time.Minute
)

// ignitionStages are the stages Flatcar's initramfs runs on a first boot,
// in order (ignition-fetch-offline, -fetch, -kargs, -disks, -mount,
// -files, -umount).
var ignitionStages = []string{"fetch-offline", "fetch", "kargs", "disks", "mount", "files", "umount"}

// --- the cluster ---------------------------------------------------------

// airgapCluster makes a kilnInit cluster network-bootable and air-gapped:
// each inventory node (cp1..3) gets its MAC (nodes[].mac: kiln serve
// finds a machine by the MAC it boots from; workers boot as the worker
// role default), `airgap: true` is set, and every image the cluster runs
// is pinned and pulled (amd64) from the OCI image layout into cache (a
// kiln --cache-dir; blobs it already holds are not copied again). The
// layout must name each image by its full reference (annotation
// io.containerd.image.name or org.opencontainers.image.ref.name). Safe to
// call twice.
func airgapCluster(kiln, clusterDir, layout, cache string, inventory []nodeSpec) error {
	cf := filepath.Join(clusterDir, "cluster.yaml")
	data, err := os.ReadFile(cf)
	if err != nil {
		return err
	}
	text := string(data)
	for _, n := range inventory {
		if text, err = setInventoryMAC(text, n.name, n.mac()); err != nil {
			return fmt.Errorf("%s: %w", cf, err)
		}
	}
	if !strings.Contains("\n"+text, "\nairgap:") {
		text = strings.TrimSuffix(text, "\n") + "\nairgap: true\n"
	}
	if err := os.WriteFile(cf, []byte(text), 0o644); err != nil {
		return err
	}
	for _, args := range [][]string{
		{"images", "pin", "--from", layout, "--cache-dir", cache},
		{"images", "pull", "--from", layout, "--arch", "amd64", "--cache-dir", cache},
		{"validate"},
	} {
		if out, err := exec.Command(kiln, append([]string{"-c", cf}, args...)...).CombinedOutput(); err != nil {
			return fmt.Errorf("kiln %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// setInventoryMAC adds `mac: MAC` to the inventory entry `- name: NAME`
// of a cluster file's text (kiln init writes no MACs), keeping the rest as
// it is; an entry that has a MAC already keeps it if it is the same.
func setInventoryMAC(text, name, mac string) (string, error) {
	lines := strings.Split(text, "\n")
	for i, l := range lines {
		trimmed := strings.TrimSpace(l)
		if trimmed != "- name: "+name {
			continue
		}
		indent := strings.Repeat(" ", len(l)-len(strings.TrimLeft(l, " "))+2)
		for j := i + 1; j < len(lines) && strings.HasPrefix(lines[j], indent); j++ {
			if v, ok := strings.CutPrefix(lines[j], indent+"mac:"); ok {
				if strings.TrimSpace(v) != mac {
					return "", fmt.Errorf("node %s has MAC %s already, not %s", name, strings.TrimSpace(v), mac)
				}
				return text, nil
			}
		}
		lines = slices.Insert(lines, i+1, indent+"mac: "+mac)
		return strings.Join(lines, "\n"), nil
	}
	return "", fmt.Errorf("no inventory node %s", name)
}

// standInLayout writes an OCI image layout at dir holding a stand-in for
// every image `kiln images` lists for the cluster: a single-layer
// linux/amd64 image whose one file names it, annotated with its
// reference. For checks where no real images are at hand: nothing runs
// them.
//
// Each layer carries mib MiB of incompressible bytes besides (0: none), to
// measure a payload of real images' size.
func standInLayout(kiln, clusterFile, dir string, mib int) error {
	out, err := exec.Command(kiln, "-c", clusterFile, "images", "-o", "json").Output()
	if err != nil {
		return fmt.Errorf("kiln images: %w", err)
	}
	var list []struct {
		Name      string `json:"name"`
		Reference string `json:"reference"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return fmt.Errorf("kiln images -o json: %w", err)
	}
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return err
	}
	blob := func(data []byte) (string, int) {
		sum := fmt.Sprintf("%x", sha256.Sum256(data))
		_ = os.WriteFile(filepath.Join(blobs, sum), data, 0o644)
		return "sha256:" + sum, len(data)
	}
	type desc struct {
		MediaType   string            `json:"mediaType"`
		Digest      string            `json:"digest"`
		Size        int               `json:"size"`
		Annotations map[string]string `json:"annotations,omitempty"`
	}
	var index []desc
	for _, im := range list {
		var layer bytes.Buffer
		tw := tar.NewWriter(&layer)
		body := []byte("rehearsal stand-in for " + im.Reference + "\n")
		_ = tw.WriteHeader(&tar.Header{Name: "rehearsal-stand-in", Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)})
		_, _ = tw.Write(body)
		if mib > 0 {
			seed := sha256.Sum256([]byte(im.Reference))
			filler := make([]byte, mib<<20)
			_, _ = rand.NewChaCha8(seed).Read(filler)
			_ = tw.WriteHeader(&tar.Header{Name: "rehearsal-filler", Mode: 0o644, Size: int64(len(filler)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)})
			_, _ = tw.Write(filler)
		}
		_ = tw.Close()
		var gz bytes.Buffer
		// Stored, not compressed: the filler would not shrink anyway.
		zw, _ := gzip.NewWriterLevel(&gz, gzip.NoCompression)
		_, _ = zw.Write(layer.Bytes())
		_ = zw.Close()
		layerDigest, layerSize := blob(gz.Bytes())
		config, _ := json.Marshal(map[string]any{
			"architecture": "amd64", "os": "linux",
			"config": map[string]any{"Entrypoint": []string{"/rehearsal-stand-in"}},
			"rootfs": map[string]any{"type": "layers", "diff_ids": []string{fmt.Sprintf("sha256:%x", sha256.Sum256(layer.Bytes()))}},
		})
		configDigest, configSize := blob(config)
		manifest, _ := json.Marshal(map[string]any{
			"schemaVersion": 2,
			"mediaType":     "application/vnd.oci.image.manifest.v1+json",
			"config":        desc{MediaType: "application/vnd.oci.image.config.v1+json", Digest: configDigest, Size: configSize},
			"layers":        []desc{{MediaType: "application/vnd.oci.image.layer.v1.tar+gzip", Digest: layerDigest, Size: layerSize}},
		})
		d, size := blob(manifest)
		index = append(index, desc{MediaType: "application/vnd.oci.image.manifest.v1+json", Digest: d, Size: size,
			Annotations: map[string]string{"io.containerd.image.name": im.Reference, "org.opencontainers.image.ref.name": im.Reference}})
	}
	idx, _ := json.MarshalIndent(map[string]any{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": index}, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "index.json"), idx, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644)
}

// --- kiln serve ----------------------------------------------------------

// serveSpec says what startServe builds and serves.
type serveSpec struct {
	kiln    string // bin/kiln
	cluster string // cluster dir (kilnInit): cluster.yaml, secrets/, kubernetes-sysext.stand-in
	// dir gets the bundle (dir/pxe), the stand-in boot files (dir/boot),
	// serve.log (kiln serve's notices) and serve-access.log (a line per
	// request: time, client address, method, URL with secrets redacted,
	// status, bytes).
	dir    string
	listen string // the bridge address nodes reach, such as 10.213.77.1
	port   int
	cache  string // kiln --cache-dir that airgapCluster pulled the images into
	// pool is kiln serve's --pool: the roles machines the inventory does
	// not name may get (default: worker, for the workers; add
	// control-plane for a control plane outside the inventory).
	pool []string
}

// serveProc is a running kiln serve.
type serveProc struct {
	kiln string // bin/kiln, for kiln rearm
	cmd  *exec.Cmd
	done chan struct{} // closed once the process exited
	// URL is the server URL baked into the bundle (http://LISTEN:PORT).
	URL       string
	Bundle    string
	Log       string
	AccessLog string
	// BuildTook is how long kiln pxe took.
	BuildTook time.Duration
	Manifest  bundleManifest
}

// bundleManifest is what the rehearsal reads of kiln pxe's bundle.json.
type bundleManifest struct {
	Cluster     string `json:"cluster"`
	ServerURL   string `json:"serverURL"`
	StatusToken string `json:"statusToken"`
	Assets      []struct {
		Kind   string `json:"kind"`
		File   string `json:"file"`
		SHA256 string `json:"sha256"`
		Size   int64  `json:"size"`
	} `json:"assets"`
	Nodes []struct {
		Name      string `json:"name"`
		Role      string `json:"role"`
		MAC       string `json:"mac"`
		Default   bool   `json:"default"`
		Mode      string `json:"mode"`
		ReportKey string `json:"reportKey"`
		Config    string `json:"config"`
	} `json:"nodes"`
}

// startServe builds the scenario's bundle and starts kiln serve on it:
//
//	kiln -c CLUSTER/cluster.yaml pxe --dest DIR/pxe --server-url http://LISTEN:PORT
//	    --kernel DIR/boot/flatcar_production_pxe.vmlinuz --initramfs DIR/boot/flatcar_production_pxe_image.cpio.gz
//	    --mode init=live --mode control-plane=live
//	    --file kubernetes-sysext=CLUSTER/kubernetes-sysext.stand-in --cache-dir CACHE
//	kiln serve --bundle DIR/pxe --listen LISTEN:PORT --pool worker --access-log DIR/serve-access.log
//
// Another cluster (a foreign one, a copy with another token) gets its own
// kiln serve: another dir and port (provisionFrom then names its URL).
//
// Every role boots live: an install-mode node is served an installer
// config (flatcar-install to a disk, then a reboot into the node's own
// config), which needs the real Flatcar image and a disk, and an
// air-gapped bundle with install-mode nodes refuses the stand-in kernel.
// kiln's default for init and control-plane is install (etcd survives a
// reboot); live is the same node config minus the installer round trip.
// --pool worker hands the worker role default to machines the inventory
// does not name (the workers); control planes are found by their
// inventory MACs (airgapCluster). kiln serve runs in its own process group
// with PDEATHSIG; stop() ends it with SIGTERM (it saves its state).
func startServe(s serveSpec) (*serveProc, error) {
	url := fmt.Sprintf("http://%s:%d", s.listen, s.port)
	p := &serveProc{URL: url, Bundle: filepath.Join(s.dir, "pxe"), Log: filepath.Join(s.dir, "serve.log"),
		AccessLog: filepath.Join(s.dir, "serve-access.log"), done: make(chan struct{})}
	boot := filepath.Join(s.dir, "boot")
	if err := os.MkdirAll(boot, 0o755); err != nil {
		return nil, err
	}
	kernel, initramfs := filepath.Join(boot, pxeKernelName), filepath.Join(boot, pxeInitramfsName)
	for _, f := range []string{kernel, initramfs} {
		if err := os.WriteFile(f, []byte("rehearsal: stand-in for Flatcar's "+filepath.Base(f)+"\n"), 0o644); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	args := []string{"-c", filepath.Join(s.cluster, "cluster.yaml"), "pxe", "--dest", p.Bundle, "--server-url", url,
		"--kernel", kernel, "--initramfs", initramfs, "--mode", "init=live", "--mode", "control-plane=live",
		"--file", "kubernetes-sysext=" + filepath.Join(s.cluster, "kubernetes-sysext.stand-in"), "--cache-dir", s.cache}
	if _, err := os.Stat(p.Bundle); err == nil {
		args = append(args, "--force")
	}
	if out, err := exec.Command(s.kiln, args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("kiln pxe: %v: %s", err, out)
	}
	p.BuildTook = time.Since(start)
	data, err := os.ReadFile(filepath.Join(p.Bundle, "bundle.json"))
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(data, &p.Manifest); err != nil {
		return nil, fmt.Errorf("bundle.json: %w", err)
	}
	logf, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	if len(s.pool) == 0 {
		s.pool = []string{"worker"}
	}
	p.kiln = s.kiln
	p.cmd = exec.Command(s.kiln, "serve", "--bundle", p.Bundle, "--listen", fmt.Sprintf("%s:%d", s.listen, s.port),
		"--pool", strings.Join(s.pool, ","), "--access-log", p.AccessLog)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	// Ready once it answers the entry script.
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil}}
	for deadline := time.Now().Add(20 * time.Second); ; {
		resp, err := client.Get(url + "/boot.ipxe")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p, nil
			}
		}
		select {
		case <-p.done:
			log, _ := os.ReadFile(p.Log)
			return nil, fmt.Errorf("kiln serve exited: %s", log)
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("kiln serve does not answer %s/boot.ipxe: %v", url, err)
		}
	}
}

// stop ends kiln serve with SIGTERM (it finishes running requests and
// writes state/reports.json), SIGKILL after 15 s.
func (p *serveProc) stop() error {
	if p == nil || p.cmd == nil || p.cmd.Process == nil {
		return nil
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		return errors.New("kiln serve did not stop on SIGTERM within 15s")
	}
	return nil
}

// status is kiln serve's GET /status (the bundle's statusToken as bearer),
// what `kiln status` shows: every node's last report.
func (p *serveProc) status() ([]byte, error) {
	req, _ := http.NewRequest(http.MethodGet, p.URL+"/status", nil)
	req.Header.Set("Authorization", "Bearer "+p.Manifest.StatusToken)
	resp, err := (&http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET /status: %s: %s", resp.Status, body)
	}
	return body, err
}

// rearm runs kiln rearm NODE on the server.
func (p *serveProc) rearm(node string) error {
	out, err := exec.Command(p.kiln, "rearm", node, "--bundle", p.Bundle, "--server", p.URL).CombinedOutput()
	if err != nil {
		return fmt.Errorf("kiln rearm %s: %v: %s", node, err, out)
	}
	return nil
}

// startServe is startServe for the scenario: airgapCluster with the image
// layout (the kiln cache under the work dir is shared by scenarios), then
// the bundle in e.dir/pxe and kiln serve on http://10.213.77.1:8088,
// tracked as env.procs["kiln-serve"] (teardown kills it). The caller
// keeps the *serveProc (stop, status, Manifest).
func (e *env) startServe(layout string) (*serveProc, error) {
	cache := filepath.Join(e.o.work, "kiln-cache")
	start := time.Now()
	if err := airgapCluster(e.o.kiln, e.cluster, layout, cache, []nodeSpec{cp1, cp2, cp3}); err != nil {
		return nil, err
	}
	e.logf("cluster air-gapped, images pinned and pulled from %s in %.1fs", layout, time.Since(start).Seconds())
	p, err := startServe(serveSpec{kiln: e.o.kiln, cluster: e.cluster, dir: e.dir, listen: hostIP, port: servePort, cache: cache})
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.procs[serveProcName] = p.cmd
	e.mu.Unlock()
	e.recordPIDs()
	e.logf("kiln serve on %s (bundle built in %.1fs)", p.URL, p.BuildTook.Seconds())
	return p, nil
}

// --- provisioning a node -------------------------------------------------

// bootSpec is one machine to provision.
type bootSpec struct {
	name     string // for messages
	netns    string // its network namespace, /run/netns/NAME
	mac      string // the MAC it boots from
	server   string // kiln serve's URL (what DHCP would name)
	ignition string // the Ignition binary
	root     string // Ignition's -root
	// work keeps the boot's record, outside the root: boot.ipxe,
	// node.ipxe, cmdline, ignition.json (Ignition's config cache: it
	// holds the node's secrets, mode 0640 in a 0700 folder), state,
	// neednet, ignition.log, provision.log. Wiped first: a machine's /run
	// starts empty.
	work string
	self string // this binary
}

// bootResult is what a provision saw.
type bootResult struct {
	EntryURL    string        `json:"entryURL"`
	ScriptURL   string        `json:"scriptURL"`
	KernelURL   string        `json:"kernelURL"`
	KernelBytes int64         `json:"kernelBytes"`
	InitrdURLs  []string      `json:"initrdURLs"`
	InitrdBytes int64         `json:"initrdBytes"`
	Cmdline     string        `json:"cmdline"` // the config token redacted
	ConfigURL   string        `json:"configURL"`
	NeedNet     bool          `json:"neednet"`
	Stages      []stageResult `json:"stages"`
	Seconds     float64       `json:"seconds"`
}

type stageResult struct {
	Name    string  `json:"name"`
	Seconds float64 `json:"seconds"`
}

// errBootsDisk: kiln serve answered with the script that leaves iPXE
// (an install-mode node that reported installed).
var errBootsDisk = errors.New("kiln serve says this machine boots from its disk")

// provision boots node n as a PXE machine: in its network namespace
// /run/netns/krh-NAME (the veth up with its address: e.powerOn first),
// from kiln serve on http://10.213.77.1:8088 (e.startServe first), with
// the real Ignition (e.o.tools/ignition, test/tools/build.sh ignition)
// writing into root, which should be empty: a live node starts every boot
// from an empty root, and Ignition refuses to replace a file whose config
// entry has no overwrite. The record of each boot goes to
// e.dir/provision/NAME/boot-N (N = 1, 2, ...; see bootSpec.work).
func (e *env) provision(n nodeSpec, root string) error {
	return e.provisionFrom(n, root, fmt.Sprintf("http://%s:%d", hostIP, servePort))
}

// provisionFrom is provision from the kiln serve at server (a second one,
// for a node of another cluster).
func (e *env) provisionFrom(n nodeSpec, root, server string) error {
	start := time.Now()
	dir := filepath.Join(e.dir, "provision", n.name)
	boots, _ := filepath.Glob(filepath.Join(dir, "boot-*"))
	res, err := provisionNode(bootSpec{
		name: n.name, netns: "/run/netns/" + nsPrefix + n.name, mac: n.mac(),
		server: server, ignition: filepath.Join(e.o.tools, "ignition"),
		root: root, work: filepath.Join(dir, fmt.Sprintf("boot-%d", len(boots)+1)), self: e.self,
	})
	if err != nil {
		return fmt.Errorf("provision %s: %w", n.name, err)
	}
	e.logf("provisioned %s from %s in %.1fs (%s)", n.name, res.ConfigURL, time.Since(start).Seconds(), stageSummary(res))
	return nil
}

func stageSummary(r *bootResult) string {
	var parts []string
	for _, s := range r.Stages {
		parts = append(parts, fmt.Sprintf("%s %.2fs", s.Name, s.Seconds))
	}
	return strings.Join(parts, ", ")
}

// provisionNode runs `rehearsal provision node` in the machine's network
// namespace and a private mount namespace:
//
//	nsenter --net=NETNS -- unshare --mount --propagation private -- SELF provision node ...
//
// and returns what it saw. Its log is work/provision.log.
func provisionNode(b bootSpec) (*bootResult, error) {
	if _, err := os.Stat(b.ignition); err != nil {
		return nil, fmt.Errorf("%w: run test/tools/build.sh ignition", err)
	}
	if err := os.RemoveAll(b.work); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(b.work, 0o700); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(b.root, 0o755); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), provisionTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", "--net="+b.netns, "--", "unshare", "--mount", "--propagation", "private", "--",
		b.self, "provision", "node", "--server", b.server, "--mac", b.mac, "--ignition", b.ignition, "--root", b.root, "--work", b.work)
	logf, err := os.OpenFile(filepath.Join(b.work, "provision.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, logf
	cmd.Env = noProxyEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Run(); err != nil {
		tail, _ := os.ReadFile(filepath.Join(b.work, "provision.log"))
		if len(tail) > 3000 {
			tail = tail[len(tail)-3000:]
		}
		return nil, fmt.Errorf("%v (log %s):\n%s", err, filepath.Join(b.work, "provision.log"), tail)
	}
	var res bootResult
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		return nil, fmt.Errorf("provision node output: %w: %q", err, stdout.String())
	}
	return &res, nil
}

// noProxyEnv is this process's environment without proxy settings: the
// nodes talk to kiln serve directly.
func noProxyEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !strings.HasSuffix(strings.ToLower(k), "_proxy") {
			env = append(env, kv)
		}
	}
	return env
}

// provisionMain is `rehearsal provision check|node|report`.
func provisionMain(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: rehearsal provision check [flags] | node [flags] | report [flags]")
	}
	switch args[0] {
	case "check":
		return provisionCheck(args[1:])
	case "node":
		return provisionInNode(args[1:])
	case "report":
		return reportInNode(args[1:])
	default:
		return fmt.Errorf("provision %q: use check, node or report", args[0])
	}
}

// provisionInNode is the machine's side, already in its network namespace
// and a private mount namespace: iPXE's requests, then Ignition with the
// script's kernel command line over /proc/cmdline. Progress goes to
// stderr, the bootResult as JSON to stdout.
func provisionInNode(args []string) error {
	var server, mac, ign, root, work string
	fl := flag.NewFlagSet("provision node", flag.ContinueOnError)
	fl.StringVar(&server, "server", "", "kiln serve URL")
	fl.StringVar(&mac, "mac", "", "the MAC this machine boots from")
	fl.StringVar(&ign, "ignition", "", "Ignition binary")
	fl.StringVar(&root, "root", "", "Ignition's root")
	fl.StringVar(&work, "work", "", "folder for the boot's record")
	if err := fl.Parse(args); err != nil {
		return err
	}
	start := time.Now()
	logf := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "%s %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, a...))
	}
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{Proxy: nil}}
	get := func(u string, keep string) (int64, []byte, error) {
		resp, err := client.Get(u)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		var body []byte
		var n int64
		if keep != "" {
			body, err = io.ReadAll(resp.Body)
			n = int64(len(body))
		} else {
			n, err = io.Copy(io.Discard, resp.Body)
		}
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("GET %s: %s: %s", redact(u), resp.Status, bytes.TrimSpace(body))
		}
		if err == nil && keep != "" {
			err = os.WriteFile(filepath.Join(work, keep), body, 0o600)
		}
		logf("GET %s: %d bytes (%v)", redact(u), n, err)
		return n, body, err
	}
	res := bootResult{EntryURL: strings.TrimSuffix(server, "/") + "/boot.ipxe"}
	// iPXE: DHCP's boot file, which chains to this NIC's own script.
	_, entry, err := get(res.EntryURL, "boot.ipxe")
	if err != nil {
		return err
	}
	chain := ""
	for _, l := range strings.Split(string(entry), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "chain" {
			for _, a := range f[1:] {
				if !strings.HasPrefix(a, "--") {
					chain = a
					break
				}
			}
			break
		}
	}
	if !strings.Contains(chain, "${netX/mac:hexhyp}") {
		return fmt.Errorf("boot.ipxe chains to %q, not to a script by ${netX/mac:hexhyp}", chain)
	}
	ref, err := url.Parse(strings.ReplaceAll(chain, "${netX/mac:hexhyp}", strings.ReplaceAll(mac, ":", "-")))
	if err != nil {
		return err
	}
	base, _ := url.Parse(res.EntryURL)
	res.ScriptURL = base.ResolveReference(ref).String()
	_, script, err := get(res.ScriptURL, "node.ipxe")
	if err != nil {
		return err
	}
	var kargs []string
	for _, l := range strings.Split(string(script), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "kernel":
			res.KernelURL, kargs = f[1], f[2:]
		case "initrd":
			res.InitrdURLs = append(res.InitrdURLs, f[1])
		}
	}
	if res.KernelURL == "" {
		if strings.Contains(string(script), "\nexit") {
			return fmt.Errorf("%w: %s", errBootsDisk, bytes.TrimSpace(script))
		}
		return fmt.Errorf("the script names no kernel:\n%s", script)
	}
	if res.KernelBytes, _, err = get(res.KernelURL, ""); err != nil {
		return err
	}
	for _, u := range res.InitrdURLs {
		n, _, err := get(u, "")
		if err != nil {
			return err
		}
		res.InitrdBytes += n
	}
	// The kernel command line is what iPXE passes after the kernel's URL.
	cmdline := strings.Join(kargs, " ")
	for _, a := range kargs {
		if v, ok := strings.CutPrefix(a, "ignition.config.url="); ok {
			res.ConfigURL = redact(v)
		}
	}
	if res.ConfigURL == "" {
		return fmt.Errorf("the kernel command line has no ignition.config.url: %s", cmdline)
	}
	res.Cmdline = redact(cmdline)
	cmdlineFile := filepath.Join(work, "cmdline")
	if err := os.WriteFile(cmdlineFile, []byte(cmdline+"\n"), 0o600); err != nil {
		return err
	}
	// Only this mount namespace (unshare --propagation private) sees it.
	if err := syscall.Mount(cmdlineFile, "/proc/cmdline", "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind the kernel command line over /proc/cmdline: %w", err)
	}
	got, _ := os.ReadFile("/proc/cmdline")
	if strings.TrimSpace(string(got)) != cmdline {
		return fmt.Errorf("/proc/cmdline reads %q after the bind", got)
	}
	logf("kernel command line: %s", res.Cmdline)

	ignLog, err := os.OpenFile(filepath.Join(work, "ignition.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer ignLog.Close()
	cache := filepath.Join(work, "ignition.json")
	sysDir := filepath.Join(work, "system-config")
	if err := os.Mkdir(sysDir, 0o755); err != nil {
		return err
	}
	for _, stage := range ignitionStages {
		if stage == "kargs" {
			// After fetch, the config is in the cache: refuse what would
			// act on this host rather than the node's root.
			if err := hostSafeConfig(cache); err != nil {
				return err
			}
		}
		t := time.Now()
		fmt.Fprintf(ignLog, "=== ignition -stage %s\n", stage)
		cmd := exec.Command(ign, "-platform", "metal", "-stage", stage, "-root", root,
			"-config-cache", cache, "-neednet", filepath.Join(work, "neednet"),
			"-state-file", filepath.Join(work, "state"), "-log-to-stdout")
		cmd.Stdout, cmd.Stderr = ignLog, ignLog
		// No base configs from this host's /usr/lib/ignition.
		cmd.Env = append(noProxyEnv(), "IGNITION_SYSTEM_CONFIG_DIR="+sysDir)
		err := cmd.Run()
		res.Stages = append(res.Stages, stageResult{Name: stage, Seconds: time.Since(t).Seconds()})
		logf("ignition stage %s: %v (%.2fs)", stage, err, time.Since(t).Seconds())
		if err != nil {
			return fmt.Errorf("ignition stage %s: %w (see %s)", stage, err, ignLog.Name())
		}
		if stage == "fetch-offline" {
			// Flatcar's initramfs brings the network up when fetch-offline
			// says it needs it (an http config URL); this namespace has it.
			_, err := os.Stat(filepath.Join(work, "neednet"))
			res.NeedNet = err == nil
		}
	}
	res.Seconds = time.Since(start).Seconds()
	return json.NewEncoder(os.Stdout).Encode(res)
}

// hostSafeConfig refuses a config whose disks, kargs or mount stages
// would act on the machine running the rehearsal (they address devices
// and the boot loader, not -root).
func hostSafeConfig(cache string) error {
	data, err := os.ReadFile(cache)
	if err != nil {
		return fmt.Errorf("Ignition's config cache after fetch: %w", err)
	}
	var c struct {
		KernelArguments struct {
			ShouldExist    []string `json:"shouldExist"`
			ShouldNotExist []string `json:"shouldNotExist"`
		} `json:"kernelArguments"`
		Storage struct {
			Disks       []json.RawMessage `json:"disks"`
			Raid        []json.RawMessage `json:"raid"`
			Filesystems []json.RawMessage `json:"filesystems"`
			Luks        []json.RawMessage `json:"luks"`
		} `json:"storage"`
	}
	if err := json.Unmarshal(data, &c); err != nil {
		return err
	}
	if n := len(c.KernelArguments.ShouldExist) + len(c.KernelArguments.ShouldNotExist) + len(c.Storage.Disks) + len(c.Storage.Raid) + len(c.Storage.Filesystems) + len(c.Storage.Luks); n > 0 {
		return fmt.Errorf("the config has %d kernel argument, disk, RAID, filesystem or LUKS entries: the kargs, disks and mount stages would act on this host, not on the node's root; the rehearsal cannot provision it", n)
	}
	return nil
}

// redact hides tokens and keys in URLs (as kiln serve's access log does).
func redact(s string) string {
	for _, k := range []string{"token=", "key="} {
		for i := 0; ; {
			j := strings.Index(s[i:], k)
			if j < 0 {
				break
			}
			j += i + len(k)
			end := j
			for end < len(s) && s[end] != '&' && s[end] != ' ' {
				end++
			}
			s = s[:j] + "REDACTED" + s[end:]
			i = j
		}
	}
	return s
}

// reportInNode POSTs a status report as the node's agent would, from
// inside its network namespace (started by postReport).
func reportInNode(args []string) error {
	if len(args) > 0 {
		return errors.New("provision report: reads the report URL and, after a newline, the status JSON from stdin")
	}
	in, err := io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	if err != nil {
		return err
	}
	u, body, _ := strings.Cut(string(in), "\n")
	resp, err := (&http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil}}).Post(u, "application/json", strings.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusNoContent {
		return fmt.Errorf("POST %s: %s: %s", redact(u), resp.Status, out)
	}
	return nil
}

// postReport sends the node's status to the reportURL of its node.yaml
// under root, from its network namespace, as its agent would.
func postReport(self, netns, root string, st map[string]any) error {
	m, err := readNodeMeta(root)
	if err != nil {
		return err
	}
	if m.ReportURL == "" {
		return errors.New("node.yaml has no reportURL")
	}
	body, _ := json.Marshal(st)
	// The URL carries the report key: on stdin, never on a command line.
	cmd := exec.Command("nsenter", "--net="+netns, "--", self, "provision", "report")
	cmd.Stdin = strings.NewReader(m.ReportURL + "\n" + string(body))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

// nodeMeta is what the harness reads of a node's /etc/kiln/node.yaml.
type nodeMeta struct {
	Role      string `json:"role"`
	ReportURL string `json:"reportURL"`
}

// readNodeMeta reads root/etc/kiln/node.yaml.
func readNodeMeta(root string) (nodeMeta, error) {
	var m nodeMeta
	data, err := os.ReadFile(filepath.Join(root, "etc/kiln/node.yaml"))
	if err == nil {
		err = yaml.Unmarshal(data, &m)
	}
	return m, err
}

// --- checking a root against its config ----------------------------------

// ignConfig is the part of an Ignition 3.x config the check compares.
type ignConfig struct {
	Ignition struct {
		Version string `json:"version"`
	} `json:"ignition"`
	Passwd struct {
		Users []struct {
			Name string `json:"name"`
		} `json:"users"`
	} `json:"passwd"`
	Storage struct {
		Directories []struct {
			Path string `json:"path"`
			Mode *int   `json:"mode"`
		} `json:"directories"`
		Files []struct {
			Path      string `json:"path"`
			Mode      *int   `json:"mode"`
			Overwrite *bool  `json:"overwrite"`
			Contents  struct {
				Source       string `json:"source"`
				Compression  string `json:"compression"`
				Verification struct {
					Hash string `json:"hash"`
				} `json:"verification"`
			} `json:"contents"`
		} `json:"files"`
		Links []struct {
			Path   string `json:"path"`
			Target string `json:"target"`
			Hard   *bool  `json:"hard"`
		} `json:"links"`
	} `json:"storage"`
	Systemd struct {
		Units []struct {
			Name     string  `json:"name"`
			Enabled  *bool   `json:"enabled"`
			Mask     *bool   `json:"mask"`
			Contents *string `json:"contents"`
			Dropins  []struct {
				Name     string  `json:"name"`
				Contents *string `json:"contents"`
			} `json:"dropins"`
		} `json:"units"`
	} `json:"systemd"`
}

// verifyRoot checks that root holds everything the Ignition config at
// configPath says: every directory and file with its mode (files with
// their bytes: data URLs decoded, fetched sources by their verification
// hash), every link, every unit and drop-in with its contents, and each
// enabled unit in Ignition's preset file. payload maps a payload file name
// to the sha256 bundle.json records for it: every fetched payload file is
// checked against it too. It returns what it checked, and every mismatch.
func verifyRoot(configPath, root string, payload map[string]string) (int, []error) {
	data, err := os.ReadFile(configPath)
	if err != nil {
		return 0, []error{err}
	}
	var c ignConfig
	if err := json.Unmarshal(data, &c); err != nil {
		return 0, []error{fmt.Errorf("%s: %w", configPath, err)}
	}
	var errs []error
	checked := 0
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	for _, d := range c.Storage.Directories {
		checked++
		fi, err := os.Lstat(filepath.Join(root, d.Path))
		switch {
		case err != nil:
			bad("directory %s: %v", d.Path, err)
		case !fi.IsDir():
			bad("directory %s is a %s", d.Path, fi.Mode().Type())
		case fi.Mode().Perm() != mode(d.Mode, 0o755):
			bad("directory %s: mode %o, want %o", d.Path, fi.Mode().Perm(), mode(d.Mode, 0o755))
		}
	}
	for _, f := range c.Storage.Files {
		checked++
		p := filepath.Join(root, f.Path)
		fi, err := os.Lstat(p)
		if err != nil {
			bad("file %s: %v", f.Path, err)
			continue
		}
		if !fi.Mode().IsRegular() {
			bad("file %s is a %s", f.Path, fi.Mode().Type())
			continue
		}
		if fi.Mode().Perm() != mode(f.Mode, 0o644) {
			bad("file %s: mode %o, want %o", f.Path, fi.Mode().Perm(), mode(f.Mode, 0o644))
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && (st.Uid != 0 || st.Gid != 0) {
			bad("file %s: owner %d:%d, want 0:0", f.Path, st.Uid, st.Gid)
		}
		got, err := os.ReadFile(p)
		if err != nil {
			bad("file %s: %v", f.Path, err)
			continue
		}
		src := f.Contents.Source
		switch {
		case strings.HasPrefix(src, "data:"):
			want, err := dataURL(src, f.Contents.Compression)
			if err != nil {
				bad("file %s: its data URL: %v", f.Path, err)
			} else if !bytes.Equal(got, want) {
				bad("file %s: %d bytes differ from the config's %d", f.Path, len(got), len(want))
			}
		case src == "":
			if len(got) != 0 {
				bad("file %s: %d bytes, the config gives none", f.Path, len(got))
			}
		default:
			algo, want, _ := strings.Cut(f.Contents.Verification.Hash, "-")
			var h hash.Hash
			switch algo {
			case "sha256":
				h = sha256.New()
			case "sha512":
				h = sha512.New()
			default:
				bad("file %s: fetched from %s without a verification hash", f.Path, redact(src))
				continue
			}
			h.Write(got)
			if sum := hex.EncodeToString(h.Sum(nil)); sum != want {
				bad("file %s: %s %s, the config pins %s", f.Path, algo, sum, want)
			}
			if strings.Contains(src, "/payload/") {
				sum := fmt.Sprintf("%x", sha256.Sum256(got))
				name := filepath.Base(src)
				if want, ok := payload[name]; !ok {
					bad("file %s: %s is not in the bundle's payload", f.Path, redact(src))
				} else if sum != want {
					bad("file %s: sha256 %s, bundle.json has %s for %s", f.Path, sum, want, name)
				}
			}
		}
	}
	for _, l := range c.Storage.Links {
		checked++
		p := filepath.Join(root, l.Path)
		if l.Hard != nil && *l.Hard {
			a, err1 := os.Stat(p)
			b, err2 := os.Stat(filepath.Join(root, l.Target))
			if err := errors.Join(err1, err2); err != nil || !os.SameFile(a, b) {
				bad("hard link %s -> %s: %v", l.Path, l.Target, err)
			}
			continue
		}
		target, err := os.Readlink(p)
		if err != nil || target != l.Target {
			bad("link %s: %q (%v), want %q", l.Path, target, err, l.Target)
		}
	}
	preset, _ := os.ReadFile(filepath.Join(root, "etc/systemd/system-preset/20-ignition.preset"))
	unitDir := filepath.Join(root, "etc/systemd/system")
	for _, u := range c.Systemd.Units {
		checked++
		if u.Contents != nil {
			got, err := os.ReadFile(filepath.Join(unitDir, u.Name))
			if err != nil || string(got) != *u.Contents {
				bad("unit %s: contents differ (%v)", u.Name, err)
			}
		}
		for _, d := range u.Dropins {
			if d.Contents == nil {
				continue
			}
			got, err := os.ReadFile(filepath.Join(unitDir, u.Name+".d", d.Name))
			if err != nil || string(got) != *d.Contents {
				bad("unit %s drop-in %s: contents differ (%v)", u.Name, d.Name, err)
			}
		}
		if u.Enabled != nil {
			verb := "disable"
			if *u.Enabled {
				verb = "enable"
			}
			if !slices.Contains(strings.Split(string(preset), "\n"), verb+" "+u.Name) {
				bad("unit %s: %q not in 20-ignition.preset:\n%s", u.Name, verb+" "+u.Name, preset)
			}
		}
		if u.Mask != nil && *u.Mask {
			if t, err := os.Readlink(filepath.Join(unitDir, u.Name)); err != nil || t != "/dev/null" {
				bad("unit %s: not masked (%q, %v)", u.Name, t, err)
			}
		}
	}
	return checked, errs
}

// --- the check -----------------------------------------------------------

// The check's own network, apart from the rehearsal's krh0.
const (
	checkBridge = "kph0"
	checkNS     = "kph-"
	checkPrefix = "10.213.78."
)

// provisionCheck is `rehearsal provision check`: a fresh kiln init cluster
// on 10.213.78.0/24 (the rehearsal's, with that prefix), air-gapped with
// images from --layout (default: a stand-in layout), kiln serve on
// kph0's 10.213.78.1, then each node provisioned in its own namespace
// kph-NAME and its root checked against the config kiln serve served;
// then the control-plane rules: a second provision of cp2 before it
// reported, and one after it reported done.
func provisionCheck(args []string) error {
	home, _ := os.UserHomeDir()
	var work, kiln, tools, layout, version, only string
	var keep bool
	var fillerMiB int
	fl := flag.NewFlagSet("provision check", flag.ContinueOnError)
	fl.IntVar(&fillerMiB, "stand-in-mib", 0, "MiB of incompressible filler in each stand-in image (about 25 gives real images' payload sizes)")
	fl.StringVar(&work, "work", "/tmp/kiln-provision-check", "work directory (wiped)")
	fl.StringVar(&kiln, "kiln", "bin/kiln", "kiln binary (make build)")
	fl.StringVar(&tools, "tools", filepath.Join(home, ".cache/kiln-tools/bin"), "folder with ignition (test/tools/build.sh ignition)")
	fl.StringVar(&layout, "layout", "", "OCI image layout with every image of the cluster (default: write a stand-in layout)")
	fl.StringVar(&version, "version", "v1.34.4", "Kubernetes version")
	fl.StringVar(&only, "nodes", "cp1,cp2,cp3,w1,w2", "nodes to provision")
	fl.BoolVar(&keep, "keep", false, "leave kiln serve and the network up until interrupted")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("run as root: network namespaces, a bridge, mounts, and Ignition's files stage")
	}
	var err error
	for _, p := range []*string{&kiln, &work, &tools} {
		if *p, err = filepath.Abs(*p); err != nil {
			return err
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.RemoveAll(work); err != nil {
		return err
	}
	if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}
	t0 := time.Now()
	say := func(format string, a ...any) {
		fmt.Printf("[%6.1fs] %s\n", time.Since(t0).Seconds(), fmt.Sprintf(format, a...))
	}
	var nodes []nodeSpec
	for _, name := range strings.Split(only, ",") {
		i := slices.IndexFunc(all, func(n nodeSpec) bool { return n.name == name })
		if i < 0 {
			return fmt.Errorf("--nodes: no node %q", name)
		}
		nodes = append(nodes, all[i])
	}
	ip := func(n nodeSpec) string { return checkPrefix + strconv.Itoa(n.octet) }

	// The cluster: kilnInit's, on this check's subnet.
	clusterDir := filepath.Join(work, "cluster")
	if err := kilnInit(runOptions{kiln: kiln, version: version}, clusterDir, "keepalived-haproxy", checkPrefix); err != nil {
		return err
	}
	cf := filepath.Join(clusterDir, "cluster.yaml")
	if layout == "" {
		layout = filepath.Join(work, "layout")
		if err := standInLayout(kiln, cf, layout, fillerMiB); err != nil {
			return fmt.Errorf("stand-in layout: %w", err)
		}
		say("stand-in image layout written: %s", layout)
	}
	cache := filepath.Join(work, "kiln-cache")
	t := time.Now()
	if err := airgapCluster(kiln, clusterDir, layout, cache, []nodeSpec{cp1, cp2, cp3}); err != nil {
		return err
	}
	say("cluster air-gapped (MACs, airgap: true, images pinned and pulled) in %.1fs", time.Since(t).Seconds())

	// The network.
	defer checkTeardown()
	checkTeardown()
	go func() { // Ctrl-C: no namespace or bridge stays (kiln serve dies with this process)
		waitSignal()
		checkTeardown()
		os.Exit(130)
	}()
	for _, c := range [][]string{
		{"ip", "link", "add", checkBridge, "type", "bridge"},
		{"ip", "addr", "add", checkPrefix + "1/24", "dev", checkBridge},
		{"ip", "link", "set", checkBridge, "up"},
	} {
		if err := sh(c...); err != nil {
			return err
		}
	}
	for _, n := range nodes {
		ns := checkNS + n.name
		for _, c := range [][]string{
			{"ip", "netns", "add", ns},
			{"ip", "link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns},
			{"ip", "link", "set", ns, "master", checkBridge},
			{"ip", "-n", ns, "link", "set", "eth0", "address", n.mac()},
			{"ip", "-n", ns, "link", "set", "lo", "up"},
			{"ip", "link", "set", ns, "up"},
			{"ip", "-n", ns, "addr", "add", ip(n) + "/24", "dev", "eth0"},
			{"ip", "-n", ns, "link", "set", "eth0", "up"},
			{"ip", "-n", ns, "route", "add", "default", "via", checkPrefix + "1"},
		} {
			if err := sh(c...); err != nil {
				return err
			}
		}
	}

	srv, err := startServe(serveSpec{kiln: kiln, cluster: clusterDir, dir: work, listen: checkPrefix + "1", port: servePort, cache: cache})
	if err != nil {
		return err
	}
	defer srv.stop()
	say("kiln pxe built the bundle in %.1fs; kiln serve on %s", srv.BuildTook.Seconds(), srv.URL)
	payload := map[string]string{}
	for _, a := range srv.Manifest.Assets {
		if a.Kind == "payload" {
			payload[filepath.Base(a.File)] = a.SHA256
			say("  payload %s: %d bytes, sha256 %s", a.File, a.Size, a.SHA256[:16])
		}
	}
	configOf := func(n nodeSpec) string {
		for _, m := range srv.Manifest.Nodes {
			if m.MAC == n.mac() || (m.Default && m.Role == n.role && n.role == "worker") {
				return filepath.Join(srv.Bundle, m.Config)
			}
		}
		return ""
	}
	boots := map[string]int{}
	lastWork := func(n nodeSpec) string {
		return filepath.Join(work, "provision", n.name, fmt.Sprintf("boot-%d", boots[n.name]))
	}
	boot := func(n nodeSpec, root string) (*bootResult, error) {
		boots[n.name]++
		return provisionNode(bootSpec{name: n.name, netns: "/run/netns/" + checkNS + n.name, mac: n.mac(), server: srv.URL,
			ignition: filepath.Join(tools, "ignition"), root: root, work: lastWork(n), self: self})
	}
	var failures []string
	fail := func(format string, a ...any) {
		failures = append(failures, fmt.Sprintf(format, a...))
		say("FAIL "+format, a...)
	}
	for _, n := range nodes {
		root := filepath.Join(work, "nodes", n.name, "root")
		res, err := boot(n, root)
		if err != nil {
			fail("%s: %v", n.name, err)
			continue
		}
		say("%s (%s): provisioned in %.2fs: kernel %d B, initramfs %d B, neednet %v; %s", n.name, n.role, res.Seconds, res.KernelBytes, res.InitrdBytes, res.NeedNet, stageSummary(res))
		say("  cmdline: %s", res.Cmdline)
		checked, errs := verifyRoot(configOf(n), root, payload)
		for _, e := range errs {
			fail("%s: %v", n.name, e)
		}
		say("  %d entries of %s checked under %s: %d mismatches", checked, filepath.Base(configOf(n)), root, len(errs))
		if err := checkNodeYAML(root, n, srv); err != nil {
			fail("%s: %v", n.name, err)
		}
		for _, p := range mustHave(n.role, version) {
			if _, err := os.Lstat(filepath.Join(root, p)); err != nil {
				fail("%s: %v", n.name, err)
			}
		}
		if n == nodes[0] {
			// The checker is not vacuous: a wrong mode and a changed
			// payload byte are both found.
			nodeYAML, archive := filepath.Join(root, "etc/kiln/node.yaml"), filepath.Join(root, "var/lib/kiln/payload/images-"+n.role+".tar")
			orig, _ := os.ReadFile(archive)
			_ = os.Chmod(nodeYAML, 0o644)
			_ = os.WriteFile(archive, append(slices.Clone(orig), '!'), 0o644)
			_, errs := verifyRoot(configOf(n), root, payload)
			_ = os.Chmod(nodeYAML, 0o600)
			_ = os.WriteFile(archive, orig, 0o644)
			if len(errs) != 3 {
				fail("checker self-test: %d mismatches for a changed mode and payload, want 3: %v", len(errs), errs)
			} else {
				say("  checker self-test: a wrong mode and a changed payload give %d mismatches, as they should", len(errs))
			}
		}
	}
	// kiln serve saw each node from its own address.
	access, _ := os.ReadFile(srv.AccessLog)
	for _, n := range nodes {
		if !regexpLine(string(access), " "+ip(n)+":", "/config/") {
			fail("%s: the access log has no config request from %s", n.name, ip(n))
		}
	}

	// The control-plane rules. cp2 provisioned again before it reported:
	// kiln serve serves the config again (into a fresh root, as a live
	// node reboots), and Ignition applied again over the old root shows
	// what a non-empty root does.
	if slices.Contains(nodes, cp2) {
		root := filepath.Join(work, "nodes", "cp2", "root")
		// gone boots cp2 into a fresh root and expects kiln serve's 410.
		gone := func(when, root string) {
			_, err := boot(cp2, filepath.Join(work, "nodes", "cp2", root))
			ignLog, _ := os.ReadFile(filepath.Join(lastWork(cp2), "ignition.log"))
			switch {
			case err == nil:
				fail("cp2 %s: kiln serve served its config (cluster keys) again", when)
			case !strings.Contains(string(ignLog), "Gone"):
				fail("cp2 %s: failed, but not with 410 Gone: %v", when, err)
			default:
				say("cp2 %s: refused as kiln serve's rules say (410 Gone; Ignition's fetch stage fails)", when)
			}
		}
		gone("again, its keys handed out once", "root-again")
		if err := srv.rearm("cp2"); err != nil {
			fail("%v", err)
		} else if _, err := boot(cp2, root); err != nil {
			ignLog, _ := os.ReadFile(filepath.Join(lastWork(cp2), "ignition.log"))
			say("cp2 re-armed (kiln rearm), provisioned again into its old root: %s", firstLine(err.Error()))
			for _, l := range strings.Split(string(ignLog), "\n") {
				if strings.Contains(l, "CRITICAL") || strings.Contains(l, "ERROR") {
					say("  ignition: %s", l)
				}
			}
		} else {
			say("cp2 re-armed (kiln rearm), provisioned again into its old root: Ignition replaced or kept every file without complaint")
		}
		if err := srv.rearm("cp2"); err != nil {
			fail("%v", err)
		}
		if err := postReport(self, "/run/netns/"+checkNS+"cp2", root, map[string]any{"node": "cp2", "role": "control-plane", "cluster": cluster, "phase": "done", "state": "done"}); err != nil {
			fail("cp2's done report: %v", err)
		} else {
			say("cp2 re-armed, then reported done to its reportURL (from %s)", ip(cp2))
		}
		gone("after reporting done", "root-after-done")
		serveLog, _ := os.ReadFile(srv.Log)
		for _, l := range strings.Split(string(serveLog), "\n") {
			if strings.Contains(l, "refused config cp2") {
				say("  kiln serve: %s", l)
			}
		}
		if st, err := srv.status(); err != nil {
			fail("GET /status: %v", err)
		} else if !strings.Contains(string(st), `"from": "`+ip(cp2)+`"`) {
			fail("GET /status has no report from %s:\n%s", ip(cp2), st)
		} else {
			say("GET /status (kiln status): cp2 done, from %s", ip(cp2))
		}
	}
	// A worker's config holds no cluster keys: served again after done.
	if slices.Contains(nodes, w1) {
		root := filepath.Join(work, "nodes", "w1", "root")
		if err := postReport(self, "/run/netns/"+checkNS+"w1", root, map[string]any{"node": "rh-worker-026b00000015", "role": "worker", "cluster": cluster, "phase": "done", "state": "done"}); err != nil {
			fail("w1's done report: %v", err)
		} else if _, err := boot(w1, filepath.Join(work, "nodes", "w1", "root-after-done")); err != nil {
			fail("w1 after reporting done: %v", err)
		} else {
			say("w1 reported done, then provisioned again: served again (a worker's config holds no cluster keys)")
		}
	}
	// Ignition checks what kiln serve sends: a payload archive changed in
	// the bundle (renamed over, so the image cache keeps its copy) stops
	// the files stage.
	if w := nodes[len(nodes)-1]; w.role == "worker" {
		var file string
		for _, a := range srv.Manifest.Assets {
			if a.Kind == "payload" && filepath.Base(a.File) == "images-worker.tar" {
				file = filepath.Join(srv.Bundle, "assets", a.File)
			}
		}
		orig, err := os.ReadFile(file)
		if err == nil {
			err = os.WriteFile(file+".tampered", append(slices.Clone(orig), '!'), 0o644)
		}
		if err == nil {
			err = os.Rename(file+".tampered", file)
		}
		if err != nil {
			fail("tamper %s: %v", file, err)
		} else {
			_, err := boot(w, filepath.Join(work, "nodes", w.name, "root-tampered"))
			ignLog, _ := os.ReadFile(filepath.Join(lastWork(w), "ignition.log"))
			if err == nil || !strings.Contains(string(ignLog), "hash verification failed") {
				fail("%s with a changed images-worker.tar: %v", w.name, err)
			} else {
				for _, l := range strings.Split(string(ignLog), "\n") {
					if strings.Contains(l, "Ignition failed") {
						say("%s with a changed images-worker.tar: refused by Ignition: %s", w.name, strings.TrimSpace(l))
						break
					}
				}
			}
			if err := os.WriteFile(file+".orig", orig, 0o644); err == nil {
				_ = os.Rename(file+".orig", file)
			}
		}
	}
	if keep {
		say("--keep: kiln serve on %s, namespaces %s*; interrupt to tear down", srv.URL, checkNS)
		waitSignal()
	}
	if err := srv.stop(); err != nil {
		fail("%v", err)
	}
	if slices.Contains(nodes, cp2) {
		if rep, err := os.ReadFile(filepath.Join(srv.Bundle, "state", "reports.json")); err != nil || !strings.Contains(string(rep), `"cp2"`) {
			fail("state/reports.json after SIGTERM: %v %s", err, rep)
		} else {
			say("kiln serve stopped (SIGTERM); state/reports.json keeps cp2's report")
		}
	}
	say("done: %d failures (work dir %s)", len(failures), work)
	if len(failures) > 0 {
		return fmt.Errorf("%d checks failed:\n  %s", len(failures), strings.Join(failures, "\n  "))
	}
	return nil
}

// mustHave lists paths every root of a role has (the config names them;
// verifyRoot checks them entry by entry): the metadata, the kubeadm
// configs, containerd's config, the kubelet (a unit of the sysext,
// enabled by a wants link) and the payload.
func mustHave(role, version string) []string {
	p := []string{"/etc/kiln/node.yaml", "/etc/kiln/kubeadm-join.yaml", "/etc/containerd/config.toml",
		"/etc/containerd/certs.d/_default/hosts.toml", "/etc/systemd/system/containerd.service.d/10-kiln-config.conf",
		"/etc/systemd/system/multi-user.target.wants/kubelet.service", "/etc/systemd/system/kiln-firstboot.service",
		"/etc/systemd/system-preset/20-ignition.preset", "/opt/bin/kiln-firstboot", "/etc/extensions/kubernetes.raw",
		"/opt/extensions/kubernetes/kubernetes-" + version + "-x86-64.raw", "/var/lib/kiln/payload/images-" + role + ".tar"}
	switch role {
	case "init":
		p = append(p, "/etc/kiln/kubeadm-init.yaml", "/etc/kiln/pki/ca.key", "/etc/kiln/manifests/00-flannel.yaml")
	case "control-plane":
		p = append(p, "/etc/kiln/load-balancer/haproxy.cfg", "/etc/kiln/load-balancer/keepalived.conf")
	}
	return p
}

// checkNodeYAML: the node's metadata names its role, its hostname (the
// inventory name, or the template for the worker role default) and the
// report URL kiln serve expects from it.
func checkNodeYAML(root string, n nodeSpec, srv *serveProc) error {
	m, err := readNodeMeta(root)
	if err != nil {
		return err
	}
	if m.Role != n.role {
		return fmt.Errorf("node.yaml role %q, want %q", m.Role, n.role)
	}
	name := n.name
	if n.role == "worker" {
		name = "default-worker"
	}
	u := m.ReportURL
	if !strings.HasPrefix(u, srv.URL+"/report/"+name+"?key=") {
		return fmt.Errorf("node.yaml reportURL %q is not kiln serve's for %s", redact(u), name)
	}
	return nil
}

func regexpLine(text, a, b string) bool {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, a) && strings.Contains(l, b) {
			return true
		}
	}
	return false
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// waitSignal returns on SIGINT or SIGTERM.
func waitSignal() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	<-ch
}

// checkTeardown removes the check's namespaces (every kph-*, an
// interrupted check's too) and bridge.
func checkTeardown() {
	deleteNetns(checkNS)
	_ = sh("ip", "link", "del", checkBridge)
}
