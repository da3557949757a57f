package agent

import (
	"fmt"
	"net"
	"slices"
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
	applyCmd  = "kubectl --kubeconfig /etc/kubernetes/admin.conf apply --server-side --field-manager kiln --force-conflicts --filename /etc/kiln/manifests/cni.yaml"
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
	// The tests of the settle window set one.
	n.agent.Timing.Settle = 0
	return n
}

func TestInitCreatesCluster(t *testing.T) {
	n := newInitNode(t)
	// An earlier attempt left this cluster's CA certificate (encoded with
	// a comment): it is kept, and its key placed beside it.
	earlier := "# this cluster's CA\n" + testCA
	n.fs.put("/etc/kubernetes/pki/ca.crt", earlier, 0o644)
	n.script(map[string][]result{
		"kubectl --kubeconfig /etc/kubernetes/admin.conf apply": {failing("The connection to the server lb.test:6443 was refused - did you specify the right host or port?"), ok},
		getNodes: {nodes(1), nodes(1), nodes(1), nodes(3)},
	})
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	n.wantCalls(append(initHostCalls, initCmd, applyCmd, applyCmd,
		getNodes, getNodes, getNodes, uploadCmd, getNodes, deleteCmd)...)
	if got := n.fs.read("/etc/kubernetes/pki/ca.crt"); got != earlier {
		t.Errorf("existing ca.crt replaced: %q", got)
	}
	if got := n.fs.read("/etc/kubernetes/pki/ca.key"); got != "PEM ca.key" {
		t.Errorf("ca.key %q", got)
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
	n.wantCalls(append(initHostCalls, "kubeadm join --config /etc/kiln/kubeadm-join.yaml")...)
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
		n.wantCalls(append(initHostCalls, "kubeadm reset -f", initCmd, applyCmd, getNodes, deleteCmd)...)
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
		n.wantCalls(append(initHostCalls, getNodes, uploadCmd, getNodes, deleteCmd)...)
		if s := n.status(); s.Estimated || s.TokenTimeLeft != "22h30m0s" {
			t.Errorf("status %+v", s)
		}
	})
}

func TestInitStopsOnUnfitHost(t *testing.T) {
	n := newInitNode(t)
	n.script(map[string][]result{"kubeadm init": {failing("[preflight] Some fatal errors occurred:\n\t[ERROR NumCPU]: the number of available CPUs 1 is less than the required 2\nerror: error execution phase preflight: preflight checks failed\n")}})
	if code := n.run(); code != ExitPermanent {
		t.Fatalf("exit %d", code)
	}
}

func TestInitBadJoinFile(t *testing.T) {
	for name, tc := range map[string]struct {
		edit func(n *node)
		want string
	}{
		"missing": {func(n *node) { delete(n.fs.m, rel(n.nc.Kubeadm.JoinConfig)) }, "read /etc/kiln/kubeadm-join.yaml"},
		"invalid token": {func(n *node) {
			n.fs.put(n.nc.Kubeadm.JoinConfig, strings.ReplaceAll(n.fs.read(n.nc.Kubeadm.JoinConfig), testToken, "ABCDEF.0123456789abcdef"), 0o600)
		}, "/etc/kiln/kubeadm-join.yaml: JoinConfiguration.discovery.bootstrapToken.token"},
	} {
		t.Run(name, func(t *testing.T) {
			n := newInitNode(t)
			tc.edit(n)
			if code := n.run(); code != ExitBadMetadata {
				t.Fatalf("exit %d, want %d", code, ExitBadMetadata)
			}
			if s := n.status(); s.State != StateFailed || !strings.Contains(s.LastError, tc.want) {
				t.Errorf("status %+v does not say %q", s, tc.want)
			}
			n.wantCalls()
		})
	}
}

func TestInitUploadFailuresBackOff(t *testing.T) {
	n := newInitNode(t)
	n.script(map[string][]result{
		getNodes:  {nodes(1)},
		uploadCmd: {failing(`error execution phase upload-certs: error uploading certs: unable to create secret: Post "https://lb.test:6443/api/v1/namespaces/kube-system/secrets": dial tcp 10.0.0.1:6443: connect: connection refused`)},
	})
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	// Uploads fail from 1h to the end of the 6h window: each retry waits
	// at least half of the capped backoff, never a busy loop.
	timing := DefaultTiming()
	uploads := n.runner.count(uploadCmd)
	if limit := int(5*time.Hour/(timing.BackoffMax/2)) + 10; uploads < 10 || uploads > limit {
		t.Errorf("%d uploads in 5 hours, want between 10 and %d", uploads, limit)
	}
	if last := n.runner.calls[len(n.runner.calls)-1]; last != deleteCmd {
		t.Errorf("last command %q", last)
	}
	if !strings.Contains(n.log.String(), "upload certificates failed; retrying in 7.5s") {
		t.Error("the log does not say when the upload is retried")
	}
}

