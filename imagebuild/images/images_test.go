package images

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/images/imagestest"
)

// testRegistry is go-containerregistry's registry server on a local port;
// tamper, when set, names a blob digest whose bytes it serves altered.
type testRegistry struct {
	host   string
	tamper atomic.Value // string
	blobs  atomic.Int64 // blob GETs served
}

func newTestRegistry(t testing.TB) *testRegistry {
	t.Helper()
	r := &testRegistry{}
	r.tamper.Store("")
	h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/sha256:") {
			r.blobs.Add(1)
			if d := r.tamper.Load().(string); d != "" && strings.HasSuffix(req.URL.Path, d) {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, req)
				body := rec.Body.Bytes()
				body[len(body)/2] ^= 0xff
				w.WriteHeader(rec.Code)
				w.Write(body)
				return
			}
		}
		h.ServeHTTP(w, req)
	}))
	t.Cleanup(srv.Close)
	r.host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

// pushIndex pushes a two-arch index (amd64, arm64) of random images with
// layers layers of size bytes each (64 KiB if no size is given), and
// returns its reference and digest.
func (r *testRegistry) pushIndex(t testing.TB, repo string, layers int64, size ...int64) (string, string) {
	t.Helper()
	layerSize := int64(64 << 10)
	if len(size) > 0 {
		layerSize = size[0]
	}
	idx, err := imagestest.Index([]string{"amd64", "arm64"}, layers, layerSize)
	if err != nil {
		t.Fatal(err)
	}
	ref := r.host + "/" + repo + ":v1"
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(tag, idx); err != nil {
		t.Fatal(err)
	}
	d, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return ref, d.String()
}

func entry(ref, digest string) Entry {
	return Entry{Name: ref, Reference: ref, Digest: digest, Roles: allRoles}
}

// storeFiles lists every file under the store's blobs folder.
func storeFiles(t *testing.T, st *Store) []string {
	var out []string
	filepath.WalkDir(filepath.Join(st.Dir, "blobs"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			out = append(out, filepath.Base(p))
		}
		return nil
	})
	return out
}

