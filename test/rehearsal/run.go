package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
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

// The rehearsal network: one bridge, HAProxy on the bridge's address (the
// cluster's controlPlaneEndpoint), nodes as network namespaces.
const (
	bridgeName = "krh0"
	netPrefix  = "10.213.77."
	hostIP     = netPrefix + "1"
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
	// ignorePreflight is added to the rendered kubeadm configs'
	// nodeRegistration.ignorePreflightErrors (rehearsal only).
	ignorePreflight string
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
	procs   map[string]*exec.Cmd // running node emulators by name; "haproxy"
	specs   map[string]nodeSpec
	start   time.Time
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
	fl.StringVar(&o.ignorePreflight, "ignore-preflight", "auto", "preflight checks to ignore, comma separated, added to the nodes' kubeadm configs; auto: SystemVerification for Kubernetes >= 1.37 on a cgroup v1 host (kubeadm 1.37 refuses cgroup v1), else none")
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
			fmt.Printf("NOTE: cgroup v1 host and Kubernetes %s: the nodes' kubeadm configs ignore preflight check SystemVerification (rehearsal only)\n", o.version)
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
		}
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
		if err == nil {
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
// directory, the bridge and HAProxy.
func newEnv(o runOptions, self, scenario string) (*env, error) {
	e := &env{o: o, self: self, dir: filepath.Join(o.work, scenario), procs: map[string]*exec.Cmd{}, specs: map[string]nodeSpec{}}
	if err := os.RemoveAll(e.dir); err != nil {
		return e, err
	}
	e.bin = filepath.Join(e.dir, "bin")
	if err := os.MkdirAll(e.bin, 0o755); err != nil {
		return e, err
	}
	links := map[string]string{
		"kubeadm":                 "kubeadm-" + o.version,
		"kubectl":                 "kubectl-" + o.version,
		"kube-apiserver":          "kube-apiserver-" + o.version,
		"kube-controller-manager": "kube-controller-manager-" + o.version,
		"kube-scheduler":          "kube-scheduler-" + o.version,
		"etcd":                    "etcd-" + o.etcd,
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
		if err := os.Symlink(self, filepath.Join(e.bin, name)); err != nil {
			return e, err
		}
	}
	e.cluster = filepath.Join(e.dir, "cluster")
	if err := kilnInit(o, e.cluster); err != nil {
		return e, err
	}
	if err := e.network(); err != nil {
		return e, err
	}
	if err := e.haproxy([]string{netPrefix + "11", netPrefix + "12", netPrefix + "13"}); err != nil {
		return e, err
	}
	return e, nil
}

func kilnInit(o runOptions, dir string) error {
	out, err := exec.Command(o.kiln, "init", cluster, "--endpoint", hostIP+":6443", "--kubernetes-version", o.version, "--dir", dir).CombinedOutput()
	if err != nil {
		return fmt.Errorf("kiln init: %v: %s", err, out)
	}
	return nil
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
// named eth0 inside with a fixed MAC (the hostname template uses it), its
// own IP, a default route to the bridge, and ip_forward on (a fresh
// namespace has it off; the agent sets it too).
func (e *env) addNode(n nodeSpec) error {
	ns, host := nsPrefix+n.name, nsPrefix+n.name
	for _, c := range [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns},
		{"ip", "link", "set", host, "master", bridgeName, "up"},
		{"ip", "-n", ns, "link", "set", "eth0", "address", n.mac()},
		{"ip", "-n", ns, "addr", "add", n.ip() + "/24", "dev", "eth0"},
		{"ip", "-n", ns, "link", "set", "eth0", "up"},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
		{"ip", "-n", ns, "route", "add", "default", "via", hostIP},
		{"ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
	} {
		if err := sh(c...); err != nil {
			return err
		}
	}
	return nil
}

func (e *env) haproxy(backends []string) error {
	var b strings.Builder
	fmt.Fprintf(&b, `global
	maxconn 2000
defaults
	mode tcp
	timeout connect 2s
	timeout client 1h
	timeout server 1h
frontend kube-apiserver
	bind %s:6443
	default_backend control-planes
backend control-planes
	option httpchk GET /readyz
	http-check expect status 200
	default-server check check-ssl verify none inter 1s fall 2 rise 1
`, hostIP)
	for i, ip := range backends {
		fmt.Fprintf(&b, "\tserver cp%d %s:6443\n", i+1, ip)
	}
	cfg := filepath.Join(e.dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o644); err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(e.dir, "haproxy.log"))
	if err != nil {
		return err
	}
	cmd := exec.Command("haproxy", "-f", cfg, "-db")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("haproxy: %w", err)
	}
	e.track("haproxy", cmd)
	return nil
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

// place writes a node's files where Ignition would: /etc/kiln 0700, every
// file 0600; the init node also gets the cluster PKI in /etc/kiln/pki.
func (e *env) place(n nodeSpec) error {
	d := filepath.Join(e.dir, "nodes", n.name)
	kiln := filepath.Join(d, "etc", "kiln")
	if err := os.MkdirAll(kiln, 0o700); err != nil {
		return err
	}
	render := func(format string) ([]byte, error) {
		cmd := exec.Command(e.o.kiln, "-c", filepath.Join(n.source, "cluster.yaml"), "render", "--role", n.role, "--format", format)
		out, err := cmd.Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return nil, fmt.Errorf("kiln render --role %s --format %s: %v: %s", n.role, format, err, ee.Stderr)
			}
			return nil, err
		}
		return out, nil
	}
	files := map[string]string{"node.yaml": "node", "kubeadm-join.yaml": "kubeadm-join"}
	if n.role == "init" {
		files["kubeadm-init.yaml"] = "kubeadm"
	}
	for name, format := range files {
		data, err := render(format)
		if err != nil {
			return err
		}
		if e.o.ignorePreflight != "" && format != "node" {
			var list strings.Builder
			for _, c := range strings.Split(e.o.ignorePreflight, ",") {
				fmt.Fprintf(&list, "\n    - %s", strings.TrimSpace(c))
			}
			data = []byte(strings.ReplaceAll(string(data), "\nnodeRegistration:\n", "\nnodeRegistration:\n  ignorePreflightErrors:"+list.String()+"\n"))
		}
		if err := os.WriteFile(filepath.Join(kiln, name), data, 0o600); err != nil {
			return err
		}
	}
	if n.role == "init" {
		for _, f := range []string{"ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key", "sa.key", "sa.pub"} {
			data, err := os.ReadFile(filepath.Join(n.source, "secrets", "pki", f))
			if err != nil {
				return err
			}
			dst := filepath.Join(kiln, "pki", f)
			if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
				return err
			}
			if err := os.WriteFile(dst, data, 0o600); err != nil {
				return err
			}
		}
	}
	return nil
}

