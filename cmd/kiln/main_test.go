package main

import (
	"bytes"
	"crypto/sha512"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/secrets"
)

type result struct {
	code           int
	stdout, stderr string
}

func kiln(t *testing.T, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return result{code, out.String(), errOut.String()}
}

func (r result) expect(t *testing.T, code int, stderrHas ...string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", r.code, code, r.stdout, r.stderr)
	}
	for _, s := range stderrHas {
		if !strings.Contains(r.stderr, s) {
			t.Errorf("stderr lacks %q:\n%s", s, r.stderr)
		}
	}
	if strings.Count(r.stderr, "kiln: ") > 1 {
		t.Errorf("error printed more than once:\n%s", r.stderr)
	}
}

func newCluster(t *testing.T, extra ...string) (dir, clusterFile string) {
	t.Helper()
	dir = t.TempDir()
	r := kiln(t, append([]string{"init", "lab", "--endpoint", "lb.lab.test:6443", "--dest", dir}, extra...)...)
	r.expect(t, 0)
	return dir, filepath.Join(dir, "cluster.yaml")
}

func TestInit(t *testing.T) {
	dir := t.TempDir()
	r := kiln(t, "init", "lab", "--endpoint", "lb.lab.test:6443", "--dest", dir)
	r.expect(t, 0)
	s, err := secrets.Load(filepath.Join(dir, "secrets"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.stdout, s.CACertHash()) || !strings.Contains(r.stdout, "kiln") {
		t.Errorf("stdout lacks the CA hash or next commands:\n%s", r.stdout)
	}
	for _, secret := range []string{"PRIVATE KEY", s.Token, s.CertificateKey} {
		if strings.Contains(r.stdout+r.stderr, secret) {
			t.Errorf("init printed a secret")
		}
	}
	// The commented example inventory is a valid one once uncommented.
	cf := filepath.Join(dir, "cluster.yaml")
	file, _ := os.ReadFile(cf)
	_, example, found := strings.Cut(string(file), "\n#\n# nodes:\n")
	if !found {
		t.Fatalf("cluster.yaml has no example inventory:\n%s", file)
	}
	inventory := "nodes:\n" + strings.ReplaceAll(example, "#   ", "  ")
	if strings.Contains(inventory, "#") {
		t.Fatalf("example inventory does not end the file:\n%s", inventory)
	}
	os.WriteFile(cf, append(file, inventory...), 0o644)
	kiln(t, "-c", cf, "validate").expect(t, 0)
	kiln(t, "-c", cf, "render", "--node", "cp-2", "--format", "node").expect(t, 0)
	os.WriteFile(cf, file, 0o644)

	// A second init refuses and leaves everything as it was.
	before, _ := os.ReadFile(filepath.Join(dir, "secrets", "token"))
	kiln(t, "init", "lab", "--endpoint", "lb.lab.test:6443", "--dest", dir).expect(t, exitInput, "already exists", "--force")
	after, _ := os.ReadFile(filepath.Join(dir, "secrets", "token"))
	if !bytes.Equal(before, after) {
		t.Fatal("refused init changed the token")
	}
	r = kiln(t, "init", "lab", "--endpoint", "lb.lab.test:6443", "--dest", dir, "--force", "-o", "json")
	r.expect(t, 0)
	var res initResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.CACertHash == s.CACertHash() {
		t.Fatalf("forced init: %v %+v", err, res)
	}
}

// TestInitLoadBalancer: the flags make a cluster whose control planes
// hold the endpoint, which kiln validate accepts as written.
func TestInitLoadBalancer(t *testing.T) {
	pin := "keepalived=registry.example/keepalived:2.2@sha256:" + strings.Repeat("ab", 32)
	dir := t.TempDir()
	kiln(t, "init", "lab", "--endpoint", "10.0.0.50:6443", "--load-balancer", "keepalived-haproxy", "--dest", dir,
		"--control-plane", "cp-1=10.0.0.11", "--control-plane", "cp-2=10.0.0.12", "--control-plane", "cp-3=10.0.0.13", "--image", pin).expect(t, 0)
	c, err := cluster.Load(filepath.Join(dir, "cluster.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	lb := c.LoadBalancer
	if lb.Type != cluster.LBKeepalivedHAProxy || lb.APIServerPort != 6444 || len(c.Nodes) != 3 || c.Nodes[0].Role != "init" || c.Nodes[2].IP != "10.0.0.13" {
		t.Errorf("cluster file: %+v %+v", lb, c.Nodes)
	}
	kiln(t, "-c", filepath.Join(dir, "cluster.yaml"), "validate").expect(t, 0)
}

// TestIgnorePreflightErrors: the init flag writes the cluster file's list,
// every command that loads the cluster notes it on stderr, validate -o
// json reports it, and each rendered kubeadm config carries it.
func TestIgnorePreflightErrors(t *testing.T) {
	_, cf := newCluster(t, "--ignore-preflight-errors", "Mem,NumCPU")
	note := "kiln: note: kubernetes.ignorePreflightErrors: kubeadm on every node skips the preflight checks Mem, NumCPU"
	r := kiln(t, "-c", cf, "validate", "-o", "json")
	r.expect(t, 0, note)
	var res struct {
		IgnorePreflightErrors []string `json:"ignorePreflightErrors"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || strings.Join(res.IgnorePreflightErrors, ",") != "Mem,NumCPU" {
		t.Errorf("validate -o json: %v %s", err, r.stdout)
	}
	for _, role := range []string{"init", "control-plane", "worker"} {
		r := kiln(t, "-c", cf, "render", "--role", role, "--format", "kubeadm")
		r.expect(t, 0, note)
		if !strings.Contains(r.stdout, "  ignorePreflightErrors:\n    - Mem\n    - NumCPU\n") {
			t.Errorf("%s: kubeadm config lacks the list:\n%s", role, r.stdout)
		}
	}
	kiln(t, "-c", cf, "images").expect(t, 0, note)
	_, plain := newCluster(t)
	if r := kiln(t, "-c", plain, "validate"); strings.Contains(r.stderr, "ignorePreflightErrors") {
		t.Errorf("a cluster without the setting is noted: %s", r.stderr)
	}
}

func TestInitBadInput(t *testing.T) {
	dir := t.TempDir()
	kiln(t, "init", "lab", "--dest", dir).expect(t, exitInput, "--endpoint: required")
	kiln(t, "init", "lab", "--endpoint", "lb", "--kubernetes-version", "v1.30.1", "--os", "arch", "--dest", dir).
		expect(t, exitInput, "3 problems", "--endpoint:", "--kubernetes-version: v1.30.1 is not supported", "--os: unknown OS")
	kiln(t, "init", "--endpoint", "lb:6443").expect(t, exitInput, "kiln init takes 1 argument(s), not 0: the cluster NAME")
	kiln(t, "init", "lab", "--endpoint", "lb:6443", "--ssh-key", filepath.Join(dir, "none.pub")).expect(t, exitInput, "--ssh-key")
	private := filepath.Join(t.TempDir(), "id_ed25519")
	os.WriteFile(private, []byte("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----\n"), 0o600)
	r := kiln(t, "init", "lab", "--endpoint", "lb:6443", "--ssh-key", private, "--dest", dir)
	r.expect(t, exitInput, "--ssh-key "+private+" is a private key: pass its public key instead ("+private+".pub")
	if strings.Contains(r.stderr, "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ") {
		t.Error("the private key's text was printed")
	}
	kiln(t, "init", "lab", "--endpoint", "10.0.0.50:6443", "--load-balancer", "keepalived-haproxy", "--control-plane", "cp-1=10.0.0.11", "--dest", dir).
		expect(t, exitInput, "--image: kiln has no default digest for keepalived", "--image keepalived=")
	kiln(t, "init", "lab", "--endpoint", "10.0.0.50:6443", "--load-balancer", "keepalived-haproxy", "--control-planes", "3", "--control-plane", "cp-1=10.0.0.11", "--dest", dir).
		expect(t, exitInput, "--control-plane: loadBalancer.type keepalived-haproxy balances over every control plane's address: list all 3")
	kiln(t, "init", "lab", "--endpoint", "10.0.0.50:443", "--load-balancer", "keepalived-haproxy", "--dest", dir).expect(t, exitInput, "--endpoint: port 443")
	kiln(t, "init", "lab", "--endpoint", "10.0.0.50:6443", "--control-plane", "cp-1", "--dest", dir).expect(t, exitInput, "--control-plane \"cp-1\": want NAME=IP")
	kiln(t, "init", "lab", "--endpoint", "10.0.0.50:6443", "--image", "flannel", "--dest", dir).expect(t, exitInput, "--image \"flannel\": want NAME=")
	kiln(t, "init", "lab", "--endpoint", "10.0.0.50:6443", "--load-balancer", "f5", "--dest", dir).expect(t, exitInput, "--load-balancer: ")
	kiln(t, "init", "lab", "--endpoint", "10.0.0.50:6443", "--ignore-preflight-errors", "Mem,mem", "--dest", dir).
		expect(t, exitInput, "--ignore-preflight-errors: mem is already listed at [0]")
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("failed init left files: %v", entries)
	}
}

// TestValidateChecksSnippets: a Butane snippet that would override kiln's
// own files is kiln validate's finding, before any pin (not only
// render's).
func TestValidateChecksSnippets(t *testing.T) {
	dir, cf := newCluster(t)
	os.WriteFile(filepath.Join(dir, "extra.bu"), []byte("variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /etc/kiln/node.yaml\n      contents:\n        inline: x\n"), 0o644)
	data, _ := os.ReadFile(cf)
	os.WriteFile(cf, append(data, []byte("butane: [extra.bu]\n")...), 0o644)
	kiln(t, "-c", cf, "validate").expect(t, exitInput, "butane[0] (extra.bu): /etc/kiln/node.yaml is written by kiln", "(in the init config)")
	r := kiln(t, "-c", cf, "validate", "-o", "json")
	if r.expect(t, exitInput); !strings.Contains(r.stdout, `"valid": false`) || !strings.Contains(r.stdout, "/etc/kiln/node.yaml is written by kiln") {
		t.Errorf("validate -o json: %s", r.stdout)
	}
	os.WriteFile(filepath.Join(dir, "extra.bu"), []byte("variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /etc/motd.d/lab.conf\n      contents:\n        local: motd.txt\n"), 0o644)
	kiln(t, "-c", cf, "validate").expect(t, exitInput, "motd.txt")
	// local: sources resolve against the cluster file's folder, wherever
	// kiln runs from; none may leave it.
	os.WriteFile(filepath.Join(dir, "motd.txt"), []byte("welcome to the lab\n"), 0o644)
	kiln(t, "-c", cf, "validate").expect(t, 0)
	kiln(t, "-c", cf, "pin", "--arch", "amd64", "--file", "kubernetes-sysext="+cf).expect(t, 0)
	r = kiln(t, "-c", cf, "render", "--role", "worker")
	if r.expect(t, 0); !strings.Contains(r.stdout, "data:,welcome%20to%20the%20lab%0A") {
		t.Errorf("the local: file's content is not in the config")
	}
	os.WriteFile(filepath.Join(dir, "extra.bu"), []byte("variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /etc/motd.d/lab.conf\n      contents:\n        local: ../outside.txt\n"), 0o644)
	kiln(t, "-c", cf, "validate").expect(t, exitInput, "butane[0]")
}

// TestArchNames: --arch takes Go's and the OCI spec's names; the kernel's
// (uname -m) get the name to use, on every command that takes it.
func TestArchNames(t *testing.T) {
	_, cf := newCluster(t)
	kiln(t, "-c", cf, "render", "--role", "worker", "--arch", "x86_64").expect(t, exitInput, `--arch "x86_64": kiln names it amd64`, "use --arch amd64")
	kiln(t, "-c", cf, "pin", "--arch", "aarch64").expect(t, exitInput, `--arch "aarch64": kiln names it arm64`, "use --arch arm64")
	kiln(t, "-c", cf, "images", "pull", "--arch", "x86-64").expect(t, exitInput, "use --arch amd64")
	kiln(t, "-c", cf, "render", "--role", "worker", "--arch", "riscv64").expect(t, exitInput, `--arch "riscv64": use amd64 or arm64`)
}

func TestUsageErrors(t *testing.T) {
	kiln(t, "frobnicate").expect(t, exitInput, "unknown command")
	kiln(t, "render", "--bogus").expect(t, exitInput, "unknown flag")
	kiln(t, "render", "--role", "init", "-c", filepath.Join(t.TempDir(), "none.yaml")).expect(t, exitInput, "kiln init")
}

func TestHelpHasExamples(t *testing.T) {
	root := newRootCmd(&bytes.Buffer{}, &bytes.Buffer{})
	for _, c := range append(root.Commands(), root) {
		if c.Name() == "help" || c.Name() == "completion" {
			continue
		}
		if c.Example == "" || c.Short == "" {
			t.Errorf("command %s lacks a short description or examples", c.Name())
		}
	}
}

func TestValidate(t *testing.T) {
	_, cf := newCluster(t)
	r := kiln(t, "-c", cf, "validate", "-o", "json")
	r.expect(t, 0)
	var res map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res["cluster"] != "lab" || fmt.Sprint(res["pinnedArches"]) != "[]" {
		t.Fatalf("validate json: %v %v", err, r.stdout)
	}
	data, _ := os.ReadFile(cf)
	os.WriteFile(cf, bytes.Replace(data, []byte("controlPlanes: 3"), []byte("controlPlanes: 4\n  bogus: 1"), 1), 0o644)
	kiln(t, "-c", cf, "validate").expect(t, exitInput, "kubernetes.bogus: unknown field (fields here: version,")

	// -o json: the problems on stdout, by line and field; the error on
	// stderr and in the exit code as always.
	for _, tc := range []struct{ from, to, want string }{
		{"controlPlanes: 4\n  bogus: 1", "controlPlanes: x\n  bogus: 1", `[{"line":13,"field":"kubernetes.controlPlanes","message":"wants a whole number, not text \"x\""},{"line":14,"field":"kubernetes.bogus","message":"unknown field (fields here: `},
		{"controlPlanes: x\n  bogus: 1", "controlPlanes: 4", `[{"field":"kubernetes.controlPlanes","message":"4: use an odd number;`},
	} {
		data, _ := os.ReadFile(cf)
		os.WriteFile(cf, bytes.Replace(data, []byte(tc.from), []byte(tc.to), 1), 0o644)
		r := kiln(t, "-c", cf, "validate", "-o", "json")
		r.expect(t, exitInput)
		var res struct {
			Valid    *bool
			Problems json.RawMessage
		}
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Valid == nil || *res.Valid {
			t.Fatalf("validate -o json of a bad file: %v\n%s", err, r.stdout)
		}
		var compact bytes.Buffer
		json.Compact(&compact, res.Problems)
		if !strings.HasPrefix(compact.String(), tc.want) {
			t.Errorf("problems %s, want them to start %s", compact.String(), tc.want)
		}
	}
}

// TestPinAndRender pins from a local HTTP server standing in for the
// download site, keeps the file's comments, then renders every format.
func TestPinAndRender(t *testing.T) {
	artifact := bytes.Repeat([]byte("sysext"), 100000)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, ".raw") {
			http.NotFound(w, r)
			return
		}
		w.Write(artifact)
	}))
	defer srv.Close()
	_, cf := newCluster(t)
	data, _ := os.ReadFile(cf)
	data = bytes.ReplaceAll(data, []byte("https://extensions.flatcar.org"), []byte(srv.URL))
	os.WriteFile(cf, data, 0o644)

	kiln(t, "-c", cf, "render", "--role", "worker").expect(t, exitInput, "kiln pin --arch amd64")
	kiln(t, "-c", cf, "pin", "--arch", "amd64", "--file", "cni-plugins="+cf).expect(t, exitInput, "--file cni-plugins=...: flatcar nodes download no artifact of that name; use one of kubernetes-sysext")

	r := kiln(t, "-c", cf, "pin", "-o", "json")
	r.expect(t, 0)
	sum := sha512.Sum512(artifact)
	if strings.Count(r.stdout, hex.EncodeToString(sum[:])) != 2 {
		t.Fatalf("pin output lacks the artifact's hash twice:\n%s", r.stdout)
	}
	pinned, _ := os.ReadFile(cf)
	if !bytes.HasPrefix(pinned, []byte("# kiln cluster file")) {
		t.Error("pin dropped the file's comments")
	}

	for _, role := range []string{"init", "control-plane", "worker"} {
		for _, format := range renderFormats {
			r := kiln(t, "-c", cf, "render", "--role", role, "--format", format)
			r.expect(t, 0)
			// A role (no inventory node) has no static network: no kernel
			// arguments.
			if (len(r.stdout) == 0) != (format == "kernel-args") {
				t.Errorf("%s %s: output %q", role, format, r.stdout)
			}
		}
	}
	dest := filepath.Join(t.TempDir(), "w.ign")
	kiln(t, "-c", cf, "render", "--role", "worker", "--arch", "arm64", "--dest", dest).expect(t, 0, "wrote "+dest)
	if fi, err := os.Stat(dest); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("dest: %v %v", fi, err)
	}
	kiln(t, "-c", cf, "render", "--role", "worker", "--dest", dest).expect(t, exitInput, "--force")
	kiln(t, "-c", cf, "render", "--role", "boss").expect(t, exitInput, "--role: unknown role")
	kiln(t, "-c", cf, "render", "--role", "init", "--format", "pdf").expect(t, exitInput, "--format")
}

