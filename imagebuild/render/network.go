package render

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"path"
	"strings"

	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/profiles"
)

// Where each way of configuring the network reads its files.
const (
	networkdDir       = "/etc/systemd/network"
	networkManagerDir = "/etc/NetworkManager/system-connections"
)

// staticNetwork is one inventory node's static network, resolved.
type staticNetwork struct {
	cluster string
	node    cluster.Node
	addr    netip.Prefix
	gateway netip.Addr
	dns     []netip.Addr
	// mac is the node's MAC (the interface is matched by it) when no
	// interface name is given.
	mac string
}

// nodeNetwork returns the static network of the inventory node named
// name, or nil when it has none (or name is "": a role's image).
func nodeNetwork(c *cluster.Cluster, name string) *staticNetwork {
	n, ok := c.InventoryNode(name)
	if name == "" || !ok || n.Network == nil {
		return nil
	}
	s := &staticNetwork{node: n, cluster: c.Name}
	s.addr, _ = netip.ParsePrefix(n.Network.Address)
	s.gateway, _ = netip.ParseAddr(n.Network.Gateway)
	for _, d := range n.Network.DNS {
		if a, err := netip.ParseAddr(d); err == nil {
			s.dns = append(s.dns, a)
		}
	}
	if n.Network.Interface == "" {
		hw, _ := net.ParseMAC(n.MAC)
		s.mac = hw.String()
	}
	return s
}

// vlanName is the VLAN interface's name.
func (s *staticNetwork) vlanName() string { return fmt.Sprintf("vlan%d", s.node.Network.VLAN) }

// networkFiles are the files that configure node name's static network
// the way its OS does after the initramfs: systemd-networkd .network (and
// .netdev for a VLAN) files on Flatcar, a NetworkManager keyfile on Fedora
// CoreOS. Their names sort before the OS's own defaults (Flatcar's
// zz-default.network, DHCP on every interface), so they win.
func networkFiles(osp *profiles.OS, s *staticNetwork) ([]butaneFile, error) {
	head := fmt.Sprintf("# kiln: nodes[].network of %s in the cluster file\n", s.node.Name)
	switch osp.Network {
	case profiles.NetworkNetworkd:
		match := "Name=" + s.node.Network.Interface
		if s.mac != "" {
			match = "MACAddress=" + s.mac
		}
		addressed := s.networkdAddress()
		if s.node.Network.VLAN == 0 {
			return []butaneFile{networkdFile("00-kiln.network", head+"[Match]\n"+match+"\n\n[Network]\n"+addressed)}, nil
		}
		v := s.vlanName()
		return []butaneFile{
			networkdFile("00-kiln.network", fmt.Sprintf("%s[Match]\n%s\n\n[Network]\nDHCP=no\nLinkLocalAddressing=no\nVLAN=%s\n", head, match, v)),
			networkdFile("00-kiln-"+v+".netdev", fmt.Sprintf("%s[NetDev]\nName=%s\nKind=vlan\n\n[VLAN]\nId=%d\n", head, v, s.node.Network.VLAN)),
			networkdFile("00-kiln-"+v+".network", fmt.Sprintf("%s[Match]\nName=%s\n\n[Network]\n%s", head, v, addressed)),
		}, nil
	case profiles.NetworkNetworkManager:
		var b strings.Builder
		b.WriteString(head)
		fmt.Fprintf(&b, "[connection]\nid=kiln\nuuid=%s\n", s.uuid())
		if s.node.Network.VLAN == 0 {
			b.WriteString("type=ethernet\n")
			if s.mac == "" {
				fmt.Fprintf(&b, "interface-name=%s\n", s.node.Network.Interface)
			}
		} else {
			fmt.Fprintf(&b, "type=vlan\ninterface-name=%s\n", s.vlanName())
		}
		b.WriteString("autoconnect=true\n")
		// libnm refuses an ethernet connection without this section. A
		// VLAN without vlan.parent takes its parent by this MAC.
		b.WriteString("\n[ethernet]\n")
		if s.mac != "" {
			fmt.Fprintf(&b, "mac-address=%s\n", s.mac)
		}
		if s.node.Network.VLAN != 0 {
			fmt.Fprintf(&b, "\n[vlan]\nid=%d\n", s.node.Network.VLAN)
			if s.mac == "" {
				fmt.Fprintf(&b, "parent=%s\n", s.node.Network.Interface)
			}
		}
		for _, v4 := range []bool{true, false} {
			section := map[bool]string{true: "ipv4", false: "ipv6"}[v4]
			fmt.Fprintf(&b, "\n[%s]\n", section)
			if s.addr.Addr().Is4() != v4 {
				b.WriteString("method=disabled\n")
			} else {
				fmt.Fprintf(&b, "method=manual\naddress1=%s\n", s.addr)
				if s.gateway.IsValid() {
					fmt.Fprintf(&b, "gateway=%s\n", s.gateway)
				}
			}
			var dns []string
			for _, d := range s.dns {
				if d.Is4() == v4 {
					dns = append(dns, d.String()+";")
				}
			}
			if len(dns) > 0 {
				fmt.Fprintf(&b, "dns=%s\n", strings.Join(dns, ""))
			}
		}
		// NetworkManager ignores a keyfile that others can read.
		return []butaneFile{{Path: path.Join(networkManagerDir, "kiln.nmconnection"), Mode: 0o600, Contents: butaneContents{Inline: b.String()}}}, nil
	}
	return nil, fmt.Errorf("nodes[].network: %s has no way to configure a static network in kiln yet", osp.Name)
}

