package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A real node: one process per machine, started by the orchestrator inside
// the node's network namespace and fresh mount and UTS namespaces. It
// builds the machine's filesystem from three layers and then acts as its
// systemd (units.go): the real containerd, kubelet and kiln-firstboot run
// as the node's enabled units, and every container they start runs under
// the node's cgroup.
//
// Layers, top first:
//   - the node's own disk: dir/etc, dir/opt and dir/var/lib, the upper
//     layers of its /etc, /opt and /var/lib, which the real Ignition wrote
//     before the first boot (its --root is dir) and the node then changes;
//     dir/data/* for the folders containerd's overlay snapshotter, the
//     kubelet and etcd need on a plain filesystem, dir/varlog as /var/log,
//     and dir/run as /run (emptied at every boot);
//   - the OS (osLayer: what Flatcar and its Kubernetes sysext put in /usr
//     and /opt: containerd, runc, kubelet, kubeadm, kubectl, the CNI
//     plugins and the kubelet's unit), read-only like Flatcar's /usr;
//   - the test host's own /usr, /etc, /opt and /var/lib.

type machineOptions struct {
	dir       string // per-node state on the host
	osLayer   string // the OS's files (usr/, opt/)
	name      string
	ip        string
	timeScale float64
	agentArgs string
}

func machineMain(args []string) error {
	var o machineOptions
	fl := flag.NewFlagSet("machine", flag.ContinueOnError)
	fl.StringVar(&o.dir, "dir", "", "node state directory on the host")
	fl.StringVar(&o.osLayer, "os", "", "the OS layer (usr/, opt/)")
	fl.StringVar(&o.name, "name", "", "node name (its cgroup is /"+nsPrefix+"NAME)")
	fl.StringVar(&o.ip, "ip", "", "node IP")
	fl.Float64Var(&o.timeScale, "time-scale", 1, "divides every unit's RestartSec and StartLimitIntervalSec, and is the agent's KILN_FIRSTBOOT_TIME_SCALE")
	fl.StringVar(&o.agentArgs, "agent-args", "", "arguments appended to kiln-firstboot's ExecStart (space separated)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(o.dir, "node.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	log.SetOutput(logf)
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.Printf("machine %s starting: pid %d, ip %s", o.name, os.Getpid(), o.ip)
	nodeLayers = []string{o.dir, o.osLayer}
	if err := joinCgroup(nodeCgroup(o.name) + "/system"); err != nil {
		return err
	}
	if err := mountMachine(o); err != nil {
		return fmt.Errorf("mount the machine's filesystems: %w", err)
	}
	// The agent's own waits and backoffs, scaled like the units' (the
	// units inherit this environment).
	if err := os.Setenv("KILN_FIRSTBOOT_TIME_SCALE", strconv.FormatFloat(o.timeScale, 'g', -1, 64)); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	m := &manager{
		scale:  o.timeScale,
		extra:  map[string]string{agentUnit: o.agentArgs},
		active: map[string]*runningUnit{},
		logs: func(unit string) unitLog {
			if unit == agentUnit {
				return unitLog{out: filepath.Join(o.dir, "agent.log"), exits: filepath.Join(o.dir, "agent-exits")}
			}
			return unitLog{out: filepath.Join(o.dir, "logs", strings.TrimSuffix(unit, ".service")+".log")}
		},
	}
	if err := os.MkdirAll(filepath.Join(o.dir, "logs"), 0o755); err != nil {
		return err
	}
	if err := m.serveControl(ctx); err != nil {
		return err
	}
	for _, u := range bootUnits() {
		if err := m.start(ctx, u); err != nil {
			log.Printf("boot: %s: %v", u, err)
		} else {
			log.Printf("boot: started %s", u)
		}
	}
	<-ctx.Done()
	log.Printf("stopping")
	for _, u := range slices.Backward(bootUnits()) {
		m.stopUnit(u)
	}
	return nil
}

// agentUnit is kiln's first-boot unit (imagebuild/render.AgentUnit).
const agentUnit = "kiln-firstboot.service"

// bootUnits lists the enabled units systemd would start at boot that this
// machine can run, containerd and the kubelet first (the others are After=
// them). An enabled unit the node lacks (Flatcar's own services) is left
// out; one of the three that is not enabled is not started, as on a node.
func bootUnits() []string {
	seen := map[string]bool{}
	for _, l := range nodeLayers {
		for _, d := range unitDirs {
			ms, _ := filepath.Glob(filepath.Join(l, d, "*.service"))
			for _, m := range ms {
				if name := filepath.Base(m); enabled(name) {
					seen[name] = true
				}
			}
		}
	}
	for _, u := range []string{"containerd.service", "kubelet.service", agentUnit} {
		if !enabled(u) {
			log.Printf("boot: %s is not enabled", u)
		}
	}
	var out []string
	for _, u := range []string{"containerd.service", "kubelet.service"} {
		if seen[u] {
			out = append(out, u)
			delete(seen, u)
		}
	}
	var rest []string
	for u := range seen {
		rest = append(rest, u)
	}
	slices.Sort(rest)
	return append(out, rest...)
}

// mountMachine assembles the machine's filesystem (see the layers above).
// The mount namespace is the machine's own (unshare --mount, private
// propagation): nothing shows on the host, and all of it goes with the
// node's last process.
func mountMachine(o machineOptions) error {
	for _, d := range []string{"etc", "var/lib", "opt", "varlog", "run", "data/containerd", "data/kubelet", "data/etcd", "sysctl"} {
		if err := os.MkdirAll(filepath.Join(o.dir, d), 0o755); err != nil {
			return err
		}
	}
	type layer struct {
		target string
		lowers []string
		upper  string // "": read-only, like Flatcar's /usr
	}
	for _, l := range []layer{
		{"/usr", []string{filepath.Join(o.osLayer, "usr"), "/usr"}, ""},
		{"/etc", []string{"/etc"}, "etc"},
		{"/opt", []string{filepath.Join(o.osLayer, "opt"), "/opt"}, "opt"},
		{"/var/lib", []string{"/var/lib"}, "var/lib"},
	} {
		opts := "lowerdir=" + strings.Join(l.lowers, ":")
		if l.upper != "" {
			work := filepath.Join(o.dir, l.upper+".work")
			if err := os.MkdirAll(work, 0o755); err != nil {
				return err
			}
			opts += ",upperdir=" + filepath.Join(o.dir, l.upper) + ",workdir=" + work
		}
		if err := syscall.Mount("overlay", l.target, "overlay", 0, opts); err != nil {
			return fmt.Errorf("overlay on %s (%s): %w", l.target, opts, err)
		}
	}
	// containerd's overlay snapshotter cannot sit on overlayfs; the
	// kubelet's and etcd's folders live on the same plain filesystem.
	binds := [][2]string{
		{filepath.Join(o.dir, "data/containerd"), "/var/lib/containerd"},
		{filepath.Join(o.dir, "data/kubelet"), "/var/lib/kubelet"},
		{filepath.Join(o.dir, "data/etcd"), "/var/lib/etcd"},
		{filepath.Join(o.dir, "varlog"), "/var/log"},
		{filepath.Join(o.dir, "run"), "/run"},
	}
	for _, b := range binds {
		if err := os.MkdirAll(b[1], 0o755); err != nil {
			return err
		}
		if err := syscall.Mount(b[0], b[1], "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s on %s: %w", b[0], b[1], err)
		}
	}
	// A sysfs of the node's network namespace (the CNI plugins and the
	// kubelet read /sys/class/net), with the host's cgroup mounts kept.
	keep := "/run/rehearsal/host-cgroup"
	if err := os.MkdirAll(keep, 0o755); err != nil {
		return err
	}
	if err := syscall.Mount("/sys/fs/cgroup", keep, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("keep the cgroup mounts: %w", err)
	}
	if err := syscall.Mount("sysfs", "/sys", "sysfs", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("sysfs: %w", err)
	}
	if err := syscall.Mount(keep, "/sys/fs/cgroup", "", syscall.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move the cgroup mounts back: %w", err)
	}
	// The kubelet sets host-wide sysctls (vm.overcommit_memory,
	// kernel.panic, kernel.panic_on_oops): give each node plain files.
	for _, s := range hostSysctls {
		p := "/proc/sys/" + s
		cur, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		f := filepath.Join(o.dir, "sysctl", strings.ReplaceAll(s, "/", "."))
		if err := os.WriteFile(f, cur, 0o644); err != nil {
			return err
		}
		if err := syscall.Mount(f, p, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s on %s: %w", f, p, err)
		}
	}
	// Containers' mounts propagate as on a systemd host, where / is shared.
	return syscall.Mount("", "/", "", syscall.MS_SHARED|syscall.MS_REC, "")
}

