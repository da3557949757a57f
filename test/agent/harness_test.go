// Package agent_test runs the real kiln-firstboot binary on simulated
// nodes: stub kubeadm, kubectl, systemctl, modprobe and swapoff (./stub),
// a simulated cluster and load balancer (./sim), and node files rendered by
// kiln's own renderer.
package agent_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/render"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/test/agent/sim"
)

// timeScale divides the agent's intervals and kubeadm's timeouts: an hour
// of certificate uploads passes in 12 seconds.
const timeScale = 300

var bin struct {
	agent, stubs string
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kiln-agent-test")
	if err != nil {
		panic(err)
	}
	code := 1
	if err := build(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
	} else {
		code = m.Run()
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

func build(dir string) error {
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin.agent, bin.stubs = filepath.Join(dir, "kiln-firstboot"), filepath.Join(dir, "stubs")
	for _, b := range [][2]string{{bin.agent, "github.com/kilnproject/kiln/cmd/kiln-firstboot"}, {filepath.Join(bin.stubs, "kubeadm"), "github.com/kilnproject/kiln/test/agent/stub"}} {
		cmd := exec.Command(gobin, "build", "-o", b[0], b[1])
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build %s: %v\n%s", b[1], err, out)
		}
	}
	for _, name := range []string{"kubectl", "systemctl", "modprobe", "swapoff"} {
		if err := os.Link(filepath.Join(bin.stubs, "kubeadm"), filepath.Join(bin.stubs, name)); err != nil {
			return err
		}
	}
	return nil
}

// testCluster is a rendered cluster with its simulator.
type testCluster struct {
	t       *testing.T
	sim     *sim.Cluster
	cluster *cluster.Cluster
	secrets *secrets.Secrets
	dir     string
}

type clusterOptions struct {
	tokenTTL, uploadWindow string
}

func newCluster(t *testing.T, o clusterOptions) *testCluster {
	t.Helper()
	s, err := sim.New(timeScale)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	extra := ""
	if o.tokenTTL != "" {
		extra += "\n  tokenTTL: " + o.tokenTTL
	}
	if o.uploadWindow != "" {
		extra += "\n  certificateUploadWindow: " + o.uploadWindow
	}
	c, err := cluster.Parse([]byte(fmt.Sprintf(`apiVersion: kiln.dev/v1alpha1
kind: Cluster
name: sim
controlPlaneEndpoint: %s
kubernetes:
  controlPlanes: 3%s
os:
  name: flatcar
nodes:
  - {name: cp-1, role: init}
  - {name: cp-2, role: control-plane}
  - {name: cp-3, role: control-plane}
  - {name: w-1, role: worker}
  - {name: w-2, role: worker}
`, s.Endpoint(), extra)))
	if err != nil {
		t.Fatal(err)
	}
	sec, err := secrets.Generate(c.Name, time.Now(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	// Short socket paths: unix sockets allow 108 bytes.
	dir, err := os.MkdirTemp("", "kf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return &testCluster{t: t, sim: s, cluster: c, secrets: sec, dir: dir}
}

// secretValues lists every secret value the cluster has: none may be logged.
func (c *testCluster) secretValues() []string {
	s := c.secrets
	out := []string{s.Token, s.Token[7:], s.CertificateKey}
	for name, pem := range s.PKI {
		if strings.HasSuffix(name, ".key") {
			lines := strings.Split(strings.TrimSpace(string(pem)), "\n")
			out = append(out, lines[1]) // a line of the key's body
		}
	}
	return out
}

// simNode is one simulated machine: a root directory and an agent process.
type simNode struct {
	t    *testing.T
	name string
	root string
	nc   *nodeconfig.NodeConfig
	sock net.Listener
	mu   sync.Mutex
	cmd  *exec.Cmd
	runs int
	logs bytes.Buffer
	exit chan int
}

// node renders an inventory node's files the way kiln does and lays them
// out under its root, with the container runtime socket and /proc/sys in
// place.
func (c *testCluster) node(name string, role nodeconfig.Role) *simNode {
	return c.nodeIn(name, name, role)
}

// nodeIn is node with its root in dir (one inventory node, two disks).
func (c *testCluster) nodeIn(dir, name string, role nodeconfig.Role) *simNode {
	t := c.t
	t.Helper()
	in := render.Input{Cluster: c.cluster, Secrets: c.secrets, Role: role, Arch: runtime.GOARCH, NodeName: name}
	nc, err := render.NodeConfig(in)
	if err != nil {
		t.Fatal(err)
	}
	files, err := render.Kubeadm(in)
	if err != nil {
		t.Fatal(err)
	}
	n := &simNode{t: t, name: name, root: filepath.Join(c.dir, dir), nc: nc}
	data, err := nc.Encode()
	if err != nil {
		t.Fatal(err)
	}
	n.write(nodeconfig.DefaultPath, data, 0o600)
	for p, body := range files {
		n.write(p, body, 0o600)
	}
	if role == nodeconfig.RoleInit {
		ms, err := render.Manifests(c.cluster)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range ms {
			n.write(m.Path, m.Data, 0o600)
		}
	}
	if nc.PKIDir != "" {
		for _, f := range secrets.PKIFiles {
			n.write(filepath.Join(nc.PKIDir, f), c.secrets.PKI[f], 0o600)
		}
	}
	for _, p := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding", "/proc/sys/kernel/hostname"} {
		n.write(p, []byte("0\n"), 0o644)
	}
	if err := os.MkdirAll(filepath.Join(n.root, "run/containerd"), 0o755); err != nil {
		t.Fatal(err)
	}
	n.sock, err = net.Listen("unix", filepath.Join(n.root, "run/containerd/containerd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.sock.Close() })
	return n
}

func (n *simNode) write(p string, data []byte, mode os.FileMode) {
	n.t.Helper()
	full := filepath.Join(n.root, p)
	if err := os.MkdirAll(filepath.Dir(full), 0o700); err != nil {
		n.t.Fatal(err)
	}
	if err := os.WriteFile(full, data, mode); err != nil {
		n.t.Fatal(err)
	}
}

func (n *simNode) read(p string) string {
	b, _ := os.ReadFile(filepath.Join(n.root, p))
	return string(b)
}

// start boots the node: runs its agent in its own process group (a SIGKILL
// of the group is a power loss).
func (n *simNode) start(c *testCluster) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.runs++
	fmt.Fprintf(&n.logs, "=== %s boot %d\n", n.name, n.runs)
	cmd := exec.Command(bin.agent, "--config", nodeconfig.DefaultPath)
	cmd.Env = []string{
		"PATH=" + bin.stubs,
		sim.EnvRoot + "=" + n.root,
		sim.EnvScale + "=" + fmt.Sprint(timeScale),
		sim.EnvURL + "=" + c.sim.URL(),
	}
	cmd.Stdout, cmd.Stderr = &lockedWriter{mu: &n.mu, w: &n.logs}, &lockedWriter{mu: &n.mu, w: &n.logs}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.cmd = cmd
	exit := make(chan int, 1)
	n.exit = exit
	go func() {
		err := cmd.Wait()
		var ee *exec.ExitError
		switch {
		case err == nil:
			exit <- 0
		case errors.As(err, &ee):
			exit <- ee.ExitCode()
		default:
			exit <- -2
		}
	}()
}

// kill pulls the plug on the node.
func (n *simNode) kill() {
	n.mu.Lock()
	pid := n.cmd.Process.Pid
	n.mu.Unlock()
	syscall.Kill(-pid, syscall.SIGKILL)
	<-n.exit
}

// wait returns the agent's exit code, or -1 (after killing it) at the
// deadline.
func (n *simNode) wait(deadline time.Time) int {
	select {
	case code := <-n.exit:
		return code
	case <-time.After(time.Until(deadline)):
		n.kill()
		return -1
	}
}

func (n *simNode) log() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.logs.String()
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// checkNoSecrets fails if a secret is in a node's log, its status or the
// command lines the stubs recorded (no secret is ever passed as an
// argument, where every user of the machine can read it).
func (c *testCluster) checkNoSecrets(nodes ...*simNode) {
	c.t.Helper()
	for _, n := range nodes {
		for _, where := range c.leaks(n) {
			c.t.Errorf("%s: a secret appears in %s", n.name, where)
		}
	}
}

// leaks says where a node shows a secret.
func (c *testCluster) leaks(n *simNode) []string {
	var out []string
	for _, place := range []struct{ name, text string }{
		{"the agent log", n.log()},
		{"the status", n.read("/run/kiln/status.json")},
		{"a command line", n.read("/var/log/stub-calls.log")},
	} {
		for _, s := range c.secretValues() {
			if strings.Contains(place.text, s) {
				out = append(out, fmt.Sprintf("%s (a secret of %d bytes)", place.name, len(s)))
			}
		}
	}
	return out
}
