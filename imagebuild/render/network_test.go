package render

import (
	"strings"
	"testing"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
)

// staticCluster is the test cluster of osName with a static network on
// cp-2 (by interface name) and w-1 (by its MAC, on VLAN 20, two name
// servers).
func staticCluster(t *testing.T, osName string) *cluster.Cluster {
	t.Helper()
	c := loadCluster(t, osName)
	c.Nodes[1].IP = ""
	c.Nodes[1].Network = &cluster.NodeNetwork{Interface: "end0", Address: "10.0.0.12/24", Gateway: "10.0.0.1"}
	c.Nodes[3].Network = &cluster.NodeNetwork{Address: "10.0.0.21/24", Gateway: "10.0.0.1", DNS: []string{"10.0.0.1", "fd00::53"}, VLAN: 20}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestStaticNetwork(t *testing.T) {
	s := loadSecrets(t)
	want := map[string]map[string]map[string][]string{ // os, node, file: lines
		"flatcar": {
			"cp-2": {
				"/etc/systemd/network/00-kiln.network": {"[Match]\nName=end0\n", "[Network]\nDHCP=no\nAddress=10.0.0.12/24\nGateway=10.0.0.1\n"},
			},
			"w-1": {
				"/etc/systemd/network/00-kiln.network":        {"[Match]\nMACAddress=52:54:00:00:00:11\n", "[Network]\nDHCP=no\nLinkLocalAddressing=no\nVLAN=vlan20\n"},
				"/etc/systemd/network/00-kiln-vlan20.netdev":  {"[NetDev]\nName=vlan20\nKind=vlan\n", "[VLAN]\nId=20\n"},
				"/etc/systemd/network/00-kiln-vlan20.network": {"[Match]\nName=vlan20\n", "Address=10.0.0.21/24\nGateway=10.0.0.1\nDNS=10.0.0.1\nDNS=fd00::53\n"},
			},
		},
		"fcos": {
			"cp-2": {
				"/etc/NetworkManager/system-connections/kiln.nmconnection": {"type=ethernet\ninterface-name=end0\n", "autoconnect=true\n\n[ethernet]\n\n[ipv4]\n", "[ipv4]\nmethod=manual\naddress1=10.0.0.12/24\ngateway=10.0.0.1\n", "[ipv6]\nmethod=disabled\n"},
			},
			"w-1": {
				"/etc/NetworkManager/system-connections/kiln.nmconnection": {"type=vlan\ninterface-name=vlan20\n", "[ethernet]\nmac-address=52:54:00:00:00:11\n", "[vlan]\nid=20\n", "address1=10.0.0.21/24\ngateway=10.0.0.1\ndns=10.0.0.1;\n", "[ipv6]\nmethod=disabled\ndns=fd00::53;\n"},
			},
		},
	}
	args := map[string]string{
		"cp-2": "ip=10.0.0.12::10.0.0.1:255.255.255.0::end0:none",
		"w-1":  "ifname=kiln0:52:54:00:00:00:11 vlan=vlan20:kiln0 ip=10.0.0.21::10.0.0.1:255.255.255.0::vlan20:none nameserver=10.0.0.1 nameserver=fd00::53",
	}
	for osName, nodes := range want {
		c := staticCluster(t, osName)
		for node, files := range nodes {
			n, _ := c.InventoryNode(node)
			in := Input{Cluster: c, Secrets: s, Role: n.Role, Arch: "amd64", NodeName: node, Agent: fakeAgent(t, "amd64")}
			ign, err := Ignition(in)
			if err != nil {
				t.Fatal(err)
			}
			got, modes := decodedFiles(t, ign)
			for p, parts := range files {
				for _, part := range parts {
					if !strings.Contains(string(got[p]), part) {
						t.Errorf("%s %s: %s lacks %q:\n%s", osName, node, p, part, got[p])
					}
				}
				if strings.HasSuffix(p, ".nmconnection") && modes[p] != 0o600 {
					t.Errorf("%s %s: %s has mode %o: NetworkManager ignores a keyfile others can read", osName, node, p, modes[p])
				}
			}
			for p := range got {
				if strings.HasPrefix(p, networkdDir) || strings.HasPrefix(p, networkManagerDir) {
					if _, ok := files[p]; !ok {
						t.Errorf("%s %s: unexpected network file %s", osName, node, p)
					}
				}
			}
			if a := strings.Join(NetworkKernelArgs(c, node), " "); a != args[node] {
				t.Errorf("%s %s: kernel arguments\n%s\nwant\n%s", osName, node, a, args[node])
			}
			// The address is the kubelet's node IP and a control plane's
			// advertise address.
			kf, err := Kubeadm(in)
			if err != nil {
				t.Fatal(err)
			}
			join := string(kf[JoinConfigPath])
			addr := map[string]string{"cp-2": "10.0.0.12", "w-1": "10.0.0.21"}[node]
			if !strings.Contains(join, "- name: node-ip\n      value: "+addr+"\n") {
				t.Errorf("%s %s: join config lacks node-ip %s:\n%s", osName, node, addr, join)
			}
			if adv := strings.Contains(join, "advertiseAddress: "+addr); adv != n.Role.IsControlPlane() {
				t.Errorf("%s %s: advertiseAddress %s present %v, want %v:\n%s", osName, node, addr, adv, n.Role.IsControlPlane(), join)
			}
		}
		// A role's image, for machines the inventory does not list, keeps
		// the OS's own network configuration.
		ign, err := Ignition(Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleWorker, Arch: "amd64", Agent: fakeAgent(t, "amd64")})
		if err != nil {
			t.Fatal(err)
		}
		got, _ := decodedFiles(t, ign)
		for p := range got {
			if strings.HasPrefix(p, networkdDir) || strings.HasPrefix(p, networkManagerDir) {
				t.Errorf("%s: the worker image carries %s", osName, p)
			}
		}
		if a := NetworkKernelArgs(c, ""); a != nil {
			t.Errorf("%s: kernel arguments for a role's image: %v", osName, a)
		}
	}
}