func TestInitRefusesForeignPKI(t *testing.T) {
	for name, tc := range map[string]struct {
		file, content string
		want          []string
	}{
		"another cluster's CA": {"ca.crt", newCAPEM(), []string{"/etc/kubernetes/pki/ca.crt is already there", "its CA hash is sha256:", "cluster.caCertHash is sha256:"}},
		"not a certificate":    {"ca.crt", "garbage", []string{"/etc/kubernetes/pki/ca.crt is already there", "not a PEM CERTIFICATE"}},
		"another etcd CA key":  {"etcd/ca.key", "OTHER KEY", []string{"/etc/kubernetes/pki/etcd/ca.key is already there and differs from this cluster's /etc/kiln/pki/etcd/ca.key"}},
	} {
		t.Run(name, func(t *testing.T) {
			n := newInitNode(t)
			n.fs.put("/etc/kubernetes/pki/"+tc.file, tc.content, 0o600)
			if code := n.run(); code != ExitPermanent {
				t.Fatalf("exit %d, want %d", code, ExitPermanent)
			}
			if got := n.runner.count("kubeadm init"); got != 0 {
				t.Errorf("kubeadm init ran %d times beside a foreign %s", got, tc.file)
			}
			// Nothing placed: no key beside another cluster's certificate.
			for _, f := range []string{"ca.key", "etcd/ca.crt", "sa.key"} {
				if n.fs.has("/etc/kubernetes/pki/"+f) && !strings.HasPrefix(tc.file, f) {
					t.Errorf("%s placed", f)
				}
			}
			s := n.status()
			for _, w := range tc.want {
				if !s.Permanent || !strings.Contains(s.LastError, w) {
					t.Errorf("status %+v does not say %q", s, w)
				}
			}
		})
	}
}

func TestInitWaitsForEndpointToSettle(t *testing.T) {
	unresolved := endpoint.Result{Stage: endpoint.Unreachable, Err: &net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Err: "no such host", Name: "lb.test", IsNotFound: true}}}
	refused := endpoint.Result{Stage: endpoint.Unreachable, Err: fmt.Errorf("dial tcp 10.0.0.1:6443: connect: connection refused")}
	noTLS := endpoint.Result{Stage: endpoint.NoTLS, Err: fmt.Errorf("EOF")}
	t.Run("re-imaged node whose network comes up late joins", func(t *testing.T) {
		n := newInitNode(t)
		n.agent.Timing.Settle = time.Minute
		// DNS fails for longer than the window, then the load balancer
		// answers without TLS for a while, then serves the cluster.
		n.prober.results = slices.Concat(slices.Repeat([]endpoint.Result{unresolved}, 100), slices.Repeat([]endpoint.Result{refused, noTLS}, 10),
			[]endpoint.Result{{Stage: endpoint.Serving, ServingSince: epoch.Add(-time.Hour)}})
		if code := n.run(); code != ExitOK {
			t.Fatalf("exit %d", code)
		}
		n.wantCalls(append(initHostCalls, "kubeadm join --config /etc/kiln/kubeadm-join.yaml")...)
		if !strings.Contains(n.log.String(), "no such host (is the network up?)") {
			t.Error("the log does not say why the agent waits")
		}
	})
	t.Run("nothing answers: init after the window", func(t *testing.T) {
		n := newInitNode(t)
		n.agent.Timing.Settle = time.Minute
		n.prober.results = []endpoint.Result{refused, noTLS}
		n.script(map[string][]result{getNodes: {nodes(3)}})
		if code := n.run(); code != ExitOK {
			t.Fatalf("exit %d", code)
		}
		n.wantCalls(append(initHostCalls, initCmd, applyCmd, getNodes, deleteCmd)...)
		st, err := loadState(n.fs)
		if err != nil || st.InitAt.Before(epoch.Add(time.Minute)) {
			t.Errorf("init at %s, before the settle window ended: %v", st.InitAt, err)
		}
	})
}

func TestInitProbesBeforeEveryAttempt(t *testing.T) {
	n := newInitNode(t)
	// kubeadm init fails late, after other control planes joined through
	// this node's API server; after the reset the endpoint still serves the
	// cluster (the other control planes): join it, never init again.
	n.prober.results = []endpoint.Result{
		{Stage: endpoint.Unreachable, Err: fmt.Errorf("connection refused")},
		{Stage: endpoint.Serving, ServingSince: epoch},
	}
	n.script(map[string][]result{"kubeadm init": {failing("error execution phase addon/coredns: unable to create a new DNS service: Post \"https://lb.test:6443/api/v1/namespaces/kube-system/services\": context deadline exceeded"), ok}})
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	n.wantCalls(append(initHostCalls, initCmd, "kubeadm reset -f", "kubeadm join --config /etc/kiln/kubeadm-join.yaml")...)
	if st, err := loadState(n.fs); err != nil || st.Bootstrap != "join" {
		t.Errorf("state %+v %v", st, err)
	}
}
