package agent

import (
	"strings"
	"testing"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

const (
	lbDir          = "/etc/kiln/load-balancer"
	keepalivedConf = "vrrp_instance x {\n    interface " + nodeconfig.InterfaceToken + "\n}\n"
	kubeVIPPod     = "env: [{name: vip_interface, value: " + nodeconfig.InterfaceToken + "}]\nvolumes: [{hostPath: {path: /etc/kubernetes/super-admin.conf}}]\n"
)

func withLoadBalancer(n *node, typ string, iface string) {
	lb := &nodeconfig.LoadBalancer{Type: typ, Address: "10.0.0.50", Interface: iface}
	switch typ {
	case "keepalived-haproxy":
		lb.Configs = []string{lbDir + "/keepalived.conf"}
		lb.StaticPods = []string{lbDir + "/keepalived.yaml"}
		n.fs.put(lbDir+"/keepalived.conf", keepalivedConf, 0o600)
		n.fs.put(lbDir+"/keepalived.yaml", "kind: Pod\n", 0o600)
	case "kube-vip":
		lb.StaticPods = []string{lbDir + "/kube-vip.yaml"}
		n.fs.put(lbDir+"/kube-vip.yaml", kubeVIPPod, 0o600)
	}
	n.nc.LoadBalancer = lb
	n.writeMetadata()
}

// TestLoadBalancerPlacedBeforeJoin: a control plane's keepalived and
// HAProxy are in kubeadm's static pod folder, with the interface that is
// on the VIP's network, before kubeadm join runs; after a failed attempt
// (kubeadm reset empties the folder) they are placed again.
func TestLoadBalancerPlacedBeforeJoin(t *testing.T) {
	n := newNode(t, nodeconfig.RoleControlPlane)
	withLoadBalancer(n, "keepalived-haproxy", "")
	attempts := 0
	n.runner.handle = func(line string) (string, string, error) {
		switch {
		case strings.HasPrefix(line, "kubeadm join"):
			attempts++
			if !n.fs.has(StaticPodDir + "/keepalived.yaml") {
				t.Errorf("attempt %d: kubeadm join ran without the keepalived static pod", attempts)
			}
			if attempts == 1 {
				return "", "error execution phase control-plane-join/etcd: etcdserver: re-configuration failed due to not enough started members", exit1
			}
		case strings.HasPrefix(line, "kubeadm reset"):
			delete(n.fs.m, rel(StaticPodDir+"/keepalived.yaml"))
		}
		return "", "", nil
	}
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d:\n%s", code, n.log.String())
	}
	if attempts != 2 {
		t.Fatalf("%d join attempts, want 2", attempts)
	}
	if got := n.fs.read(lbDir + "/keepalived.conf"); !strings.Contains(got, "interface eth0\n") || strings.Contains(got, nodeconfig.InterfaceToken) {
		t.Errorf("keepalived.conf not filled in with eth0:\n%s", got)
	}
	if fi, err := n.fs.Stat(StaticPodDir + "/keepalived.yaml"); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("static pod: %v %v", fi, err)
	}
	// A container that reads it as a non-root user must be able to.
	if fi, err := n.fs.Stat(lbDir + "/keepalived.conf"); err != nil || fi.Mode().Perm() != nodeconfig.LoadBalancerConfigMode {
		t.Errorf("config: %v %v", fi, err)
	}
}

func TestLoadBalancerNoInterface(t *testing.T) {
	n := newNode(t, nodeconfig.RoleControlPlane)
	withLoadBalancer(n, "keepalived-haproxy", "")
	n.nc.LoadBalancer.Address = "192.168.7.50"
	n.writeMetadata()
	if code := n.run(); code != ExitRetry {
		t.Fatalf("exit %d, want %d (retry: the network may come up)", code, ExitRetry)
	}
	if s := n.status(); !strings.Contains(s.LastError, "no network interface is on the virtual IP 192.168.7.50's network") || !strings.Contains(s.LastError, "loadBalancer.interface") {
		t.Errorf("status error %q", s.LastError)
	}
	if n.runner.bootstraps() != 0 {
		t.Error("kubeadm ran without the load balancer")
	}
}

// TestKubeVIPSwitchesToAdminConf: on the init node, kube-vip starts with
// super-admin.conf (admin.conf has no rights during kubeadm init) and is
// switched to admin.conf once init has finished.
func TestKubeVIPSwitchesToAdminConf(t *testing.T) {
	n := newInitNode(t)
	withLoadBalancer(n, "kube-vip", "bond0")
	n.runner.handle = func(line string) (string, string, error) {
		switch {
		case line == initCmd:
			if got := n.fs.read(StaticPodDir + "/kube-vip.yaml"); !strings.Contains(got, superAdminConf) || !strings.Contains(got, "value: bond0") {
				t.Errorf("during kubeadm init kube-vip's manifest is:\n%s", got)
			}
		case line == getNodes:
			return nodes(3).stdout, "", nil
		}
		return "", "", nil
	}
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d:\n%s", code, n.log.String())
	}
	got := n.fs.read(StaticPodDir + "/kube-vip.yaml")
	if strings.Contains(got, superAdminConf) || !strings.Contains(got, AdminKubeconfig) {
		t.Errorf("after init kube-vip's manifest is:\n%s", got)
	}
	if src := n.fs.read(lbDir + "/kube-vip.yaml"); !strings.Contains(src, superAdminConf) {
		t.Error("the rendered manifest lost super-admin.conf: a reset init node could not start kube-vip again")
	}
}

// TestNotReadyReason: the init node says what the control planes wait for.
func TestNotReadyReason(t *testing.T) {
	for cni, want := range map[string]string{
		"flannel": "cp-1: network plugin not ready yet",
		"none":    "cp-1: no network plugin (network.cni is none: apply a pod network)",
	} {
		n := newInitNode(t)
		n.nc.PodNetwork = cni
		n.writeMetadata()
		notReady := `{"kind":"NodeList","items":[{"metadata":{"name":"cp-1"},"status":{"conditions":[{"type":"Ready","status":"False","reason":"KubeletNotReady","message":"container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized"}]}}]}`
		polls := 0
		n.runner.handle = func(line string) (string, string, error) {
			if line == getNodes {
				polls++
				if polls == 1 {
					return notReady, "", nil
				}
				return nodes(3).stdout, "", nil
			}
			return "", "", nil
		}
		if code := n.run(); code != ExitOK {
			t.Fatalf("%s: exit %d", cni, code)
		}
		if !strings.Contains(n.log.String(), "0 of 3 control planes Ready; "+want) {
			t.Errorf("%s: the log does not say %q:\n%s", cni, want, n.log.String())
		}
	}
}

// TestNoPodNetworkSaysSo: network.cni none with no add-on is said, not
// waited on silently.
func TestNoPodNetworkSaysSo(t *testing.T) {
	n := newInitNode(t)
	n.nc.Manifests, n.nc.PodNetwork = nil, "none"
	n.writeMetadata()
	n.script(map[string][]result{getNodes: {nodes(3)}})
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	if !strings.Contains(n.log.String(), "network.cni is none and the cluster file lists no add-on") {
		t.Errorf("log:\n%s", n.log.String())
	}
}
