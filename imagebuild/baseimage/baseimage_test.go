package baseimage

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/armor"
	"github.com/klauspost/compress/zstd"

	"github.com/kilnproject/kiln/imagebuild/baseimage/flatcartest"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/profiles"
)

func TestEmbeddedFlatcarKey(t *testing.T) {
	k, _ := profiles.SigningKey("flatcar")
	kr, err := openpgp.ReadArmoredKeyRing(bytes.NewReader(k))
	if err != nil || len(kr) != 1 {
		t.Fatalf("read key: %v (%d entities)", err, len(kr))
	}
	if fp := fmt.Sprintf("%X", kr[0].PrimaryKey.Fingerprint); fp != "F88CFEDEFF29A5B4D9523864E25D9AED0593B34A" {
		t.Errorf("fingerprint %s", fp)
	}
	valid := false
	for _, sk := range kr[0].Subkeys {
		if fmt.Sprintf("%X", sk.PublicKey.Fingerprint) == "52F145DFD00BBDCD928CBB5A32DA80F91EF52974" {
			valid = true
		}
	}
	if !valid {
		t.Error("the 2025-2027 signing subkey 52F145DF... is missing")
	}
}

func TestDigestFor(t *testing.T) {
	d := []byte("# MD5 HASH\nabc  f.bz2\n# SHA1 HASH\nabcd  f.bz2\n# SHA512 HASH\n" + strings.Repeat("AB", 64) + "  f.bz2\n" + strings.Repeat("cd", 64) + "  g.bz2\n")
	if got, err := digestFor(d, "SHA512", "f.bz2"); err != nil || got != strings.Repeat("ab", 64) {
		t.Errorf("f.bz2: %s %v", got, err)
	}
	if _, err := digestFor(d, "SHA512", "h.bz2"); err == nil {
		t.Error("missing file accepted")
	}
	if _, err := digestFor([]byte("# SHA512 HASH\nabc  f.bz2\n"), "SHA512", "f.bz2"); err == nil {
		t.Error("short hash accepted")
	}
}

// release is a fake Flatcar release server with Range support.
type release struct {
	*httptest.Server
	files  map[string][]byte
	ranges []string
	cut    int // drop the next image download after this many bytes
}

func newRelease(t *testing.T, image []byte, signer *openpgp.Entity) *release {
	r := &release{files: map[string][]byte{}}
	sum := sha512.Sum512(image)
	var sig bytes.Buffer
	if err := openpgp.DetachSign(&sig, signer, bytes.NewReader(image), nil); err != nil {
		t.Fatal(err)
	}
	p := "/stable/amd64-usr/1.2.3/flatcar_production_image.bin.bz2"
	r.files["/stable/amd64-usr/current/version.txt"] = []byte("FLATCAR_VERSION=1.2.3\n")
	r.files[p] = image
	r.files[p+".DIGESTS"] = []byte(fmt.Sprintf("# SHA512 HASH\n%x  flatcar_production_image.bin.bz2\n", sum))
	r.files[p+".sig"] = sig.Bytes()
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		data, ok := r.files[req.URL.Path]
		if !ok {
			http.NotFound(w, req)
			return
		}
		if rg := req.Header.Get("Range"); rg != "" {
			r.ranges = append(r.ranges, rg)
		}
		if req.URL.Path == p && r.cut > 0 {
			n := r.cut
			r.cut = 0
			w.Header().Set("Content-Length", fmt.Sprint(len(data)))
			w.Write(data[:n])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		http.ServeContent(w, req, "", time.Time{}, bytes.NewReader(data))
	}))
	t.Cleanup(r.Close)
	return r
}

func armoredPublic(t *testing.T, e *openpgp.Entity) []byte {
	var b bytes.Buffer
	w, _ := armor.Encode(&b, openpgp.PublicKeyType, nil)
	if err := e.Serialize(w); err != nil {
		t.Fatal(err)
	}
	w.Close()
	return b.Bytes()
}

// testImage is a small Flatcar-like disk: a GPT with a USR-A partition
// whose ext4 holds lib/os-release of release 1.2.3 (made with sgdisk and
// mke2fs), and its zstd.
func testImage(t *testing.T) (raw, compressed []byte) {
	return flatcarDisk(t, "1.2.3")
}

