//go:build oracle

package oracle

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

// artifactServer stands in for the Kubernetes download sites: it serves a
// distinct payload per path, or tampered bytes once tamper is set.
type artifactServer struct {
	*httptest.Server
	tamper atomic.Bool
}

// payload is what the server sends for a path: for the CNI plugins a
// real gzip'd tar archive (the release's layout: ./NAME, mode 0755), for
// anything else distinct bytes.
func payload(path string) []byte {
	if strings.HasSuffix(path, "/cni-plugins") {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		tw := tar.NewWriter(zw)
		for _, name := range cniPlugins {
			body := []byte("plugin " + name + " for " + path + "\n")
			tw.WriteHeader(&tar.Header{Name: "./" + name, Mode: 0o755, Size: int64(len(body)), Uid: 1001, Gid: 1001, Typeflag: tar.TypeReg})
			tw.Write(body)
		}
		tw.Close()
		zw.Close()
		return buf.Bytes()
	}
	return bytes.Repeat([]byte("artifact "+path+"\n"), 5000)
}

var cniPlugins = []string{"bridge", "host-local", "loopback", "portmap"}

func newArtifactServer(t *testing.T) *artifactServer {
	s := &artifactServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		data := payload(r.URL.Path)
		if s.tamper.Load() {
			data = append(data, '!')
		}
		w.Write(data)
	}))
	t.Cleanup(s.Close)
	return s
}

// pointDownloads makes every download URL of the cluster point at srv and
// pins them through kiln pin (which downloads them, as on a real machine).
func pointDownloads(t *testing.T, clusterFile string, srv *artifactServer) {
	editCluster(t, clusterFile, func(m map[string]any) {
		k := m["kubernetes"].(map[string]any)
		for _, d := range k["downloads"].([]any) {
			dl := d.(map[string]any)
			dl["url"] = fmt.Sprintf("%s/%s/%s", srv.URL, dl["arch"], dl["name"])
		}
	})
	kiln(t, "-c", clusterFile, "pin")
}

