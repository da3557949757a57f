package pxe

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/internal/golden"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/profiles"
)

const clusterYAML = `apiVersion: kiln.dev/v1alpha1
kind: Cluster
name: rack
controlPlaneEndpoint: lb.rack.test:6443
kubernetes:
  downloads:
DOWNLOADS
os: {name: OS}
nodes:
  - {name: cp-1, role: init, mac: "52:54:00:00:00:01"}
  - {name: cp-2, role: control-plane, mac: "52-54-00-00-00-02"}
  - {name: cp-3, role: control-plane}
  - {name: w-1, role: worker, mac: "52:54:00:00:00:11"}
`

var testSecrets *secrets.Secrets

func fixture(t *testing.T, osName, profile string) Options {
	t.Helper()
	if testSecrets == nil {
		s, err := secrets.Generate("rack", time.Now(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		testSecrets = s
	}
	osp, err := profiles.LookupOS(osName)
	if err != nil {
		t.Fatal(err)
	}
	var downloads []string
	for _, d := range osp.Downloads {
		downloads = append(downloads, "    - {name: "+d.Name+", arch: amd64, os: "+osName+", kubernetesVersion: "+cluster.DefaultKubernetesVersion+", url: 'https://e.test/"+d.Name+"', sha512: "+strings.Repeat("ab", 64)+"}")
	}
	c, err := cluster.Parse([]byte(strings.NewReplacer("DOWNLOADS", strings.Join(downloads, "\n"), "OS", osName).Replace(clusterYAML)))
	if err != nil {
		t.Fatal(err)
	}
	tg, err := profiles.LookupTarget(profile)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var assets []AssetFile
	kinds := []string{AssetKernel, AssetInitramfs}
	if tg.PXE.Stream {
		kinds = append(kinds, AssetRootfs)
	}
	for _, k := range kinds {
		p := filepath.Join(dir, k+".bin")
		if err := os.WriteFile(p, []byte("fake "+k), 0o644); err != nil {
			t.Fatal(err)
		}
		assets = append(assets, AssetFile{Kind: k, Path: p, Name: k + ".bin"})
	}
	return Options{
		Cluster: c, Secrets: testSecrets, Target: tg, Agent: []byte("agent"), OSVersion: "1.2.3", Assets: assets,
		ServerURL: "http://10.0.0.5:8080/", Dest: filepath.Join(dir, "bundle"),
	}
}

func TestBuildBundle(t *testing.T) {
	o := fixture(t, "flatcar", "flatcar-amd64")
	o.Cluster.Nodes[1].Disk = "/dev/disk/by-id/nvme-cp-2" // nodes[].disk wins over --disk
	o.KernelArgs = []string{"console=ttyS0"}
	o.MatchboxURL = "http://matchbox.test:8080/"
	res, err := Build(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ReadManifest(o.Dest)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, n := range m.Nodes {
		got = append(got, strings.Join([]string{n.Name, string(n.Role), n.MAC, n.Mode, n.Disk}, "/"))
	}
	want := []string{
		"cp-1/init/52:54:00:00:00:01/install//dev/sda",
		"cp-2/control-plane/52:54:00:00:00:02/install//dev/disk/by-id/nvme-cp-2",
		"cp-3/control-plane//install//dev/sda",
		"w-1/worker/52:54:00:00:00:11/live/",
		"default-control-plane/control-plane//install//dev/sda",
		"default-worker/worker//live/",
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("nodes:\n got %v\nwant %v", got, want)
	}
	if m.ServerURL != "http://10.0.0.5:8080" || len(res.Nodes) != len(want) {
		t.Errorf("server %q, %d results", m.ServerURL, len(res.Nodes))
	}
	// The assets are the bundle's own: changing an input afterwards
	// changes nothing that is served.
	for i, a := range m.Assets {
		served := filepath.Join(o.Dest, "assets", a.File)
		in, _ := os.Stat(o.Assets[i].Path)
		out, err := os.Stat(served)
		if err != nil || os.SameFile(in, out) {
			t.Errorf("asset %s shares storage with %s (%v)", a.File, o.Assets[i].Path, err)
		}
		os.WriteFile(o.Assets[i].Path, []byte("changed"), 0o644)
		if data, _ := os.ReadFile(served); string(data) != "fake "+a.Kind {
			t.Errorf("asset %s changed with its input: %q", a.File, data)
		}
	}
	tokens := map[string]bool{m.StatusToken: true}
	for _, n := range m.Nodes {
		for _, tok := range []string{n.Token, n.ReportKey} {
			if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(tok) || tokens[tok] {
				t.Errorf("%s: token %q is not a fresh 256-bit hex token", n.Name, tok)
			}
			tokens[tok] = true
		}
	}
	// Everything that carries a token or a config is private.
	filepath.WalkDir(o.Dest, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(o.Dest, p)
		fi, _ := d.Info()
		private := !strings.HasPrefix(rel, "assets/") && !strings.HasPrefix(rel, "matchbox/profiles/") && !strings.HasPrefix(rel, "matchbox/groups/") && rel != "matchbox/README"
		if private && fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", rel, fi.Mode().Perm())
		}
		return nil
	})
	cp2, _ := m.Node("cp-2")
	script, err := os.ReadFile(filepath.Join(o.Dest, "ipxe", "cp-2.ipxe"))
	if err != nil || string(script) != m.Script(cp2, cp2.MAC) {
		t.Errorf("ipxe/cp-2.ipxe differs from what kiln serve hands out (%v)", err)
	}
	wantScript := "#!ipxe\n# kiln cluster rack: cp-2 (control-plane, install)\n" +
		"kernel http://10.0.0.5:8080/assets/flatcar-amd64-1.2.3/kernel.bin initrd=initramfs.bin flatcar.first_boot=1 console=ttyS0 " +
		"ignition.config.url=http://10.0.0.5:8080/config/cp-2?mac=52-54-00-00-00-02&token=" + cp2.Token + "\n" +
		"initrd http://10.0.0.5:8080/assets/flatcar-amd64-1.2.3/initramfs.bin\nboot\n"
	if string(script) != wantScript {
		t.Errorf("script:\n%s\nwant:\n%s", script, wantScript)
	}
	offline, _ := os.ReadFile(filepath.Join(o.Dest, "offline", "w-1", "boot.ipxe"))
	if !strings.Contains(string(offline), "initrd config.img\n") || !strings.Contains(string(offline), "kernel ../../assets/flatcar-amd64-1.2.3/kernel.bin initrd=initramfs.bin initrd=config.img ") || strings.Contains(string(offline), "token") {
		t.Errorf("offline script:\n%s", offline)
	}
	for _, f := range []string{"cp-1", "cp-2", "w-1", "default-worker"} {
		var g mbGroup
		data, err := os.ReadFile(filepath.Join(o.Dest, "matchbox", "groups", "rack-"+f+".json"))
		if err == nil {
			err = json.Unmarshal(data, &g)
		}
		n, _ := m.Node(f)
		if err != nil || g.Profile != "rack-"+f || g.Selector["mac"] != n.MAC {
			t.Errorf("matchbox group %s: %+v %v", f, g, err)
		}
	}
	if _, err := os.Stat(filepath.Join(o.Dest, "matchbox", "groups", "rack-cp-3.json")); err == nil {
		t.Error("a pool slot got a matchbox group")
	}
	profile, _ := os.ReadFile(filepath.Join(o.Dest, "matchbox", "profiles", "rack-w-1.json"))
	if !strings.Contains(string(profile), `"ignition.config.url=http://matchbox.test:8080/ignition?uuid=${uuid}&mac=${mac:hexhyp}"`) {
		t.Errorf("matchbox profile does not point at matchbox:\n%s", profile)
	}
}

// TestMatchboxKnownOnly: without the catch-all group, matchbox boots only
// the machines the cluster file names.
func TestMatchboxKnownOnly(t *testing.T) {
	o := fixture(t, "flatcar", "flatcar-amd64")
	o.MatchboxURL = "http://matchbox.test:8080"
	o.MatchboxKnownOnly = true
	if _, err := Build(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	groups, err := os.ReadDir(filepath.Join(o.Dest, MatchboxDir, "groups"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, g := range groups {
		names = append(names, g.Name())
	}
	if strings.Join(names, " ") != "rack-cp-1.json rack-cp-2.json rack-w-1.json" {
		t.Errorf("groups %v, want one per MAC and no catch-all", names)
	}
	readme, _ := os.ReadFile(filepath.Join(o.Dest, MatchboxDir, "README"))
	if !strings.Contains(string(readme), "matchbox boots no machine the cluster file does not name") || strings.Contains(string(readme), "catch-all") {
		t.Errorf("README:\n%s", readme)
	}
}

func TestInstallerCarriesNodeConfig(t *testing.T) {
	o := fixture(t, "flatcar", "flatcar-amd64")
	o.Modes = map[nodeconfig.Role]string{nodeconfig.RoleWorker: ModeInstall}
	o.Disk = "/dev/nvme0n1"
	o.InstallVersion = "4593.2.3"
	if _, err := Build(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	m, _ := ReadManifest(o.Dest)
	w, _ := m.Node("w-1")
	cfg, _ := os.ReadFile(filepath.Join(o.Dest, w.Config))
	for _, want := range []string{"flatcar-install -d /dev/nvme0n1 -C stable -V 4593.2.3 -i /var/lib/kiln-install/config.ign", "ExecStart=-/var/lib/kiln-install/report"} {
		if !bytes.Contains(cfg, []byte(want)) {
			t.Errorf("w-1's installer lacks %q", want)
		}
	}
}

func TestFCOSBundle(t *testing.T) {
	o := fixture(t, "fcos", "fcos-x86_64")
	if _, err := Build(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(o.Dest, MatchboxDir)); err == nil {
		t.Error("a matchbox export was written without --matchbox-url")
	}
	m, _ := ReadManifest(o.Dest)
	w, _ := m.Node("w-1")
	s := m.Script(w, w.MAC)
	if !strings.Contains(s, " ignition.firstboot ignition.platform.id=metal coreos.live.rootfs_url=http://10.0.0.5:8080/assets/fcos-amd64-1.2.3/rootfs.bin ignition.config.url=") {
		t.Errorf("fcos script:\n%s", s)
	}
	off := m.OfflineScript(w, OfflineConfig)
	if !strings.Contains(off, "initrd=initramfs.bin initrd=rootfs.bin initrd=config.img ") || strings.Contains(off, "rootfs_url") {
		t.Errorf("fcos offline script appends the rootfs:\n%s", off)
	}
}

func TestRebuildKeepsTokensAndState(t *testing.T) {
	o := fixture(t, "flatcar", "flatcar-amd64")
	if _, err := Build(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	before, _ := ReadManifest(o.Dest)
	state := filepath.Join(o.Dest, StateDir, "assignments.json")
	os.MkdirAll(filepath.Dir(state), 0o700)
	os.WriteFile(state, []byte("{}"), 0o600)
	if _, err := Build(context.Background(), o); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("rebuild without --force: %v", err)
	}
	o.Force = true
	// Not while kiln serve holds the bundle.
	unlock, err := LockState(o.Dest)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Build(context.Background(), o); err == nil || !strings.Contains(err.Error(), "in use by a running kiln serve") {
		t.Errorf("rebuild under a running server: %v", err)
	}
	unlock()
	if _, err := Build(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	after, _ := ReadManifest(o.Dest)
	if after.StatusToken != before.StatusToken || after.Nodes[0].Token != before.Nodes[0].Token || after.Nodes[0].ReportKey != before.Nodes[0].ReportKey {
		t.Error("a rebuild changed the tokens")
	}
	if _, err := os.Stat(state); err != nil {
		t.Errorf("kiln serve's state was lost: %v", err)
	}
}

func TestBadInputWritesNothing(t *testing.T) {
	for name, edit := range map[string]func(*Options){
		"server url":   func(o *Options) { o.ServerURL = "10.0.0.5:8080" },
		"server query": func(o *Options) { o.ServerURL = "http://10.0.0.5/?a=b" },
		"mode":         func(o *Options) { o.Modes = map[nodeconfig.Role]string{nodeconfig.RoleWorker: "ram"} },
		"kernel arg":   func(o *Options) { o.KernelArgs = []string{"ignition.config.url=http://x"} },
		"ipxe syntax":  func(o *Options) { o.KernelArgs = []string{"x=${net0/ip}"} },
		"disk":         func(o *Options) { o.Disk = "sda" },
		"default name": func(o *Options) { o.Cluster.Nodes[3].Name = "default-worker" },
		"asset":        func(o *Options) { o.Assets[1].Path = "/nonexistent" },
		// The initramfs no longer has the digest it was verified with.
		"changed asset": func(o *Options) { o.Assets[1].Algo, o.Assets[1].Hex = "sha512", strings.Repeat("0", 128) },
		"rpi4":          func(o *Options) { o.Target, _ = profiles.LookupTarget("flatcar-rpi4") },
	} {
		o := fixture(t, "flatcar", "flatcar-amd64")
		edit(&o)
		if _, err := Build(context.Background(), o); err == nil {
			t.Errorf("%s: accepted", name)
		}
		left, _ := filepath.Glob(filepath.Join(filepath.Dir(o.Dest), "*"))
		var extra []string
		for _, l := range left {
			if !strings.HasSuffix(l, ".bin") {
				extra = append(extra, filepath.Base(l))
			}
		}
		if len(extra) > 0 {
			t.Errorf("%s: left %v behind", name, extra)
		}
	}
}

func TestNormalizeMAC(t *testing.T) {
	for in, want := range map[string]string{"52-54-00-AB-cd-EF": "52:54:00:ab:cd:ef", "52:54:00:ab:cd:ef": "52:54:00:ab:cd:ef"} {
		if got, err := NormalizeMAC(in); err != nil || got != want {
			t.Errorf("NormalizeMAC(%q) = %q, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "52:54:00:ab:cd", "00:00:00:00:00:00:00:e0", "zz:54:00:ab:cd:ef"} {
		if _, err := NormalizeMAC(bad); err == nil {
			t.Errorf("NormalizeMAC(%q) accepted", bad)
		}
	}
}

// TestScriptGolden pins the iPXE scripts kiln writes and serves, for
// Flatcar and Fedora CoreOS, online and offline, and the entry and local
// boot scripts (go test ./imagebuild/pxe -update refreshes them).
func TestScriptGolden(t *testing.T) {
	n := &Node{Name: "cp-2", Role: nodeconfig.RoleControlPlane, MAC: "52:54:00:00:00:02", Mode: ModeInstall, Disk: "/dev/sda", Token: strings.Repeat("7", 64)}
	for _, m := range []*Manifest{
		{Cluster: "rack", OS: "flatcar", ServerURL: "http://10.0.0.5:8080", KernelArgs: []string{"flatcar.first_boot=1", "console=ttyS0"},
			Assets: []Asset{{Kind: AssetKernel, File: "flatcar-amd64-4593.2.3/flatcar_production_pxe.vmlinuz"}, {Kind: AssetInitramfs, File: "flatcar-amd64-4593.2.3/flatcar_production_pxe_image.cpio.gz"}}},
		{Cluster: "rack", OS: "fcos", ServerURL: "http://10.0.0.5:8080", KernelArgs: []string{"ignition.firstboot", "ignition.platform.id=metal"}, RootfsArg: "coreos.live.rootfs_url",
			Assets: []Asset{{Kind: AssetKernel, File: "fcos-amd64-42.1/kernel"}, {Kind: AssetInitramfs, File: "fcos-amd64-42.1/initramfs.img"}, {Kind: AssetRootfs, File: "fcos-amd64-42.1/rootfs.img"}}},
	} {
		golden.Check(t, m.OS+".ipxe", []byte(m.Script(n, n.MAC)))
		golden.Check(t, m.OS+"-offline.ipxe", []byte(m.OfflineScript(n, OfflineConfig)))
	}
	golden.Check(t, "entry.ipxe", []byte(EntryScript()))
	golden.Check(t, "local-boot.ipxe", []byte(LocalBootScript(n)))
}

// A boot file is served only if the bundle's copy has the digest it was
// verified with: a file changed after its verification is refused.
func TestAssetCopyMatchesVerifiedDigest(t *testing.T) {
	o := fixture(t, "flatcar", "flatcar-amd64")
	data, err := os.ReadFile(o.Assets[1].Path)
	if err != nil {
		t.Fatal(err)
	}
	o.Assets[1].Algo, o.Assets[1].Hex = "sha512", fmt.Sprintf("%x", sha512.Sum512(data))
	if _, err := Build(context.Background(), o); err != nil {
		t.Fatalf("verified digest: %v", err)
	}
	o = fixture(t, "flatcar", "flatcar-amd64")
	o.Assets[1].Algo, o.Assets[1].Hex = "sha512", fmt.Sprintf("%x", sha512.Sum512(data))
	os.WriteFile(o.Assets[1].Path, []byte("planted after the check"), 0o644)
	if _, err := Build(context.Background(), o); err == nil || !strings.Contains(err.Error(), "changed after it was verified") {
		t.Errorf("changed file: %v", err)
	}
}
