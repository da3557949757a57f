package cluster

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/manifests"
	"github.com/kilnproject/kiln/profiles"
)

// InvalidError lists every problem found in a cluster file.
type InvalidError struct {
	Problems []error
}

func (e *InvalidError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "invalid cluster file (%d problem", len(e.Problems))
	if len(e.Problems) > 1 {
		b.WriteString("s")
	}
	b.WriteString("):")
	for _, p := range e.Problems {
		b.WriteString("\n  ")
		b.WriteString(p.Error())
	}
	return b.String()
}

// Unwrap lets errors.Is/As see each problem.
func (e *InvalidError) Unwrap() []error { return e.Problems }

var (
	versionRe    = regexp.MustCompile(`^v(\d+)\.(\d+)\.(\d+)$`)
	clusterRe    = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)
	sha512Re     = regexp.MustCompile(`^[0-9a-f]{128}$`)
	sha256Re     = regexp.MustCompile(`^[0-9a-f]{64}$`)
	ifaceRe      = regexp.MustCompile(`^[A-Za-z0-9][-A-Za-z0-9_.@]{0,14}$`)
	patchTargets = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubeletconfiguration", "corednsdeployment"}
	patchTypes   = []string{"strategic", "merge", "json"}
	sshKeyTypes  = []string{"ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"}
)

func parseVersion(v string) (major, minor, patch int, ok bool) {
	m := versionRe.FindStringSubmatch(v)
	if m == nil {
		return 0, 0, 0, false
	}
	major, _ = strconv.Atoi(m[1])
	minor, _ = strconv.Atoi(m[2])
	patch, _ = strconv.Atoi(m[3])
	return major, minor, patch, true
}

// Validate reports every problem at once, each with its field path and
// what to do about it. The result is an *InvalidError marked fault.Input.
func (c *Cluster) Validate() error {
	var errs []error
	add := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, a...)))
	}

	if !clusterRe.MatchString(c.Name) {
		add("name", "%q must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit", c.Name)
	}
	if err := nodeconfig.CheckEndpoint(c.ControlPlaneEndpoint); err != nil {
		add("controlPlaneEndpoint", "%v", err)
	}

	k := c.Kubernetes
	if major, minor, _, ok := parseVersion(k.Version); !ok {
		add("kubernetes.version", "%q is not a version like %s", k.Version, DefaultKubernetesVersion)
	} else if major != 1 || minor < MinMinor || minor > MaxMinor {
		add("kubernetes.version", "%s is not supported: kiln supports v1.%d to v1.%d (default %s)", k.Version, MinMinor, MaxMinor, DefaultKubernetesVersion)
	}
	pods := checkSubnets(&errs, "kubernetes.podSubnet", k.PodSubnet, podSizes)
	svcs := checkSubnets(&errs, "kubernetes.serviceSubnet", k.ServiceSubnet, serviceSizes)
	for _, p := range pods {
		for _, s := range svcs {
			if p.Overlaps(s) {
				add("kubernetes.serviceSubnet", "%s overlaps kubernetes.podSubnet %s: pick ranges that do not overlap (defaults: pods %s, services %s)", s, p, DefaultPodSubnet, DefaultServiceSubnet)
			}
		}
	}
	if err := nodeconfig.CheckDNSName(k.DNSDomain); err != nil {
		add("kubernetes.dnsDomain", "%v", err)
	}
	switch {
	case k.ControlPlanes < 1 || k.ControlPlanes > 9:
		add("kubernetes.controlPlanes", "%d is out of range: use 1, 3, 5, 7 or 9", k.ControlPlanes)
	case k.ControlPlanes%2 == 0:
		add("kubernetes.controlPlanes", "%d: use an odd number; etcd needs a majority, so %d control planes tolerate no more failures than %d", k.ControlPlanes, k.ControlPlanes, k.ControlPlanes-1)
	}
	if k.TokenTTL != nil && k.TokenTTL.Duration < 0 {
		add("kubernetes.tokenTTL", "must not be negative (0s: the token never expires)")
	}
	if w := k.CertificateUploadWindow; w != nil && w.Duration < 0 {
		add("kubernetes.certificateUploadWindow", "must not be negative")
	}

	osp, err := profiles.LookupOS(c.OS.Name)
	if err != nil {
		add("os.name", "%v", err)
	} else {
		if !osp.HasChannel(c.OS.Channel) {
			add("os.channel", "%q is not a %s channel: use one of %s", c.OS.Channel, osp.Name, strings.Join(osp.Channels, ", "))
		}
		if !osp.ValidVersion(c.OS.Version) {
			add("os.version", "%q is not a %s version (pattern %s) or \"current\"", c.OS.Version, osp.Name, osp.VersionPattern)
		}
		c.validateDownloads(&errs, osp)
		if c.Airgap && osp.Payload == nil {
			add("airgap", "%s nodes cannot carry their payload yet (no partition of its disk image has room for it): use os.name flatcar, or leave airgap off", osp.Name)
		}
	}

	for i, key := range c.SSH.AuthorizedKeys {
		if err := checkSSHKey(key); err != nil {
			add(fmt.Sprintf("ssh.authorizedKeys[%d]", i), "%v", err)
		}
	}
	// The template is checked with the real cluster name, once that is valid.
	if err := nodeconfig.CheckHostnameTemplate(c.Hostname.Template, c.Name); err != nil && clusterRe.MatchString(c.Name) {
		add("hostname.template", "%v", err)
	}
	c.validateNodes(&errs)
	for i, p := range c.Butane {
		if strings.TrimSpace(p) == "" {
			add(fmt.Sprintf("butane[%d]", i), "empty path")
		}
	}
	c.validatePatches(&errs)
	c.validatePreflight(&errs)
	c.validateNetwork(&errs, pods, svcs)
	c.validateAddons(&errs)
	c.validateImages(&errs)

	if len(errs) == 0 {
		return nil
	}
	return fault.Wrap(fault.Input, &InvalidError{Problems: errs})
}

