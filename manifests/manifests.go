// Package manifests holds the Kubernetes manifests kiln installs, embedded:
// the pod network (flannel) that the init node applies after kubeadm init,
// the control-plane endpoint's static pods (keepalived and HAProxy, or
// kube-vip) that every control plane runs, and the one list of container
// images they use, each pinned by digest (images.yaml).
//
// Rendering is pure text templating: no disk, no network.
package manifests

import (
	"bytes"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"text/template"

	"gopkg.in/yaml.v3"
)

//go:embed images.yaml kubeadm-images.yaml flannel.yaml load-balancer/*
var files embed.FS

// Image is one container image kiln's manifests run.
type Image struct {
	// Name is kiln's name for it (flannel, haproxy, ...), the key of the
	// cluster file's images map.
	Name string `yaml:"name" json:"name"`
	// Reference is registry/repository:tag.
	Reference string `yaml:"reference" json:"reference"`
	// Digest is the sha256 digest of the image's multi-arch index, or ""
	// when kiln knows none (the cluster file must pin it).
	Digest string `yaml:"digest" json:"digest"`
	// Source says where the digest was read.
	Source string `yaml:"source" json:"source"`
}

// IsDigest reports whether s is a sha256 digest, sha256:<64 hex digits>.
func IsDigest(s string) bool { return digestRe.MatchString(s) }

// Pinned is the reference with its digest: REF@sha256:HEX.
func (i Image) Pinned() string { return i.Reference + "@" + i.Digest }

var (
	digestRe      = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	images        = mustLoadImages()
	kubeadmImages = mustLoadKubeadmImages()
)

