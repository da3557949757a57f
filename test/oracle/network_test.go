//go:build oracle

package oracle

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// staticNode is one inventory node of the network oracle's cluster and
// what its network must come up as.
type staticNode struct {
	name, role string
	mac        string // the machine's MAC ("" when the interface is named)
	iface      string // nodes[].network.interface
	addr, gw   string
	dns        []string
	vlan       int
}

var staticNodes = []staticNode{
	{name: "cp-1", role: "init", iface: "end0", addr: "192.168.1.11/24", gw: "192.168.1.1", dns: []string{"192.168.1.1"}},
	{name: "w-1", role: "worker", mac: "52:54:00:12:34:56", addr: "192.168.1.21/24", gw: "192.168.1.1", dns: []string{"192.168.1.1", "9.9.9.9"}},
	{name: "w-2", role: "worker", mac: "52:54:00:12:34:57", addr: "192.168.20.22/24", gw: "192.168.20.1", vlan: 20},
	{name: "w-3", role: "worker", iface: "eth1", addr: "fd00:1::23/64", gw: "fd00:1::1", dns: []string{"fd00:1::53"}},
}

// staticCluster is a cluster file of osName whose inventory is
// staticNodes, with its downloads served by srv.
func staticCluster(t *testing.T, osName string, srv *artifactServer) string {
	t.Helper()
	cf := newCluster(t, "--os", osName)
	editCluster(t, cf, func(m map[string]any) {
		var nodes []any
		for _, n := range staticNodes {
			network := map[string]any{"address": n.addr, "gateway": n.gw}
			if n.iface != "" {
				network["interface"] = n.iface
			}
			if len(n.dns) > 0 {
				network["dns"] = n.dns
			}
			if n.vlan != 0 {
				network["vlan"] = n.vlan
			}
			node := map[string]any{"name": n.name, "role": n.role, "network": network}
			if n.mac != "" {
				node["mac"] = n.mac
			}
			nodes = append(nodes, node)
		}
		m["nodes"] = nodes
	})
	pointDownloads(t, cf, srv)
	return cf
}

// TestStaticNetworkOracles renders every node of a cluster file with
// static networks (by interface name, by MAC, on a VLAN, IPv6), has the
// real Ignition write each node's files, and hands them to the parsers of
// the OS that reads them:
//
//   - Flatcar: Debian's systemd-networkd runs on the written .network and
//     .netdev files in a network namespace, on a veth with the node's MAC
//     or interface name; the address, default route and DNS servers must
//     come up and networkd must not complain about any line. The kernel
//     arguments (what the initramfs gets) go through
//     systemd-network-generator, the program Flatcar's initramfs runs, and
//     networkd then applies what it generated the same way.
//   - Fedora CoreOS: libnm's keyfile reader (the code NetworkManager reads
//     keyfiles with) reads the written keyfile, and NetworkManager's
//     nm-initrd-generator turns the kernel arguments into the connections
//     Fedora CoreOS's initramfs would bring up, read back the same way.
//
// This kernel has no 802.1Q module: a VLAN is parsed by both, but only
// networkd's log shows it was understood; its address cannot come up.
func TestStaticNetworkOracles(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("Ignition's files stage and network namespaces need root; run the oracle tests as root")
	}
	srv := newArtifactServer(t)
	for _, osName := range []string{"flatcar", "fcos"} {
		cf := staticCluster(t, osName, srv)
		for _, n := range staticNodes {
			t.Run(osName+"-"+n.name, func(t *testing.T) {
				config := filepath.Join(t.TempDir(), "config.ign")
				kiln(t, "-c", cf, "render", "--node", n.name, "--dest", config)
				root, log, err := apply(t, config, osSeed[osName])
				if err != nil {
					t.Fatalf("%v\n%s", err, log)
				}
				args := strings.Fields(string(kiln(t, "-c", cf, "render", "--node", n.name, "--format", "kernel-args")))
				if len(args) == 0 {
					t.Fatal("no kernel arguments for a node with a static network")
				}
				switch osName {
				case "flatcar":
					checkNetworkd(t, n, filepath.Join(root, "etc/systemd/network"), n.iface)
					checkNetworkdKernelArgs(t, n, args)
				case "fcos":
					dir := filepath.Join(root, "etc/NetworkManager/system-connections")
					if fi, err := os.Stat(filepath.Join(dir, "kiln.nmconnection")); err != nil || fi.Mode().Perm() != 0o600 {
						t.Fatalf("keyfile: %v %v (NetworkManager ignores a keyfile others can read)", fi, err)
					}
					checkKeyfiles(t, n, dir, false)
					checkNMInitrd(t, n, args)
				}
			})
		}
	}
}

// networkdMessage is a complaint of networkd about one line of a file.
var networkdMessage = regexp.MustCompile(`(?m)^.*\.(network|netdev|link):\d+: .*$`)