// hostSysctls are the host-wide sysctls the kubelet writes.
var hostSysctls = []string{"vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"}

// cgroupRoot is where the host's cgroup hierarchies are mounted.
const cgroupRoot = "/sys/fs/cgroup"

// nodeCgroup is a node's cgroup, in every hierarchy: the kubelet's
// --cgroup-root, and the parent of the node's own processes.
func nodeCgroup(name string) string { return "/" + nsPrefix + name }

// hierarchies lists the mounted cgroup hierarchies (v1 controllers, the
// named systemd one and a hybrid host's unified v2).
func hierarchies() []string {
	ms, _ := filepath.Glob(filepath.Join(cgroupRoot, "*"))
	var out []string
	for _, m := range ms {
		if _, err := os.Stat(filepath.Join(m, "cgroup.procs")); err == nil {
			out = append(out, m)
		}
	}
	return out
}

// makeCgroup creates cg in every hierarchy; in cpuset it inherits its
// parent's CPUs and memory nodes (a v1 cpuset starts empty).
func makeCgroup(cg string) error {
	for _, h := range hierarchies() {
		p := h
		for _, part := range strings.Split(strings.Trim(cg, "/"), "/") {
			parent := p
			p = filepath.Join(p, part)
			if err := os.Mkdir(p, 0o755); err != nil && !os.IsExist(err) {
				return err
			}
			if filepath.Base(h) == "cpuset" {
				for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
					v, err := os.ReadFile(filepath.Join(parent, f))
					if err != nil {
						return err
					}
					if err := os.WriteFile(filepath.Join(p, f), v, 0o644); err != nil {
						return fmt.Errorf("%s: %w", filepath.Join(p, f), err)
					}
				}
			}
		}
	}
	return nil
}

