package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/endpoint"
	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

func (n *node) status() nodeconfig.Status {
	n.t.Helper()
	var s nodeconfig.Status
	if err := json.Unmarshal([]byte(n.fs.read(StatusFile)), &s); err != nil {
		n.t.Fatalf("status file: %v", err)
	}
	return s
}

func (n *node) wantCalls(want ...string) {
	n.t.Helper()
	if !slices.Equal(n.runner.calls, want) {
		n.t.Errorf("commands:\n  %s\nwant:\n  %s", strings.Join(n.runner.calls, "\n  "), strings.Join(want, "\n  "))
	}
}

// hostCalls are the commands of the host steps on a joining node;
// initHostCalls on the init node, whose kubeadm checks both its files.
var (
	hostCalls     = []string{"modprobe -a overlay br_netfilter", "swapoff -a", "kubeadm config validate --config /etc/kiln/kubeadm-join.yaml"}
	initHostCalls = []string{"modprobe -a overlay br_netfilter", "swapoff -a", "kubeadm config validate --config /etc/kiln/kubeadm-init.yaml", "kubeadm config validate --config /etc/kiln/kubeadm-join.yaml"}
)

func TestMissingMetadata(t *testing.T) {
	n := newNode(t, nodeconfig.RoleWorker)
	delete(n.fs.m, rel(nodeconfig.DefaultPath))
	if code := n.run(); code != ExitBadMetadata {
		t.Fatalf("exit %d, want %d", code, ExitBadMetadata)
	}
	if s := n.status(); s.State != StateFailed || !strings.Contains(s.LastError, "node.yaml") {
		t.Errorf("status %+v", s)
	}
	n.wantCalls()
}

func TestBadMetadataNamesFields(t *testing.T) {
	for name, tc := range map[string]struct {
		edit func(n *node)
		want []string
	}{
		"invalid node.yaml": {
			func(n *node) { n.nc.Cluster.ControlPlaneEndpoint = "lb"; n.writeMetadata() },
			[]string{"cluster.controlPlaneEndpoint"},
		},
		"join file pins another CA": {
			func(n *node) {
				n.fs.put(n.nc.Kubeadm.JoinConfig, strings.ReplaceAll(n.fs.read(n.nc.Kubeadm.JoinConfig), n.nc.Cluster.CACertHash, "sha256:"+strings.Repeat("0", 64)), 0o600)
			},
			[]string{"caCertHashes does not pin cluster.caCertHash"},
		},
		"v1beta3 join file": {
			func(n *node) {
				n.fs.put(n.nc.Kubeadm.JoinConfig, strings.ReplaceAll(n.fs.read(n.nc.Kubeadm.JoinConfig), "v1beta4", "v1beta3"), 0o600)
			},
			[]string{`apiVersion "kubeadm.k8s.io/v1beta3"`},
		},
		"bad token, missing manifest": {
			func(n *node) {
				n.fs.put(n.nc.Kubeadm.JoinConfig, strings.ReplaceAll(n.fs.read(n.nc.Kubeadm.JoinConfig), testToken, "ABCDEF.0123456789abcdef"), 0o600)
				n.nc.Manifests = []string{"/etc/kiln/manifests/cni.yaml"}
				n.writeMetadata()
			},
			[]string{"discovery.bootstrapToken.token: not a bootstrap token", "manifests[0]"},
		},
	} {
		t.Run(name, func(t *testing.T) {
			n := newNode(t, nodeconfig.RoleWorker)
			tc.edit(n)
			if code := n.run(); code != ExitBadMetadata {
				t.Fatalf("exit %d, want %d", code, ExitBadMetadata)
			}
			for _, w := range tc.want {
				if !strings.Contains(n.status().LastError, w) {
					t.Errorf("status error %q does not say %q", n.status().LastError, w)
				}
			}
			if strings.Contains(n.log.String(), "ABCDEF.0123456789abcdef") {
				t.Error("a malformed token was logged")
			}
			n.wantCalls()
		})
	}
}