// checkNetworkd runs systemd-networkd on the files of dir in a fresh
// network and mount namespace with one veth: named link (or eth0 when
// link is "") with the node's MAC (or a fixed one).
func checkNetworkd(t *testing.T, n staticNode, dir, link string) {
	t.Helper()
	mac := n.mac
	if mac == "" {
		mac = "52:54:00:aa:bb:cc"
	}
	if link == "" {
		link = "eth0"
	}
	script := `set -eu
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/network
# sysfs read-only: networkd then does not wait for udev, which is not here.
mount -t sysfs -o ro sysfs /sys
mount --bind "$1" /etc/systemd/network
ip link set lo up
ip link add "$2" type veth peer name kilnpeer
ip link set "$2" address "$3"
ip link set kilnpeer up
SYSTEMD_LOG_LEVEL=debug SYSTEMD_LOG_TARGET=console timeout 8 /lib/systemd/systemd-networkd >/run/networkd.log 2>&1 &
for i in $(seq 50); do
	sleep 0.1
	ip -o addr show dev "$2" scope global | grep -q . && [ -n "$(ls /run/systemd/netif/links 2>/dev/null)" ] && break
done
sleep 0.5
echo "@@addr"; ip -j addr show dev "$2"
echo "@@route"; ip -j route show default; ip -j -6 route show default
echo "@@links"; cat /run/systemd/netif/links/* 2>/dev/null || true
kill %1 2>/dev/null || true
wait || true
echo "@@log"; cat /run/networkd.log
`
	out, err := exec.Command("unshare", "-m", "-n", "--propagation", "private", "sh", "-c", script, "sh", dir, link, mac).CombinedOutput()
	if err != nil {
		t.Fatalf("networkd in a namespace: %v\n%s", err, out)
	}
	parts := map[string]string{}
	for _, p := range strings.Split(string(out), "@@")[1:] {
		name, body, _ := strings.Cut(p, "\n")
		parts[name] = body
	}
	if m := networkdMessage.FindAllString(parts["log"], -1); len(m) > 0 {
		t.Errorf("systemd-networkd complains about the files:\n%s", strings.Join(m, "\n"))
	}
	if n.vlan != 0 {
		// No 8021q here: the VLAN cannot be created, but networkd must have
		// loaded its netdev and stacked it on the parent.
		v := fmt.Sprintf("vlan%d", n.vlan)
		if !strings.Contains(parts["log"], v+`: loaded "vlan"`) || !strings.Contains(parts["log"], link+": Requested stacked netdev '"+v+"'") {
			t.Errorf("networkd did not load the VLAN netdev:\n%s", parts["log"])
		}
		return
	}
	var addrs []struct {
		AddrInfo []struct {
			Local     string `json:"local"`
			Prefixlen int    `json:"prefixlen"`
		} `json:"addr_info"`
	}
	json.Unmarshal([]byte(parts["addr"]), &addrs)
	var got []string
	for _, a := range addrs {
		for _, ai := range a.AddrInfo {
			got = append(got, fmt.Sprintf("%s/%d", ai.Local, ai.Prefixlen))
		}
	}
	if !slices.Contains(got, n.addr) {
		t.Errorf("address %s not on %s (has %v); networkd's log:\n%s", n.addr, link, got, parts["log"])
	}
	if !strings.Contains(parts["route"], `"gateway":"`+n.gw+`","dev":"`+link+`"`) {
		t.Errorf("no default route via %s on %s:\n%s", n.gw, link, parts["route"])
	}
	for _, d := range n.dns {
		if !regexp.MustCompile(`(?m)^DNS=.*\b` + regexp.QuoteMeta(d) + `\b`).MatchString(parts["links"]) {
			t.Errorf("DNS server %s not configured on %s:\n%s", d, link, parts["links"])
		}
	}
}

// checkNetworkdKernelArgs has systemd-network-generator turn the kernel
// arguments into networkd files, as Flatcar's initramfs does, and has
// networkd bring them up.
func checkNetworkdKernelArgs(t *testing.T, n staticNode, args []string) {
	t.Helper()
	root := t.TempDir()
	if out, err := exec.Command("/lib/systemd/systemd-network-generator", append([]string{"--root=" + root, "--"}, args...)...).CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("systemd-network-generator %v: %v\n%s", args, err, out)
	}
	dir := filepath.Join(root, "run/systemd/network")
	link := n.iface
	if n.mac != "" {
		// ifname= becomes a .link file, which udev applies: the veth is
		// given the name it names, as udev would.
		links, _ := filepath.Glob(filepath.Join(dir, "*.link"))
		if len(links) != 1 {
			t.Fatalf("ifname= gave %d .link files, want 1", len(links))
		}
		data := string(mustRead(t, links[0]))
		name := regexp.MustCompile(`(?m)^Name=(\S+)$`).FindStringSubmatch(data)
		if !strings.Contains(data, "MACAddress="+n.mac+"\n") || name == nil {
			t.Fatalf("%s does not name the interface with MAC %s:\n%s", links[0], n.mac, data)
		}
		link = name[1]
	}
	checkNetworkd(t, n, dir, link)
}

