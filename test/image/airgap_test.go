//go:build oracle

package image

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coreos/ignition/v2/config/v3_4"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/vincent-petithory/dataurl"

	"github.com/kilnproject/kiln/firstboot/agent"
	"github.com/kilnproject/kiln/imagebuild/images/imagestest"
	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// containerdVersion is the containerd test/tools/build.sh builds
// (CONTAINERD_VERSION there).
const containerdVersion = "v2.2.9"

// imageEntry mirrors kiln images -o json.
type imageEntry struct {
	Name, Reference, Digest string
	Roles                   []string
}

// siteLayout writes an OCI image layout holding a two-arch image (random
// layers, built here) for every image the cluster's nodes run, named by
// its reference as a site's own mirror would be. size gives an image's
// total layer bytes by name (nil: 64 KiB).
func siteLayout(t testing.TB, cluster string, size func(name string) int64) string {
	t.Helper()
	var list []imageEntry
	if err := json.Unmarshal([]byte(kilnOK(t, nil, "-c", cluster, "images", "-o", "json")), &list); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "site-images")
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range list {
		layer := int64(32 << 10)
		if size != nil {
			layer = max(size(e.Name)/2, 1024)
		}
		idx, err := imagestest.Index([]string{"amd64", "arm64"}, 2, layer)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{"io.containerd.image.name": e.Reference})); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// airgapCluster is a copy of the Flatcar cluster with airgap: true, its
// images pinned from a site layout and pulled into cache.
func airgapCluster(t testing.TB, e *env, cache string) string {
	t.Helper()
	return airgapClusterSized(t, e, cache, t.TempDir(), nil)
}

// airgapClusterSized is airgapCluster in dir, with images of the given
// sizes (siteLayout).
func airgapClusterSized(t testing.TB, e *env, cache, dir string, size func(string) int64) string {
	t.Helper()
	data, err := os.ReadFile(e.flCluster)
	if err != nil {
		t.Fatal(err)
	}
	cf := filepath.Join(dir, "cluster.yaml")
	os.WriteFile(cf, append(data, []byte("airgap: true\n")...), 0o644)
	os.Symlink(filepath.Join(filepath.Dir(e.flCluster), "secrets"), filepath.Join(dir, "secrets"))
	site := siteLayout(t, cf, size)
	kilnOK(t, nil, "-c", cf, "images", "pin", "--from", site)
	kilnOK(t, nil, "-c", cf, "images", "pull", "--from", site, "--cache-dir", cache, "--arch", "amd64")
	return cf
}

