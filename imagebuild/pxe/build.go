package pxe

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/cancel"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/render"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/imagebuild/workdir"
	"github.com/kilnproject/kiln/profiles"
)

// StateDir is where kiln serve keeps what it learns (pool assignments,
// reports); a rebuilt bundle keeps it.
const StateDir = "state"

// DefaultDisk is the install target when none is given.
const DefaultDisk = "/dev/sda"

// AssetFile is a boot file for the bundle: a verified download or a local
// file.
type AssetFile struct {
	Kind string
	// Path is the file on this machine; Name its file name in the bundle.
	Path, Name string
	// Algo and Hex, if set, are the digest Path was verified against
	// (sha512 or sha256): the bundle's copy must have it too, so a file
	// changed between its verification and the copy is not served.
	Algo, Hex string
}

// Options say what bundle to build.
type Options struct {
	Cluster *cluster.Cluster
	Secrets *secrets.Secrets
	Target  *profiles.Target
	// Agent is the gzip-compressed kiln-firstboot for the target's arch.
	Agent     []byte
	OSVersion string
	Assets    []AssetFile
	// Payload, for an air-gapped cluster, are the files its nodes fetch
	// from kiln serve (Kind AssetPayload; Name as render.Payload names
	// them): the Kubernetes downloads and each role's image archive.
	Payload []AssetFile
	// InstallImage, for an air-gapped cluster with install-mode nodes,
	// are the OS image of InstallVersion and its signature (Kinds
	// AssetInstallImage, AssetInstallSignature), which installers fetch
	// from kiln serve instead of the vendor's servers.
	InstallImage []AssetFile
	// ServerURL is where nodes reach kiln serve.
	ServerURL string
	// Modes maps a role to live or install (missing: install for init
	// and control-plane, live for workers).
	Modes map[nodeconfig.Role]string
	// Disk is the install target.
	Disk string
	// InstallVersion is the OS release install-mode nodes write to their
	// disk (empty: the cluster's os.version).
	InstallVersion string
	KernelArgs     []string
	// MatchboxURL, if set, is the matchbox endpoint the export in
	// matchbox/ points nodes at.
	MatchboxURL string
	// MatchboxKnownOnly leaves the worker role default's catch-all group
	// out of the matchbox export: only machines whose MAC the cluster
	// file names boot from matchbox.
	MatchboxKnownOnly bool
	// Dest is the bundle folder.
	Dest     string
	Force    bool
	Progress io.Writer
}

// Result describes a built bundle.
type Result struct {
	Dir     string       `json:"dir"`
	Profile string       `json:"profile"`
	Server  string       `json:"serverURL"`
	Nodes   []NodeResult `json:"nodes"`
	Assets  []Asset      `json:"assets"`
	Seconds float64      `json:"seconds"`
}

// NodeResult is one entry of a built bundle.
type NodeResult struct {
	Name    string          `json:"name"`
	Role    nodeconfig.Role `json:"role"`
	MAC     string          `json:"mac,omitempty"`
	Default bool            `json:"default,omitempty"`
	Mode    string          `json:"mode"`
	Config  string          `json:"config"`
	Script  string          `json:"script,omitempty"`
	Offline string          `json:"offline"`
}

// DefaultMode is a role's boot mode unless the operator says otherwise:
// control planes install (etcd must survive a reboot), workers run live.
func DefaultMode(r nodeconfig.Role) string {
	if r == nodeconfig.RoleWorker {
		return ModeLive
	}
	return ModeInstall
}

