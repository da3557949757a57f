package main

// Container images for the real-node rehearsal, built locally (no registry
// is reachable): an OCI image layout holding, for linux/amd64, every image
// `kiln images` lists for the cluster, plus the rehearsal's probe image.
// Each image is one layer holding binaries built from their modules
// (test/tools/build.sh) or Debian's binaries from this host, each with the
// shared libraries ldd names at their real paths. Builds are reproducible:
// entries sorted, owned by root, mtime SOURCE_DATE_EPOCH (default 0).
//
//	rehearsal images --kiln bin/kiln --cluster CLUSTER.yaml --tools DIR \
//	    --version v1.34.4 [--etcd v3.6.5] --dest DIR

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const (
	// probeImageRef is the rehearsal's own image for the DNS and Service
	// checks: this binary, Entrypoint ["/rehearsal", "probe"] (probe.go).
	probeImageRef = "rehearsal.invalid/probe:v1"
	// keepalivedRepo is the repository the rehearsal names its keepalived
	// image by (kiln knows no upstream one); keepalivedImageRef adds the tag.
	keepalivedRepo = "rehearsal.invalid/keepalived"
	// imageCNIFlannel is the flannel CNI plugin's version in the tools dir
	// (test/tools/build.sh CNI_FLANNEL_VERSION): kiln's flannel-cni-plugin
	// tag (v1.9.1-flannel1) names flannel-io/cni-plugin, which the module
	// proxy refuses; containernetworking/plugins v0.9.1 has the same plugin.
	imageCNIFlannel = "v0.9.1"
	imagePath       = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// keepalivedImageRef is the reference the cluster file must give
// images.keepalived so that `kiln images pin --from LAYOUT` re-pins it to
// the image buildImages makes: rehearsal.invalid/keepalived:debian-<the
// host's keepalived package version>, e.g. debian-1_2.2.7-1_b2.
func keepalivedImageRef() (string, error) {
	v, err := debianVersion("keepalived")
	if err != nil {
		return "", err
	}
	return keepalivedRepo + ":debian-" + v, nil
}

// debianVersion is pkg's installed version as an image tag (characters
// other than [A-Za-z0-9_.-] become '_': 1:2.2.7-1+b2 is 1_2.2.7-1_b2).
func debianVersion(pkg string) (string, error) {
	out, err := exec.Command("dpkg-query", "-W", "-f", "${Version}", pkg).Output()
	if err != nil || len(out) == 0 {
		return "", fmt.Errorf("dpkg-query %s: %v (.ci/install-deps installs it)", pkg, err)
	}
	return regexp.MustCompile(`[^A-Za-z0-9_.-]`).ReplaceAllString(string(out), "_"), nil
}

// builtImage is one image of the layout buildImages wrote.
type builtImage struct {
	Name      string // kiln's name (images map key), or "probe"
	Reference string // the full reference both index annotations carry
	Digest    string // the manifest's digest
	// Size is manifest + config + compressed layer; Unpacked the layer's
	// uncompressed tar.
	Size, Unpacked int64
}

// kilnListed is one entry of `kiln images -o json`.
type kilnListed struct {
	Name      string   `json:"name"`
	Reference string   `json:"reference"`
	Digest    string   `json:"digest"`
	Roles     []string `json:"roles"`
}

// imagesMain is `rehearsal images`.
func imagesMain(args []string) error {
	home, _ := os.UserHomeDir()
	fl := flag.NewFlagSet("images", flag.ContinueOnError)
	kiln := fl.String("kiln", "bin/kiln", "kiln binary (make build)")
	clusterFile := fl.String("cluster", "", "cluster file whose images to build (kiln -c FILE images)")
	tools := fl.String("tools", filepath.Join(home, ".cache/kiln-tools/bin"), "built binaries (test/tools/build.sh rehearsal-VERSION node-VERSION)")
	version := fl.String("version", "", "Kubernetes version of the binaries (default: the tag of kube-apiserver kiln lists)")
	etcd := fl.String("etcd", "", "etcd version of the binary (default: from the etcd tag kiln lists, 3.6.5-0: v3.6.5)")
	dest := fl.String("dest", "", "OCI image layout to write (replaced if it is one already)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if *clusterFile == "" || *dest == "" || fl.NArg() != 0 {
		return errors.New("usage: rehearsal images --cluster CLUSTER.yaml --dest DIR [--kiln bin/kiln] [--tools DIR] [--version v1.X.Y] [--etcd v3.X.Y]")
	}
	start := time.Now()
	built, err := buildImages(context.Background(), *kiln, *clusterFile, *tools, *version, *etcd, *dest)
	if err != nil {
		return err
	}
	var total int64
	for _, b := range built {
		total += b.Size
		fmt.Printf("%-24s %-58s %s %6.1f MB (%.1f MB unpacked)\n", b.Name, b.Reference, b.Digest, float64(b.Size)/1e6, float64(b.Unpacked)/1e6)
	}
	fmt.Printf("wrote %s: %d images, %.1f MB, in %s\n", *dest, len(built), float64(total)/1e6, time.Since(start).Round(100*time.Millisecond))
	return nil
}

// buildImages writes dst, an OCI image layout (index.json, oci-layout,
// blobs/sha256) holding for linux/amd64 every image `kiln -c clusterFile
// images -o json` lists, under the reference kiln lists it by, and the
// probe image (probeImageRef). Every index.json entry carries the
// reference in both io.containerd.image.name and
// org.opencontainers.image.ref.name, which is how `kiln images pin --from
// dst` and `kiln images pull --from dst` find it.
//
// tools holds test/tools/build.sh's output (NAME-VERSION binaries);
// version is the Kubernetes version of its kube-* binaries and etcd that of
// its etcd ("" for either: read from the tag kiln lists; given, it must
// match). The pause image is compiled from the kubernetes module's
// build/pause/linux/pause.c (cached as tools/pause-TAG). A dst that exists
// must be an OCI layout (a previous build) or empty; it is replaced whole.
// Images kiln lists that the rehearsal has no recipe for (kube-vip, an
// add-on's) are an error. It returns what it wrote, in index order.
func buildImages(ctx context.Context, kiln, clusterFile, tools, version, etcd, dst string) ([]builtImage, error) {
	out, err := exec.CommandContext(ctx, kiln, "-c", clusterFile, "images", "-o", "json").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%v: %s", err, bytes.TrimSpace(ee.Stderr))
		}
		return nil, fmt.Errorf("kiln images: %w", err)
	}
	var listed []kilnListed
	if err := json.Unmarshal(out, &listed); err != nil {
		return nil, fmt.Errorf("kiln images -o json: %w", err)
	}
	b := &imageBuilder{ctx: ctx, tools: tools, version: version, etcd: etcd, ldd: map[string][]string{}}
	if b.mtime, err = sourceDateEpoch(); err != nil {
		return nil, err
	}
	for _, e := range listed {
		if e.Name == "kube-apiserver" && b.version == "" {
			b.version = imageTag(e.Reference)
		}
	}
	if b.version == "" {
		return nil, errors.New("--version: kiln lists no kube-apiserver to read it from")
	}
	// The probe is named by the real nodes' add-on (kiln lists an add-on's
	// images by reference); the layout always carries it.
	probe := false
	for i := range listed {
		if listed[i].Reference == probeImageRef {
			listed[i].Name, probe = "probe", true
		}
	}
	if !probe {
		listed = append(listed, kilnListed{Name: "probe", Reference: probeImageRef})
	}

	if err := os.MkdirAll(filepath.Dir(filepath.Clean(dst)), 0o755); err != nil {
		return nil, err
	}
	if err := checkReplaceable(dst); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(filepath.Clean(dst)), "."+filepath.Base(dst)+".tmp-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	lp, err := layout.Write(tmp, empty.Index)
	if err != nil {
		return nil, err
	}
	var built []builtImage
	for _, e := range listed {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		img, unpacked, err := b.image(e)
		if err != nil {
			return nil, fmt.Errorf("image %s (%s): %w", e.Name, e.Reference, err)
		}
		ann := map[string]string{
			"io.containerd.image.name":          e.Reference,
			"org.opencontainers.image.ref.name": e.Reference,
		}
		if err := lp.AppendImage(img, layout.WithAnnotations(ann), layout.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"})); err != nil {
			return nil, fmt.Errorf("image %s: write: %w", e.Name, err)
		}
		bi := builtImage{Name: e.Name, Reference: e.Reference, Unpacked: unpacked}
		m, err := img.Manifest()
		if err != nil {
			return nil, err
		}
		d, err := img.Digest()
		if err != nil {
			return nil, err
		}
		raw, err := img.RawManifest()
		if err != nil {
			return nil, err
		}
		bi.Digest, bi.Size = d.String(), int64(len(raw))+m.Config.Size
		for _, l := range m.Layers {
			bi.Size += l.Size
		}
		built = append(built, bi)
	}
	if err := os.RemoveAll(dst); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return nil, err
	}
	return built, nil
}