// TestPinsStayTruthful: each pin records the OS and Kubernetes version it
// was made for. After changing either, validate names the stale pins and
// the command; kiln pin replaces them (the file no longer validates, so it
// must not need to); --refresh of one arch keeps the other's good pins;
// and a cluster pinned for one arch hears nothing about the other.
func TestPinsStayTruthful(t *testing.T) {
	dir, cf := newCluster(t)
	local := func(names ...string) []string {
		var args []string
		for _, n := range names {
			p := filepath.Join(dir, n)
			os.WriteFile(p, []byte("pretend "+n), 0o644)
			args = append(args, "--file", n+"="+p)
		}
		return args
	}
	sysext := local("kubernetes-sysext")
	kiln(t, append([]string{"-c", cf, "pin", "--arch", "amd64"}, sysext...)...).expect(t, 0)
	kiln(t, append([]string{"-c", cf, "pin", "--arch", "arm64"}, sysext...)...).expect(t, 0)
	r := kiln(t, "-c", cf, "validate")
	if r.expect(t, 0); !strings.Contains(r.stdout, "downloads pinned for amd64, arm64") {
		t.Errorf("validate: %s", r.stdout)
	}

	edit := func(from, to string) {
		data, _ := os.ReadFile(cf)
		if !bytes.Contains(data, []byte(from)) {
			t.Fatalf("cluster file lacks %q", from)
		}
		os.WriteFile(cf, bytes.Replace(data, []byte(from), []byte(to), 1), 0o644)
	}
	edit("  version: v1.37.2", "  version: v1.36.3")
	kiln(t, "-c", cf, "validate").expect(t, exitInput, "kubernetes.downloads[0]: kubernetes-sysext for amd64: pinned for Kubernetes v1.37.2, kubernetes.version is v1.36.3: run kiln pin")
	kiln(t, "-c", cf, "render", "--role", "worker").expect(t, exitInput, "pinned for Kubernetes v1.37.2")
	r = kiln(t, append([]string{"-c", cf, "pin", "--arch", "amd64"}, sysext...)...)
	r.expect(t, 0, "kiln: note: dropped the pins of kubernetes-sysext for amd64, kubernetes-sysext for arm64 (pinned for Kubernetes v1.37.2, kubernetes.version is v1.36.3)")
	data, _ := os.ReadFile(cf)
	if !bytes.Contains(data, []byte("kubernetes-v1.36.3-x86-64.raw")) || bytes.Contains(data, []byte("v1.37.2-")) {
		t.Errorf("pins not made for v1.36.3:\n%s", data)
	}
	// Pinned for amd64 only: nothing said about arm64.
	r = kiln(t, "-c", cf, "validate")
	r.expect(t, 0)
	if !strings.Contains(r.stdout, "downloads pinned for amd64") || strings.Contains(r.stdout+r.stderr, "arm64") || strings.Contains(r.stdout+r.stderr, "not pinned") {
		t.Errorf("validate nags about arm64:\n%s%s", r.stdout, r.stderr)
	}

	// --refresh of arm64 keeps amd64's good pin.
	kiln(t, append([]string{"-c", cf, "pin", "--arch", "arm64", "--refresh"}, sysext...)...).expect(t, 0)
	before, _ := os.ReadFile(cf)
	kiln(t, append([]string{"-c", cf, "pin", "--arch", "arm64", "--refresh"}, local("kubernetes-sysext")...)...).expect(t, 0, "dropped the pins of kubernetes-sysext for arm64 (--refresh)")
	after, _ := os.ReadFile(cf)
	amd64 := regexp.MustCompile(`(?s)arch: amd64.*?sha512: [0-9a-f]+`)
	if got, want := amd64.Find(after), amd64.Find(before); want == nil || !bytes.Equal(got, want) {
		t.Errorf("refreshing arm64 changed amd64's pin: %q, was %q", got, want)
	}

	// After changing os.name, kiln pin --refresh works (the old OS's
	// entries are stale, not an error) and pins the new OS's artifacts.
	edit("  name: flatcar", "  name: fcos")
	kiln(t, "-c", cf, "validate").expect(t, exitInput, "pinned for os.name flatcar, the cluster is fcos: run kiln pin")
	r = kiln(t, append([]string{"-c", cf, "pin", "--refresh", "--arch", "amd64"}, local("kubeadm", "kubelet", "kubectl", "cni-plugins")...)...)
	r.expect(t, 0, "dropped the pins of kubernetes-sysext for amd64, kubernetes-sysext for arm64 (pinned for os.name flatcar, the cluster is fcos)")
	r = kiln(t, "-c", cf, "validate")
	if r.expect(t, 0); !strings.Contains(r.stdout, "downloads pinned for amd64") {
		t.Errorf("validate after the OS change: %s", r.stdout)
	}
}

