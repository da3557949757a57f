package render

import (
	"errors"
	"fmt"
	json "github.com/clarketm/json"
	"strings"

	butane "github.com/coreos/butane/config"
	"github.com/coreos/butane/config/common"
	"github.com/coreos/ignition/v2/config/v3_4"
	"github.com/coreos/ignition/v2/config/v3_4/types"
	"github.com/coreos/vcontext/report"
	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// Ignition renders the role's Ignition 3.4.0 config: kiln's Butane
// translated by the coreos library, with the cluster's Butane snippets
// merged in, validated by the Ignition library.
func Ignition(in Input) ([]byte, error) {
	bu, err := Butane(in)
	if err != nil {
		return nil, err
	}
	base, err := translate(bu)
	if err != nil {
		// kiln's own Butane must always translate cleanly.
		return nil, fmt.Errorf("translate kiln's butane: %w", err)
	}
	managed := managedPaths(base)
	variant := butaneVariant(bu)
	for i, sn := range in.Cluster.Snippets {
		if v := butaneVariant(sn.Data); v != variant {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("butane[%d] (%s): variant %q, but the cluster's OS takes variant %q", i, sn.Path, v, variant))
		}
		cfg, err := translate(sn.Data)
		if err != nil {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("butane[%d] (%s): %w", i, sn.Path, err))
		}
		if err := checkSnippet(cfg, managed); err != nil {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("butane[%d] (%s): %w", i, sn.Path, err))
		}
		base = v3_4.Merge(base, cfg)
	}
	return encode(base)
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
// errors, so typos in snippets do not pass silently.
func translate(bu []byte) (types.Config, error) {
	ign, rpt, err := butane.TranslateBytes(bu, common.TranslateBytesOptions{})
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
			errs = append(errs, fmt.Errorf("%s is written by kiln: remove it from the snippet (use kubeadmPatches to change kubeadm settings)", p))
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
			errs = append(errs, fmt.Errorf("unit %s is written by kiln: remove it from the snippet (a drop-in can extend it)", u.Name))
		}
	}
	return errors.Join(errs...)
}
