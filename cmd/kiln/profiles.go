package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/profiles"
)

// lookupTarget finds a target profile, classifying refusals.
func lookupTarget(name string) (*profiles.Target, error) {
	t, err := profiles.LookupTarget(name)
	var u *profiles.UnsupportedTargetError
	switch {
	case errors.As(err, &u):
		return nil, fault.Wrap(fault.Unsupported, err)
	case err != nil:
		return nil, fault.Wrap(fault.Input, fmt.Errorf("--profile: %w", err))
	}
	return t, nil
}

func newProfilesCmd(g *globals) *cobra.Command {
	var out outputFormat
	cmd := &cobra.Command{
		Use:   "profiles [NAME]",
		Short: "List the image targets kiln bakes, or show one",
		Long: `profiles lists the target profiles build-image accepts: for each, the OS, the
architecture, the board, where the vendor image comes from and how it is
verified, where the Ignition config is written, and any firmware laid over
the EFI system partition. With NAME it shows that profile in full.

The Raspberry Pi 5 is not supported: it has no UEFI firmware with working
Ethernet, so a node could not fetch anything at first boot.`,
		Example: `  kiln profiles
  kiln profiles flatcar-rpi4
  kiln profiles fcos-x86_64 -o json`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return fault.Wrap(fault.Input, fmt.Errorf("give at most one profile name, not %d", len(args)))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 1 {
				t, err := lookupTarget(args[0])
				if err != nil {
					return err
				}
				return emit(g.stdout, out, t, describeTarget(t)...)
			}
			var all []*profiles.Target
			lines := []string{fmt.Sprintf("%-14s %-8s %-6s %-8s %s", "NAME", "OS", "ARCH", "BOARD", "DESCRIPTION")}
			for _, n := range profiles.TargetNames() {
				t, _ := profiles.LookupTarget(n)
				all = append(all, t)
				lines = append(lines, fmt.Sprintf("%-14s %-8s %-6s %-8s %s", t.Name, t.OS, t.Arch, t.Board, t.Description))
			}
			return emit(g.stdout, out, all, lines...)
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}

func describeTarget(t *profiles.Target) []string {
	im := t.Image
	lines := []string{
		t.Name + ": " + t.Description,
		fmt.Sprintf("  os %s, arch %s, board %s", t.OS, t.Arch, t.Board),
		"  base image: " + im.Source + " from " + im.Origin,
	}
	switch im.Source {
	case profiles.SourceFlatcarRelease:
		lines = append(lines,
			"    image:     "+im.URL,
			"    current:   "+im.VersionURL,
			"    verified:  SHA-512 from .DIGESTS and the detached OpenPGP signature (.sig) against the embedded "+im.SigningKey+" key")
	case profiles.SourceFCOSStream:
		lines = append(lines,
			"    stream:    "+im.StreamURL+" (architecture "+im.StreamArch+", metal raw.xz)",
			"    verified:  sha256 from the stream metadata")
	}
	switch t.Inject.Method {
	case profiles.InjectFlatcarOEM:
		lines = append(lines, "  config: config.ign at the root of the "+t.Inject.Partition+" filesystem (btrfs rebuilt with btrfs-progs, or ext4 via debugfs)")
	case profiles.InjectFCOSBoot:
		lines = append(lines, "  config: ignition/config.ign (0600, dir 0700) and ignition.firstboot in the "+t.Inject.Partition+" ext4 filesystem (debugfs)")
	}
	if fw := t.Firmware; fw != nil {
		pin := "sha256 " + fw.SHA256
		if fw.SHA256 == "" {
			pin = "not pinned: pass --firmware FILE"
		}
		lines = append(lines,
			"  firmware: "+fw.Name+" unpacked at the root of "+fw.Partition,
			"    from:      "+fw.URL+" ("+pin+")",
			"    requires:  "+strings.Join(fw.RequiredFiles, ", ")+"; config.txt added when the archive has none")
	}
	return lines
}