func TestPinDownloadFailure(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	_, cf := newCluster(t)
	data, _ := os.ReadFile(cf)
	os.WriteFile(cf, bytes.ReplaceAll(data, []byte("https://extensions.flatcar.org"), []byte(srv.URL)), 0o644)
	kiln(t, "-c", cf, "pin", "--arch", "amd64").expect(t, exitDownload, "404")
	after, _ := os.ReadFile(cf)
	if !bytes.Equal(after, bytes.ReplaceAll(data, []byte("https://extensions.flatcar.org"), []byte(srv.URL))) {
		t.Error("failed pin changed the cluster file")
	}
	kiln(t, "-c", cf, "pin", "--file", "kubernetes-sysext=/nonexistent").expect(t, exitInput, "also pass --arch")
	kiln(t, "-c", cf, "pin", "--arch", "amd64", "--file", "kubernetes-sysext=/nonexistent").expect(t, exitInput, "/nonexistent")
}

func TestKubeconfig(t *testing.T) {
	dir, cf := newCluster(t)
	r := kiln(t, "-c", cf, "kubeconfig", "-o", "json")
	r.expect(t, 0)
	p := filepath.Join(dir, "admin.conf")
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin.conf: %v %v", fi, err)
	}
	var kc struct {
		Clusters []struct {
			Cluster struct {
				Server string `yaml:"server"`
				CA     string `yaml:"certificate-authority-data"`
			} `yaml:"cluster"`
		} `yaml:"clusters"`
		Users []struct {
			User struct {
				Cert string `yaml:"client-certificate-data"`
			} `yaml:"user"`
		} `yaml:"users"`
	}
	data, _ := os.ReadFile(p)
	if err := yaml.Unmarshal(data, &kc); err != nil {
		t.Fatal(err)
	}
	if kc.Clusters[0].Cluster.Server != "https://lb.lab.test:6443" {
		t.Errorf("server %q", kc.Clusters[0].Cluster.Server)
	}
	certPEM, _ := base64.StdEncoding.DecodeString(kc.Users[0].User.Cert)
	caPEM, _ := base64.StdEncoding.DecodeString(kc.Clusters[0].Cluster.CA)
	block, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client cert does not verify against the CA: %v", err)
	}
	if cert.Subject.CommonName != "kubernetes-admin" || len(cert.Subject.Organization) != 1 || cert.Subject.Organization[0] != "kubeadm:cluster-admins" {
		t.Errorf("subject %v", cert.Subject)
	}
	kiln(t, "-c", cf, "kubeconfig").expect(t, exitInput, "--force")
	kiln(t, "-c", cf, "kubeconfig", "--validity", "0s", "--dest", filepath.Join(dir, "x")).expect(t, exitInput, "--validity")
}