func TestWorkerJoins(t *testing.T) {
	n := newNode(t, nodeconfig.RoleWorker)
	n.nc.Hostname = nodeconfig.Hostname{Template: "{cluster}-{role}-{mac}"}
	n.writeMetadata()
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	n.wantCalls(append(hostCalls, "kubeadm join --config /etc/kiln/kubeadm-join.yaml")...)
	if got := n.fs.read("/proc/sys/kernel/hostname"); got != "test-worker-525400000001" {
		t.Errorf("hostname %q", got)
	}
	if got := n.fs.read("/etc/hostname"); got != "test-worker-525400000001\n" {
		t.Errorf("/etc/hostname %q", got)
	}
	for _, s := range sysctls {
		if got := n.fs.read("/proc/sys/" + s.key); got != "1\n" {
			t.Errorf("sysctl %s = %q", s.key, got)
		}
	}
	if s := n.status(); s.State != StateDone || s.Node != "test-worker-525400000001" || s.TokenTimeLeft != "24h0m0s" || !s.Estimated {
		t.Errorf("status %+v", s)
	}
	if len(n.reporter.bodies) == 0 || !n.reporter.closed {
		t.Errorf("reporter got %d reports, closed %t", len(n.reporter.bodies), n.reporter.closed)
	}

	// A second start (the unit's condition aside) does nothing.
	n.runner.calls = nil
	if code := n.run(); code != ExitOK {
		t.Fatalf("second run: exit %d", code)
	}
	n.wantCalls()
}

func TestOptionalSysctlMissing(t *testing.T) {
	n := newNode(t, nodeconfig.RoleWorker)
	delete(n.fs.m, "proc/sys/net/ipv6/conf/all/forwarding")
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	n = newNode(t, nodeconfig.RoleWorker)
	delete(n.fs.m, "proc/sys/net/bridge/bridge-nf-call-iptables")
	if code := n.run(); code != ExitRetry || !strings.Contains(n.status().LastError, "net.bridge.bridge-nf-call-iptables") {
		t.Fatalf("exit %d, status %+v", code, n.status())
	}
}

func TestWaitsForClockRuntimeAndEndpoint(t *testing.T) {
	n := newNode(t, nodeconfig.RoleControlPlane)
	n.clock.now = time.Date(1970, 1, 1, 0, 0, 5, 0, time.UTC)
	delete(n.fs.m, rel(testSocket))
	ticks := 0
	n.clock.onTick = func(c *fakeClock) {
		ticks++
		switch ticks {
		case 3: // NTP answers
			c.now = epoch
		case 6: // containerd starts
			n.fs.put(testSocket, "", fs.ModeSocket)
		}
	}
	n.prober.results = []endpoint.Result{
		{Stage: endpoint.Unreachable, Err: fmt.Errorf("connection refused")},
		{Stage: endpoint.NoTLS, Err: fmt.Errorf("EOF")},
		{Stage: endpoint.NotReady, Err: fmt.Errorf("GET /readyz: 500")},
		{Stage: endpoint.Serving, ServingSince: epoch},
	}
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	if n.prober.n != 4 {
		t.Errorf("%d probes, want 4", n.prober.n)
	}
	for _, w := range []string{"waiting for a synchronised clock: clock reads 1970", "waiting for the container runtime", "waiting for lb.test:6443 to serve the cluster: unreachable: connection refused"} {
		if !strings.Contains(n.log.String(), w) {
			t.Errorf("log lacks %q", w)
		}
	}
}

func TestJoinRetriesTransientFailures(t *testing.T) {
	n := newNode(t, nodeconfig.RoleControlPlane)
	n.script(map[string][]result{"kubeadm join": {
		failing("error execution phase control-plane-join/etcd: error creating local etcd static pod manifest file: etcd cluster is not healthy: context deadline exceeded"),
		failing("[preflight] Some fatal errors occurred:\n\t[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: /etc/kubernetes/kubelet.conf already exists\nerror: error execution phase preflight: preflight checks failed\n"),
		ok,
	}})
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	join := "kubeadm join --config /etc/kiln/kubeadm-join.yaml"
	n.wantCalls(append(hostCalls, join, "kubeadm reset -f", join, "kubeadm reset -f", join)...)
	// Backoff: 10s then 20s, each with the jitter the fake gives.
	if got := n.clock.slept; !slices.Equal(got, []time.Duration{7500 * time.Millisecond, 15 * time.Second}) {
		t.Errorf("slept %v", got)
	}
}

