//go:build oracle

package image

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// fleetNodes is the home lab of the mixed-fleet issue: three Raspberry Pi
// 4 control planes and two x86 mini PCs as workers, with fixed addresses
// on 192.168.1.0/24 and no DHCP.
var fleetNodes = []struct {
	name, role, profile, mac, addr string
}{
	{"pi-1", "init", "flatcar-rpi4", "dc:a6:32:00:00:01", "192.168.1.11"},
	{"pi-2", "control-plane", "flatcar-rpi4", "dc:a6:32:00:00:02", "192.168.1.12"},
	{"pi-3", "control-plane", "flatcar-rpi4", "dc:a6:32:00:00:03", "192.168.1.13"},
	{"mini-1", "worker", "flatcar-amd64", "52:54:00:00:01:01", "192.168.1.21"},
	{"mini-2", "worker", "flatcar-amd64", "52:54:00:00:01:02", "192.168.1.22"},
}

// fleetCluster writes the persona's cluster file: no cluster-wide
// profile, every machine in nodes with its own.
func fleetCluster(t testing.TB) string {
	t.Helper()
	cf := newCluster(t, t.TempDir(), "flatcar", "kubernetes-sysext")
	var nodes []any
	for _, n := range fleetNodes {
		nodes = append(nodes, map[string]any{"name": n.name, "role": n.role, "profile": n.profile, "mac": n.mac,
			"network": map[string]any{"address": n.addr + "/24", "gateway": "192.168.1.1", "dns": []string{"192.168.1.1"}}})
	}
	editCluster(t, cf, func(m map[string]any) { m["nodes"] = nodes })
	return cf
}

// editCluster changes the cluster file at path through a generic YAML map.
func editCluster(t testing.TB, path string, edit func(m map[string]any)) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	out, _ := yaml.Marshal(m)
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
}

// allResults mirrors build-image --all -o json.
type allResults struct {
	Images []struct {
		Node, Role, Profile, Error string
		Result                     *bakeResult
	}
}

