package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// manifestDir is where kubeadm writes static pods (the kubelet's
// staticPodPath in the config kubeadm writes).
const manifestDir = "/etc/kubernetes/manifests"

// staticPod is one manifest and the process standing in for its container.
type staticPod struct {
	file    string
	hash    string
	pod     *corev1.Pod
	started time.Time

	mu      sync.Mutex
	cmd     *exec.Cmd
	running bool
	stop    chan struct{}
	stopped chan struct{}
}

// podManager runs the node's static pods: one process per manifest (its
// first container's command and args; command[0] found on PATH, where the
// rehearsal puts the binaries built for the cluster's version and Debian
// has keepalived and haproxy; volumes mounted elsewhere than their host
// path in its own mount namespace, see podExec), restarted when it exits
// or the manifest changes, stopped when the manifest goes.
type podManager struct {
	logDir string
	mu     sync.Mutex
	pods   map[string]*staticPod // by file name
}

func newPodManager(logDir string) *podManager {
	return &podManager{logDir: logDir, pods: map[string]*staticPod{}}
}

// snapshot returns the static pods whose process runs now.
func (m *podManager) snapshot() []*staticPod {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*staticPod
	for _, p := range m.pods {
		p.mu.Lock()
		if p.running {
			out = append(out, p)
		}
		p.mu.Unlock()
	}
	return out
}

func (m *podManager) run(ctx context.Context) {
	_ = os.MkdirAll(m.logDir, 0o755)
	for {
		m.sync()
		select {
		case <-ctx.Done():
			return
		case <-time.After(300 * time.Millisecond):
		}
	}
}

func (m *podManager) sync() {
	entries, err := os.ReadDir(manifestDir)
	if err != nil && !os.IsNotExist(err) {
		log.Printf("pods: %v", err)
		return
	}
	seen := map[string]bool{}
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(manifestDir, e.Name()))
		if err != nil {
			continue
		}
		sum := sha256.Sum256(data)
		hash := hex.EncodeToString(sum[:16])
		seen[e.Name()] = true
		m.mu.Lock()
		old := m.pods[e.Name()]
		m.mu.Unlock()
		if old != nil && old.hash == hash {
			continue
		}
		pod := &corev1.Pod{}
		if err := yaml.Unmarshal(data, pod); err != nil || len(pod.Spec.Containers) == 0 {
			// kubeadm writes manifests atomically; a bad one is logged and
			// looked at again when it changes.
			log.Printf("pods: %s: cannot read the manifest: %v", e.Name(), err)
			continue
		}
		if old != nil {
			log.Printf("pods: %s changed: restarting %s", e.Name(), pod.Name)
			old.halt()
		}
		p := &staticPod{file: e.Name(), hash: hash, pod: pod, stop: make(chan struct{}), stopped: make(chan struct{})}
		m.mu.Lock()
		m.pods[e.Name()] = p
		m.mu.Unlock()
		go m.supervise(p)
	}
	m.mu.Lock()
	var gone []*staticPod
	for name, p := range m.pods {
		if !seen[name] {
			gone = append(gone, p)
			delete(m.pods, name)
		}
	}
	m.mu.Unlock()
	for _, p := range gone {
		log.Printf("pods: %s removed: stopping %s", p.file, p.pod.Name)
		p.halt()
	}
}

func (m *podManager) stopAll() {
	m.mu.Lock()
	pods := m.pods
	m.pods = map[string]*staticPod{}
	m.mu.Unlock()
	for _, p := range pods {
		p.halt()
	}
}

// halt stops the pod's process (SIGTERM, then SIGKILL after 10 s) and
// waits for it.
func (p *staticPod) halt() {
	close(p.stop)
	<-p.stopped
}