// Check reports bad options before anything is downloaded or written.
func (o *Options) Check() error {
	var errs []error
	u, err := url.Parse(o.ServerURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || strings.Trim(u.Path, "/") != "" {
		errs = append(errs, fmt.Errorf("--server-url %q: give the URL nodes reach kiln serve at, such as http://10.0.0.5:8080", o.ServerURL))
	}
	for role, m := range o.Modes {
		if m != ModeLive && m != ModeInstall {
			errs = append(errs, fmt.Errorf("mode for %s %q: use %s or %s", role, m, ModeLive, ModeInstall))
		}
	}
	for _, a := range o.KernelArgs {
		if a == "" || strings.ContainsAny(a, " \t\n") || strings.Contains(a, "${") || strings.HasPrefix(a, "ignition.config.url=") {
			errs = append(errs, fmt.Errorf("--kernel-arg %q: one argument without spaces or ${ (iPXE would expand it); kiln sets ignition.config.url itself", a))
		}
	}
	if o.Disk != "" {
		if err := cluster.CheckDisk(o.Disk); err != nil {
			errs = append(errs, fmt.Errorf("--disk: %w", err))
		}
	}
	for i, n := range o.Cluster.Nodes {
		if isDefaultName(n.Name) {
			errs = append(errs, fmt.Errorf("nodes[%d].name %q is the name of kiln's role default for %s: rename the node", i, n.Name, n.Role))
		}
	}
	names := map[string]bool{}
	for _, a := range o.Assets {
		if names[a.Name] {
			errs = append(errs, fmt.Errorf("two boot files are named %s: give the kernel, initramfs and rootfs files distinct names", a.Name))
		}
		names[a.Name] = true
	}
	if err := errors.Join(errs...); err != nil {
		return fault.Wrap(fault.Input, err)
	}
	if _, err := os.Stat(o.Dest); err == nil {
		if !o.Force {
			return fault.Wrap(fault.Input, fmt.Errorf("%s already exists: pass --force to rebuild it (tokens and kiln serve's state are kept; stop kiln serve first)", o.Dest))
		}
		if _, err := os.Stat(filepath.Join(o.Dest, ManifestFile)); err != nil {
			return fault.Wrap(fault.Input, fmt.Errorf("%s exists but is not a bundle (no %s): remove it or pick another --dest", o.Dest, ManifestFile))
		}
	}
	if o.Target.PXE == nil {
		return fault.Wrap(fault.Unsupported, fmt.Errorf("--profile %s cannot boot from the network: use a generic flatcar or fcos profile (kiln profiles)", o.Target.Name))
	}
	return nil
}

// roles are the roles that get a role default, in the bundle's order.
var roles = []nodeconfig.Role{nodeconfig.RoleInit, nodeconfig.RoleControlPlane, nodeconfig.RoleWorker}

func defaultName(r nodeconfig.Role) string { return "default-" + string(r) }

// isDefaultName reports whether name is reserved for a role default.
func isDefaultName(name string) bool {
	return slices.ContainsFunc(roles, func(r nodeconfig.Role) bool { return defaultName(r) == name })
}

// entries lists the bundle's nodes: the inventory, then a role default
// for each role (init only when the inventory names no init node).
func (o *Options) entries(prev *Manifest) ([]Node, error) {
	var out []Node
	hasInit := false
	add := func(n Node) error {
		n.Mode = o.Modes[n.Role]
		if n.Mode == "" {
			n.Mode = DefaultMode(n.Role)
		}
		if n.Mode == ModeInstall {
			n.Disk = o.Disk
			if inv, ok := o.Cluster.InventoryNode(n.Name); ok && inv.Disk != "" && !n.Default {
				n.Disk = inv.Disk
			}
		}
		// A rebuilt bundle keeps its tokens, so machines mid-boot and
		// kiln serve's assignments stay valid.
		if p, ok := prev.lookup(n.Name); ok && p.Role == n.Role && p.MAC == n.MAC {
			n.Token, n.ReportKey = p.Token, p.ReportKey
		} else {
			var err error
			if n.Token, err = randomHex(); err != nil {
				return err
			}
			if n.ReportKey, err = randomHex(); err != nil {
				return err
			}
		}
		n.Config = filepath.Join("configs", n.Name+".ign")
		out = append(out, n)
		return nil
	}
	for i, in := range o.Cluster.Nodes {
		n := Node{Name: in.Name, Role: in.Role}
		if in.MAC != "" {
			mac, err := NormalizeMAC(in.MAC)
			if err != nil {
				return nil, fault.Wrap(fault.Input, fmt.Errorf("nodes[%d].mac: %w", i, err))
			}
			n.MAC = mac
		}
		hasInit = hasInit || in.Role == nodeconfig.RoleInit
		if err := add(n); err != nil {
			return nil, err
		}
	}
	for _, r := range roles {
		if r == nodeconfig.RoleInit && hasInit {
			continue
		}
		if err := add(Node{Name: defaultName(r), Role: r, Default: true}); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// previous is the bundle a rebuild replaces (nil if there is none; Check
// has made sure an existing output may be replaced).
func (o *Options) previous() (*Manifest, error) {
	if _, err := os.Stat(o.Dest); err != nil {
		return nil, nil
	}
	prev, err := ReadManifest(o.Dest)
	if err != nil {
		return nil, fmt.Errorf("%s exists but is not a bundle kiln can rebuild (%w): remove it or pick another --dest", o.Dest, err)
	}
	return prev, nil
}

func (m *Manifest) lookup(name string) (*Node, bool) {
	if m == nil {
		return nil, false
	}
	return m.Node(name)
}

func randomHex() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fault.Wrap(fault.Environment, fmt.Errorf("random token: %w", err))
	}
	return hex.EncodeToString(b), nil
}

// Build writes the bundle to o.Dest: all of it, or nothing (it is built
// beside the output and renamed into place; kiln serve's state in a
// bundle it replaces is kept).
func Build(ctx context.Context, o Options) (*Result, error) {
	start := time.Now()
	if err := o.Check(); err != nil {
		return nil, err
	}
	if o.Disk == "" {
		o.Disk = DefaultDisk
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	prev, err := o.previous()
	if err != nil {
		return nil, err
	}
	if prev != nil {
		unlock, err := LockState(o.Dest)
		if err != nil {
			return nil, err
		}
		defer unlock()
	}
	osp, err := profiles.LookupOS(o.Cluster.OS.Name)
	if err != nil {
		return nil, err
	}
	nodes, err := o.entries(prev)
	if err != nil {
		return nil, err
	}
	m := &Manifest{
		Format: FormatVersion, Cluster: o.Cluster.Name, Profile: o.Target.Name, OS: o.Target.OS, Arch: o.Target.Arch,
		OSVersion: o.OSVersion, ServerURL: strings.TrimSuffix(o.ServerURL, "/"),
		KernelArgs: append(append([]string{}, osp.PXE.KernelArgs...), o.KernelArgs...), RootfsArg: osp.PXE.RootfsArg,
		Nodes: nodes,
	}
	if prev != nil {
		m.StatusToken = prev.StatusToken
	} else if m.StatusToken, err = randomHex(); err != nil {
		return nil, err
	}

	parent := filepath.Dir(filepath.Clean(o.Dest))
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	// A kiln pxe that was killed left its staging folder here.
	if err := workdir.Sweep(parent, ".pxe-*", o.Progress); err != nil {
		fmt.Fprintf(o.Progress, "could not remove a killed run's staging folder: %v\n", err)
	}
	wd, err := workdir.Make(parent, ".pxe-*")
	if err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	defer wd.Remove()
	tmp := wd.Path
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	w := &writer{ctx: ctx, dir: tmp}

	setDir := fmt.Sprintf("%s-%s-%s", o.Target.OS, o.Target.Arch, o.OSVersion)
	payloadSums := map[string]string{}
	for _, a := range slices.Concat(o.Assets, o.Payload, o.InstallImage) {
		rel := filepath.Join(setDir, a.Name)
		switch a.Kind {
		case AssetPayload:
			rel = filepath.Join(setDir, PayloadDir, a.Name)
		case AssetInstallImage, AssetInstallSignature:
			rel = filepath.Join(setDir, InstallDir, o.InstallVersion, a.Name)
		}
		sum, size, err := w.asset(filepath.Join("assets", rel), a)
		if err != nil {
			return nil, err
		}
		m.Assets = append(m.Assets, Asset{Kind: a.Kind, File: filepath.ToSlash(rel), SHA256: sum, Size: size})
		if a.Kind == AssetPayload {
			payloadSums[a.Name] = sum
		}
		fmt.Fprintf(o.Progress, "asset %s: %s (%.1f MiB)\n", a.Kind, rel, float64(size)/(1<<20))
	}
	if _, ok := m.Asset(AssetKernel); !ok {
		return nil, fault.Wrap(fault.Input, errors.New("no kernel: give --kernel and --initramfs, or let kiln download them"))
	}
	if o.Cluster.Airgap && len(o.Payload) == 0 {
		return nil, fault.Wrap(fault.Input, errors.New("the cluster is air-gapped but no payload was given"))
	}
	payloadURL := m.ServerURL + AssetPath + setDir + "/" + PayloadDir
	if o.Cluster.Airgap && len(o.InstallImage) == 0 && slices.ContainsFunc(m.Nodes, func(n Node) bool { return n.Mode == ModeInstall }) {
		return nil, fault.Wrap(fault.Input, ErrNoInstallImage)
	}

	res := &Result{Dir: o.Dest, Profile: o.Target.Name, Server: m.ServerURL, Assets: m.Assets}
	for i := range m.Nodes {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := &m.Nodes[i]
		var served *render.ServedPayload
		if o.Cluster.Airgap {
			sum, ok := payloadSums[render.ImagesArchive(n.Role)]
			if !ok {
				return nil, fault.Wrap(fault.Input, fmt.Errorf("%s: the payload has no %s", n.Name, render.ImagesArchive(n.Role)))
			}
			served = &render.ServedPayload{URL: payloadURL, ArchiveSHA256: sum}
		}
		nr, err := o.node(w, m, n, osp, served, m.ServerURL+AssetPath+setDir+"/"+InstallDir)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", n.Name, err)
		}
		res.Nodes = append(res.Nodes, nr)
		what := n.Mode
		if n.Mode == ModeInstall {
			what += " to " + n.Disk
		}
		fmt.Fprintf(o.Progress, "node %s (%s, %s): %s\n", n.Name, n.Role, what, nr.Config)
	}
	if o.MatchboxURL != "" {
		if err := o.matchbox(w, m); err != nil {
			return nil, err
		}
	}
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := w.file(ManifestFile, append(data, '\n'), 0o600); err != nil {
		return nil, err
	}
	if w.err != nil {
		return nil, w.err
	}
	if err := wd.Release(); err != nil { // the folder becomes the bundle
		return nil, fault.Wrap(fault.IO, err)
	}
	// Keep kiln serve's state across rebuilds.
	oldState, newState := filepath.Join(o.Dest, StateDir), filepath.Join(tmp, StateDir)
	moved := os.Rename(oldState, newState) == nil
	if err := atomicfile.ReplaceDir(tmp, o.Dest); err != nil {
		if moved {
			os.Rename(newState, oldState)
		}
		return nil, fmt.Errorf("write bundle: %w", err)
	}
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

// node renders one entry: its config (the node's own, or an installer
// holding it), its iPXE script when it has a MAC, and its offline variant.
// An air-gapped cluster's node fetches its payload as served says, and an
// installer the OS image from installFrom.
func (o *Options) node(w *writer, m *Manifest, n *Node, osp *profiles.OS, served *render.ServedPayload, installFrom string) (NodeResult, error) {
	in := render.Input{Cluster: o.Cluster, Secrets: o.Secrets, Role: n.Role, Arch: o.Target.Arch, Agent: o.Agent, ReportURL: m.ReportURL(n), Served: served}
	if !n.Default {
		in.NodeName = n.Name
	}
	config, err := render.Ignition(in)
	if err != nil {
		return NodeResult{}, err
	}
	if n.Mode == ModeInstall {
		ii := render.InstallInput{Cluster: o.Cluster, Config: config, Disk: n.Disk, Version: o.InstallVersion, DoneURL: m.ReportURL(n)}
		if o.Cluster.Airgap {
			ii.ImageURL = installFrom
		}
		if config, err = render.Installer(ii); err != nil {
			return NodeResult{}, err
		}
	}
	nr := NodeResult{Name: n.Name, Role: n.Role, MAC: n.MAC, Default: n.Default, Mode: n.Mode, Config: n.Config}
	w.file(n.Config, config, 0o600)
	if n.MAC != "" {
		nr.Script = filepath.Join("ipxe", n.Name+".ipxe")
		w.file(nr.Script, []byte(m.Script(n, n.MAC)), 0o600)
	}
	var cpio bytes.Buffer
	if err := ConfigInitramfs(&cpio, osp.PXE.InitrdConfig, config); err != nil {
		return NodeResult{}, err
	}
	nr.Offline = filepath.Join("offline", n.Name)
	w.file(filepath.Join(nr.Offline, OfflineConfig), cpio.Bytes(), 0o600)
	w.file(filepath.Join(nr.Offline, "boot.ipxe"), []byte(m.OfflineScript(n, OfflineConfig)), 0o600)
	return nr, w.err
}

// ErrNoInstallImage: an air-gapped bundle with install-mode nodes was
// given no OS image for them.
var ErrNoInstallImage = errors.New("air-gapped install-mode nodes install the OS from kiln serve, so the bundle needs the release's image: let kiln pxe download the PXE files (no --kernel/--initramfs; --mirror may point at a local copy of the release folder), or boot those roles live (--mode ROLE=live)")

// OfflineConfig is the file name of a node's config initramfs in its
// offline folder.
const OfflineConfig = "config.img"

// writer writes the bundle's files, keeping the first error.
type writer struct {
	ctx context.Context // asset copies stop when it is done
	dir string
	err error
}

func (w *writer) file(rel string, data []byte, perm os.FileMode) error {
	if w.err != nil {
		return w.err
	}
	p := filepath.Join(w.dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		w.err = fault.Wrap(fault.IO, err)
		return w.err
	}
	if err := atomicfile.Write(p, data, perm, false); err != nil {
		w.err = err
	}
	return w.err
}

// asset copies a.Path into the bundle and returns the copy's sha256 and
// size, after checking the copy against a's verified digest if it has
// one. A copy, never a hard link: the bundle must not share storage with
// the cache or the input it came from, or a later change to either would
// change what is served (Linux's copy_file_range makes the copy a reflink
// where the filesystem can).
func (w *writer) asset(rel string, a AssetFile) (string, int64, error) {
	dst := filepath.Join(w.dir, rel)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", 0, fault.Wrap(fault.IO, err)
	}
	in, err := os.Open(a.Path)
	if err != nil {
		return "", 0, fault.Wrap(fault.Input, err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
	if err != nil {
		return "", 0, fault.Wrap(fault.IO, err)
	}
	defer out.Close()
	if _, err := io.Copy(out, in); err != nil {
		return "", 0, fault.Wrap(fault.IO, fmt.Errorf("copy %s: %w", a.Path, err))
	}
	// The digests are of the copy: what kiln serve will send.
	if _, err := out.Seek(0, io.SeekStart); err != nil {
		return "", 0, fault.Wrap(fault.IO, err)
	}
	h := sha256.New()
	hashes := io.Writer(h)
	var verified hash.Hash
	switch a.Algo {
	case "":
	case "sha512":
		verified = sha512.New()
	case "sha256":
		verified = sha256.New()
	default:
		return "", 0, fmt.Errorf("asset %s: unknown digest %s", a.Name, a.Algo)
	}
	if verified != nil {
		hashes = io.MultiWriter(h, verified)
	}
	n, err := io.Copy(hashes, cancel.Reader(w.ctx, out))
	if err == nil {
		err = out.Close()
	}
	if w.ctx.Err() != nil {
		return "", 0, w.ctx.Err()
	}
	if err != nil {
		return "", 0, fault.Wrap(fault.IO, fmt.Errorf("copy %s: %w", a.Path, err))
	}
	if verified != nil {
		if got := hex.EncodeToString(verified.Sum(nil)); got != a.Hex {
			return "", 0, fault.Wrap(fault.Download, fmt.Errorf("%s changed after it was verified (the bundle's copy has %s %s, the release %s): is something writing to kiln's cache? Run kiln pxe again", a.Path, a.Algo, got, a.Hex))
		}
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}
