package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/pin"
)

type pinOptions struct {
	arches  []string
	files   []string
	refresh bool
	timeout time.Duration
	output  outputFormat
}

func newPinCmd(g *globals) *cobra.Command {
	o := &pinOptions{}
	cmd := &cobra.Command{
		Use:   "pin",
		Short: "Record the SHA-512 of every artifact nodes download",
		Long: `pin completes kubernetes.downloads in the cluster file: for each artifact the
OS needs (Flatcar: the Kubernetes sysext image; Fedora CoreOS: kubeadm,
kubelet, kubectl and the CNI plugins archive) and each arch, the URL nodes fetch it from and its SHA-512,
which Ignition verifies on the node. It downloads each unpinned artifact
once to hash it, or hashes local copies given with --file (offline).
Entries already pinned are kept. Each records the os.name and
kubernetes.version it was made for: after changing either, kiln validate
says the pins are stale and kiln pin replaces them (for every arch; an
arch not given with --arch is left unpinned, not kept stale). --refresh
recomputes the pins of the arches given, and keeps the others.`,
		Example: `  kiln pin
  kiln pin --arch arm64
  kiln pin --arch amd64 --file kubernetes-sysext=./kubernetes-v1.37.2-x86-64.raw
  kiln pin --refresh -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := interruptible(cmd.Context())
			defer stop()
			return runPin(ctx, g, o)
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&o.arches, "arch", []string{"amd64", "arm64"}, "arch to pin (repeatable): amd64, arm64")
	f.StringArrayVar(&o.files, "file", nil, "NAME=PATH: hash a local copy of artifact NAME instead of downloading (repeatable)")
	f.BoolVar(&o.refresh, "refresh", false, "recompute the URLs and hashes of the arches given (--arch) from the OS profile; other arches' pins are kept")
	f.DurationVar(&o.timeout, "timeout", 30*time.Minute, "give up downloading after this long")
	addOutputFlag(cmd, &o.output)
	return cmd
}

func runPin(ctx context.Context, g *globals, o *pinOptions) error {
	if err := checkArches(o.arches...); err != nil {
		return err
	}
	var src pin.Source = pin.HTTP{Client: &http.Client{Timeout: o.timeout}}
	if len(o.files) > 0 {
		files := pin.Files{}
		for _, spec := range o.files {
			name, p, ok := strings.Cut(spec, "=")
			if !ok || name == "" || p == "" {
				return fault.Wrap(fault.Input, fmt.Errorf("--file %q: use NAME=PATH, for example kubernetes-sysext=./kubernetes.raw", spec))
			}
			files[name] = p
		}
		src = files
	}
	// The file is read without validation first: a stale pin (made for
	// another os.name or kubernetes.version) is what kiln pin repairs.
	// Everything else must validate, with the plan's downloads in place.
	raw, err := cluster.Read(g.clusterFile)
	if err != nil {
		return err
	}
	decoded, err := cluster.Decode(raw)
	if err != nil {
		return fmt.Errorf("%s: %w", g.clusterFile, err)
	}
	plan, dropped, err := pin.Plan(decoded, o.arches, o.refresh)
	if err != nil {
		return err
	}
	planned, err := pin.Rewrite(raw, plan)
	if err != nil {
		return err
	}
	c, err := cluster.LoadData(g.clusterFile, planned)
	if err != nil {
		return err
	}
	if skip := preflightNote(c); skip != "" {
		fmt.Fprintln(g.stderr, "kiln: note: "+skip)
	}
	if note := droppedNote(c, dropped); note != "" {
		fmt.Fprintln(g.stderr, "kiln: note: "+note)
	}
	if len(o.files) > 0 && len(o.arches) > 1 {
		return fault.Wrap(fault.Input, errors.New("--file hashes one arch's copy: also pass --arch amd64 or --arch arm64"))
	}
	if files, ok := src.(pin.Files); ok {
		var known []string
		for _, d := range plan {
			if !slices.Contains(known, d.Name) {
				known = append(known, d.Name)
			}
		}
		for name := range files {
			if !slices.Contains(known, name) {
				return fault.Wrap(fault.Input, fmt.Errorf("--file %s=...: %s nodes download no artifact of that name; use one of %s", name, c.OS.Name, strings.Join(known, ", ")))
			}
		}
	}
	done, err := pin.Hash(ctx, plan, o.arches, src, g.stderr)
	if err != nil {
		return err
	}
	updated, err := pin.Rewrite(raw, done)
	if err != nil {
		return err
	}
	if err := g.writePinned(updated); err != nil {
		return err
	}
	lines := []string{"pinned in " + g.clusterFile + ":"}
	for _, d := range done {
		state := d.SHA512
		if state == "" {
			state = "(not pinned)"
		} else {
			state = "sha512:" + state[:16] + "…"
		}
		lines = append(lines, fmt.Sprintf("  %-18s %-6s %s", d.Name, d.Arch, state))
	}
	return emit(g.stdout, o.output, done, lines...)
}

// droppedNote says which pins kiln pin dropped, grouped by why, or "".
func droppedNote(c *cluster.Cluster, dropped []cluster.Download) string {
	var whys []string
	byWhy := map[string][]string{}
	for _, d := range dropped {
		why := c.StalePin(d)
		if why == "" {
			why = "--refresh"
		}
		if byWhy[why] == nil {
			whys = append(whys, why)
		}
		byWhy[why] = append(byWhy[why], d.Name+" for "+d.Arch)
	}
	var parts []string
	for _, why := range whys {
		parts = append(parts, strings.Join(byWhy[why], ", ")+" ("+why+")")
	}
	if len(parts) == 0 {
		return ""
	}
	return "dropped the pins of " + strings.Join(parts, "; ")
}

// loadForPin reads the cluster file as it is (its text, which a pin
// command rewrites) and as it means (validated).
func (g *globals) loadForPin() ([]byte, *cluster.Cluster, error) {
	raw, err := os.ReadFile(g.clusterFile)
	if err != nil {
		return nil, nil, fault.Wrap(fault.Input, fmt.Errorf("read cluster file: %w", err))
	}
	c, err := g.loadCluster()
	return raw, c, err
}

// writePinned replaces the cluster file with updated, which a pin command
// made, after checking it still validates.
func (g *globals) writePinned(updated []byte) error {
	if _, err := cluster.Parse(updated); err != nil {
		return fmt.Errorf("pinned cluster file does not validate (please report this): %w", err)
	}
	return atomicfile.Write(g.clusterFile, updated, 0o644, true)
}
