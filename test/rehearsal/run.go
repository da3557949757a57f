package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The rehearsal network: one bridge with the test host on it, nodes as
// network namespaces, and the cluster's controlPlaneEndpoint a virtual IP
// that the control planes' own keepalived holds (loadBalancer.type
// keepalived-haproxy).
const (
	bridgeName = "krh0"
	netPrefix  = "10.213.77."
	hostIP     = netPrefix + "1"
	vip        = netPrefix + "10"
	endpoint   = vip + ":6443"
	nsPrefix   = "krh-"
	cluster    = "rh"
)

type runOptions struct {
	work      string
	tools     string
	version   string
	etcd      string
	kiln      string
	agent     string
	timeScale string
	timeout   time.Duration
	keep      bool
	// ignorePreflight goes to the cluster file's
	// kubernetes.ignorePreflightErrors (kiln init --ignore-preflight-errors).
	ignorePreflight string
	// real: real nodes (machine.go: containerd, runc, the kubelet, CNI,
	// provisioned from kiln serve by the real Ignition) instead of the node
	// emulator (node.go).
	real bool
}

// nodeSpec is one emulated machine.
type nodeSpec struct {
	name   string // short name: namespace, directory
	role   string
	octet  int
	source string // cluster dir to render from (foreign: another cluster)
}

func (n nodeSpec) ip() string  { return netPrefix + strconv.Itoa(n.octet) }
func (n nodeSpec) mac() string { return fmt.Sprintf("02:6b:00:00:00:%02x", n.octet) }

// env is one scenario's world.
type env struct {
	o       runOptions
	dir     string
	self    string
	bin     string
	cluster string // kiln cluster dir
	mu      sync.Mutex
	procs   map[string]*exec.Cmd // running node emulators by name
	specs   map[string]nodeSpec
	// serve is the scenario's kiln serve (real nodes only).
	serve *serveProc
	start time.Time
	// full is the time to the full cluster, once reached.
	full time.Duration
}

var scenarios = []struct {
	name string
	what string
	run  func(*env) error
}{
	{"together", "3 control planes and 2 workers boot together", scenarioTogether},
	{"joiners-first", "joiners boot first, the init node last", scenarioJoinersFirst},
	{"certs-deleted", "a control plane boots after the kubeadm-certs Secret was deleted", scenarioCertsDeleted},
	{"killed-join", "a control plane is killed mid-join and boots again", scenarioKilledJoin},
	{"foreign-ca", "a node whose metadata pins a foreign CA", scenarioForeignCA},
	{"refusals", "nodes whose token or certificate key the cluster refuses, and a worker cut off from the endpoint for a while", scenarioRefusals},
	{"vip-failover", "the control plane holding the endpoint's virtual IP loses power", scenarioVIPFailover},
	{"kube-vip-init", "a kube-vip cluster's init node switches kube-vip to admin.conf after kubeadm init", scenarioKubeVIPInit},
}