// checkReplaceable refuses to replace dst unless it is missing, empty or
// an OCI layout.
func checkReplaceable(dst string) error {
	ents, err := os.ReadDir(dst)
	switch {
	case errors.Is(err, fs.ErrNotExist) || (err == nil && len(ents) == 0):
		return nil
	case err != nil:
		return fmt.Errorf("--dest: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dst, "oci-layout")); err != nil {
		return fmt.Errorf("--dest %s: exists and is not an OCI layout (no oci-layout file): not replacing it", dst)
	}
	return nil
}

// sourceDateEpoch is SOURCE_DATE_EPOCH, else the Unix epoch: every file's
// mtime and the configs' created time.
func sourceDateEpoch() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH: %w", err)
	}
	return time.Unix(n, 0).UTC(), nil
}

// imageTag is a reference's tag ("" without one).
func imageTag(ref string) string {
	ref, _, _ = strings.Cut(ref, "@")
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		return ref[i+1:]
	}
	return ""
}

type imageBuilder struct {
	ctx                  context.Context
	tools, version, etcd string
	mtime                time.Time
	ldd                  map[string][]string // ldd closure by binary
}

// tool is tools/NAME-VERSION, which must exist.
func (b *imageBuilder) tool(name, version string) (string, error) {
	p := filepath.Join(b.tools, name+"-"+version)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%w (test/tools/build.sh builds it)", err)
	}
	return p, nil
}

