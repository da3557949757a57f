package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
)

// The real nodes' side of the orchestrator: the OS layer every machine
// mounts (machine.go), what the cluster file says for this host, and the
// machine's boot.

// Versions of the node's runtime, as test/tools/build.sh node-v1.X.Y
// builds them.
const (
	containerdVersion = "v2.2.9"
	runcVersion       = "v1.3.7"
	cniVersion        = "v1.9.1"
)

// cniPlugins are the standard plugins a node has in /opt/cni/bin (flannel
// adds its own from its DaemonSet's init container).
var cniPlugins = []string{"bridge", "host-local", "loopback", "portmap"}

// The OS's units and files the machines get from osLayer. Flatcar's
// containerd.service reads /usr/share/containerd/config.toml (systemd
// cgroups) unless kiln's drop-in resets ExecStart; Flatcar's Kubernetes
// sysext brings kubelet.service with kubeadm's drop-in, which reads
// kubeadm's flags file and /etc/default/kubelet.
const (
	flatcarContainerdUnit = `[Unit]
Description=containerd container runtime (as Flatcar ships it)
After=network.target

[Service]
Delegate=yes
Environment=CONTAINERD_CONFIG=/usr/share/containerd/config.toml
ExecStart=/usr/bin/containerd --config ${CONTAINERD_CONFIG}
KillMode=process
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
`
	flatcarContainerdConfig = `# The OS's own containerd configuration (a stand-in for Flatcar's: systemd
# cgroups, CNI in /opt/cni/bin). On this host's machines it cannot run pods:
# kiln's air-gapped nodes must not use it.
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
SystemdCgroup = true
[plugins."io.containerd.grpc.v1.cri".cni]
bin_dir = "/opt/cni/bin"
conf_dir = "/etc/cni/net.d"
`
	sysextKubeletUnit = `[Unit]
Description=kubelet: The Kubernetes Node Agent
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
`
	kubeadmDropIn = `[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
`
)

