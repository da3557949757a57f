package agent

import (
	"context"
	"strings"
)

// kubeadm's stacked etcd on a control plane.
const (
	etcdManifest = "/etc/kubernetes/manifests/etcd.yaml"
	etcdCACert   = "/etc/kubernetes/pki/etcd/ca.crt"
	// The API server's etcd client certificate: kubeadm writes it in the
	// same phase as the etcd manifest's certificates, and etcd accepts any
	// client certificate its CA signed.
	etcdClientCert = "/etc/kubernetes/pki/apiserver-etcd-client.crt"
	etcdClientKey  = "/etc/kubernetes/pki/apiserver-etcd-client.key"
)

// EtcdClient is how to reach a kubeadm stacked etcd cluster.
type EtcdClient struct {
	// Endpoints are client URLs (https://IP:2379) of the other members.
	Endpoints []string
	// CA, Cert and Key are PEM: etcd's CA and a client certificate.
	CA, Cert, Key []byte
}

// EtcdMembers edits the membership of an etcd cluster.
type EtcdMembers interface {
	// RemoveMember removes the member whose peer URL is peerURL, asking the
	// endpoints in turn; it reports whether there was one.
	RemoveMember(ctx context.Context, c EtcdClient, peerURL string) (bool, error)
}

// forgetEtcdMember removes this node's own etcd member from the cluster
// before kubeadm reset wipes its data.
//
// A control-plane join that stops after kubeadm added the node's etcd
// member (a power cut, a crash, a failed wait) leaves that member in the
// cluster. kubeadm reset would remove it, but only with the node's
// kubelet.conf and Node object, which exist only once the kubelet has
// bootstrapped, later in the join. The next join then re-adds the same
// peer URL, and the new etcd, with the old member ID and an empty data
// directory, panics ("tocommit(N) is out of range [lastIndex(0)]") while
// the stale learner blocks every other control plane's join ("too many
// learner members in cluster"). The rehearsal (test/rehearsal, scenario
// killed-join) showed exactly that.
//
// The node's etcd manifest names its own peer URL and the other members;
// the certificates kubeadm left beside it can talk to them.
//
// Removing a member needs a quorum. When the cut came after the member was
// promoted to a voter, the cluster lost its quorum with this node (two
// voters, one down): removal fails with "unhealthy cluster" until the
// kubelet restarts this member from its manifest and data. So the removal
// is retried for Timing.EtcdQuorum before kubeadm reset wipes that data,
// which would leave the quorum lost for good (the rehearsal's killed-join
// scenario showed that too). Failures are then logged, not fatal: kubeadm
// reset and the next join still run.
func (r *run) forgetEtcdMember(ctx context.Context) {
	if !r.nc.Role.IsControlPlane() {
		return
	}
	manifest, err := r.FS.ReadFile(etcdManifest)
	if err != nil {
		return // no etcd here: nothing was added
	}
	self, peers := etcdPeers(manifest)
	var endpoints []string
	for _, p := range peers {
		if p != self {
			endpoints = append(endpoints, clientURL(p))
		}
	}
	if self == "" || len(endpoints) == 0 {
		return // a first member (kubeadm init): no cluster to leave
	}
	if r.Etcd == nil {
		r.log.printf("etcd member %s may be left in the cluster: no etcd client in this build", self)
		return
	}
	c := EtcdClient{Endpoints: endpoints}
	for _, f := range []struct {
		name string
		dst  *[]byte
	}{{etcdCACert, &c.CA}, {etcdClientCert, &c.Cert}, {etcdClientKey, &c.Key}} {
		if *f.dst, err = r.FS.ReadFile(f.name); err != nil {
			r.log.printf("cannot check for a stale etcd member %s: %v", self, err)
			return
		}
	}
	deadline := r.Clock.Now().Add(r.Timing.EtcdQuorum)
	for try := 1; ; try++ {
		removed, err := r.Etcd.RemoveMember(ctx, c, self)
		switch {
		case err == nil && removed:
			r.log.printf("removed this node's etcd member %s, left by an unfinished join", self)
			return
		case err == nil:
			return
		case !r.Clock.Now().Before(deadline):
			r.log.printf("remove this node's etcd member %s: %v (gave up after %d tries; continuing)", self, err, try)
			return
		case try == 1:
			r.log.printf("remove this node's etcd member %s: %v; retrying for up to %s while the kubelet restarts the member from its data", self, err, r.Timing.EtcdQuorum)
		}
		if r.Clock.Sleep(ctx, r.Timing.Poll) != nil {
			return
		}
	}
}

// etcdPeers reads kubeadm's etcd manifest: this member's peer URL
// (--initial-advertise-peer-urls) and every member's (--initial-cluster).
func etcdPeers(manifest []byte) (self string, peers []string) {
	for _, line := range strings.Split(string(manifest), "\n") {
		line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "-"))
		if v, ok := strings.CutPrefix(line, "--initial-advertise-peer-urls="); ok {
			self, _, _ = strings.Cut(v, ",")
		}
		if v, ok := strings.CutPrefix(line, "--initial-cluster="); ok {
			for _, m := range strings.Split(v, ",") {
				if _, u, ok := strings.Cut(m, "="); ok {
					peers = append(peers, u)
				}
			}
		}
	}
	return self, peers
}

// clientURL turns a kubeadm peer URL (https://IP:2380) into the member's
// client URL (https://IP:2379).
func clientURL(peer string) string {
	host := strings.TrimPrefix(peer, "https://")
	if i := strings.LastIndex(host, ":"); i >= 0 {
		host = host[:i]
	}
	return "https://" + host + ":2379"
}
