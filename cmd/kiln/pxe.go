package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/agentbin"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/pxe"
	"github.com/kilnproject/kiln/profiles"
)

type pxeOptions struct {
	dest        string
	profile     string
	serverURL   string
	modes       map[string]string
	disk        string
	kernel      string
	initramfs   string
	rootfs      string
	kernelArgs  []string
	matchboxURL string
	knownOnly   bool
	download    downloadOptions
	files       []string
	force       bool
	output      outputFormat
}

func newPxeCmd(g *globals) *cobra.Command {
	o := &pxeOptions{}
	cmd := &cobra.Command{
		Use:   "pxe --dest DIR --server-url URL",
		Short: "Build a network-boot bundle for every node, served by kiln serve",
		Long: `pxe writes everything a rack of machines needs to boot from the network into
one folder, all or nothing, for kiln serve (or matchbox, or no server at all
for the offline variant):

  assets/     the OS's PXE kernel and initramfs (Fedora CoreOS: and rootfs),
              downloaded, verified (Flatcar: SHA-512 and OpenPGP signature;
              Fedora CoreOS: sha256 from the stream) and cached, or given
              as local files with --kernel, --initramfs (and --rootfs)
  configs/    per node, its Ignition config (hostname and role set); for
              install-mode nodes, an installer config that carries it
  ipxe/       per node with a MAC, the iPXE script kiln serve hands it
  offline/    per node, boot.ipxe and config.img: the config as an extra
              initramfs (gzip newc cpio), for booting with no config server
  matchbox/   with --matchbox-url: the same nodes as matchbox profiles,
              groups and configs
  bundle.json the index kiln serve reads (mode 0600: it holds tokens)

configs/, ipxe/, offline/ and bundle.json carry tokens and cluster secrets
(mode 0600): never publish the bundle folder as it is.

Nodes are the cluster file's inventory (name, role, MAC) plus a role default
per role for machines it does not list (default-worker, default-control-plane,
and default-init when no inventory node is init). Inventory nodes without a
MAC are pool slots kiln serve can assign (kiln serve --pool).

Modes: live runs the node from RAM (nothing survives a reboot; fine for
workers, the default for them); install boots an installer that writes the
OS and the node's config to --disk and reboots into it (the default for
init and control-plane nodes, whose etcd must survive a reboot). Set them
with --mode ROLE=MODE.

Flatcar's PXE system runs from RAM and needs at least 3 GB of it (live
workers keep it; installers need it until they reboot).

Air-gapped clusters (airgap: true in the cluster file; kiln images pin and
kiln images pull first): the bundle also carries assets/SET/payload/, the
Kubernetes downloads (from the download cache, or --file NAME=PATH) and an
image archive per role, which every node's config fetches from kiln serve
(checked by Ignition against their pins); install-mode nodes install the
OS release from assets/SET/install/, which needs the PXE files downloaded
(from the vendor or --mirror), not --kernel/--initramfs. The offline/
variants still fetch the payload from --server-url.

--server-url is where the nodes reach kiln serve; it is written into the
scripts and configs (config and status report URLs). Rebuilding with --force
keeps every token and kiln serve's state.`,
		Example: `  kiln pxe --dest pxe/ --server-url http://10.0.0.5:8080
  kiln serve --bundle pxe/ --listen :8080
  kiln pxe --dest pxe/ --server-url http://10.0.0.5:8080 --mode worker=install --disk /dev/nvme0n1
  kiln pxe --dest pxe/ --server-url http://10.0.0.5:8080 --profile flatcar-arm64 --kernel-arg console=ttyAMA0
  kiln pxe --dest pxe/ --server-url http://10.0.0.5:8080 \
      --kernel flatcar_production_pxe.vmlinuz --initramfs flatcar_production_pxe_image.cpio.gz`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := interruptible(cmd.Context())
			defer stop()
			return runPxe(ctx, g, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.dest, "dest", "", "bundle folder to write (required)")
	f.StringVar(&o.serverURL, "server-url", "", "URL the nodes reach kiln serve at, such as http://10.0.0.5:8080 (required)")
	f.StringVar(&o.profile, "profile", "", "target profile: a generic flatcar or fcos profile (default: the cluster's OS for amd64)")
	f.StringToStringVar(&o.modes, "mode", nil, "boot mode per role, ROLE=live|install (default: init and control-plane install, worker live)")
	f.Lookup("mode").DefValue = "" // the help says the defaults; pflag would add "(default [])"
	f.StringVar(&o.disk, "disk", pxe.DefaultDisk, "disk install-mode nodes install to")
	f.StringVar(&o.kernel, "kernel", "", "use this PXE kernel instead of downloading")
	f.StringVar(&o.initramfs, "initramfs", "", "use this PXE initramfs instead of downloading")
	f.StringVar(&o.rootfs, "rootfs", "", "use this live rootfs instead of downloading (Fedora CoreOS)")
	f.StringArrayVar(&o.kernelArgs, "kernel-arg", nil, "extra kernel argument for every node (repeatable), such as console=ttyS0,115200n8")
	f.StringVar(&o.matchboxURL, "matchbox-url", "", "also write a matchbox export (matchbox/) for the matchbox at this URL, such as http://10.0.0.6:8080")
	f.BoolVar(&o.knownOnly, "matchbox-known-only", false, "leave the catch-all worker group out of the matchbox export: matchbox boots only the MACs the cluster file names")
	o.download.addFlags(f, "PXE files")
	f.StringArrayVar(&o.files, "file", nil, "NAME=PATH: a local copy of download NAME for an air-gapped cluster's payload, checked against its pin (repeatable)")
	f.BoolVar(&o.force, "force", false, "rebuild an existing bundle (keeps its tokens and kiln serve's state)")
	addOutputFlag(cmd, &o.output)
	return cmd
}

func runPxe(ctx context.Context, g *globals, o *pxeOptions) error {
	if o.dest == "" || o.serverURL == "" {
		return fault.Wrap(fault.Input, errors.New("--dest and --server-url are required, for example --dest pxe/ --server-url http://10.0.0.5:8080"))
	}
	if o.knownOnly && o.matchboxURL == "" {
		return fault.Wrap(fault.Input, errors.New("--matchbox-known-only shapes the matchbox export: give --matchbox-url too"))
	}
	modes := map[nodeconfig.Role]string{}
	for r, m := range o.modes {
		role, err := nodeconfig.ParseRole(r)
		if err != nil {
			return fault.Wrap(fault.Input, fmt.Errorf("--mode %s=%s: %w", r, m, err))
		}
		modes[role] = m
	}
	t, c, s, err := g.loadForTarget(o.profile)
	if err != nil {
		return err
	}
	opts := pxe.Options{
		Cluster: c, Secrets: s, Target: t, ServerURL: o.serverURL, Modes: modes, Disk: o.disk,
		KernelArgs: o.kernelArgs, MatchboxURL: o.matchboxURL, MatchboxKnownOnly: o.knownOnly, Dest: o.dest, Force: o.force, Progress: g.stderr,
	}
	if err := opts.Check(); err != nil {
		return err
	}
	if opts.Agent, err = agentbin.Gzipped(t.Arch); err != nil {
		return err
	}
	if opts.Assets, opts.OSVersion, err = o.assets(ctx, g, t, c); err != nil {
		return err
	}
	if o.kernel == "" {
		// Installers write the release whose PXE files were verified.
		opts.InstallVersion = opts.OSVersion
	}
	if len(o.files) > 0 && !c.Airgap {
		return fault.Wrap(fault.Input, errors.New("--file is for air-gapped clusters (airgap: true in the cluster file)"))
	}
	if c.Airgap && o.kernel != "" && installs(modes) {
		return fault.Wrap(fault.Input, pxe.ErrNoInstallImage)
	}
	if c.Airgap {
		cache, err := o.download.cache(g)
		if err != nil {
			return err
		}
		scratch := filepath.Dir(filepath.Clean(o.dest))
		if err := os.MkdirAll(scratch, 0o755); err != nil {
			return fault.Wrap(fault.IO, err)
		}
		files, cleanup, err := airgapFiles(ctx, g, c, nodeconfig.Roles, t.Arch, cache, o.files, scratch)
		defer cleanup()
		if err != nil {
			return err
		}
		for _, f := range files {
			opts.Payload = append(opts.Payload, pxe.AssetFile{Kind: pxe.AssetPayload, Path: f.Path, Name: f.Name})
		}
		if o.kernel == "" && installs(modes) {
			src, err := o.download.source(t, c)
			if err != nil {
				return err
			}
			rel, image, sig, err := cache.FetchInstallImage(ctx, src)
			if err != nil {
				return offline(err, "air-gapped installers need the release's image: point --mirror at a local copy of the release folder, or boot those roles live (--mode ROLE=live)")
			}
			if rel.Version != opts.InstallVersion {
				return fault.Wrap(fault.Download, fmt.Errorf("the OS image is release %s but the PXE files are %s: run kiln pxe again", rel.Version, opts.InstallVersion))
			}
			name := path.Base(strings.SplitN(rel.URL, "?", 2)[0])
			opts.InstallImage = []pxe.AssetFile{
				{Kind: pxe.AssetInstallImage, Path: image, Name: name, Algo: rel.Digest.Algo, Hex: rel.Digest.Hex},
				{Kind: pxe.AssetInstallSignature, Path: sig, Name: name + ".sig"},
			}
		}
	}
	res, err := pxe.Build(ctx, opts)
	if err != nil {
		return err
	}
	version := opts.OSVersion
	lines := []string{fmt.Sprintf("wrote %s: %d nodes booting %s %s from %s in %.1fs", res.Dir, len(res.Nodes), t.Name, version, res.Server, res.Seconds)}
	for _, n := range res.Nodes {
		who := n.MAC
		switch {
		case n.Default:
			who = "role default"
		case who == "":
			who = "pool slot"
		}
		lines = append(lines, fmt.Sprintf("  %-24s %-13s %-7s %s", n.Name, n.Role, n.Mode, who))
	}
	lines = append(lines,
		"next: kiln serve --bundle "+res.Dir+", and point DHCP's boot file (iPXE) at "+res.Server+pxe.EntryPath,
		"offline: boot offline/NODE/boot.ipxe beside ../../assets/ (from a USB stick or a web server on the provisioning network only: config.img holds the node's secrets)")
	if o.matchboxURL != "" {
		lines = append(lines, "matchbox: see "+filepath.Join(res.Dir, pxe.MatchboxDir, "README"))
	}
	return emit(g.stdout, o.output, res, lines...)
}

// assets returns the boot files: the local files given, or the release's
// verified downloads.
func (o *pxeOptions) assets(ctx context.Context, g *globals, t *profiles.Target, c *cluster.Cluster) ([]pxe.AssetFile, string, error) {
	kinds := []string{pxe.AssetKernel, pxe.AssetInitramfs}
	if t.PXE.Stream {
		kinds = append(kinds, pxe.AssetRootfs)
	}
	local := map[string]string{pxe.AssetKernel: o.kernel, pxe.AssetInitramfs: o.initramfs, pxe.AssetRootfs: o.rootfs}
	given := 0
	for _, k := range kinds {
		if local[k] != "" {
			given++
		}
	}
	if o.rootfs != "" && !t.PXE.Stream {
		return nil, "", fault.Wrap(fault.Input, fmt.Errorf("--rootfs: %s boots without a separate rootfs", t.Name))
	}
	if given > 0 {
		if given != len(kinds) {
			return nil, "", fault.Wrap(fault.Input, fmt.Errorf("give all of --%s for local files, or none to download them", strings.Join(kinds, ", --")))
		}
		var out []pxe.AssetFile
		for _, k := range kinds {
			if _, err := os.Stat(local[k]); err != nil {
				return nil, "", fault.Wrap(fault.Input, fmt.Errorf("--%s: %w", k, err))
			}
			out = append(out, pxe.AssetFile{Kind: k, Path: local[k], Name: filepath.Base(local[k])})
		}
		version := c.OS.Version
		if version == "current" {
			version = "local"
		}
		return out, version, nil
	}
	cache, err := o.download.cache(g)
	if err != nil {
		return nil, "", err
	}
	src, err := o.download.source(t, c)
	if err != nil {
		return nil, "", err
	}
	version, files, paths, err := cache.FetchPXE(ctx, src)
	if err != nil {
		return nil, "", offline(err, "give --kernel and --initramfs (and --rootfs)")
	}
	var out []pxe.AssetFile
	for i, f := range files {
		out = append(out, pxe.AssetFile{Kind: f.Kind, Path: paths[i], Name: path.Base(strings.SplitN(f.URL, "?", 2)[0]), Algo: f.Digest.Algo, Hex: f.Digest.Hex})
	}
	return out, version, nil
}

// installs reports whether any role boots in install mode.
func installs(modes map[nodeconfig.Role]string) bool {
	for _, r := range nodeconfig.Roles {
		m, ok := modes[r]
		if !ok {
			m = pxe.DefaultMode(r)
		}
		if m == pxe.ModeInstall {
			return true
		}
	}
	return false
}
