//go:build oracle

// Package image checks the disk images kiln bakes with tools nobody here
// wrote: fixture base images are made with sgdisk, mkfs.vfat, mkfs.btrfs
// and mke2fs; results are read back with sgdisk, sfdisk, fsck.vfat,
// e2fsck, btrfs check, debugfs, mtools, bmaptool, zstd, xz and the Linux
// kernel itself (loop mounts, as root). Base images are served compressed
// from a local HTTPS server with digests and an OpenPGP signature made by
// gpg with a test key. Run with `make oracle` (as root).
package image

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnproject/kiln/imagebuild/baseimage/flatcartest"
)

var repo, _ = filepath.Abs("../..")

// env is shared by the tests: fixtures, keys, clusters and the server.
type env struct {
	dir                  string
	flatcar, arm, fcos   fixture
	flatcarBz2, fcosXZ   []byte
	goodKey, wrongSigner string // armored public key; GNUPGHOME of a stranger
	gnupg                string
	flCluster, fcCluster string
	srv                  *server
	certFile             string
}

var (
	shared  *env
	setupMu sync.Mutex
)

func setup(t testing.TB) *env {
	t.Helper()
	setupMu.Lock()
	defer setupMu.Unlock()
	if shared != nil {
		return shared
	}
	if os.Geteuid() != 0 {
		t.Fatal("the image oracle mounts baked filesystems with the kernel: run as root (make oracle)")
	}
	if _, err := os.Stat(filepath.Join(repo, "bin", "kiln")); err != nil {
		t.Fatal("bin/kiln missing: run make build first")
	}
	dir, err := os.MkdirTemp("", "kiln-image-oracle-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{dir: dir}
	e.flatcar = flatcarFixture(t, dir, "amd64")
	e.arm = flatcarFixture(t, dir, "arm64")
	e.fcos = fcosFixture(t, dir)
	e.flatcarBz2 = must(t, "bzip2", "-c", e.flatcar.path)
	e.fcosXZ = must(t, "xz", "-T0", "-c", e.fcos.path)

	e.gnupg = gpgHome(t, dir, "good")
	e.goodKey = filepath.Join(dir, "good.asc")
	os.WriteFile(e.goodKey, must(t, "gpg", "--homedir", e.gnupg, "--armor", "--export"), 0o644)
	e.wrongSigner = gpgHome(t, dir, "stranger")

	e.flCluster = newCluster(t, dir, "flatcar", "kubernetes-sysext")
	e.fcCluster = newCluster(t, dir, "fcos", "kubeadm", "kubelet", "kubectl", "cni-plugins")
	e.srv = newServer(t)
	e.certFile = filepath.Join(dir, "ca.pem")
	os.WriteFile(e.certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.srv.Certificate().Raw}), 0o644)
	pxeFiles["flatcar_production_pxe_image.cpio.gz"] = flatcartest.Initramfs(t, flatcarVersion)
	e.publish(t, e.flatcarBz2, e.sign(t, e.gnupg, e.flatcarBz2))
	shared = e
	return e
}

func gpgHome(t testing.TB, dir, name string) string {
	home := filepath.Join(dir, "gnupg-"+name)
	os.MkdirAll(home, 0o700)
	must(t, "gpg", "--homedir", home, "--batch", "--passphrase", "", "--quick-gen-key", "kiln "+name+" <"+name+"@kiln.invalid>", "ed25519", "sign", "never")
	return home
}

func (e *env) sign(t testing.TB, home string, data []byte) []byte {
	f := filepath.Join(e.dir, "to-sign")
	os.WriteFile(f, data, 0o644)
	os.Remove(f + ".sig")
	must(t, "gpg", "--homedir", home, "--batch", "--detach-sign", "-o", f+".sig", f)
	sig, _ := os.ReadFile(f + ".sig")
	return sig
}

const flatcarVersion = "4593.1.0"

// pxeFiles are the network-boot files the fixture releases hold: name in
// the release -> content. setup adds Flatcar's initramfs, whose /usr
// names flatcarVersion.
var pxeFiles = map[string][]byte{
	"flatcar_production_pxe.vmlinuz":               bytes.Repeat([]byte("flatcar pxe kernel\n"), 4096),
	"fedora-coreos-42.1-live-kernel.x86_64":        bytes.Repeat([]byte("fcos live kernel\n"), 4096),
	"fedora-coreos-42.1-live-initramfs.x86_64.img": bytes.Repeat([]byte("fcos live initramfs\n"), 4096),
	"fedora-coreos-42.1-live-rootfs.x86_64.img":    bytes.Repeat([]byte("fcos live rootfs\n"), 4096),
}

