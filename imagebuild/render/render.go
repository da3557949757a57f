// Package render turns a cluster file and its secrets into everything one
// node role needs: its node metadata, kubeadm configuration, Butane and
// Ignition config. Rendering is pure: no network, no clock, and no disk
// but the files a Butane snippet names with local: (read from the cluster
// file's folder, as Butane's --files-dir does); the same inputs give
// byte-identical outputs.
//
// It is the only package that imports the coreos Butane and Ignition
// libraries.
package render

import (
	"errors"
	"fmt"
	"path"
	"slices"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/images"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/manifests"
	"github.com/kilnproject/kiln/profiles"
)

// Arches kiln renders for.
var Arches = []string{"amd64", "arm64"}

// Input is everything a render needs.
type Input struct {
	Cluster *cluster.Cluster
	Secrets *secrets.Secrets
	Role    nodeconfig.Role
	// Arch is amd64 or arm64.
	Arch string
	// NodeName, if set, names an inventory node: its name becomes the
	// hostname and its role must match Role.
	NodeName string
	// Agent is the gzip-compressed kiln-firstboot binary for Arch. Only
	// Butane and Ignition need it.
	Agent []byte
	// ReportURL, if set, receives the agent's status (kiln serve).
	ReportURL string
	// Served, for an air-gapped cluster's network-booted node, is where
	// Ignition fetches its payload; nil: its disk image carries it.
	Served *ServedPayload
}

func (in Input) check() error {
	var errs []error
	if in.Cluster == nil || in.Secrets == nil {
		return errors.New("render: cluster and secrets are required")
	}
	if _, err := nodeconfig.ParseRole(string(in.Role)); err != nil {
		errs = append(errs, fmt.Errorf("role: %w", err))
	}
	if in.Arch != "amd64" && in.Arch != "arm64" {
		errs = append(errs, fmt.Errorf("arch %q: use amd64 or arm64", in.Arch))
	}
	if in.NodeName != "" {
		n, ok := in.Cluster.InventoryNode(in.NodeName)
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("node %q is not in the cluster file's nodes list", in.NodeName))
		case n.Role != in.Role:
			errs = append(errs, fmt.Errorf("node %q has role %s in the cluster file, not %s", in.NodeName, n.Role, in.Role))
		}
	}
	return fault.Wrap(fault.Input, errors.Join(errs...))
}

// NodeConfig renders the role metadata the agent reads.
func NodeConfig(in Input) (*nodeconfig.NodeConfig, error) {
	n, err := renderNode(in)
	if err != nil {
		return nil, err
	}
	return n.nc, nil
}

// node is a role's metadata with the files it names: the init node's
// manifests and a control plane's load-balancer files.
type node struct {
	nc        *nodeconfig.NodeConfig
	manifests []Manifest
	lbFiles   []manifests.File
	// sandbox is an air-gapped node's pod sandbox image, as containerd
	// names it once imported from the payload.
	sandbox string
}

func renderNode(in Input) (*node, error) {
	if err := in.check(); err != nil {
		return nil, err
	}
	c, s := in.Cluster, in.Secrets
	nc := &nodeconfig.NodeConfig{
		APIVersion: nodeconfig.APIVersion,
		Kind:       nodeconfig.Kind,
		Role:       in.Role,
		Cluster: nodeconfig.Cluster{
			Name:                    c.Name,
			ControlPlaneEndpoint:    c.ControlPlaneEndpoint,
			KubernetesVersion:       c.Kubernetes.Version,
			ControlPlanes:           c.Kubernetes.ControlPlanes,
			CACertificate:           string(s.PKI[secrets.CACert]),
			CACertHash:              s.CACertHash(),
			TokenTTL:                *c.Kubernetes.TokenTTL,
			CertificateUploadWindow: *c.Kubernetes.CertificateUploadWindow,
		},
		Hostname: nodeconfig.Hostname{Name: in.NodeName},
		Kubeadm: nodeconfig.Kubeadm{
			JoinConfig:      JoinConfigPath,
			CertificatesDir: CertificatesDir,
		},
		NotBefore:  s.CA().NotBefore,
		ReportURL:  in.ReportURL,
		PodNetwork: c.Network.CNI,
	}
	n := &node{nc: nc}
	var err error
	if nc.LoadBalancer, n.lbFiles, err = loadBalancer(c, in.Role); err != nil {
		return nil, err
	}
	if in.NodeName == "" {
		nc.Hostname.Template = c.Hostname.Template
	}
	if in.Role == nodeconfig.RoleInit {
		nc.Kubeadm.InitConfig = InitConfigPath
		nc.PKIDir = PKIPath
		if n.manifests, err = Manifests(c); err != nil {
			return nil, err
		}
		for _, m := range n.manifests {
			nc.Manifests = append(nc.Manifests, m.Path)
		}
	}
	if c.Airgap {
		if nc.Images, n.sandbox, err = airgapImages(in); err != nil {
			return nil, err
		}
	}
	osp, err := profiles.LookupOS(c.OS.Name)
	if err != nil {
		return nil, err
	}
	// What only the bootstrap needs: kubeadm keeps its own copies
	// (certificates directory, kubelet.conf) of everything a member uses.
	nc.RemoveAfterJoin = []string{JoinConfigPath}
	if in.Role == nodeconfig.RoleInit {
		nc.RemoveAfterJoin = append(nc.RemoveAfterJoin, InitConfigPath, PKIPath)
	}
	nc.RemoveAfterJoin = append(nc.RemoveAfterJoin, osp.FirstBootConfig...)
	if err := nc.Validate(); err != nil {
		return nil, fmt.Errorf("render node metadata: %w", err)
	}
	return n, nil
}