// uuid is the keyfile's connection UUID (NetworkManager requires one):
// an RFC 9562 version 8 UUID from the cluster's and the node's names, so
// renders stay byte-identical.
func (s *staticNetwork) uuid() string {
	h := sha256.Sum256([]byte("kiln network " + s.cluster + "/" + s.node.Name))
	h[6] = h[6]&0x0f | 0x80
	h[8] = h[8]&0x3f | 0x80
	x := hex.EncodeToString(h[:16])
	return x[:8] + "-" + x[8:12] + "-" + x[12:16] + "-" + x[16:20] + "-" + x[20:]
}

func networkdFile(name, data string) butaneFile {
	return butaneFile{Path: path.Join(networkdDir, name), Mode: 0o644, Contents: butaneContents{Inline: data}}
}

// networkdAddress is a .network file's [Network] body for the address.
func (s *staticNetwork) networkdAddress() string {
	var b strings.Builder
	fmt.Fprintf(&b, "DHCP=no\nAddress=%s\n", s.addr)
	if s.gateway.IsValid() {
		fmt.Fprintf(&b, "Gateway=%s\n", s.gateway)
	}
	for _, d := range s.dns {
		fmt.Fprintf(&b, "DNS=%s\n", d)
	}
	return b.String()
}

// NetworkKernelArgs are the kernel arguments that give inventory node
// name its static network in the initramfs, where Ignition downloads
// what its config names before the OS's own network configuration runs:
// dracut's ip=, ifname=, vlan= and nameserver= forms, which Flatcar's
// initramfs (systemd-network-generator) and Fedora CoreOS's (dracut,
// NetworkManager) read. Nil when the node has no static network.
func NetworkKernelArgs(c *cluster.Cluster, name string) []string {
	s := nodeNetwork(c, name)
	if s == nil {
		return nil
	}
	var args []string
	dev := s.node.Network.Interface
	if s.mac != "" {
		// Names the interface with that MAC in the initramfs only; the
		// booted OS matches it by MAC again.
		dev = "kiln0"
		args = append(args, "ifname="+dev+":"+s.mac)
	}
	if s.node.Network.VLAN != 0 {
		args = append(args, "vlan="+s.vlanName()+":"+dev)
		dev = s.vlanName()
	}
	a, gw := s.addr.Addr().String(), ""
	mask := fmt.Sprint(s.addr.Bits())
	if s.addr.Addr().Is4() {
		mask = net.IP(net.CIDRMask(s.addr.Bits(), 32)).String()
		if s.gateway.IsValid() {
			gw = s.gateway.String()
		}
	} else {
		a = "[" + a + "]"
		if s.gateway.IsValid() {
			gw = "[" + s.gateway.String() + "]"
		}
	}
	// ip=<client>:<peer>:<gateway>:<netmask>:<hostname>:<interface>:none
	args = append(args, fmt.Sprintf("ip=%s::%s:%s::%s:none", a, gw, mask, dev))
	for _, d := range s.dns {
		args = append(args, "nameserver="+d.String())
	}
	return args
}
