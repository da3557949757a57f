package render

import (
	"cmp"
	"errors"
	"fmt"
	json "github.com/clarketm/json"
	"slices"
	"strings"

	butane "github.com/coreos/butane/config"
	"github.com/coreos/butane/config/common"
	"github.com/coreos/ignition/v2/config/v3_4"
	"github.com/coreos/ignition/v2/config/v3_4/types"
	"github.com/coreos/vcontext/report"
	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/profiles"
)

// Ignition renders the role's Ignition 3.4.0 config: kiln's Butane
// translated by the coreos library, with the cluster's Butane snippets
// merged in, validated by the Ignition library.
func Ignition(in Input) ([]byte, error) {
	bu, err := Butane(in)
	if err != nil {
		return nil, err
	}
	base, err := translate(bu, "")
	if err != nil {
		// kiln's own Butane must always translate cleanly.
		return nil, fmt.Errorf("translate kiln's butane: %w", err)
	}
	if base, err = mergeAll(base, butaneVariant(bu), in.Cluster, in.NodeName); err != nil {
		return nil, err
	}
	return encode(base)
}

// mergeAll merges the cluster's Butane snippets, then those of inventory
// node name (none for a role's config, name ""), into base.
func mergeAll(base types.Config, variant string, c *cluster.Cluster, name string) (types.Config, error) {
	// kiln's own paths and units: a node's snippet may replace what the
	// cluster's snippets wrote.
	managed := managedPaths(base)
	base, err := mergeSnippets(base, managed, variant, c.Snippets, "butane")
	if err != nil || name == "" {
		return base, err
	}
	i := slices.IndexFunc(c.Nodes, func(n cluster.Node) bool { return n.Name == name })
	if i < 0 {
		return base, nil
	}
	return mergeSnippets(base, managed, variant, c.Nodes[i].Snippets, fmt.Sprintf("nodes[%d].butane", i))
}

// mergeSnippets merges Butane snippets (those of the cluster file field
// field) into kiln's config, refusing a snippet of another variant, one
// that does not translate cleanly, and one that would override kiln's own
// files or units (managed, see managedPaths).
func mergeSnippets(base types.Config, managed map[string]bool, variant string, snippets []cluster.Snippet, field string) (types.Config, error) {
	for i, sn := range snippets {
		if v := butaneVariant(sn.Data); v != variant {
			return base, fault.Wrap(fault.Input, fmt.Errorf("%s[%d] (%s): variant %q, but the cluster's OS takes variant %q", field, i, sn.Path, v, variant))
		}
		cfg, err := translate(sn.Data, sn.Dir)
		if err != nil {
			return base, fault.Wrap(fault.Input, fmt.Errorf("%s[%d] (%s): %w", field, i, sn.Path, err))
		}
		if err := checkSnippet(cfg, managed); err != nil {
			return base, fault.Wrap(fault.Input, fmt.Errorf("%s[%d] (%s): %w", field, i, sn.Path, err))
		}
		base = v3_4.Merge(base, cfg)
	}
	return base, nil
}

// CheckSnippets is kiln validate's check of the cluster's Butane
// snippets: for every role, what rendering its Ignition config would
// refuse of them (see mergeSnippets), before anything is pinned. Only the
// paths and units of kiln's own config matter here, so downloads not
// pinned yet get placeholder pins and the agent a placeholder binary; the
// config built is thrown away. A cluster whose config cannot be built yet
// for another reason (an air-gapped one without its image pins) is not
// checked: render reports that reason itself.
func CheckSnippets(c *cluster.Cluster, s *secrets.Secrets) error {
	if len(c.Snippets) == 0 && !slices.ContainsFunc(c.Nodes, func(n cluster.Node) bool { return len(n.Snippets) > 0 }) {
		return nil
	}
	osp, err := profiles.LookupOS(c.OS.Name)
	if err != nil {
		return err
	}
	cc := *c
	placeholder := strings.Repeat("0", 128)
	cc.Kubernetes.Downloads = slices.Clone(c.Kubernetes.Downloads)
	for i := range cc.Kubernetes.Downloads {
		if d := &cc.Kubernetes.Downloads[i]; d.SHA512 == "" {
			d.SHA512 = placeholder
		}
	}
	for _, d := range osp.Downloads {
		if _, ok := cc.Pinned(d.Name, "amd64"); !ok {
			cc.Kubernetes.Downloads = append(cc.Kubernetes.Downloads, cluster.Download{Name: d.Name, Arch: "amd64", URL: "https://placeholder.invalid/" + d.Name, SHA512: placeholder})
		}
	}
	// Every role's config, then every inventory node's that has snippets.
	var ins []Input
	for _, role := range nodeconfig.Roles {
		ins = append(ins, Input{Role: role})
	}
	for _, n := range c.Nodes {
		if len(n.Snippets) > 0 {
			ins = append(ins, Input{Role: n.Role, NodeName: n.Name})
		}
	}
	for _, in := range ins {
		in.Cluster, in.Secrets, in.Arch, in.Agent = &cc, s, "amd64", []byte("placeholder")
		bu, err := Butane(in)
		if err != nil {
			return nil
		}
		base, err := translate(bu, "")
		if err != nil {
			return fmt.Errorf("translate kiln's butane: %w", err)
		}
		if _, err := mergeAll(base, butaneVariant(bu), c, in.NodeName); err != nil {
			return fmt.Errorf("%w (in the %s config)", err, cmp.Or(in.NodeName, string(in.Role)))
		}
	}
	return nil
}

