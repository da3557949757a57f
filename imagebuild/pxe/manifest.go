// Package pxe builds network-boot bundles: per node, its Ignition config
// and an iPXE script; the OS's PXE kernel and initramfs; an offline
// variant whose config travels as an extra initramfs; and an export in
// matchbox's format. bundle.json (the Manifest) is what kiln serve reads.
package pxe

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/fault"
)

// ManifestFile is the bundle's index, in the bundle's root (mode 0600: it
// holds the per-node tokens).
const ManifestFile = "bundle.json"

// FormatVersion is the manifest format this kiln writes and reads.
const FormatVersion = 1

// Boot modes.
const (
	// ModeLive runs the node from RAM: nothing survives a reboot.
	ModeLive = "live"
	// ModeInstall boots an installer that writes the OS and the node's
	// config to a disk, then reboots into it.
	ModeInstall = "install"
)

// URL paths kiln serve answers (relative to Manifest.ServerURL).
const (
	// EntryPath is the script DHCP points iPXE at; it chains to
	// ScriptPath with the booting NIC's MAC.
	EntryPath = "/boot.ipxe"
	// ScriptPath?mac=MAC returns that node's script.
	ScriptPath = "/ipxe"
	// ConfigPath/NAME?mac=MAC&token=TOKEN returns the node's config.
	ConfigPath = "/config/"
	// AssetPath/FILE serves kernels and initramfs images.
	AssetPath = "/assets/"
	// ReportPath/NAME?key=KEY receives the agent's status (POST).
	ReportPath = "/report/"
	// StatusPath lists every node's last status (GET, bearer token).
	StatusPath = "/status"
	// ArmPath/NAME[?mac=MAC] re-arms a node (POST, bearer token): its
	// config is served once more and, with its MAC or for an inventory
	// node, an installed machine boots its installer again.
	ArmPath = "/arm/"
)

// Manifest is bundle.json.
type Manifest struct {
	Format  int    `json:"format"`
	Cluster string `json:"cluster"`
	// Profile is the target profile the bundle boots (flatcar-amd64...).
	Profile   string `json:"profile"`
	OS        string `json:"os"`
	Arch      string `json:"arch"`
	OSVersion string `json:"osVersion"`
	// ServerURL is where nodes reach kiln serve (http://HOST:PORT).
	ServerURL string `json:"serverURL"`
	// KernelArgs start every node's first boot (the OS's, then the
	// operator's); the config URL and initrd= arguments are added per node.
	KernelArgs []string `json:"kernelArgs"`
	// RootfsArg names the kernel argument for the live rootfs URL (Fedora
	// CoreOS), if the OS has one.
	RootfsArg string `json:"rootfsArg,omitempty"`
	// StatusToken is the operator's bearer token: it guards StatusPath
	// (every node's state) and ArmPath (re-arming a node's keys).
	StatusToken string  `json:"statusToken"`
	Assets      []Asset `json:"assets"`
	Nodes       []Node  `json:"nodes"`
}

// Asset kinds.
const (
	AssetKernel    = "kernel"
	AssetInitramfs = "initramfs"
	// AssetRootfs is Fedora CoreOS's live root filesystem.
	AssetRootfs = "rootfs"
	// AssetPayload is a file an air-gapped node fetches (the Kubernetes
	// binaries, its role's image archive), under PayloadDir.
	AssetPayload = "payload"
	// AssetInstallImage and AssetInstallSignature are the OS image an
	// air-gapped install-mode node writes to its disk and its detached
	// signature, under InstallDir/VERSION/.
	AssetInstallImage     = "install-image"
	AssetInstallSignature = "install-signature"
)

// Asset is a file every node boots: kernel, initramfs, rootfs.
type Asset struct {
	Kind string `json:"kind"`
	// File is the path under assets/ (also its URL under AssetPath).
	File   string `json:"file"`
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
}

// Node is one bootable entry: an inventory node, or a role default for
// machines the inventory does not list.
type Node struct {
	Name string          `json:"name"`
	Role nodeconfig.Role `json:"role"`
	// MAC binds the node to one NIC (lower case, colon separated); empty
	// for pool slots (inventory nodes without a MAC) and role defaults.
	MAC string `json:"mac,omitempty"`
	// Default marks a role default: its hostname comes from the cluster's
	// template, and kiln serve may hand it to many machines (init: one).
	Default bool   `json:"default,omitempty"`
	Mode    string `json:"mode"`
	// Disk is the install target (install mode).
	Disk string `json:"disk,omitempty"`
	// Token must accompany every request for the node's config.
	Token string `json:"token"`
	// ReportKey authenticates the agent's status reports.
	ReportKey string `json:"reportKey"`
	// Config is the path of the config served at ConfigPath/NAME: the
	// node's own config (live), or the installer's config holding it
	// (install).
	Config string `json:"config"`
}