// image builds one listed image: its layer and its config.
func (b *imageBuilder) image(e kilnListed) (v1.Image, int64, error) {
	t := newImageTree()
	cfg := v1.Config{Env: []string{imagePath}}
	tag := imageTag(e.Reference)
	var err error
	addTool := func(dst, name, version string) {
		if err != nil {
			return
		}
		var src string
		if src, err = b.tool(name, version); err == nil {
			err = b.addBinary(t, dst, src)
		}
	}
	switch e.Name {
	case "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy":
		if tag != b.version {
			return nil, 0, fmt.Errorf("kiln lists tag %s, the binaries are --version %s", tag, b.version)
		}
		// kubeadm's static pods and kube-proxy's DaemonSet call them by
		// name on PATH; upstream's ENTRYPOINT (go-runner) is not here.
		addTool("/usr/local/bin/"+e.Name, e.Name, b.version)
		if e.Name == "kube-proxy" && err == nil {
			err = b.addNetfilter(t)
		}
	case "etcd":
		v := b.etcd
		if want := "v" + strings.TrimSuffix(tag, "-0"); v == "" {
			v = want
		} else if v != want {
			return nil, 0, fmt.Errorf("kiln lists tag %s, the binary is --etcd %s", tag, v)
		}
		addTool("/usr/local/bin/etcd", "etcd", v)
		for _, extra := range []string{"etcdctl", "etcdutl"} {
			if _, serr := os.Stat(filepath.Join(b.tools, extra+"-"+v)); serr == nil {
				addTool("/usr/local/bin/"+extra, extra, v)
			}
		}
	case "coredns":
		addTool("/coredns", "coredns", tag)
		cfg.Entrypoint = []string{"/coredns"}
	case "pause":
		var src string
		if src, err = b.pause(tag); err == nil {
			err = t.addFile("/pause", src, 0o755)
		}
		cfg.Entrypoint = []string{"/pause"}
		cfg.User = "65535:65535" // as upstream's Dockerfile
	case "flannel":
		addTool("/opt/bin/flanneld", "flanneld", tag)
		if err == nil {
			err = errors.Join(b.addNetfilter(t), b.addHostBinary(t, "/usr/bin/cp"))
		}
		cfg.Entrypoint = []string{"/opt/bin/flanneld"}
	case "flannel-cni-plugin":
		addTool("/flannel", "cni-flannel", imageCNIFlannel)
		if err == nil {
			err = b.addHostBinary(t, "/usr/bin/cp")
		}
	case "haproxy":
		// kiln's haproxy.cfg has no user/group/chroot: no account lookups.
		err = errors.Join(b.addHostBinary(t, "/usr/sbin/haproxy"), b.addDebianBase(t, false))
	case "keepalived":
		want, kerr := keepalivedImageRef()
		if kerr != nil {
			return nil, 0, kerr
		}
		if repo, _, _ := strings.Cut(e.Reference, ":"); repo == keepalivedRepo && e.Reference != want {
			return nil, 0, fmt.Errorf("this host's keepalived is %s: name the image that in the cluster file", want)
		}
		if tag == "" {
			return nil, 0, fmt.Errorf("the cluster file names keepalived without a tag: name it %s@sha256:<any digest>, then kiln images pin --from LAYOUT", want)
		}
		// keepalived.conf: script_user root (getpwnam), the health check
		// runs /usr/bin/curl.
		err = errors.Join(b.addHostBinary(t, "/usr/sbin/keepalived"), b.addHostBinary(t, "/usr/bin/curl"), b.addDebianBase(t, true))
	case "probe":
		var self string
		if self, err = os.Executable(); err == nil {
			err = b.addBinary(t, "/rehearsal", self)
		}
		cfg.Entrypoint = []string{"/rehearsal", "probe"}
	default:
		return nil, 0, errors.New("the rehearsal has no recipe for this image")
	}
	if err != nil {
		return nil, 0, err
	}
	layerTar, err := t.tar(b.mtime)
	if err != nil {
		return nil, 0, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, 0, err
	}
	created := v1.Time{Time: b.mtime}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{Architecture: "amd64", OS: "linux", Created: created, Config: cfg})
	if err != nil {
		return nil, 0, err
	}
	img, err = mutate.Append(img, mutate.Addendum{Layer: layer, MediaType: types.OCILayer,
		History: v1.History{Created: created, CreatedBy: "kiln rehearsal images: " + e.Name}})
	return img, int64(len(layerTar)), err
}

