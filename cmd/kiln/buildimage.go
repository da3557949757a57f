package main

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/agentbin"
	"github.com/kilnproject/kiln/imagebuild/bake"
	"github.com/kilnproject/kiln/imagebuild/baseimage"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/render"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/profiles"
)

type buildImageOptions struct {
	role       string
	profile    string
	node       string
	baseImages []string
	all        bool
	firmware   string
	dest       string
	compress   string
	download   downloadOptions
	airgap     bool
	files      []string
	force      bool
	output     outputFormat
}

func newBuildImageCmd(g *globals) *cobra.Command {
	o := &buildImageOptions{}
	cmd := &cobra.Command{
		Use:   "build-image --role ROLE --profile PROFILE | --node NAME | --all",
		Short: "Bake a ready-to-flash disk image for one node role",
		Long: `build-image turns a vendor OS disk image into a ready-to-flash image for one
role of the cluster, offline once the base image is cached, without loop
devices, mounts or root:

  1. the base image (Flatcar or Fedora CoreOS, per --profile; see kiln
     profiles) is downloaded with progress, resumably, verified (Flatcar:
     SHA-512 from .DIGESTS and the OpenPGP signature against the embedded
     Flatcar key; Fedora CoreOS: sha256 from the stream metadata),
     decompressed once and cached sparse in the user cache folder; or
     --base-image FILE is used (raw, .bz2, .xz or .zst), fully offline;
  2. it is copied (reflink where the filesystem can, else sparse) and the
     role's Ignition config is written where the OS reads it on first boot
     (Flatcar: config.ign in the OEM filesystem; Fedora CoreOS:
     ignition/config.ign and ignition.firstboot in the boot filesystem);
     board profiles also get their firmware on the EFI system partition;
  3. IMAGE.img (mode 0600: it carries the role's secrets), IMAGE.bmap (for
     bmaptool copy), IMAGE.sha256 and with --compress IMAGE.img.zst or .xz
     are written to --dest, all or nothing.

Air-gapped (--airgap, or airgap: true in the cluster file): the image also
carries everything the node would download, so it needs no registry and no
download site. Flatcar: the Kubernetes sysext (from the download cache, or
--file kubernetes-sysext=PATH, checked against its pin) and the role's
container images (an OCI archive written from the image cache: run kiln
images pin and kiln images pull first) go to kiln/ on the OEM filesystem;
a worker's archive holds no etcd or API server. The OEM partition must hold
them (1 GiB from Flatcar 4593 on); Fedora CoreOS cannot carry them yet.

Needs e2fsprogs, plus btrfs-progs for Flatcar and mtools and dosfstools for
Raspberry Pi profiles. The partition table, USR partitions, kernels and boot
loaders are never changed. Progress goes to stderr; -o json prints the result.`,
		Example: `  kiln build-image --role init --profile flatcar-amd64
  kiln build-image --role worker --profile fcos-x86_64 --compress zst --dest out/
  kiln build-image --node cp-2            # role and profile from the cluster file's nodes
  kiln build-image --all --dest out/ --firmware RPi4_UEFI_Firmware_v1.50.zip
  kiln build-image --all --base-image flatcar-rpi4=arm64.bin.bz2 --base-image flatcar-amd64=amd64.bin.bz2
  kiln build-image --role worker --profile flatcar-rpi4 --firmware RPi4_UEFI_Firmware_v1.50.zip
  kiln build-image --role worker --profile flatcar-amd64 --base-image flatcar_production_image.bin.bz2 -o json
  kiln build-image --role worker --profile flatcar-amd64 --airgap --file kubernetes-sysext=kubernetes-v1.37.2-x86-64.raw`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := interruptible(cmd.Context())
			defer stop()
			return runBuildImage(ctx, g, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.role, "role", "", "node role: init, control-plane or worker (default with --node: the node's role)")
	f.StringVar(&o.profile, "profile", "", "target profile, see kiln profiles (default: nodes[].profile, then the cluster file's profile)")
	f.StringVar(&o.node, "node", "", "bake for this inventory node: its role, profile, hostname and static network (names the image too)")
	f.StringArrayVar(&o.baseImages, "base-image", nil, "use this vendor image file (raw, .bz2, .xz or .zst) instead of downloading; with --all, PROFILE=FILE for each profile (repeatable)")
	f.BoolVar(&o.all, "all", false, "bake every inventory node, and one image per role for the machines named by hostname.template, in parallel")
	f.StringVar(&o.firmware, "firmware", "", "board firmware archive (flatcar-rpi4: the pftf RPi4 UEFI zip)")
	f.StringVar(&o.dest, "dest", ".", "folder for the image and its .bmap and .sha256")
	f.StringVar(&o.compress, "compress", "", "also write a compressed image: zst or xz (multi-threaded)")
	o.download.addFlags(f, "base image")
	f.BoolVar(&o.airgap, "airgap", false, "carry the Kubernetes binaries and every container image on the image (as airgap: true in the cluster file)")
	f.StringArrayVar(&o.files, "file", nil, "NAME=PATH: a local copy of download NAME for an air-gapped image, checked against its pin (repeatable)")
	f.BoolVar(&o.force, "force", false, "replace existing outputs")
	addOutputFlag(cmd, &o.output)
	return cmd
}

func runBuildImage(ctx context.Context, g *globals, o *buildImageOptions) error {
	if o.all {
		return runBuildAll(ctx, g, o)
	}
	if o.node == "" && o.role == "" {
		return fault.Wrap(fault.Input, fmt.Errorf("--role is required, for example --role worker --profile flatcar-amd64 (see kiln profiles), or --node NAME of an inventory node, or --all"))
	}
	if len(o.baseImages) > 1 {
		return fault.Wrap(fault.Input, fmt.Errorf("--base-image is given %d times: one image takes one base image (several are for --all)", len(o.baseImages)))
	}
	c, s, err := o.load(g)
	if err != nil {
		return err
	}
	fn, err := resolveNode(c, o.node, o.role, o.profile)
	if err != nil {
		return err
	}
	if fn.profile == "" {
		return fault.Wrap(fault.Input, fmt.Errorf("--profile is required, for example --profile flatcar-amd64 (see kiln profiles); or name it in the cluster file: profile: for every node, nodes[].profile for one"))
	}
	t, err := targetFor(c, fn.profile)
	if err != nil {
		return err
	}
	if err := o.checkBaseImages([]*profiles.Target{t}); err != nil {
		return err
	}
	j := bakeJob{node: o.node, role: fn.role, target: t}
	cache, err := o.download.cache(g)
	if err != nil {
		return err
	}
	// The payload first: a missing image or download is found before a
	// base image is fetched.
	opts, cleanup, err := o.prepare(ctx, g, c, s, cache, j)
	defer cleanup()
	if err != nil {
		return err
	}
	base, err := o.fetchBase(ctx, c, cache, t, o.baseImageFor(t, 1))
	if err != nil {
		return err
	}
	opts.Base, opts.BaseGiven, opts.Firmware = base.path, base.given, base.firmware
	opts.Progress = g.stderr
	res, err := bake.Bake(ctx, opts)
	if err != nil {
		return err
	}
	lines := []string{
		fmt.Sprintf("baked %s for %s (%s %s, base %s) in %.1fs", res.Image, j.who(), t.OS, t.Arch, base.version, res.Seconds),
		fmt.Sprintf("  size %.1f MiB, %.1f MiB mapped; sha256 %s", float64(res.Size)/(1<<20), float64(res.MappedBytes)/(1<<20), res.SHA256),
		"  block map: " + res.Bmap + " (flash with: bmaptool copy " + res.Image + " /dev/DEVICE)",
		"  checksums: " + res.SHA256File,
	}
	if res.Compressed != "" {
		lines = append(lines, "  compressed: "+res.Compressed)
	}
	return emit(g.stdout, o.output, res, lines...)
}

// bakeJob is one image of a build-image run.
type bakeJob struct {
	node   string // "" for a role image
	role   nodeconfig.Role
	target *profiles.Target
}

// who names the image: the inventory node, or the role of a role image
// (machines named by hostname.template).
func (j bakeJob) who() string { return cmp.Or(j.node, string(j.role)) }

// load reads the cluster, air-gapped when --airgap says so.
func (o *buildImageOptions) load(g *globals) (*cluster.Cluster, *secrets.Secrets, error) {
	c, s, err := g.load()
	if err != nil {
		return nil, nil, err
	}
	if o.airgap && !c.Airgap {
		c.Airgap = true
		if err := c.Validate(); err != nil {
			return nil, nil, fmt.Errorf("--airgap does not fit this cluster: %w", err)
		}
	}
	if len(o.files) > 0 && !c.Airgap {
		return nil, nil, fault.Wrap(fault.Input, fmt.Errorf("--file is for air-gapped images: add --airgap (or airgap: true in the cluster file)"))
	}
	return c, s, nil
}

// prepare renders job j's config and gathers its air-gapped payload: the
// bake's options but for the base image, firmware and progress. cleanup
// removes the payload's temporary files (always safe to call).
func (o *buildImageOptions) prepare(ctx context.Context, g *globals, c *cluster.Cluster, s *secrets.Secrets, cache *baseimage.Cache, j bakeJob) (bake.Options, func(), error) {
	cleanup := func() {}
	t := j.target
	in := render.Input{Cluster: c, Secrets: s, Role: j.role, Arch: t.Arch, NodeName: j.node}
	var err error
	if in.Agent, err = agentbin.Gzipped(t.Arch); err != nil {
		return bake.Options{}, cleanup, err
	}
	config, err := render.Ignition(in)
	if err != nil {
		return bake.Options{}, cleanup, err
	}
	var payload []bake.PayloadFile
	if c.Airgap {
		if err := os.MkdirAll(o.dest, 0o755); err != nil {
			return bake.Options{}, cleanup, fault.Wrap(fault.IO, err)
		}
		var files []payloadFile
		files, cleanup, err = airgapFiles(ctx, g, c, []nodeconfig.Role{j.role}, t.Arch, cache, o.files, o.dest)
		if err != nil {
			return bake.Options{}, cleanup, err
		}
		osp, err := profiles.LookupOS(c.OS.Name)
		if err != nil {
			return bake.Options{}, cleanup, fault.Wrap(fault.Input, err)
		}
		for _, f := range files {
			payload = append(payload, bake.PayloadFile{Path: path.Join(osp.Payload.Dir, f.Name), Source: f.Path})
		}
	}
	return bake.Options{
		Target:  t,
		Config:  config,
		Payload: payload,
		// A static network also in the initramfs, where Ignition
		// downloads what the config names.
		KernelArgs: render.NetworkKernelArgs(c, j.node),
		Output:     filepath.Join(o.dest, fmt.Sprintf("%s-%s-%s.img", c.Name, j.who(), t.Name)),
		Compress:   o.compress,
		Force:      o.force,
		Runner:     bake.Exec{},
	}, cleanup, nil
}

// baseImage is a target's base image and firmware, ready to bake.
type baseImage struct {
	path, version string
	given         bool // the user's --base-image
	firmware      string
}

// fetchBase prepares target t's base image: given (a --base-image file,
// decompressed once into the cache), or downloaded and verified; and its
// firmware when the profile takes one.
func (o *buildImageOptions) fetchBase(ctx context.Context, c *cluster.Cluster, cache *baseimage.Cache, t *profiles.Target, given string) (baseImage, error) {
	b := baseImage{path: given, version: "(local file)", given: given != "", firmware: o.firmware}
	var err error
	if given != "" {
		if b.path, err = cache.Local(ctx, given); err != nil {
			return b, err
		}
	} else {
		src, err := o.download.source(t, c)
		if err != nil {
			return b, err
		}
		var rel *baseimage.Release
		if b.path, rel, _, err = cache.Fetch(ctx, src); err != nil {
			return b, offline(err, "give the vendor image with --base-image FILE")
		}
		b.version = rel.Version
	}
	if fw := t.Firmware; fw != nil && b.firmware == "" && fw.SHA256 != "" {
		if b.firmware, err = cache.FetchFile(ctx, fw.URL, baseimage.Digest{Algo: "sha256", Hex: fw.SHA256}); err != nil {
			return b, offline(err, "give the firmware zip with --firmware FILE")
		}
	}
	return b, nil
}

// baseImageFor is the --base-image file for target t ("" to download):
// the value PROFILE=FILE that names t's profile, or a plain FILE when the
// run bakes for that one profile only (targets == 1).
func (o *buildImageOptions) baseImageFor(t *profiles.Target, targets int) string {
	plain := ""
	for _, v := range o.baseImages {
		switch profile, file := splitBaseImage(v); {
		case profile == t.Name:
			return file
		case profile == "" && targets == 1:
			plain = file
		}
	}
	return plain
}

// splitBaseImage splits a --base-image value: PROFILE=FILE when the part
// before "=" names a target profile, else a plain FILE (profile "").
func splitBaseImage(v string) (profile, file string) {
	if name, f, ok := strings.Cut(v, "="); ok && isProfile(name) {
		return name, f
	}
	return "", v
}

// isProfile reports whether name is a target profile's name.
func isProfile(name string) bool {
	_, err := profiles.LookupTarget(name)
	return err == nil
}
