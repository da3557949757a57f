package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"path"
	"strings"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// StaticPodDir is kubeadm's static pod folder (the kubelet's staticPodPath
// in the configuration kubeadm writes).
const StaticPodDir = "/etc/kubernetes/manifests"

// superAdminConf is the kubeconfig kube-vip's manifest names on the init
// node (see manifests.KubeVIP); AdminKubeconfig is right once kubeadm init
// has finished.
const superAdminConf = "/etc/kubernetes/super-admin.conf"

// Interface is a network interface and the prefixes of its addresses.
type Interface struct {
	Name     string
	Prefixes []netip.Prefix
}

// placeLoadBalancer writes the static pods that hold the control-plane
// endpoint's virtual IP into kubeadm's static pod folder, and their
// configuration files beside the rendered ones, with the interface filled
// in. It runs before kubeadm (the VIP must answer when kubeadm talks to
// the endpoint) and again after every kubeadm reset, which empties the
// folder. Files already right are left alone, so a running pod is not
// restarted.
func (r *run) placeLoadBalancer(context.Context) error {
	lb := r.nc.LoadBalancer
	if lb == nil {
		return nil
	}
	iface := lb.Interface
	if iface == "" {
		var err error
		if iface, err = r.vipInterface(lb.Address); err != nil {
			return err
		}
	}
	fill := func(data []byte) []byte {
		return bytes.ReplaceAll(data, []byte(nodeconfig.InterfaceToken), []byte(iface))
	}
	for _, p := range lb.Configs {
		data, err := r.FS.ReadFile(p)
		if err != nil {
			return fmt.Errorf("load balancer: %w", err)
		}
		if err := r.replaceIfChanged(p, fill(data), nodeconfig.LoadBalancerConfigMode); err != nil {
			return err
		}
	}
	if err := r.FS.MkdirAll(StaticPodDir, 0o700); err != nil {
		return fmt.Errorf("load balancer: %w", err)
	}
	for _, p := range lb.StaticPods {
		data, err := r.FS.ReadFile(p)
		if err != nil {
			return fmt.Errorf("load balancer: %w", err)
		}
		data = fill(data)
		if r.state.Bootstrap != "" {
			// After kubeadm init, admin.conf carries the rights; after a
			// join, super-admin.conf never existed on this node.
			data = bytes.ReplaceAll(data, []byte(superAdminConf), []byte(AdminKubeconfig))
		}
		if err := r.replaceIfChanged(path.Join(StaticPodDir, path.Base(p)), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

func (r *run) replaceIfChanged(name string, data []byte, mode fs.FileMode) error {
	if have, err := r.FS.ReadFile(name); err == nil && bytes.Equal(have, data) {
		return nil
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("load balancer: %w", err)
	}
	if err := r.FS.Replace(name, data, mode); err != nil {
		return fmt.Errorf("load balancer: %w", err)
	}
	r.log.printf("placed %s", name)
	return nil
}

// vipInterface finds the interface whose network contains the VIP (a
// prefix shorter than a host route: the VIP itself, once held, is a /32).
func (r *run) vipInterface(address string) (string, error) {
	vip, err := netip.ParseAddr(address)
	if err != nil {
		return "", &MetadataError{Err: fmt.Errorf("loadBalancer.address: %w", err)}
	}
	ifs, err := r.Interfaces()
	if err != nil {
		return "", fmt.Errorf("list network interfaces: %w", err)
	}
	var seen []string
	for _, i := range ifs {
		for _, p := range i.Prefixes {
			seen = append(seen, i.Name+" "+p.String())
			if p.Bits() < vip.BitLen() && p.Contains(vip) {
				return i.Name, nil
			}
		}
	}
	// The network may not be configured yet (DHCP): systemd restarts the
	// agent, which looks again.
	return "", fmt.Errorf("no network interface is on the virtual IP %s's network (have: %s): give the node an address there, or set loadBalancer.interface in the cluster file", vip, strings.Join(seen, ", "))
}