// publish serves a Flatcar release (image, .DIGESTS, .sig; the PXE kernel
// and initramfs, each with its .DIGESTS and a good signature) and a Fedora
// CoreOS stream (metal image and live PXE files, each with a signature by
// the test key). The digests always
// describe the files' true bytes.
func (e *env) publish(t testing.TB, image, sig []byte) {
	rel := "/stable/amd64-usr/" + flatcarVersion + "/"
	e.srv.set("/stable/amd64-usr/current/version.txt", []byte("FLATCAR_BUILD=4593\nFLATCAR_VERSION="+flatcarVersion+"\n"))
	e.publishFlatcarFile(t, rel+"flatcar_production_image.bin.bz2", e.flatcarBz2, image, sig)
	for _, name := range []string{"flatcar_production_pxe.vmlinuz", "flatcar_production_pxe_image.cpio.gz"} {
		e.publishFlatcarFile(t, rel+name, pxeFiles[name], pxeFiles[name], e.sign(t, e.gnupg, pxeFiles[name]))
	}
	builds := e.srv.URL + "/prod/streams/stable/builds/42.1/x86_64/"
	file := func(name string, data []byte) string {
		e.srv.set(strings.TrimPrefix(builds+name, e.srv.URL), data)
		e.srv.set(strings.TrimPrefix(builds+name+".sig", e.srv.URL), e.sign(t, e.gnupg, data))
		return fmt.Sprintf(`{"location":%q,"sha256":"%x","signature":%q}`, builds+name, sha256.Sum256(data), builds+name+".sig")
	}
	stream := fmt.Sprintf(`{"stream":"stable","architectures":{"x86_64":{"artifacts":{"metal":{"release":"42.1","formats":{"raw.xz":{"disk":%s},"pxe":{"kernel":%s,"initramfs":%s,"rootfs":%s}}}}}}}`,
		file("fedora-coreos-42.1-metal.x86_64.raw.xz", e.fcosXZ),
		file("fedora-coreos-42.1-live-kernel.x86_64", pxeFiles["fedora-coreos-42.1-live-kernel.x86_64"]),
		file("fedora-coreos-42.1-live-initramfs.x86_64.img", pxeFiles["fedora-coreos-42.1-live-initramfs.x86_64.img"]),
		file("fedora-coreos-42.1-live-rootfs.x86_64.img", pxeFiles["fedora-coreos-42.1-live-rootfs.x86_64.img"]))
	e.srv.set("/streams/stable.json", []byte(stream))
}

// publishFlatcarFile serves served at path, with a .DIGESTS holding the
// SHA-512 of truth and the signature sig (none if nil).
func (e *env) publishFlatcarFile(t testing.TB, path string, truth, served, sig []byte) {
	name := filepath.Base(path)
	e.srv.set(path, served)
	e.srv.set(path+".DIGESTS", []byte(fmt.Sprintf("# MD5 HASH\n0123  %s\n# SHA512 HASH\n%x  %s\n", name, sha512.Sum512(truth), name)))
	e.srv.mu.Lock()
	delete(e.srv.files, path+".sig")
	e.srv.mu.Unlock()
	if sig != nil {
		e.srv.set(path+".sig", sig)
	}
}

// newCluster makes a cluster with its downloads pinned from local files.
func newCluster(t testing.TB, dir, osName string, artifacts ...string) string {
	cdir := filepath.Join(dir, "cluster-"+osName)
	kilnOK(t, nil, "init", "lab", "--endpoint", "lb.lab.test:6443", "--dest", cdir, "--os", osName)
	art := filepath.Join(dir, "artifact")
	os.WriteFile(art, []byte("stand-in artifact\n"), 0o644)
	for _, arch := range []string{"amd64", "arm64"} {
		args := []string{"-c", filepath.Join(cdir, "cluster.yaml"), "pin", "--arch", arch}
		for _, a := range artifacts {
			args = append(args, "--file", a+"="+art)
		}
		kilnOK(t, nil, args...)
	}
	return filepath.Join(cdir, "cluster.yaml")
}