// encode writes a config as Ignition reads it, after validating it
// exactly as Ignition does on the node.
func encode(cfg types.Config) ([]byte, error) {
	out, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, err
	}
	// Parse validates the result exactly as Ignition does on the node.
	if _, rpt, err := v3_4.Parse(out); err != nil || len(rpt.Entries) > 0 {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("rendered config does not validate: %v %s", err, rpt.String()))
	}
	return append(out, '\n'), nil
}

// translate turns Butane into an Ignition 3.4.0 config. Any Butane spec
// version that yields Ignition 3.0 to 3.4 is accepted; warnings count as
// errors, so typos in snippets do not pass silently. local: sources are
// read from filesDir (Butane refuses paths that leave it); "": none are
// allowed.
func translate(bu []byte, filesDir string) (types.Config, error) {
	ign, rpt, err := butane.TranslateBytes(bu, common.TranslateBytesOptions{TranslateOptions: common.TranslateOptions{FilesDir: filesDir}})
	if err != nil {
		return types.Config{}, reportError(err, rpt)
	}
	if len(rpt.Entries) > 0 {
		return types.Config{}, fmt.Errorf("butane: %s", strings.TrimSpace(rpt.String()))
	}
	cfg, rpt, err := v3_4.ParseCompatibleVersion(ign)
	if err != nil {
		return types.Config{}, fmt.Errorf("the Butane version yields an Ignition config kiln cannot merge (kiln writes Ignition 3.4.0; use variant flatcar 1.1.0 or fcos 1.5.0): %w", err)
	}
	if len(rpt.Entries) > 0 {
		return types.Config{}, fmt.Errorf("ignition: %s", strings.TrimSpace(rpt.String()))
	}
	return cfg, nil
}

func reportError(err error, rpt report.Report) error {
	if msg := strings.TrimSpace(rpt.String()); msg != "" {
		return fmt.Errorf("%w: %s", err, msg)
	}
	return err
}

// butaneVariant reads a Butane document's variant ("" if unreadable; the
// translation then reports the problem).
func butaneVariant(bu []byte) string {
	var head struct {
		Variant string `yaml:"variant"`
	}
	_ = yaml.Unmarshal(bu, &head)
	return head.Variant
}

// managedPaths lists what kiln's own config writes: files, links, and
// units whose contents kiln supplies.
func managedPaths(cfg types.Config) map[string]bool {
	out := map[string]bool{}
	for _, f := range cfg.Storage.Files {
		out[f.Path] = true
	}
	for _, l := range cfg.Storage.Links {
		out[l.Path] = true
	}
	for _, u := range cfg.Systemd.Units {
		if u.Contents != nil {
			out["unit:"+u.Name] = true
		}
	}
	return out
}

// checkSnippet refuses snippets that would override kiln's own files or
// units: merging would silently replace them and break the node's join.
func checkSnippet(cfg types.Config, managed map[string]bool) error {
	var errs []error
	check := func(p string) {
		if managed[p] || strings.HasPrefix(p, KilnDir+"/") || p == KilnDir {
			errs = append(errs, fmt.Errorf("%s is written by kiln itself: remove it from the snippet (use kubeadmPatches to change kubeadm settings)", p))
		}
	}
	for _, f := range cfg.Storage.Files {
		check(f.Path)
	}
	for _, l := range cfg.Storage.Links {
		check(l.Path)
	}
	for _, d := range cfg.Storage.Directories {
		check(d.Path)
	}
	for _, u := range cfg.Systemd.Units {
		// Enabling a unit or adding drop-ins is fine; replacing the
		// contents kiln wrote, or touching the agent's unit, is not.
		if u.Name == AgentUnit || managed["unit:"+u.Name] && u.Contents != nil {
			errs = append(errs, fmt.Errorf("unit %s is written by kiln itself: remove it from the snippet (a drop-in can extend it)", u.Name))
		}
	}
	return errors.Join(errs...)
}