func flatcarDisk(t *testing.T, version string) (raw, compressed []byte) {
	t.Helper()
	dir := t.TempDir()
	root := filepath.Join(dir, "usr")
	os.MkdirAll(filepath.Join(root, "lib"), 0o755)
	os.WriteFile(filepath.Join(root, "lib", "os-release"), []byte("NAME=\"Flatcar Container Linux by Kinvolk\"\nID=flatcar\nVERSION="+version+"\nVERSION_ID="+version+"\n"), 0o644)
	img, usr := filepath.Join(dir, "disk.img"), filepath.Join(dir, "usr.img")
	for _, c := range [][]string{
		{"truncate", "-s", "8M", img},
		{"sgdisk", "-n", "1:2048:+4M", "-c", "1:USR-A", img},
		{"mke2fs", "-q", "-t", "ext4", "-d", root, usr, "4M"},
		{"dd", "if=" + usr, "of=" + img, "bs=1M", "seek=1", "conv=notrunc", "status=none"},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	raw, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	zw, _ := zstd.NewWriter(&b)
	zw.Write(raw)
	zw.Close()
	return raw, b.Bytes()
}

// Before: the version came from the URL (and version.txt, .DIGESTS), none
// signed, so a mirror could serve an older signed release under a newer
// name. After: the release read from the image's own /usr must be the one
// asked for, on the first download and on every cache hit.
func TestFlatcarVersionBoundToTheImage(t *testing.T) {
	signer, _ := openpgp.NewEntity("test", "", "test@kiln.invalid", nil)
	_, older := flatcarDisk(t, "1.2.2")
	rel := newRelease(t, older, signer) // 1.2.2's signed image, served as 1.2.3
	target, _ := profiles.LookupTarget("flatcar-amd64")
	src := Source{Target: target, Channel: "stable", Version: "current", Mirror: rel.URL + "/{channel}", Keyring: armoredPublic(t, signer)}
	c := &Cache{Dir: t.TempDir(), Client: rel.Client(), Progress: io.Discard}
	for range 2 {
		_, _, _, err := c.Fetch(context.Background(), src)
		if fault.KindOf(err) != fault.Download || !strings.Contains(err.Error(), "is Flatcar 1.2.2 inside (its /usr/lib/os-release), not 1.2.3") {
			t.Fatalf("an older release under a newer name: %v", err)
		}
	}
	if got, err := FlatcarImageVersion(context.Background(), c.rawPath(Digest{"sha512", fmt.Sprintf("%x", sha512.Sum512(older))}), t.TempDir()); err != nil || got != "1.2.2" {
		t.Errorf("FlatcarImageVersion = %q, %v", got, err)
	}
	// The same image as the one an installer takes from kiln serve: read
	// from the compressed file, refused the same way.
	if _, _, _, err := c.FetchInstallImage(context.Background(), src); err == nil || !strings.Contains(err.Error(), "is Flatcar 1.2.2 inside") {
		t.Errorf("install image of an older release under a newer name: %v", err)
	}
}

func TestFetchVerifiesResumesAndCaches(t *testing.T) {
	signer, _ := openpgp.NewEntity("test", "", "test@kiln.invalid", nil)
	raw, zimg := testImage(t)
	rel := newRelease(t, zimg, signer)
	target, _ := profiles.LookupTarget("flatcar-amd64")
	src := Source{Target: target, Channel: "stable", Version: "current", Mirror: rel.URL + "/{channel}", Keyring: armoredPublic(t, signer)}
	c := &Cache{Dir: t.TempDir(), Client: rel.Client(), Progress: io.Discard}

	rel.cut = len(zimg) / 2
	_, _, _, err := c.Fetch(context.Background(), src)
	if fault.KindOf(err) != fault.Download || !strings.Contains(err.Error(), "resume") {
		t.Fatalf("cut download: %v", err)
	}
	path, r, hit, err := c.Fetch(context.Background(), src)
	if err != nil || hit || r.Version != "1.2.3" {
		t.Fatalf("resumed fetch: %v hit=%v %+v", err, hit, r)
	}
	if want := fmt.Sprintf("bytes=%d-", len(zimg)/2); len(rel.ranges) != 1 || rel.ranges[0] != want {
		t.Errorf("Range requests %v, want [%s]", rel.ranges, want)
	}
	got, _ := os.ReadFile(path)
	if !bytes.Equal(got, raw) {
		t.Fatal("cached image differs from the decompressed original")
	}
	if blocks := blocksOf(t, path); blocks*512 >= int64(len(raw)) {
		t.Errorf("cached image is not sparse: %d blocks for %d bytes", blocks, len(raw))
	}
	if _, _, hit, err := c.Fetch(context.Background(), src); err != nil || !hit {
		t.Errorf("second fetch: hit=%v %v", hit, err)
	}
}

func blocksOf(t *testing.T, path string) int64 {
	out, err := exec.Command("stat", "-c", "%b", path).Output()
	if err != nil {
		t.Skip("stat: ", err)
	}
	var n int64
	fmt.Sscan(string(out), &n)
	return n
}

func TestFetchRefusesBadImages(t *testing.T) {
	signer, _ := openpgp.NewEntity("test", "", "test@kiln.invalid", nil)
	stranger, _ := openpgp.NewEntity("stranger", "", "s@kiln.invalid", nil)
	_, zimg := testImage(t)
	target, _ := profiles.LookupTarget("flatcar-amd64")
	p := "/stable/amd64-usr/1.2.3/flatcar_production_image.bin.bz2"
	for name, c := range map[string]struct {
		tamper func(r *release)
		want   string
	}{
		"corrupt":        {func(r *release) { r.files[p] = append(bytes.Clone(zimg[:len(zimg)-1]), zimg[len(zimg)-1]^1) }, "corrupt"},
		"wrongly signed": {func(r *release) { r.files[p+".sig"] = newRelease(t, zimg, stranger).files[p+".sig"] }, "does not verify"},
		"unsigned":       {func(r *release) { delete(r.files, p+".sig") }, "unsigned"},
	} {
		t.Run(name, func(t *testing.T) {
			rel := newRelease(t, zimg, signer)
			c.tamper(rel)
			cache := &Cache{Dir: t.TempDir(), Client: rel.Client(), Progress: io.Discard}
			src := Source{Target: target, Channel: "stable", Version: "1.2.3", Mirror: rel.URL + "/{channel}", Keyring: armoredPublic(t, signer)}
			_, _, _, err := cache.Fetch(context.Background(), src)
			if fault.KindOf(err) != fault.Download || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want a download error mentioning %q", err, c.want)
			}
			left, _ := filepath.Glob(filepath.Join(cache.Dir, "*", "*"))
			if len(left) != 0 {
				t.Errorf("left in cache: %v", left)
			}
		})
	}
}