// server is a local HTTPS file server with Range support; it counts
// requests and can cut the next download of a path short.
type server struct {
	*httptest.Server
	mu    sync.Mutex
	files map[string][]byte
	hits  map[string]int
	// ranges records Range headers received, per path.
	ranges map[string][]string
	// cutPath's next download sends cutBytes and drops the connection.
	cutPath  string
	cutBytes int
}

func newServer(t testing.TB) *server {
	s := &server{files: map[string][]byte{}, hits: map[string]int{}, ranges: map[string][]string{}}
	s.Server = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		data, ok := s.files[r.URL.Path]
		s.hits[r.URL.Path]++
		if rg := r.Header.Get("Range"); rg != "" {
			s.ranges[r.URL.Path] = append(s.ranges[r.URL.Path], rg)
		}
		n := 0
		if r.URL.Path == s.cutPath {
			n, s.cutPath = s.cutBytes, ""
		}
		s.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		if n > 0 {
			w.Header().Set("Content-Length", fmt.Sprint(len(data)))
			w.Write(data[:n])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	}))
	return s
}

func (s *server) set(path string, data []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.files[path] = data
}

func (s *server) count(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hits[path]
}

// result is what kiln printed and how it exited.
type result struct {
	code           int
	stdout, stderr string
}

func kilnRun(t testing.TB, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command(filepath.Join(repo, "bin", "kiln"), args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{code, out.String(), errb.String()}
}

func kilnOK(t testing.TB, env []string, args ...string) string {
	t.Helper()
	r := kilnRun(t, env, args...)
	if r.code != 0 {
		t.Fatalf("kiln %s: exit %d\n%s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r.stdout
}

// bakeResult mirrors build-image -o json.
type bakeResult struct {
	Image, Compressed, Bmap, SHA256File string
	SHA256                              string
	Touched                             []string `json:"touchedPartitions"`
	FirmwareSHA256                      string
}

func (e *env) build(t testing.TB, cluster string, args ...string) (bakeResult, result) {
	t.Helper()
	r := kilnRun(t, []string{"SSL_CERT_FILE=" + e.certFile}, append([]string{"-c", cluster, "build-image", "-o", "json"}, args...)...)
	var br bakeResult
	if r.code == 0 {
		if err := json.Unmarshal([]byte(r.stdout), &br); err != nil {
			t.Fatalf("build-image -o json: %v\n%s", err, r.stdout)
		}
	}
	return br, r
}

// bake is build that must succeed.
func (e *env) bake(t testing.TB, cluster string, args ...string) bakeResult {
	t.Helper()
	br, r := e.build(t, cluster, args...)
	if r.code != 0 {
		t.Fatalf("build-image: exit %d\n%s", r.code, r.stderr)
	}
	return br
}

func (e *env) flatcarArgs(cache string) []string {
	return []string{"--profile", "flatcar-amd64", "--mirror", e.srv.URL + "/{channel}", "--insecure-mirror", "--signing-key", e.goodKey, "--cache-dir", cache}
}

func cachedImages(t testing.TB, cache string) []string {
	m, _ := filepath.Glob(filepath.Join(cache, "base", "*.raw"))
	return m
}

// TestFlatcarDownloadVerifyCacheBake: the first bake downloads, verifies
// (digest and gpg signature) and caches the base; the second is a cache
// hit; both images pass every check.
func TestFlatcarDownloadVerifyCacheBake(t *testing.T) {
	e := setup(t)
	cache, dest := t.TempDir(), t.TempDir()
	imgPath := "/stable/amd64-usr/" + flatcarVersion + "/flatcar_production_image.bin.bz2"
	before := e.srv.count(imgPath)
	br, r := e.build(t, e.flCluster, append(e.flatcarArgs(cache), "--role", "init", "--dest", dest, "--compress", "zst")...)
	if r.code != 0 {
		t.Fatalf("build-image: exit %d\n%s", r.code, r.stderr)
	}
	if !strings.Contains(r.stderr, "OpenPGP signature good") {
		t.Errorf("no signature verification reported:\n%s", r.stderr)
	}
	checkImage(t, e, br, e.flatcar, "init", "amd64")
	checkFlatcar(t, e, br, e.flatcar, e.flCluster, "init", "amd64")
	must(t, "sh", "-c", fmt.Sprintf("zstd -dc %s | cmp - %s", br.Compressed, br.Image))

	br2, r2 := e.build(t, e.flCluster, append(e.flatcarArgs(cache), "--role", "worker", "--dest", dest)...)
	if r2.code != 0 || !strings.Contains(r2.stderr, "cached") {
		t.Fatalf("second build: exit %d\n%s", r2.code, r2.stderr)
	}
	if got := e.srv.count(imgPath) - before; got != 1 {
		t.Errorf("image downloaded %d times for two bakes, want 1 (cache hit)", got)
	}
	checkFlatcar(t, e, br2, e.flatcar, e.flCluster, "worker", "amd64")
	if n := len(cachedImages(t, cache)); n != 1 {
		t.Errorf("%d cached base images, want 1", n)
	}
}

// TestDownloadResumes: a download cut short fails with a resume hint,
// caches nothing, and the next run resumes with a Range request.
func TestDownloadResumes(t *testing.T) {
	e := setup(t)
	cache, dest := t.TempDir(), t.TempDir()
	imgPath := "/stable/amd64-usr/" + flatcarVersion + "/flatcar_production_image.bin.bz2"
	e.srv.mu.Lock()
	e.srv.cutPath, e.srv.cutBytes = imgPath, 1<<20
	e.srv.mu.Unlock()
	_, r := e.build(t, e.flCluster, append(e.flatcarArgs(cache), "--role", "worker", "--dest", dest)...)
	if r.code != 5 || !strings.Contains(r.stderr, "resume") {
		t.Fatalf("cut download: exit %d, want 5 with a resume hint\n%s", r.code, r.stderr)
	}
	if len(cachedImages(t, cache)) != 0 {
		t.Fatal("a truncated download was cached")
	}
	if out, _ := filepath.Glob(filepath.Join(dest, "*")); len(out) != 0 {
		t.Fatalf("failed bake left files: %v", out)
	}
	br, r := e.build(t, e.flCluster, append(e.flatcarArgs(cache), "--role", "worker", "--dest", dest)...)
	if r.code != 0 {
		t.Fatalf("resumed build: exit %d\n%s", r.code, r.stderr)
	}
	e.srv.mu.Lock()
	ranges := e.srv.ranges[imgPath]
	e.srv.mu.Unlock()
	if len(ranges) == 0 || ranges[len(ranges)-1] != "bytes=1048576-" {
		t.Errorf("resume sent Range %v, want bytes=1048576-", ranges)
	}
	checkFlatcar(t, e, br, e.flatcar, e.flCluster, "worker", "amd64")
}

// TestBadDownloadsRefused: corrupt, wrongly signed and unsigned images
// are refused with exit 5 and never cached.
func TestBadDownloadsRefused(t *testing.T) {
	e := setup(t)
	t.Cleanup(func() { e.publish(t, e.flatcarBz2, e.sign(t, e.gnupg, e.flatcarBz2)) })
	corrupt := bytes.Clone(e.flatcarBz2)
	corrupt[len(corrupt)/2] ^= 0xff
	for _, c := range []struct {
		name       string
		image, sig []byte
		want       string
	}{
		{"corrupt", corrupt, e.sign(t, e.gnupg, corrupt), "corrupt"},
		{"wrongly signed", e.flatcarBz2, e.sign(t, e.wrongSigner, e.flatcarBz2), "signature does not verify"},
		{"unsigned", e.flatcarBz2, nil, "unsigned"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e.publish(t, c.image, c.sig)
			cache, dest := t.TempDir(), t.TempDir()
			_, r := e.build(t, e.flCluster, append(e.flatcarArgs(cache), "--role", "worker", "--dest", dest)...)
			if r.code != 5 || !strings.Contains(r.stderr, c.want) {
				t.Fatalf("exit %d, want 5 mentioning %q\n%s", r.code, c.want, r.stderr)
			}
			left, _ := filepath.Glob(filepath.Join(cache, "*", "*"))
			if len(left) != 0 {
				t.Errorf("refused download left %v in the cache", left)
			}
		})
	}
}

// TestFCOSStreamBake: the Fedora CoreOS base comes from a stream (sha256),
// the config lands in the ext4 boot filesystem with the right modes, and
// the xz output decompresses to the image.
func TestFCOSStreamBake(t *testing.T) {
	e := setup(t)
	cache, dest := t.TempDir(), t.TempDir()
	// Signed like Fedora's (the test key stands in for Fedora's keys).
	br, r := e.build(t, e.fcCluster, "--profile", "fcos-x86_64", "--role", "control-plane", "--mirror", e.srv.URL, "--signing-key", e.goodKey, "--cache-dir", cache, "--dest", dest, "--compress", "xz")
	if r.code != 0 || !strings.Contains(r.stderr, "OpenPGP signature good") {
		t.Fatalf("build-image: exit %d, want a checked signature\n%s", r.code, r.stderr)
	}
	checkImage(t, e, br, e.fcos, "control-plane", "amd64")
	must(t, "sh", "-c", fmt.Sprintf("xz -dc %s | cmp - %s", br.Compressed, br.Image))

	boot := extract(t, br.Image, "boot")
	must(t, "e2fsck", "-fn", boot)
	want := render(t, e.fcCluster, "control-plane", "amd64")
	if got := must(t, "debugfs", "-R", "cat ignition/config.ign", boot); !bytes.Equal(got, want) {
		t.Error("debugfs reads back a config.ign that differs from kiln render")
	}
	for p, mode := range map[string]string{"ignition": "0700", "ignition/config.ign": "0600"} {
		if st := string(must(t, "debugfs", "-R", "stat "+p, boot)); !strings.Contains(st, "Mode:  "+mode) || !strings.Contains(st, "User:     0   Group:     0") {
			t.Errorf("%s: want mode %s owned by root:\n%s", p, mode, st)
		}
	}
	for p, data := range e.fcos.files["boot"] {
		if got := must(t, "debugfs", "-R", "cat "+p, boot); !bytes.Equal(got, data) {
			t.Errorf("boot/%s changed", p)
		}
	}
	if link := string(must(t, "debugfs", "-R", "stat loader", boot)); !strings.Contains(link, `Fast link dest: "loader.1"`) {
		t.Errorf("loader symlink changed:\n%s", link)
	}
	mountAndCompare(t, br.Image, "boot", "ext4", map[string][]byte{"ignition/config.ign": want, "ignition.firstboot": e.fcos.files["boot"]["ignition.firstboot"]})
}

// TestRaspberryPi4Firmware: an offline bake (--base-image, zstd) lays the
// firmware on the ESP, byte-identical, with config.txt, keeping the ESP's
// files; fsck.vfat is clean.
func TestRaspberryPi4Firmware(t *testing.T) {
	e := setup(t)
	base, zipPath, fw := rpi4Inputs(t, e)
	br := e.bakeRPi4(t, base, zipPath)
	checkImage(t, e, br, e.arm, "worker", "arm64")
	checkFlatcar(t, e, br, e.arm, e.flCluster, "worker", "arm64")
	esp := extract(t, br.Image, "EFI-SYSTEM")
	must(t, "fsck.vfat", "-n", esp)
	for p, data := range fw {
		if got := must(t, "mcopy", "-n", "-i", esp, "::/"+p, "-"); !bytes.Equal(got, data) {
			t.Errorf("firmware %s differs on the ESP", p)
		}
	}
	cfg := must(t, "mcopy", "-n", "-i", esp, "::/config.txt", "-")
	if !bytes.Contains(cfg, []byte("armstub=RPI_EFI.fd")) {
		t.Errorf("config.txt lacks armstub=RPI_EFI.fd:\n%s", cfg)
	}
	mountAndCompare(t, br.Image, "EFI-SYSTEM", "vfat", map[string][]byte{"RPI_EFI.fd": fw["RPI_EFI.fd"], "overlays/miniuart-bt.dtbo": fw["overlays/miniuart-bt.dtbo"]})

	// Without --firmware the profile (not pinned) asks for it.
	_, r := e.build(t, e.flCluster, "--profile", "flatcar-rpi4", "--role", "worker", "--base-image", base, "--cache-dir", t.TempDir(), "--dest", t.TempDir())
	if r.code != 2 || !strings.Contains(r.stderr, "--firmware") {
		t.Errorf("missing firmware: exit %d\n%s", r.code, r.stderr)
	}
}

// rpi4Inputs: the arm64 fixture compressed with zstd (an offline
// --base-image) and a stand-in pftf firmware zip with its files.
func rpi4Inputs(t testing.TB, e *env) (base, zipPath string, fw map[string][]byte) {
	base = filepath.Join(t.TempDir(), "flatcar-arm64.bin.zst")
	must(t, "zstd", "-q", "-T0", e.arm.path, "-o", base)
	fw = map[string][]byte{
		"RPI_EFI.fd": randomBytes(t, 2<<20), "start4.elf": randomBytes(t, 300<<10), "fixup4.dat": randomBytes(t, 5<<10),
		"bcm2711-rpi-4-b.dtb": randomBytes(t, 50<<10), "overlays/miniuart-bt.dtbo": randomBytes(t, 2<<10),
		"firmware/brcm/brcmfmac43455-sdio.bin": randomBytes(t, 100<<10), "Readme.md": []byte("# firmware\n"),
	}
	zipPath = filepath.Join(t.TempDir(), "RPi4_UEFI_Firmware.zip")
	writeZip(t, zipPath, fw)
	return base, zipPath, fw
}

// bakeRPi4 bakes a worker image for the flatcar-rpi4 profile, offline.
func (e *env) bakeRPi4(t testing.TB, base, zipPath string) bakeResult {
	t.Helper()
	return e.bake(t, e.flCluster, "--profile", "flatcar-rpi4", "--role", "worker", "--base-image", base, "--firmware", zipPath, "--cache-dir", t.TempDir(), "--dest", t.TempDir())
}

func writeZip(t testing.TB, path string, files map[string][]byte) {
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	zw := zip.NewWriter(f)
	for p, data := range files {
		w, _ := zw.Create(p)
		w.Write(data)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// render is what kiln render prints for the role: the reference the
// baked config must equal byte for byte.
func render(t testing.TB, cluster, role, arch string) []byte {
	return []byte(kilnOK(t, nil, "-c", cluster, "render", "--role", role, "--arch", arch, "--format", "ignition"))
}

// checkImage: GPT sound and unchanged (sgdisk -v, sfdisk), untouched
// partitions byte-identical to the base, .sha256 right, bmaptool copy
// with our .bmap reproduces the image.
func checkImage(t testing.TB, e *env, br bakeResult, base fixture, role, arch string) {
	t.Helper()
	if v := string(must(t, "sgdisk", "-v", br.Image)); !strings.Contains(v, "No problems found") {
		t.Errorf("sgdisk -v:\n%s", v)
	}
	was, got := readTable(t, base.path), readTable(t, br.Image)
	if was.PartitionTable.ID != got.PartitionTable.ID || len(was.PartitionTable.Partitions) != len(got.PartitionTable.Partitions) {
		t.Fatalf("disk GUID or partition count changed: %s -> %s", was.PartitionTable.ID, got.PartitionTable.ID)
	}
	touched := strings.Join(br.Touched, ",")
	for i, p := range was.PartitionTable.Partitions {
		q := got.PartitionTable.Partitions[i]
		if p.UUID != q.UUID || p.Type != q.Type || p.Start != q.Start || p.Size != q.Size || p.Name != q.Name {
			t.Errorf("partition %s changed: %+v -> %+v", p.Name, p, q)
		}
		if strings.Contains(","+touched+",", ","+p.Name+",") {
			continue
		}
		if !bytes.Equal(sectors(t, base.path, p.Start, p.Size), sectors(t, br.Image, q.Start, q.Size)) {
			t.Errorf("untouched partition %s differs from the base", p.Name)
		}
	}
	must(t, "sh", "-c", fmt.Sprintf("cd %s && sha256sum -c --quiet %s", filepath.Dir(br.SHA256File), filepath.Base(br.SHA256File)))
	copyPath := filepath.Join(t.TempDir(), "flashed.raw")
	must(t, "bmaptool", "copy", "--bmap", br.Bmap, br.Image, copyPath)
	must(t, "cmp", br.Image, copyPath)
}

// checkFlatcar: the OEM btrfs is clean, keeps its files and label, holds
// config.ign equal to kiln render's output; the ESP keeps the first-boot
// flag.
func checkFlatcar(t testing.TB, e *env, br bakeResult, base fixture, cluster, role, arch string) {
	t.Helper()
	oem := extract(t, br.Image, "OEM")
	must(t, "btrfs", "check", "--readonly", oem)
	if sb := string(must(t, "btrfs", "inspect-internal", "dump-super", oem)); !strings.Contains(sb, "label\t\t\tOEM") {
		t.Errorf("OEM label lost:\n%s", sb)
	}
	wantSB := string(must(t, "btrfs", "inspect-internal", "dump-super", extract(t, base.path, "OEM")))
	gotSB := string(must(t, "btrfs", "inspect-internal", "dump-super", oem))
	if fsid(wantSB) != fsid(gotSB) {
		t.Errorf("OEM filesystem UUID changed: %s -> %s", fsid(wantSB), fsid(gotSB))
	}
	files := map[string][]byte{"config.ign": render(t, cluster, role, arch)}
	for p, data := range base.files["OEM"] {
		files[p] = data
	}
	mountAndCompare(t, br.Image, "OEM", "btrfs", files)
	esp := extract(t, br.Image, "EFI-SYSTEM")
	must(t, "fsck.vfat", "-n", esp)
	must(t, "mcopy", "-n", "-i", esp, "::/flatcar/first_boot", "-")
}

func fsid(dump string) string {
	for _, l := range strings.Split(dump, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "fsid" {
			return f[1]
		}
	}
	return ""
}

func sectors(t testing.TB, path string, start, count int64) []byte {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, count*512)
	if _, err := f.ReadAt(b, start*512); err != nil {
		t.Fatal(err)
	}
	return b
}

// extract copies a partition of an image to its own file.
func extract(t testing.TB, img, name string) string {
	e := readTable(t, img).byName(t, name)
	out := filepath.Join(t.TempDir(), name+".img")
	must(t, "dd", "if="+img, "of="+out, "bs=1M", "iflag=skip_bytes,count_bytes", fmt.Sprintf("skip=%d", e.Start*512), fmt.Sprintf("count=%d", e.Size*512), "conv=sparse", "status=none")
	return out
}

// mountAndCompare mounts a partition of the image read-only with the
// running kernel's own driver and compares files byte for byte.
func mountAndCompare(t testing.TB, img, name, fstype string, files map[string][]byte) {
	t.Helper()
	if known, _ := os.ReadFile("/proc/filesystems"); !bytes.Contains(known, []byte("\t"+fstype+"\n")) {
		t.Logf("this kernel has no %s driver: %s checked with the userspace tools only", fstype, name)
		return
	}
	e := readTable(t, img).byName(t, name)
	mnt := t.TempDir()
	must(t, "mount", "-t", fstype, "-o", fmt.Sprintf("loop,ro,offset=%d,sizelimit=%d", e.Start*512, e.Size*512), img, mnt)
	defer must(t, "umount", mnt)
	for p, want := range files {
		got, err := os.ReadFile(filepath.Join(mnt, p))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("kernel %s mount of %s: %s differs (%v)", fstype, name, p, err)
		}
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared != nil {
		os.RemoveAll(shared.dir)
	}
	os.Exit(code)
}

// TestWrongArchBaseRefused: a base image whose EFI system partition boots
// another architecture than the profile's is refused before anything is
// written, naming both; on FAT32 (Flatcar's ESP) and FAT16 (Fedora
// CoreOS's).
func TestWrongArchBaseRefused(t *testing.T) {
	e := setup(t)
	for _, c := range []struct {
		cluster, base, profile, loader string
	}{
		{e.flCluster, e.flatcar.path, "flatcar-rpi4", "/EFI/boot/bootx64.efi"},
		{e.flCluster, e.arm.path, "flatcar-amd64", "/EFI/boot/bootaa64.efi"},
		{e.fcCluster, e.fcos.path, "fcos-aarch64", "/EFI/BOOT/BOOTX64.EFI"},
	} {
		t.Run(c.profile, func(t *testing.T) {
			dest := t.TempDir()
			args := []string{"--profile", c.profile, "--role", "worker", "--base-image", c.base, "--cache-dir", t.TempDir(), "--dest", dest}
			if c.profile == "flatcar-rpi4" {
				_, zipPath, _ := rpi4Inputs(t, e)
				args = append(args, "--firmware", zipPath)
			}
			_, r := e.build(t, c.cluster, args...)
			if r.code != 2 || !strings.Contains(r.stderr, "boots "+c.loader) || !strings.Contains(r.stderr, "profile "+c.profile+" is for") {
				t.Errorf("exit %d, want 2 naming %s and the profile:\n%s", r.code, c.loader, r.stderr)
			}
			if left, _ := os.ReadDir(dest); len(left) > 0 {
				t.Errorf("a refused bake left %d entries in --dest", len(left))
			}
		})
	}
}
