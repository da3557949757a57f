// Package bake turns a vendor OS disk image into a ready-to-flash image
// for one node role: it copies the base image (reflink or sparse copy),
// writes the role's Ignition config where the OS reads it on first boot,
// lays board firmware over the EFI system partition, and publishes the
// image with a .bmap, a .sha256 and optionally a compressed copy, all
// atomically. It never touches the partition table, the USR partitions,
// kernels or boot loaders, and checks that the disk and partition GUIDs
// are unchanged before publishing.
//
// Filesystems are changed with the tools made for them (debugfs, mtools,
// btrfs-progs) on a copy of the partition, checked with their fsck, and
// written back; see inject.go for why.
package bake

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kilnproject/kiln/imagebuild/disk"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/sparse"
	"github.com/kilnproject/kiln/imagebuild/workdir"
	"github.com/kilnproject/kiln/profiles"
)

// Options for one bake.
type Options struct {
	Target *profiles.Target
	// Base is the raw (decompressed) vendor image.
	Base string
	// BaseGiven: Base is the user's file (--base-image), so a base image
	// kiln cannot bake is bad input (exit 2), not a bad download.
	BaseGiven bool
	// Config is the rendered Ignition config.
	Config []byte
	// Firmware is the board firmware archive (rpi4 targets only).
	Firmware string
	// Output is the image's path; the other files go beside it.
	Output string
	// Payload are large files an air-gapped node's image carries beside
	// its Ignition config (Flatcar: in the OEM filesystem).
	Payload []PayloadFile
	// KernelArgs are kernel arguments the node boots with (a static
	// network for its initramfs): Flatcar: appended to linux_append in
	// the OEM filesystem's grub.cfg, read by Flatcar's GRUB on every boot;
	// Fedora CoreOS: ignition_network_kcmdline in ignition.firstboot, read
	// by its GRUB on the first boot only (the booted system then uses
	// NetworkManager's keyfile).
	KernelArgs []string
	// Compress is "", "zst" or "xz".
	Compress string
	// Force replaces existing outputs.
	Force    bool
	Runner   Runner
	Progress io.Writer
}

// PayloadFile is one file of Options.Payload.
type PayloadFile struct {
	// Path is where it goes, relative to the filesystem's root.
	Path string
	// Source is the host file to copy.
	Source string
}

// Result says what a bake produced.
type Result struct {
	Image          string   `json:"image"`
	Compressed     string   `json:"compressed,omitempty"`
	Bmap           string   `json:"bmap"`
	SHA256File     string   `json:"sha256File"`
	SHA256         string   `json:"sha256"`
	Size           int64    `json:"size"`
	MappedBytes    int64    `json:"mappedBytes"`
	Reflinked      bool     `json:"reflinked"`
	Touched        []string `json:"touchedPartitions"`
	FirmwareSHA256 string   `json:"firmwareSHA256,omitempty"`
	Seconds        float64  `json:"seconds"`
}

// Outputs are the paths a bake writes for an image path and compression.
func Outputs(image, compress string) (compressed, bmap, sum string) {
	stem := strings.TrimSuffix(image, filepath.Ext(image))
	if compress != "" {
		compressed = image + "." + compress
	}
	return compressed, stem + ".bmap", stem + ".sha256"
}

// workPattern names a bake's work folder in its output folder.
const workPattern = ".kiln-work-*"

// Bake runs one bake.
func Bake(ctx context.Context, o Options) (*Result, error) {
	res, err := bake(ctx, o)
	// A bake downloads nothing: a Download fault is the base image's.
	if o.BaseGiven && fault.KindOf(err) == fault.Download {
		err = fault.Wrap(fault.Input, fmt.Errorf("--base-image %s: %w", o.Base, err))
	}
	return res, err
}