// keyfile is what nm-keyfile.py says libnm read from one keyfile.
type keyfile struct {
	File     string
	Warnings []string
	Error    *string
	Settings struct {
		Type          string  `json:"type"`
		InterfaceName *string `json:"interface-name"`
		MACAddress    *string `json:"mac-address"`
		VLANID        int     `json:"vlan-id"`
		VLANParent    *string `json:"vlan-parent"`
		IPv4, IPv6    struct {
			Method    string
			Addresses []string
			Gateway   *string
			DNS       []string
		}
	}
}

// readKeyfiles reads every keyfile of dir with libnm.
func readKeyfiles(t *testing.T, dir string) []keyfile {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "*.nmconnection"))
	if len(files) == 0 {
		t.Fatalf("no keyfile in %s", dir)
	}
	cmd := exec.Command("/usr/bin/python3", append([]string{filepath.Join("testdata", "nm-keyfile.py")}, files...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("libnm keyfile reader (python3-gi, gir1.2-nm-1.0: .ci/install-deps): %v\n%s", err, stderr.String())
	}
	var kfs []keyfile
	if err := json.Unmarshal(out, &kfs); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, kf := range kfs {
		if kf.Error != nil || len(kf.Warnings) > 0 || stderr.Len() > 0 {
			t.Errorf("libnm refuses or warns about %s: %v %v\n%s\n%s", filepath.Base(kf.File), deref(kf.Error), kf.Warnings, stderr.String(), mustRead(t, kf.File))
		}
	}
	return kfs
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// checkKeyfiles checks that the connections libnm read from dir bring up
// the node's network: the connection with its address matches the
// interface (by name, by the MAC, or as a VLAN on either) and has its
// gateway and DNS servers. From the kernel arguments (initrd), a MAC is
// matched by ifname= (dracut's udev rule names the interface kiln0), so
// the connection names the interface.
func checkKeyfiles(t *testing.T, n staticNode, dir string, initrd bool) {
	t.Helper()
	kfs := readKeyfiles(t, dir)
	v6 := strings.Contains(n.addr, ":")
	var kf *keyfile
	for i := range kfs {
		ip := kfs[i].Settings.IPv4
		if v6 {
			ip = kfs[i].Settings.IPv6
		}
		if slices.Contains(ip.Addresses, n.addr) {
			kf = &kfs[i]
		}
	}
	if kf == nil {
		t.Fatalf("no connection has the address %s: %+v", n.addr, kfs)
	}
	s := kf.Settings
	ip := s.IPv4
	if v6 {
		ip = s.IPv6
	}
	if ip.Method != "manual" || deref(ip.Gateway) != n.gw || !slices.Equal(ip.DNS, n.dns) && len(n.dns) > 0 {
		t.Errorf("%s: method %s, gateway %s, dns %v; want manual, %s, %v", filepath.Base(kf.File), ip.Method, deref(ip.Gateway), ip.DNS, n.gw, n.dns)
	}
	parent := n.iface
	if n.mac != "" && initrd {
		parent = "kiln0"
	}
	if n.vlan != 0 {
		if s.Type != "vlan" || s.VLANID != n.vlan {
			t.Errorf("%s: type %s, VLAN id %d; want vlan %d", filepath.Base(kf.File), s.Type, s.VLANID, n.vlan)
		}
		if deref(s.VLANParent) != parent && !(parent == "" && strings.EqualFold(deref(s.MACAddress), n.mac)) {
			t.Errorf("%s: the VLAN's parent is %q (MAC %q); want %q or MAC %s", filepath.Base(kf.File), deref(s.VLANParent), deref(s.MACAddress), parent, n.mac)
		}
		return
	}
	if s.Type != "802-3-ethernet" {
		t.Errorf("%s: type %s, want ethernet", filepath.Base(kf.File), s.Type)
	}
	if parent != "" && deref(s.InterfaceName) != parent || parent == "" && !strings.EqualFold(deref(s.MACAddress), n.mac) {
		t.Errorf("%s: interface %q, MAC %q; want interface %q or MAC %s", filepath.Base(kf.File), deref(s.InterfaceName), deref(s.MACAddress), parent, n.mac)
	}
}

// checkNMInitrd has NetworkManager's nm-initrd-generator turn the kernel
// arguments into the connections Fedora CoreOS's initramfs brings up.
func checkNMInitrd(t *testing.T, n staticNode, args []string) {
	t.Helper()
	dir := t.TempDir()
	conns, data, conf := filepath.Join(dir, "connections"), filepath.Join(dir, "initrd"), filepath.Join(dir, "conf.d")
	out, err := exec.Command(tool(t, "nm-initrd-generator"), append([]string{"-c", conns, "-i", data, "-r", conf, "--"}, args...)...).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Fatalf("nm-initrd-generator %v: %v\n%s", args, err, out)
	}
	checkKeyfiles(t, n, conns, true)
}