func TestFCOSStream(t *testing.T) {
	_, zimg := testImage(t)
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/streams/stable.json" {
			fmt.Fprintf(w, `{"architectures":{"aarch64":{"artifacts":{"metal":{"release":"42.1","formats":{"raw.xz":{"disk":{"location":"%s/img.raw.xz","sha256":"%s"}}}}}}}}`, srv.URL, strings.Repeat("a", 64))
			return
		}
		w.Write(zimg)
	}))
	defer srv.Close()
	target, _ := profiles.LookupTarget("fcos-aarch64")
	// Fedora's embedded keys want a signature the stream does not name.
	if _, err := Resolve(context.Background(), srv.Client(), Source{Target: target, Channel: "stable", Version: "current", Mirror: srv.URL}); err == nil || !strings.Contains(err.Error(), "lists no signature") {
		t.Fatalf("resolve without a signature: %v", err)
	}
	rel, err := Resolve(context.Background(), srv.Client(), Source{Target: target, Channel: "stable", Version: "current", Mirror: srv.URL, Unsigned: true})
	if err != nil || rel.Version != "42.1" || rel.Digest.String() != "sha256:"+strings.Repeat("a", 64) || rel.SignatureURL != "" {
		t.Fatalf("resolve: %+v %v", rel, err)
	}
	_, err = Resolve(context.Background(), srv.Client(), Source{Target: target, Channel: "stable", Version: "41.9", Mirror: srv.URL})
	if fault.KindOf(err) != fault.Input || !strings.Contains(err.Error(), "42.1") {
		t.Errorf("old pinned version: %v", err)
	}
	c := &Cache{Dir: t.TempDir(), Client: srv.Client(), Progress: io.Discard}
	if _, _, _, err := c.Fetch(context.Background(), Source{Target: target, Channel: "stable", Version: "current", Mirror: srv.URL, Unsigned: true}); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("wrong sha256 accepted: %v", err)
	}
}

func TestLocalDecompressesOnce(t *testing.T) {
	raw, zimg := testImage(t)
	dir := t.TempDir()
	for name, data := range map[string][]byte{"img.zst": zimg, "img.raw": raw} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, data, 0o644)
		c := &Cache{Dir: filepath.Join(dir, "cache"), Progress: io.Discard}
		got, err := c.Local(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(got); !bytes.Equal(b, raw) {
			t.Errorf("%s: prepared image differs", name)
		}
		if name == "img.raw" && got != p {
			t.Errorf("raw image copied to %s", got)
		}
	}
	c := &Cache{Dir: t.TempDir(), Progress: io.Discard}
	if _, err := c.Local(context.Background(), filepath.Join(dir, "missing.bin")); fault.KindOf(err) != fault.Input {
		t.Errorf("missing file: %v", err)
	}
}