// subnetSizes bounds a subnet's prefix length per IP family, as kubeadm
// does (cmd/kubeadm/app/apis/kubeadm/validation, v1.33 to v1.37).
type subnetSizes struct {
	min4, max4, min6, max6 int
	// why explains the bounds.
	why string
}

var (
	// Pod subnets: kubeadm's controller manager gives each node a /24
	// (IPv4) or /64 (IPv6) from it, and the range may hold at most 2^16
	// of them (PodSubnetNodeMaskMaxDiff).
	podSizes = subnetSizes{8, 24, 48, 64, "kubeadm gives each node a /24 (IPv6: /64) from it and allows at most 65536 of them"}
	// Service subnets: at most 20 bits of addresses
	// (MaximumBitsForServiceSubnet) and at least 10 addresses
	// (MinimumAddressesInServiceSubnet).
	serviceSizes = subnetSizes{12, 28, 108, 124, "kubeadm wants at least 10 and at most 2^20 service addresses"}
)

// checkSubnets parses a list of CIDRs separated by commas (one per IP
// family, no spaces: kubeadm splits on the comma alone) and checks each
// one's size.
func checkSubnets(errs *[]error, field, value string, sizes subnetSizes) []netip.Prefix {
	var out []netip.Prefix
	seen := map[bool]bool{}
	if strings.ContainsAny(value, " \t") {
		*errs = append(*errs, fmt.Errorf("%s: %q: no spaces, kubeadm reads the ranges separated by a comma alone: use %q", field, value, strings.Join(strings.Fields(strings.ReplaceAll(value, ",", " ")), ",")))
		return nil
	}
	for _, part := range strings.Split(value, ",") {
		p, err := netip.ParsePrefix(part)
		if err != nil {
			*errs = append(*errs, fmt.Errorf("%s: %q is not a CIDR like 10.96.0.0/12", field, part))
			continue
		}
		if p.Masked() != p {
			*errs = append(*errs, fmt.Errorf("%s: %s has host bits set: use %s", field, p, p.Masked()))
		}
		if seen[p.Addr().Is4()] {
			*errs = append(*errs, fmt.Errorf("%s: at most one IPv4 and one IPv6 range", field))
		}
		seen[p.Addr().Is4()] = true
		lo, hi := sizes.min6, sizes.max6
		if p.Addr().Is4() {
			lo, hi = sizes.min4, sizes.max4
		}
		if p.Bits() < lo || p.Bits() > hi {
			*errs = append(*errs, fmt.Errorf("%s: %s: use a prefix from /%d to /%d (%s)", field, p, lo, hi, sizes.why))
		}
		out = append(out, p)
	}
	return out
}