func bake(ctx context.Context, o Options) (_ *Result, ferr error) {
	start := time.Now()
	t := o.Target
	if err := o.check(); err != nil {
		return nil, err
	}
	compressed, bmapPath, sumPath := Outputs(o.Output, o.Compress)
	finals := []string{bmapPath, sumPath, o.Output}
	if compressed != "" {
		finals = append([]string{compressed}, finals...)
	}
	if !o.Force {
		for _, f := range finals {
			if _, err := os.Lstat(f); err == nil {
				return nil, fault.Wrap(fault.Input, fmt.Errorf("%s already exists: pass --force to replace it", f))
			}
		}
	}
	layout, err := disk.Read(o.Base)
	if err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("base image: %w", disk.NotAnImage(err)))
	}
	if err := checkArch(o, layout); err != nil {
		return nil, err
	}
	outDir := filepath.Dir(o.Output)
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	// A bake that was killed (SIGKILL, a second Ctrl-C) left its work
	// folder here: remove it, say so.
	if err := workdir.Sweep(outDir, workPattern, o.Progress); err != nil {
		fmt.Fprintf(o.Progress, "could not remove a killed bake's work folder: %v\n", err)
	}
	sp, err := estimateSpace(o, layout)
	if err != nil {
		return nil, err
	}
	if err := sp.check(); err != nil {
		return nil, err
	}
	// A full disk is reported as such, whichever tool hit it.
	defer func() { ferr = sp.noSpace(ferr) }()
	wd, err := workdir.Make(outDir, workPattern)
	if err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	defer wd.Remove()
	work := wd.Path

	// Every output is first written under a temporary name in work/ and
	// renamed into place only when all are complete, image last.
	temps := map[string]string{}
	for _, f := range finals {
		temps[f] = filepath.Join(work, "out-"+filepath.Base(f))
	}
	img, reflinked, err := cloneBase(ctx, o.Base, temps[o.Output], o.Progress)
	if err != nil {
		return nil, err
	}
	defer img.Close()

	res := &Result{Image: o.Output, Compressed: compressed, Bmap: bmapPath, SHA256File: sumPath, Reflinked: reflinked}
	config := file{path: "config.ign", data: o.Config, mode: 0o600}
	payload := []file{config}
	for _, p := range o.Payload {
		payload = append(payload, file{path: p.Path, src: p.Source, mode: 0o644})
	}
	args := strings.Join(o.KernelArgs, " ")
	switch t.Inject.Method {
	case profiles.InjectFlatcarOEM:
		if args != "" {
			payload = append(payload, file{path: "grub.cfg", mode: 0o644, merge: true,
				data: []byte("# kiln: this node's static network, for the initramfs\nset linux_append=\"$linux_append " + args + "\"\n")})
		}
		err = withPartition(ctx, img, layout, t.Inject.Partition, work, func(part string, fsys disk.FS) (string, error) {
			switch fsys.Kind {
			case disk.FSBtrfs:
				out := part + ".new"
				return out, rebuildBtrfs(ctx, o.Runner, part, out, work, fsys, payload)
			case disk.FSExt4:
				if len(o.Payload) > 0 {
					return "", fault.Wrap(fault.Unsupported, errors.New("this Flatcar release's OEM partition is ext4 (before 2983) and too small for an air-gapped payload: use a release from 4593 on"))
				}
				if args != "" {
					return "", fault.Wrap(fault.Unsupported, errors.New("kiln gives a static network to Flatcar releases from 2983 on (a btrfs OEM partition) only: use a newer release"))
				}
				return part, writeExt4(ctx, o.Runner, part, work, nil, []file{config})
			default:
				return "", fault.Wrap(fault.Unsupported, fmt.Errorf("the OEM partition holds %s, not btrfs or ext4: is this a Flatcar image?", fsys.Kind))
			}
		})
	case profiles.InjectFCOSBoot:
		if len(o.Payload) > 0 {
			return nil, fault.Wrap(fault.Unsupported, errors.New("Fedora CoreOS images cannot carry an air-gapped payload yet"))
		}
		err = withPartition(ctx, img, layout, t.Inject.Partition, work, func(part string, fsys disk.FS) (string, error) {
			if fsys.Kind != disk.FSExt4 {
				return "", fault.Wrap(fault.Unsupported, fmt.Errorf("the boot partition holds %s, not ext4: is this a Fedora CoreOS metal image?", fsys.Kind))
			}
			config.path = "ignition/config.ign"
			return part, writeExt4(ctx, o.Runner, part, work,
				[]dir{{"ignition", 0o700}},
				[]file{config, firstboot(args)})
		})
	default:
		err = fault.Wrap(fault.Unsupported, fmt.Errorf("inject method %q is not supported", t.Inject.Method))
	}
	if err != nil {
		return nil, err
	}
	res.Touched = append(res.Touched, t.Inject.Partition)

	if fw := t.Firmware; fw != nil {
		tree := filepath.Join(work, "firmware")
		if res.FirmwareSHA256, err = unpackFirmware(o.Firmware, tree, fw); err != nil {
			return nil, err
		}
		err = withPartition(ctx, img, layout, fw.Partition, work, func(part string, fsys disk.FS) (string, error) {
			if fsys.Kind != disk.FSFAT {
				return "", fault.Wrap(fault.Unsupported, fmt.Errorf("partition %s holds %s, not FAT", fw.Partition, fsys.Kind))
			}
			return part, copyFAT(ctx, o.Runner, part, tree)
		})
		if err != nil {
			return nil, err
		}
		res.Touched = append(res.Touched, fw.Partition)
	}

	if err := img.Sync(); err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	after, err := disk.Read(img.Name())
	if err == nil {
		err = layout.Same(after)
	}
	if err != nil {
		return nil, fault.Wrap(fault.IO, fmt.Errorf("the baked image's partition table differs from the base (please report this): %w", err))
	}

	sum, err := summarize(ctx, img, o.Compress, temps[compressed], o.Progress)
	if err != nil {
		return nil, err
	}
	lines := fmt.Sprintf("%s  %s\n", sum.sha256, filepath.Base(o.Output))
	if compressed != "" {
		lines += fmt.Sprintf("%s  %s\n", sum.compressSum, filepath.Base(compressed))
	}
	for path, data := range map[string][]byte{bmapPath: sum.bmap, sumPath: []byte(lines)} {
		if err := os.WriteFile(temps[path], data, 0o644); err != nil {
			return nil, fault.Wrap(fault.IO, err)
		}
	}
	// The image carries the node's secrets (init: the cluster CAs).
	for _, f := range finals {
		mode := os.FileMode(0o644)
		if f == o.Output || f == compressed {
			mode = 0o600
		}
		if err := os.Chmod(temps[f], mode); err != nil {
			return nil, fault.Wrap(fault.IO, err)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("bake interrupted, nothing published: %w", err)
	}
	for _, f := range finals {
		if err := os.Rename(temps[f], f); err != nil {
			return nil, fault.Wrap(fault.IO, fmt.Errorf("publish %s: %w", f, err))
		}
	}
	fi, _ := img.Stat()
	res.SHA256, res.Size, res.MappedBytes = sum.sha256, fi.Size(), sum.mapped
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

// firstboot is Fedora CoreOS's ignition.firstboot, merged into the
// image's: GRUB reads it on the first boot, and ignition_network_kcmdline
// holds kernel arguments for that boot's network (what coreos-installer
// --firstboot-args writes).
func firstboot(args string) file {
	f := file{path: "ignition.firstboot", mode: 0o644, merge: true}
	if args != "" {
		f.data = []byte("# kiln: this node's static network, for the first boot's initramfs\nset ignition_network_kcmdline=\"" + args + "\"\n")
	}
	return f
}

func (o Options) check() error {
	t := o.Target
	var errs []error
	if o.Compress != "" && !slices.Contains(Compressions, o.Compress) {
		errs = append(errs, fmt.Errorf("--compress %q: use zst or xz", o.Compress))
	}
	if t.Firmware != nil && o.Firmware == "" {
		errs = append(errs, fmt.Errorf("profile %s needs %s: pass --firmware FILE (the release zip from %s)", t.Name, t.Firmware.Name, t.Firmware.URL))
	}
	if t.Firmware == nil && o.Firmware != "" {
		errs = append(errs, fmt.Errorf("--firmware: profile %s takes no firmware (only board profiles such as flatcar-rpi4 do)", t.Name))
	}
	if len(o.Config) == 0 {
		errs = append(errs, errors.New("no Ignition config to write"))
	}
	if err := errors.Join(errs...); err != nil {
		return fault.Wrap(fault.Input, err)
	}
	tools := ext4Tools
	if t.Inject.Method == profiles.InjectFlatcarOEM {
		tools = append(tools, btrfsTools...)
		if os.Geteuid() != 0 {
			tools = append(tools, unshare)
		}
	}
	if t.Firmware != nil {
		tools = append(tools, fatTools...)
	}
	return need(tools...)
}

// checkArch refuses a base image built for another architecture than the
// target's, by the default boot loader on its EFI system partition (see
// disk.BootArch): cheap (a few directory reads) and what the machine's
// firmware itself goes by.
func checkArch(o Options, layout *disk.Layout) error {
	f, err := os.Open(o.Base)
	if err != nil {
		return fault.Wrap(fault.Input, fmt.Errorf("base image: %w", err))
	}
	defer f.Close()
	arch, loader, err := disk.BootArch(f, layout)
	switch {
	case err != nil:
		return fault.Wrap(fault.Download, fmt.Errorf("base image: %w", err))
	case arch == "":
		fmt.Fprintf(o.Progress, "note: cannot tell the base image's architecture (no EFI/BOOT/BOOTX64.EFI or BOOTAA64.EFI on an EFI system partition); baking it for %s as profile %s says\n", o.Target.Arch, o.Target.Name)
	case arch != o.Target.Arch:
		return fault.Wrap(fault.Input, fmt.Errorf("base image %s is for %s (its EFI system partition boots %s), but profile %s is for %s: give the %s %s image, or use a %s profile",
			filepath.Base(o.Base), arch, loader, o.Target.Name, o.Target.Arch, o.Target.OS, o.Target.Arch, arch))
	}
	return nil
}

// cloneBase copies the base image to path, sparse or reflinked.
func cloneBase(ctx context.Context, base, path string, prog io.Writer) (*os.File, bool, error) {
	src, err := os.Open(base)
	if err != nil {
		return nil, false, fault.Wrap(fault.Input, fmt.Errorf("base image: %w", err))
	}
	defer src.Close()
	dst, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, false, fault.Wrap(fault.IO, err)
	}
	reflinked, err := sparse.Clone(ctx, dst, src)
	if err != nil {
		dst.Close()
		if ctx.Err() != nil {
			return nil, false, err
		}
		return nil, false, fault.Wrap(fault.IO, fmt.Errorf("copy base image: %w", err))
	}
	how := "sparse copy"
	if reflinked {
		how = "reflink"
	}
	fmt.Fprintf(prog, "copied base image %s (%s)\n", filepath.Base(base), how)
	return dst, reflinked, nil
}

