package agent

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/endpoint"
	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

const (
	initCmd   = "kubeadm init --config /etc/kiln/kubeadm-init.yaml --upload-certs --skip-token-print --skip-certificate-key-print"
	uploadCmd = "kubeadm init phase upload-certs --upload-certs --config /etc/kiln/kubeadm-init.yaml --skip-certificate-key-print"
	getNodes  = "kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes --selector node-role.kubernetes.io/control-plane --output json"
	applyCmd  = "kubectl --kubeconfig /etc/kubernetes/admin.conf apply -f /etc/kiln/manifests/cni.yaml"
	deleteCmd = "kubectl --kubeconfig /etc/kubernetes/admin.conf --namespace kube-system delete secret kubeadm-certs --ignore-not-found"
)

func nodes(ready int) result {
	var items []string
	for i := range 3 {
		st := "False"
		if i < ready {
			st = "True"
		}
		items = append(items, fmt.Sprintf(`{"metadata":{"name":"cp-%d"},"status":{"conditions":[{"type":"MemoryPressure","status":"False"},{"type":"Ready","status":%q}]}}`, i, st))
	}
	return result{stdout: `{"kind":"NodeList","items":[` + strings.Join(items, ",") + `]}`}
}

func newInitNode(t *testing.T) *node {
	n := newNode(t, nodeconfig.RoleInit)
	n.prober.results = []endpoint.Result{{Stage: endpoint.Unreachable, Err: fmt.Errorf("connection refused")}}
	n.nc.Manifests = []string{"/etc/kiln/manifests/cni.yaml"}
	n.writeMetadata()
	n.fs.put("/etc/kiln/manifests/cni.yaml", "kind: List\n", 0o644)
	n.agent.Timing.ReadyPoll = 30 * time.Minute
	return n
}

func TestInitCreatesCluster(t *testing.T) {
	n := newInitNode(t)
	// An earlier attempt left a CA: kubeadm must find that one.
	n.fs.put("/etc/kubernetes/pki/ca.crt", "EARLIER", 0o644)
	n.script(map[string][]result{
		"kubectl --kubeconfig /etc/kubernetes/admin.conf apply": {failing("The connection to the server lb.test:6443 was refused - did you specify the right host or port?"), ok},
		getNodes: {nodes(1), nodes(1), nodes(1), nodes(3)},
	})
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	n.wantCalls(append(hostCalls, initCmd, applyCmd, applyCmd,
		getNodes, getNodes, getNodes, uploadCmd, getNodes, deleteCmd)...)
	if got := n.fs.read("/etc/kubernetes/pki/ca.crt"); got != "EARLIER" {
		t.Errorf("existing ca.crt replaced: %q", got)
	}
	for f, mode := range map[string]string{"ca.key": "-rw-------", "etcd/ca.key": "-rw-------", "sa.key": "-rw-------", "sa.pub": "-rw-r--r--", "front-proxy-ca.crt": "-rw-r--r--"} {
		fi, err := n.fs.Stat("/etc/kubernetes/pki/" + f)
		if err != nil || fi.Mode().String() != mode {
			t.Errorf("%s: %v %v, want %s", f, fi, err, mode)
		}
	}
	st, err := loadState(n.fs)
	if err != nil || st.Bootstrap != "init" || !st.InitAt.Equal(epoch) {
		t.Errorf("state %+v %v", st, err)
	}
}

func TestInitUploadWindowEnds(t *testing.T) {
	n := newInitNode(t)
	n.script(map[string][]result{getNodes: {nodes(2)}})
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	// Uploads at 1h..5h of a 6h window, then the Secret is deleted.
	if got := n.runner.count(uploadCmd); got != 5 {
		t.Errorf("%d uploads, want 5", got)
	}
	if last := n.runner.calls[len(n.runner.calls)-1]; last != deleteCmd {
		t.Errorf("last command %q", last)
	}
	if n.clock.now.Sub(epoch) != 6*time.Hour {
		t.Errorf("finished after %s", n.clock.now.Sub(epoch))
	}
}

func TestInitJoinsExistingCluster(t *testing.T) {
	n := newInitNode(t)
	n.prober.results = []endpoint.Result{{Stage: endpoint.Serving, ServingSince: epoch}}
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	n.wantCalls(append(hostCalls, "kubeadm join --config /etc/kiln/kubeadm-join.yaml")...)
	if n.fs.has("/etc/kubernetes/pki/ca.key") {
		t.Error("PKI placed for a join")
	}
}

func TestInitResumes(t *testing.T) {
	t.Run("interrupted init resets first", func(t *testing.T) {
		n := newInitNode(t)
		n.fs.put(StateFile, `{"steps":{"bootstrap":{"started":"2030-01-01T00:00:00Z"}}}`, 0o600)
		n.script(map[string][]result{getNodes: {nodes(3)}})
		if code := n.run(); code != ExitOK {
			t.Fatalf("exit %d", code)
		}
		n.wantCalls(append(hostCalls, "kubeadm reset -f", initCmd, applyCmd, getNodes, deleteCmd)...)
	})
	t.Run("after init, never again", func(t *testing.T) {
		n := newInitNode(t)
		n.fs.put(StateFile, `{"steps":{"bootstrap":{"started":"2030-01-01T00:00:00Z","finished":"2030-01-01T00:00:00Z"},
			"manifests":{"started":"2030-01-01T00:00:00Z","finished":"2030-01-01T00:00:00Z"},
			"certificate-upload":{"started":"2030-01-01T00:00:00Z"}},
			"bootstrap":"init","initAt":"2029-12-31T23:00:00Z","uploadedAt":"2029-12-31T23:00:00Z"}`, 0o600)
		n.script(map[string][]result{getNodes: {nodes(2), nodes(3)}})
		if code := n.run(); code != ExitOK {
			t.Fatalf("exit %d", code)
		}
		// The last upload was an hour ago: upload at once.
		n.wantCalls(append(hostCalls, getNodes, uploadCmd, getNodes, deleteCmd)...)
		if s := n.status(); s.Estimated || s.TokenTimeLeft != "22h30m0s" {
			t.Errorf("status %+v", s)
		}
	})
}

func TestInitStopsOnUnfitHost(t *testing.T) {
	n := newInitNode(t)
	n.script(map[string][]result{"kubeadm init": {failing("[preflight] Some fatal errors occurred:\n\t[ERROR NumCPU]: the number of available CPUs 1 is less than the required 2\n")}})
	if code := n.run(); code != ExitPermanent {
		t.Fatalf("exit %d", code)
	}
}