// TestKubeadmRejectsTheConfig: a configuration the node's kubeadm refuses
// offline stops the agent for good before any bootstrap attempt (kubeadm
// init or join would refuse it on every retry); a kubeadm that could not
// run at all is a restart, not a verdict.
func TestKubeadmRejectsTheConfig(t *testing.T) {
	for _, role := range []nodeconfig.Role{nodeconfig.RoleInit, nodeconfig.RoleWorker} {
		t.Run(string(role), func(t *testing.T) {
			n := newNode(t, role)
			n.script(map[string][]result{"kubeadm config validate": {failing(`error: hostport LB.Example.COM:6443: host 'LB.Example.COM' must be a valid IP address or a valid RFC-1123 DNS subdomain`)}})
			if code := n.run(); code != ExitPermanent {
				t.Fatalf("exit %d, want %d (permanent)", code, ExitPermanent)
			}
			s := n.status()
			if !s.Permanent || !strings.Contains(s.LastError, "kubeadm rejects the configuration kiln rendered") || !strings.Contains(s.LastError, "RFC-1123") {
				t.Errorf("status %+v", s)
			}
			if n.runner.bootstraps() != 0 {
				t.Errorf("kubeadm init or join ran: %q", n.runner.calls)
			}
		})
	}
	n := newNode(t, nodeconfig.RoleWorker)
	n.script(map[string][]result{"kubeadm config validate": {{err: errors.New(`exec: "kubeadm": executable file not found in $PATH`)}}})
	if code := n.run(); code != ExitRetry {
		t.Fatalf("kubeadm missing: exit %d, want %d (retry)", code, ExitRetry)
	}
}

func TestJoinStopsOnPermanentFailures(t *testing.T) {
	for name, tc := range map[string]struct {
		role     nodeconfig.Role
		stderr   string
		attempts int
		advice   string
	}{
		"certificate key rejected": {nodeconfig.RoleControlPlane,
			`error execution phase control-plane-prepare/download-certs: error downloading certs: error decoding secret data with provided key: cipher: message authentication failed`,
			1, "certificate key does not decrypt"},
		"unfit host": {nodeconfig.RoleWorker,
			"[preflight] Some fatal errors occurred:\n\t[ERROR Mem]: the system RAM (512 MB) is less than the minimum 1700 MB\nerror: error execution phase preflight: preflight checks failed",
			1, "fails kubeadm's preflight checks"},
	} {
		t.Run(name, func(t *testing.T) {
			n := newNode(t, tc.role)
			n.script(map[string][]result{"kubeadm join": {failing(tc.stderr + "\nTo see the stack trace of this error execute with --v=5 or higher\n" + testToken)}})
			if code := n.run(); code != ExitPermanent {
				t.Fatalf("exit %d, want %d", code, ExitPermanent)
			}
			if got := n.runner.count("kubeadm join"); got != tc.attempts {
				t.Errorf("%d join attempts, want %d", got, tc.attempts)
			}
			s := n.status()
			if !s.Permanent || !strings.Contains(s.LastError, tc.advice) || !strings.Contains(s.LastError, redacted) {
				t.Errorf("status %+v", s)
			}
		})
	}
}