// apply runs the real Ignition through the stages a first boot runs, on a
// scratch root that has just enough of /etc for useradd, plus the seed
// files (path: content) the OS would already have.
func apply(t *testing.T, config string, seed map[string]string) (root string, log []byte, err error) {
	t.Helper()
	// Ignition writes the core user's ssh keys as that user: the scratch
	// root must be reachable by others, like a real /.
	dir := t.TempDir()
	for p := dir; p != os.TempDir() && p != "/"; p = filepath.Dir(p) {
		os.Chmod(p, 0o755)
	}
	root = filepath.Join(dir, "root")
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, line := range map[string]string{"passwd": "root:x:0:0:root:/root:/bin/sh\n", "group": "root:x:0:\nusers:x:100:\n", "shadow": "root:*:19000:0:99999:7:::\n"} {
		if err := os.WriteFile(filepath.Join(root, "etc", name), []byte(line), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for p, content := range seed {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ign := tool(t, "ignition")
	var all bytes.Buffer
	for _, stage := range []string{"fetch-offline", "fetch", "files"} {
		cmd := execIgnition(ign, stage, root, dir)
		cmd.Env = append(os.Environ(), "IGNITION_CONFIG_FILE="+config)
		out, err := cmd.CombinedOutput()
		all.Write(out)
		if err != nil {
			return root, all.Bytes(), fmt.Errorf("ignition stage %s: %w", stage, err)
		}
	}
	return root, all.Bytes(), nil
}

func gunzipFile(t *testing.T, p string) []byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func expectFile(t *testing.T, root, p string, want []byte, mode os.FileMode) {
	t.Helper()
	full := filepath.Join(root, p)
	fi, err := os.Lstat(full)
	if err != nil {
		t.Errorf("%s: %v", p, err)
		return
	}
	if fi.Mode().Perm() != mode {
		t.Errorf("%s: mode %o, want %o", p, fi.Mode().Perm(), mode)
	}
	got, _ := os.ReadFile(full)
	if !bytes.Equal(got, want) {
		t.Errorf("%s: %d bytes differ from the expected %d", p, len(got), len(want))
	}
}

// TestIgnitionAppliesEveryRole renders each role x OS x arch and has the
// real Ignition apply it: every file lands with the rendered bytes and
// modes, downloads are fetched and verified against the pinned SHA-512,
// and only the init role receives the PKI.
func TestIgnitionAppliesEveryRole(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("Ignition's files stage runs as root (useradd, chown); run the oracle tests as root")
	}
	srv := newArtifactServer(t)
	key, err := os.ReadFile(filepath.Join("testdata", "id_ed25519.pub"))
	if err != nil {
		t.Fatal(err)
	}
	for _, osName := range []string{"flatcar", "fcos"} {
		keyFile := filepath.Join(t.TempDir(), "k.pub")
		os.WriteFile(keyFile, key, 0o644)
		cf := newCluster(t, "--os", osName, "--ssh-key", keyFile)
		pointDownloads(t, cf, srv)
		secretsDir := filepath.Join(filepath.Dir(cf), "secrets", "pki")
		for _, arch := range []string{"amd64", "arm64"} {
			agent := gunzipFile(t, filepath.Join(repo, "imagebuild", "agentbin", "bin", "kiln-firstboot-linux-"+arch+".gz"))
			built, _ := os.ReadFile(filepath.Join(repo, "bin", "kiln-firstboot-linux-"+arch))
			if !bytes.Equal(agent, built) {
				t.Fatalf("embedded %s agent differs from bin/kiln-firstboot-linux-%s", arch, arch)
			}
			for _, role := range []string{"init", "control-plane", "worker"} {
				t.Run(osName+"-"+arch+"-"+role, func(t *testing.T) {
					r := []string{"-c", cf, "render", "--role", role, "--arch", arch}
					config := filepath.Join(t.TempDir(), "config.ign")
					kiln(t, append(r, "--dest", config)...)
					root, log, err := apply(t, config, osSeed[osName])
					if err != nil {
						t.Fatalf("%v\n%s", err, log)
					}
					expectFile(t, root, "/etc/kiln/node.yaml", kiln(t, append(r, "--format", "node")...), 0o600)
					expectFile(t, root, "/etc/kiln/kubeadm-join.yaml", kiln(t, append(r, "--format", "kubeadm-join")...), 0o600)
					agentPath := map[string]string{"flatcar": "/opt/bin/kiln-firstboot", "fcos": "/usr/local/bin/kiln-firstboot"}[osName]
					expectFile(t, root, agentPath, agent, 0o755)
					unit, _ := os.ReadFile(filepath.Join(root, "etc/systemd/system/kiln-firstboot.service"))
					if !strings.Contains(string(unit), "ExecStart="+agentPath+" --config /etc/kiln/node.yaml") {
						t.Errorf("agent unit:\n%s", unit)
					}
					preset, _ := os.ReadFile(filepath.Join(root, "etc/systemd/system-preset/20-ignition.preset"))
					if !strings.Contains(string(preset), "enable kiln-firstboot.service") {
						t.Errorf("agent unit not enabled:\n%s", preset)
					}
					keys, _ := os.ReadFile(filepath.Join(root, "home/core/.ssh/authorized_keys.d/ignition"))
					if !bytes.Contains(keys, bytes.TrimSpace(key)) {
						t.Errorf("ssh key not installed for core")
					}
					switch osName {
					case "flatcar":
						sysextArch := map[string]string{"amd64": "x86-64", "arm64": "arm64"}[arch]
						p := "/opt/extensions/kubernetes/kubernetes-v1.37.2-" + sysextArch + ".raw"
						expectFile(t, root, p, payload("/"+arch+"/kubernetes-sysext"), 0o644)
						if target, err := os.Readlink(filepath.Join(root, "etc/extensions/kubernetes.raw")); err != nil || target != p {
							t.Errorf("sysext link: %q %v", target, err)
						}
						wants := "etc/systemd/system/multi-user.target.wants/kubelet.service"
						if target, err := os.Readlink(filepath.Join(root, wants)); err != nil || target != "/usr/lib/systemd/system/kubelet.service" {
							t.Errorf("kubelet from the sysext is not enabled: %q %v", target, err)
						}
					case "fcos":
						for _, b := range []string{"kubeadm", "kubelet", "kubectl"} {
							expectFile(t, root, "/usr/local/bin/"+b, payload("/"+arch+"/"+b), 0o755)
						}
						checkFCOSRuntime(t, root, arch)
					}
					for _, f := range []string{"ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key", "sa.key", "sa.pub"} {
						want, _ := os.ReadFile(filepath.Join(secretsDir, f))
						if role == "init" {
							expectFile(t, root, "/etc/kiln/pki/"+f, want, 0o600)
						} else if _, err := os.Stat(filepath.Join(root, "etc/kiln/pki", f)); err == nil {
							t.Errorf("%s landed on a %s", f, role)
						}
					}
					if role == "init" {
						expectFile(t, root, "/etc/kiln/kubeadm-init.yaml", kiln(t, append(r, "--format", "kubeadm")...), 0o600)
						// The detector the other roles rely on sees the init node's keys.
						if !hasPrivateKeyBlock(mustRead(t, filepath.Join(root, "etc/kiln/pki/ca.key"))) {
							t.Error("hasPrivateKeyBlock misses the CA key")
						}
					} else {
						scanForKeys(t, root, role, secretsDir)
					}
				})
			}
		}
	}
}

// osSeed is what each OS already has where kiln writes. Fedora's
// containerd package ships /etc/containerd/config.toml (stand-in content:
// the real file is not read here); kiln's config must replace it.
var osSeed = map[string]map[string]string{
	"fcos": {"/etc/containerd/config.toml": "# stand-in for the file Fedora's containerd package ships\ndisabled_plugins = [\"cri\"]\n"},
}

// checkFCOSRuntime checks what Fedora CoreOS gets for the pod network:
// containerd's config (the kubelet's systemd cgroup driver, the CNI
// folders) over the OS's, the pinned CNI plugins archive, and the unit
// that unpacks it, whose commands are then run (rooted in the scratch
// root) with the host's tar to see the plugins land in /opt/cni/bin.
func checkFCOSRuntime(t *testing.T, root, arch string) {
	t.Helper()
	conf := string(mustRead(t, filepath.Join(root, "etc/containerd/config.toml")))
	for _, want := range []string{"version = 2", "SystemdCgroup = true", `bin_dir = "/opt/cni/bin"`, `conf_dir = "/etc/cni/net.d"`} {
		if !strings.Contains(conf, want) {
			t.Errorf("containerd config lacks %q:\n%s", want, conf)
		}
	}
	if strings.Contains(conf, "disabled_plugins") {
		t.Errorf("containerd config still has the OS's content:\n%s", conf)
	}
	archive := "/opt/kiln/cni-plugins-linux-" + arch + "-v1.9.1.tgz"
	expectFile(t, root, archive, payload("/"+arch+"/cni-plugins"), 0o644)
	unit := string(mustRead(t, filepath.Join(root, "etc/systemd/system/kiln-cni-plugins.service")))
	preset := string(mustRead(t, filepath.Join(root, "etc/systemd/system-preset/20-ignition.preset")))
	if !strings.Contains(preset, "enable kiln-cni-plugins.service") || !strings.Contains(unit, "Before=containerd.service kubelet.service") {
		t.Errorf("CNI plugins unit not enabled or not ordered before containerd:\n%s\n%s", unit, preset)
	}
	for _, line := range strings.Split(unit, "\n") {
		cmd, ok := strings.CutPrefix(line, "ExecStart=")
		if !ok {
			continue
		}
		args := strings.Fields(cmd)
		for i, a := range args[1:] {
			if strings.HasPrefix(a, "/opt/") {
				args[i+1] = filepath.Join(root, a)
			}
		}
		if out, err := run(t, args[0], args[1:]...); err != nil {
			t.Fatalf("%s: %v\n%s", cmd, err, out)
		}
	}
	for _, name := range cniPlugins {
		p := filepath.Join(root, "opt/cni/bin", name)
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm() != 0o755 || string(mustRead(t, p)) != "plugin "+name+" for /"+arch+"/cni-plugins\n" {
			t.Errorf("CNI plugin %s after the unit ran: %v %v", name, fi, err)
		}
	}
}

// scanForKeys walks everything Ignition wrote for a non-init node: no
// PEM private key block may be there, and none of the cluster's keys in
// any form. (The agent binary contains the words "PRIVATE KEY" as Go's
// PEM parser does, so a plain substring search would prove nothing.)
func scanForKeys(t *testing.T, root, role, secretsDir string) {
	t.Helper()
	var keys [][]byte
	for _, f := range []string{"ca.key", "front-proxy-ca.key", "etcd/ca.key", "sa.key"} {
		block, _ := pem.Decode(mustRead(t, filepath.Join(secretsDir, f)))
		keys = append(keys, block.Bytes, []byte(base64.StdEncoding.EncodeToString(block.Bytes)[:64]))
	}
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return err
		}
		data, _ := os.ReadFile(p)
		if hasPrivateKeyBlock(data) {
			t.Errorf("%s node: %s holds a PEM private key", role, p)
		}
		for _, k := range keys {
			if bytes.Contains(data, k) {
				t.Errorf("%s node: %s holds one of the cluster's private keys", role, p)
			}
		}
		return nil
	})
}

