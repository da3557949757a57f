//go:build oracle

package oracle

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// TestPXEBundleConfigs builds a PXE bundle with kiln pxe and checks it with
// tools nobody here wrote: GNU cpio lists and extracts every offline config
// initramfs (a valid newc archive holding the config byte for byte where
// the OS looks), and the real Ignition applies the live configs and the
// installers, then the node config each installer carries: hostnames,
// roles and report URLs land, the installer unit runs the OS's installer on
// the named disk, and no control-plane or worker root holds a private key.
func TestPXEBundleConfigs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("Ignition's files stage runs as root; run the oracle tests as root")
	}
	srv := newArtifactServer(t)
	for _, c := range []struct{ os, profile, installer, initrdConfig string }{
		{"flatcar", "flatcar-amd64", "/usr/bin/flatcar-install -d /dev/vdb -C stable -V current -i /var/lib/kiln-install/config.ign", "oem/config.ign"},
		{"fcos", "fcos-x86_64", "/usr/bin/coreos-installer install /dev/vdb --stream stable --ignition-file /var/lib/kiln-install/config.ign", "config.ign"},
	} {
		t.Run(c.os, func(t *testing.T) {
			cf := newCluster(t, "--os", c.os)
			pointDownloads(t, cf, srv)
			editCluster(t, cf, func(m map[string]any) {
				m["nodes"] = []any{
					map[string]any{"name": "cp-1", "role": "init", "mac": "52:54:00:00:00:01"},
					map[string]any{"name": "cp-2", "role": "control-plane", "mac": "52:54:00:00:00:02"},
					map[string]any{"name": "w-1", "role": "worker", "mac": "52:54:00:00:00:11"},
				}
			})
			dir := filepath.Dir(cf)
			args := []string{"-c", cf, "pxe", "--dest", filepath.Join(dir, "bundle"), "--profile", c.profile,
				"--server-url", "http://boot.test:8080", "--disk", "/dev/vdb"}
			for _, k := range []string{"kernel", "initramfs", "rootfs"} {
				if k == "rootfs" && c.os != "fcos" {
					continue
				}
				p := filepath.Join(dir, k)
				os.WriteFile(p, []byte("fake "+k), 0o644)
				args = append(args, "--"+k, p)
			}
			kiln(t, args...)
			bundle := filepath.Join(dir, "bundle")
			m, err := pxe.ReadManifest(bundle)
			if err != nil {
				t.Fatal(err)
			}
			secretsDir := filepath.Join(dir, "secrets", "pki")
			for _, n := range m.Nodes {
				config := mustRead(t, filepath.Join(bundle, n.Config))
				checkOfflineInitramfs(t, filepath.Join(bundle, "offline", n.Name, pxe.OfflineConfig), c.initrdConfig, config)

				root, log, err := apply(t, filepath.Join(bundle, n.Config), nil)
				if err != nil {
					t.Fatalf("%s: %v\n%s", n.Name, err, log)
				}
				nodeRoot := root
				if n.Mode == pxe.ModeInstall {
					unit := string(mustRead(t, filepath.Join(root, "etc/systemd/system/kiln-install.service")))
					if !strings.Contains(unit, "ExecStart="+c.installer+"\n") || !strings.Contains(unit, "ExecStart=-/var/lib/kiln-install/report\n") {
						t.Errorf("%s: installer unit:\n%s", n.Name, unit)
					}
					report := filepath.Join(root, "var/lib/kiln-install/report")
					if fi, err := os.Stat(report); err != nil || fi.Mode().Perm() != 0o700 || !strings.Contains(string(mustRead(t, report)), m.ReportURL(&n)) {
						t.Errorf("%s: installer report script: %v", n.Name, err)
					}
					inner := filepath.Join(root, "var/lib/kiln-install/config.ign")
					if fi, err := os.Stat(inner); err != nil || fi.Mode().Perm() != 0o600 {
						t.Fatalf("%s: the installer did not write the node's config at 0600: %v", n.Name, err)
					}
					if nodeRoot, log, err = apply(t, inner, nil); err != nil {
						t.Fatalf("%s: the config the installer carries: %v\n%s", n.Name, err, log)
					}
				}
				nodeYAML := string(mustRead(t, filepath.Join(nodeRoot, "etc/kiln/node.yaml")))
				for _, want := range []string{"role: " + string(n.Role) + "\n", "reportURL: " + m.ReportURL(&n) + "\n"} {
					if !strings.Contains(nodeYAML, want) {
						t.Errorf("%s: node.yaml lacks %q", n.Name, want)
					}
				}
				if n.Default != strings.Contains(nodeYAML, "template: ") || !n.Default && !strings.Contains(nodeYAML, "name: "+n.Name+"\n") {
					t.Errorf("%s: hostname in node.yaml:\n%s", n.Name, nodeYAML)
				}
				if n.Role != "init" {
					scanForKeys(t, root, string(n.Role), secretsDir)
					scanForKeys(t, nodeRoot, string(n.Role), secretsDir)
				} else if !hasPrivateKeyBlock(mustRead(t, filepath.Join(nodeRoot, "etc/kiln/pki/ca.key"))) {
					t.Errorf("%s: the init node's installer does not deliver the CA", n.Name)
				}
			}
		})
	}
}

// checkOfflineInitramfs: GNU cpio reads the gzip newc archive, lists the
// config's path (and its parents) and extracts the config unchanged.
func checkOfflineInitramfs(t *testing.T, img, name string, want []byte) {
	t.Helper()
	archive := gunzipFile(t, img)
	cpio := func(args ...string) []byte {
		cmd := exec.Command("cpio", args...)
		cmd.Stdin = bytes.NewReader(archive)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cpio %s on %s: %v\n%s", strings.Join(args, " "), img, err, stderr.String())
		}
		return out
	}
	list := strings.Fields(string(cpio("-t", "-H", "newc", "--quiet")))
	wantList := []string{name}
	if d := filepath.Dir(name); d != "." {
		wantList = []string{d, name}
	}
	if strings.Join(list, " ") != strings.Join(wantList, " ") {
		t.Errorf("%s lists %v, want %v", img, list, wantList)
	}
	if got := cpio("-i", "-H", "newc", "--quiet", "--to-stdout", name); !bytes.Equal(got, want) {
		t.Errorf("%s: %s is %d bytes that differ from the %d-byte config", img, name, len(got), len(want))
	}
}
