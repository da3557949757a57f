// Package profiles holds kiln's target data as embedded YAML, with its Go
// types: one file per operating system under os/.
package profiles

import (
	"embed"
	"errors"
	"fmt"
	"path"
	"regexp"
	"slices"
	"strings"
)

//go:embed os/*.yaml
var osFiles embed.FS

// OS describes how kiln provisions Kubernetes on one operating system.
type OS struct {
	Name        string `yaml:"name"`
	Description string `yaml:"description"`
	Butane      struct {
		Variant string `yaml:"variant"`
		Version string `yaml:"version"`
	} `yaml:"butane"`
	Channels []string `yaml:"channels"`
	// VersionPattern matches a pinned OS version ("current" is also accepted).
	VersionPattern string `yaml:"versionPattern"`
	// AgentPath is where the kiln-firstboot binary is installed.
	AgentPath string `yaml:"agentPath"`
	// CRISocket is the container runtime endpoint kubeadm uses.
	CRISocket string `yaml:"criSocket"`
	// VolumePluginDir is a writable directory for kubelet volume plugins.
	VolumePluginDir string `yaml:"volumePluginDir"`
	// EnableUnits are OS-provided systemd units to enable.
	EnableUnits []string `yaml:"enableUnits"`
	// KubeletUnit: kiln must write the kubelet unit (the OS has none).
	KubeletUnit bool `yaml:"kubeletUnit"`
	// Links are symlinks kiln creates, e.g. to enable a unit that only
	// appears once a system extension is merged (a preset set by Ignition
	// is applied before that).
	Links []Link `yaml:"links,omitempty"`
	// Arches maps kiln's arch names (amd64, arm64) to the name the
	// download URLs use.
	Arches map[string]string `yaml:"arches"`
	// Downloads are the Kubernetes artifacts Ignition fetches.
	Downloads []Download `yaml:"downloads"`
	// Containerd says where kiln's containerd configuration goes.
	Containerd Containerd `yaml:"containerd"`
	// PXE says how the OS boots from the network.
	PXE PXEBoot `yaml:"pxe"`
	// Payload, if set, is where an air-gapped node's disk image carries
	// its downloads and container images; nil: the OS cannot carry them.
	Payload *Payload `yaml:"payload,omitempty"`
	// Network is how the booted OS configures its network, and so what
	// kiln writes for a node's static network: networkd
	// (systemd-networkd .network files) or networkmanager (keyfiles).
	Network string `yaml:"network"`
	// FirstBootConfig lists where the running OS keeps the copy of the
	// Ignition config it read on first boot (every secret of the node),
	// if it keeps one: the agent removes them once the node joined.
	FirstBootConfig []string `yaml:"firstBootConfig,omitempty"`

	versionRe *regexp.Regexp
}

// Ways an OS configures its network (OS.Network).
const (
	NetworkNetworkd       = "networkd"
	NetworkNetworkManager = "networkmanager"
)

// Containerd is how kiln configures an OS's containerd. kiln's
// configuration (replacing the OS's) sets the runc cgroup driver matching
// the kubelet's cgroupDriver and the CNI folders, and on an air-gapped node
// the pinned sandbox (pause) image and no registry.
type Containerd struct {
	// Config is the file containerd reads once kiln has written it.
	Config string `yaml:"config"`
	// Always: the OS's own configuration does not fit the kubelet, so
	// every node gets kiln's. Otherwise only air-gapped nodes do.
	Always bool `yaml:"always,omitempty"`
	// DropIn, if set, is a containerd.service drop-in that makes
	// containerd read Config (for an OS whose unit names another file);
	// enableUnits must then name containerd.service.
	DropIn string `yaml:"dropIn,omitempty"`
}

// Download is one pinned artifact. URL and Path may use {version} (the
// artifact's Version, else the Kubernetes version, "v1.37.2") and {arch}
// (the OS's arch name).
type Download struct {
	Name string `yaml:"name"`
	// Version, if set, is the artifact's own release (the CNI plugins
	// follow their own), else it follows kubernetes.version.
	Version string `yaml:"version,omitempty"`
	URL     string `yaml:"url"`
	Path    string `yaml:"path"`
	Mode    int    `yaml:"mode"`
	// Link, if set, is a symlink created to Path.
	Link string `yaml:"link,omitempty"`
	// ExtractTo, if set: the file at Path is a gzip'd tar archive that a
	// unit unpacks into this folder on every boot, before containerd and
	// the kubelet start.
	ExtractTo string `yaml:"extractTo,omitempty"`
}

// Payload places an air-gapped node's files in the partition that kiln
// writes the Ignition config to (the target's inject partition).
type Payload struct {
	// Dir is the folder in that partition.
	Dir string `yaml:"dir"`
	// Mount is where the running node mounts that partition.
	Mount string `yaml:"mount"`
}

// NodePath is where the node sees the payload file name.
func (p *Payload) NodePath(name string) string { return path.Join(p.Mount, p.Dir, name) }

