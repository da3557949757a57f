package agent

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// fakeEtcd records RemoveMember calls in the runner's call list, so tests
// see them in order with kubeadm's.
type fakeEtcd struct {
	runner  *fakeRunner
	clients []EtcdClient
	removed bool
	// unhealthy fails this many removals as a cluster without quorum.
	unhealthy int
}

func (f *fakeEtcd) RemoveMember(_ context.Context, c EtcdClient, peerURL string) (bool, error) {
	f.clients = append(f.clients, c)
	if len(f.clients) <= f.unhealthy {
		return false, errors.New("503 Service Unavailable: etcdserver: unhealthy cluster")
	}
	f.runner.calls = append(f.runner.calls, "etcd remove-member "+peerURL)
	return f.removed, nil
}

// kubeadm's etcd manifest on the third control plane, mid-join.
const joiningEtcdManifest = `apiVersion: v1
kind: Pod
metadata:
  name: etcd
  namespace: kube-system
spec:
  containers:
  - command:
    - etcd
    - --advertise-client-urls=https://10.0.0.13:2379
    - --initial-advertise-peer-urls=https://10.0.0.13:2380
    - --initial-cluster=cp1=https://10.0.0.11:2380,cp3=https://10.0.0.13:2380,cp2=https://10.0.0.12:2380
    - --initial-cluster-state=existing
    - --name=cp3
`

func TestEtcdPeers(t *testing.T) {
	self, peers := etcdPeers([]byte(joiningEtcdManifest))
	if self != "https://10.0.0.13:2380" {
		t.Errorf("self = %q", self)
	}
	want := []string{"https://10.0.0.11:2380", "https://10.0.0.13:2380", "https://10.0.0.12:2380"}
	if !slices.Equal(peers, want) {
		t.Errorf("peers = %q, want %q", peers, want)
	}
	if got := clientURL("https://10.0.0.11:2380"); got != "https://10.0.0.11:2379" {
		t.Errorf("clientURL = %q", got)
	}
}

// A control plane whose join was cut after kubeadm added its etcd member
// removes that member before kubeadm reset wipes the member's data (the
// rehearsal's killed-join scenario).
func TestResumedControlPlaneJoinForgetsItsEtcdMember(t *testing.T) {
	n := newNode(t, nodeconfig.RoleControlPlane)
	etcd := &fakeEtcd{runner: n.runner, removed: true}
	n.agent.Etcd = etcd
	n.fs.put(StateFile, `{"steps":{"join":{"started":"2030-01-01T00:00:00Z"}}}`, 0o600)
	n.fs.put(etcdManifest, joiningEtcdManifest, 0o600)
	for _, f := range []string{etcdCACert, etcdClientCert, etcdClientKey} {
		n.fs.put(f, "PEM "+f, 0o600)
	}
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	n.wantCalls(append(hostCalls, "etcd remove-member https://10.0.0.13:2380", "kubeadm reset -f", "kubeadm join --config /etc/kiln/kubeadm-join.yaml")...)
	if len(etcd.clients) != 1 {
		t.Fatalf("%d RemoveMember calls", len(etcd.clients))
	}
	c := etcd.clients[0]
	if want := []string{"https://10.0.0.11:2379", "https://10.0.0.12:2379"}; !slices.Equal(c.Endpoints, want) {
		t.Errorf("endpoints %q, want %q (the other members)", c.Endpoints, want)
	}
	if string(c.Key) != "PEM "+etcdClientKey || string(c.CA) != "PEM "+etcdCACert {
		t.Errorf("client credentials not read from kubeadm's files: %+v", c)
	}
}

// Workers have no etcd member; a control plane with no etcd manifest (the
// join never got that far) has none either.
func TestResumedJoinWithoutEtcdManifestLeavesEtcdAlone(t *testing.T) {
	for _, role := range []nodeconfig.Role{nodeconfig.RoleWorker, nodeconfig.RoleControlPlane} {
		n := newNode(t, role)
		n.agent.Etcd = &fakeEtcd{runner: n.runner}
		n.fs.put(StateFile, `{"steps":{"join":{"started":"2030-01-01T00:00:00Z"}}}`, 0o600)
		if role == nodeconfig.RoleWorker {
			n.fs.put(etcdManifest, joiningEtcdManifest, 0o600)
		}
		if code := n.run(); code != ExitOK {
			t.Fatalf("%s: exit %d", role, code)
		}
		n.wantCalls(append(hostCalls, "kubeadm reset -f", "kubeadm join --config /etc/kiln/kubeadm-join.yaml")...)
	}
}

// A cluster that lost its quorum with this node's member: the removal is
// retried (the kubelet brings the member back) instead of letting kubeadm
// reset wipe the data the quorum needs; a cluster that never recovers is
// given up on after Timing.EtcdQuorum.
func TestEtcdMemberRemovalWaitsForQuorum(t *testing.T) {
	for _, c := range []struct {
		unhealthy int
		removed   bool
		log       string
	}{
		{unhealthy: 3, removed: true, log: "removed this node's etcd member"},
		{unhealthy: 1 << 30, log: "gave up after"},
	} {
		n := newNode(t, nodeconfig.RoleControlPlane)
		etcd := &fakeEtcd{runner: n.runner, removed: c.removed, unhealthy: c.unhealthy}
		n.agent.Etcd = etcd
		n.fs.put(StateFile, `{"steps":{"join":{"started":"2030-01-01T00:00:00Z"}}}`, 0o600)
		n.fs.put(etcdManifest, joiningEtcdManifest, 0o600)
		for _, f := range []string{etcdCACert, etcdClientCert, etcdClientKey} {
			n.fs.put(f, "PEM "+f, 0o600)
		}
		start := n.clock.now
		if code := n.run(); code != ExitOK {
			t.Fatalf("exit %d", code)
		}
		waited := n.clock.now.Sub(start)
		if c.removed {
			n.wantCalls(append(hostCalls, "etcd remove-member https://10.0.0.13:2380", "kubeadm reset -f", "kubeadm join --config /etc/kiln/kubeadm-join.yaml")...)
			if len(etcd.clients) != 4 {
				t.Errorf("%d removal attempts, want 4", len(etcd.clients))
			}
		} else if waited < n.agent.Timing.EtcdQuorum {
			t.Errorf("gave up after %s, before the %s quorum wait", waited, n.agent.Timing.EtcdQuorum)
		}
		if !strings.Contains(n.log.String(), c.log) || !strings.Contains(n.log.String(), "retrying for up to") {
			t.Errorf("log lacks %q:\n%s", c.log, n.log.String())
		}
	}
}