// PayloadDir is the folder of the bundle's asset set that holds an
// air-gapped cluster's payload (AssetPayload).
const PayloadDir = "payload"

// InstallDir is the folder of the bundle's asset set that mirrors the OS
// release for installers (profiles.PXEBoot.InstallFrom).
const InstallDir = "install"

// Asset returns the asset of a kind, if the bundle has it.
func (m *Manifest) Asset(kind string) (Asset, bool) {
	for _, a := range m.Assets {
		if a.Kind == kind {
			return a, true
		}
	}
	return Asset{}, false
}

// Node returns the entry with the given name.
func (m *Manifest) Node(name string) (*Node, bool) {
	for i := range m.Nodes {
		if m.Nodes[i].Name == name {
			return &m.Nodes[i], true
		}
	}
	return nil, false
}

// NodeByMAC returns the entry bound to a MAC in the manifest.
func (m *Manifest) NodeByMAC(mac string) (*Node, bool) {
	for i := range m.Nodes {
		if m.Nodes[i].MAC != "" && m.Nodes[i].MAC == mac {
			return &m.Nodes[i], true
		}
	}
	return nil, false
}

// NormalizeMAC accepts a MAC as iPXE and people write it (52:54:00:ab:cd:ef,
// 52-54-00-AB-CD-EF) and returns it lower case with colons.
func NormalizeMAC(s string) (string, error) {
	hw, err := net.ParseMAC(strings.ReplaceAll(s, "-", ":"))
	if err != nil || len(hw) != 6 {
		return "", fmt.Errorf("MAC %q: use six hex pairs like 52:54:00:12:34:56", s)
	}
	return hw.String(), nil
}

// ReadManifest reads and checks a bundle's manifest.
func ReadManifest(dir string) (*Manifest, error) {
	p := filepath.Join(dir, ManifestFile)
	data, err := os.ReadFile(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("%s is not a kiln PXE bundle (no %s): make one with kiln pxe --dest %s", dir, ManifestFile, dir))
		}
		return nil, fault.Wrap(fault.IO, err)
	}
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("%s: %w", p, err))
	}
	if m.Format != FormatVersion {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("%s: format %d, this kiln reads format %d: rebuild the bundle with this kiln's kiln pxe", p, m.Format, FormatVersion))
	}
	if err := m.check(dir); err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("%s: %w", p, err))
	}
	return &m, nil
}

// check validates what a server relies on: names are safe path elements,
// MACs are unique and normalized, files stay inside the bundle.
func (m *Manifest) check(dir string) error {
	var errs []error
	add := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	inside := func(field, rel string) {
		if !filepath.IsLocal(rel) {
			add("%s %q must be a path inside the bundle", field, rel)
			return
		}
		if _, err := os.Stat(filepath.Join(dir, rel)); err != nil {
			add("%s: %v (the bundle is incomplete: rebuild it)", field, err)
		}
	}
	if m.ServerURL == "" || m.StatusToken == "" {
		add("serverURL and statusToken are required")
	}
	for i, a := range m.Assets {
		inside(fmt.Sprintf("assets[%d].file", i), filepath.Join("assets", a.File))
	}
	if _, ok := m.Asset(AssetKernel); !ok {
		add("no kernel asset")
	}
	names, macs := map[string]bool{}, map[string]bool{}
	for i, n := range m.Nodes {
		f := fmt.Sprintf("nodes[%d]", i)
		if err := nodeconfig.CheckNodeName(n.Name); err != nil || names[n.Name] {
			add("%s.name %q: must be a unique DNS label", f, n.Name)
		}
		names[n.Name] = true
		if n.MAC != "" {
			if norm, err := NormalizeMAC(n.MAC); err != nil || norm != n.MAC || macs[n.MAC] {
				add("%s.mac %q: must be a unique, normalized MAC", f, n.MAC)
			}
			macs[n.MAC] = true
		}
		if n.Token == "" || n.ReportKey == "" {
			add("%s: token and reportKey are required", f)
		}
		if n.Mode != ModeLive && n.Mode != ModeInstall {
			add("%s.mode %q: use %s or %s", f, n.Mode, ModeLive, ModeInstall)
		}
		inside(f+".config", n.Config)
	}
	return errors.Join(errs...)
}