func checkSSHKey(key string) error {
	if strings.Contains(key, "PRIVATE KEY") {
		return errors.New("this is a private key: use the public key (.pub)")
	}
	f := strings.Fields(key)
	if len(f) < 2 {
		return errors.New("not an OpenSSH public key line (type, base64 key, optional comment): paste the content of your .pub file")
	}
	if !slices.Contains(sshKeyTypes, f[0]) {
		return fmt.Errorf("key type %q is not one of %s", f[0], strings.Join(sshKeyTypes, ", "))
	}
	if _, err := base64.StdEncoding.DecodeString(f[1]); err != nil {
		return errors.New("the key is not valid base64: paste the whole line of your .pub file")
	}
	return nil
}

func (c *Cluster) validateDownloads(errs *[]error, osp *profiles.OS) {
	seen := map[string]int{}
	for i, d := range c.Kubernetes.Downloads {
		field := fmt.Sprintf("kubernetes.downloads[%d]", i)
		if why := c.StalePin(d); why != "" {
			*errs = append(*errs, fmt.Errorf("%s: %s for %s: %s: run kiln pin (it pins every stale entry again)", field, d.Name, d.Arch, why))
			continue
		}
		if _, ok := osp.Download(d.Name); !ok {
			names := make([]string, 0, len(osp.Downloads))
			for _, pd := range osp.Downloads {
				names = append(names, pd.Name)
			}
			*errs = append(*errs, fmt.Errorf("%s.name: %q is not an artifact of %s: use one of %s", field, d.Name, osp.Name, strings.Join(names, ", ")))
		}
		if d.Arch != "amd64" && d.Arch != "arm64" {
			*errs = append(*errs, fmt.Errorf("%s.arch: %q: use amd64 or arm64", field, d.Arch))
		}
		if !strings.HasPrefix(d.URL, "https://") && !strings.HasPrefix(d.URL, "http://") {
			*errs = append(*errs, fmt.Errorf("%s.url: %q must be an http(s) URL that nodes can reach", field, d.URL))
		}
		if d.SHA512 != "" && !sha512Re.MatchString(d.SHA512) {
			*errs = append(*errs, fmt.Errorf("%s.sha512: must be 128 lowercase hex digits; run `kiln pin` to compute it", field))
		}
		key := d.Name + "/" + d.Arch
		if j, dup := seen[key]; dup {
			*errs = append(*errs, fmt.Errorf("%s: %s for %s is already pinned by kubernetes.downloads[%d]", field, d.Name, d.Arch, j))
		}
		seen[key] = i
	}
}

