// Package nodeconfig is the role-metadata contract between the kiln builder
// and the kiln-firstboot agent: the file /etc/kiln/node.yaml that Ignition
// writes on every node and the agent reads on first boot.
//
// It is a leaf package (standard library and yaml.v3 only) so the agent stays
// small. The file is versioned by apiVersion and kind and decoded strictly:
// an agent never guesses at fields it does not know.
package nodeconfig

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// APIVersion and Kind identify the node metadata document.
const (
	APIVersion = "kiln.dev/v1alpha1"
	Kind       = "NodeConfig"
)

// DefaultPath is where Ignition writes the node metadata.
const DefaultPath = "/etc/kiln/node.yaml"

// DoneFile is created by the agent once the node has joined; the agent's
// systemd unit does not start again while it exists.
const DoneFile = "/var/lib/kiln/done"

// RemovedFile lists, one per line, when the agent removed each entry of
// NodeConfig.RemoveAfterJoin ("2026-12-03T14:02:00Z /etc/kiln/kubeadm-join.yaml").
// The agent writes it last, once nothing is left to remove: from then on
// the agent's unit skips the node's boots.
const RemovedFile = "/var/lib/kiln/removed-after-join"

// Role is what a node does when it joins the cluster.
type Role string

// The three roles. Init is the one control plane that runs kubeadm init.
const (
	RoleInit         Role = "init"
	RoleControlPlane Role = "control-plane"
	RoleWorker       Role = "worker"
)

// Roles lists every role in a stable order.
var Roles = []Role{RoleInit, RoleControlPlane, RoleWorker}

// ParseRole checks a role name.
func ParseRole(s string) (Role, error) {
	for _, r := range Roles {
		if string(r) == s {
			return r, nil
		}
	}
	return "", fmt.Errorf("unknown role %q: use one of init, control-plane, worker", s)
}

// IsControlPlane reports whether the role runs the control plane.
func (r Role) IsControlPlane() bool { return r == RoleInit || r == RoleControlPlane }