// buildOSLayer writes the OS layer of the scenario's machines: the
// binaries built for the version linked where Flatcar (containerd, ctr,
// runc in /usr/bin) and its merged Kubernetes sysext (kubelet, kubeadm,
// kubectl) have them, the CNI plugins in /opt/cni/bin, and the units.
func (e *env) buildOSLayer() error {
	d := filepath.Join(e.dir, "os")
	bins := map[string]string{
		"usr/bin/kubelet":                 "kubelet-" + e.o.version,
		"usr/bin/kubeadm":                 "kubeadm-" + e.o.version,
		"usr/bin/kubectl":                 "kubectl-" + e.o.version,
		"usr/bin/containerd":              "containerd-" + containerdVersion,
		"usr/bin/ctr":                     "ctr-" + containerdVersion,
		"usr/bin/containerd-shim-runc-v2": "containerd-shim-runc-v2-" + containerdVersion,
		"usr/bin/runc":                    "runc-" + runcVersion,
	}
	for _, p := range cniPlugins {
		bins["opt/cni/bin/"+p] = "cni-" + p + "-" + cniVersion
	}
	for at, tool := range bins {
		t := filepath.Join(e.o.tools, tool)
		if _, err := os.Stat(t); err != nil {
			return fmt.Errorf("%s missing: run test/tools/build.sh node-%s", t, e.o.version)
		}
		if err := os.MkdirAll(filepath.Join(d, filepath.Dir(at)), 0o755); err != nil {
			return err
		}
		if err := os.Symlink(t, filepath.Join(d, at)); err != nil {
			return err
		}
	}
	files := map[string]string{
		"usr/lib/systemd/system/containerd.service":                flatcarContainerdUnit,
		"usr/share/containerd/config.toml":                         flatcarContainerdConfig,
		"usr/lib/systemd/system/kubelet.service":                   sysextKubeletUnit,
		"usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf": kubeadmDropIn,
	}
	// Flatcar keeps its kernel modules in /usr/lib/modules (/lib is a
	// link to usr/lib there as on Debian); kube-proxy's DaemonSet mounts
	// /lib/modules. This host's kernel has its modules built in: the
	// folder stays empty.
	if err := os.MkdirAll(filepath.Join(d, "usr/lib/modules"), 0o755); err != nil {
		return err
	}
	for at, text := range files {
		if err := os.MkdirAll(filepath.Join(d, filepath.Dir(at)), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(d, at), []byte(text), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// hostSettings is what the cluster file says for this test host, through
// kiln's own escape hatches (a user's machine with the same limits needs
// the same): the kubelet on cgroupfs (PID 1 is not systemd) and allowed on
// cgroup v1 (Kubernetes >= 1.35 refuses it otherwise), and a containerd
// drop-in that restricts oom_score_adj (this VM lacks CAP_SYS_RESOURCE;
// runc fails without it) and drives cgroupfs.
func hostSettings(dir string) (string, error) {
	const snippet = "rehearsal-containerd.bu"
	bu := `variant: flatcar
version: 1.1.0
storage:
  files:
    - path: /etc/containerd/conf.d/50-rehearsal-host.toml
      mode: 0644
      contents:
        inline: |
          # The rehearsal's host: no CAP_SYS_RESOURCE, no systemd as PID 1.
          version = 2
          [plugins."io.containerd.grpc.v1.cri"]
          restrict_oom_score_adj = true
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
`
	if err := os.WriteFile(filepath.Join(dir, snippet), []byte(bu), 0o644); err != nil {
		return "", err
	}
	return `kubeadmPatches:
  - target: kubeletconfiguration
    type: merge
    patch: |
      cgroupDriver: cgroupfs
      failCgroupV1: false
butane:
  - ` + snippet + "\n", nil
}

// machineSetup prepares a machine's host side before its first boot: its
// cgroup in every hierarchy, and its kubelet's cgroup root (each kubelet
// needs its own, and the kubelet ConfigMap is cluster-wide) in
// /etc/default/kubelet, which kubeadm's drop-in reads: the file a site
// would use for per-machine kubelet flags.
func (e *env) machineSetup(n nodeSpec) error {
	if err := makeCgroup(nodeCgroup(n.name)); err != nil {
		return err
	}
	p := e.nodePath(n.name, "etc", "default", "kubelet")
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(p, []byte("KUBELET_EXTRA_ARGS=--cgroup-root="+nodeCgroup(n.name)+"\n"), 0o644); err != nil {
		return err
	}
	return os.WriteFile(e.nodePath(n.name, "etc", "resolv.conf"), []byte(lanResolvConf), 0o644)
}

// lanResolvConf names the test host as the LAN's DNS server. Nothing
// answers there, and a lookup fails at once (ICMP port unreachable) where
// the host's own resolver, which the nodes cannot reach, would time out:
// the kubelet looks up its host name whenever it computes the node's
// status (on Flatcar, systemd-resolved answers that from the local
// addresses), and each lookup would cost 10 s. Flatcar's stub
// (127.0.0.53) would not do: no resolved runs here, so kubeadm points the
// kubelet at /etc/resolv.conf, and CoreDNS, forwarding to 127.0.0.53 in
// its own network namespace, would find itself (its loop plugin stops it).
const lanResolvConf = "nameserver " + hostIP + "\n"

// machineArgs is the command that boots a real node, inside its network
// namespace and fresh mount and UTS namespaces.
func (e *env) machineArgs(n nodeSpec, agentArgs []string) []string {
	return []string{e.self, "machine", "--dir", e.nodePath(n.name), "--os", filepath.Join(e.dir, "os"),
		"--name", n.name, "--ip", n.ip(), "--time-scale", e.o.timeScale, "--agent-args", strings.Join(agentArgs, " ")}
}

// pruneDisks removes, once a scenario's machines are off, the bulk of what
// they stored (containerd's images and snapshots, the kubelet's and etcd's
// data, the air-gapped payload Ignition fetched: about 1 GB a node) and the
// PXE bundle, keeping their logs and configuration. A full disk would
// otherwise end the next scenarios in the kubelet's DiskPressure eviction
// (imagefs.available < 15%).
func (e *env) pruneDisks() {
	for name := range e.specs {
		_ = os.RemoveAll(e.nodePath(name, "data"))
		_ = os.RemoveAll(e.nodePath(name, "var", "lib", "kiln", "payload"))
	}
	_ = os.RemoveAll(filepath.Join(e.dir, "pxe"))
}

// cleanCgroups kills what is left in every rehearsal node's cgroup (a
// killed run's pods included) and removes the cgroups.
func cleanCgroups() {
	for _, h := range hierarchies() {
		ms, _ := filepath.Glob(filepath.Join(h, nsPrefix+"*"))
		for _, m := range ms {
			killCgroup("/" + filepath.Base(m))
		}
	}
}

// firstBoot provisions a machine the first time it boots: the real
// Ignition writes its disk (the node's directory) from kiln serve. Later
// boots keep the disk, as a machine installed to disk does.
func (e *env) firstBoot(n nodeSpec) error {
	mark := e.nodePath(n.name, "provisioned")
	if _, err := os.Stat(mark); err == nil {
		return nil
	}
	if err := e.provision(n, e.nodePath(n.name)); err != nil {
		return err
	}
	return os.WriteFile(mark, nil, 0o644)
}

// hostSysctl is a setting of the test host's kernel that the real nodes
// need for the run: the nodes share one kernel, and some settings exist
// only in its initial namespaces.
type hostSysctl struct {
	path string
	want func(cur int) int // the value the run needs, given the current one
	why  string
}

// runSysctls are the host settings of a real-node run.
var runSysctls = []hostSysctl{
	{"/proc/sys/fs/inotify/max_user_instances", func(cur int) int { return max(cur, 1024) },
		"every node's kubelet and containerd take inotify instances, all as root on one kernel (Debian's default is 128)"},
	// kube-proxy sets nf_conntrack_max to max(maxPerCore * CPUs, min)
	// (its defaults 32768 and 131072) unless it holds that value already;
	// the file is read-only outside the initial network namespace, where
	// the nodes' kube-proxies run, so kube-proxy would exit. On a real node
	// it writes this very value itself.
	{"/proc/sys/net/netfilter/nf_conntrack_max", func(int) int { return max(32768*runtime.NumCPU(), 131072) },
		"kube-proxy's value: it cannot write it from a node's network namespace"},
}

// setRunSysctls applies runSysctls, saying so, and records the old values
// in work/host-sysctls first, so that the next run puts them back after a
// SIGKILL (restoreSysctls); restore puts them back now.
func setRunSysctls(work string) (restore func(), err error) {
	record := filepath.Join(work, "host-sysctls")
	var saved strings.Builder
	type change struct{ path, want string }
	var changes []change
	for _, s := range runSysctls {
		old, err := os.ReadFile(s.path)
		if err != nil {
			return nil, err
		}
		cur, err := strconv.Atoi(strings.TrimSpace(string(old)))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.path, err)
		}
		if want := s.want(cur); want != cur {
			fmt.Fprintf(&saved, "%s %d\n", s.path, cur)
			changes = append(changes, change{s.path, strconv.Itoa(want)})
			name := strings.ReplaceAll(strings.TrimPrefix(s.path, "/proc/sys/"), "/", ".")
			fmt.Printf("NOTE: %s set from %d to %d for the run: %s\n", name, cur, want, s.why)
		}
	}
	restore = func() { restoreSysctls(work) }
	if len(changes) == 0 {
		return restore, nil
	}
	if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(record, []byte(saved.String()), 0o644); err != nil {
		return nil, err
	}
	for _, c := range changes {
		if err := os.WriteFile(c.path, []byte(c.want), 0o644); err != nil {
			restore()
			return nil, err
		}
	}
	return restore, nil
}

// restoreSysctls puts back the host values work/host-sysctls records
// (lines "PATH VALUE") and removes the record.
func restoreSysctls(work string) {
	record := filepath.Join(work, "host-sysctls")
	data, err := os.ReadFile(record)
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) == 2 && strings.HasPrefix(f[0], "/proc/sys/") {
			_ = os.WriteFile(f[0], []byte(f[1]), 0o644)
		}
	}
	_ = os.Remove(record)
}