// TestLocalNotADiskImage: a compressed --base-image that holds no disk
// image, or one in a format kiln does not read, is bad input (exit 2),
// named as such, and leaves nothing in the cache. (A raw one is the
// bake's to read: TestBuildImageInputErrors.)
func TestLocalNotADiskImage(t *testing.T) {
	raw, _ := testImage(t)
	dir := t.TempDir()
	var gz bytes.Buffer
	gw := gzip.NewWriter(&gz)
	gw.Write(raw)
	gw.Close()
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	text := []byte("#!/bin/sh\necho not an image\n")
	whole := enc.EncodeAll(raw, nil)
	for name, tc := range map[string]struct {
		data []byte
		want string
	}{
		"img.gz":   {gz.Bytes(), "is gzip-compressed, which kiln does not read: gunzip it"},
		"text.zst": {enc.EncodeAll(text, nil), "text.zst: not a disk image kiln can bake"},
		"cut.zst":  {whole[:len(whole)/2], "--base-image"},
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, tc.data, 0o644)
		c := &Cache{Dir: filepath.Join(dir, "cache-"+name), Progress: io.Discard}
		_, err := c.Local(context.Background(), p)
		if fault.KindOf(err) != fault.Input || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v (kind %v), want bad input saying %q", name, err, fault.KindOf(err), tc.want)
		}
		if left, _ := filepath.Glob(filepath.Join(c.Dir, "*", "*")); len(left) > 0 {
			t.Errorf("%s: left in the cache: %v", name, left)
		}
	}
}

// Before: a file already in the download cache was used as it was. A
// stranger who could write the cache planted an image there, named by its
// own digest, and a mirror listing that digest then needed no signature.
// After: a cached file is verified again on every use, digest and the
// signature kept beside it; a planted or changed file is removed and the
// release downloaded afresh.
func TestPlantedCacheFile(t *testing.T) {
	signer, _ := openpgp.NewEntity("test", "", "test@kiln.invalid", nil)
	_, zimg := testImage(t)
	target, _ := profiles.LookupTarget("flatcar-amd64")
	p := "/stable/amd64-usr/1.2.3/flatcar_production_image.bin.bz2"
	rel := newRelease(t, zimg, signer)
	cache := &Cache{Dir: t.TempDir(), Client: rel.Client(), Progress: io.Discard}
	src := Source{Target: target, Channel: "stable", Version: "1.2.3", Mirror: rel.URL + "/{channel}", Keyring: armoredPublic(t, signer)}

	// The planted image, and a mirror that lists its digest.
	evil := append(bytes.Clone(zimg), "planted"...)
	sum := sha512.Sum512(evil)
	rel.files[p+".DIGESTS"] = []byte(fmt.Sprintf("# SHA512 HASH\n%x  flatcar_production_image.bin.bz2\n", sum))
	rel.files[p] = evil
	planted := filepath.Join(cache.Dir, "files", fmt.Sprintf("sha512-%x", sum))
	os.MkdirAll(filepath.Dir(planted), 0o755)
	os.WriteFile(planted, evil, 0o644)
	os.WriteFile(planted+".sig", []byte("not a signature"), 0o644)
	if _, image, _, err := cache.FetchInstallImage(context.Background(), src); err == nil || !strings.Contains(err.Error(), "does not verify") {
		t.Fatalf("planted cache file: got %s, %v; want refused", image, err)
	}
	if _, err := os.Stat(planted); err == nil {
		t.Error("the planted file is still in the cache")
	}

	// A good cached file changed in place is downloaded again.
	rel = newRelease(t, zimg, signer)
	cache.Client = rel.Client()
	src.Mirror = rel.URL + "/{channel}"
	_, image, sig, err := cache.FetchInstallImage(context.Background(), src)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(image, evil, 0o644)
	if _, image, sig2, err := cache.FetchInstallImage(context.Background(), src); err != nil || sig2 != sig {
		t.Fatalf("after a change in the cache: %v", err)
	} else if got, _ := os.ReadFile(image); !bytes.Equal(got, zimg) {
		t.Error("the changed cached file was used")
	}
}