// boot creates (first time) and starts a node: its files, its namespace,
// and the node emulator in fresh mount and UTS namespaces. /run starts
// empty on every boot, like a tmpfs.
func (e *env) boot(n nodeSpec, agentArgs ...string) error {
	if e.start.IsZero() {
		e.start = time.Now()
	}
	d := filepath.Join(e.dir, "nodes", n.name)
	if _, ok := e.specs[n.name]; !ok {
		if n.source == "" {
			n.source = e.cluster
		}
		if err := e.place(n); err != nil {
			return err
		}
		if err := e.addNode(n); err != nil {
			return err
		}
		e.specs[n.name] = n
	}
	if err := os.RemoveAll(filepath.Join(d, "run")); err != nil {
		return err
	}
	// nsenter rather than `ip netns exec`: the latter mounts a fresh sysfs
	// on /sys, which hides the host's cgroup mounts from kubeadm's
	// SystemVerification preflight check ("cannot get a cgroup mount point").
	args := []string{"--net=/run/netns/" + nsPrefix + n.name, "unshare", "--mount", "--uts", "--propagation", "private", "--",
		e.self, "node", "--dir", d, "--ip", n.ip(), "--agent", e.o.agent, "--time-scale", e.o.timeScale, "--version", e.o.version,
		"--agent-args", strings.Join(agentArgs, " ")}
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
	if out, err := exec.Command("ip", "netns", "list").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], nsPrefix) {
				_ = sh("ip", "netns", "del", f[0])
			}
		}
	}
	_ = sh("ip", "link", "del", bridgeName)
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