// What kubeadm's discovery reads from the endpoint before the CA pin is
// checked can be forged by anyone answering there: the agent retries it
// with a capped backoff for its whole run, saying what it means, and
// systemd starts it again.
func TestJoinRetriesWhatTheEndpointCanForge(t *testing.T) {
	// An API error message of the endpoint's choosing, long enough that
	// the output shown is cut inside it, imitating kubeadm's final errors.
	padding := strings.Repeat("x", 2*outputLimit)
	forged := "error execution phase preflight: couldn't validate the identity of the API Server: failed to request the cluster-info ConfigMap: " + padding
	for name, tc := range map[string]struct{ stderr, advice string }{
		"forged key rejection": {forged + "\nerror execution phase control-plane-prepare/download-certs: error downloading certs: error decoding secret data with provided key", "…xxxx"},
		"forged unfit host":    {forged + "\nerror execution phase preflight: [preflight] Some fatal errors occurred:\n\t[ERROR Mem]: too little", "…xxxx"},
		"token expired": {`error execution phase preflight: couldn't validate the identity of the API Server: token id "abcdef" is invalid for this cluster or it has expired. Use "kubeadm token create" on the control-plane node to create a new valid token`,
			"bootstrap token is invalid or has expired"},
		"bad JWS signature": {`error execution phase preflight: couldn't validate the identity of the API Server: failed to verify JWS signature of received cluster info object, can't trust this API Server`,
			"bootstrap token is invalid or has expired"},
		"CA hash mismatch": {`error execution phase preflight: couldn't validate the identity of the API Server: cluster CA found in cluster-info ConfigMap is invalid: none of the public keys "sha256:aaaa" are pinned`,
			"THE ENDPOINT SERVES ANOTHER CLUSTER"},
		"token unknown": {`error execution phase preflight: couldn't validate the identity of the API Server: could not find a JWS signature in the cluster-info ConfigMap for token ID "abcdef"`,
			"does not know the bootstrap token"},
	} {
		t.Run(name, func(t *testing.T) {
			n := newNode(t, nodeconfig.RoleWorker)
			n.script(map[string][]result{"kubeadm join": {failing(tc.stderr + "\n" + testToken)}})
			if code := n.run(); code != ExitRetry {
				t.Fatalf("exit %d, want %d", code, ExitRetry)
			}
			if got := n.runner.count("kubeadm join"); got != maxAttempts {
				t.Errorf("%d join attempts, want %d", got, maxAttempts)
			}
			if s := n.status(); s.Permanent || !strings.Contains(s.LastError, tc.advice) || !strings.Contains(s.LastError, redacted) {
				t.Errorf("status %+v", s)
			}
			if d := slices.Max(n.clock.slept); d > DefaultTiming().BackoffMax {
				t.Errorf("waited %s between attempts, more than BackoffMax", d)
			}
		})
	}
}

func TestCertificatesMissingAfterWindowIsPermanent(t *testing.T) {
	n := newNode(t, nodeconfig.RoleControlPlane)
	// The API server certificate is 7 hours old: the 6h upload window is over.
	n.prober.results = []endpoint.Result{{Stage: endpoint.Serving, ServingSince: epoch.Add(-7 * time.Hour)}}
	n.script(map[string][]result{"kubeadm join": {failing(`error execution phase control-plane-prepare/download-certs: error downloading certs: error downloading the secret: Secret "kubeadm-certs" was not found in the "kube-system" Namespace. This Secret might have expired. Please, run ` + "`kubeadm init phase upload-certs --upload-certs`" + ` on a control plane to generate a new one`)}})
	if code := n.run(); code != ExitPermanent {
		t.Fatalf("exit %d", code)
	}
	if got := n.runner.count("kubeadm join"); got != 1 {
		t.Errorf("%d attempts", got)
	}
	if s := n.status(); s.CertificateUploadTimeLeft != "0s" || !s.Estimated {
		t.Errorf("status %+v", s)
	}
}

func TestCertificatesMissingEarlyIsRetried(t *testing.T) {
	n := newNode(t, nodeconfig.RoleControlPlane)
	n.script(map[string][]result{"kubeadm join": {failing(`error execution phase control-plane-prepare/download-certs: error downloading certs: error downloading the secret: Secret "kubeadm-certs" was not found in the "kube-system" Namespace.`), ok}})
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
}