func (c *Cluster) validateNodes(errs *[]error) {
	add := func(field, format string, a ...any) {
		*errs = append(*errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, a...)))
	}
	if c.Profile != "" {
		c.checkProfile(errs, "profile", c.Profile)
	}
	names, macs, ips := map[string]int{}, map[string]int{}, map[string]int{}
	inits, controlPlanes := 0, 0
	for i, n := range c.Nodes {
		field := fmt.Sprintf("nodes[%d]", i)
		if err := nodeconfig.CheckNodeName(n.Name); err != nil {
			add(field+".name", "%v", err)
		} else if j, dup := names[n.Name]; dup {
			add(field+".name", "%q is already used by nodes[%d]", n.Name, j)
		} else {
			names[n.Name] = i
		}
		if _, err := nodeconfig.ParseRole(string(n.Role)); err != nil {
			add(field+".role", "%v", err)
		}
		if n.Role == nodeconfig.RoleInit {
			inits++
		}
		if n.Role.IsControlPlane() {
			controlPlanes++
		}
		if n.Profile != "" {
			c.checkProfile(errs, field+".profile", n.Profile)
		}
		if n.MAC != "" {
			hw, err := net.ParseMAC(n.MAC)
			if err != nil || len(hw) != 6 {
				add(field+".mac", "%q is not a MAC address like 52:54:00:12:34:56", n.MAC)
			} else if j, dup := macs[hw.String()]; dup {
				add(field+".mac", "%s is already used by nodes[%d]: every machine has its own MAC", hw, j)
			} else {
				macs[hw.String()] = i
			}
		}
		if n.IP != "" {
			if _, err := parseAddr(n.IP); err != nil {
				add(field+".ip", "%q is not an IP address", n.IP)
			}
		}
		if n.Network != nil {
			checkNodeNetwork(errs, field, n)
		}
		if n.Disk != "" {
			if err := CheckDisk(n.Disk); err != nil {
				add(field+".disk", "%v", err)
			}
		}
		if ip := n.Address(); ip.IsValid() {
			if j, dup := ips[ip.String()]; dup {
				add(field+".ip", "%s is already used by nodes[%d]", ip, j)
			} else {
				ips[ip.String()] = i
			}
		}
	}
	if inits > 1 {
		add("nodes", "%d nodes have role init: exactly one control plane runs kubeadm init; make the others control-plane", inits)
	}
	if controlPlanes > c.Kubernetes.ControlPlanes {
		add("nodes", "%d control-plane nodes listed but kubernetes.controlPlanes is %d: raise it or change roles", controlPlanes, c.Kubernetes.ControlPlanes)
	}
	c.checkSharedNames(errs)
}

// checkProfile checks that a target profile exists and is for os.name.
func (c *Cluster) checkProfile(errs *[]error, field, name string) {
	t, err := profiles.LookupTarget(name)
	if err != nil {
		*errs = append(*errs, fmt.Errorf("%s: %v", field, err))
		return
	}
	if c.OS.Name != "" && t.OS != c.OS.Name {
		*errs = append(*errs, fmt.Errorf("%s: %s is a %s profile but os.name is %s: pick a %s profile (kiln profiles)", field, name, t.OS, c.OS.Name, c.OS.Name))
	}
}