// Before: a Fedora CoreOS mirror supplied both the stream and the hashes
// kiln checked, so a tampered artifact with a matching stream was taken.
// After: with Fedora's key given (--signing-key), each file's signature
// must verify too; the tampered one is refused, the genuine one is taken.
func TestFCOSMirrorTamperedArtifact(t *testing.T) {
	fedora, _ := openpgp.NewEntity("fedora", "", "fedora@kiln.invalid", nil)
	_, genuine := testImage(t)
	var sig bytes.Buffer
	if err := openpgp.DetachSign(&sig, fedora, bytes.NewReader(genuine), nil); err != nil {
		t.Fatal(err)
	}
	tampered := append(bytes.Clone(genuine), "tampered"...)
	target, _ := profiles.LookupTarget("fcos-aarch64")
	for name, served := range map[string][]byte{"genuine": genuine, "tampered": tampered} {
		var srv *httptest.Server
		srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/streams/stable.json":
				// The mirror's stream lists the hash of what it serves.
				fmt.Fprintf(w, `{"architectures":{"aarch64":{"artifacts":{"metal":{"release":"42.1","formats":{"raw.xz":{"disk":{"location":"%s/img.raw.xz","sha256":"%x","signature":"%s/img.raw.xz.sig"}}}}}}}}`, srv.URL, sha256.Sum256(served), srv.URL)
			case "/img.raw.xz.sig":
				w.Write(sig.Bytes())
			default:
				w.Write(served)
			}
		}))
		c := &Cache{Dir: t.TempDir(), Client: srv.Client(), Progress: io.Discard}
		src := Source{Target: target, Channel: "stable", Version: "current", Mirror: srv.URL, Keyring: armoredPublic(t, fedora)}
		_, _, _, err := c.Fetch(context.Background(), src)
		switch {
		case name == "genuine" && err != nil:
			t.Errorf("genuine artifact: %v", err)
		case name == "tampered" && (err == nil || !strings.Contains(err.Error(), "does not verify")):
			t.Errorf("tampered artifact with a matching stream: %v, want refused", err)
		}
		// Without a key given, Fedora's embedded keys are the judges: a
		// signature by anyone else does not verify.
		src.Keyring = nil
		if _, _, _, err := (&Cache{Dir: t.TempDir(), Client: srv.Client(), Progress: io.Discard}).Fetch(context.Background(), src); err == nil || !strings.Contains(err.Error(), "does not verify") {
			t.Errorf("%s artifact signed by a stranger, checked against Fedora's keys: %v, want refused", name, err)
		}
		srv.Close()
	}
}

// The PXE initramfs carries /usr: an older release's, signed, served
// under a newer name, is refused; the right one is taken.
func TestFlatcarPXEVersionBound(t *testing.T) {
	signer, _ := openpgp.NewEntity("test", "", "test@kiln.invalid", nil)
	target, _ := profiles.LookupTarget("flatcar-amd64")
	for served, want := range map[string]string{"1.2.3": "", "1.2.2": "is Flatcar 1.2.2 inside (its /usr/lib/os-release), not 1.2.3"} {
		_, zimg := testImage(t)
		rel := newRelease(t, zimg, signer)
		dir := "/stable/amd64-usr/1.2.3/"
		for name, data := range map[string][]byte{"flatcar_production_pxe.vmlinuz": []byte("kernel"), "flatcar_production_pxe_image.cpio.gz": flatcartest.Initramfs(t, served)} {
			var sig bytes.Buffer
			if err := openpgp.DetachSign(&sig, signer, bytes.NewReader(data), nil); err != nil {
				t.Fatal(err)
			}
			rel.files[dir+name] = data
			rel.files[dir+name+".DIGESTS"] = []byte(fmt.Sprintf("# SHA512 HASH\n%x  %s\n", sha512.Sum512(data), name))
			rel.files[dir+name+".sig"] = sig.Bytes()
		}
		src := Source{Target: target, Channel: "stable", Version: "current", Mirror: rel.URL + "/{channel}", Keyring: armoredPublic(t, signer)}
		c := &Cache{Dir: t.TempDir(), Client: rel.Client(), Progress: io.Discard}
		for range 2 { // downloaded, then cached
			version, _, _, err := c.FetchPXE(context.Background(), src)
			switch {
			case want == "" && (err != nil || version != "1.2.3"):
				t.Errorf("release %s: %q %v", served, version, err)
			case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
				t.Errorf("release %s served as 1.2.3: %v", served, err)
			}
		}
	}
}
