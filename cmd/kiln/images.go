package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/imagebuild/baseimage"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/images"
	"github.com/kilnproject/kiln/imagebuild/pin"
	"github.com/kilnproject/kiln/profiles"
)

func newImagesCmd(g *globals) *cobra.Command {
	var out outputFormat
	cmd := &cobra.Command{
		Use:   "images",
		Short: "List, pin and pull the container images the cluster's nodes run",
		Long: `images lists every container image the cluster's nodes run: kubeadm's own
(the control plane, kube-proxy, etcd, CoreDNS, pause, as kubeadm of the
cluster's Kubernetes minor deploys them), the pod network's, the load
balancer's, and those the add-on files name. Each is pinned by the digest of
its index: kiln's default, or the cluster file's images map.

An air-gapped cluster (airgap: true) needs every image pinned and pulled:
  kiln images pin     record the digests (from the registries, or --from a layout)
  kiln images pull    fetch and verify them into the image cache`,
		Example: `  kiln images
  kiln images -o json
  kiln images pin
  kiln images pin --from ./site-images.tar
  kiln images pull --arch arm64`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.loadCluster()
			if err != nil {
				return err
			}
			list, err := images.List(c)
			if err != nil {
				return err
			}
			lines := []string{fmt.Sprintf("%-24s %-28s %s", "NAME", "ROLES", "IMAGE")}
			unpinned := 0
			for _, e := range list {
				ref := e.Pinned()
				if e.Digest == "" {
					ref, unpinned = e.Reference+"  (no digest)", unpinned+1
				}
				if e.Stale != "" {
					ref += "  (the cluster file's pin " + e.Stale + " is for another Kubernetes version: ignored)"
				}
				lines = append(lines, fmt.Sprintf("%-24s %-28s %s", e.Name, roleList(e), ref))
			}
			if unpinned > 0 {
				lines = append(lines, fmt.Sprintf("%d image(s) without a digest: `kiln images pin` records them (air-gapped clusters need every one)", unpinned))
			}
			for i, a := range c.Addons {
				if a.URL != "" {
					fmt.Fprintf(g.stderr, "kiln: addons[%d] is a URL: the images it runs are not listed\n", i)
				}
			}
			return emit(g.stdout, out, list, lines...)
		},
	}
	addOutputFlag(cmd, &out)
	cmd.AddCommand(newImagesPinCmd(g), newImagesPullCmd(g))
	return cmd
}

func roleList(e images.Entry) string {
	s := make([]string, len(e.Roles))
	for i, r := range e.Roles {
		s[i] = string(r)
	}
	return strings.Join(s, ",")
}

// imageSourceOptions are the flags that say where images come from.
type imageSourceOptions struct {
	from     string
	cacheDir string
	timeout  time.Duration
}

func (o *imageSourceOptions) addFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&o.from, "from", "", "read the images from this OCI image layout (a folder or a tar of one) instead of their registries")
	f.StringVar(&o.cacheDir, "cache-dir", "", "download cache; images go to its images/ folder (default: kiln/ in the user cache folder)")
	f.DurationVar(&o.timeout, "timeout", 2*time.Hour, "give up after this long")
}

// context bounds a run by --timeout and stops it on Ctrl-C or SIGTERM
// (blobs half-fetched are not kept; the next run resumes).
func (o *imageSourceOptions) context(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, stop := interruptible(parent)
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	return ctx, func() { cancel(); stop() }
}