// NodeConfig is the content of /etc/kiln/node.yaml.
//
// It holds no secret: the token and certificate key live only in the kubeadm
// configuration files it points to, which kubeadm reads itself, so the agent
// never has to pass a secret on a command line.
type NodeConfig struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`

	// Role of this node.
	Role Role `yaml:"role"`
	// Cluster this node belongs to.
	Cluster Cluster `yaml:"cluster"`
	// Hostname decides the node name.
	Hostname Hostname `yaml:"hostname"`
	// Kubeadm names the kubeadm configuration files on the node.
	Kubeadm Kubeadm `yaml:"kubeadm"`
	// PKIDir holds the pre-made cluster PKI (init role only); the agent
	// copies it into Kubeadm.CertificatesDir, keeping files already there.
	PKIDir string `yaml:"pkiDir,omitempty"`
	// NotBefore is a lower bound for a sane clock: the agent waits until
	// the system clock reads later than this before any TLS. kiln uses the
	// cluster CA's NotBefore, which is also when TLS starts to work.
	NotBefore time.Time `yaml:"notBefore"`
	// Manifests are Kubernetes manifests the init node applies after init,
	// in order: the pod network first, then the add-ons.
	Manifests []string `yaml:"manifests,omitempty"`
	// PodNetwork is the cluster file's network.cni: flannel, or none when
	// the add-ons (or the user, later) bring the pod network.
	PodNetwork string `yaml:"podNetwork,omitempty"`
	// LoadBalancer, on control planes of a cluster whose endpoint is a
	// virtual IP that the control planes hold, names the static pods that
	// hold it.
	LoadBalancer *LoadBalancer `yaml:"loadBalancer,omitempty"`
	// Images, on an air-gapped node, is the container image archive its
	// disk image carries, imported before kubeadm runs.
	Images *Images `yaml:"images,omitempty"`
	// ReportURL, if set, receives the agent's status as JSON POSTs.
	ReportURL string `yaml:"reportURL,omitempty"`
	// RemoveAfterJoin lists files and folders holding secrets that only
	// the bootstrap needs (the kubeadm configuration files with the token
	// and certificate key, the pre-made PKI, the OS's copy of the
	// first-boot config): the agent removes them once the node is in its
	// cluster, and notes each in RemovedFile.
	RemoveAfterJoin []string `yaml:"removeAfterJoin,omitempty"`
}

// Cluster is the part of the cluster definition the agent needs.
type Cluster struct {
	Name string `yaml:"name"`
	// ControlPlaneEndpoint is host:port of the load balancer.
	ControlPlaneEndpoint string `yaml:"controlPlaneEndpoint"`
	KubernetesVersion    string `yaml:"kubernetesVersion"`
	// ControlPlanes is the expected number of control-plane nodes.
	ControlPlanes int `yaml:"controlPlanes"`
	// CACertificate is the cluster CA certificate (PEM, public).
	CACertificate string `yaml:"caCertificate"`
	// CACertHash pins the CA: "sha256:" and the hex SHA-256 of its
	// SubjectPublicKeyInfo, as kubeadm's discovery-token-ca-cert-hash.
	CACertHash string `yaml:"caCertHash"`
	// TokenTTL is the bootstrap token's lifetime from kubeadm init
	// (0: never expires).
	TokenTTL Duration `yaml:"tokenTTL"`
	// CertificateUploadWindow is how long the init node keeps the
	// kubeadm-certs Secret alive for late control planes.
	CertificateUploadWindow Duration `yaml:"certificateUploadWindow"`
}

// Pod networks (PodNetwork; the cluster file's network.cni).
const (
	PodNetworkFlannel = "flannel"
	PodNetworkNone    = "none"
)

// Load balancers the control planes run (LoadBalancer.Type; the cluster
// file's loadBalancer.type).
const (
	LoadBalancerKeepalivedHAProxy = "keepalived-haproxy"
	LoadBalancerKubeVIP           = "kube-vip"
)

// InterfaceToken stands for the network interface that holds the virtual
// IP in load-balancer files rendered without loadBalancer.interface; the
// agent replaces it with the interface whose network contains the VIP.
const InterfaceToken = "${KILN_VIP_INTERFACE}"

// LoadBalancerConfigMode is the mode of the load balancer's config files
// (LoadBalancer.Configs): readable by all, because the containers that
// mount them may read them as a non-root user (the haproxy image runs as
// user haproxy). They hold addresses and ports only, no secret; the static
// pods, and the folder they all live in, stay private to root.
const LoadBalancerConfigMode = 0o644

// LoadBalancer is the control-plane endpoint's static pods on this node.
type LoadBalancer struct {
	// Type is keepalived-haproxy or kube-vip.
	Type string `yaml:"type"`
	// Address is the virtual IP (controlPlaneEndpoint's host).
	Address string `yaml:"address"`
	// Interface holds the VIP; empty: the agent finds it.
	Interface string `yaml:"interface,omitempty"`
	// Configs are files the static pods mount; the agent fills in the
	// interface where InterfaceToken stands.
	Configs []string `yaml:"configs,omitempty"`
	// StaticPods are manifests the agent fills in likewise and places in
	// kubeadm's static pod folder before kubeadm runs (and again after
	// every kubeadm reset, which empties that folder).
	StaticPods []string `yaml:"staticPods"`
}

// Images is an air-gapped node's container image archive.
type Images struct {
	// Archive is a tar of an OCI image layout on the node (kiln images).
	Archive string `yaml:"archive"`
	// References are the images it holds, each NAME@sha256:DIGEST, NAME
	// as containerd names it (the io.containerd.image.name annotation of
	// the archive's index.json) and DIGEST the pinned one.
	References []string `yaml:"references"`
}

// SplitImageReference splits an Images reference NAME@sha256:DIGEST at
// its last "@" (NAME may itself be REPO@sha256:DIGEST, for an image pinned
// by digest alone); ok is false unless the digest is sha256:<64 hex>.
func SplitImageReference(ref string) (name, digest string, ok bool) {
	i := strings.LastIndex(ref, "@")
	if i <= 0 || !hashRe.MatchString(ref[i+1:]) {
		return "", "", false
	}
	return ref[:i], ref[i+1:], true
}

// Hostname decides the node's name: Name if set, otherwise Template.
type Hostname struct {
	Name string `yaml:"name,omitempty"`
	// Template may use {cluster}, {role} and {mac} (the MAC address of the
	// first physical network interface, or of the first non-loopback one
	// when none is physical; 12 lowercase hex digits). The agent records
	// the name on first boot and keeps it.
	Template string `yaml:"template,omitempty"`
}

// Kubeadm names kubeadm's files on the node.
type Kubeadm struct {
	// InitConfig is the kubeadm init configuration (init role only).
	InitConfig string `yaml:"initConfig,omitempty"`
	// JoinConfig is the kubeadm join configuration (every role: the init
	// node joins as a control plane if the cluster already exists).
	JoinConfig string `yaml:"joinConfig"`
	// CertificatesDir is kubeadm's certificatesDir.
	CertificatesDir string `yaml:"certificatesDir"`
}

// Duration is a time.Duration written as Go duration text ("24h0m0s").
type Duration struct{ time.Duration }

// MarshalYAML writes the duration as text.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// UnmarshalYAML reads Go duration text.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration like 24h or 90m", n.Line, s)
	}
	d.Duration = v
	return nil
}

// Decode reads node metadata strictly and validates it.
func Decode(r io.Reader) (*NodeConfig, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("read node metadata: %w", err)
	}
	var head struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
	}
	if err := yaml.Unmarshal(data, &head); err != nil {
		return nil, fmt.Errorf("parse node metadata: %w", err)
	}
	if head.APIVersion != APIVersion || head.Kind != Kind {
		return nil, fmt.Errorf("node metadata is apiVersion %q kind %q: this agent reads apiVersion %s kind %s; rebuild the image with a matching kiln",
			head.APIVersion, head.Kind, APIVersion, Kind)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var nc NodeConfig
	if err := dec.Decode(&nc); err != nil {
		return nil, fmt.Errorf("parse node metadata: %w", err)
	}
	if err := nc.Validate(); err != nil {
		return nil, err
	}
	return &nc, nil
}

// Encode writes node metadata as YAML.
func (nc *NodeConfig) Encode() ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(nc); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

var (
	hashRe     = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	templateRe = regexp.MustCompile(`\{[^}]*\}`)
	dnsLabelRe = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
)

// Validate reports every problem, each with its field path.
func (nc *NodeConfig) Validate() error {
	var errs []error
	add := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, a...)))
	}
	if _, err := ParseRole(string(nc.Role)); err != nil {
		add("role", "%v", err)
	}
	c := nc.Cluster
	if c.Name == "" {
		add("cluster.name", "required")
	}
	if err := CheckEndpoint(c.ControlPlaneEndpoint); err != nil {
		add("cluster.controlPlaneEndpoint", "%v", err)
	}
	if c.KubernetesVersion == "" {
		add("cluster.kubernetesVersion", "required")
	}
	if c.ControlPlanes < 1 {
		add("cluster.controlPlanes", "must be at least 1, got %d", c.ControlPlanes)
	}
	if !hashRe.MatchString(c.CACertHash) {
		add("cluster.caCertHash", "%q is not sha256: followed by 64 lowercase hex digits", c.CACertHash)
	}
	if ca, err := ParseCACertificate(c.CACertificate); err != nil {
		add("cluster.caCertificate", "%v", err)
	} else if hashRe.MatchString(c.CACertHash) && CACertHash(ca) != c.CACertHash {
		add("cluster.caCertHash", "%s does not match cluster.caCertificate (%s): the metadata pins a different CA; rebuild the image from the cluster's secrets", c.CACertHash, CACertHash(ca))
	}
	if c.TokenTTL.Duration < 0 {
		add("cluster.tokenTTL", "must not be negative")
	}
	if c.CertificateUploadWindow.Duration < 0 {
		add("cluster.certificateUploadWindow", "must not be negative")
	}
	switch {
	case nc.Hostname.Name != "":
		if err := CheckNodeName(nc.Hostname.Name); err != nil {
			add("hostname.name", "%v", err)
		}
	case nc.Hostname.Template != "":
		if err := CheckHostnameTemplate(nc.Hostname.Template, c.Name); err != nil {
			add("hostname.template", "%v", err)
		}
	default:
		add("hostname", "set name or template")
	}
	if nc.Kubeadm.JoinConfig == "" {
		add("kubeadm.joinConfig", "required")
	}
	if nc.Kubeadm.CertificatesDir == "" {
		add("kubeadm.certificatesDir", "required")
	}
	// What the node keeps after the join: kubeadm's certificates, this
	// file and the agent's state.
	kept := []string{nc.Kubeadm.CertificatesDir, DefaultPath, path.Dir(DoneFile)}
	for i, p := range nc.RemoveAfterJoin {
		if !path.IsAbs(p) || path.Clean(p) != p || slices.ContainsFunc(kept, func(k string) bool { return within(p, k) || within(k, p) }) {
			add(fmt.Sprintf("removeAfterJoin[%d]", i), "%q: give a clean absolute path that neither holds nor lies in %s", p, strings.Join(kept, ", "))
		}
	}
	if nc.Role == RoleInit {
		if nc.Kubeadm.InitConfig == "" {
			add("kubeadm.initConfig", "required for role init")
		}
		if nc.PKIDir == "" {
			add("pkiDir", "required for role init")
		}
	} else {
		if nc.Kubeadm.InitConfig != "" {
			add("kubeadm.initConfig", "only the init role runs kubeadm init; remove it")
		}
		if nc.PKIDir != "" {
			add("pkiDir", "only the init role carries the cluster PKI; remove it")
		}
	}
	if lb := nc.LoadBalancer; lb != nil {
		if lb.Type != LoadBalancerKeepalivedHAProxy && lb.Type != LoadBalancerKubeVIP {
			add("loadBalancer.type", "%q: use keepalived-haproxy or kube-vip", lb.Type)
		}
		if net.ParseIP(lb.Address) == nil {
			add("loadBalancer.address", "%q is not an IP address", lb.Address)
		}
		if len(lb.StaticPods) == 0 {
			add("loadBalancer.staticPods", "required")
		}
		if !nc.Role.IsControlPlane() {
			add("loadBalancer", "only control planes hold the virtual IP; remove it")
		}
	}
	switch nc.PodNetwork {
	case "", PodNetworkFlannel, PodNetworkNone:
	default:
		add("podNetwork", "%q: use flannel or none", nc.PodNetwork)
	}
	if im := nc.Images; im != nil {
		if !strings.HasPrefix(im.Archive, "/") {
			add("images.archive", "%q must be an absolute path", im.Archive)
		}
		if len(im.References) == 0 {
			add("images.references", "required")
		}
		for i, r := range im.References {
			if _, _, ok := SplitImageReference(r); !ok {
				add(fmt.Sprintf("images.references[%d]", i), "%q is not NAME@sha256:<64 hex digits>", r)
			}
		}
	}
	if nc.NotBefore.IsZero() {
		add("notBefore", "required (the earliest sane clock time)")
	}
	if nc.ReportURL != "" && !strings.HasPrefix(nc.ReportURL, "http://") && !strings.HasPrefix(nc.ReportURL, "https://") {
		add("reportURL", "%q must be an http:// or https:// URL", nc.ReportURL)
	}
	return errors.Join(errs...)
}

// CheckEndpoint checks host:port as kubeadm reads a control-plane endpoint
// (cmd/kubeadm/app/util.ParseHostPort, and net.SplitHostPort for the
// join's discovery): host is a lowercase DNS name (an RFC 1123 subdomain,
// without a final dot), an IPv4 address or a bracketed IPv6 address; port
// is a decimal number from 1 to 65535. kiln is stricter than kubeadm in
// two places: an IPv4 address may not have leading zeros (Go reads none,
// kubeadm reads 010 as 10), nor may a name end in a number, and a DNS
// label is at most 63 characters.
func CheckEndpoint(ep string) error {
	if ep == "" {
		return errors.New("required, as host:port (for example lb.example.net:6443)")
	}
	host, port, err := net.SplitHostPort(ep)
	if err != nil {
		if strings.Count(ep, ":") > 1 && !strings.HasPrefix(ep, "[") {
			return fmt.Errorf("%q: put an IPv6 address in brackets, as [2001:db8::10]:6443", ep)
		}
		return fmt.Errorf("%q is not host:port: add the port, as %s:6443", ep, strings.TrimSuffix(ep, ":"))
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p < 1 {
		return fmt.Errorf("%q: port %q must be a number from 1 to 65535", ep, port)
	}
	if host == "" {
		return fmt.Errorf("%q: host is empty", ep)
	}
	if ip := net.ParseIP(host); ip != nil {
		if ip.IsUnspecified() {
			return fmt.Errorf("%q: %s is not an address nodes can reach", ep, host)
		}
		return nil
	}
	if strings.Contains(host, ":") {
		return fmt.Errorf("%q: %q is not a valid IPv6 address", ep, host)
	}
	if labels := strings.Split(host, "."); allDigits(labels[len(labels)-1]) {
		// No top-level domain is a number: this is an IPv4 address Go
		// does not read (leading zeros, or not four parts), which kubeadm
		// would read as another address than the resolver a node uses.
		return fmt.Errorf("%q: %s is not an IPv4 address (four numbers 0 to 255, without leading zeros) nor a DNS name", ep, host)
	}
	if len(host) > 253 {
		return fmt.Errorf("%q: host name longer than 253 characters", ep)
	}
	if h := strings.TrimSuffix(host, "."); h != host {
		return fmt.Errorf("%q: kubeadm takes no final dot in a host name: use %s", ep, net.JoinHostPort(h, port))
	}
	if lower := strings.ToLower(host); lower != host {
		return fmt.Errorf("%q: kubeadm takes host names in lowercase only (RFC 1123): use %s", ep, net.JoinHostPort(lower, port))
	}
	for _, label := range strings.Split(host, ".") {
		if len(label) > 63 || !dnsLabelRe.MatchString(label) {
			return fmt.Errorf("%q: %q is not a valid DNS name (lowercase letters, digits and '-' between dots, at most 63 between dots)", ep, host)
		}
	}
	return nil
}

func allDigits(s string) bool {
	return s != "" && strings.Trim(s, "0123456789") == ""
}

// MaxNodeName is the longest node name kiln accepts: the node name is also
// the host name, and Linux keeps at most 64 bytes of it.
const MaxNodeName = 63

// CheckDNSName checks a lowercase DNS name (a DNS-1123 subdomain).
func CheckDNSName(name string) error {
	if len(name) > 253 {
		return fmt.Errorf("%q is longer than 253 characters", name)
	}
	for _, label := range strings.Split(name, ".") {
		if len(label) > 63 || !dnsLabelRe.MatchString(label) {
			return fmt.Errorf("%q is not a valid name: use lowercase letters, digits, '-' and '.', at most 63 between dots", name)
		}
	}
	return nil
}

// CheckNodeName checks a node name, which is also the node's host name.
func CheckNodeName(name string) error {
	if err := CheckDNSName(name); err != nil {
		return err
	}
	if len(name) > MaxNodeName {
		return fmt.Errorf("%q is %d characters: a node name is also the host name, at most %d", name, len(name), MaxNodeName)
	}
	return nil
}

// CheckHostnameTemplate checks that a template only uses known variables
// and yields a valid node name for the cluster, whatever the role and MAC.
func CheckHostnameTemplate(t, cluster string) error {
	for _, v := range templateRe.FindAllString(t, -1) {
		switch v {
		case "{cluster}", "{role}", "{mac}":
		default:
			return fmt.Errorf("%q uses unknown variable %s: use {cluster}, {role} or {mac}", t, v)
		}
	}
	// control-plane is the longest role name.
	sample := ExpandHostname(t, cluster, RoleControlPlane, "0a1b2c3d4e5f")
	if err := CheckNodeName(sample); err != nil {
		return fmt.Errorf("%q expands to an invalid node name: %v (shorten the template or the cluster name)", t, err)
	}
	return nil
}

// ExpandHostname fills a hostname template. mac is 12 lowercase hex digits.
func ExpandHostname(t, cluster string, role Role, mac string) string {
	return strings.NewReplacer("{cluster}", cluster, "{role}", string(role), "{mac}", mac).Replace(t)
}

// ParseCACertificate decodes a PEM CA certificate.
func ParseCACertificate(pemText string) (*x509.Certificate, error) {
	block, _ := pem.Decode([]byte(pemText))
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("not a PEM CERTIFICATE block")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse certificate: %w", err)
	}
	if !cert.IsCA {
		return nil, errors.New("certificate is not a CA")
	}
	return cert, nil
}

// CACertHash returns kubeadm's pin for a CA certificate: "sha256:" and the
// hex SHA-256 of its DER SubjectPublicKeyInfo.
func CACertHash(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// within reports whether clean absolute path p is dir or lies in it.
func within(p, dir string) bool {
	return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
}