// withPartition copies the named partition of img out to a file, lets
// change modify it (or build a replacement of the same size, whose path
// it returns), and writes the result back into img. The filesystem's
// label must be the partition's name, as the OS finds it by label.
func withPartition(ctx context.Context, img *os.File, l *disk.Layout, name, work string, change func(part string, fsys disk.FS) (string, error)) error {
	p, err := l.ByName(name)
	if err != nil {
		return fault.Wrap(fault.Download, fmt.Errorf("base image: %w", err))
	}
	part := filepath.Join(work, "part-"+name+".img")
	f, err := os.Create(part)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	defer f.Close()
	if err := sparse.ExtractRegion(f, img, p.Start, p.Size); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("read partition %s: %w", name, err))
	}
	fsys, err := disk.Sniff(f)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if fsys.Kind != disk.FSFAT && fsys.Label != name {
		return fault.Wrap(fault.Download, fmt.Errorf("base image: partition %s holds a %s filesystem labelled %q, not %q", name, fsys.Kind, fsys.Label, name))
	}
	out, err := change(part, fsys)
	if err != nil {
		return fmt.Errorf("partition %s: %w", name, err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	nf, err := os.Open(out)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	defer nf.Close()
	if err := sparse.ReplaceRegion(img, p.Start, p.Size, nf); err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write partition %s: %w", name, err))
	}
	return nil
}
