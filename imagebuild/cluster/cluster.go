// Package cluster defines the cluster file (cluster.yaml): its types,
// defaults, strict decoding and validation.
package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/fault"
)

// APIVersion and Kind identify a cluster file.
const (
	APIVersion = "kiln.dev/v1alpha1"
	Kind       = "Cluster"
)

// Defaults.
const (
	DefaultKubernetesVersion = "v1.37.2"
	DefaultPodSubnet         = "10.244.0.0/16"
	DefaultServiceSubnet     = "10.96.0.0/12"
	DefaultDNSDomain         = "cluster.local"
	DefaultControlPlanes     = 3
	DefaultTokenTTL          = 24 * time.Hour
	DefaultUploadWindow      = 6 * time.Hour
	DefaultOS                = "flatcar"
	DefaultHostnameTemplate  = "{cluster}-{role}-{mac}"
	// DefaultAPIServerPort is kubeadm's default localAPIEndpoint.bindPort.
	DefaultAPIServerPort = 6443
)

// Supported Kubernetes minors: what a real kubeadm built from the module
// proxy can verify.
const (
	MinMinor = 33
	MaxMinor = 37
)

// Cluster is the whole cluster file.
type Cluster struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`

	Name string `yaml:"name"`
	// ControlPlaneEndpoint is the load balancer in front of the API
	// servers: host:port, host a DNS name, IPv4 or [IPv6].
	ControlPlaneEndpoint string     `yaml:"controlPlaneEndpoint"`
	Kubernetes           Kubernetes `yaml:"kubernetes"`
	OS                   OS         `yaml:"os"`
	SSH                  SSH        `yaml:"ssh,omitempty"`
	Hostname             Hostname   `yaml:"hostname,omitempty"`
	// Network is the pod network kiln installs.
	Network Network `yaml:"network"`
	// LoadBalancer is what serves controlPlaneEndpoint.
	LoadBalancer LoadBalancer `yaml:"loadBalancer"`
	// Addons are manifests the init node applies after the pod network,
	// in order.
	Addons []Addon `yaml:"addons,omitempty"`
	// Images pins images by name (see `kiln images`):
	// REFERENCE@sha256:DIGEST.
	Images map[string]string `yaml:"images,omitempty"`
	// Airgap: nodes reach no registry and no download site. Their disk
	// images carry the Kubernetes binaries and every container image
	// (kiln images pull first); kiln build-image --airgap does the same
	// for one build.
	Airgap bool `yaml:"airgap,omitempty"`
	// Profile is the target profile (kiln profiles) of every node that
	// names none: what build-image bakes and render renders for it when no
	// --profile is given. Empty: commands take --profile.
	Profile string `yaml:"profile,omitempty"`
	// Nodes is an optional inventory of known machines.
	Nodes []Node `yaml:"nodes,omitempty"`
	// Butane lists Butane files (paths relative to the cluster file)
	// merged into every node's config.
	Butane []string `yaml:"butane,omitempty"`
	// KubeadmPatches are kubeadm patches applied on the nodes.
	KubeadmPatches []KubeadmPatch `yaml:"kubeadmPatches,omitempty"`

	// Snippets holds the contents of the Butane files, read by Load.
	Snippets []Snippet `yaml:"-"`
}

// Pod networks (network.cni).
const (
	CNIFlannel = nodeconfig.PodNetworkFlannel
	CNINone    = nodeconfig.PodNetworkNone
)

// Network is the pod network.
type Network struct {
	// CNI is flannel (the default) or none (an add-on brings one).
	CNI string `yaml:"cni"`
}

// Load balancer types (loadBalancer.type).
const (
	LBExternal          = "external"
	LBKeepalivedHAProxy = nodeconfig.LoadBalancerKeepalivedHAProxy
	LBKubeVIP           = nodeconfig.LoadBalancerKubeVIP
)

// LoadBalancer is what serves controlPlaneEndpoint.
type LoadBalancer struct {
	// Type is external (a load balancer kiln does not run; the default),
	// keepalived-haproxy or kube-vip (static pods on every control plane
	// hold controlPlaneEndpoint's address as a virtual IP).
	Type string `yaml:"type"`
	// Interface holds the virtual IP; empty: on each node, the interface
	// whose network contains it.
	Interface string `yaml:"interface,omitempty"`
	// APIServerPort is the port every API server binds (kubeadm's
	// localAPIEndpoint.bindPort; default 6443). keepalived-haproxy:
	// HAProxy takes the endpoint's port, so this must differ (default 6444
	// when the endpoint's port is 6443). kube-vip: the endpoint's port.
	APIServerPort int `yaml:"apiServerPort,omitempty"`
	// VirtualRouterID is keepalived's VRRP router ID, 1-255, unique on the
	// LAN (default: derived from the cluster name).
	VirtualRouterID int `yaml:"virtualRouterID,omitempty"`
	// AdvertInterval is keepalived's VRRP advertisement interval in
	// seconds (default 1): a backup takes over about 3 intervals after
	// the holder goes silent.
	AdvertInterval int `yaml:"advertInterval,omitempty"`
}

// Addon is one manifest file the init node applies: a local file (Path,
// relative to the cluster file) or a URL that Ignition downloads and checks
// against SHA256.
type Addon struct {
	Path   string `yaml:"path,omitempty"`
	URL    string `yaml:"url,omitempty"`
	SHA256 string `yaml:"sha256,omitempty"`
	// Data is the content of a local file, read by Load.
	Data []byte `yaml:"-"`
}

// Kubernetes settings.
type Kubernetes struct {
	Version       string `yaml:"version"`
	PodSubnet     string `yaml:"podSubnet"`
	ServiceSubnet string `yaml:"serviceSubnet"`
	DNSDomain     string `yaml:"dnsDomain"`
	// ControlPlanes is the expected number of control-plane nodes.
	ControlPlanes int `yaml:"controlPlanes"`
	// TokenTTL is the bootstrap token lifetime; 0s never expires.
	TokenTTL *nodeconfig.Duration `yaml:"tokenTTL,omitempty"`
	// CertificateUploadWindow is how long the init node keeps the
	// control-plane certificates uploaded for late joiners.
	CertificateUploadWindow *nodeconfig.Duration `yaml:"certificateUploadWindow,omitempty"`
	// Downloads pins every artifact nodes download, by URL and SHA-512.
	Downloads []Download `yaml:"downloads,omitempty"`
	// IgnorePreflightErrors are kubeadm preflight checks that kubeadm
	// init and join skip on every node (kubeadm's
	// nodeRegistration.ignorePreflightErrors), by kubeadm's check names
	// (Mem, NumCPU, Swap, SystemVerification, ...) or all. For machines
	// that cannot pass a check, such as a board with less than kubeadm's
	// 1700 MB (Mem). A cgroup v1 host on Kubernetes 1.37 fails
	// SystemVerification, but skipping it is not enough: the kubelet
	// refuses cgroup v1 from 1.35 on unless a kubeletconfiguration patch
	// sets failCgroupV1: false. Empty, the default: kubeadm skips nothing.
	IgnorePreflightErrors []string `yaml:"ignorePreflightErrors,omitempty"`
}

// Download is one pinned artifact for one arch.
type Download struct {
	Name string `yaml:"name" json:"name"`
	Arch string `yaml:"arch" json:"arch"`
	// OS and KubernetesVersion record what the pin was made for (os.name
	// and kubernetes.version when kiln pin wrote it): a pin made for
	// another is stale (StalePin).
	OS                string `yaml:"os" json:"os"`
	KubernetesVersion string `yaml:"kubernetesVersion" json:"kubernetesVersion"`
	URL               string `yaml:"url" json:"url"`
	SHA512            string `yaml:"sha512" json:"sha512"`
}

// StalePin says why d was not made for this cluster's os.name and
// kubernetes.version, or "" if it was.
func (c *Cluster) StalePin(d Download) string {
	switch {
	case d.OS == "" || d.KubernetesVersion == "":
		return "no record of the OS and Kubernetes version it was pinned for (written by an older kiln)"
	case d.OS != c.OS.Name:
		return fmt.Sprintf("pinned for os.name %s, the cluster is %s", d.OS, c.OS.Name)
	case d.KubernetesVersion != c.Kubernetes.Version:
		return fmt.Sprintf("pinned for Kubernetes %s, kubernetes.version is %s", d.KubernetesVersion, c.Kubernetes.Version)
	}
	return ""
}

// OS is the node operating system.
type OS struct {
	Name    string `yaml:"name"`
	Channel string `yaml:"channel"`
	// Version is a pinned release, or "current" to resolve at build time.
	Version string `yaml:"version"`
}

// SSH access for the OS's "core" user.
type SSH struct {
	AuthorizedKeys []string `yaml:"authorizedKeys,omitempty"`
}

// Hostname policy for nodes not named in the inventory.
type Hostname struct {
	// Template may use {cluster}, {role} and {mac}.
	Template string `yaml:"template,omitempty"`
}

// Node is one inventory entry.
type Node struct {
	Name string          `yaml:"name"`
	Role nodeconfig.Role `yaml:"role"`
	MAC  string          `yaml:"mac,omitempty"`
	// IP is the node's address on the LAN. With Network it may be left
	// out (it is Network.Address's).
	IP string `yaml:"ip,omitempty"`
	// Profile is the node's target profile (kiln profiles): its OS,
	// architecture and board. Empty: the cluster's profile.
	Profile string `yaml:"profile,omitempty"`
	// Network, if set, is the node's static network configuration; nil:
	// the OS's default (DHCP on every interface).
	Network *NodeNetwork `yaml:"network,omitempty"`
	// Disk is where a PXE install-mode node installs the OS (a /dev
	// path), over kiln pxe --disk.
	Disk string `yaml:"disk,omitempty"`
	// Butane lists Butane files (paths relative to the cluster file)
	// merged into this node's config after the cluster's butane.
	Butane []string `yaml:"butane,omitempty"`
	// Snippets holds the contents of Butane, read by Load.
	Snippets []Snippet `yaml:"-"`
}

// CheckDisk checks an install target: a device path that can go into a
// systemd unit's command line as it is.
func CheckDisk(disk string) error {
	if !strings.HasPrefix(disk, "/dev/") || strings.ContainsAny(disk, " \t\n'\"\\%$;") {
		return fault.Wrap(fault.Input, fmt.Errorf("install disk %q: give a device path such as /dev/sda or /dev/disk/by-id/NAME", disk))
	}
	return nil
}

// NodeNetwork is one node's static address on one interface, which the
// node configures in its initramfs (so Ignition's own downloads work on a
// network without DHCP) and after it.
type NodeNetwork struct {
	// Interface is the interface's kernel name (eth0, end0, enp1s0).
	// Empty: the interface whose MAC is the node's mac.
	Interface string `yaml:"interface,omitempty"`
	// Address is the node's address with its prefix length:
	// 192.168.1.11/24 or fd00::11/64.
	Address string `yaml:"address"`
	// Gateway is the default route's next hop, inside Address's prefix;
	// empty: no default route.
	Gateway string `yaml:"gateway,omitempty"`
	// DNS lists the name servers, in order.
	DNS []string `yaml:"dns,omitempty"`
	// VLAN, 1-4094, puts the address on that 802.1Q VLAN of the
	// interface instead of on the interface itself.
	VLAN int `yaml:"vlan,omitempty"`
}

// Address is the node's LAN address: IP, or Network.Address's. Not valid
// when neither is set (or the node did not pass Validate).
func (n Node) Address() netip.Addr {
	if a, err := netip.ParseAddr(n.IP); err == nil {
		return a
	}
	if n.Network != nil {
		if p, err := netip.ParsePrefix(n.Network.Address); err == nil {
			return p.Addr()
		}
	}
	return netip.Addr{}
}

// NodeProfile is the target profile of inventory node n: its own, or the
// cluster's ("" when neither is set).
func (c *Cluster) NodeProfile(n Node) string {
	if n.Profile != "" {
		return n.Profile
	}
	return c.Profile
}

// Many stands for "any number of machines" in RoleImageMachines.
const Many = 2

// RoleImageMachines counts, per role, the machines that boot from the
// role's image (named by hostname.template) rather than as an inventory
// node: the init node unless the inventory has it, the control planes of
// kubernetes.controlPlanes the inventory does not list, and Many workers.
// A role with no such machine is absent.
func (c *Cluster) RoleImageMachines() map[nodeconfig.Role]int {
	inits, cps := 0, 0
	for _, n := range c.Nodes {
		switch n.Role {
		case nodeconfig.RoleInit:
			inits++
		case nodeconfig.RoleControlPlane:
			cps++
		}
	}
	m := map[nodeconfig.Role]int{nodeconfig.RoleWorker: Many}
	init := max(1-inits, 0)
	if init > 0 {
		m[nodeconfig.RoleInit] = init
	}
	if rest := c.Kubernetes.ControlPlanes - cps - 1; rest > 0 {
		m[nodeconfig.RoleControlPlane] = rest
	}
	return m
}

// KubeadmPatch is one kubeadm patch file.
type KubeadmPatch struct {
	// Target is a kubeadm patch target (kube-apiserver, etcd, ...).
	Target string `yaml:"target"`
	// Type is strategic (default), merge or json.
	Type string `yaml:"type,omitempty"`
	// Roles limits the patch to these roles; empty means all.
	Roles []nodeconfig.Role `yaml:"roles,omitempty"`
	// Patch is the patch body, YAML or JSON.
	Patch string `yaml:"patch"`
}

// Snippet is a loaded Butane file.
type Snippet struct {
	Path string
	Data []byte
	// Dir is where its local: sources are read from: the cluster file's
	// folder.
	Dir string
}

// SetDefaults fills every omitted field with its default.
func (c *Cluster) SetDefaults() {
	k := &c.Kubernetes
	if k.Version == "" {
		k.Version = DefaultKubernetesVersion
	}
	if k.PodSubnet == "" {
		k.PodSubnet = DefaultPodSubnet
	}
	if k.ServiceSubnet == "" {
		k.ServiceSubnet = DefaultServiceSubnet
	}
	if k.DNSDomain == "" {
		k.DNSDomain = DefaultDNSDomain
	}
	if k.ControlPlanes == 0 {
		k.ControlPlanes = DefaultControlPlanes
	}
	if k.TokenTTL == nil {
		k.TokenTTL = &nodeconfig.Duration{Duration: DefaultTokenTTL}
	}
	if k.CertificateUploadWindow == nil {
		k.CertificateUploadWindow = &nodeconfig.Duration{Duration: DefaultUploadWindow}
	}
	if c.OS.Name == "" {
		c.OS.Name = DefaultOS
	}
	if c.OS.Channel == "" {
		c.OS.Channel = "stable"
	}
	if c.OS.Version == "" {
		c.OS.Version = "current"
	}
	if c.Hostname.Template == "" {
		c.Hostname.Template = DefaultHostnameTemplate
	}
	if c.Network.CNI == "" {
		c.Network.CNI = CNIFlannel
	}
	lb := &c.LoadBalancer
	if lb.Type == "" {
		lb.Type = LBExternal
	}
	_, port := c.endpointHostPort()
	if lb.APIServerPort == 0 {
		switch {
		case lb.Type == LBKubeVIP:
			lb.APIServerPort = port
		case lb.Type == LBKeepalivedHAProxy && port == 6443:
			lb.APIServerPort = 6444
		default:
			lb.APIServerPort = DefaultAPIServerPort
		}
	}
	if lb.Type == LBKeepalivedHAProxy { // VRRP's settings
		if lb.VirtualRouterID == 0 {
			lb.VirtualRouterID = 1 + int(crc32.ChecksumIEEE([]byte(c.Name))%255)
		}
		if lb.AdvertInterval == 0 {
			lb.AdvertInterval = 1
		}
	}
	for i := range c.KubeadmPatches {
		if c.KubeadmPatches[i].Type == "" {
			c.KubeadmPatches[i].Type = "strategic"
		}
	}
}

// Parse decodes a cluster file strictly, applies defaults and validates it.
// It does not read Butane snippets or add-on files (see Load).
func Parse(data []byte) (*Cluster, error) {
	c, err := decode(data)
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// decode decodes a cluster file strictly and applies defaults.
func decode(data []byte) (*Cluster, error) {
	var head struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
	}
	if err := yaml.Unmarshal(data, &head); err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("parse cluster file: %w", explain(data, err)))
	}
	if head.APIVersion != APIVersion || head.Kind != Kind {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("cluster file is apiVersion %q kind %q: expected apiVersion: %s and kind: %s (create one with `kiln init`)",
			head.APIVersion, head.Kind, APIVersion, Kind))
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var c Cluster
	if err := dec.Decode(&c); err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("parse cluster file:\n%w", explain(data, err)))
	}
	c.SetDefaults()
	return &c, nil
}

// Decode decodes a cluster file strictly and applies defaults, without
// validating it: for commands that repair what validation refuses (kiln
// pin replaces stale pins).
func Decode(data []byte) (*Cluster, error) { return decode(data) }

// Size limits of the files a cluster is described by: far above any real
// one, low enough that a wrong path (a disk image, /dev/zero) is a clear
// error instead of a long read into memory.
const (
	MaxClusterFile = 1 << 20  // the cluster file
	MaxSnippet     = 4 << 20  // a Butane file (its local: sources are Butane's to read)
	MaxAddon       = 16 << 20 // an add-on's manifests (CRD bundles run to a few MiB)
)

// Read reads a cluster file's bytes.
func Read(path string) ([]byte, error) {
	data, err := ReadLimited(path, "a cluster file", MaxClusterFile)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("no cluster file at %s: create one with `kiln init NAME --endpoint HOST:PORT`, or pass --cluster", path))
		}
		if fault.KindOf(err) == fault.Input {
			return nil, err
		}
		return nil, fault.Wrap(fault.IO, fmt.Errorf("read cluster file: %w", err))
	}
	return data, nil
}

// ReadLimited reads an input file of at most limit bytes; what names such
// a file in the error (fault.Input) for a bigger one. Other errors are the
// os package's.
func ReadLimited(path, what string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("%s is larger than %d MiB, the most %s may be: is it the right file?", path, limit>>20, what))
	}
	return data, nil
}

// Load reads and validates a cluster file and the Butane files it names.
func Load(path string) (*Cluster, error) {
	data, err := Read(path)
	if err != nil {
		return nil, err
	}
	return LoadData(path, data)
}

// LoadData validates data as the cluster file at path (whose folder the
// Butane and add-on files it names are read from).
func LoadData(path string, data []byte) (*Cluster, error) {
	c, err := decode(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	// Files it names are read first, so that one report lists every
	// problem: those files' and the validation's.
	dir := filepath.Dir(path)
	var problems []error
	read := func(field, p, what string, limit int64) []byte {
		full := p
		if !filepath.IsAbs(p) {
			full = filepath.Join(dir, p)
		}
		b, err := ReadLimited(full, what, limit)
		if err != nil {
			problems = append(problems, fmt.Errorf("%s: %w", field, err))
		}
		return b
	}
	for i, p := range c.Butane {
		if b := read(fmt.Sprintf("butane[%d]", i), p, "a Butane file", MaxSnippet); b != nil {
			c.Snippets = append(c.Snippets, Snippet{Path: p, Data: b, Dir: dir})
		}
	}
	for i := range c.Nodes {
		n := &c.Nodes[i]
		for j, p := range n.Butane {
			if b := read(fmt.Sprintf("nodes[%d].butane[%d]", i, j), p, "a Butane file", MaxSnippet); b != nil {
				n.Snippets = append(n.Snippets, Snippet{Path: p, Data: b, Dir: dir})
			}
		}
	}
	for i := range c.Addons {
		if a := &c.Addons[i]; a.Path != "" {
			a.Data = read(fmt.Sprintf("addons[%d].path", i), a.Path, "an add-on", MaxAddon)
		}
	}
	if err := c.Validate(); err != nil {
		var inv *InvalidError
		if !errors.As(err, &inv) {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		problems = append(problems, inv.Problems...)
	}
	if len(problems) > 0 {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("%s: %w", path, &InvalidError{Problems: problems}))
	}
	return c, nil
}

// Encode writes the cluster file as YAML.
func (c *Cluster) Encode() ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(c); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Minor returns the Kubernetes minor version (37 for v1.37.2). The version
// must have passed Validate.
func (c *Cluster) Minor() int {
	_, minor, _, _ := parseVersion(c.Kubernetes.Version)
	return minor
}

// InventoryNode returns the inventory entry with the given name.
func (c *Cluster) InventoryNode(name string) (Node, bool) {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n, true
		}
	}
	return Node{}, false
}

// endpointHostPort splits controlPlaneEndpoint; the port is 0 when the
// endpoint is not host:port with a numeric port.
func (c *Cluster) endpointHostPort() (string, int) {
	host, port, err := net.SplitHostPort(c.ControlPlaneEndpoint)
	if err != nil {
		return "", 0
	}
	p, _ := strconv.Atoi(port)
	return host, p
}

// VIP returns the virtual IP of a keepalived-haproxy or kube-vip cluster:
// controlPlaneEndpoint's address (the cluster file must have passed
// Validate).
func (c *Cluster) VIP() netip.Addr {
	host, _ := c.endpointHostPort()
	a, _ := netip.ParseAddr(host)
	return a
}

// EndpointPort is controlPlaneEndpoint's port.
func (c *Cluster) EndpointPort() int {
	_, p := c.endpointHostPort()
	return p
}