func TestPinPullArchive(t *testing.T) {
	ctx := context.Background()
	reg := newTestRegistry(t)
	ref, digest := reg.pushIndex(t, "kiln/app", 2)

	changed, err := Pin(ctx, []Entry{{Name: "app", Reference: ref}}, newRegistry(t), false)
	if err != nil || len(changed) != 1 || changed[0].Digest != digest {
		t.Fatalf("Pin = %+v, %v; want digest %s", changed, err, digest)
	}

	st := &Store{Dir: t.TempDir()}
	res, err := st.Pull(ctx, []Entry{entry(ref, digest)}, []string{"arm64"}, newRegistry(t), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// index, arm64 manifest, config, 2 layers; nothing of amd64.
	if got := len(storeFiles(t, st)); got != 5 || res[0].Fetched != res[0].Bytes {
		t.Fatalf("after pull: %d blobs stored, result %+v; want 5, all fetched", got, res[0])
	}
	served := reg.blobs.Load()
	res, err = st.Pull(ctx, []Entry{entry(ref, digest)}, []string{"arm64"}, newRegistry(t), io.Discard)
	if err != nil || res[0].Fetched != 0 || reg.blobs.Load() != served {
		t.Fatalf("second pull fetched %d bytes (%d blob requests); want none from cache: %v", res[0].Fetched, reg.blobs.Load()-served, err)
	}

	var buf bytes.Buffer
	got, err := st.WriteArchive(ctx, &buf, []Entry{entry(ref, digest)}, "arm64")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Bytes != res[0].Bytes {
		t.Fatalf("archive images %+v, want one of %d bytes", got, res[0].Bytes)
	}
	files := readTar(t, buf.Bytes())
	var idx v1.IndexManifest
	if err := json.Unmarshal(files["index.json"], &idx); err != nil {
		t.Fatal(err)
	}
	// Named as the CRI names a pull: by tag, and by digest (a pod naming
	// REPO:TAG@DIGEST is looked up as REPO@DIGEST).
	byDigest := ref[:strings.LastIndex(ref, ":")] + "@" + digest
	if len(idx.Manifests) != 2 || idx.Manifests[0].Annotations[containerdName] != ref || idx.Manifests[1].Annotations[containerdName] != byDigest {
		t.Fatalf("index.json %+v: want %s named %s and %s", idx, digest, ref, byDigest)
	}
	for _, m := range idx.Manifests {
		if m.Digest.String() != digest {
			t.Errorf("index.json names %s with %s, want %s", m.Annotations[containerdName], m.Digest, digest)
		}
	}
	for p, b := range files {
		if hexd, ok := strings.CutPrefix(p, "blobs/sha256/"); ok {
			if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != hexd {
				t.Errorf("archive blob %s has digest %x", p, sum)
			}
		}
	}
	if n := len(files); n != 7 { // oci-layout, index.json, 5 blobs
		t.Errorf("archive holds %d files, want 7", n)
	}

	// The archive is an OCI layout kiln can pin and pull from, offline.
	archive := filepath.Join(t.TempDir(), "app.tar")
	os.WriteFile(archive, buf.Bytes(), 0o644)
	l, err := OpenLayout(ctx, archive, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	changed, err = Pin(ctx, []Entry{{Name: "app", Reference: ref, Digest: "sha256:" + strings.Repeat("0", 64)}}, l, true)
	if err != nil || len(changed) != 1 || changed[0].Digest != digest {
		t.Fatalf("Pin from the archive = %+v, %v", changed, err)
	}
	st2 := &Store{Dir: t.TempDir()}
	if _, err := st2.Pull(ctx, []Entry{entry(ref, digest)}, []string{"arm64"}, l, io.Discard); err != nil {
		t.Fatalf("pull from the archive: %v", err)
	}
	if _, err := st2.Pull(ctx, []Entry{entry(ref, digest)}, []string{"amd64"}, l, io.Discard); err == nil {
		t.Fatal("pulled amd64 from an archive that holds only arm64")
	}
}

func TestPullRefusesTamperedBlob(t *testing.T) {
	ctx := context.Background()
	reg := newTestRegistry(t)
	ref, digest := reg.pushIndex(t, "kiln/tampered", 1)
	st := &Store{Dir: t.TempDir()}
	im, err := resolve(entry(ref, digest), "amd64", func(d string) ([]byte, error) { return newRegistry(t).Manifest(ctx, ref, d) })
	if err != nil {
		t.Fatal(err)
	}
	layer := im.blobs[1].Digest
	reg.tamper.Store(layer)

	// kiln's own check, whatever the library does: a source that returns
	// the altered bytes without complaint.
	for _, src := range []Source{newRegistry(t), rawBlobs{newRegistry(t), "http://" + reg.host}} {
		_, err = st.Pull(ctx, []Entry{entry(ref, digest)}, []string{"amd64"}, src, io.Discard)
		if err == nil || fault.KindOf(err) != fault.Download {
			t.Fatalf("%T: pull of a tampered layer = %v (kind %v), want a download error (exit 5)", src, err, fault.KindOf(err))
		}
		for _, f := range storeFiles(t, st) {
			if "sha256:"+f == layer || strings.HasPrefix(f, ".partial") {
				t.Fatalf("%T: the store keeps %s after a refused blob", src, f)
			}
		}
	}
	reg.tamper.Store("")
	if _, err := st.Pull(ctx, []Entry{entry(ref, digest)}, []string{"amd64"}, newRegistry(t), io.Discard); err != nil {
		t.Fatalf("pull after the registry is mended: %v", err)
	}
}

// rawBlobs serves blobs by plain HTTP GET, unverified.
type rawBlobs struct {
	*Registry
	base string
}

func newRegistry(t testing.TB) *Registry {
	r, err := NewRegistry()
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (r rawBlobs) Blob(ctx context.Context, ref, d string) (io.ReadCloser, error) {
	t, _ := name.NewTag(ref)
	resp, err := http.Get(r.base + "/v2/" + t.RepositoryStr() + "/blobs/" + d)
	if err != nil {
		return nil, err
	}
	return resp.Body, nil
}

// failAfter fails every blob after the first n.
type failAfter struct {
	Source
	n *atomic.Int64
}

func (f failAfter) Blob(ctx context.Context, ref, d string) (io.ReadCloser, error) {
	if f.n.Add(-1) < 0 {
		return nil, fault.Wrap(fault.Download, errors.New("connection reset (test)"))
	}
	return f.Source.Blob(ctx, ref, d)
}

func TestPullResumes(t *testing.T) {
	ctx := context.Background()
	reg := newTestRegistry(t)
	ref, digest := reg.pushIndex(t, "kiln/resume", 4)
	st := &Store{Dir: t.TempDir()}
	var n atomic.Int64
	n.Store(2)
	if _, err := st.Pull(ctx, []Entry{entry(ref, digest)}, []string{"amd64"}, failAfter{newRegistry(t), &n}, io.Discard); err == nil {
		t.Fatal("interrupted pull succeeded")
	}
	kept := len(storeFiles(t, st)) // index, manifest, 2 of 5 blobs
	served := reg.blobs.Load()
	res, err := st.Pull(ctx, []Entry{entry(ref, digest)}, []string{"amd64"}, newRegistry(t), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if kept != 4 || reg.blobs.Load()-served != 3 || res[0].Fetched >= res[0].Bytes {
		t.Fatalf("resume: %d files kept, then %d blob requests, fetched %d of %d; want 4 kept and 3 requests", kept, reg.blobs.Load()-served, res[0].Fetched, res[0].Bytes)
	}
}

func TestNormalize(t *testing.T) {
	for in, want := range map[string]string{
		"haproxy:3.2-alpine":                   "docker.io/library/haproxy:3.2-alpine",
		"flannel/flannel:v0.28.4":              "docker.io/flannel/flannel:v0.28.4",
		"registry.k8s.io/pause:3.10":           "registry.k8s.io/pause:3.10",
		"localhost:5000/app":                   "localhost:5000/app:latest",
		"ghcr.io/x/y:v1@sha256:" + hex64("ab"): "ghcr.io/x/y:v1",
		"ghcr.io/x/y@sha256:" + hex64("ab"):    "ghcr.io/x/y",
	} {
		got, _, err := Normalize(in)
		if err != nil || got != want {
			t.Errorf("Normalize(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"UPPER/case:v1", "x@sha256:12", "a b"} {
		if _, _, err := Normalize(bad); err == nil {
			t.Errorf("Normalize(%q) accepted", bad)
		}
	}
}

func hex64(s string) string { return strings.Repeat(s, 32) }

func TestAddonImages(t *testing.T) {
	doc := `apiVersion: apps/v1
kind: Deployment
metadata: {name: a}
spec:
  template:
    spec:
      initContainers: [{name: i, image: busybox:1.37}]
      containers: [{name: c, image: ghcr.io/a/b:v2}, {name: d, image: busybox:1.37}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: b}
data: {image: not-a-container}
`
	got, err := AddonImages([]byte(doc))
	if err != nil || strings.Join(got, " ") != "busybox:1.37 ghcr.io/a/b:v2" {
		t.Fatalf("AddonImages = %v, %v", got, err)
	}
}

func TestForRole(t *testing.T) {
	es := []Entry{{Name: "etcd", Roles: controlPlanes}, {Name: "pause", Roles: allRoles}}
	if got := ForRole(es, nodeconfig.RoleWorker); len(got) != 1 || got[0].Name != "pause" {
		t.Fatalf("worker carries %+v, want pause only", got)
	}
}

func readTar(t *testing.T, b []byte) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		out[h.Name] = data
	}
}

func TestPullRefusesOtherArch(t *testing.T) {
	ctx := context.Background()
	reg := newTestRegistry(t)
	img, err := imagestest.Image("amd64", 1, 1024)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.host + "/kiln/single:v1"
	tag, _ := name.NewTag(ref)
	if err := remote.Write(tag, img); err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	st := &Store{Dir: t.TempDir()}
	_, err = st.Pull(ctx, []Entry{entry(ref, d.String())}, []string{"arm64"}, newRegistry(t), io.Discard)
	if err == nil || fault.KindOf(err) != fault.Unsupported || !strings.Contains(err.Error(), "amd64 image, not linux/arm64") {
		t.Fatalf("pull of an amd64-only image for arm64: %v, want refused (unsupported)", err)
	}
	if _, err := st.Pull(ctx, []Entry{entry(ref, d.String())}, []string{"amd64"}, newRegistry(t), io.Discard); err != nil {
		t.Fatalf("pull for its own arch: %v", err)
	}
	if _, err := st.WriteArchive(ctx, io.Discard, []Entry{entry(ref, d.String())}, "arm64"); err == nil {
		t.Fatal("wrote an arm64 archive holding an amd64 image")
	}
}

func testCluster(t *testing.T, extra string) *cluster.Cluster {
	t.Helper()
	c, err := cluster.Parse([]byte("apiVersion: kiln.dev/v1alpha1\nkind: Cluster\nname: lab\ncontrolPlaneEndpoint: lb.lab.test:6443\n" + extra))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestStalePinAfterUpgrade: a kubeadm image pinned for the previous
// Kubernetes version does not block the cluster file; it is reported as
// stale and left unpinned, so kiln images pin can replace it.
func TestStalePinAfterUpgrade(t *testing.T) {
	old := "registry.k8s.io/kube-apiserver:v1.36.3@sha256:" + hex64("ab")
	c := testCluster(t, "kubernetes: {version: v1.37.2}\nimages: {kube-apiserver: "+old+"}\n")
	list, err := List(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range list {
		if e.Name == "kube-apiserver" && (e.Stale != old || e.Digest != "" || e.Reference != "registry.k8s.io/kube-apiserver:v1.37.2") {
			t.Fatalf("stale pin: %+v", e)
		}
	}
}

// TestAddonDigestNeverRepinned: an image an add-on pins by digest keeps
// that digest; a cluster-file pin for it is refused.
func TestAddonDigestNeverRepinned(t *testing.T) {
	c := testCluster(t, "")
	ref := "quay.io/foo/bar@sha256:" + hex64("00")
	c.Addons = []cluster.Addon{{Path: "a.yaml", Data: []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: a, image: " + ref + "}]\n")}}
	list, err := List(c)
	if err != nil {
		t.Fatal(err)
	}
	var addon []Entry
	for _, e := range list {
		if e.Name == ref {
			addon = append(addon, e)
		}
	}
	changed, err := Pin(context.Background(), addon, failingSource{}, true)
	if len(addon) != 1 || !addon[0].Fixed {
		t.Fatalf("the add-on's image: %+v", addon)
	}
	if err != nil || len(changed) != 0 {
		t.Fatalf("Pin touched %+v (%v); the add-on's digest is its own", changed, err)
	}
	c.Images = map[string]string{ref: "quay.io/foo/bar@sha256:" + hex64("11")}
	if _, err := List(c); err == nil || !strings.Contains(err.Error(), "pins this image by digest itself") {
		t.Fatalf("a pin over the add-on's own digest: %v", err)
	}
}

// failingSource knows no image.
type failingSource struct{ Source }

func (failingSource) Resolve(context.Context, string) (string, error) {
	return "", fault.Wrap(fault.Download, errors.New("no such image (test)"))
}

func TestNodeNames(t *testing.T) {
	const d = "sha256:" + "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12"
	for _, c := range []struct {
		ref  string
		want []string
	}{
		{"registry.k8s.io/pause:3.10.1", []string{"registry.k8s.io/pause:3.10.1", "registry.k8s.io/pause@" + d}},
		{"127.0.0.1:5000/kiln/app:v1", []string{"127.0.0.1:5000/kiln/app:v1", "127.0.0.1:5000/kiln/app@" + d}},
		{"127.0.0.1:5000/kiln/app", []string{"127.0.0.1:5000/kiln/app@" + d}},
		{"quay.io/kiln/digest-only", []string{"quay.io/kiln/digest-only@" + d}},
	} {
		if got := (Entry{Reference: c.ref, Digest: d}).NodeNames(); !slices.Equal(got, c.want) {
			t.Errorf("NodeNames(%s) = %v, want %v", c.ref, got, c.want)
		}
	}
}