// joinCgroup moves this process into cg (created) in every hierarchy.
func joinCgroup(cg string) error {
	if err := makeCgroup(cg); err != nil {
		return err
	}
	pid := []byte(strconv.Itoa(os.Getpid()))
	for _, h := range hierarchies() {
		if err := os.WriteFile(filepath.Join(h, cg, "cgroup.procs"), pid, 0o644); err != nil {
			return fmt.Errorf("join %s: %w", filepath.Join(h, cg), err)
		}
	}
	return nil
}

// killCgroup kills every process in cg and below, in every hierarchy,
// until none is left, then removes the cgroups (deepest first). Pods'
// processes are not in the node's process group (containerd's shims start
// their own sessions) but are always in its cgroup.
func killCgroup(cg string) {
	for round := 0; round < 50; round++ {
		left := 0
		for _, h := range hierarchies() {
			_ = filepath.WalkDir(filepath.Join(h, cg), func(p string, d os.DirEntry, err error) error {
				if err != nil || !d.IsDir() {
					return nil
				}
				data, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
				for _, f := range strings.Fields(string(data)) {
					if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
						_ = syscall.Kill(pid, syscall.SIGKILL)
						left++
					}
				}
				return nil
			})
		}
		if left == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, h := range hierarchies() {
		var dirs []string
		_ = filepath.WalkDir(filepath.Join(h, cg), func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for _, d := range slices.Backward(dirs) {
			_ = syscall.Rmdir(d)
		}
	}
}