func runMain(args []string) error {
	var o runOptions
	home, _ := os.UserHomeDir()
	fl := flag.NewFlagSet("run", flag.ContinueOnError)
	fl.StringVar(&o.work, "work", "/tmp/kiln-rehearsal", "work directory (wiped per scenario)")
	fl.StringVar(&o.tools, "tools", filepath.Join(home, ".cache/kiln-tools/bin"), "built Kubernetes and etcd binaries (test/tools/build.sh rehearsal-VERSION)")
	fl.StringVar(&o.version, "version", "v1.34.4", "Kubernetes version")
	fl.StringVar(&o.etcd, "etcd", "", "etcd version (default: the one kubeadm of --version deploys)")
	fl.StringVar(&o.kiln, "kiln", "bin/kiln", "kiln binary (make build)")
	fl.StringVar(&o.agent, "agent", "bin/kiln-firstboot-linux-amd64", "kiln-firstboot binary (make build)")
	fl.StringVar(&o.timeScale, "time-scale", "5", "KILN_FIRSTBOOT_TIME_SCALE for every agent")
	fl.DurationVar(&o.timeout, "timeout", 6*time.Minute, "per-scenario limit")
	fl.BoolVar(&o.keep, "keep", false, "leave the last scenario's cluster running until interrupted")
	fl.BoolVar(&o.real, "real-nodes", false, "real nodes: containerd, runc, kubelet, CNI plugins and flannel (test/tools/build.sh node-VERSION), every image built locally and delivered through kiln serve's air-gapped payload, configs applied by the real Ignition")
	fl.StringVar(&o.ignorePreflight, "ignore-preflight", "auto", "preflight checks every node's kubeadm skips, comma separated (the cluster file's kubernetes.ignorePreflightErrors); auto: SystemVerification for Kubernetes >= 1.37 on a cgroup v1 host (kubeadm 1.37 refuses cgroup v1), else none")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if o.etcd == "" {
		switch {
		case strings.HasPrefix(o.version, "v1.33."):
			o.etcd = "v3.5.24"
		case strings.HasPrefix(o.version, "v1.34."):
			o.etcd = "v3.6.5"
		case strings.HasPrefix(o.version, "v1.37."):
			o.etcd = "v3.7.0"
		default:
			return fmt.Errorf("--etcd: no default for Kubernetes %s", o.version)
		}
	}
	if o.ignorePreflight == "auto" {
		o.ignorePreflight = ""
		minor, _ := strconv.Atoi(strings.Split(strings.TrimPrefix(o.version, "v1."), ".")[0])
		if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil && minor >= 37 {
			o.ignorePreflight = "SystemVerification"
			fmt.Printf("NOTE: cgroup v1 host and Kubernetes %s: the cluster file sets kubernetes.ignorePreflightErrors: [SystemVerification] (kubeadm 1.37 refuses cgroup v1)\n", o.version)
		}
	}
	if os.Geteuid() != 0 {
		return errors.New("run as root: the rehearsal creates network namespaces, a bridge and mounts")
	}
	var err error
	for _, p := range []*string{&o.kiln, &o.agent, &o.work} {
		if *p, err = filepath.Abs(*p); err != nil {
			return err
		}
	}
	want := fl.Args()
	if len(want) == 0 {
		for _, s := range scenarios {
			want = append(want, s.name)
		}
	}
	for _, w := range want {
		if !slices.ContainsFunc(scenarios, func(s struct {
			name string
			what string
			run  func(*env) error
		}) bool {
			return s.name == w
		}) {
			return fmt.Errorf("unknown scenario %q", w)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	teardownLeftovers(o.work)
	restoreHost := func() {}
	if o.real {
		if restoreHost, err = setRunSysctls(o.work); err != nil {
			return err
		}
		defer restoreHost()
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	var current *env
	var curMu sync.Mutex
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "rehearsal: %v: cleaning up\n", s)
		curMu.Lock()
		if current != nil {
			current.teardown()
		} else { // between scenarios, or while one is set up
			teardownLeftovers(o.work)
		}
		restoreHost()
		os.Exit(130)
	}()

	type result struct {
		name       string
		err        error
		took, full time.Duration
	}
	var results []result
	for _, s := range scenarios {
		if !slices.Contains(want, s.name) {
			continue
		}
		fmt.Printf("=== scenario %s: %s (Kubernetes %s, etcd %s)\n", s.name, s.what, o.version, o.etcd)
		e, err := newEnv(o, self, s.name)
		if err != nil {
			e.teardown() // it may have made the bridge or started kiln serve
		} else {
			curMu.Lock()
			current = e
			curMu.Unlock()
			err = s.run(e)
			if o.keep && s.name == want[len(want)-1] {
				fmt.Printf("--keep: cluster left running (work dir %s); interrupt to tear down\n", e.dir)
				select {}
			}
			e.teardown()
			curMu.Lock()
			current = nil
			curMu.Unlock()
		}
		r := result{s.name, err, time.Since(e.startOrNow()), 0}
		if e != nil {
			r.full = e.full
		}
		results = append(results, r)
		if err != nil {
			fmt.Printf("--- FAIL %s after %s: %v\n    logs: %s\n", s.name, r.took.Round(time.Second), err, e.dirOrEmpty())
		} else {
			fmt.Printf("--- PASS %s (%s)\n", s.name, r.took.Round(time.Second))
		}
	}
	failed := 0
	fmt.Println("=== summary")
	for _, r := range results {
		st := "PASS"
		if r.err != nil {
			st, failed = "FAIL", failed+1
		}
		full := "-"
		if r.full > 0 {
			full = r.full.Round(100 * time.Millisecond).String()
		}
		fmt.Printf("%-14s %s  full cluster after %-8s scenario %s\n", r.name, st, full, r.took.Round(time.Second))
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d scenarios failed", failed, len(results))
	}
	return nil
}

func (e *env) startOrNow() time.Time {
	if e == nil || e.start.IsZero() {
		return time.Now()
	}
	return e.start
}

func (e *env) dirOrEmpty() string {
	if e == nil {
		return ""
	}
	return e.dir
}

// newEnv prepares a scenario: a fresh kiln cluster, the tools on a PATH
// directory and the bridge.
func newEnv(o runOptions, self, scenario string) (*env, error) {
	e := &env{o: o, self: self, dir: filepath.Join(o.work, scenario), procs: map[string]*exec.Cmd{}, specs: map[string]nodeSpec{}}
	if err := os.RemoveAll(e.dir); err != nil {
		return e, err
	}
	e.bin = filepath.Join(e.dir, "bin")
	if err := os.MkdirAll(e.bin, 0o755); err != nil {
		return e, err
	}
	// The emulator runs the control plane's binaries as processes from
	// the nodes' PATH; real nodes have theirs in images and in the OS layer.
	links := map[string]string{}
	if !o.real {
		links = map[string]string{
			"kubeadm":                 "kubeadm-" + o.version,
			"kubectl":                 "kubectl-" + o.version,
			"kube-apiserver":          "kube-apiserver-" + o.version,
			"kube-controller-manager": "kube-controller-manager-" + o.version,
			"kube-scheduler":          "kube-scheduler-" + o.version,
			"etcd":                    "etcd-" + o.etcd,
		}
	}
	for name, target := range links {
		t := filepath.Join(o.tools, target)
		if _, err := os.Stat(t); err != nil {
			return e, fmt.Errorf("%s missing: run test/tools/build.sh rehearsal-%s", t, o.version)
		}
		if err := os.Symlink(t, filepath.Join(e.bin, name)); err != nil {
			return e, err
		}
	}
	for name := range shims {
		if o.real && name == "kubelet" {
			continue // the real one is in the OS layer
		}
		if err := os.Symlink(self, filepath.Join(e.bin, name)); err != nil {
			return e, err
		}
	}
	e.cluster = filepath.Join(e.dir, "cluster")
	lb := "keepalived-haproxy"
	if scenario == "kube-vip-init" {
		lb = "kube-vip"
	}
	if err := kilnInit(o, e.cluster, lb, netPrefix); err != nil {
		return e, err
	}
	if err := e.network(); err != nil {
		return e, err
	}
	if o.real {
		if err := e.buildOSLayer(); err != nil {
			return e, err
		}
		layout, err := e.imageLayout()
		if err != nil {
			return e, err
		}
		if e.serve, err = e.startServe(layout); err != nil {
			return e, err
		}
	}
	return e, nil
}

// imageLayout builds every image the cluster runs as an OCI layout
// (images.go), once per run and version: scenarios' clusters list the
// same images.
func (e *env) imageLayout() (string, error) {
	dst := filepath.Join(e.o.work, "images-"+e.o.version)
	if layoutsBuilt[dst] {
		return dst, nil
	}
	start := time.Now()
	built, err := buildImages(context.Background(), e.o.kiln, filepath.Join(e.cluster, "cluster.yaml"), e.o.tools, e.o.version, e.o.etcd, dst)
	if err != nil {
		return "", fmt.Errorf("build the images: %w", err)
	}
	e.logf("built %d images in %s into %s", len(built), time.Since(start).Round(100*time.Millisecond), dst)
	layoutsBuilt[dst] = true
	return dst, nil
}

// layoutsBuilt are the image layouts this run built.
var layoutsBuilt = map[string]bool{}

// keepalivedImage pins the keepalived image by the digest of the binary
// that stands in for it: Debian's keepalived, which the node emulator runs
// for the static pod (kiln knows no upstream keepalived image).
func keepalivedImage() (string, error) {
	bin, err := exec.LookPath("keepalived")
	if err != nil {
		return "", fmt.Errorf("keepalived: %w (.ci/install-deps installs it)", err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("rehearsal.invalid/debian-keepalived@sha256:%x", sha256.Sum256(data)), nil
}

// rehearsalAddon is the cluster's one add-on: applied by the init agent
// after the pod network, and re-applied by the scenarios to show that a
// second apply changes nothing. Its Namespace carries a label: a Namespace
// applied with nothing but its name owns no field, so the API server
// records its defaulted fields under the manager before-first-apply at the
// second apply (a one-time write, observed on 1.34); with a field of its
// own, kiln's manager is there from the start.
const rehearsalAddon = `apiVersion: v1
kind: Namespace
metadata:
  name: kiln-rehearsal
  labels:
    app.kubernetes.io/part-of: kiln-rehearsal
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: addon
  namespace: kiln-rehearsal
data:
  applied-by: kiln-firstboot
`

// kilnInit makes a cluster whose control planes hold the endpoint's VIP
// (loadBalancer.type lb: keepalived-haproxy, with cp1..3 in the
// inventory, or kube-vip), with one local add-on, on the subnet prefix
// (netPrefix; `provision check` has its own): the endpoint is PREFIX10,
// a node PREFIX<octet>.
func kilnInit(o runOptions, dir, lb, prefix string) error {
	args := []string{"init", cluster, "--endpoint", prefix + "10:6443", "--kubernetes-version", o.version, "--dest", dir, "--load-balancer", lb}
	if o.ignorePreflight != "" {
		args = append(args, "--ignore-preflight-errors", o.ignorePreflight)
	}
	if lb == "keepalived-haproxy" {
		image, err := keepalivedImage()
		if err != nil {
			return err
		}
		if o.real {
			// kiln init takes only pinned images: a placeholder digest
			// until `kiln images pin --from` pins the image built for it.
			ref, err := keepalivedImageRef()
			if err != nil {
				return err
			}
			image = ref + image[strings.Index(image, "@"):]
		}
		args = append(args, "--image", "keepalived="+image)
		for _, n := range []nodeSpec{cp1, cp2, cp3} {
			args = append(args, "--control-plane", n.name+"="+prefix+strconv.Itoa(n.octet))
		}
	}
	out, err := exec.Command(o.kiln, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("kiln init: %v: %s", err, out)
	}
	// The nodes never fetch the Kubernetes download (the emulator runs the
	// binaries built for the version), but kiln renders Ignition only with
	// it pinned: pin a stand-in file.
	standIn := filepath.Join(dir, "kubernetes-sysext.stand-in")
	if err := os.WriteFile(standIn, []byte("rehearsal: not a sysext image\n"), 0o644); err != nil {
		return err
	}
	for _, arch := range []string{"amd64", "arm64"} {
		if out, err := exec.Command(o.kiln, "-c", filepath.Join(dir, "cluster.yaml"), "pin", "--arch", arch, "--file", "kubernetes-sysext="+standIn).CombinedOutput(); err != nil {
			return fmt.Errorf("kiln pin --arch %s: %v: %s", arch, err, out)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "addon.yaml"), []byte(rehearsalAddon), 0o644); err != nil {
		return err
	}
	more := "addons:\n  - path: addon.yaml\n"
	if o.real {
		if err := os.WriteFile(filepath.Join(dir, "probe.yaml"), []byte(probeAddon), 0o644); err != nil {
			return err
		}
		host, err := hostSettings(dir)
		if err != nil {
			return err
		}
		more += "  - path: probe.yaml\n" + host
	}
	f, err := os.OpenFile(filepath.Join(dir, "cluster.yaml"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(more)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func sh(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (e *env) network() error {
	if err := sh("ip", "link", "add", bridgeName, "type", "bridge"); err != nil {
		return err
	}
	if err := sh("ip", "addr", "add", hostIP+"/24", "dev", bridgeName); err != nil {
		return err
	}
	return sh("ip", "link", "set", bridgeName, "up")
}

// addNode creates the node's network namespace: a veth to the bridge,
// named eth0 inside with a fixed MAC (the hostname template uses it), and
// for emulated nodes ip_forward on (a fresh namespace has it off; the
// agent sets it, which real nodes rely on).
func (e *env) addNode(n nodeSpec) error {
	ns, host := nsPrefix+n.name, nsPrefix+n.name
	cmds := [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns},
		{"ip", "link", "set", host, "master", bridgeName},
		{"ip", "-n", ns, "link", "set", "eth0", "address", n.mac()},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
	}
	if !e.o.real {
		cmds = append(cmds, []string{"ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"})
	}
	for _, c := range cmds {
		if err := sh(c...); err != nil {
			return err
		}
	}
	return nil
}

// powerOn connects the node's cable and gives it its address and a default
// route to the bridge.
func (e *env) powerOn(n nodeSpec) error {
	ns := nsPrefix + n.name
	for _, c := range [][]string{
		{"ip", "link", "set", ns, "up"},
		{"ip", "-n", ns, "addr", "add", n.ip() + "/24", "dev", "eth0"},
		{"ip", "-n", ns, "link", "set", "eth0", "up"},
		{"ip", "-n", ns, "route", "add", "default", "via", hostIP},
	} {
		if err := sh(c...); err != nil {
			return err
		}
	}
	return nil
}

// powerOff is the network half of a power cut: the cable goes dead and the
// addresses go (a virtual IP the node held included), as a machine's memory
// would.
func (e *env) powerOff(name string) {
	ns := nsPrefix + name
	_ = sh("ip", "link", "set", ns, "down")
	_ = sh("ip", "-n", ns, "addr", "flush", "dev", "eth0")
}

func (e *env) track(name string, cmd *exec.Cmd) {
	e.mu.Lock()
	e.procs[name] = cmd
	e.mu.Unlock()
	e.recordPIDs()
	go func() { _ = cmd.Wait() }()
}

// recordPIDs keeps the process groups in a file, so that a later run can
// kill what a crashed run left behind.
func (e *env) recordPIDs() {
	e.mu.Lock()
	var pids []string
	for _, c := range e.procs {
		pids = append(pids, strconv.Itoa(c.Process.Pid))
	}
	e.mu.Unlock()
	_ = os.WriteFile(filepath.Join(e.o.work, "pgids"), []byte(strings.Join(pids, "\n")+"\n"), 0o644)
}

// place writes the node's kiln files where Ignition would: every file and
// directory under /etc/kiln of the role's Ignition config (`kiln render
// --format ignition`), with its mode (0700 directories, 0600 files: the
// metadata, kubeadm configs, the init role's cluster PKI, its manifests and
// a control plane's load balancer). What else the config writes (kernel
// modules, sysctls, the agent binary, the Kubernetes download) is the
// emulator's or the host's business.
func (e *env) place(n nodeSpec) error {
	cmd := exec.Command(e.o.kiln, "-c", filepath.Join(n.source, "cluster.yaml"), "render", "--role", n.role, "--format", "ignition")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("kiln render --role %s --format ignition: %v: %s", n.role, err, ee.Stderr)
		}
		return err
	}
	var ign struct {
		Storage struct {
			Directories []struct {
				Path string `json:"path"`
				Mode *int   `json:"mode"`
			} `json:"directories"`
			Files []struct {
				Path     string `json:"path"`
				Mode     *int   `json:"mode"`
				Contents struct {
					Source      string `json:"source"`
					Compression string `json:"compression"`
				} `json:"contents"`
			} `json:"files"`
		} `json:"storage"`
	}
	if err := json.Unmarshal(out, &ign); err != nil {
		return fmt.Errorf("%s's Ignition config: %w", n.role, err)
	}
	root := filepath.Join(e.dir, "nodes", n.name)
	const kilnDir = "/etc/kiln/"
	for _, d := range ign.Storage.Directories {
		if strings.HasPrefix(d.Path+"/", kilnDir) {
			if err := os.MkdirAll(filepath.Join(root, d.Path), mode(d.Mode, 0o755)); err != nil {
				return err
			}
		}
	}
	for _, f := range ign.Storage.Files {
		if !strings.HasPrefix(f.Path, kilnDir) {
			continue
		}
		data, err := dataURL(f.Contents.Source, f.Contents.Compression)
		if err != nil {
			return fmt.Errorf("%s: %w", f.Path, err)
		}
		dst := filepath.Join(root, f.Path)
		if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(dst, data, mode(f.Mode, 0o644)); err != nil {
			return err
		}
	}
	return nil
}

func mode(m *int, def os.FileMode) os.FileMode {
	if m == nil {
		return def
	}
	return os.FileMode(*m)
}

// dataURL decodes an Ignition file source of the data scheme (RFC 2397:
// base64 or percent-encoded), gunzipping it for compression gzip. Other
// schemes are fetched by Ignition on a real node; the rehearsal's cluster
// has none under /etc/kiln.
func dataURL(src, compression string) ([]byte, error) {
	rest, ok := strings.CutPrefix(src, "data:")
	if !ok {
		return nil, fmt.Errorf("source %.40q: the rehearsal places data URLs only", src)
	}
	meta, payload, ok := strings.Cut(rest, ",")
	if !ok {
		return nil, errors.New("data URL without a comma")
	}
	var data []byte
	var err error
	if strings.HasSuffix(meta, ";base64") {
		data, err = base64.StdEncoding.DecodeString(payload)
	} else {
		var text string
		text, err = url.PathUnescape(payload)
		data = []byte(text)
	}
	if err != nil {
		return nil, err
	}
	switch compression {
	case "":
		return data, nil
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		return io.ReadAll(zr)
	default:
		return nil, fmt.Errorf("compression %q", compression)
	}
}

// boot creates (first time) and starts a node: its files, its namespace,
// and the node emulator in fresh mount and UTS namespaces. /run starts
// empty on every boot, like a tmpfs.
func (e *env) boot(n nodeSpec, agentArgs ...string) error {
	if e.start.IsZero() {
		e.start = time.Now()
	}
	d := filepath.Join(e.dir, "nodes", n.name)
	if err := e.prepare(n); err != nil {
		return err
	}
	if _, err := os.Stat("/run/netns/" + nsPrefix + n.name); err != nil && e.o.real { // after a power cut
		if err := e.addNode(e.specs[n.name]); err != nil {
			return err
		}
	}
	if err := e.powerOn(e.specs[n.name]); err != nil {
		return err
	}
	if err := os.RemoveAll(filepath.Join(d, "run")); err != nil {
		return err
	}
	// nsenter rather than `ip netns exec`: the latter mounts a fresh sysfs
	// on /sys, which hides the host's cgroup mounts from kubeadm's
	// SystemVerification preflight check ("cannot get a cgroup mount point").
	args := []string{"--net=/run/netns/" + nsPrefix + n.name, "unshare", "--mount", "--uts", "--propagation", "private", "--"}
	if e.o.real {
		if err := e.firstBoot(n); err != nil {
			return err
		}
		args = append(args, e.machineArgs(n, agentArgs)...)
	} else {
		args = append(args, e.self, "node", "--dir", d, "--ip", n.ip(), "--agent", e.o.agent, "--time-scale", e.o.timeScale, "--version", e.o.version,
			"--agent-args", strings.Join(agentArgs, " "))
	}
	cmd := exec.Command("nsenter", args...)
	cmd.Env = append(os.Environ(),
		"PATH="+e.bin+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"REHEARSAL_KUBERNETES_VERSION="+e.o.version)
	out, err := os.OpenFile(filepath.Join(d, "node.stderr"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	e.track(n.name, cmd)
	e.logf("booted %s (%s, %s)", n.name, n.role, n.ip())
	return nil
}

// prepare creates a node the first time it is named: its files and its
// network namespace, cable still unplugged.
func (e *env) prepare(n nodeSpec) error {
	if _, ok := e.specs[n.name]; ok {
		return nil
	}
	if n.source == "" {
		n.source = e.cluster
	}
	if e.o.real {
		if err := e.machineSetup(n); err != nil {
			return err
		}
	} else if err := e.place(n); err != nil {
		return err
	}
	if err := e.addNode(n); err != nil {
		return err
	}
	e.specs[n.name] = n
	return nil
}

// kill is a power cut: every process of the node dies at once.
func (e *env) kill(name string) {
	e.mu.Lock()
	cmd := e.procs[name]
	delete(e.procs, name)
	e.mu.Unlock()
	if cmd != nil && cmd.Process != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		waitGone(cmd.Process.Pid)
	}
	if _, ok := e.specs[name]; ok {
		if e.o.real {
			// The pods' processes, then the kernel's network state of the
			// machine (CNI bridge, VXLAN, routes, netfilter rules, sysctls),
			// which a power cut loses too: boot makes a fresh namespace.
			killCgroup(nodeCgroup(name))
			_ = sh("ip", "netns", "del", nsPrefix+name)
			_ = sh("ip", "link", "del", nsPrefix+name)
		} else {
			e.powerOff(name)
		}
	}
	e.recordPIDs()
}

// waitGone waits until no process is left in the group.
func waitGone(pgid int) {
	for i := 0; i < 100; i++ {
		if err := syscall.Kill(-pgid, 0); err != nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (e *env) logf(format string, a ...any) {
	fmt.Printf("[%6.1fs] %s\n", time.Since(e.startOrNow()).Seconds(), fmt.Sprintf(format, a...))
}

// teardown kills every process of the scenario and removes its network.
// The mounts live in the nodes' mount namespaces and go with their last
// process.
func (e *env) teardown() {
	e.mu.Lock()
	var names []string
	for name := range e.procs {
		names = append(names, name)
	}
	e.mu.Unlock()
	for _, n := range names {
		e.kill(n)
	}
	for name := range e.specs {
		_ = sh("ip", "netns", "del", nsPrefix+name)
		_ = sh("ip", "link", "del", nsPrefix+name)
	}
	_ = sh("ip", "link", "del", bridgeName)
	if e.o.real {
		cleanCgroups()
		e.pruneDisks()
	}
	_ = os.Remove(filepath.Join(e.o.work, "pgids"))
}

// teardownLeftovers removes what a killed earlier run left behind.
func teardownLeftovers(work string) {
	if data, err := os.ReadFile(filepath.Join(work, "pgids")); err == nil {
		for _, f := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
				_ = syscall.Kill(-pid, syscall.SIGKILL)
				waitGone(pid)
			}
		}
		_ = os.Remove(filepath.Join(work, "pgids"))
	}
	cleanCgroups()
	restoreSysctls(work)
	deleteNetns(nsPrefix)
	_ = sh("ip", "link", "del", bridgeName)
}

// deleteNetns deletes every network namespace whose name starts with
// prefix, and every host link so named (the nodes' veths: one outlives its
// namespace's name while a process still holds the namespace).
func deleteNetns(prefix string) {
	if out, err := exec.Command("ip", "netns", "list").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
				_ = sh("ip", "netns", "del", f[0])
			}
		}
	}
	if out, err := exec.Command("ip", "-o", "link", "show").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			// "7: krh-cp1@if2: <BROADCAST,...": the name, up to "@" or ":".
			if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], prefix) {
				name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
				_ = sh("ip", "link", "del", name)
			}
		}
	}
}

