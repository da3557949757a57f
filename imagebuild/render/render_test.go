package render

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/coreos/ignition/v2/config/v3_4"
	"github.com/coreos/ignition/v2/config/v3_4/types"
	"github.com/vincent-petithory/dataurl"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/images"
	"github.com/kilnproject/kiln/imagebuild/internal/golden"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/manifests"
)

// fakeAgent stands in for the real agent binary so goldens do not change
// with every agent build.
func fakeAgent(t *testing.T, arch string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	fmt.Fprintf(zw, "#!/bin/sh\necho fake kiln-firstboot for %s\n", arch)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// loadSecrets copies the test secrets to a private folder (git does not
// keep 0600 modes) and loads them.
func loadSecrets(t *testing.T) *secrets.Secrets {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	err := filepath.Walk("testdata/secrets", func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return err
		}
		rel, _ := filepath.Rel("testdata/secrets", p)
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		dst := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
			return err
		}
		return os.WriteFile(dst, data, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	s, err := secrets.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func loadCluster(t *testing.T, osName string) *cluster.Cluster {
	t.Helper()
	c, err := cluster.Load(filepath.Join("testdata", osName+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

type combo struct {
	os, arch string
	role     nodeconfig.Role
}

func combos() []combo {
	var out []combo
	for _, o := range []string{"flatcar", "fcos"} {
		for _, a := range Arches {
			for _, r := range nodeconfig.Roles {
				out = append(out, combo{o, a, r})
			}
		}
	}
	return out
}

func (c combo) name() string { return fmt.Sprintf("%s-%s-%s", c.os, c.arch, c.role) }

// TestGolden renders every role x OS x arch in every format and compares
// with the golden files.
func TestGolden(t *testing.T) {
	s := loadSecrets(t)
	for _, cb := range combos() {
		t.Run(cb.name(), func(t *testing.T) {
			in := Input{Cluster: loadCluster(t, cb.os), Secrets: s, Role: cb.role, Arch: cb.arch, Agent: fakeAgent(t, cb.arch)}
			nc, err := NodeConfig(in)
			if err != nil {
				t.Fatal(err)
			}
			node, err := nc.Encode()
			if err != nil {
				t.Fatal(err)
			}
			golden.Check(t, cb.name()+".node.yaml", node)
			files, err := Kubeadm(in)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range files.Paths() {
				golden.Check(t, cb.name()+"."+filepath.Base(p), files[p])
			}
			if cb.role == nodeconfig.RoleInit && cb.arch == "amd64" {
				ms, err := Manifests(in.Cluster)
				if err != nil {
					t.Fatal(err)
				}
				for _, m := range ms {
					if m.Data != nil {
						golden.Check(t, cb.os+".manifest."+filepath.Base(m.Path), m.Data)
					}
				}
			}
			if cb.arch == "amd64" {
				_, lbFiles, err := loadBalancer(in.Cluster, cb.role)
				if err != nil {
					t.Fatal(err)
				}
				for _, f := range lbFiles {
					golden.Check(t, cb.name()+".lb."+f.Name, f.Data)
				}
			}
			bu, err := Butane(in)
			if err != nil {
				t.Fatal(err)
			}
			golden.Check(t, cb.name()+".bu", bu)
			ign, err := Ignition(in)
			if err != nil {
				t.Fatal(err)
			}
			golden.Check(t, cb.name()+".ign", ign)
		})
	}
}

// TestDeterministic: the same inputs render byte-identical configs.
func TestDeterministic(t *testing.T) {
	s := loadSecrets(t)
	for _, cb := range combos() {
		in := Input{Cluster: loadCluster(t, cb.os), Secrets: s, Role: cb.role, Arch: cb.arch, Agent: fakeAgent(t, cb.arch)}
		a, err := Ignition(in)
		if err != nil {
			t.Fatal(err)
		}
		in.Cluster = loadCluster(t, cb.os)
		b, err := Ignition(in)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("%s: two renders differ", cb.name())
		}
	}
}

// decodedFiles parses an Ignition config with the Ignition library (which
// must report nothing) and returns each file's decoded content and mode.
func decodedFiles(t *testing.T, ign []byte) (map[string][]byte, map[string]int) {
	t.Helper()
	cfg, rpt, err := v3_4.Parse(ign)
	if err != nil || len(rpt.Entries) > 0 {
		t.Fatalf("ignition validation: %v %s", err, rpt)
	}
	contents, modes := map[string][]byte{}, map[string]int{}
	for _, f := range cfg.Storage.Files {
		if f.Mode != nil {
			modes[f.Path] = *f.Mode
		}
		if f.Contents.Source == nil || !strings.HasPrefix(*f.Contents.Source, "data:") {
			continue
		}
		du, err := dataurl.DecodeString(*f.Contents.Source)
		if err != nil {
			t.Fatalf("%s: %v", f.Path, err)
		}
		data := du.Data
		if f.Contents.Compression != nil && *f.Contents.Compression == "gzip" {
			zr, err := gzip.NewReader(bytes.NewReader(data))
			if err != nil {
				t.Fatalf("%s: %v", f.Path, err)
			}
			if data, err = io.ReadAll(zr); err != nil {
				t.Fatalf("%s: %v", f.Path, err)
			}
		}
		contents[f.Path] = data
	}
	return contents, modes
}

// TestLeastSecrets scans every artifact of every role: workers carry no
// private key at all, control planes no CA key (and no private key), and
// only init carries the PKI, with mode 0600.
func TestLeastSecrets(t *testing.T) {
	s := loadSecrets(t)
	for _, cb := range combos() {
		t.Run(cb.name(), func(t *testing.T) {
			in := Input{Cluster: loadCluster(t, cb.os), Secrets: s, Role: cb.role, Arch: cb.arch, Agent: fakeAgent(t, cb.arch)}
			ign, err := Ignition(in)
			if err != nil {
				t.Fatal(err)
			}
			bu, _ := Butane(in)
			files, modes := decodedFiles(t, ign)
			artifacts := map[string][]byte{"butane": bu, "ignition (raw)": ign}
			for p, data := range files {
				artifacts[p] = data
			}
			for name, data := range artifacts {
				hasKey := bytes.Contains(data, []byte("PRIVATE KEY"))
				if cb.role != nodeconfig.RoleInit && hasKey {
					t.Errorf("%s role %s: %s contains a private key", cb.name(), cb.role, name)
				}
				for _, k := range []string{secrets.CAKey, secrets.FrontProxyCAKey, secrets.EtcdCAKey, secrets.SAKey} {
					if cb.role != nodeconfig.RoleInit && bytes.Contains(data, s.PKI[k]) {
						t.Errorf("%s: %s contains %s", cb.name(), name, k)
					}
				}
			}
			for _, k := range secrets.PKIFiles {
				p := filepath.Join(PKIPath, k)
				got, ok := files[p]
				if cb.role != nodeconfig.RoleInit {
					if ok {
						t.Errorf("%s: %s present on a %s", cb.name(), p, cb.role)
					}
					continue
				}
				if !bytes.Equal(got, s.PKI[k]) || modes[p] != 0o600 {
					t.Errorf("%s: %s content or mode %o wrong", cb.name(), p, modes[p])
				}
			}
			// Every kiln file is 0600 but the load balancer's configs,
			// which a non-root container reads (and which hold no secret,
			// checked below with every file readable by others).
			for p := range files {
				want := 0o600
				if strings.HasPrefix(p, manifests.ConfigDir+"/") && path.Ext(p) != ".yaml" {
					want = nodeconfig.LoadBalancerConfigMode
				}
				if strings.HasPrefix(p, KilnDir) && modes[p] != want {
					t.Errorf("%s: %s mode %o, want %o", cb.name(), p, modes[p], want)
				}
			}
			// The join config of every role holds the token, so neither
			// it, the certificate key nor any private key may appear in a
			// file others can read.
			for p, data := range files {
				if modes[p]&0o077 == 0 {
					continue
				}
				for _, secret := range []string{s.Token, s.CertificateKey, "PRIVATE KEY"} {
					if bytes.Contains(data, []byte(secret)) {
						t.Errorf("%s: a secret (%.12s...) in %s, mode %o", cb.name(), secret, p, modes[p])
					}
				}
			}
		})
	}
}

func TestAgentEmbedded(t *testing.T) {
	s := loadSecrets(t)
	for _, o := range []string{"flatcar", "fcos"} {
		in := Input{Cluster: loadCluster(t, o), Secrets: s, Role: nodeconfig.RoleWorker, Arch: "arm64", Agent: fakeAgent(t, "arm64")}
		ign, err := Ignition(in)
		if err != nil {
			t.Fatal(err)
		}
		files, modes := decodedFiles(t, ign)
		want := "#!/bin/sh\necho fake kiln-firstboot for arm64\n"
		var agentPath string
		for p, data := range files {
			if string(data) == want {
				agentPath = p
			}
		}
		if agentPath == "" || modes[agentPath] != 0o755 {
			t.Errorf("%s: agent not found decompressed with mode 0755 (path %q)", o, agentPath)
		}
	}
}

func TestRenderErrors(t *testing.T) {
	s := loadSecrets(t)
	c := loadCluster(t, "flatcar")
	tests := []struct {
		name string
		in   Input
		want string
	}{
		{"bad role", Input{Cluster: c, Secrets: s, Role: "master", Arch: "amd64"}, `unknown role "master"`},
		{"bad arch", Input{Cluster: c, Secrets: s, Role: "worker", Arch: "riscv64"}, `arch "riscv64"`},
		{"unknown node", Input{Cluster: c, Secrets: s, Role: "worker", Arch: "amd64", NodeName: "nope"}, `node "nope" is not in`},
		{"node role mismatch", Input{Cluster: c, Secrets: s, Role: "worker", Arch: "amd64", NodeName: "cp-1"}, `has role init`},
		{"no agent", Input{Cluster: c, Secrets: s, Role: "worker", Arch: "amd64"}, "no kiln-firstboot binary"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Ignition(tt.in)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestUnpinnedDownload(t *testing.T) {
	s := loadSecrets(t)
	c := loadCluster(t, "flatcar")
	c.Kubernetes.Downloads = c.Kubernetes.Downloads[:1] // amd64 only
	in := Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleWorker, Arch: "arm64", Agent: fakeAgent(t, "arm64")}
	_, err := Ignition(in)
	if err == nil || !strings.Contains(err.Error(), "kiln pin --arch arm64") {
		t.Fatalf("got %v, want the pin command in the error", err)
	}
	in.Arch = "amd64"
	if _, err := Ignition(in); err != nil {
		t.Fatalf("amd64 is pinned: %v", err)
	}
}

func TestSnippets(t *testing.T) {
	s := loadSecrets(t)
	tests := []struct {
		name, snippet, want string
	}{
		{"overrides node.yaml", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /etc/kiln/node.yaml\n      contents:\n        inline: x\n", "/etc/kiln/node.yaml is written by kiln"},
		{"overrides agent unit", "variant: flatcar\nversion: 1.1.0\nsystemd:\n  units:\n    - name: kiln-firstboot.service\n      enabled: false\n", "unit kiln-firstboot.service is written by kiln"},
		{"unknown key", "variant: flatcar\nversion: 1.1.0\nstorage:\n  filez: []\n", "butane[0] (bad.bu)"},
		{"too new", "variant: flatcar\nversion: 1.2.0-experimental\n", "kiln writes Ignition 3.4.0"},
		{"other variant", "variant: fcos\nversion: 1.5.0\n", `variant "fcos", but the cluster's OS takes variant "flatcar"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := loadCluster(t, "flatcar")
			c.Snippets = []cluster.Snippet{{Path: "bad.bu", Data: []byte(tt.snippet)}}
			_, err := Ignition(Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleWorker, Arch: "amd64", Agent: fakeAgent(t, "amd64")})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
	// A legitimate snippet lands in the merged config.
	c := loadCluster(t, "flatcar")
	ign, err := Ignition(Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleWorker, Arch: "amd64", Agent: fakeAgent(t, "amd64")})
	if err != nil {
		t.Fatal(err)
	}
	files, _ := decodedFiles(t, ign)
	if string(files["/etc/motd.d/golden.conf"]) != "golden test cluster\n" {
		t.Errorf("snippet file missing from the merged config")
	}

	// nodes[].butane: only that node's config has it, after the cluster's;
	// it is refused in the node's terms.
	c.Nodes[1].Snippets = []cluster.Snippet{{Path: "cp-2.bu", Data: []byte("variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /etc/motd.d/golden.conf\n      overwrite: true\n      contents:\n        inline: cp-2 here\n")}}
	for _, node := range []string{"cp-2", "cp-3", ""} {
		ign, err := Ignition(Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleControlPlane, Arch: "amd64", NodeName: node, Agent: fakeAgent(t, "amd64")})
		if err != nil {
			t.Fatal(err)
		}
		want := map[bool]string{true: "cp-2 here", false: "golden test cluster\n"}[node == "cp-2"]
		if files, _ := decodedFiles(t, ign); string(files["/etc/motd.d/golden.conf"]) != want {
			t.Errorf("node %q: motd %q, want %q", node, files["/etc/motd.d/golden.conf"], want)
		}
	}
	c.Nodes[1].Snippets[0].Data = []byte("variant: flatcar\nversion: 1.1.0\nstorage:\n  filez: []\n")
	_, err = Ignition(Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleControlPlane, Arch: "amd64", NodeName: "cp-2", Agent: fakeAgent(t, "amd64")})
	if err == nil || !strings.Contains(err.Error(), "nodes[1].butane[0] (cp-2.bu)") {
		t.Errorf("bad node snippet: %v", err)
	}
	if err := CheckSnippets(c, s); err == nil || !strings.Contains(err.Error(), "nodes[1].butane[0] (cp-2.bu)") || !strings.Contains(err.Error(), "in the cp-2 config") {
		t.Errorf("CheckSnippets: %v", err)
	}
}

func TestNodeNameAndPatches(t *testing.T) {
	s := loadSecrets(t)
	c := loadCluster(t, "flatcar")
	in := Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleControlPlane, Arch: "amd64", NodeName: "cp-2", Agent: fakeAgent(t, "amd64")}
	nc, err := NodeConfig(in)
	if err != nil {
		t.Fatal(err)
	}
	if nc.Hostname.Name != "cp-2" || nc.Hostname.Template != "" {
		t.Errorf("hostname = %+v, want name cp-2 only", nc.Hostname)
	}
	ign, err := Ignition(in)
	if err != nil {
		t.Fatal(err)
	}
	files, _ := decodedFiles(t, ign)
	if string(files["/etc/hostname"]) != "cp-2\n" {
		t.Errorf("/etc/hostname = %q", files["/etc/hostname"])
	}
	if _, ok := files[PatchesPath+"/kube-apiserver00+strategic.yaml"]; !ok {
		t.Errorf("control plane lacks its kube-apiserver patch: %v", keys(files))
	}
	in = Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleWorker, Arch: "amd64", Agent: fakeAgent(t, "amd64")}
	kf, err := Kubeadm(in)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := kf[PatchesPath+"/kube-apiserver00+strategic.yaml"]; ok {
		t.Error("worker got a control-plane-only patch")
	}
	if _, ok := kf[PatchesPath+"/kubeletconfiguration01+merge.yaml"]; !ok {
		t.Errorf("worker lacks the all-roles patch: %v", kf.Paths())
	}
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestNodeConfigRoundTrip: the agent's strict decoder reads exactly what
// the builder writes, for every role.
func TestNodeConfigRoundTrip(t *testing.T) {
	s := loadSecrets(t)
	for _, cb := range combos() {
		nc, err := NodeConfig(Input{Cluster: loadCluster(t, cb.os), Secrets: s, Role: cb.role, Arch: cb.arch})
		if err != nil {
			t.Fatal(err)
		}
		data, err := nc.Encode()
		if err != nil {
			t.Fatal(err)
		}
		back, err := nodeconfig.Decode(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("%s: agent cannot read the rendered node.yaml: %v", cb.name(), err)
		}
		again, _ := back.Encode()
		if !bytes.Equal(data, again) {
			t.Errorf("%s: node.yaml does not round-trip", cb.name())
		}
	}
}

// TestSnippetUnits: on Fedora CoreOS kiln writes kubelet.service itself; a
// snippet may extend it with a drop-in but not replace it.
func TestSnippetUnits(t *testing.T) {
	s := loadSecrets(t)
	render := func(snippet string) error {
		c := loadCluster(t, "fcos")
		c.Snippets = []cluster.Snippet{{Path: "u.bu", Data: []byte(snippet)}}
		_, err := Ignition(Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleWorker, Arch: "amd64", Agent: fakeAgent(t, "amd64")})
		return err
	}
	head := "variant: fcos\nversion: 1.5.0\nsystemd:\n  units:\n    - name: kubelet.service\n"
	if err := render(head + "      contents: |\n        [Service]\n        ExecStart=/bin/true\n"); err == nil || !strings.Contains(err.Error(), "unit kubelet.service is written by kiln") {
		t.Errorf("replacing kubelet.service: %v", err)
	}
	if err := render(head + "      dropins:\n        - name: 20-extra.conf\n          contents: |\n            [Service]\n            Environment=KUBELET_EXTRA_ARGS=--v=2\n"); err != nil {
		t.Errorf("a kubelet drop-in is allowed: %v", err)
	}
}

func TestInstaller(t *testing.T) {
	for osName, wantCmd := range map[string]string{
		"flatcar": "ExecStart=/usr/bin/flatcar-install -d /dev/disk/by-id/wwn-0x5000 -C stable -V 4593.2.3 -i " + InstallConfigPath + "\n",
		"fcos":    "ExecStart=/usr/bin/coreos-installer install /dev/disk/by-id/wwn-0x5000 --stream stable --ignition-file " + InstallConfigPath + "\n",
	} {
		c := loadCluster(t, osName)
		in := Input{Cluster: c, Secrets: loadSecrets(t), Role: nodeconfig.RoleWorker, Arch: "amd64", NodeName: "w-1", Agent: fakeAgent(t, "amd64"), ReportURL: "http://boot.test/report/w-1?key=k"}
		node, err := Ignition(in)
		if err != nil {
			t.Fatal(err)
		}
		files, _ := decodedFiles(t, node)
		if !bytes.Contains(files[nodeconfigPath], []byte("reportURL: http://boot.test/report/w-1?key=k\n")) {
			t.Errorf("%s: node.yaml lacks the report URL:\n%s", osName, files[nodeconfigPath])
		}
		inst, err := Installer(InstallInput{Cluster: c, Config: node, Disk: "/dev/disk/by-id/wwn-0x5000", DoneURL: "http://boot.test/report/w-1?key=k"})
		if err != nil {
			t.Fatal(err)
		}
		files, modes := decodedFiles(t, inst)
		if !bytes.Equal(files[InstallConfigPath], node) || modes[InstallConfigPath] != 0o600 {
			t.Errorf("%s: the installer does not carry the node's config byte for byte at mode 0600 (mode %o)", osName, modes[InstallConfigPath])
		}
		cfg, _, _ := v3_4.Parse(inst)
		if len(cfg.Systemd.Units) != 1 || cfg.Systemd.Units[0].Contents == nil {
			t.Fatalf("%s: installer units: %+v", osName, cfg.Systemd.Units)
		}
		unit := *cfg.Systemd.Units[0].Contents
		for _, want := range []string{wantCmd, "ExecStart=-" + InstallReportPath + "\n", "ExecStart=/usr/bin/systemctl --no-block reboot\n"} {
			if !strings.Contains(unit, want) {
				t.Errorf("%s: installer unit lacks %q:\n%s", osName, want, unit)
			}
		}
		if modes[InstallReportPath] != 0o700 || !bytes.Contains(files[InstallReportPath], []byte(`"http://boot.test/report/w-1?key=k${mac:+&mac=$mac}"`)) {
			t.Errorf("%s: report script (mode %o):\n%s", osName, modes[InstallReportPath], files[InstallReportPath])
		}
		for _, bad := range []string{"sda", "/dev/sda; rm -rf /", "/dev/sd%a"} {
			if _, err := Installer(InstallInput{Cluster: c, Config: node, Disk: bad}); err == nil {
				t.Errorf("disk %q accepted", bad)
			}
		}
	}
}

// TestInstallReportScript runs the installer's report script with sh, sed
// and curl against a local server: it POSTs "installed" with the MAC from
// the config URL on the command line, and without one when booted offline.
func TestInstallReportScript(t *testing.T) {
	type post struct{ query, body string }
	got := make(chan post, 2)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- post{r.URL.RawQuery, string(b)}
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	c := loadCluster(t, "flatcar")
	inst, err := Installer(InstallInput{Cluster: c, Config: []byte("{}"), Disk: "/dev/sda", DoneURL: srv.URL + "/report/w-1?key=k"})
	if err != nil {
		t.Fatal(err)
	}
	files, _ := decodedFiles(t, inst)
	dir := t.TempDir()
	script := filepath.Join(dir, "report")
	os.WriteFile(script, files[InstallReportPath], 0o700)
	// curl, as the script finds it, notes its arguments first.
	realCurl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal(err)
	}
	bin, args := filepath.Join(dir, "bin"), filepath.Join(dir, "curl-args")
	os.Mkdir(bin, 0o755)
	os.WriteFile(filepath.Join(bin, "curl"), []byte("#!/bin/sh\necho \"$@\" >> "+args+"\nexec "+realCurl+" \"$@\"\n"), 0o755)
	for cmdline, want := range map[string]string{
		"initrd=x.img flatcar.first_boot=1 ignition.config.url=http://b/config/w-1?mac=52-54-00-ab-cd-ef&token=t console=ttyS0\n": "key=k&mac=52-54-00-ab-cd-ef",
		"initrd=x.img initrd=config.img flatcar.first_boot=1\n":                                                                   "key=k",
	} {
		f := filepath.Join(dir, "cmdline")
		os.WriteFile(f, []byte(cmdline), 0o644)
		cmd := exec.Command("sh", script, f)
		cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("report script: %v\n%s", err, out)
		}
		p := <-got
		if p.query != want || p.body != `{"phase":"installed","state":"done"}` {
			t.Errorf("command line %q: POST ?%s %s, want ?%s", cmdline, p.query, p.body, want)
		}
	}
	if argv, err := os.ReadFile(args); err != nil || strings.Count(string(argv), "\n") != 2 || strings.Contains(string(argv), "key=") {
		t.Errorf("curl's arguments carry the report key (or curl did not run twice): %v\n%s", err, argv)
	}
}

var (
	urlRe = regexp.MustCompile(`[a-z]+://[^\s"'\\]+`)
	// Loopback, or a name under .invalid, which no resolver may answer
	// (RFC 6761): neither leaves the node.
	loopbackURLRe = regexp.MustCompile(`^(unix://|https?://(127\.0\.0\.1|\[::1\]|localhost|[a-z0-9.-]+\.invalid)([:/]|$))`)
)

// TestAirgap: an air-gapped node's config downloads nothing (no URL in it
// at all), links the sysext to the copy its image carries, and names the
// role's images; unpinned images are refused with the commands to run.
func TestAirgap(t *testing.T) {
	s := loadSecrets(t)
	c := loadCluster(t, "flatcar")
	c.Airgap = true
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "an air-gapped node cannot download it") {
		t.Fatalf("an add-on by URL on an air-gapped cluster: got %v, want refused", err)
	}
	var local []cluster.Addon
	for _, a := range c.Addons {
		if a.URL == "" {
			local = append(local, a)
		}
	}
	digestOnly := "quay.io/kiln/digest-only@sha256:" + strings.Repeat("d", 64)
	c.Addons = append(local, cluster.Addon{Path: "x.yaml", Data: []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers: [{name: x, image: " + digestOnly + "}, {name: y, image: busybox}]\n")})
	c.Images = map[string]string{}
	in := Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleWorker, Arch: "amd64", Agent: fakeAgent(t, "amd64")}
	if _, err := Ignition(in); err == nil || !strings.Contains(err.Error(), "kiln images pin") {
		t.Fatalf("unpinned images: got %v, want the pin command", err)
	}
	list, err := images.List(c)
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range list {
		if e.Digest == "" {
			c.Images[e.Name] = fmt.Sprintf("%s@sha256:%064x", e.Reference, i)
		}
	}
	for _, role := range nodeconfig.Roles {
		in.Role = role
		ign, err := Ignition(in)
		if err != nil {
			t.Fatal(err)
		}
		contents, _ := decodedFiles(t, ign)
		contents["config.ign"] = ign
		for p, data := range contents {
			for _, m := range urlRe.FindAll(data, -1) {
				if !loopbackURLRe.Match(m) {
					t.Errorf("%s: %s names a URL off the node: %s", role, p, m)
				}
			}
		}
		cfg, _, err := v3_4.Parse(ign)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range cfg.Storage.Files {
			if src := f.Contents.Source; src != nil && !strings.HasPrefix(*src, "data:") {
				t.Errorf("%s: %s is fetched from %s", role, f.Path, *src)
			}
		}
		linked := false
		for _, l := range cfg.Storage.Links {
			linked = linked || (l.Path == "/etc/extensions/kubernetes.raw" && *l.Target == "/oem/kiln/kubernetes-v1.37.2-x86-64.raw")
		}
		if !linked {
			t.Errorf("%s: the sysext is not linked to /oem/kiln", role)
		}
		checkAirgapContainerd(t, cfg, contents, list)
		nc, err := NodeConfig(in)
		if err != nil {
			t.Fatal(err)
		}
		want := 0
		for _, e := range images.ForRole(list, role) {
			want += len(e.NodeNames())
		}
		if nc.Images == nil || nc.Images.Archive != "/oem/kiln/"+ImagesArchive(role) || len(nc.Images.References) != want {
			t.Fatalf("%s: node images %+v, want %d references in /oem/kiln/%s", role, nc.Images, want, ImagesArchive(role))
		}
		found := false
		for _, r := range nc.Images.References {
			if strings.Contains(r, "etcd") && role == nodeconfig.RoleWorker {
				t.Errorf("a worker carries %s", r)
			}
			name, digest, _ := nodeconfig.SplitImageReference(r)
			found = found || (name == digestOnly && digest == digestOnly[strings.Index(digestOnly, "@")+1:])
		}
		if !found {
			t.Errorf("%s: the add-on's digest-only image is not carried as itself: %v", role, nc.Images.References)
		}
	}
}

// checkAirgapContainerd: an air-gapped Flatcar node's containerd runs the
// pause image its payload carries, knows no registry (the _default
// hosts.toml names an .invalid host), and is started on kiln's config
// through a drop-in on the one containerd.service unit.
func checkAirgapContainerd(t *testing.T, cfg types.Config, files map[string][]byte, list []images.Entry) {
	t.Helper()
	var pause string
	for _, e := range list {
		if e.Name == "pause" {
			pause = e.Reference
		}
	}
	conf := string(files["/etc/containerd/config.toml"])
	for _, want := range []string{"sandbox_image = \"" + pause + "\"", "config_path = \"" + ContainerdHostsDir + "\"", "imports = [\"/etc/containerd/conf.d/*.toml\"]", "SystemdCgroup = true"} {
		if !strings.Contains(conf, want) {
			t.Errorf("containerd config lacks %s:\n%s", want, conf)
		}
	}
	if hosts := string(files[ContainerdHostsDir+"/_default/hosts.toml"]); !strings.Contains(hosts, `server = "https://no-registry.invalid"`) {
		t.Errorf("no-registry hosts.toml: %q", hosts)
	}
	var units []types.Unit
	for _, u := range cfg.Systemd.Units {
		if u.Name == "containerd.service" {
			units = append(units, u)
		}
	}
	if len(units) != 1 || len(units[0].Dropins) != 1 || units[0].Enabled == nil || !*units[0].Enabled ||
		!strings.Contains(*units[0].Dropins[0].Contents, "ExecStart=/usr/bin/containerd\n") {
		t.Errorf("containerd.service: %+v", units)
	}
}

// TestContainerdConfigOnlyWhereNeeded: a connected Flatcar node keeps
// Flatcar's own containerd configuration; Fedora CoreOS always gets
// kiln's, without an air-gapped node's sandbox and registry settings.
func TestContainerdConfigOnlyWhereNeeded(t *testing.T) {
	s := loadSecrets(t)
	for osName, want := range map[string]bool{"flatcar": false, "fcos": true} {
		c := loadCluster(t, osName)
		ign, err := Ignition(Input{Cluster: c, Secrets: s, Role: nodeconfig.RoleWorker, Arch: "amd64", Agent: fakeAgent(t, "amd64")})
		if err != nil {
			t.Fatal(err)
		}
		files, _ := decodedFiles(t, ign)
		conf, got := files["/etc/containerd/config.toml"]
		if got != want {
			t.Errorf("%s: containerd config written: %v, want %v", osName, got, want)
		}
		if strings.Contains(string(conf), "sandbox_image") || strings.Contains(string(conf), "config_path") {
			t.Errorf("%s: a connected node's containerd config pins a sandbox or registry hosts:\n%s", osName, conf)
		}
		if _, ok := files[ContainerdHostsDir+"/_default/hosts.toml"]; ok {
			t.Errorf("%s: a connected node gets the no-registry hosts.toml", osName)
		}
	}
}