func (m *podManager) supervise(p *staticPod) {
	defer close(p.stopped)
	c := p.pod.Spec.Containers[0]
	argv := append(append([]string{}, c.Command...), c.Args...)
	if len(argv) == 0 {
		log.Printf("pods: %s: container %s has no command", p.file, c.Name)
		<-p.stop
		return
	}
	binds, err := podBinds(p.pod)
	if err != nil {
		log.Printf("pods: %s: %v", p.file, err)
		<-p.stop
		return
	}
	self, err := os.Executable()
	if err != nil {
		log.Printf("pods: %v", err)
		<-p.stop
		return
	}
	backoff := time.Second
	for {
		bin, err := exec.LookPath(argv[0])
		if err != nil {
			log.Printf("pods: %s: no binary for %s (image %s): %v", p.file, argv[0], c.Image, err)
			select {
			case <-p.stop:
				return
			case <-time.After(5 * time.Second):
				continue
			}
		}
		out, err := os.OpenFile(filepath.Join(m.logDir, p.pod.Name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			log.Printf("pods: %v", err)
			<-p.stop
			return
		}
		cmd := exec.Command(bin, argv[1:]...)
		cmd.Args[0] = argv[0]
		if len(binds) > 0 {
			// The process gets its own mount namespace with its volumes,
			// as in a container; the node's files stay as they are.
			args := []string{podExecCommand}
			for _, b := range binds {
				args = append(args, "--bind", b)
			}
			cmd = exec.Command(self, append(append(args, "--", bin), argv...)...)
			cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
		}
		cmd.Stdout, cmd.Stderr = out, out
		cmd.Dir = "/"
		env := os.Environ()
		for _, e := range c.Env {
			env = append(env, e.Name+"="+e.Value)
		}
		cmd.Env = env
		fmt.Fprintf(out, "=== rehearsal: start %s (%s) at %s\n", p.pod.Name, p.hash, time.Now().UTC().Format(time.RFC3339Nano))
		if err := cmd.Start(); err != nil {
			out.Close()
			log.Printf("pods: start %s: %v", p.pod.Name, err)
			select {
			case <-p.stop:
				return
			case <-time.After(backoff):
				continue
			}
		}
		started := time.Now()
		p.mu.Lock()
		p.cmd, p.running, p.started = cmd, true, started
		p.mu.Unlock()
		log.Printf("pods: started %s (pid %d)", p.pod.Name, cmd.Process.Pid)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-p.stop:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-done
			}
			out.Close()
			p.mu.Lock()
			p.running = false
			p.mu.Unlock()
			log.Printf("pods: stopped %s", p.pod.Name)
			return
		case err := <-done:
			out.Close()
			p.mu.Lock()
			p.running = false
			p.mu.Unlock()
			if time.Since(started) > 30*time.Second {
				backoff = time.Second
			}
			log.Printf("pods: %s exited (%v); restarting in %s", p.pod.Name, err, backoff)
			select {
			case <-p.stop:
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 10*time.Second)
		}
	}
}

// podBinds lists the pod's first container's hostPath volumes that its
// volumeMounts put elsewhere than their host path (kubeadm's own pods mount
// every host path in place), as HOSTPATH=MOUNTPATH. Mount paths must lie
// under /etc, which the node's overlay keeps off the test host.
func podBinds(pod *corev1.Pod) ([]string, error) {
	hostPaths := map[string]string{}
	for _, v := range pod.Spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	var out []string
	for _, vm := range pod.Spec.Containers[0].VolumeMounts {
		src, ok := hostPaths[vm.Name]
		if !ok || src == vm.MountPath {
			continue
		}
		if !strings.HasPrefix(vm.MountPath, "/etc/") || !vm.ReadOnly {
			return nil, fmt.Errorf("volume %s: the emulator mounts host paths read-only under /etc only, not %s", vm.Name, vm.MountPath)
		}
		out = append(out, src+"="+vm.MountPath)
	}
	return out, nil
}

// podExecCommand is the hidden subcommand that starts a static pod's
// process in its own mount namespace (the orchestrator's node emulator
// starts it with CLONE_NEWNS).
const podExecCommand = "pod-exec"

// podExec: rehearsal pod-exec --bind HOST=MOUNT... -- BINARY ARGV0 ARGS...
// Makes the new mount namespace private, gives each mount path's folder a
// fresh tmpfs (a container sees its image there, not the node's files),
// binds each host file read-only onto its mount path, and execs the
// binary.
func podExec(args []string) error {
	var binds []string
	for len(args) > 1 && args[0] == "--bind" {
		binds, args = append(binds, args[1]), args[2:]
	}
	if len(args) < 3 || args[0] != "--" {
		return errors.New("usage: pod-exec --bind HOST=MOUNT... -- BINARY ARGV0 ARGS...")
	}
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	fresh := map[string]bool{}
	for _, b := range binds {
		src, dst, _ := strings.Cut(b, "=")
		dir := filepath.Dir(dst)
		if !fresh[dir] {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return err
			}
			if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "mode=0755"); err != nil {
				return fmt.Errorf("tmpfs on %s: %w", dir, err)
			}
			fresh[dir] = true
		}
		if err := os.WriteFile(dst, nil, 0o600); err != nil {
			return err
		}
		if err := syscall.Mount(src, dst, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s on %s: %w", src, dst, err)
		}
		if err := syscall.Mount("", dst, "", syscall.MS_BIND|syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("read-only %s: %w", dst, err)
		}
	}
	return syscall.Exec(args[1], args[2:], os.Environ())
}