// store is the image cache beside the base images.
func (o *imageSourceOptions) store() (*images.Store, error) {
	dir := o.cacheDir
	if dir == "" {
		var err error
		if dir, err = baseimage.DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	return &images.Store{Dir: filepath.Join(dir, "images")}, nil
}

// open lists the cluster's images and opens the image cache and the
// source (the registries, or --from); the caller closes the source.
func (o *imageSourceOptions) open(ctx context.Context, c *cluster.Cluster) ([]images.Entry, *images.Store, images.Source, error) {
	list, err := images.List(c)
	if err != nil {
		return nil, nil, nil, err
	}
	st, err := o.store()
	if err != nil {
		return nil, nil, nil, err
	}
	var src images.Source
	if o.from == "" {
		src, err = images.NewRegistry()
	} else {
		src, err = images.OpenLayout(ctx, o.from, filepath.Join(st.Dir, "tmp"))
	}
	if err != nil {
		return nil, nil, nil, err
	}
	return list, st, src, nil
}

func newImagesPinCmd(g *globals) *cobra.Command {
	o := &imageSourceOptions{}
	var out outputFormat
	cmd := &cobra.Command{
		Use:   "pin",
		Short: "Record the digest of every image in the cluster file",
		Long: `pin writes the digest of each image without one into the cluster file's
images map, as the image's registry serves it now (a connected machine), or
as an OCI image layout holds it (--from: a folder or tar, such as
skopeo copy ... oci-archive:FILE writes). With --from, every image the
layout holds is re-pinned, kiln's defaults included: that is how a site
that mirrors or rebuilds its images makes the cluster use its own. The
manifest behind each digest is fetched and checked against it.`,
		Example: `  kiln images pin
  kiln images pin --from ./site-images
  kiln images pin --from ./site-images.tar -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := o.context(cmd.Context())
			defer cancel()
			return runImagesPin(ctx, g, o, out)
		},
	}
	o.addFlags(cmd)
	addOutputFlag(cmd, &out)
	return cmd
}

func runImagesPin(ctx context.Context, g *globals, o *imageSourceOptions, out outputFormat) error {
	raw, c, err := g.loadForPin()
	if err != nil {
		return err
	}
	list, _, src, err := o.open(ctx, c)
	if err != nil {
		return err
	}
	defer src.Close()
	changed, err := images.Pin(ctx, list, src, o.from != "")
	if err != nil {
		return err
	}
	pins := map[string]string{}
	for k, v := range c.Images {
		pins[k] = v
	}
	lines := []string{}
	for _, e := range changed {
		pins[e.Name] = e.Pinned()
		lines = append(lines, fmt.Sprintf("  %-24s %s", e.Name, e.Pinned()))
	}
	if len(changed) == 0 {
		return emit(g.stdout, out, changed, "every image is pinned already: "+g.clusterFile+" unchanged")
	}
	updated, err := pin.SetField(raw, pins, "images")
	if err != nil {
		return err
	}
	if err := g.writePinned(updated); err != nil {
		return err
	}
	return emit(g.stdout, out, changed, append([]string{"pinned in " + g.clusterFile + ":"}, lines...)...)
}

func newImagesPullCmd(g *globals) *cobra.Command {
	o := &imageSourceOptions{}
	var out outputFormat
	var arches []string
	cmd := &cobra.Command{
		Use:   "pull",
		Short: "Fetch and verify every image into the image cache",
		Long: `pull fetches every image the cluster's nodes run, for each arch (a multi-arch
index resolved to that arch's manifest), from its registry or from an OCI
image layout (--from: a folder or a tar of one, for machines with no
registry access). Every manifest and blob is checked against its digest
before it enters the cache (a content-addressed OCI layout in the download
cache); content that does not match is refused (exit 5) and not kept.
Blobs already cached are not fetched again, so an interrupted pull resumes.
Every image must be pinned first (kiln images pin).

Default arches: those the cluster's downloads are pinned for (kiln pin),
else amd64 and arm64.`,
		Example: `  kiln images pull
  kiln images pull --arch arm64
  kiln images pull --from /media/usb/cluster-images.tar -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := o.context(cmd.Context())
			defer cancel()
			c, err := g.loadCluster()
			if err != nil {
				return err
			}
			if len(arches) == 0 {
				arches = clusterArches(c)
			}
			if err := checkArches(arches...); err != nil {
				return err
			}
			list, st, src, err := o.open(ctx, c)
			if err != nil {
				return err
			}
			defer src.Close()
			start := time.Now()
			res, err := st.Pull(ctx, list, arches, src, g.stderr)
			if errors.Is(err, context.Canceled) {
				return fmt.Errorf("interrupted: blobs verified so far stay in the cache, nothing half-fetched is kept; run kiln images pull again to resume (%w)", err)
			}
			if err != nil {
				return err
			}
			var total, fetched int64
			lines := []string{fmt.Sprintf("%-24s %-6s %10s %10s", "NAME", "ARCH", "MiB", "FETCHED")}
			for _, r := range res {
				total, fetched = total+r.Bytes, fetched+r.Fetched
				lines = append(lines, fmt.Sprintf("%-24s %-6s %10.1f %10.1f", r.Name, r.Arch, mib(r.Bytes), mib(r.Fetched)))
			}
			lines = append(lines, fmt.Sprintf("%d image(s) in %s: %.1f MiB, %.1f MiB fetched in %.1fs", len(res), st.Dir, mib(total), mib(fetched), time.Since(start).Seconds()))
			return emit(g.stdout, out, res, lines...)
		},
	}
	o.addFlags(cmd)
	cmd.Flags().StringArrayVar(&arches, "arch", nil, "arch to pull (repeatable): amd64, arm64")
	addOutputFlag(cmd, &out)
	return cmd
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// clusterArches are the arches the cluster's downloads are pinned for, or
// every arch kiln supports when none is.
func clusterArches(c *cluster.Cluster) []string {
	if out := pinnedArches(c); len(out) > 0 {
		return out
	}
	return slices.Clone(pin.Arches)
}

// pinnedArches are the arches for which every download the cluster's OS
// needs is pinned (a validated cluster: its pins are not stale).
func pinnedArches(c *cluster.Cluster) []string {
	osp, err := profiles.LookupOS(c.OS.Name)
	if err != nil {
		return nil
	}
	out := []string{}
	for _, a := range pin.Arches {
		if !slices.ContainsFunc(osp.Downloads, func(pd profiles.Download) bool {
			d, ok := c.Pinned(pd.Name, a)
			return !ok || d.SHA512 == ""
		}) {
			out = append(out, a)
		}
	}
	return out
}