// Another CA on the endpoint is not a reason to stop: anyone answering on
// its address can present one. The agent keeps probing with a capped
// backoff, reports it loudly, never runs kubeadm against it, and goes on
// once this cluster answers.
func TestForeignCAIsRetried(t *testing.T) {
	foreign := endpoint.Result{Stage: endpoint.Foreign, Err: fmt.Errorf(`server certificate "kube-apiserver" is issued by "other", not by the cluster CA`)}
	for role, then := range map[nodeconfig.Role]endpoint.Result{
		nodeconfig.RoleWorker: {Stage: endpoint.Serving, ServingSince: epoch},
		nodeconfig.RoleInit:   {Stage: endpoint.Unreachable, Err: fmt.Errorf("connection refused")},
	} {
		n := newNode(t, role)
		n.prober.results = append(slices.Repeat([]endpoint.Result{foreign}, 12), then)
		kubeadmBefore := -1
		n.clock.onTick = func(*fakeClock) {
			if n.prober.n == 12 && kubeadmBefore < 0 {
				kubeadmBefore = n.runner.bootstraps()
			}
		}
		if code := n.run(); code != ExitOK {
			t.Fatalf("%s: exit %d", role, code)
		}
		if kubeadmBefore != 0 {
			t.Errorf("%s ran kubeadm %d times while another cluster answered (-1: never saw the 12th probe)", role, kubeadmBefore)
		}
		var waits []time.Duration
		for _, d := range n.clock.slept {
			if d > DefaultTiming().Poll {
				waits = append(waits, d)
			}
		}
		maxWait := DefaultTiming().BackoffMax
		if len(waits) < 11 || !slices.IsSorted(waits[:11]) || slices.Max(waits) > maxWait || waits[10] < maxWait/2 {
			t.Errorf("%s: waits while foreign %v, want growing up to at most %s", role, waits, maxWait)
		}
		loud := 0
		for _, b := range n.reporter.bodies {
			var st nodeconfig.Status
			if json.Unmarshal([]byte(b), &st) == nil && strings.Contains(st.LastError, "THE ENDPOINT SERVES ANOTHER CLUSTER") && st.State == StateWaiting && !st.Permanent {
				loud++
			}
		}
		if loud < 12 || !strings.Contains(n.log.String(), "probe 12, probing again") {
			t.Errorf("%s: %d loud reports of the foreign CA; log:\n%s", role, loud, n.log.String())
		}
	}
}

func TestJoinResumesAfterPowerLoss(t *testing.T) {
	n := newNode(t, nodeconfig.RoleWorker)
	n.fs.put(StateFile, `{"steps":{"join":{"started":"2030-01-01T00:00:00Z"}}}`, 0o600)
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	n.wantCalls(append(hostCalls, "kubeadm reset -f", "kubeadm join --config /etc/kiln/kubeadm-join.yaml")...)
}

func TestJoinGivesUpAfterMaxAttempts(t *testing.T) {
	n := newNode(t, nodeconfig.RoleWorker)
	n.script(map[string][]result{"kubeadm join": {failing("dial tcp 10.0.0.1:6443: connect: connection refused")}})
	if code := n.run(); code != ExitRetry {
		t.Fatalf("exit %d", code)
	}
	if got := n.runner.count("kubeadm join"); got != maxAttempts {
		t.Errorf("%d attempts", got)
	}
	if max := slices.Max(n.clock.slept); max > DefaultTiming().BackoffMax {
		t.Errorf("backoff %s above the cap", max)
	}
}

func TestWaitsForRuntimeToAcceptConnections(t *testing.T) {
	n := newNode(t, nodeconfig.RoleWorker)
	// containerd's socket is left from before a reboot; containerd listens
	// on it again a few polls later.
	n.staleSocket = true
	ticks := 0
	n.clock.onTick = func(*fakeClock) {
		if ticks++; ticks == 3 {
			n.staleSocket = false
		}
	}
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	for _, w := range []string{"waiting for the container runtime at " + testSocket + ": dial unix " + testSocket + ": connect: connection refused", "waited for the container runtime"} {
		if !strings.Contains(n.log.String(), w) {
			t.Errorf("log lacks %q", w)
		}
	}
	if ticks < 3 {
		t.Errorf("joined after %d polls, before the runtime listened", ticks)
	}
}