func mustLoadImages() []Image {
	data, err := files.ReadFile("images.yaml")
	if err != nil {
		panic(err)
	}
	var doc struct {
		Images []Image `yaml:"images"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&doc); err != nil {
		panic(fmt.Sprintf("manifests/images.yaml: %v", err))
	}
	for _, im := range doc.Images {
		if im.Name == "" || im.Reference == "" || (im.Digest != "" && !digestRe.MatchString(im.Digest)) {
			panic(fmt.Sprintf("manifests/images.yaml: bad entry %+v", im))
		}
	}
	return doc.Images
}

// KubeadmRelease is one row of kubeadm-images.yaml: the tags of the images
// kubeadm deploys for one Kubernetes minor.
type KubeadmRelease struct {
	Minor int `yaml:"minor"`
	// Kubeadm is the kubeadm release the tags were read from.
	Kubeadm string `yaml:"kubeadm"`
	Etcd    string `yaml:"etcd"`
	CoreDNS string `yaml:"coredns"`
	Pause   string `yaml:"pause"`
}

type kubeadmImageList struct {
	Repository string           `yaml:"repository"`
	Minors     []KubeadmRelease `yaml:"minors"`
}

// SandboxImage is the name of the pod sandbox (pause) image among
// KubeadmImageNames: the one containerd's CRI must run for pods.
const SandboxImage = "pause"

// KubeadmImageNames are the names of the images kubeadm deploys, in the
// order `kubeadm config images list` prints them.
var KubeadmImageNames = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "coredns", SandboxImage, "etcd"}

func mustLoadKubeadmImages() kubeadmImageList {
	data, err := files.ReadFile("kubeadm-images.yaml")
	if err != nil {
		panic(err)
	}
	var l kubeadmImageList
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&l); err != nil || l.Repository == "" {
		panic(fmt.Sprintf("manifests/kubeadm-images.yaml: %v", err))
	}
	return l
}

// KubeadmImages returns the images kubeadm of version's minor deploys
// (registry.k8s.io/...), in KubeadmImageNames' order, with no digests (see
// kubeadm-images.yaml). version is vMAJOR.MINOR.PATCH.
func KubeadmImages(version string) ([]Image, error) {
	var minor int
	if _, err := fmt.Sscanf(version, "v1.%d.", &minor); err != nil {
		return nil, fmt.Errorf("kubernetes version %q is not v1.MINOR.PATCH", version)
	}
	for _, r := range kubeadmImages.Minors {
		if r.Minor != minor {
			continue
		}
		repo := kubeadmImages.Repository
		tags := map[string]string{"coredns": r.CoreDNS, "pause": r.Pause, "etcd": r.Etcd}
		out := make([]Image, 0, len(KubeadmImageNames))
		for _, name := range KubeadmImageNames {
			tag, ok := tags[name]
			if !ok {
				tag = version
			}
			path := name
			if name == "coredns" {
				path = "coredns/coredns"
			}
			out = append(out, Image{Name: name, Reference: repo + "/" + path + ":" + tag, Source: "kubeadm " + r.Kubeadm + " (tags), digest not known to kiln"})
		}
		return out, nil
	}
	return nil, fmt.Errorf("kiln knows no images for Kubernetes %s (minor %d)", version, minor)
}

// Images returns kiln's default image pins, in the file's order.
func Images() []Image { return slices.Clone(images) }

// ImageNames lists the names the cluster file's images map may use.
func ImageNames() []string {
	out := make([]string, len(images))
	for i, im := range images {
		out[i] = im.Name
	}
	return out
}

// ParsePinned splits REF@sha256:HEX. The reference must name a tag or a
// repository; the digest must be a sha256 digest.
func ParsePinned(s string) (Image, error) {
	ref, digest, ok := strings.Cut(s, "@")
	if !ok || ref == "" || !digestRe.MatchString(digest) {
		return Image{}, fmt.Errorf("%q is not pinned by digest: write REFERENCE@sha256:<64 hex digits> (the digest of the image's index, as `crane digest REF` or `skopeo inspect` print it)", s)
	}
	if strings.ContainsAny(ref, " \t\n") {
		return Image{}, fmt.Errorf("%q: the reference has white space", s)
	}
	return Image{Reference: ref, Digest: digest}, nil
}

// Resolve returns the pinned reference of image name: the cluster file's
// override if it has one (already checked by ParsePinned), else kiln's
// default. An image kiln has no digest for must be overridden.
func Resolve(name string, overrides map[string]string) (string, error) {
	if o, ok := overrides[name]; ok {
		return o, nil
	}
	for _, im := range images {
		if im.Name != name {
			continue
		}
		if im.Digest == "" {
			return "", fmt.Errorf("images.%s: kiln has no default digest for %s (%s): pin one in the cluster file, as images: {%s: REFERENCE@sha256:...} (kiln init: --image %s=REFERENCE@sha256:...)", name, name, im.Source, name, name)
		}
		return im.Pinned(), nil
	}
	return "", fmt.Errorf("no image named %q", name)
}

func execute(name string, data any) ([]byte, error) {
	text, err := files.ReadFile(name)
	if err != nil {
		return nil, err
	}
	t, err := template.New(name).Option("missingkey=error").Parse(string(text))
	if err != nil {
		return nil, fmt.Errorf("template %s: %w", name, err)
	}
	var buf bytes.Buffer
	if err := t.Execute(&buf, data); err != nil {
		return nil, fmt.Errorf("template %s: %w", name, err)
	}
	return buf.Bytes(), nil
}

// Flannel renders the flannel manifest for a pod subnet: one CIDR, or an
// IPv4 and an IPv6 CIDR separated by a comma (dual stack). Flannel's VXLAN
// backend carries IPv4, IPv6 and both (flannel's net-conf fields
// Network, IPv6Network, EnableIPv4, EnableIPv6).
func Flannel(podSubnet string, overrides map[string]string) ([]byte, error) {
	conf := map[string]any{"Backend": map[string]string{"Type": "vxlan"}}
	for _, part := range strings.Split(podSubnet, ",") {
		p, err := netip.ParsePrefix(strings.TrimSpace(part))
		if err != nil {
			return nil, fmt.Errorf("pod subnet %q: %w", podSubnet, err)
		}
		if p.Addr().Is4() {
			conf["Network"] = p.String()
		} else {
			conf["IPv6Network"] = p.String()
			conf["EnableIPv6"] = true
		}
	}
	if _, ok := conf["Network"]; !ok {
		conf["EnableIPv4"] = false
	}
	netConf, err := json.Marshal(conf)
	if err != nil {
		return nil, err
	}
	image, err := Resolve("flannel", overrides)
	if err != nil {
		return nil, err
	}
	plugin, err := Resolve("flannel-cni-plugin", overrides)
	if err != nil {
		return nil, err
	}
	return execute("flannel.yaml", map[string]string{"NetConf": string(netConf), "Image": image, "PluginImage": plugin})
}

// Backend is one API server behind HAProxy.
type Backend struct {
	Name    string
	Address netip.AddrPort
}

// LoadBalancer describes the control-plane endpoint's static pods.
type LoadBalancer struct {
	// VIP is the virtual IP that controlPlaneEndpoint names.
	VIP netip.Addr
	// VIPBits is the prefix length the VIP is added with (32 or 128).
	VIPBits int
	// Port is the endpoint's port: HAProxy's (keepalived-haproxy) or the
	// API servers' (kube-vip).
	Port int
	// Interface is the network interface that holds the VIP, or a token
	// the agent replaces with the one it finds (see nodeconfig).
	Interface string
	// RouterID is the VRRP virtual router ID (1-255), unique per LAN.
	RouterID int
	// RouterName names the VRRP instance (the cluster name).
	RouterName string
	// AdvertInterval is VRRP's advertisement interval in seconds; a
	// backup takes over after about 3 intervals without one.
	AdvertInterval int
	// Backends are the API servers HAProxy balances to.
	Backends []Backend
	// Overrides are the cluster file's image pins.
	Overrides map[string]string
}

// File is one rendered file: its name and content.
type File struct {
	Name string
	Data []byte
}

// ConfigDir is where a node keeps the load balancer's files; the static
// pods mount their configuration from there.
const ConfigDir = "/etc/kiln/load-balancer"

// KeepalivedHAProxy renders keepalived and HAProxy, as kubeadm's high
// availability guide runs them: keepalived.conf, haproxy.cfg and their two
// static pods (the pods last).
func KeepalivedHAProxy(lb LoadBalancer) ([]File, error) {
	if len(lb.Backends) == 0 {
		return nil, errors.New("keepalived-haproxy: no API server addresses")
	}
	keepalivedImage, err := Resolve("keepalived", lb.Overrides)
	if err != nil {
		return nil, err
	}
	haproxyImage, err := Resolve("haproxy", lb.Overrides)
	if err != nil {
		return nil, err
	}
	data := map[string]any{
		"VIP": lb.VIP, "VIPBits": lb.VIPBits, "Port": lb.Port, "Interface": lb.Interface,
		"RouterID": lb.RouterID, "RouterName": lb.RouterName, "AdvertInterval": lb.AdvertInterval,
		"IPv6": lb.VIP.Is6(),
		// Enough to put a failing holder below every healthy node.
		"CheckWeight": 50,
		"Backends":    lb.Backends,
	}
	var out []File
	for _, f := range []struct{ tmpl, name string }{
		{"load-balancer/keepalived.conf", "keepalived.conf"},
		{"load-balancer/haproxy.cfg", "haproxy.cfg"},
	} {
		b, err := execute(f.tmpl, data)
		if err != nil {
			return nil, err
		}
		out = append(out, File{f.name, b})
	}
	for _, p := range []struct{ tmpl, image, config string }{
		{"load-balancer/keepalived.yaml", keepalivedImage, "keepalived.conf"},
		{"load-balancer/haproxy.yaml", haproxyImage, "haproxy.cfg"},
	} {
		b, err := execute(p.tmpl, map[string]any{"Image": p.image, "Port": lb.Port, "ConfigPath": ConfigDir + "/" + p.config})
		if err != nil {
			return nil, err
		}
		out = append(out, File{strings.TrimPrefix(p.tmpl, "load-balancer/"), b})
	}
	return out, nil
}

// Kubeconfigs kube-vip starts with. On the node that runs kubeadm init,
// admin.conf has no rights until init has bound its group (Kubernetes
// >= 1.29), so kube-vip starts with super-admin.conf there and the agent
// switches it to admin.conf after init.
const (
	AdminKubeconfig      = "/etc/kubernetes/admin.conf"
	SuperAdminKubeconfig = "/etc/kubernetes/super-admin.conf"
)

// KubeVIP renders kube-vip's static pod in ARP mode with leader election,
// using the given kubeconfig.
func KubeVIP(lb LoadBalancer, kubeconfig string) ([]File, error) {
	image, err := Resolve("kube-vip", lb.Overrides)
	if err != nil {
		return nil, err
	}
	b, err := execute("load-balancer/kube-vip.yaml", map[string]any{
		"Image": image, "Port": lb.Port, "Interface": lb.Interface, "VIP": lb.VIP, "VIPBits": lb.VIPBits,
		"Kubeconfig": kubeconfig,
		// Seconds; kube-vip's documented defaults.
		"LeaseDuration": 5, "RenewDeadline": 3, "RetryPeriod": 1,
	})
	if err != nil {
		return nil, err
	}
	return []File{{"kube-vip.yaml", b}}, nil
}