// PXEBoot is how the OS's live PXE system is started and installed.
type PXEBoot struct {
	// KernelArgs start a first boot; the config URL is added as
	// ignition.config.url.
	KernelArgs []string `yaml:"kernelArgs"`
	// RootfsArg, if set, names the kernel argument that gives the live
	// root filesystem's URL (Fedora CoreOS); offline, the rootfs is
	// appended as an initramfs instead.
	RootfsArg string `yaml:"rootfsArg,omitempty"`
	// InitrdConfig is where the live system looks for its config inside
	// an appended initramfs (the offline variant).
	InitrdConfig string `yaml:"initrdConfig"`
	// Install is the command that writes the OS and a config to a disk.
	// It may use {disk}, {config}, {channel} and {version}.
	Install []string `yaml:"install"`
	// InstallFrom, if set, are arguments added to Install to take the OS
	// image from a mirror at {baseurl} (kiln serve) instead of the
	// vendor's servers; the mirror serves {baseurl}/{version}/IMAGE and
	// IMAGE.sig, IMAGE the release's image file.
	InstallFrom []string `yaml:"installFrom,omitempty"`
}

// Link is a symbolic link at Path pointing to Target.
type Link struct {
	Path   string `yaml:"path"`
	Target string `yaml:"target"`
}

// Expand fills {version} (the download's Version, else
// kubernetesVersion) and {arch} in s.
func (d Download) Expand(s, kubernetesVersion, arch string) string {
	v := d.Version
	if v == "" {
		v = kubernetesVersion
	}
	return strings.NewReplacer("{version}", v, "{arch}", arch).Replace(s)
}

// ValidVersion reports whether v is a pinned version of this OS or "current".
func (o *OS) ValidVersion(v string) bool {
	return v == "current" || o.versionRe.MatchString(v)
}

// HasChannel reports whether c is one of the OS's release channels.
func (o *OS) HasChannel(c string) bool {
	return slices.Contains(o.Channels, c)
}

// Download returns the artifact with the given name.
func (o *OS) Download(name string) (Download, bool) {
	for _, d := range o.Downloads {
		if d.Name == name {
			return d, true
		}
	}
	return Download{}, false
}

// Validate checks a profile's own consistency.
func (o *OS) Validate() error {
	var errs []error
	if o.Name == "" || o.Butane.Variant == "" || o.Butane.Version == "" {
		errs = append(errs, errors.New("name, butane.variant and butane.version are required"))
	}
	if len(o.Channels) == 0 {
		errs = append(errs, errors.New("channels: at least one"))
	}
	re, err := regexp.Compile(o.VersionPattern)
	if err != nil {
		errs = append(errs, fmt.Errorf("versionPattern: %w", err))
	}
	o.versionRe = re
	if !path.IsAbs(o.AgentPath) {
		errs = append(errs, fmt.Errorf("agentPath %q: must be absolute", o.AgentPath))
	}
	for _, f := range o.FirstBootConfig {
		if !path.IsAbs(f) || path.Clean(f) != f {
			errs = append(errs, fmt.Errorf("firstBootConfig %q: must be a clean absolute path", f))
		}
	}
	if o.CRISocket == "" || o.VolumePluginDir == "" {
		errs = append(errs, errors.New("criSocket and volumePluginDir are required"))
	}
	for _, a := range []string{"amd64", "arm64"} {
		if o.Arches[a] == "" {
			errs = append(errs, fmt.Errorf("arches.%s: required", a))
		}
	}
	if _, ok := o.Download("kubelet"); o.KubeletUnit && !ok {
		errs = append(errs, errors.New("kubeletUnit needs a download named kubelet"))
	}
	if o.Network != NetworkNetworkd && o.Network != NetworkNetworkManager {
		errs = append(errs, fmt.Errorf("network %q: use %s or %s", o.Network, NetworkNetworkd, NetworkNetworkManager))
	}
	if !path.IsAbs(o.Containerd.Config) {
		errs = append(errs, fmt.Errorf("containerd.config %q: must be absolute", o.Containerd.Config))
	}
	if o.Containerd.DropIn != "" && !slices.Contains(o.EnableUnits, "containerd.service") {
		errs = append(errs, errors.New("containerd.dropIn: enableUnits must name containerd.service, which carries it"))
	}
	for i, l := range o.Links {
		if !path.IsAbs(l.Path) || !path.IsAbs(l.Target) {
			errs = append(errs, fmt.Errorf("links[%d]: path and target must be absolute", i))
		}
	}
	if len(o.PXE.KernelArgs) == 0 || o.PXE.InitrdConfig == "" || path.IsAbs(o.PXE.InitrdConfig) || len(o.PXE.Install) == 0 || !path.IsAbs(o.PXE.Install[0]) {
		errs = append(errs, errors.New("pxe: kernelArgs, a relative initrdConfig and an install command with an absolute path are required"))
	}
	if len(o.Downloads) == 0 {
		errs = append(errs, errors.New("downloads: at least one (the Kubernetes binaries)"))
	}
	for i, d := range o.Downloads {
		if d.Name == "" || !strings.HasPrefix(d.URL, "https://") || !path.IsAbs(d.Path) || d.Mode == 0 {
			errs = append(errs, fmt.Errorf("downloads[%d]: name, an https url, an absolute path and a mode are required", i))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("OS profile %s: %w", o.Name, err)
	}
	return nil
}

var loaded = mustLoadAll[OS](osFiles, "os")

func (o *OS) profileName() string { return o.Name }

// OSNames lists the supported operating systems.
func OSNames() []string { return sortedNames(loaded) }

// LookupOS returns the profile of an operating system.
func LookupOS(name string) (*OS, error) {
	if o, ok := loaded[name]; ok {
		return o, nil
	}
	return nil, fmt.Errorf("unknown OS %q: use one of %s", name, strings.Join(OSNames(), ", "))
}
