package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/bake"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/profiles"
)

// allResult is one image of build-image --all, as -o json prints it.
type allResult struct {
	Node    string       `json:"node,omitempty"`
	Role    string       `json:"role"`
	Profile string       `json:"profile"`
	Result  *bake.Result `json:"result,omitempty"`
	Error   string       `json:"error,omitempty"`
}

// runBuildAll bakes every inventory node and one image per role for the
// machines named by hostname.template: each target's base image fetched
// and decompressed once, configs and payloads prepared one by one, then
// the bakes in parallel (up to the number of CPUs), each all or nothing. A
// failed bake is reported and the others go on; the summary lists all.
func runBuildAll(ctx context.Context, g *globals, o *buildImageOptions) error {
	if o.node != "" || o.role != "" {
		return fault.Wrap(fault.Input, fmt.Errorf("--all bakes every node and role: drop --node and --role"))
	}
	c, s, err := o.load(g)
	if err != nil {
		return err
	}
	jobs, skipped, err := planAll(c, o.profile)
	if err != nil {
		return err
	}
	if len(jobs) == 0 {
		return fault.Wrap(fault.Input, fmt.Errorf("nothing to bake: the cluster file lists no nodes and names no profile for the role images (set profile:, or give --profile)"))
	}
	if len(skipped) > 0 {
		fmt.Fprintf(g.stderr, "no %s image: the cluster file names no profile for machines outside nodes (set profile:, or give --profile)\n", joinRoles(skipped))
	}
	var targets []*profiles.Target
	for _, j := range jobs {
		if !slices.ContainsFunc(targets, func(t *profiles.Target) bool { return t.Name == j.target.Name }) {
			targets = append(targets, j.target)
		}
	}
	if err := o.checkBaseImages(targets); err != nil {
		return err
	}
	if o.firmware != "" && !slices.ContainsFunc(targets, func(t *profiles.Target) bool { return t.Firmware != nil }) {
		return fault.Wrap(fault.Input, fmt.Errorf("--firmware: none of the profiles baked (%s) takes board firmware", strings.Join(names(targets), ", ")))
	}
	cache, err := o.download.cache(g)
	if err != nil {
		return err
	}
	var who []string
	for _, j := range jobs {
		who = append(who, j.who())
	}
	fmt.Fprintf(g.stderr, "build-image --all: %d images (%s) for %d profiles\n", len(jobs), strings.Join(who, ", "), len(targets))

	opts := make([]bake.Options, len(jobs))
	for i, j := range jobs {
		var cleanup func()
		opts[i], cleanup, err = o.prepare(ctx, g, c, s, cache, j)
		defer cleanup()
		if err != nil {
			return fmt.Errorf("%s: %w", j.who(), err)
		}
	}
	bases := map[string]baseImage{} // by profile
	for _, t := range targets {
		b, err := o.fetchBase(ctx, c, cache, t, o.baseImageFor(t, len(targets)))
		if err != nil {
			return fmt.Errorf("profile %s: %w", t.Name, err)
		}
		if t.Firmware == nil {
			b.firmware = "" // --firmware is for the board profiles
		}
		bases[t.Name] = b
	}

	start := time.Now()
	results := make([]allResult, len(jobs))
	errs := make([]error, len(jobs))
	var mu sync.Mutex // one progress line at a time on stderr
	sem := make(chan struct{}, runtime.NumCPU())
	var wg sync.WaitGroup
	for i, j := range jobs {
		b := bases[j.target.Name]
		opts[i].Base, opts[i].BaseGiven, opts[i].Firmware = b.path, b.given, b.firmware
		opts[i].Progress = &prefixWriter{prefix: "[" + j.who() + "] ", w: g.stderr, mu: &mu}
		results[i] = allResult{Node: j.node, Role: string(j.role), Profile: j.target.Name}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			results[i].Result, errs[i] = bake.Bake(ctx, opts[i])
			if errs[i] != nil {
				results[i].Error = errs[i].Error()
				mu.Lock()
				fmt.Fprintf(g.stderr, "[%s] failed: %v\n", j.who(), errs[i])
				mu.Unlock()
			}
		}()
	}
	wg.Wait()

	var table bytes.Buffer
	tw := tabwriter.NewWriter(&table, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE FOR\tROLE\tPROFILE\tRESULT\tMiB MAPPED\tSECONDS")
	var failed []string
	for i, r := range results {
		if errs[i] != nil {
			failed = append(failed, jobs[i].who())
			fmt.Fprintf(tw, "%s\t%s\t%s\tfailed: %s\t-\t-\n", jobs[i].who(), r.Role, r.Profile, firstLine(r.Error))
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.1f\t%.1f\n", jobs[i].who(), r.Role, r.Profile, filepath.Base(r.Result.Image), float64(r.Result.MappedBytes)/(1<<20), r.Result.Seconds)
	}
	tw.Flush()
	summary := fmt.Sprintf("%d of %d images baked in %.1fs, in %s (each with its .bmap and .sha256)", len(jobs)-len(failed), len(jobs), time.Since(start).Seconds(), o.dest)
	if err := emit(g.stdout, o.output, struct {
		Images  []allResult `json:"images"`
		Seconds float64     `json:"seconds"`
	}{results, time.Since(start).Seconds()}, strings.TrimRight(table.String(), "\n"), summary); err != nil {
		return err
	}
	if len(failed) > 0 {
		// The exit code is the first failure's kind.
		first := errs[slices.IndexFunc(errs, func(e error) bool { return e != nil })]
		return fault.Wrap(fault.KindOf(first), fmt.Errorf("%d of %d images failed (%s); the others are in %s", len(failed), len(jobs), strings.Join(failed, ", "), o.dest))
	}
	return nil
}

// planAll lists build-image --all's images: every inventory node with its
// own profile, then one image per role that has machines booted from a
// role image (cluster.RoleImageMachines), with the cluster's profile.
// profile (--profile) stands in where the cluster file names none. The
// role images are skipped when neither names a profile: a fleet fully
// listed in nodes has no machine to bake them for.
func planAll(c *cluster.Cluster, profile string) (jobs []bakeJob, skipped []nodeconfig.Role, _ error) {
	var errs []error
	add := func(j bakeJob, p, field string) {
		if p == "" {
			errs = append(errs, fmt.Errorf("%s has no profile: set %s, or profile: for the whole cluster, or give --profile", j.who(), field))
			return
		}
		var err error
		if j.target, err = targetFor(c, p); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", j.who(), err))
			return
		}
		jobs = append(jobs, j)
	}
	for i, n := range c.Nodes {
		add(bakeJob{node: n.Name, role: n.Role}, cmp.Or(c.NodeProfile(n), profile), fmt.Sprintf("nodes[%d].profile", i))
	}
	m := c.RoleImageMachines()
	for _, r := range []nodeconfig.Role{nodeconfig.RoleInit, nodeconfig.RoleControlPlane, nodeconfig.RoleWorker} {
		if m[r] == 0 {
			continue
		}
		if p := cmp.Or(c.Profile, profile); p != "" {
			add(bakeJob{role: r}, p, "profile")
		} else {
			skipped = append(skipped, r)
		}
	}
	return jobs, skipped, fault.Wrap(fault.Input, errors.Join(errs...))
}

