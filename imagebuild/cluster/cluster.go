// Package cluster defines the cluster file (cluster.yaml): its types,
// defaults, strict decoding and validation.
package cluster

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
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
}

// Download is one pinned artifact for one arch.
type Download struct {
	Name   string `yaml:"name" json:"name"`
	Arch   string `yaml:"arch" json:"arch"`
	URL    string `yaml:"url" json:"url"`
	SHA512 string `yaml:"sha512" json:"sha512"`
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
	IP   string          `yaml:"ip,omitempty"`
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
	for i := range c.KubeadmPatches {
		if c.KubeadmPatches[i].Type == "" {
			c.KubeadmPatches[i].Type = "strategic"
		}
	}
}

// Parse decodes a cluster file strictly, applies defaults and validates it.
// It does not read Butane snippets (see Load).
func Parse(data []byte) (*Cluster, error) {
	var head struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
	}
	if err := yaml.Unmarshal(data, &head); err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("parse cluster file: %w", err))
	}
	if head.APIVersion != APIVersion || head.Kind != Kind {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("cluster file is apiVersion %q kind %q: expected apiVersion: %s and kind: %s (create one with `kiln init`)",
			head.APIVersion, head.Kind, APIVersion, Kind))
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var c Cluster
	if err := dec.Decode(&c); err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("parse cluster file: %w", err))
	}
	c.SetDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Load reads and validates a cluster file and the Butane files it names.
func Load(path string) (*Cluster, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("no cluster file at %s: create one with `kiln init NAME --endpoint HOST:PORT`, or pass --cluster", path))
		}
		return nil, fault.Wrap(fault.IO, fmt.Errorf("read cluster file: %w", err))
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	dir := filepath.Dir(path)
	for i, p := range c.Butane {
		full := p
		if !filepath.IsAbs(p) {
			full = filepath.Join(dir, p)
		}
		b, err := os.ReadFile(full)
		if err != nil {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("%s: butane[%d]: %w", path, i, err))
		}
		c.Snippets = append(c.Snippets, Snippet{Path: p, Data: b})
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
