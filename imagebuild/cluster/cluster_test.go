package cluster

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

const valid = `apiVersion: kiln.dev/v1alpha1
kind: Cluster
name: lab
controlPlaneEndpoint: lb.lab.example:6443
`

func TestDefaults(t *testing.T) {
	c, err := Parse([]byte(valid))
	if err != nil {
		t.Fatal(err)
	}
	k := c.Kubernetes
	if k.Version != DefaultKubernetesVersion || k.PodSubnet != DefaultPodSubnet || k.ServiceSubnet != DefaultServiceSubnet ||
		k.DNSDomain != DefaultDNSDomain || k.ControlPlanes != 3 || k.TokenTTL.Duration != DefaultTokenTTL ||
		c.OS.Name != "flatcar" || c.OS.Channel != "stable" || c.OS.Version != "current" || c.Hostname.Template != DefaultHostnameTemplate {
		t.Errorf("defaults not applied: %+v", c)
	}
	if c.Network.CNI != CNIFlannel || c.LoadBalancer.Type != LBExternal || c.LoadBalancer.APIServerPort != 6443 {
		t.Errorf("network and load balancer defaults not applied: %+v %+v", c.Network, c.LoadBalancer)
	}
	if c.Minor() != 37 {
		t.Errorf("Minor() = %d", c.Minor())
	}
}