// TestAirgapImageCarriesEverything: an air-gapped Flatcar image carries
// the sysext (linked from where it lies, never downloaded) and its role's
// image archive on the OEM btrfs; the image passes the same checks as any
// other; a real containerd imports the archive and lists every image with
// its pinned digest, the worker's without etcd or the API server.
func TestAirgapImageCarriesEverything(t *testing.T) {
	e := setup(t)
	cache := t.TempDir()
	cf := airgapCluster(t, e, cache)
	artifact := filepath.Join(e.dir, "artifact") // what newCluster pinned the sysext to
	var all []imageEntry
	json.Unmarshal([]byte(kilnOK(t, nil, "-c", cf, "images", "-o", "json")), &all)

	for _, role := range []string{"init", "worker"} {
		t.Run(role, func(t *testing.T) {
			dest := t.TempDir()
			br := e.bake(t, cf, "--profile", "flatcar-amd64", "--role", role, "--base-image", e.flatcar.path,
				"--cache-dir", cache, "--dest", dest, "--file", "kubernetes-sysext="+artifact)
			checkImage(t, e, br, e.flatcar, role, "amd64")
			config := render(t, cf, role, "amd64")
			for _, leak := range []string{"https://", "http://"} {
				if bytes.Contains(config, []byte(leak)) {
					t.Errorf("the air-gapped %s config names a URL (%s…)", role, leak)
				}
			}
			if !bytes.Contains(config, []byte(`"/oem/kiln/kubernetes-v1.37.2-x86-64.raw"`)) {
				t.Errorf("the config does not link the sysext to /oem/kiln")
			}
			oem := extract(t, br.Image, "OEM")
			must(t, "btrfs", "check", "--readonly", oem)
			tree := t.TempDir()
			must(t, "btrfs", "restore", oem, tree)
			sysext, _ := os.ReadFile(artifact)
			files := map[string][]byte{"config.ign": config, "kiln/kubernetes-v1.37.2-x86-64.raw": sysext}
			archivePath := filepath.Join(tree, "kiln", "images-"+role+".tar")
			archive, err := os.ReadFile(archivePath)
			if err != nil {
				t.Fatal(err)
			}
			files["kiln/images-"+role+".tar"] = archive
			mountAndCompare(t, br.Image, "OEM", "btrfs", files)
			if leftovers, _ := filepath.Glob(filepath.Join(dest, ".kiln-*")); len(leftovers) > 0 {
				t.Errorf("bake left %v in --dest", leftovers)
			}

			checkContainerdConfig(t, config, all)
			listed := containerdImport(t, archivePath)
			for _, im := range all {
				carried := strings.Contains(strings.Join(im.Roles, ","), role)
				got, ok := listed[im.Reference]
				switch {
				case carried && got != im.Digest:
					t.Errorf("containerd lists %s as %q, want the pinned %s", im.Reference, got, im.Digest)
				case !carried && ok:
					t.Errorf("a %s carries %s", role, im.Reference)
				}
				// The CRI looks a pod's REPO:TAG@DIGEST up as REPO@DIGEST.
				if i := strings.LastIndex(im.Reference, ":"); carried && i > strings.LastIndex(im.Reference, "/") {
					if byDigest := im.Reference[:i] + "@" + im.Digest; listed[byDigest] != im.Digest {
						t.Errorf("containerd does not list %s (lists %q)", byDigest, listed[byDigest])
					}
				}
			}
		})
	}
}