// netfilterTools are kube-proxy's and flanneld's iptables commands, as
// symlinks to Debian's xtables-nft-multi (nft: this host's default,
// `update-alternatives --display iptables`) or xtables-legacy-multi.
var netfilterTools = map[string]string{
	"iptables": "xtables-nft-multi", "iptables-save": "xtables-nft-multi", "iptables-restore": "xtables-nft-multi",
	"ip6tables": "xtables-nft-multi", "ip6tables-save": "xtables-nft-multi", "ip6tables-restore": "xtables-nft-multi",
	"iptables-nft": "xtables-nft-multi", "iptables-nft-save": "xtables-nft-multi", "iptables-nft-restore": "xtables-nft-multi",
	"ip6tables-nft": "xtables-nft-multi", "ip6tables-nft-save": "xtables-nft-multi", "ip6tables-nft-restore": "xtables-nft-multi",
	"iptables-legacy": "xtables-legacy-multi", "iptables-legacy-save": "xtables-legacy-multi", "iptables-legacy-restore": "xtables-legacy-multi",
	"ip6tables-legacy": "xtables-legacy-multi", "ip6tables-legacy-save": "xtables-legacy-multi", "ip6tables-legacy-restore": "xtables-legacy-multi",
}

// xtablesDir holds the match and target extensions iptables dlopens
// (-m comment, -j MASQUERADE, ...), which ldd does not name.
const xtablesDir = "/usr/lib/x86_64-linux-gnu/xtables"