// agentStatus is the agent's /run/kiln/status.json.
type agentStatus struct {
	Node      string `json:"node"`
	Role      string `json:"role"`
	Phase     string `json:"phase"`
	State     string `json:"state"`
	Attempt   int    `json:"attempt"`
	LastError string `json:"lastError"`
	Permanent bool   `json:"permanent"`
}

func (e *env) status(name string) (agentStatus, error) {
	var st agentStatus
	data, err := os.ReadFile(filepath.Join(e.dir, "nodes", name, "run", "kiln", "status.json"))
	if err != nil {
		return st, err
	}
	err = json.Unmarshal(data, &st)
	return st, err
}

// agentExits lists the exit codes of the node's agent runs.
func (e *env) agentExits(name string) []int {
	data, _ := os.ReadFile(filepath.Join(e.dir, "nodes", name, "agent-exits"))
	var out []int
	for _, f := range strings.Fields(string(data)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

func (e *env) agentLog(name string) string {
	data, _ := os.ReadFile(filepath.Join(e.dir, "nodes", name, "agent.log"))
	return string(data)
}

func (e *env) nodePath(name string, p ...string) string {
	return filepath.Join(append([]string{e.dir, "nodes", name}, p...)...)
}

// waitUntil polls cond every second until it holds, printing its progress
// when it changes; it fails at the scenario's deadline.
func (e *env) waitUntil(ctx context.Context, what string, cond func(ctx context.Context) (bool, string)) error {
	last := ""
	for {
		ok, why := cond(ctx)
		if ok {
			return nil
		}
		if strings.Contains(why, "FAILED PERMANENTLY") {
			return fmt.Errorf("%s: %s", what, why)
		}
		if why != last {
			e.logf("waiting for %s: %s", what, why)
			last = why
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: gave up: %s", what, last)
		case <-time.After(time.Second):
		}
	}
}