// ImagesArchive is the file name of role's container image archive in an
// air-gapped node's payload.
func ImagesArchive(role nodeconfig.Role) string { return "images-" + string(role) + ".tar" }

// FetchedPayloadDir is where a network-booted air-gapped node keeps the
// payload files Ignition fetched from kiln serve (Input.Served).
const FetchedPayloadDir = "/var/lib/kiln/payload"

// ServedPayload says where a network-booted air-gapped node fetches its
// payload: every file of Payload, by name, under URL (kiln serve), each
// checked by Ignition against its hash.
type ServedPayload struct {
	// URL is the folder the payload files are served from, without a
	// trailing slash.
	URL string
	// ArchiveSHA256 is the hex sha256 of the role's image archive.
	ArchiveSHA256 string
}

// PayloadFile is one file an air-gapped node carries (disk images: in
// its OS's payload folder, profiles.Payload) or fetches (network boot:
// ServedPayload).
type PayloadFile struct {
	// Name is the file's name in the payload.
	Name string
	// Download is the pinned download the file is; nil for the role's
	// container image archive (ImagesArchive).
	Download *cluster.Download
}

// Payload lists the files an air-gapped node of role and arch needs:
// every download its OS needs, then the role's image archive. Every
// download must be pinned.
func Payload(c *cluster.Cluster, role nodeconfig.Role, arch string) ([]PayloadFile, error) {
	osp, err := payloadOS(c)
	if err != nil {
		return nil, err
	}
	var out []PayloadFile
	for _, d := range osp.Downloads {
		pin, err := pinned(c, d.Name, arch)
		if err != nil {
			return nil, err
		}
		out = append(out, PayloadFile{Name: payloadName(osp, d, c, arch), Download: &pin})
	}
	return append(out, PayloadFile{Name: ImagesArchive(role)}), nil
}

// payloadName is a download's file name in the payload.
func payloadName(osp *profiles.OS, d profiles.Download, c *cluster.Cluster, arch string) string {
	return path.Base(d.Expand(d.Path, c.Kubernetes.Version, osp.Arches[arch]))
}

// payloadPath is where the node finds payload file name.
func payloadPath(osp *profiles.OS, in Input, name string) string {
	if in.Served != nil {
		return path.Join(FetchedPayloadDir, name)
	}
	return osp.Payload.NodePath(name)
}

func payloadOS(c *cluster.Cluster) (*profiles.OS, error) {
	osp, err := profiles.LookupOS(c.OS.Name)
	if err != nil {
		return nil, fault.Wrap(fault.Input, err)
	}
	if osp.Payload == nil {
		return nil, fault.Wrap(fault.Unsupported, fmt.Errorf("%s nodes cannot be air-gapped yet", osp.Name))
	}
	return osp, nil
}

// pinned returns the download's pin for arch, or an error naming the fix.
func pinned(c *cluster.Cluster, name, arch string) (cluster.Download, error) {
	pin, ok := c.Pinned(name, arch)
	if !ok || pin.SHA512 == "" {
		return pin, fault.Wrap(fault.Input, fmt.Errorf(
			"kubernetes.downloads: %s for %s is not pinned: run `kiln pin --arch %s` (downloads it once to hash it), or `kiln pin --arch %s --file %s=PATH` with a local copy",
			name, arch, arch, arch, name))
	}
	return pin, nil
}

// airgapImages is the image archive of an air-gapped node (every image
// its role runs, pinned) and the name of the sandbox (pause) image in it.
func airgapImages(in Input) (*nodeconfig.Images, string, error) {
	c := in.Cluster
	list, err := images.List(c)
	if err != nil {
		return nil, "", err
	}
	list = images.ForRole(list, in.Role)
	if err := images.RequirePinned(list); err != nil {
		return nil, "", fmt.Errorf("airgap: %w", err)
	}
	osp, err := payloadOS(c)
	if err != nil {
		return nil, "", err
	}
	im := &nodeconfig.Images{Archive: payloadPath(osp, in, ImagesArchive(in.Role))}
	sandbox := ""
	for _, e := range list {
		for _, name := range e.NodeNames() {
			if ref := name + "@" + e.Digest; !slices.Contains(im.References, ref) {
				im.References = append(im.References, ref)
			}
		}
		if e.Name == manifests.SandboxImage {
			sandbox = e.NodeName()
		}
	}
	if sandbox == "" {
		return nil, "", fmt.Errorf("airgap: kubeadm's image list for %s names no %s image", c.Kubernetes.Version, manifests.SandboxImage)
	}
	return im, sandbox, nil
}