// addNetfilter adds Debian's iptables (both backends, the names above, the
// extensions) and conntrack.
func (b *imageBuilder) addNetfilter(t *imageTree) error {
	for _, bin := range []string{"/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi", "/usr/sbin/conntrack"} {
		if err := b.addHostBinary(t, bin); err != nil {
			return err
		}
	}
	for name, target := range netfilterTools {
		t.addSymlink("/usr/sbin/"+name, target)
	}
	exts, err := filepath.Glob(xtablesDir + "/*.so")
	if err != nil || len(exts) == 0 {
		return fmt.Errorf("no iptables extensions in %s: %v", xtablesDir, err)
	}
	for _, so := range exts {
		if err := b.addHostBinary(t, so); err != nil {
			return err
		}
	}
	// /etc/protocols for -p by name beyond libxtables' built-in few; the
	// legacy backend's lock is /run/xtables.lock (kube-proxy and flannel
	// mount the host's there).
	return errors.Join(t.addHostPath("/etc/protocols"), b.addDebianBase(t, false))
}

// addDebianBase adds what an image of Debian binaries has around them:
// the merged-/usr links (/bin, /sbin, /lib, /lib64), /tmp and /run, and
// with accounts, /etc/passwd and /etc/group (root, nobody) and an
// nsswitch.conf reading them (glibc >= 2.34 has the files module built in,
// so no libnss_files.so is needed).
func (b *imageBuilder) addDebianBase(t *imageTree, accounts bool) error {
	for _, p := range []string{"/bin", "/sbin", "/lib", "/lib64"} {
		if err := t.addHostPath(p); err != nil {
			return err
		}
	}
	t.addDir("/tmp", 0o1777)
	t.addDir("/run", 0o755)
	if accounts {
		t.addData("/etc/passwd", []byte("root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"), 0o644)
		t.addData("/etc/group", []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
		t.addData("/etc/nsswitch.conf", []byte("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"), 0o644)
	}
	return nil
}

// addHostBinary adds a host binary (or shared object) at its own path, as
// the host has it (symlinks on the way kept), with its ldd closure.
func (b *imageBuilder) addHostBinary(t *imageTree, p string) error {
	if err := t.addHostPath(p); err != nil {
		return err
	}
	return b.addLibraries(t, p)
}

// addBinary adds the file src at dst, with its ldd closure.
func (b *imageBuilder) addBinary(t *imageTree, dst, src string) error {
	if err := t.addFile(dst, src, 0o755); err != nil {
		return err
	}
	return b.addLibraries(t, src)
}

// addLibraries adds the shared libraries and the dynamic loader that ldd
// names for bin, each at its path on this host (nothing for a static
// binary).
func (b *imageBuilder) addLibraries(t *imageTree, bin string) error {
	libs, ok := b.ldd[bin]
	if !ok {
		cmd := exec.CommandContext(b.ctx, "ldd", bin)
		cmd.Env = append(os.Environ(), "LC_ALL=C")
		out, err := cmd.CombinedOutput()
		if err != nil {
			if s := string(out); strings.Contains(s, "not a dynamic executable") || strings.Contains(s, "statically linked") {
				b.ldd[bin] = nil
				return nil
			}
			return fmt.Errorf("ldd %s: %v: %s", bin, err, bytes.TrimSpace(out))
		}
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			switch {
			case len(f) == 0, strings.HasPrefix(f[0], "linux-vdso"):
			case strings.Contains(line, "not found"):
				return fmt.Errorf("ldd %s: %s", bin, strings.TrimSpace(line))
			case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
				libs = append(libs, f[2])
			case strings.HasPrefix(f[0], "/"): // the dynamic loader
				libs = append(libs, f[0])
			case strings.Contains(line, "statically linked"):
			default:
				return fmt.Errorf("ldd %s: cannot read %q", bin, line)
			}
		}
		b.ldd[bin] = libs
	}
	for _, l := range libs {
		if err := t.addHostPath(l); err != nil {
			return err
		}
	}
	return nil
}