// hasPrivateKeyBlock reports whether data holds a decodable PEM block of a
// private key type.
func hasPrivateKeyBlock(data []byte) bool {
	for {
		i := bytes.Index(data, []byte("-----BEGIN "))
		if i < 0 {
			return false
		}
		block, _ := pem.Decode(data[i:])
		if block != nil && strings.HasSuffix(block.Type, "PRIVATE KEY") {
			return true
		}
		data = data[i+len("-----BEGIN "):]
	}
}

// TestIgnitionRefusesTamperedDownload: when the served artifact no longer
// matches the pinned hash, the real Ignition fails the boot.
func TestIgnitionRefusesTamperedDownload(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("run the oracle tests as root")
	}
	srv := newArtifactServer(t)
	cf := newCluster(t)
	pointDownloads(t, cf, srv)
	config := filepath.Join(t.TempDir(), "w.ign")
	kiln(t, "-c", cf, "render", "--role", "worker", "--dest", config)
	srv.tamper.Store(true)
	root, log, err := apply(t, config, nil)
	if err == nil {
		t.Fatalf("Ignition accepted a tampered download:\n%s", log)
	}
	if !bytes.Contains(log, []byte("does not match")) && !bytes.Contains(bytes.ToLower(log), []byte("hash")) {
		t.Errorf("failure is not about the hash:\n%s", log)
	}
	if _, err := os.Stat(filepath.Join(root, "opt/extensions/kubernetes/kubernetes-v1.37.2-x86-64.raw")); err == nil {
		t.Error("the tampered sysext was written")
	}
}
