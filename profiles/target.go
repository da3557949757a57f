package profiles

import (
	"embed"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

//go:embed target/*.yaml keys/*.asc
var targetFiles embed.FS

// Target describes one kind of disk image kiln bakes: which vendor image
// it starts from, how the node's Ignition config gets into it, and any
// firmware laid over it.
type Target struct {
	Name        string `yaml:"name" json:"name"`
	Description string `yaml:"description" json:"description"`
	// OS names an OS profile (os/*.yaml); the cluster's os.name must match.
	OS string `yaml:"os" json:"os"`
	// Arch is kiln's arch name: amd64 or arm64.
	Arch string `yaml:"arch" json:"arch"`
	// Board is generic, or a single-board computer (rpi4).
	Board    string    `yaml:"board" json:"board"`
	Image    Image     `yaml:"image" json:"image"`
	Inject   Inject    `yaml:"inject" json:"inject"`
	Firmware *Firmware `yaml:"firmware,omitempty" json:"firmware,omitempty"`
	// PXE, if set, says where the network-boot files come from; targets
	// without it cannot be network-booted by kiln.
	PXE *PXE `yaml:"pxe,omitempty" json:"pxe,omitempty"`
}

// PXE lists the vendor's network-boot files. For flatcar-release sources
// each is a URL template like Image.URL, verified like the image (.DIGESTS
// and .sig beside it); for fcos-stream sources the stream's pxe format
// names them, with their sha256.
type PXE struct {
	Kernel    string `yaml:"kernel,omitempty" json:"kernel,omitempty"`
	Initramfs string `yaml:"initramfs,omitempty" json:"initramfs,omitempty"`
	// Stream: the files come from the stream metadata (fcos-stream).
	Stream bool `yaml:"stream,omitempty" json:"stream,omitempty"`
}

// Image sources.
const (
	// SourceFlatcarRelease: a release folder with the image, its .DIGESTS
	// and a detached OpenPGP signature (.sig).
	SourceFlatcarRelease = "flatcar-release"
	// SourceFCOSStream: a Fedora CoreOS stream JSON naming the current
	// release's metal image and its sha256.
	SourceFCOSStream = "fcos-stream"
)

// Image is where the vendor base image comes from. URLs may use {origin}
// (the origin, or a mirror given on the command line), {channel} and
// {version}.
type Image struct {
	Source string `yaml:"source" json:"source"`
	Origin string `yaml:"origin" json:"origin"`
	// URL of the compressed image (flatcar-release).
	URL string `yaml:"url,omitempty" json:"url,omitempty"`
	// VersionURL resolves "current": a version.txt with FLATCAR_VERSION=
	// (flatcar-release).
	VersionURL string `yaml:"versionURL,omitempty" json:"versionURL,omitempty"`
	// SigningKey names embedded OpenPGP keys (keys/NAME.asc) that sign
	// the release's files: Flatcar's image signing key; Fedora's primary
	// keys, which sign Fedora CoreOS artifacts of their Fedora release
	// (keys/README says where each came from).
	SigningKey string `yaml:"signingKey,omitempty" json:"signingKey,omitempty"`
	// StreamURL is the stream metadata (fcos-stream).
	StreamURL string `yaml:"streamURL,omitempty" json:"streamURL,omitempty"`
	// StreamArch is the architecture's name in the stream (fcos-stream).
	StreamArch string `yaml:"streamArch,omitempty" json:"streamArch,omitempty"`
}

// Injection methods.
const (
	// InjectFlatcarOEM writes config.ign at the root of the filesystem
	// labelled OEM (btrfs, or ext4 on releases before 2983).
	InjectFlatcarOEM = "flatcar-oem"
	// InjectFCOSBoot writes ignition/config.ign and ignition.firstboot
	// into the ext4 boot filesystem.
	InjectFCOSBoot = "fcos-boot"
)

// Inject says where the Ignition config goes.
type Inject struct {
	Method string `yaml:"method" json:"method"`
	// Partition is the GPT partition name that holds the filesystem.
	Partition string `yaml:"partition" json:"partition"`
}

// Firmware is an archive unpacked at the root of a FAT partition.
type Firmware struct {
	Name string `yaml:"name" json:"name"`
	URL  string `yaml:"url" json:"url"`
	// SHA256 pins the archive; empty means not pinned (only --firmware
	// FILE works).
	SHA256    string `yaml:"sha256" json:"sha256"`
	Partition string `yaml:"partition" json:"partition"`
	// RequiredFiles must be in the archive (a wrong archive is refused).
	RequiredFiles []string `yaml:"requiredFiles" json:"requiredFiles"`
	// ConfigTxt is written as config.txt when the archive has none.
	ConfigTxt string `yaml:"configTxt" json:"configTxt"`
}

// Expand fills {origin}, {channel} and {version} in a URL template.
func (im Image) Expand(tmpl, origin, channel, version string) string {
	origin = strings.TrimSuffix(strings.ReplaceAll(origin, "{channel}", channel), "/")
	return strings.NewReplacer("{origin}", origin, "{channel}", channel, "{version}", version).Replace(tmpl)
}

// Validate checks a target profile's own consistency. Every problem is
// reported, with its field.
func (t *Target) Validate() error {
	var errs []error
	add := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if t.Name == "" || t.Description == "" {
		add("name and description are required")
	}
	if _, ok := loaded[t.OS]; !ok {
		add("os %q: use one of %s", t.OS, strings.Join(OSNames(), ", "))
	}
	if t.Arch != "amd64" && t.Arch != "arm64" {
		add("arch %q: use amd64 or arm64", t.Arch)
	}
	switch t.Board {
	case "generic":
		if t.Firmware != nil {
			add("firmware: only a board (rpi4) takes firmware")
		}
	case "rpi4":
		if t.Firmware == nil {
			add("firmware: board rpi4 needs its UEFI firmware")
		}
		if t.Arch != "arm64" {
			add("arch: board rpi4 is arm64")
		}
	default:
		add("board %q: use generic or rpi4", t.Board)
	}
	im := t.Image
	checkURL := func(field, v string) {
		if u, err := url.Parse(im.Expand(v, im.Origin, "stable", "1")); err != nil || u.Scheme != "https" || u.Host == "" {
			add("image.%s %q: must be an https URL", field, v)
		}
	}
	checkURL("origin", im.Origin)
	switch im.Source {
	case SourceFlatcarRelease:
		checkURL("url", im.URL)
		checkURL("versionURL", im.VersionURL)
		if _, err := SigningKey(im.SigningKey); err != nil {
			add("image.signingKey: %w", err)
		}
	case SourceFCOSStream:
		checkURL("streamURL", im.StreamURL)
		if _, err := SigningKey(im.SigningKey); err != nil {
			add("image.signingKey: %w", err)
		}
		if im.StreamArch == "" {
			add("image.streamArch: required")
		}
	default:
		add("image.source %q: use %s or %s", im.Source, SourceFlatcarRelease, SourceFCOSStream)
	}
	switch t.Inject.Method {
	case InjectFlatcarOEM:
		if t.OS != "flatcar" {
			add("inject.method %s: only for os flatcar", t.Inject.Method)
		}
	case InjectFCOSBoot:
		if t.OS != "fcos" {
			add("inject.method %s: only for os fcos", t.Inject.Method)
		}
	default:
		add("inject.method %q: use %s or %s", t.Inject.Method, InjectFlatcarOEM, InjectFCOSBoot)
	}
	if p := t.PXE; p != nil {
		switch {
		case t.Board != "generic":
			add("pxe: only generic boards boot from the network")
		case im.Source == SourceFlatcarRelease && !p.Stream:
			checkURL("pxe.kernel", p.Kernel)
			checkURL("pxe.initramfs", p.Initramfs)
		case im.Source == SourceFCOSStream && p.Stream && p.Kernel == "" && p.Initramfs == "":
		default:
			add("pxe: flatcar-release sources give kernel and initramfs URLs; fcos-stream sources set stream: true")
		}
	}
	if t.Inject.Partition == "" {
		add("inject.partition: required (a GPT partition name)")
	}
	if f := t.Firmware; f != nil {
		if u, err := url.Parse(f.URL); err != nil || u.Scheme != "https" {
			add("firmware.url %q: must be an https URL", f.URL)
		}
		if f.SHA256 != "" && !isHex(f.SHA256, 64) {
			add("firmware.sha256: 64 hex digits, or empty when not pinned")
		}
		if f.Name == "" || f.Partition == "" || len(f.RequiredFiles) == 0 || f.ConfigTxt == "" {
			add("firmware: name, partition, requiredFiles and configTxt are required")
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("target profile %s: %w", t.Name, err)
	}
	return nil
}

func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for _, c := range s {
		if !strings.ContainsRune("0123456789abcdef", c) {
			return false
		}
	}
	return true
}

// SigningKey returns an embedded armored OpenPGP public key by name.
func SigningKey(name string) ([]byte, error) {
	if name == "" || strings.ContainsAny(name, "/.") {
		return nil, fmt.Errorf("signing key %q: name an embedded key (keys/NAME.asc)", name)
	}
	k, err := targetFiles.ReadFile("keys/" + name + ".asc")
	if err != nil {
		return nil, fmt.Errorf("signing key %q is not embedded", name)
	}
	return k, nil
}

// UnsupportedTargetError explains why kiln refuses a target outright.
type UnsupportedTargetError struct {
	Name, Reason string
}

func (e *UnsupportedTargetError) Error() string {
	return fmt.Sprintf("target %s is not supported: %s", e.Name, e.Reason)
}

// refusedBoards are boards people ask for that kiln cannot support, keyed
// by the word that names them in a target name.
var refusedBoards = map[string]string{
	"rpi5": "the Raspberry Pi 5 has no UEFI firmware with working Ethernet, so neither Flatcar nor Fedora CoreOS can fetch anything at first boot; use a Raspberry Pi 4 (flatcar-rpi4) or an arm64 UEFI machine (flatcar-arm64, fcos-aarch64)",
}

var targets = mustLoadAll[Target](targetFiles, "target")

func (t *Target) profileName() string { return t.Name }

// TargetNames lists the target profiles.
func TargetNames() []string { return sortedNames(targets) }

// LookupTarget returns a target profile. A board kiln refuses gives an
// *UnsupportedTargetError that says why.
func LookupTarget(name string) (*Target, error) {
	if t, ok := targets[name]; ok {
		return t, nil
	}
	for word, reason := range refusedBoards {
		if strings.Contains(strings.ToLower(name), word) {
			return nil, &UnsupportedTargetError{Name: name, Reason: reason}
		}
	}
	return nil, fmt.Errorf("unknown target profile %q: use one of %s (see kiln profiles)", name, strings.Join(TargetNames(), ", "))
}