// checkBaseImages refuses --base-image values that fit none of the run's
// targets: PROFILE=FILE naming a profile nothing is baked for, or a plain
// FILE when the images are for several profiles.
func (o *buildImageOptions) checkBaseImages(targets []*profiles.Target) error {
	names := names(targets)
	for _, v := range o.baseImages {
		switch profile, _ := splitBaseImage(v); {
		case profile != "" && !slices.Contains(names, profile):
			return fault.Wrap(fault.Input, fmt.Errorf("--base-image %s: no image is baked for profile %s (the profiles are %s)", v, profile, strings.Join(names, ", ")))
		case profile == "" && len(targets) > 1:
			return fault.Wrap(fault.Input, fmt.Errorf("--base-image %s: the images are for %d profiles (%s): give --base-image PROFILE=FILE for each", v, len(targets), strings.Join(names, ", ")))
		}
	}
	return nil
}

// names are the targets' profile names.
func names(targets []*profiles.Target) []string {
	var out []string
	for _, t := range targets {
		out = append(out, t.Name)
	}
	return out
}

// prefixWriter writes each line (ended by \n, or \r for a progress line
// redrawn in place) to w behind prefix, one line at a time across the
// writers sharing mu.
type prefixWriter struct {
	prefix string
	w      io.Writer
	mu     *sync.Mutex
	buf    []byte
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.buf = append(p.buf, b...)
	for {
		i := bytes.IndexAny(p.buf, "\n\r")
		if i < 0 {
			return len(b), nil
		}
		p.mu.Lock()
		_, err := fmt.Fprintf(p.w, "%s%s", p.prefix, p.buf[:i+1])
		p.mu.Unlock()
		p.buf = p.buf[i+1:]
		if err != nil {
			return len(b), err
		}
	}
}

// joinRoles is "a, b or c".
func joinRoles(roles []nodeconfig.Role) string {
	var s []string
	for _, r := range roles {
		s = append(s, string(r))
	}
	if len(s) < 2 {
		return strings.Join(s, "")
	}
	return strings.Join(s[:len(s)-1], ", ") + " or " + s[len(s)-1]
}

// firstLine is the first line of s.
func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}