// pause returns tools/pause-TAG, compiling it first if needed: kubernetes'
// own build/pause/linux/pause.c at --version (whose build/pause/Makefile
// must name TAG), as its Makefile does: gcc -Os -Wall -Werror -static
// -DVERSION=vTAG-REV (REV: the Kubernetes version, not git describe).
func (b *imageBuilder) pause(tag string) (string, error) {
	out := filepath.Join(b.tools, "pause-"+tag)
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	src, err := kubernetesSource(b.ctx, b.version)
	if err != nil {
		return "", err
	}
	mk, err := os.ReadFile(filepath.Join(src, "build/pause/Makefile"))
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`(?m)^TAG \?= (\S+)$`).FindSubmatch(mk)
	if m == nil || string(m[1]) != tag {
		return "", fmt.Errorf("kiln lists pause:%s, but k8s.io/kubernetes@%s's build/pause/Makefile builds %q", tag, b.version, m)
	}
	tmp := fmt.Sprintf("%s.tmp.%d", out, os.Getpid())
	defer os.Remove(tmp)
	cmd := exec.CommandContext(b.ctx, "gcc", "-Os", "-Wall", "-Werror", "-static",
		"-DVERSION=v"+tag+"-"+b.version, "-o", tmp, filepath.Join(src, "build/pause/linux/pause.c"))
	if o, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("gcc pause.c: %v: %s", err, o)
	}
	return out, os.Rename(tmp, out)
}

// kubernetesSource is k8s.io/kubernetes@version in the module cache,
// downloaded there (go mod download, as test/tools/build.sh does) if absent.
func kubernetesSource(ctx context.Context, version string) (string, error) {
	cache, err := exec.CommandContext(ctx, "go", "env", "GOMODCACHE").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMODCACHE: %w", err)
	}
	dir := filepath.Join(strings.TrimSpace(string(cache)), "k8s.io", "kubernetes@"+version)
	if _, err := os.Stat(filepath.Join(dir, "build/pause/linux/pause.c")); err == nil {
		return dir, nil
	}
	scratch, err := os.MkdirTemp("", "rehearsal-k8s-src-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(scratch)
	if err := os.WriteFile(filepath.Join(scratch, "go.mod"), []byte("module rehearsal.invalid/src\n"), 0o644); err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", "k8s.io/kubernetes@"+version)
	cmd.Dir = scratch
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-modcacherw")
	o, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go mod download k8s.io/kubernetes@%s: %v", version, err)
	}
	var info struct{ Dir string }
	if err := json.Unmarshal(o, &info); err != nil || info.Dir == "" {
		return "", fmt.Errorf("go mod download k8s.io/kubernetes@%s: no Dir in %s", version, o)
	}
	if _, err := os.Stat(filepath.Join(info.Dir, "build/pause/linux/pause.c")); err != nil {
		return "", fmt.Errorf("k8s.io/kubernetes@%s's module has no build/pause/linux/pause.c: %w", version, err)
	}
	return info.Dir, nil
}

// imageTree is one layer's files by path (relative, no leading /).
type imageTree struct{ entries map[string]*imageEntry }

type imageEntry struct {
	typ  byte // tar.TypeReg, TypeSymlink, TypeDir
	mode int64
	link string // symlink target
	src  string // regular file: host file to read, or
	data []byte // its content
}