func TestTokenTTLZeroIsKept(t *testing.T) {
	c, err := Parse([]byte(valid + "kubernetes:\n  tokenTTL: 0s\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Kubernetes.TokenTTL.Duration != 0 {
		t.Errorf("tokenTTL 0s (never expires) was replaced by %s", c.Kubernetes.TokenTTL)
	}
}

// TestValidation checks that each problem is reported with its field path
// and a fix, as a fault.Input error.
func TestValidation(t *testing.T) {
	tests := []struct {
		name  string
		extra string // replaces the valid body after the header
		want  []string
	}{
		{"missing port", "name: lab\ncontrolPlaneEndpoint: lb.lab.example\n", []string{"controlPlaneEndpoint:", "add the port, as lb.lab.example:6443"}},
		{"bare ipv6", "name: lab\ncontrolPlaneEndpoint: 2001:db8::10:6443\n", []string{"controlPlaneEndpoint:", "brackets"}},
		{"ipv6 ok", "name: lab\ncontrolPlaneEndpoint: '[2001:db8::10]:6443'\n", nil},
		{"ipv4 ok", "name: lab\ncontrolPlaneEndpoint: 10.0.0.5:443\n", nil},
		{"bad port", "name: lab\ncontrolPlaneEndpoint: lb:99999\n", []string{"port \"99999\""}},
		{"bad dns", "name: lab\ncontrolPlaneEndpoint: lb_1.example:6443\n", []string{"not a valid DNS name"}},
		{"bad name", "name: Lab_1\ncontrolPlaneEndpoint: lb:6443\n", []string{"name: \"Lab_1\""}},
		{"overlap", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  podSubnet: 10.0.0.0/8\n  serviceSubnet: 10.96.0.0/12\n", []string{"kubernetes.serviceSubnet: 10.96.0.0/12 overlaps kubernetes.podSubnet 10.0.0.0/8"}},
		{"service too large", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  serviceSubnet: 172.16.0.0/8\n", []string{"kubernetes.serviceSubnet: 172.16.0.0/8: use a prefix from /12 to /28"}},
		{"service too small", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  serviceSubnet: 10.96.0.0/29\n", []string{"kubernetes.serviceSubnet: 10.96.0.0/29: use a prefix from /12 to /28", "at least 10"}},
		{"pods smaller than a node's", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  podSubnet: 10.244.0.0/25\n", []string{"kubernetes.podSubnet: 10.244.0.0/25: use a prefix from /8 to /24", "each node a /24"}},
		{"pods too many nodes", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  podSubnet: fd00::/40\n  serviceSubnet: fd01::/112\n", []string{"kubernetes.podSubnet: fd00::/40: use a prefix from /48 to /64"}},
		{"space in list", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  podSubnet: '10.244.0.0/16, fd00:10:244::/56'\n", []string{`kubernetes.podSubnet: "10.244.0.0/16, fd00:10:244::/56": no spaces`, `use "10.244.0.0/16,fd00:10:244::/56"`}},
		{"uppercase endpoint", "name: lab\ncontrolPlaneEndpoint: LB.Example.COM:6443\n", []string{"controlPlaneEndpoint:", "use lb.example.com:6443"}},
		{"host bits", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  podSubnet: 10.244.1.0/16\n", []string{"host bits set: use 10.244.0.0/16"}},
		{"dual stack ok", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  podSubnet: 10.244.0.0/16,fd00:10:244::/56\n  serviceSubnet: 10.96.0.0/12,fd00:10:96::/112\n", nil},
		{"old kubernetes", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  version: v1.32.2\n", []string{"kubernetes.version: v1.32.2 is not supported: kiln supports v1.33 to v1.37"}},
		{"new kubernetes", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  version: v1.38.0\n", []string{"not supported"}},
		{"version format", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  version: 1.37\n", []string{"not a version like v1.37.2"}},
		{"even control planes", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  controlPlanes: 2\n", []string{"kubernetes.controlPlanes: 2: use an odd number"}},
		{"negative ttl", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  tokenTTL: -1h\n", []string{"kubernetes.tokenTTL: must not be negative"}},
		{"bad os", "name: lab\ncontrolPlaneEndpoint: lb:6443\nos:\n  name: ubuntu\n", []string{"os.name: unknown OS \"ubuntu\": use one of fcos, flatcar"}},
		{"bad channel", "name: lab\ncontrolPlaneEndpoint: lb:6443\nos:\n  name: fcos\n  channel: lts\n", []string{"os.channel: \"lts\" is not a fcos channel"}},
		{"bad os version", "name: lab\ncontrolPlaneEndpoint: lb:6443\nos:\n  version: 42\n", []string{"os.version"}},
		{"ssh private", "name: lab\ncontrolPlaneEndpoint: lb:6443\nssh:\n  authorizedKeys: ['-----BEGIN OPENSSH PRIVATE KEY-----']\n", []string{"ssh.authorizedKeys[0]: this is a private key: use the public key (.pub)"}},
		{"ssh type", "name: lab\ncontrolPlaneEndpoint: lb:6443\nssh:\n  authorizedKeys: ['ssh-dss AAAA x']\n", []string{"ssh.authorizedKeys[0]: key type \"ssh-dss\""}},
		{"template var", "name: lab\ncontrolPlaneEndpoint: lb:6443\nhostname:\n  template: 'n-{serial}'\n", []string{"hostname.template", "unknown variable {serial}"}},
		{"template case", "name: lab\ncontrolPlaneEndpoint: lb:6443\nhostname:\n  template: 'Node-{mac}'\n", []string{"hostname.template", "invalid node name"}},
		{"long name, default template", "name: a-very-long-cluster-name-for-the-edge-sites-01\ncontrolPlaneEndpoint: lb:6443\n", []string{"hostname.template", "at most 63", "shorten the template or the cluster name"}},
		{"unknown role", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: master}\n", []string{"nodes[0].role: unknown role \"master\""}},
		{"dup mac", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: init, mac: '52:54:00:00:00:01'}\n  - {name: b, role: worker, mac: '52-54-00-00-00-01'}\n", []string{"nodes[1].mac: 52:54:00:00:00:01 is already used by nodes[0]"}},
		{"bad mac", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00'}\n", []string{"nodes[0].mac"}},
		{"dup name", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker}\n  - {name: a, role: worker}\n", []string{"nodes[1].name: \"a\" is already used by nodes[0]"}},
		{"bad cni", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnetwork:\n  cni: calico\n", []string{"network.cni: \"calico\": use flannel", "none"}},
		{"cni none ok", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnetwork:\n  cni: none\n", nil},
		{"bad lb type", "name: lab\ncontrolPlaneEndpoint: lb:6443\nloadBalancer:\n  type: metallb\n", []string{"loadBalancer.type: \"metallb\""}},
		{"vip is a name", "name: lab\ncontrolPlaneEndpoint: lb:6443\nloadBalancer:\n  type: kube-vip\n", []string{"controlPlaneEndpoint", "must be an IP address, not a name"}},
		{"vip is a node", "name: lab\ncontrolPlaneEndpoint: 10.0.0.11:6443\nloadBalancer:\n  type: kube-vip\nnodes:\n  - {name: c1, role: init, ip: 10.0.0.11}\n", []string{"nodes[0].ip: 10.0.0.11 is controlPlaneEndpoint's virtual IP"}},
		{"vip in pods", "name: lab\ncontrolPlaneEndpoint: 10.244.0.5:6443\nloadBalancer:\n  type: kube-vip\n", []string{"virtual IP 10.244.0.5 lies inside kubernetes.podSubnet"}},
		{"vip in services", "name: lab\ncontrolPlaneEndpoint: 10.96.0.5:6443\nloadBalancer:\n  type: kube-vip\n", []string{"lies inside kubernetes.serviceSubnet"}},
		{"kube-vip ok", "name: lab\ncontrolPlaneEndpoint: 192.168.1.50:6443\nloadBalancer:\n  type: kube-vip\n", nil},
		{"kube-vip port", "name: lab\ncontrolPlaneEndpoint: 192.168.1.50:6443\nloadBalancer:\n  type: kube-vip\n  apiServerPort: 6444\n", []string{"loadBalancer.apiServerPort: 6444: kube-vip only moves the address"}},
		{"bad interface", "name: lab\ncontrolPlaneEndpoint: 192.168.1.50:6443\nloadBalancer:\n  type: kube-vip\n  interface: 'eth0/1'\n", []string{"loadBalancer.interface"}},
		{"keepalived ok", "name: lab\ncontrolPlaneEndpoint: 10.0.0.50:6443\nloadBalancer:\n  type: keepalived-haproxy\nimages:\n  keepalived: r.test/keepalived:1@sha256:0000000000000000000000000000000000000000000000000000000000000000\nnodes:\n  - {name: c1, role: init, ip: 10.0.0.11}\n  - {name: c2, role: control-plane, ip: 10.0.0.12}\n  - {name: c3, role: control-plane, ip: 10.0.0.13}\n", nil},
		{"keepalived unpinned", "name: lab\ncontrolPlaneEndpoint: 10.0.0.50:6443\nloadBalancer:\n  type: keepalived-haproxy\nnodes:\n  - {name: c1, role: init, ip: 10.0.0.11}\n  - {name: c2, role: control-plane, ip: 10.0.0.12}\n  - {name: c3, role: control-plane, ip: 10.0.0.13}\n", []string{"images.keepalived: kiln has no default digest"}},
		{"keepalived backends", "name: lab\ncontrolPlaneEndpoint: 10.0.0.50:6443\nloadBalancer:\n  type: keepalived-haproxy\nimages:\n  keepalived: r.test/keepalived:1@sha256:0000000000000000000000000000000000000000000000000000000000000000\n", []string{"nodes: loadBalancer.type keepalived-haproxy balances over every control plane's address", "found 0"}},
		{"keepalived port clash", "name: lab\ncontrolPlaneEndpoint: 10.0.0.50:6443\nloadBalancer:\n  type: keepalived-haproxy\n  apiServerPort: 6443\nimages:\n  keepalived: r.test/keepalived:1@sha256:0000000000000000000000000000000000000000000000000000000000000000\nnodes:\n  - {name: c1, role: init, ip: 10.0.0.11}\n  - {name: c2, role: control-plane, ip: 10.0.0.12}\n  - {name: c3, role: control-plane, ip: 10.0.0.13}\n", []string{"loadBalancer.apiServerPort: 6443 is the endpoint's port"}},
		{"keepalived router id", "name: lab\ncontrolPlaneEndpoint: 10.0.0.50:6443\nloadBalancer:\n  type: keepalived-haproxy\n  virtualRouterID: 300\nimages:\n  keepalived: r.test/keepalived:1@sha256:0000000000000000000000000000000000000000000000000000000000000000\nnodes:\n  - {name: c1, role: init, ip: 10.0.0.11}\n  - {name: c2, role: control-plane, ip: 10.0.0.12}\n  - {name: c3, role: control-plane, ip: 10.0.0.13}\n", []string{"loadBalancer.virtualRouterID: 300"}},
		{"addon both", "name: lab\ncontrolPlaneEndpoint: lb:6443\naddons:\n  - {path: a.yaml, url: 'https://x/a.yaml'}\n", []string{"addons[0]: set exactly one of path"}},
		{"addon url no sha", "name: lab\ncontrolPlaneEndpoint: lb:6443\naddons:\n  - {url: 'https://x/a.yaml'}\n", []string{"addons[0].sha256: required with url"}},
		{"addon url scheme", "name: lab\ncontrolPlaneEndpoint: lb:6443\naddons:\n  - {url: 'ftp://x/a.yaml', sha256: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}\n", []string{"addons[0].url"}},
		{"addon path sha", "name: lab\ncontrolPlaneEndpoint: lb:6443\naddons:\n  - {path: a.yaml, sha256: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}\n", []string{"addons[0].sha256: only for url"}},
		{"image unknown", "name: lab\ncontrolPlaneEndpoint: lb:6443\nimages:\n  calico: x@sha256:0000000000000000000000000000000000000000000000000000000000000000\n", []string{"images.calico: kiln runs no image of that name"}},
		{"image unpinned", "name: lab\ncontrolPlaneEndpoint: lb:6443\nimages:\n  flannel: ghcr.io/flannel-io/flannel:v0.28.4\n", []string{"images.flannel", "not pinned by digest"}},
		{"dup ip", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, ip: 10.0.0.1}\n  - {name: b, role: worker, ip: 10.0.0.1}\n", []string{"nodes[1].ip"}},
		{"two inits", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: init}\n  - {name: b, role: init}\n", []string{"nodes: 2 nodes have role init"}},
		{"too many cps", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  controlPlanes: 1\nnodes:\n  - {name: a, role: init}\n  - {name: b, role: control-plane}\n", []string{"nodes: 2 control-plane nodes listed but kubernetes.controlPlanes is 1"}},
		{"bad sha", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  downloads:\n    - {name: kubernetes-sysext, arch: amd64, os: flatcar, kubernetesVersion: v1.37.2, url: 'https://x/y', sha512: abc}\n", []string{"kubernetes.downloads[0].sha512: must be 128 lowercase hex digits"}},
		{"bad artifact", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  downloads:\n    - {name: kubeadm, arch: amd64, os: flatcar, kubernetesVersion: v1.37.2, url: 'https://x/y', sha512: ''}\n", []string{"kubernetes.downloads[0].name: \"kubeadm\" is not an artifact of flatcar"}},
		{"bad url", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  downloads:\n    - {name: kubernetes-sysext, arch: amd64, os: flatcar, kubernetesVersion: v1.37.2, url: 'file:///x', sha512: ''}\n", []string{"kubernetes.downloads[0].url"}},
		{"pin for another version", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  downloads:\n    - {name: kubernetes-sysext, arch: arm64, os: flatcar, kubernetesVersion: v1.36.3, url: 'https://x/y', sha512: ''}\n", []string{"kubernetes.downloads[0]: kubernetes-sysext for arm64: pinned for Kubernetes v1.36.3, kubernetes.version is v1.37.2: run kiln pin"}},
		{"pin for another os", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  downloads:\n    - {name: kubeadm, arch: amd64, os: fcos, kubernetesVersion: v1.37.2, url: 'https://x/y', sha512: ''}\n", []string{"kubernetes.downloads[0]: kubeadm for amd64: pinned for os.name fcos, the cluster is flatcar: run kiln pin"}},
		{"pin without a record", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  downloads:\n    - {name: kubernetes-sysext, arch: amd64, url: 'https://x/y', sha512: ''}\n", []string{"kubernetes.downloads[0]: kubernetes-sysext for amd64: no record of the OS and Kubernetes version it was pinned for"}},
		{"patch target", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubeadmPatches:\n  - {target: kubelet, patch: 'a: b'}\n", []string{"kubeadmPatches[0].target: \"kubelet\""}},
		{"json patch shape", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubeadmPatches:\n  - {target: etcd, type: json, patch: 'a: b'}\n", []string{"kubeadmPatches[0].patch: a json patch is a list"}},
		{"preflight ok", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  ignorePreflightErrors: [Mem, SystemVerification, Port-10250, FileAvailable--etc-kubernetes-manifests-etcd.yaml]\n", nil},
		{"preflight all alone", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  ignorePreflightErrors: [all, Mem]\n", []string{"kubernetes.ignorePreflightErrors: all already skips every check"}},
		{"preflight dup", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  ignorePreflightErrors: [Mem, mem]\n", []string{"kubernetes.ignorePreflightErrors[1]: mem is already listed at [0]"}},
		{"preflight name", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  ignorePreflightErrors: ['Mem,Swap']\n", []string{"kubernetes.ignorePreflightErrors[0]: \"Mem,Swap\" is not a kubeadm preflight check name"}},
		{"profile unknown", "name: lab\ncontrolPlaneEndpoint: lb:6443\nprofile: flatcar-riscv64\n", []string{"profile: unknown target profile \"flatcar-riscv64\""}},
		{"node profile of another os", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, profile: fcos-aarch64}\n", []string{"nodes[0].profile: fcos-aarch64 is a fcos profile but os.name is flatcar"}},
		{"profiles ok", "name: lab\ncontrolPlaneEndpoint: lb:6443\nprofile: flatcar-amd64\nnodes:\n  - {name: pi-1, role: init, profile: flatcar-rpi4}\n", nil},
		{"network ok", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', network: {address: 192.168.1.21/24, gateway: 192.168.1.1, dns: [192.168.1.1, 'fd00::53'], vlan: 20}}\n  - {name: b, role: worker, network: {interface: end0, address: 'fd00::22/64'}}\n", nil},
		{"network no interface", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, network: {address: 192.168.1.21/24}}\n", []string{"nodes[0].network.interface: required when the node has no mac"}},
		{"network bad interface", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, network: {interface: 'eth 0', address: 192.168.1.21/24}}\n", []string{"nodes[0].network.interface: \"eth 0\" is not a network interface name"}},
		{"network no prefix", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', network: {address: 192.168.1.21}}\n", []string{"nodes[0].network.address: \"192.168.1.21\" is not an address with its prefix length, like 192.168.1.11/24"}},
		{"network address is the network", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', network: {address: 192.168.1.0/24}}\n", []string{"nodes[0].network.address: 192.168.1.0/24 is the network's own address: give the node's address, as 192.168.1.1"}},
		{"network broadcast", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', network: {address: 192.168.1.255/24}}\n", []string{"nodes[0].network.address: 192.168.1.255/24 is the network's broadcast address"}},
		{"network gateway outside", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', network: {address: 192.168.1.21/24, gateway: 192.168.2.1}}\n", []string{"nodes[0].network.gateway: 192.168.2.1 is outside the node's network 192.168.1.0/24"}},
		{"network gateway is the node", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', network: {address: 192.168.1.21/24, gateway: 192.168.1.21}}\n", []string{"nodes[0].network.gateway: 192.168.1.21 is the node's own address"}},
		{"network dns name", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', network: {address: 192.168.1.21/24, dns: [dns.lab]}}\n", []string{"nodes[0].network.dns[0]: \"dns.lab\" is not an IP address"}},
		{"zoned dns", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', network: {address: 'fd00::21/64', dns: ['fd00::53%\"; insmod x; set y=\"']}}\n", []string{"nodes[0].network.dns[0]: ", "is not an IP address"}},
		{"zoned ip", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, ip: 'fe80::1%eth0'}\n", []string{"nodes[0].ip: ", "is not an IP address"}},
		{"node disk", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, disk: sda}\n", []string{`nodes[0].disk: install disk "sda": give a device path such as /dev/sda`}},
		{"network vlan", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', network: {address: 192.168.1.21/24, vlan: 4095}}\n", []string{"nodes[0].network.vlan: 4095: 802.1Q VLAN IDs are 1 to 4094"}},
		{"network ip disagrees", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, mac: '52:54:00:00:00:01', ip: 192.168.1.22, network: {address: 192.168.1.21/24}}\n", []string{"nodes[0].network.address: 192.168.1.21 is not the node's ip 192.168.1.22"}},
		{"network dup address", "name: lab\ncontrolPlaneEndpoint: lb:6443\nnodes:\n  - {name: a, role: worker, ip: 192.168.1.21}\n  - {name: b, role: worker, mac: '52:54:00:00:00:01', network: {address: 192.168.1.21/24}}\n", []string{"nodes[1].ip: 192.168.1.21 is already used by nodes[0]"}},
		{"network is the vip", "name: lab\ncontrolPlaneEndpoint: 192.168.1.50:6443\nloadBalancer:\n  type: kube-vip\nnodes:\n  - {name: a, role: init, mac: '52:54:00:00:00:01', network: {address: 192.168.1.50/24}}\n", []string{"nodes[0].ip: 192.168.1.50 is controlPlaneEndpoint's virtual IP"}},
		{"vip off the control plane's lan", "name: lab\ncontrolPlaneEndpoint: 192.168.1.50:6443\nloadBalancer:\n  type: kube-vip\nnodes:\n  - {name: a, role: init, mac: '52:54:00:00:00:01', network: {address: 192.168.2.11/24}}\n", []string{"nodes[0].network.address: the virtual IP 192.168.1.50 is outside this control plane's network 192.168.2.0/24"}},
		{"keepalived backends from network", "name: lab\ncontrolPlaneEndpoint: 10.0.0.50:6443\nloadBalancer:\n  type: keepalived-haproxy\nimages:\n  keepalived: r.test/keepalived:1@sha256:0000000000000000000000000000000000000000000000000000000000000000\nnodes:\n  - {name: c1, role: init, mac: '52:54:00:00:00:01', network: {address: 10.0.0.11/24}}\n  - {name: c2, role: control-plane, ip: 10.0.0.12}\n  - {name: c3, role: control-plane, ip: 10.0.0.13}\n", nil},
		{"template without mac", "name: lab\ncontrolPlaneEndpoint: lb:6443\nhostname:\n  template: '{cluster}-{role}'\n", []string{`hostname.template: "{cluster}-{role}" has no per-machine part`, "lab-control-plane would be the name of the 2 control planes booted from the control-plane image", "lab-worker would be the name of every worker booted from the worker image", "add {mac}"}},
		{"template without role or mac", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  controlPlanes: 1\nhostname:\n  template: 'node'\nnodes:\n  - {name: node, role: init}\n", []string{"node would be the name of every worker booted from the worker image and nodes[0]"}},
		{"template without mac, one control plane, no workers named", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubernetes:\n  controlPlanes: 1\nhostname:\n  template: '{cluster}-{role}'\nnodes:\n  - {name: lab-init, role: init}\n", []string{"(lab-worker would be the name of every worker booted from the worker image)"}},
		{"patch role", "name: lab\ncontrolPlaneEndpoint: lb:6443\nkubeadmPatches:\n  - {target: etcd, roles: [boss], patch: 'a: b'}\n", []string{"kubeadmPatches[0].roles[0]"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte("apiVersion: kiln.dev/v1alpha1\nkind: Cluster\n" + tt.extra))
			if tt.want == nil {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error, want %q", tt.want)
			}
			if fault.KindOf(err) != fault.Input {
				t.Errorf("error kind %v, want Input", fault.KindOf(err))
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestEveryProblemAtOnce(t *testing.T) {
	_, err := Parse([]byte("apiVersion: kiln.dev/v1alpha1\nkind: Cluster\nname: Bad\ncontrolPlaneEndpoint: lb\nkubernetes:\n  version: v1.20.0\n  controlPlanes: 4\n"))
	var inv *InvalidError
	if !errors.As(err, &inv) {
		t.Fatalf("got %v, want *InvalidError", err)
	}
	if len(inv.Problems) != 4 {
		t.Errorf("got %d problems, want 4 (name, endpoint, version, controlPlanes):\n%v", len(inv.Problems), err)
	}
}

func TestStrictDecoding(t *testing.T) {
	for name, doc := range map[string]string{
		"unknown field": valid + "kubernets: {}\n",
		"wrong kind":    "apiVersion: kiln.dev/v1alpha1\nkind: Node\n",
		"wrong version": "apiVersion: kiln.dev/v9\nkind: Cluster\n",
		"not yaml":      "{{{",
	} {
		if _, err := Parse([]byte(doc)); err == nil || fault.KindOf(err) != fault.Input {
			t.Errorf("%s: got %v, want an Input error", name, err)
		}
	}
}

// Decoding errors speak of the file: line and path, the fields allowed,
// what a field wants; every one at once; never a Go type name.
func TestDecodingErrorsInTheFilesTerms(t *testing.T) {
	for name, c := range map[string]struct {
		doc  string
		want []string
	}{
		"every problem": {valid + "controlPlanes: 3\nkubernetes:\n  controlPlanes: three\n  tokenTTL: [1]\nnodes:\n  - name: cp-1\n    MAC: 52:54:00:00:00:01\n    role: [init]\n", []string{
			"line 5: controlPlanes: unknown field (fields here: apiVersion, kind, name, controlPlaneEndpoint, kubernetes,",
			`line 7: kubernetes.controlPlanes: wants a whole number, not text "three"`,
			"line 8: kubernetes.tokenTTL: wants a duration such as 24h, not a list",
			"line 11: nodes[0].MAC: unknown field; did you mean mac? (fields here: name, role, mac, ip, profile, network, disk, butane)",
			"line 12: nodes[0].role: wants text, not a list",
		}},
		"tab": {valid + "kubernetes:\n\tversion: v1.37.2\n", []string{"holds a tab: YAML indents with spaces only"}},
	} {
		_, err := Parse([]byte(c.doc))
		if err == nil {
			t.Fatalf("%s: accepted", name)
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error lacks %q:\n%v", name, w, err)
			}
		}
		if strings.Contains(err.Error(), "cluster.") || strings.Contains(err.Error(), "nodeconfig.") {
			t.Errorf("%s: a Go type name in %v", name, err)
		}
	}
}

func TestLoadSnippets(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cluster.yaml")
	if err := os.WriteFile(path, []byte(valid+"butane: [extra.bu]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), "butane[0]") {
		t.Fatalf("missing snippet: got %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "extra.bu"), []byte("variant: flatcar\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Snippets) != 1 || string(c.Snippets[0].Data) != "variant: flatcar\n" {
		t.Errorf("snippets = %+v", c.Snippets)
	}
	// nodes[].butane: read for that node, a missing one named by its field.
	os.WriteFile(path, []byte(valid+"nodes:\n  - {name: a, role: worker, butane: [extra.bu, a.bu]}\n"), 0o644)
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), "nodes[0].butane[1]: ") {
		t.Fatalf("missing node snippet: got %v", err)
	}
	os.WriteFile(filepath.Join(dir, "a.bu"), []byte("variant: flatcar # a\n"), 0o644)
	if c, err = Load(path); err != nil || len(c.Nodes[0].Snippets) != 2 || string(c.Nodes[0].Snippets[1].Data) != "variant: flatcar # a\n" {
		t.Errorf("node snippets: %v %+v", err, c)
	}
	if _, err := Load(filepath.Join(dir, "nope.yaml")); err == nil || !strings.Contains(err.Error(), "kiln init") {
		t.Errorf("missing file: got %v", err)
	}
}

// TestInputSizeLimits: a cluster file, Butane file or add-on past its
// limit (a wrong path: a disk image, a device) is bad input naming the
// file and the limit, read no further than the limit.
func TestInputSizeLimits(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cluster.yaml")
	big := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(big, make([]byte, MaxSnippet+1), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ file, want string }{
		{valid + "butane: [disk.img]\n", "butane[0]: " + big + " is larger than 4 MiB, the most a Butane file may be: is it the right file?"},
		{valid + "addons: [{path: /dev/zero}]\n", "addons[0].path: /dev/zero is larger than 16 MiB, the most an add-on may be"},
	} {
		os.WriteFile(path, []byte(tc.file), 0o644)
		if _, err := Load(path); fault.KindOf(err) != fault.Input || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("got %v, want %q", err, tc.want)
		}
	}
	if _, err := Load("/dev/zero"); fault.KindOf(err) != fault.Input || !strings.Contains(err.Error(), "/dev/zero is larger than 1 MiB, the most a cluster file may be") {
		t.Errorf("cluster file /dev/zero: %v", err)
	}
}

// TestLoadAddons: one report names a missing add-on file, add-on files
// kubectl could not apply, and the file's other problems; a manifest of
// Kubernetes objects loads.
func TestLoadAddons(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cluster.yaml")
	files := map[string]string{
		"text.yaml":   "just some text\n",
		"broken.yaml": "this: is: not: yaml\n",
		"noname.yaml": "apiVersion: v1\nkind: Namespace\n",
		"ok.yaml":     "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n---\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	addons := "addons:\n  - path: missing.yaml\n  - path: text.yaml\n  - path: broken.yaml\n  - path: noname.yaml\n  - path: ok.yaml\n"
	if err := os.WriteFile(path, []byte(strings.Replace(valid, "name: lab", "name: Lab", 1)+addons), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	for _, want := range []string{"5 problems", "addons[0].path: open", "addons[1].path: text.yaml: document 1 is not a Kubernetes object", "addons[2].path: broken.yaml: document 1 is not YAML", "addons[3].path: noname.yaml: document 1 is not a Kubernetes object", "name: \"Lab\""} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v, want %q", err, want)
		}
	}
	if err := os.WriteFile(path, []byte(valid+"addons:\n  - path: ok.yaml\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil || string(c.Addons[0].Data) != files["ok.yaml"] {
		t.Fatalf("good add-on: %v", err)
	}
}

func TestEncodeRoundTrip(t *testing.T) {
	c, err := Parse([]byte(valid))
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.Encode()
	if err != nil {
		t.Fatal(err)
	}
	c2, err := Parse(out)
	if err != nil {
		t.Fatalf("encoded file does not parse: %v\n%s", err, out)
	}
	out2, _ := c2.Encode()
	if string(out) != string(out2) {
		t.Errorf("round trip differs:\n%s\n%s", out, out2)
	}
}

// TestAPIServerPortDefault: HAProxy on the control planes takes the
// endpoint's port, so the API servers move to 6444 only then.
func TestAPIServerPortDefault(t *testing.T) {
	for _, tc := range []struct {
		body string
		want int
	}{
		{"controlPlaneEndpoint: 10.0.0.50:6443\nloadBalancer: {type: kube-vip}\n", 6443},
		{"controlPlaneEndpoint: 10.0.0.50:443\nloadBalancer: {type: kube-vip}\n", 443},
		{"controlPlaneEndpoint: lb:443\n", 6443},
		{"controlPlaneEndpoint: 10.0.0.50:6443\nloadBalancer: {type: keepalived-haproxy}\n", 6444},
		{"controlPlaneEndpoint: 10.0.0.50:8443\nloadBalancer: {type: keepalived-haproxy}\n", 6443},
	} {
		var c Cluster
		if err := yaml.Unmarshal([]byte("name: lab\n"+tc.body), &c); err != nil {
			t.Fatal(err)
		}
		c.SetDefaults()
		if c.LoadBalancer.APIServerPort != tc.want {
			t.Errorf("%q: apiServerPort %d, want %d", tc.body, c.LoadBalancer.APIServerPort, tc.want)
		}
	}
}
