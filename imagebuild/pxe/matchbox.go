package pxe

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// MatchboxDir holds the export in matchbox's data layout.
const MatchboxDir = "matchbox"

// matchbox profile and group documents (matchbox's JSON field names).
type (
	mbProfile struct {
		ID         string `json:"id"`
		Name       string `json:"name"`
		Boot       mbBoot `json:"boot"`
		IgnitionID string `json:"ignition_id"`
	}
	mbBoot struct {
		Kernel string   `json:"kernel"`
		Initrd []string `json:"initrd"`
		Args   []string `json:"args"`
	}
	mbGroup struct {
		ID       string            `json:"id"`
		Name     string            `json:"name"`
		Profile  string            `json:"profile"`
		Selector map[string]string `json:"selector,omitempty"`
	}
)

const matchboxReadme = `kiln's export for matchbox (https://matchbox.psdn.io): copy profiles/,
groups/ and ignition/ into matchbox's data folder (-data-path), and the
bundle's assets/ folder into matchbox's assets folder (-assets-path).

Nodes with a MAC in the cluster file get a group selecting that MAC.
%s Matchbox hands configs out by MAC alone,
with no per-node token: keep its port on the provisioning network only.
Matchbox does not know when a node has installed: install-mode nodes must
boot from their disk first (network second), or they install again on
every boot. The configs still name kiln serve as their report URL; without
it the agents' reports are dropped and nothing else changes.
`

// matchbox writes the export: a profile and Ignition config per entry,
// a group per MAC, and the worker default as the catch-all group unless
// o.MatchboxKnownOnly.
func (o *Options) matchbox(w *writer, m *Manifest) error {
	base := strings.TrimSuffix(o.MatchboxURL, "/")
	assetURL := func(a Asset) string { return "/assets/" + a.File }
	configArg := "ignition.config.url=" + base + "/ignition?uuid=${uuid}&mac=${mac:hexhyp}"
	for i := range m.Nodes {
		n := &m.Nodes[i]
		id := m.Cluster + "-" + n.Name
		b := m.bootFor(assetURL, []string{configArg}, nil)
		// Matchbox's iPXE template loads each initrd as written; a
		// rootfs URL must be absolute.
		for j, a := range b.args {
			if strings.HasPrefix(a, m.RootfsArg+"=/") && m.RootfsArg != "" {
				b.args[j] = m.RootfsArg + "=" + base + strings.TrimPrefix(a, m.RootfsArg+"=")
			}
		}
		p := mbProfile{ID: id, Name: fmt.Sprintf("kiln %s: %s (%s, %s)", m.Cluster, n.Name, n.Role, n.Mode),
			Boot: mbBoot{Kernel: b.kernel, Initrd: b.initrds, Args: b.args}, IgnitionID: id + ".ign"}
		if err := w.json(filepath.Join(MatchboxDir, "profiles", id+".json"), p, 0o644); err != nil {
			return err
		}
		if err := w.link(filepath.Join(MatchboxDir, "ignition", id+".ign"), n.Config); err != nil {
			return err
		}
		g := mbGroup{ID: id, Name: p.Name, Profile: id}
		switch {
		case n.MAC != "":
			g.Selector = map[string]string{"mac": n.MAC}
		case n.Default && n.Role == "worker" && !o.MatchboxKnownOnly:
		default:
			continue // pool slots and other defaults: no group
		}
		if err := w.json(filepath.Join(MatchboxDir, "groups", id+".json"), g, 0o644); err != nil {
			return err
		}
	}
	catchAll := "The worker role default is matchbox's catch-all group (no selector):\nevery other machine boots as a worker."
	if o.MatchboxKnownOnly {
		catchAll = "No other machine gets a group (kiln pxe --matchbox-known-only):\nmatchbox boots no machine the cluster file does not name."
	}
	return w.file(filepath.Join(MatchboxDir, "README"), fmt.Appendf(nil, matchboxReadme, catchAll), 0o644)
}

func (w *writer) json(rel string, v any, perm os.FileMode) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // keep & readable in kernel arguments
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return err
	}
	return w.file(rel, buf.Bytes(), perm)
}

// link makes rel a hard link to the bundle file target (the same bytes,
// stored once).
func (w *writer) link(rel, target string) error {
	if w.err != nil {
		return w.err
	}
	p := filepath.Join(w.dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		w.err = fault.Wrap(fault.IO, err)
	} else if err := os.Link(filepath.Join(w.dir, target), p); err != nil {
		w.err = fault.Wrap(fault.IO, err)
	}
	return w.err
}
