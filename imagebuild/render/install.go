package render

import (
	"bytes"
	"fmt"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/profiles"
)

// InstallConfigPath is where the installer's live system keeps the node's
// own config until the install command copies it to the disk.
const InstallConfigPath = "/var/lib/kiln-install/config.ign"

// InstallUnit runs the install.
const InstallUnit = "kiln-install.service"

// InstallReportPath is the installer's script that tells kiln serve the
// machine is installed.
const InstallReportPath = "/var/lib/kiln-install/report"

// installReport POSTs "installed" to the done URL (%s), naming the MAC the
// machine booted with: it is in the config URL on the kernel command line
// (the first argument replaces /proc/cmdline), absent when booted offline.
// The URL carries the node's report key, so it reaches curl as a config
// file on stdin (printf is the shell's own), never as an argument that
// every process can read in /proc/PID/cmdline.
const installReport = `#!/bin/sh
# kiln: tell kiln serve this machine is installed.
mac=$(sed -n 's/.*ignition\.config\.url=[^ ]*[?&]mac=\([0-9A-Fa-f:-]*\).*/\1/p' "${1:-/proc/cmdline}")
printf 'url = "%%s"\n' "%s${mac:+&mac=$mac}" |
	curl -fsS --retry 5 --max-time 10 -H 'Content-Type: application/json' \
		--data '{"phase":"installed","state":"done"}' --config -
`

// InstallInput is what an installer config needs.
type InstallInput struct {
	Cluster *cluster.Cluster
	// Config is the node's own Ignition config (from Ignition).
	Config []byte
	// Disk is the device the OS is written to (/dev/sda,
	// /dev/disk/by-id/...).
	Disk string
	// Version is the OS release to install (empty: the cluster's
	// os.version).
	Version string
	// DoneURL, if set, receives a status POST once the OS is on the disk
	// (kiln serve then sends the node to its disk on the next boot).
	DoneURL string
	// ImageURL, if set, is the mirror the OS image is installed from
	// (profiles.PXEBoot.InstallFrom), not the vendor's servers.
	ImageURL string
}

// Installer renders the Ignition config of a network-booted live system
// that writes the OS to in.Disk with the node's own config (carried
// inside, mode 0600), reports, and reboots into it. It carries no agent
// and joins nothing itself.
func Installer(in InstallInput) ([]byte, error) {
	c := in.Cluster
	osp, err := profiles.LookupOS(c.OS.Name)
	if err != nil {
		return nil, err
	}
	if err := cluster.CheckDisk(in.Disk); err != nil {
		return nil, err
	}
	doc := &butaneDoc{Variant: osp.Butane.Variant, Version: osp.Butane.Version}
	if len(c.SSH.AuthorizedKeys) > 0 {
		doc.Passwd = &butanePasswd{Users: []butaneUser{{Name: "core", SSHAuthorizedKeys: c.SSH.AuthorizedKeys}}}
	}
	doc.Storage.Directories = []butaneDir{{Path: "/var/lib/kiln-install", Mode: 0o700}}
	doc.Storage.Files = []butaneFile{{Path: InstallConfigPath, Mode: 0o600, Contents: butaneContents{Inline: string(in.Config)}}}
	cmd := make([]string, len(osp.PXE.Install))
	version := in.Version
	if version == "" {
		version = c.OS.Version
	}
	r := strings.NewReplacer("{disk}", in.Disk, "{config}", InstallConfigPath, "{channel}", c.OS.Channel, "{version}", version, "{baseurl}", in.ImageURL)
	for i, a := range osp.PXE.Install {
		cmd[i] = r.Replace(a)
	}
	if in.ImageURL != "" {
		if len(osp.PXE.InstallFrom) == 0 {
			return nil, fault.Wrap(fault.Unsupported, fmt.Errorf("%s's installer cannot install from kiln serve", osp.Name))
		}
		if strings.ContainsAny(in.ImageURL, "\"$`\\ \n%") {
			return nil, fmt.Errorf("install image URL %q: must not need quoting", in.ImageURL)
		}
		for _, a := range osp.PXE.InstallFrom {
			cmd = append(cmd, r.Replace(a))
		}
	}
	unit := fmt.Sprintf(`[Unit]
Description=kiln: write %s and this node's config to %s, then reboot into it
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=%s
`, osp.Description, in.Disk, strings.Join(cmd, " "))
	if in.DoneURL != "" {
		if strings.ContainsAny(in.DoneURL, "\"$`\\ \n") {
			return nil, fmt.Errorf("install done URL %q: must not need shell quoting", in.DoneURL)
		}
		doc.Storage.Files = append(doc.Storage.Files, butaneFile{Path: InstallReportPath, Mode: 0o700, Contents: butaneContents{Inline: fmt.Sprintf(installReport, in.DoneURL)}})
		// A failed report only costs the operator a boot-order change.
		unit += "ExecStart=-" + InstallReportPath + "\n"
	}
	unit += "ExecStart=/usr/bin/systemctl --no-block reboot\n\n[Install]\nWantedBy=multi-user.target\n"
	doc.Systemd.Units = []butaneUnit{{Name: InstallUnit, Enabled: true, Contents: unit}}

	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	if err := enc.Encode(doc); err != nil {
		return nil, err
	}
	cfg, err := translate(buf.Bytes(), "")
	if err != nil {
		return nil, fmt.Errorf("translate the installer's butane: %w", err)
	}
	return encode(cfg)
}
