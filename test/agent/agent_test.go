package agent_test

import (
	"crypto/rand"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/pxe"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/imagebuild/serve"
	"github.com/kilnproject/kiln/imagebuild/serve/servetest"
	"github.com/kilnproject/kiln/test/agent/sim"
)

func status(t *testing.T, n *simNode) map[string]any {
	t.Helper()
	var s map[string]any
	if err := json.Unmarshal([]byte(n.read("/run/kiln/status.json")), &s); err != nil {
		t.Fatalf("%s status: %v\n%s", n.name, err, n.log())
	}
	return s
}

func TestInitThenWorker(t *testing.T) {
	c := newCluster(t, clusterOptions{uploadWindow: "2s"})
	// The agent reports to a real kiln serve (its handler, on a bundle
	// that lists cp-1), as a network-booted node does.
	bundle, m := servetest.NewBundle(t, pxe.Node{Name: "cp-1", Role: nodeconfig.RoleInit, MAC: "52:54:00:00:00:01"})
	srv, err := serve.New(serve.Options{Dir: bundle})
	if err != nil {
		t.Fatal(err)
	}
	rs := httptest.NewServer(srv)
	defer rs.Close()
	entry, _ := m.Node("cp-1")
	if err := c.sim.StartLB(); err != nil {
		t.Fatal(err)
	}
	cp1, w1 := c.node("cp-1", nodeconfig.RoleInit), c.node("w-1", nodeconfig.RoleWorker)
	cp1.nc.ReportURL = rs.URL + pxe.ReportPath + "cp-1?key=" + entry.ReportKey
	cp1.nc.Manifests = []string{"/etc/kiln/manifests/cni.yaml"}
	data, _ := cp1.nc.Encode()
	cp1.write(nodeconfig.DefaultPath, data, 0o600)
	cp1.write("/etc/kiln/manifests/cni.yaml", []byte("apiVersion: v1\nkind: List\nitems: []\n"), 0o644)
	deadline := time.Now().Add(60 * time.Second)
	cp1.start(c)
	w1.start(c)
	for _, n := range []*simNode{cp1, w1} {
		if code := n.wait(deadline); code != 0 {
			t.Fatalf("%s: exit %d\n%s", n.name, code, n.log())
		}
		if s := status(t, n); s["state"] != "done" || s["node"] != n.name {
			t.Errorf("%s status %v", n.name, s)
		}
		if n.read(nodeconfig.DoneFile) == "" {
			t.Errorf("%s: no done file", n.name)
		}
	}
	snap := c.sim.Snapshot()
	if len(snap.Inits) != 1 || !snap.Members["w-1"].Joined || len(snap.Applied) != 1 {
		t.Errorf("cluster %+v", snap)
	}
	// Only one of 3 control planes came: the window (2s) ended, the
	// Secret was deleted.
	if !strings.Contains(cp1.log(), "certificate upload window (2s) has ended with 1 of 3") || !strings.Contains(strings.Join(snap.Events, ","), "delete-certs cp-1") {
		t.Errorf("certificate upload did not end as expected:\n%s", cp1.log())
	}
	// The key from the init node's PKI is 0600 where kubeadm finds it.
	if fi, err := os.Stat(filepath.Join(cp1.root, "etc/kubernetes/pki/ca.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("ca.key: %v %v", fi, err)
	}
	// The agent's reports are queued: wait until kiln serve shows the last.
	waitFor(t, 10*time.Second, func() bool {
		st := serveStatus(t, rs.URL, m.StatusToken)
		rep := st.Nodes[0].Reports
		return len(rep) == 1 && rep[0].Phase == "done" && rep[0].State == "done" && rep[0].Host == "cp-1" && rep[0].ConfigRetired
	})
	c.checkNoSecrets(cp1, w1)

	// A reboot is a no-op.
	calls := w1.read("/var/log/stub-calls.log")
	w1.start(c)
	if code := w1.wait(time.Now().Add(20 * time.Second)); code != 0 || w1.read("/var/log/stub-calls.log") != calls {
		t.Errorf("second boot: exit %d, new commands:\n%s", code, strings.TrimPrefix(w1.read("/var/log/stub-calls.log"), calls))
	}
}

func TestInitJoinsWhenClusterExists(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	if err := c.sim.StartLB(); err != nil {
		t.Fatal(err)
	}
	first := c.node("cp-1", nodeconfig.RoleInit)
	first.start(c)
	waitFor(t, 30*time.Second, func() bool { return len(c.sim.Snapshot().Inits) == 1 })
	first.kill()
	// The init node is re-imaged (fresh disk) and boots again.
	again := c.nodeIn("cp-1-reimaged", "cp-1", nodeconfig.RoleInit)
	again.start(c)
	if code := again.wait(time.Now().Add(30 * time.Second)); code != 0 {
		t.Fatalf("exit %d\n%s", code, again.log())
	}
	if !strings.Contains(again.log(), "joining it as a control plane instead of running kubeadm init") || len(c.sim.Snapshot().Inits) != 1 {
		t.Errorf("inits %v\n%s", c.sim.Snapshot().Inits, again.log())
	}
	c.checkNoSecrets(first, again)
}

// A certificates directory left from another cluster: the init node
// refuses it rather than creating a cluster under a CA no join can pin.
func TestInitRefusesForeignCA(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	other, err := secrets.Generate("other", time.Now(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	n := c.node("cp-1", nodeconfig.RoleInit)
	n.write("/etc/kubernetes/pki/ca.crt", other.PKI["ca.crt"], 0o644)
	n.start(c)
	if code := n.wait(time.Now().Add(20 * time.Second)); code != 3 {
		t.Fatalf("exit %d, want 3\n%s", code, n.log())
	}
	if s := status(t, n); s["permanent"] != true || !strings.Contains(s["lastError"].(string), "/etc/kubernetes/pki/ca.crt is already there") {
		t.Errorf("status %v", s)
	}
	if strings.Contains(n.read("/var/log/stub-calls.log"), "kubeadm init") || n.read("/etc/kubernetes/pki/ca.key") != "" {
		t.Errorf("kubeadm init ran or ca.key was placed beside another cluster's CA:\n%s", n.log())
	}
	c.checkNoSecrets(n)
}

// The secret check covers the command lines the stubs record.
func TestSecretCheckCoversCommandLines(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	n := c.node("w-1", nodeconfig.RoleWorker)
	n.write("/var/log/stub-calls.log", []byte("kubeadm join --config /etc/kiln/kubeadm-join.yaml\n"), 0o644)
	if leaks := c.leaks(n); len(leaks) != 0 {
		t.Fatalf("leaks in a clean node: %v", leaks)
	}
	n.write("/var/log/stub-calls.log", []byte("kubeadm join lb:6443 --token "+c.secrets.Token+"\n"), 0o644)
	if leaks := c.leaks(n); len(leaks) == 0 || !strings.Contains(leaks[0], "a command line") {
		t.Errorf("a token on a command line not found: %v", leaks)
	}
}

// A stranger answers on the endpoint with another CA. Before: three probes
// made every agent exit for good, and provisioning stayed halted until a
// person stepped in. After: the agents wait, say so loudly and run no
// kubeadm; once the stranger is gone the cluster comes up by itself.
// probeAtLeast reports whether the agent's foreign-CA report counts n
// probes or more.
func probeAtLeast(report string, n int) bool {
	m := regexp.MustCompile(`probe (\d+),`).FindStringSubmatch(report)
	got := 0
	if m != nil {
		got, _ = strconv.Atoi(m[1])
	}
	return got >= n
}

func TestForeignCA(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	if err := c.sim.StartLB(); err != nil {
		t.Fatal(err)
	}
	if err := c.sim.ServeForeignCA(); err != nil {
		t.Fatal(err)
	}
	cp, w := c.node("cp-1", nodeconfig.RoleInit), c.node("w-1", nodeconfig.RoleWorker)
	for _, n := range []*simNode{cp, w} {
		n.start(c)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, n := range []*simNode{cp, w} {
		for {
			var s map[string]any
			json.Unmarshal([]byte(n.read("/run/kiln/status.json")), &s) // not there before the first status
			if last, _ := s["lastError"].(string); strings.Contains(last, "THE ENDPOINT SERVES ANOTHER CLUSTER") && strings.Contains(last, `issued by "other-cluster-ca"`) &&
				probeAtLeast(last, 3) && s["state"] == "waiting" && s["permanent"] != true {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s does not report the foreign endpoint: %v\n%s", n.name, s, n.log())
			}
			time.Sleep(50 * time.Millisecond)
		}
		if strings.Contains(n.read("/var/log/stub-calls.log"), "kubeadm") {
			t.Errorf("%s ran kubeadm against a foreign cluster", n.name)
		}
	}
	// cp-1 creates the cluster (then waits for control planes this test
	// does not start) and w-1 joins it.
	c.sim.StopServingForeignCA()
	if code := w.wait(time.Now().Add(60 * time.Second)); code != 0 {
		t.Fatalf("w-1: exit %d after the stranger left\n%s\n%s", code, w.log(), cp.log())
	}
	cp.kill()
	if inits := c.sim.Snapshot().Inits; len(inits) != 1 || inits[0] != "cp-1" {
		t.Errorf("inits %v", inits)
	}
	c.checkNoSecrets(cp, w)
}

func TestBadMetadata(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	n := c.node("w-1", nodeconfig.RoleWorker)
	n.write(nodeconfig.DefaultPath, []byte(strings.Replace(n.read(nodeconfig.DefaultPath), "role: worker", "role: master", 1)), 0o600)
	// The init node's join file has a malformed token.
	in := c.node("cp-1", nodeconfig.RoleInit)
	in.write(in.nc.Kubeadm.JoinConfig, []byte(strings.Replace(in.read(in.nc.Kubeadm.JoinConfig), "token: ", "token: X", 1)), 0o600)
	for node, want := range map[*simNode]string{
		n:  `role: unknown role "master"`,
		in: in.nc.Kubeadm.JoinConfig + ": JoinConfiguration.discovery.bootstrapToken.token: not a bootstrap token",
	} {
		node.start(c)
		if code := node.wait(time.Now().Add(20 * time.Second)); code != 2 {
			t.Fatalf("%s: exit %d\n%s", node.name, code, node.log())
		}
		if s := status(t, node); s["state"] != "failed" || !strings.Contains(s["lastError"].(string), want) {
			t.Errorf("%s: status %v", node.name, s)
		}
		c.checkNoSecrets(node)
	}
}

// The stubs must refuse what the real tools refuse.
func TestStubKubeadmRules(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	n := c.node("cp-1", nodeconfig.RoleInit)
	n.write("/etc/kiln/no-api-version.yaml", []byte("kind: List\nitems: []\n"), 0o644)
	n.write("/etc/kubernetes/admin.conf", []byte("stand-in\n"), 0o600)
	apply := []string{"kubectl", "--kubeconfig", "/etc/kubernetes/admin.conf", "apply", "--server-side", "--field-manager", "kiln", "-f"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"kubeadm", "init", "--config", "/etc/kiln/kubeadm-init.yaml", "--certificate-key", "00"}, "can not mix '--config' with arguments [certificate-key]"},
		{[]string{"kubeadm", "init", "--config", "/etc/kiln/kubeadm-init.yaml", "--cert-dir", "/x"}, "can not mix '--config' with arguments [cert-dir]"},
		{[]string{"kubeadm", "join", "--config", "/etc/kiln/kubeadm-init.yaml"}, "no JoinConfiguration"},
		{[]string{"kubeadm", "reset"}, "aborted reset operation"},
		{[]string{"swapoff"}, "swapoff: bad usage"},
		{[]string{"systemctl", "restart", "kubelt"}, "Failed to restart kubelt.service: Unit kubelt.service not found."},
		{[]string{"modprobe", "-a", "overlay", "br_netfiler"}, "Module br_netfiler not found"},
		{append(apply, "/etc/kiln/missing.yaml"), `the path "/etc/kiln/missing.yaml" does not exist`},
		{append(apply, "/etc/kiln/no-api-version.yaml"), "error validating data: [apiVersion not set]"},
	} {
		cmd := exec.Command(filepath.Join(bin.stubs, tc.args[0]), tc.args[1:]...)
		cmd.Env = []string{sim.EnvRoot + "=" + n.root, sim.EnvURL + "=" + c.sim.URL()}
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), tc.want) {
			t.Errorf("%v: %v\n%s", tc.args, err, out)
		}
	}
	// kubeadm's preflight: etcd's data folder must be empty, and every
	// static pod manifest absent.
	n.write("/var/lib/etcd/member/wal/0.wal", []byte("left over\n"), 0o600)
	n.write("/etc/kubernetes/manifests/kube-scheduler.yaml", []byte("left over\n"), 0o600)
	cmd := exec.Command(filepath.Join(bin.stubs, "kubeadm"), "init", "--config", "/etc/kiln/kubeadm-init.yaml")
	cmd.Env = []string{sim.EnvRoot + "=" + n.root, sim.EnvURL + "=" + c.sim.URL()}
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "[ERROR DirAvailable--var-lib-etcd]: /var/lib/etcd is not empty") ||
		!strings.Contains(string(out), "[ERROR FileAvailable--etc-kubernetes-manifests-kube-scheduler.yaml]") {
		t.Errorf("init over leftovers: %v\n%s", err, out)
	}
	v3 := strings.ReplaceAll(n.read("/etc/kiln/kubeadm-join.yaml"), "v1beta4", "v1beta3")
	n.write("/etc/kiln/kubeadm-join.yaml", []byte(v3), 0o600)
	cmd = exec.Command(filepath.Join(bin.stubs, "kubeadm"), "join", "--config", "/etc/kiln/kubeadm-join.yaml")
	cmd.Env = []string{sim.EnvRoot + "=" + n.root, sim.EnvURL + "=" + c.sim.URL()}
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "old API spec") {
		t.Errorf("v1beta3 accepted: %s", out)
	}
}

func waitFor(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// serveStatus reads kiln serve's status as kiln status does.
func serveStatus(t *testing.T, url, token string) serve.Status {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url+pxe.StatusPath, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st serve.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("status: %s %v", resp.Status, err)
	}
	return st
}