func newImageTree() *imageTree { return &imageTree{entries: map[string]*imageEntry{}} }

func treeKey(p string) string { return strings.TrimPrefix(path.Clean("/"+p), "/") }

func (t *imageTree) addFile(dst, src string, mode int64) error {
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", src)
	}
	t.entries[treeKey(dst)] = &imageEntry{typ: tar.TypeReg, mode: mode, src: src}
	return nil
}

func (t *imageTree) addData(dst string, data []byte, mode int64) {
	t.entries[treeKey(dst)] = &imageEntry{typ: tar.TypeReg, mode: mode, data: data}
}

func (t *imageTree) addSymlink(dst, target string) {
	t.entries[treeKey(dst)] = &imageEntry{typ: tar.TypeSymlink, mode: 0o777, link: target}
}

func (t *imageTree) addDir(dst string, mode int64) {
	t.entries[treeKey(dst)] = &imageEntry{typ: tar.TypeDir, mode: mode}
}

// addHostPath adds host path p as the host has it: every symlink met on
// the way to it (a folder such as /lib -> usr/lib, or the file itself,
// libfoo.so.1 -> libfoo.so.1.2.3) as a symlink, then what it resolves to,
// a regular file with its mode, or a folder (empty).
func (t *imageTree) addHostPath(p string) error {
	const maxLinks = 40
	todo := strings.Split(treeKey(p), "/")
	done := ""
	for links := 0; len(todo) > 0; {
		cur := path.Join(done, todo[0])
		todo = todo[1:]
		fi, err := os.Lstat("/" + cur)
		if err != nil {
			return err
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			if links++; links > maxLinks {
				return fmt.Errorf("%s: too many symlinks", p)
			}
			target, err := os.Readlink("/" + cur)
			if err != nil {
				return err
			}
			t.addSymlink(cur, target)
			rest := strings.Split(treeKey(target), "/")
			if !strings.HasPrefix(target, "/") {
				rest = strings.Split(treeKey(path.Join(done, target)), "/")
			}
			todo, done = append(rest, todo...), ""
		case fi.IsDir():
			if len(todo) == 0 {
				t.addDir(cur, int64(fi.Mode().Perm()))
			}
			done = cur
		case fi.Mode().IsRegular():
			if len(todo) != 0 {
				return fmt.Errorf("%s: %s is not a folder", p, cur)
			}
			t.entries[cur] = &imageEntry{typ: tar.TypeReg, mode: int64(fi.Mode().Perm()), src: "/" + cur}
		default:
			return fmt.Errorf("%s: /%s is neither file, folder nor symlink", p, cur)
		}
	}
	return nil
}

// tar writes the tree as a tar: sorted, every parent folder present
// (0755), owned by root, every mtime mtime.
func (t *imageTree) tar(mtime time.Time) ([]byte, error) {
	all := map[string]*imageEntry{}
	for k, e := range t.entries {
		all[k] = e
		for d := path.Dir(k); d != "." && d != "/"; d = path.Dir(d) {
			if p, ok := t.entries[d]; ok && p.typ != tar.TypeDir {
				return nil, fmt.Errorf("/%s is both a folder (of /%s) and a file or symlink", d, k)
			}
			if _, ok := all[d]; !ok {
				all[d] = &imageEntry{typ: tar.TypeDir, mode: 0o755}
			}
		}
	}
	names := make([]string, 0, len(all))
	for k := range all {
		names = append(names, k)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := all[n]
		h := &tar.Header{Typeflag: e.typ, Name: n, Mode: e.mode, ModTime: mtime, Linkname: e.link, Format: tar.FormatPAX}
		var data []byte
		switch e.typ {
		case tar.TypeDir:
			h.Name += "/"
		case tar.TypeReg:
			data = e.data
			if e.src != "" {
				var err error
				if data, err = os.ReadFile(e.src); err != nil {
					return nil, err
				}
			}
			h.Size = int64(len(data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