func TestHostnameKeptAcrossRestarts(t *testing.T) {
	n := newNode(t, nodeconfig.RoleWorker)
	n.nc.Hostname = nodeconfig.Hostname{Template: "{cluster}-{role}-{mac}"}
	n.writeMetadata()
	n.script(map[string][]result{"kubeadm join": {failing("dial tcp 10.0.0.1:6443: connect: connection refused")}})
	if code := n.run(); code != ExitRetry {
		t.Fatalf("exit %d", code)
	}
	// systemd restarts the agent after a reboot in which the interfaces
	// enumerated in another order.
	n.agent.FirstMAC = func() (string, error) { return "525400000002", nil }
	n.script(nil)
	n.runner.calls = nil
	if code := n.run(); code != ExitOK {
		t.Fatalf("second run: exit %d", code)
	}
	if got := n.fs.read("/proc/sys/kernel/hostname"); got != "test-worker-525400000001" {
		t.Errorf("hostname %q after the restart, want the first run's", got)
	}
	if s := n.status(); s.Node != "test-worker-525400000001" {
		t.Errorf("status %+v", s)
	}
}

// Once in the cluster, a node keeps no secret that only its bootstrap
// needed: the token, the certificate key and the pre-made CA keys are
// gone from everywhere but kubeadm's own certificates directory, and each
// removal is noted. A power loss right after DoneFile is written leaves
// the rest for the next start.
func TestSecretsRemovedAfterJoin(t *testing.T) {
	for _, role := range []nodeconfig.Role{nodeconfig.RoleInit, nodeconfig.RoleControlPlane, nodeconfig.RoleWorker} {
		n := newNode(t, role)
		if role == nodeconfig.RoleInit { // it creates the cluster
			n.prober.results = []endpoint.Result{{Stage: endpoint.Unreachable, Err: fmt.Errorf("connection refused")}}
		}
		if code := n.run(); code != ExitOK {
			t.Fatalf("%s: exit %d", role, code)
		}
		for _, p := range n.nc.RemoveAfterJoin {
			if n.fs.has(p) || n.fs.has(p+"/ca.key") {
				t.Errorf("%s: %s is still there", role, p)
			}
		}
		for name, f := range n.fs.m {
			for _, secret := range []string{testToken, testCertKey, "PEM ca.key", "PEM etcd/ca.key"} {
				if strings.Contains(string(f.Data), secret) && !strings.HasPrefix(name, "etc/kubernetes/pki/") {
					t.Errorf("%s: /%s holds a bootstrap secret after the join", role, name)
				}
			}
		}
		if role == nodeconfig.RoleInit && !n.fs.has("/etc/kubernetes/pki/ca.key") {
			t.Errorf("init: kubeadm's own CA key went too")
		}
		removed := n.fs.read(nodeconfig.RemovedFile)
		for _, p := range []string{"/etc/kiln/kubeadm-join.yaml", "/oem/config.ign"} {
			if !strings.Contains(removed, " "+p+"\n") {
				t.Errorf("%s: %s does not note %s:\n%s", role, nodeconfig.RemovedFile, p, removed)
			}
		}
		if strings.Contains(removed, "/usr/share/oem") {
			t.Errorf("%s: noted a removal of what was not there:\n%s", role, removed)
		}
		// Later boots: nothing left, nothing to do.
		if code := n.run(); code != ExitOK {
			t.Fatalf("%s: second start: exit %d", role, code)
		}
	}

	n := newNode(t, nodeconfig.RoleWorker)
	n.fs.put(nodeconfig.DoneFile, "2030-01-01T00:00:00Z\n", 0o644)
	if code := n.run(); code != ExitOK {
		t.Fatalf("after a power loss: exit %d", code)
	}
	if n.fs.has("/etc/kiln/kubeadm-join.yaml") || n.fs.has("/oem/config.ign") || n.runner.bootstraps() != 0 {
		t.Errorf("after a power loss: left %v, ran %v", n.fs.has("/etc/kiln/kubeadm-join.yaml"), n.runner.calls)
	}
	// Its unit runs until the record exists, also when nothing was left.
	n.fs.RemoveAll(nodeconfig.RemovedFile)
	if code := n.run(); code != ExitOK || !n.fs.has(nodeconfig.RemovedFile) {
		t.Errorf("nothing left to remove: exit %d, record written %v", code, n.fs.has(nodeconfig.RemovedFile))
	}
}