// checkNodeNetwork checks node n's static network (field is nodes[i]).
func checkNodeNetwork(errs *[]error, field string, n Node) {
	nw := n.Network
	add := func(sub, format string, a ...any) {
		*errs = append(*errs, fmt.Errorf("%s.network%s: %s", field, sub, fmt.Sprintf(format, a...)))
	}
	if nw.Interface == "" && n.MAC == "" {
		add(".interface", "required when the node has no mac: name the interface (eth0, end0, enp1s0) or give nodes[].mac")
	}
	if nw.Interface != "" && !ifaceRe.MatchString(nw.Interface) {
		add(".interface", "%q is not a network interface name (at most 15 characters, no '/' or spaces)", nw.Interface)
	}
	p, err := netip.ParsePrefix(nw.Address)
	if err != nil {
		add(".address", "%q is not an address with its prefix length, like 192.168.1.11/24", nw.Address)
		return
	}
	switch {
	case p.Addr() == p.Masked().Addr() && p.Bits() < p.Addr().BitLen()-1:
		add(".address", "%s is the network's own address: give the node's address, as %s", p, p.Masked().Addr().Next())
	case p.Addr().Is4() && p.Bits() < 31 && p.Addr() == lastAddr(p):
		add(".address", "%s is the network's broadcast address: give the node's address", p)
	case !p.Addr().IsGlobalUnicast():
		add(".address", "%s is not a unicast address a node can own", p.Addr())
	}
	if ip, err := netip.ParseAddr(n.IP); err == nil && ip != p.Addr() {
		add(".address", "%s is not the node's ip %s: remove nodes[].ip (network.address gives it) or make them agree", p.Addr(), ip)
	}
	if nw.Gateway != "" {
		gw, err := parseAddr(nw.Gateway)
		switch {
		case err != nil:
			add(".gateway", "%q is not an IP address", nw.Gateway)
		case !p.Masked().Contains(gw):
			add(".gateway", "%s is outside the node's network %s: a gateway must be reachable on the link", gw, p.Masked())
		case gw == p.Addr():
			add(".gateway", "%s is the node's own address", gw)
		}
	}
	for i, d := range nw.DNS {
		if _, err := parseAddr(d); err != nil {
			add(fmt.Sprintf(".dns[%d]", i), "%q is not an IP address (name servers are given by address)", d)
		}
	}
	if nw.VLAN != 0 && (nw.VLAN < 1 || nw.VLAN > 4094) {
		add(".vlan", "%d: 802.1Q VLAN IDs are 1 to 4094", nw.VLAN)
	}
}

// parseAddr parses an IP address without an IPv6 zone (fe80::1%eth0):
// a zone is free text, and these addresses go into kernel arguments,
// GRUB's configuration and network files as they are.
func parseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err == nil && a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("%q has an IPv6 zone", s)
	}
	return a, err
}

// nodeAddress is n's network.address, or "".
func nodeAddress(n Node) string {
	if n.Network == nil {
		return ""
	}
	return n.Network.Address
}

// lastAddr is the last address of p's network (IPv4: its broadcast).
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// checkSharedNames refuses a hostname template that would give machines
// the same name: one without {mac} names every machine booted from a
// role's image alike (any number of workers; the control planes that the
// inventory does not list), and may name an inventory node too.
func (c *Cluster) checkSharedNames(errs *[]error) {
	t := c.Hostname.Template
	if strings.Contains(t, "{mac}") || nodeconfig.CheckHostnameTemplate(t, c.Name) != nil {
		return
	}
	type claim struct {
		who      string
		machines int // 2 stands for "any number"
	}
	claims := map[string][]claim{}
	var order []string
	add := func(name, who string, machines int) {
		if machines < 1 {
			return
		}
		if _, ok := claims[name]; !ok {
			order = append(order, name)
		}
		claims[name] = append(claims[name], claim{who, machines})
	}
	// Machines booted from role images, that is, not in the inventory.
	m := c.RoleImageMachines()
	add(nodeconfig.ExpandHostname(t, c.Name, nodeconfig.RoleInit, ""), "the init node booted from the init image", m[nodeconfig.RoleInit])
	cps := m[nodeconfig.RoleControlPlane]
	add(nodeconfig.ExpandHostname(t, c.Name, nodeconfig.RoleControlPlane, ""), fmt.Sprintf("the %d control planes booted from the control-plane image", cps), cps)
	add(nodeconfig.ExpandHostname(t, c.Name, nodeconfig.RoleWorker, ""), "every worker booted from the worker image", m[nodeconfig.RoleWorker])
	for i, n := range c.Nodes {
		if _, ok := claims[n.Name]; ok {
			add(n.Name, fmt.Sprintf("nodes[%d]", i), 1)
		}
	}
	var shared []string
	for _, name := range order {
		machines, who := 0, []string{}
		for _, cl := range claims[name] {
			machines += cl.machines
			who = append(who, cl.who)
		}
		if machines > 1 {
			shared = append(shared, fmt.Sprintf("%s would be the name of %s", name, strings.Join(who, " and ")))
		}
	}
	if len(shared) > 0 {
		*errs = append(*errs, fmt.Errorf("hostname.template: %q has no per-machine part, so machines would share a name (%s): add {mac}, as the default %s does", t, strings.Join(shared, "; "), DefaultHostnameTemplate))
	}
}