// TestBuildAllMixedFleet: one cluster file, one kiln build-image --all,
// five images (the amd64 base downloaded and verified, the arm64 one a
// local file); each is read back with the independent tools: its
// architecture from the ESP's boot loader (mtools), the Pi firmware only
// on the Pi images, and from the OEM filesystem (btrfs restore) the
// node's own config (hostname, networkd file, kubelet node-ip) and its
// initramfs network in grub.cfg's linux_append. Then a second run whose
// mini-2 output already exists: that one fails, the other four are
// baked, and the exit code says so.
func TestBuildAllMixedFleet(t *testing.T) {
	e := setup(t)
	cf := fleetCluster(t)
	_, zipPath, fw := rpi4Inputs(t, e)
	cache := t.TempDir()
	args := []string{"--all", "--base-image", "flatcar-rpi4=" + e.arm.path, "--firmware", zipPath,
		"--mirror", e.srv.URL + "/{channel}", "--insecure-mirror", "--signing-key", e.goodKey, "--cache-dir", cache}

	dest := t.TempDir()
	r := kilnRun(t, []string{"SSL_CERT_FILE=" + e.certFile}, append([]string{"-c", cf, "build-image", "-o", "json", "--dest", dest}, args...)...)
	if r.code != 0 {
		t.Fatalf("build-image --all: exit %d\n%s", r.code, r.stderr)
	}
	var res allResults
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	if len(res.Images) != len(fleetNodes) {
		t.Fatalf("%d images, want %d:\n%s", len(res.Images), len(fleetNodes), r.stdout)
	}
	if n := strings.Count(r.stderr, "verified flatcar_production_image.bin.bz2"); n != 1 {
		t.Errorf("the amd64 base was verified %d times, want once:\n%s", n, r.stderr)
	}
	for i, n := range fleetNodes {
		got := res.Images[i]
		if got.Node != n.name || got.Profile != n.profile || got.Error != "" || got.Result == nil {
			t.Fatalf("image %d: %+v, want node %s, profile %s, baked", i, got, n.name, n.profile)
		}
		img := got.Result.Image
		if want := filepath.Join(dest, "lab-"+n.name+"-"+n.profile+".img"); img != want {
			t.Errorf("%s: image %s, want %s", n.name, img, want)
		}
		pi := n.profile == "flatcar-rpi4"
		esp := extract(t, img, "EFI-SYSTEM")
		loaders := strings.ToLower(string(must(t, "mdir", "-b", "-i", esp, "::/EFI/boot")))
		if wantLoader := map[bool]string{true: "bootaa64.efi", false: "bootx64.efi"}[pi]; !strings.Contains(loaders, wantLoader) {
			t.Errorf("%s: ESP boot loaders %q, want %s", n.name, loaders, wantLoader)
		}
		_, fwErr := exec.Command("mcopy", "-n", "-i", esp, "::/RPI_EFI.fd", "-").Output()
		if pi != (fwErr == nil) {
			t.Errorf("%s: Pi firmware on the ESP: %v, want %v", n.name, fwErr == nil, pi)
		}
		if pi {
			if got := must(t, "mcopy", "-n", "-i", esp, "::/RPI_EFI.fd", "-"); string(got) != string(fw["RPI_EFI.fd"]) {
				t.Errorf("%s: RPI_EFI.fd differs from the firmware zip's", n.name)
			}
		}
		back := t.TempDir()
		must(t, "btrfs", "restore", extract(t, img, "OEM"), back)
		ign := mustReadFile(t, filepath.Join(back, "config.ign"))
		if want := kilnOK(t, nil, "-c", cf, "render", "--node", n.name); string(ign) != want {
			t.Errorf("%s: config.ign differs from kiln render --node %s", n.name, n.name)
		}
		if h := string(ignitionFile(t, ign, "/etc/hostname")); h != n.name+"\n" {
			t.Errorf("%s: hostname %q", n.name, h)
		}
		network := string(ignitionFile(t, ign, "/etc/systemd/network/00-kiln.network"))
		if !strings.Contains(network, "MACAddress="+n.mac+"\n") || !strings.Contains(network, "Address="+n.addr+"/24\n") {
			t.Errorf("%s: networkd file:\n%s", n.name, network)
		}
		kubeadmFile := map[bool]string{true: "/etc/kiln/kubeadm-init.yaml", false: "/etc/kiln/kubeadm-join.yaml"}[n.role == "init"]
		if kc := string(ignitionFile(t, ign, kubeadmFile)); !regexp.MustCompile(`name: node-ip\s+value: "?` + regexp.QuoteMeta(n.addr) + `"?\n`).MatchString(kc) {
			t.Errorf("%s: %s has no kubelet node-ip %s:\n%s", n.name, kubeadmFile, n.addr, kc)
		}
		grub := string(mustReadFile(t, filepath.Join(back, "grub.cfg")))
		if want := "ip=" + n.addr + "::192.168.1.1:255.255.255.0::kiln0:none"; !strings.Contains(grub, want) || !strings.Contains(grub, "ifname=kiln0:"+n.mac) {
			t.Errorf("%s: grub.cfg lacks %s and ifname=kiln0:%s:\n%s", n.name, want, n.mac, grub)
		}
	}

	// One image fails (its output exists, no --force): the others are baked.
	dest2 := t.TempDir()
	blocker := filepath.Join(dest2, "lab-mini-2-flatcar-amd64.img")
	os.WriteFile(blocker, []byte("a user's file\n"), 0o644)
	r = kilnRun(t, []string{"SSL_CERT_FILE=" + e.certFile}, append([]string{"-c", cf, "build-image", "--dest", dest2}, args...)...)
	if r.code == 0 || !strings.Contains(r.stderr, "1 of 5 images failed (mini-2)") {
		t.Fatalf("exit %d, want a failure naming mini-2:\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("build-image --all with one failure:\n%s", r.stdout)
	if !strings.Contains(r.stdout, "4 of 5 images baked") || !strings.Contains(r.stdout, "mini-2") {
		t.Errorf("summary:\n%s", r.stdout)
	}
	for _, n := range fleetNodes[:4] {
		if _, err := os.Stat(filepath.Join(dest2, "lab-"+n.name+"-"+n.profile+".img")); err != nil {
			t.Errorf("%s not baked beside the failure: %v", n.name, err)
		}
	}
	if data, _ := os.ReadFile(blocker); string(data) != "a user's file\n" {
		t.Error("the existing file was overwritten")
	}
}

func mustReadFile(t testing.TB, p string) []byte {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return data
}
