package render

import (
	"fmt"
	"net/netip"
	"path"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/manifests"
)

// Where the init node keeps what it applies after kubeadm init.
const ManifestsPath = KilnDir + "/manifests"

// Manifest is one file the init node applies: kiln's rendered pod network
// or a local add-on (Data), or an add-on that Ignition downloads from URL
// and checks against SHA256 (hex).
type Manifest struct {
	// Path is where the file lands on the init node.
	Path        string
	Data        []byte
	URL, SHA256 string
}

// Manifests returns what the init node applies, in order: the pod network
// (network.cni flannel), then the add-ons as listed.
func Manifests(c *cluster.Cluster) ([]Manifest, error) {
	var out []Manifest
	if c.Network.CNI == cluster.CNIFlannel {
		data, err := manifests.Flannel(c.Kubernetes.PodSubnet, c.Images)
		if err != nil {
			return nil, fmt.Errorf("render flannel: %w", err)
		}
		out = append(out, Manifest{Path: path.Join(ManifestsPath, "00-flannel.yaml"), Data: data})
	}
	for i, a := range c.Addons {
		m := Manifest{Path: path.Join(ManifestsPath, fmt.Sprintf("%02d-addon.yaml", i+1)), Data: a.Data, URL: a.URL, SHA256: a.SHA256}
		out = append(out, m)
	}
	return out, nil
}

// loadBalancer returns the node metadata's load balancer and the files
// behind it, for a control plane of a cluster whose control planes hold
// the endpoint's virtual IP; nil for other nodes and external balancers.
func loadBalancer(c *cluster.Cluster, role nodeconfig.Role) (*nodeconfig.LoadBalancer, []manifests.File, error) {
	lb := c.LoadBalancer
	if lb.Type == cluster.LBExternal || !role.IsControlPlane() {
		return nil, nil, nil
	}
	vip := c.VIP()
	spec := manifests.LoadBalancer{
		VIP: vip, VIPBits: vip.BitLen(), Port: c.EndpointPort(), Interface: lb.Interface,
		RouterID: lb.VirtualRouterID, RouterName: c.Name, AdvertInterval: lb.AdvertInterval,
		Overrides: c.Images,
	}
	if spec.Interface == "" {
		spec.Interface = nodeconfig.InterfaceToken
	}
	var files []manifests.File
	var err error
	switch lb.Type {
	case cluster.LBKeepalivedHAProxy:
		for _, n := range c.Nodes {
			if ip := n.Address(); ip.IsValid() && n.Role.IsControlPlane() {
				spec.Backends = append(spec.Backends, manifests.Backend{Name: n.Name, Address: netip.AddrPortFrom(ip, uint16(lb.APIServerPort))})
			}
		}
		files, err = manifests.KeepalivedHAProxy(spec)
	case cluster.LBKubeVIP:
		kubeconfig := manifests.AdminKubeconfig
		if role == nodeconfig.RoleInit {
			kubeconfig = manifests.SuperAdminKubeconfig
		}
		files, err = manifests.KubeVIP(spec, kubeconfig)
	default:
		return nil, nil, fmt.Errorf("loadBalancer.type %q passed validation", lb.Type)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("render load balancer: %w", err)
	}
	meta := &nodeconfig.LoadBalancer{Type: lb.Type, Address: vip.String(), Interface: lb.Interface}
	for _, f := range files {
		p := path.Join(manifests.ConfigDir, f.Name)
		if path.Ext(f.Name) == ".yaml" {
			meta.StaticPods = append(meta.StaticPods, p)
		} else {
			meta.Configs = append(meta.Configs, p)
		}
	}
	return meta, files, nil
}