// preflightRe is a kubeadm preflight check name: a word (Mem,
// SystemVerification) or a named instance (Port-6443,
// FileAvailable--etc-kubernetes-manifests-etcd.yaml).
var preflightRe = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9._-]*$`)

// validatePreflight checks kubernetes.ignorePreflightErrors as kubeadm
// does (names compared without case; all stands alone), plus the shape of
// a check name.
func (c *Cluster) validatePreflight(errs *[]error) {
	seen := map[string]int{}
	for i, name := range c.Kubernetes.IgnorePreflightErrors {
		field := fmt.Sprintf("kubernetes.ignorePreflightErrors[%d]", i)
		key := strings.ToLower(name)
		switch j, dup := seen[key]; {
		case !preflightRe.MatchString(name):
			*errs = append(*errs, fmt.Errorf("%s: %q is not a kubeadm preflight check name like SystemVerification or Port-6443", field, name))
		case dup:
			*errs = append(*errs, fmt.Errorf("%s: %s is already listed at [%d]", field, name, j))
		}
		seen[key] = i
	}
	if _, all := seen["all"]; all && len(c.Kubernetes.IgnorePreflightErrors) > 1 {
		*errs = append(*errs, fmt.Errorf("kubernetes.ignorePreflightErrors: all already skips every check: list all alone, or only the checks to skip"))
	}
}

func (c *Cluster) validatePatches(errs *[]error) {
	for i, p := range c.KubeadmPatches {
		field := fmt.Sprintf("kubeadmPatches[%d]", i)
		if !slices.Contains(patchTargets, p.Target) {
			*errs = append(*errs, fmt.Errorf("%s.target: %q: use one of %s", field, p.Target, strings.Join(patchTargets, ", ")))
		}
		if !slices.Contains(patchTypes, p.Type) {
			*errs = append(*errs, fmt.Errorf("%s.type: %q: use strategic, merge or json", field, p.Type))
		}
		for j, r := range p.Roles {
			if _, err := nodeconfig.ParseRole(string(r)); err != nil {
				*errs = append(*errs, fmt.Errorf("%s.roles[%d]: %v", field, j, err))
			}
		}
		var body any
		if strings.TrimSpace(p.Patch) == "" {
			*errs = append(*errs, fmt.Errorf("%s.patch: empty", field))
		} else if err := yaml.Unmarshal([]byte(p.Patch), &body); err != nil {
			*errs = append(*errs, fmt.Errorf("%s.patch: not YAML or JSON: %v", field, err))
		} else if _, isList := body.([]any); p.Type == "json" && !isList {
			*errs = append(*errs, fmt.Errorf("%s.patch: a json patch is a list of operations", field))
		}
	}
}

// Pinned returns the pinned download for name and arch.
func (c *Cluster) Pinned(name, arch string) (Download, bool) {
	for _, d := range c.Kubernetes.Downloads {
		if d.Name == name && d.Arch == arch {
			return d, true
		}
	}
	return Download{}, false
}

// validateNetwork checks network and loadBalancer against the rest of the
// file.
func (c *Cluster) validateNetwork(errs *[]error, pods, svcs []netip.Prefix) {
	add := func(field, format string, a ...any) {
		*errs = append(*errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, a...)))
	}
	switch c.Network.CNI {
	case CNIFlannel, CNINone:
	default:
		add("network.cni", "%q: use flannel (kiln installs it) or none (bring a pod network as an add-on)", c.Network.CNI)
	}
	lb := c.LoadBalancer
	switch lb.Type {
	case LBExternal:
		return
	case LBKeepalivedHAProxy, LBKubeVIP:
	default:
		add("loadBalancer.type", "%q: use external (your own load balancer), keepalived-haproxy or kube-vip", lb.Type)
		return
	}
	host, port := c.endpointHostPort()
	vip, err := netip.ParseAddr(host)
	if err != nil {
		if host != "" {
			add("controlPlaneEndpoint", "%q: loadBalancer.type %s holds a virtual IP, so the endpoint's host must be an IP address, not a name: use the free address on the nodes' LAN that the API will answer on, as 192.168.1.50:%d", c.ControlPlaneEndpoint, lb.Type, port)
		}
		return
	}
	for i, n := range c.Nodes {
		if n.Address() == vip {
			add(fmt.Sprintf("nodes[%d].ip", i), "%s is controlPlaneEndpoint's virtual IP: the VIP must be an address no machine owns", vip)
		}
		if p, err := netip.ParsePrefix(nodeAddress(n)); err == nil && n.Role.IsControlPlane() && !p.Masked().Contains(vip) {
			add(fmt.Sprintf("nodes[%d].network.address", i), "the virtual IP %s is outside this control plane's network %s: %s can only hold an address of the LAN the node is on", vip, p.Masked(), lb.Type)
		}
	}
	for _, set := range []struct {
		field string
		p     []netip.Prefix
	}{{"kubernetes.podSubnet", pods}, {"kubernetes.serviceSubnet", svcs}} {
		for _, p := range set.p {
			if p.Contains(vip) {
				add("controlPlaneEndpoint", "virtual IP %s lies inside %s %s: use an address of the nodes' LAN", vip, set.field, p)
			}
		}
	}
	if lb.Interface != "" && !ifaceRe.MatchString(lb.Interface) {
		add("loadBalancer.interface", "%q is not a network interface name (at most 15 characters, no '/' or spaces); leave it empty to use the interface whose network holds the VIP", lb.Interface)
	}
	if lb.APIServerPort < 1 || lb.APIServerPort > 65535 {
		add("loadBalancer.apiServerPort", "%d: use a port from 1 to 65535", lb.APIServerPort)
	}
	if lb.Type == LBKubeVIP {
		if lb.APIServerPort != port {
			add("loadBalancer.apiServerPort", "%d: kube-vip only moves the address, so the API servers must listen on the endpoint's port %d: remove apiServerPort", lb.APIServerPort, port)
		}
		return
	}
	if lb.APIServerPort == port {
		add("loadBalancer.apiServerPort", "%d is the endpoint's port, which HAProxy listens on: give the API servers another port (remove the field for 6444)", port)
	}
	if port < 1024 {
		add("controlPlaneEndpoint", "port %d: HAProxy's image runs as a user that cannot bind ports below 1024: use 6443 or another port from 1024", port)
	}
	if lb.VirtualRouterID < 1 || lb.VirtualRouterID > 255 {
		add("loadBalancer.virtualRouterID", "%d: VRRP router IDs are 1 to 255; every cluster on the LAN needs its own", lb.VirtualRouterID)
	}
	if lb.AdvertInterval < 1 || lb.AdvertInterval > 255 {
		add("loadBalancer.advertInterval", "%d: use 1 to 255 seconds", lb.AdvertInterval)
	}
	var withIP []string
	for _, n := range c.Nodes {
		if n.Role.IsControlPlane() && n.Address().IsValid() {
			withIP = append(withIP, n.Name)
		}
	}
	if len(withIP) != c.Kubernetes.ControlPlanes {
		add("nodes", "loadBalancer.type keepalived-haproxy balances over every control plane's address: list all %d control planes (kubernetes.controlPlanes) with role init or control-plane and their ip (found %d with an ip)", c.Kubernetes.ControlPlanes, len(withIP))
	}
	if _, err := manifests.Resolve("keepalived", c.Images); err != nil {
		*errs = append(*errs, err) // it names images.keepalived
	}
}

func (c *Cluster) validateAddons(errs *[]error) {
	for i, a := range c.Addons {
		field := fmt.Sprintf("addons[%d]", i)
		switch {
		case (a.Path == "") == (a.URL == ""):
			*errs = append(*errs, fmt.Errorf("%s: set exactly one of path (a file next to the cluster file) or url (with sha256)", field))
		case a.URL != "" && c.Airgap:
			*errs = append(*errs, fmt.Errorf("%s.url: an air-gapped node cannot download it: save the file next to the cluster file and name it with path", field))
		case a.URL != "":
			if !strings.HasPrefix(a.URL, "https://") && !strings.HasPrefix(a.URL, "http://") {
				*errs = append(*errs, fmt.Errorf("%s.url: %q must be an http(s) URL that the init node can reach", field, a.URL))
			}
			if !sha256Re.MatchString(a.SHA256) {
				*errs = append(*errs, fmt.Errorf("%s.sha256: required with url, 64 lowercase hex digits (sha256sum FILE)", field))
			}
		case a.SHA256 != "":
			*errs = append(*errs, fmt.Errorf("%s.sha256: only for url; a local file is embedded as it is", field))
		}
		if a.Data != nil {
			if err := checkManifest(a.Data); err != nil {
				*errs = append(*errs, fmt.Errorf("%s.path: %s: %v", field, a.Path, err))
			}
		}
	}
}

// checkManifest checks that data is what kubectl apply takes: YAML
// documents, each a Kubernetes object with apiVersion, kind and
// metadata.name (empty documents are skipped), at least one.
func checkManifest(data []byte) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	objects := 0
	for doc := 1; ; doc++ {
		var v any
		err := dec.Decode(&v)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("document %d is not YAML: %v", doc, err)
		}
		if v == nil {
			continue
		}
		obj, _ := v.(map[string]any)
		meta, _ := obj["metadata"].(map[string]any)
		name, _ := meta["name"].(string)
		if v, _ := obj["apiVersion"].(string); v == "" || name == "" {
			return fmt.Errorf("document %d is not a Kubernetes object (it needs apiVersion, kind and metadata.name)", doc)
		}
		if k, _ := obj["kind"].(string); k == "" {
			return fmt.Errorf("document %d is not a Kubernetes object (it needs apiVersion, kind and metadata.name)", doc)
		}
		objects++
	}
	if objects == 0 {
		return errors.New("holds no Kubernetes object")
	}
	return nil
}

// addonsMayName reports whether an add-on may run an image named name: one
// whose file mentions it, or one not read (given by URL).
func (c *Cluster) addonsMayName(name string) bool {
	return slices.ContainsFunc(c.Addons, func(a Addon) bool { return a.Data == nil || bytes.Contains(a.Data, []byte(name)) })
}

// imageNameRe matches what may be an image reference (an add-on's image,
// as its manifest names it: busybox, ghcr.io/a/b:v1, ...).
var imageNameRe = regexp.MustCompile(`^[a-z0-9][a-z0-9._/:@-]*$`)

func (c *Cluster) validateImages(errs *[]error) {
	names := make([]string, 0, len(c.Images))
	for name := range c.Images {
		names = append(names, name)
	}
	slices.Sort(names)
	known := append(manifests.ImageNames(), manifests.KubeadmImageNames...)
	for _, name := range names {
		field := "images." + name
		if _, err := manifests.ParsePinned(c.Images[name]); err != nil {
			*errs = append(*errs, fmt.Errorf("%s: %v", field, err))
			continue
		}
		switch {
		case slices.Contains(known, name):
			// A kubeadm image pinned for another reference than kubeadm
			// runs now is stale, not wrong: kiln images says so and kiln
			// images pin replaces it.
		case imageNameRe.MatchString(name) && c.addonsMayName(name):
			// An add-on's image, by the reference its manifest writes
			// (kiln images checks that an add-on runs it).
		default:
			*errs = append(*errs, fmt.Errorf("%s: kiln runs no image of that name: use one of %s, or an add-on's image reference", field, strings.Join(known, ", ")))
		}
	}
}