// checkContainerdConfig has the real containerd read the containerd
// configuration an air-gapped node's Ignition config writes and checks
// what containerd makes of it (`containerd config dump`, its own migration
// to config version 3): the pod sandbox is the pinned pause image the
// archive carries, registries are looked up only in kiln's hosts folder,
// whose _default entry names a host that cannot exist.
func checkContainerdConfig(t testing.TB, ign []byte, all []imageEntry) {
	t.Helper()
	conf := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(conf, ignitionFile(t, ign, "/etc/containerd/config.toml"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(kilnToolsDir(), "bin", "containerd-"+containerdVersion), "--config", conf, "config", "dump").CombinedOutput()
	if err != nil {
		t.Fatalf("containerd config dump: %v\n%s", err, out)
	}
	pause := ""
	for _, im := range all {
		if im.Name == "pause" {
			pause = im.Reference
		}
	}
	dump := string(out)
	for _, want := range []string{"sandbox = '" + pause + "'", "config_path = '/etc/containerd/certs.d'", "SystemdCgroup = true", "bin_dirs = ['/opt/cni/bin']"} {
		if !strings.Contains(dump, want) {
			t.Errorf("containerd's reading of the rendered config lacks %s:\n%s", want, dump)
		}
	}
	if hosts := string(ignitionFile(t, ign, "/etc/containerd/certs.d/_default/hosts.toml")); !strings.Contains(hosts, "server = \"https://no-registry.invalid\"") {
		t.Errorf("_default/hosts.toml:\n%s", hosts)
	}
}

// ignitionFile returns the contents of the file at path in an Ignition
// config (a data URL, maybe gzip'd).
func ignitionFile(t testing.TB, ign []byte, path string) []byte {
	t.Helper()
	cfg, _, err := v3_4.Parse(ign)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range cfg.Storage.Files {
		if f.Path != path || f.Contents.Source == nil {
			continue
		}
		du, err := dataurl.DecodeString(*f.Contents.Source)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if f.Contents.Compression == nil || *f.Contents.Compression == "" {
			return du.Data
		}
		zr, err := gzip.NewReader(bytes.NewReader(du.Data))
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		data, err := io.ReadAll(zr)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		return data
	}
	t.Fatalf("the Ignition config writes no %s", path)
	return nil
}

// containerdImport runs a real containerd on a scratch root, imports the
// archive into the k8s.io namespace with the command the agent runs, and
// returns what `ctr images ls` lists: reference -> digest. Every image
// must carry the CRI's pinned label.
func containerdImport(t testing.TB, archive string) map[string]string {
	t.Helper()
	bin := filepath.Join(kilnToolsDir(), "bin")
	root := t.TempDir()
	sock := filepath.Join(root, "containerd.sock")
	conf := filepath.Join(root, "config.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf("version = 3\nroot = %q\nstate = %q\n[grpc]\n  address = %q\n", filepath.Join(root, "root"), filepath.Join(root, "state"), sock)), 0o644)
	ctx, cancel := context.WithCancel(context.Background())
	daemon := exec.CommandContext(ctx, filepath.Join(bin, "containerd-"+containerdVersion), "--config", conf)
	var log bytes.Buffer
	daemon.Stdout, daemon.Stderr = &log, &log
	if err := daemon.Start(); err != nil {
		t.Fatalf("containerd (test/tools/build.sh builds it): %v", err)
	}
	t.Cleanup(func() { cancel(); daemon.Wait() })
	ctr := func(args ...string) []byte {
		cmd := exec.Command(filepath.Join(bin, "ctr-"+containerdVersion), append([]string{"--address", sock, "--namespace", "k8s.io"}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("ctr %s: %v\n%s\ncontainerd:\n%s", strings.Join(args, " "), err, out, log.String())
		}
		return out
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not start:\n%s", log.String())
		}
	}
	ctr(agent.ImportArgs(archive)...)
	listed := map[string]string{}
	for i, line := range strings.Split(string(ctr("images", "ls")), "\n") {
		if f := strings.Fields(line); i > 0 && len(f) >= 3 && f[0] != "REF" {
			listed[f[0]] = f[2]
			// The CRI adds an image ID reference (sha256:<config>) of
			// its own; the image is pinned when one of its references
			// carries the label.
			if !strings.HasPrefix(f[0], "sha256:") && !strings.Contains(line, agent.PinnedLabel) {
				t.Errorf("containerd lists %s without the label %s (kubelet image GC would remove it)", f[0], agent.PinnedLabel)
			}
		}
	}
	if len(listed) == 0 {
		t.Fatal("containerd lists no image after the import")
	}
	return listed
}

// TestAirgapPayloadMustFit: a payload larger than the OEM partition is
// refused before anything is written, naming the sizes and the fix.
func TestAirgapPayloadMustFit(t *testing.T) {
	e := setup(t)
	cache := t.TempDir()
	cf := airgapCluster(t, e, cache)
	big := filepath.Join(t.TempDir(), "big.raw")
	if err := os.WriteFile(big, bytes.Repeat([]byte("sysext!\n"), 20<<20), 0o644); err != nil { // 160 MiB > the fixture's 128 MiB OEM
		t.Fatal(err)
	}
	repinSysext(t, cf, big)
	dest := t.TempDir()
	_, r := e.build(t, cf, "--profile", "flatcar-amd64", "--role", "worker", "--base-image", e.flatcar.path, "--cache-dir", cache, "--dest", dest, "--file", "kubernetes-sysext="+big)
	if r.code != 2 || !strings.Contains(r.stderr, "cannot hold") || !strings.Contains(r.stderr, "4593") {
		t.Fatalf("oversized payload: exit %d, want 2 naming the sizes and the fix:\n%s", r.code, r.stderr)
	}
	if left, _ := os.ReadDir(dest); len(left) > 0 {
		t.Errorf("a refused bake left %d files in --dest", len(left))
	}
}

// payloadInit is the air-gapped PXE guest's /init: markerInit's network
// and config fetch, then every http(s) source the config names is fetched
// as Ignition would, printing its sha256 and URL.
const payloadInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo 1 >/proc/sys/kernel/printk
for m in /lib/modules/*.ko; do insmod "$m" || echo "KILN-FAILED insmod $m"; done
set -f
for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
for a in $(cat /proc/cmdline); do case "$a" in ignition.config.url=*) url="${a#ignition.config.url=}";; esac; done
wget -q -O /config.ign "$url" || echo "KILN-FAILED wget $url"
for src in $(grep -o '"source": *"http[^"]*"' /config.ign | sed 's/^"source": *"//; s/"$//'); do
	if wget -q -O /payload "$src"; then
		echo "KILN-PAYLOAD $(sha256sum /payload | cut -d' ' -f1) $src"
	else
		echo "KILN-FAILED wget $src"
	fi
done
echo KILN-DONE
poweroff -f
`

// TestAirgapPXE: a network-booted worker of an air-gapped cluster (QEMU's
// iPXE ROM, as in TestRealPXEClient) gets a config whose every download
// is kiln serve's (the sysext, pinned by SHA-512 as before, and the
// worker's image archive by sha256), and fetches each of them from kiln
// serve with the bytes the bundle holds.
func TestAirgapPXE(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatal("qemu-system-x86_64 not found: install Debian's qemu-system-x86 and ipxe-qemu (.ci/install-deps)")
	}
	if out, err := exec.Command(filepath.Join(repo, "test", "tools", "qemu-kernels.sh"), "amd64").CombinedOutput(); err != nil {
		t.Fatalf("test/tools/qemu-kernels.sh: %v\n%s", err, out)
	}
	e := setup(t)
	cache := t.TempDir()
	cf := airgapCluster(t, e, cache)
	appendFile(t, cf, "nodes:\n  - {name: w-1, role: worker, mac: \""+knownMAC+"\"}\n")
	kdir := filepath.Join(toolsDir(), "amd64")
	dir := t.TempDir()
	initrd := filepath.Join(dir, "payload.cpio")
	writeInitramfs(t, initrd, kdir, payloadInit, []string{"virtio_pci", "virtio_net"})
	port := freePort(t)
	server := fmt.Sprintf("http://10.0.2.2:%d", port)
	bundle := filepath.Join(dir, "bundle")
	kilnOK(t, nil, "-c", cf, "pxe", "--dest", bundle, "--server-url", server, "--cache-dir", cache,
		"--file", "kubernetes-sysext="+filepath.Join(e.dir, "artifact"),
		"--kernel", filepath.Join(kdir, "vmlinuz"), "--initramfs", initrd, "--kernel-arg", "console=ttyS0", "--kernel-arg", "panic=-1",
		"--mode", "init=live", "--mode", "control-plane=live") // installers need the release's image: TestAirgapPXEInstall
	m, err := pxe.ReadManifest(bundle)
	if err != nil {
		t.Fatal(err)
	}
	payload := map[string]string{} // URL -> sha256 of the bundle's file
	for _, a := range m.Assets {
		if a.Kind == pxe.AssetPayload {
			payload[server+pxe.AssetPath+a.File] = a.SHA256
		}
	}
	if len(payload) != 4 { // the sysext and three archives
		t.Fatalf("the bundle's payload: %v, want the sysext and an archive per role", payload)
	}
	accessLog := startServe(t, bundle, port)
	console := pxeBoot(t, port, knownMAC, "KILN-DONE")
	if strings.Contains(console, "KILN-FAILED") {
		t.Fatalf("the guest failed a fetch; console:\n%s", console)
	}
	fetched := map[string]bool{}
	for _, line := range strings.Split(console, "\n") {
		f := strings.Fields(strings.TrimSpace(line))
		if len(f) != 3 || f[0] != "KILN-PAYLOAD" {
			continue
		}
		want, ok := payload[f[2]]
		switch {
		case !ok:
			t.Errorf("the worker fetched %s, which is not kiln serve's payload", f[2])
		case f[1] != want:
			t.Errorf("%s: the worker got sha256 %s, the bundle holds %s", f[2], f[1], want)
		}
		fetched[path.Base(f[2])] = true
	}
	if !fetched["kubernetes-v1.37.2-x86-64.raw"] || !fetched["images-worker.tar"] || len(fetched) != 2 {
		t.Fatalf("the worker fetched %v, want the sysext and images-worker.tar only; console:\n%s", fetched, console)
	}
	var sawPayload int
	for _, line := range readLines(t, accessLog) {
		if strings.Contains(line, "/"+pxe.PayloadDir+"/") && strings.Contains(line, " 200") {
			sawPayload++
		}
	}
	if sawPayload != 2 {
		t.Errorf("kiln serve's log shows %d payload downloads, want 2", sawPayload)
	}
}

// TestAirgapPXEInstall: an air-gapped bundle with install-mode nodes
// carries the OS release kiln verified (the image and its signature, as
// published), and its installers take it from kiln serve (flatcar-install
// -b), where the signature verifies with the release key as
// flatcar-install checks it. With local PXE files and no release image,
// kiln pxe refuses and says what to do.
func TestAirgapPXEInstall(t *testing.T) {
	e := setup(t)
	cache := t.TempDir()
	cf := airgapCluster(t, e, cache)
	artifact := "kubernetes-sysext=" + filepath.Join(e.dir, "artifact")
	env := []string{"SSL_CERT_FILE=" + e.certFile}
	bundle := filepath.Join(t.TempDir(), "b")
	kilnOK(t, env, "-c", cf, "pxe", "--dest", bundle, "--server-url", "http://10.0.0.5:8080", "--cache-dir", cache,
		"--mirror", e.srv.URL+"/{channel}", "--insecure-mirror", "--signing-key", e.goodKey, "--file", artifact)
	m, err := pxe.ReadManifest(bundle)
	if err != nil {
		t.Fatal(err)
	}
	dir := "flatcar-amd64-" + flatcarVersion + "/install"
	image := filepath.Join(bundle, "assets", dir, flatcarVersion, "flatcar_production_image.bin.bz2")
	got, err := os.ReadFile(image)
	if err != nil || !bytes.Equal(got, e.flatcarBz2) {
		t.Fatalf("the bundle's install image is not the published release (%v)", err)
	}
	keyring := filepath.Join(t.TempDir(), "keyring.gpg")
	must(t, "gpg", "--batch", "--no-default-keyring", "--keyring", keyring, "--import", e.goodKey)
	must(t, "gpg", "--batch", "--no-default-keyring", "--keyring", keyring, "--verify", image+".sig", image)

	cp, _ := m.Node("default-control-plane")
	config, _ := os.ReadFile(filepath.Join(bundle, cp.Config))
	if want := "-b http://10.0.0.5:8080/assets/" + dir; !bytes.Contains(config, []byte(want)) {
		t.Errorf("the control plane's installer does not install from kiln serve (%q)", want)
	}
	port := freePort(t)
	startServe(t, bundle, port)
	served := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/assets/%s/%s/flatcar_production_image.bin.bz2", port, dir, flatcarVersion))
	if !bytes.Equal(served, e.flatcarBz2) {
		t.Error("kiln serve does not serve the install image as published")
	}

	r := kilnRun(t, env, "-c", cf, "pxe", "--dest", filepath.Join(t.TempDir(), "b"), "--server-url", "http://10.0.0.5:8080", "--cache-dir", cache,
		"--kernel", image, "--initramfs", image+".sig", "--file", artifact)
	if r.code != 2 || !strings.Contains(r.stderr, "--mode ROLE=live") {
		t.Fatalf("local PXE files, install-mode nodes: exit %d, want 2 naming the fix:\n%s", r.code, r.stderr)
	}
}

// repinSysext pins the cluster's sysext, for both arches, to the file's
// content.
func repinSysext(t testing.TB, cf, file string) {
	t.Helper()
	editCluster(t, cf, func(m map[string]any) { m["kubernetes"].(map[string]any)["downloads"] = nil })
	for _, arch := range []string{"amd64", "arm64"} {
		kilnOK(t, nil, "-c", cf, "pin", "--arch", arch, "--file", "kubernetes-sysext="+file)
	}
}
