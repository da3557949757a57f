package images

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/fault"
	prog "github.com/kilnproject/kiln/imagebuild/progress"
)

// Store is kiln's image cache: an OCI image layout (blobs/sha256/HEX,
// index.json naming every image pulled) in which a blob appears only once
// it is complete and matches its digest.
type Store struct{ Dir string }

// ociLayout is an OCI image layout's oci-layout file.
const ociLayout = `{"imageLayoutVersion":"1.0.0"}`

// ErrTampered marks content that does not match the digest it was asked
// for; nothing of it is kept.
var ErrTampered = errors.New("content does not match its digest")

func (s *Store) blobPath(d string) string {
	algo, hexd, _ := strings.Cut(d, ":")
	return filepath.Join(s.Dir, "blobs", algo, hexd)
}

// has reports whether the blob is stored with the size its manifest gives
// (the content is checked again whenever it is used).
func (s *Store) has(b blobRef) bool {
	fi, err := os.Stat(s.blobPath(b.Digest))
	return err == nil && fi.Mode().IsRegular() && fi.Size() == b.Size
}

// put stores r's content as blob d of size bytes (< 0: unknown): written
// to a temporary file, hashed, and renamed into place only when its digest
// is d. A source that sends more than size bytes is cut off and refused.
func (s *Store) put(d string, size int64, r io.Reader, what string) error {
	if size >= 0 {
		r = io.LimitReader(r, size+1)
	}
	dst := s.blobPath(d)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".partial-*")
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	defer os.Remove(tmp.Name())
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(tmp, h), r); err != nil {
		tmp.Close()
		return fault.Wrap(fault.Download, fmt.Errorf("%s: %w", what, err))
	}
	if err := tmp.Close(); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != d {
		return fault.Wrap(fault.Download, fmt.Errorf("%s: refused, not cached: %w (want %s, got %s)", what, ErrTampered, d, got))
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	return nil
}

// manifest returns a stored manifest, re-checking its digest.
func (s *Store) manifest(d string) ([]byte, error) {
	b, err := os.ReadFile(s.blobPath(d))
	if err != nil {
		return nil, err
	}
	if got := digestOf(b); got != d {
		return nil, fault.Wrap(fault.IO, fmt.Errorf("cached manifest %s: %w (got %s): delete %s and pull again", d, ErrTampered, got, s.blobPath(d)))
	}
	return b, nil
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// blobRef is one blob an image needs.
type blobRef struct {
	Digest string
	Size   int64
}

// image is one image resolved for one arch: the blobs it needs, manifests
// first (the pinned one, then the arch's), then config and layers.
type image struct {
	entry     Entry
	top       v1.Descriptor
	manifests []blobRef
	blobs     []blobRef
}

// resolve walks entry's pinned manifest down to arch's config and layers.
// get returns a manifest whose digest it has checked.
func resolve(e Entry, arch string, get func(d string) ([]byte, error)) (*image, error) {
	topRaw, err := get(e.Digest)
	if err != nil {
		return nil, err
	}
	im := &image{entry: e, manifests: []blobRef{{e.Digest, int64(len(topRaw))}}}
	mt, err := mediaType(topRaw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", e.Pinned(), err)
	}
	im.top = v1.Descriptor{MediaType: mt, Digest: mustHash(e.Digest), Size: int64(len(topRaw))}
	raw := topRaw
	if mt.IsIndex() {
		idx, err := v1.ParseIndexManifest(strings.NewReader(string(topRaw)))
		if err != nil {
			return nil, fault.Wrap(fault.Download, fmt.Errorf("%s: %w", e.Pinned(), err))
		}
		var child *v1.Descriptor
		for i, m := range idx.Manifests {
			if p := m.Platform; p != nil && p.OS == "linux" && p.Architecture == arch && (arch != "arm64" || p.Variant == "" || p.Variant == "v8") {
				child = &idx.Manifests[i]
				break
			}
		}
		if child == nil {
			return nil, fault.Wrap(fault.Unsupported, fmt.Errorf("%s has no linux/%s image", e.Pinned(), arch))
		}
		if raw, err = get(child.Digest.String()); err != nil {
			return nil, err
		}
		im.manifests = append(im.manifests, blobRef{child.Digest.String(), int64(len(raw))})
	} else if !mt.IsImage() {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("%s is a %s, not an image", e.Pinned(), mt))
	}
	m, err := v1.ParseManifest(strings.NewReader(string(raw)))
	if err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("%s: %w", e.Pinned(), err))
	}
	im.blobs = append(im.blobs, blobRef{m.Config.Digest.String(), m.Config.Size})
	for _, l := range m.Layers {
		im.blobs = append(im.blobs, blobRef{l.Digest.String(), l.Size})
	}
	return im, nil
}

func mustHash(d string) v1.Hash {
	h, _ := v1.NewHash(d) // d was checked as sha256:HEX
	return h
}

// mediaType reads the mediaType field every current manifest carries.
func mediaType(raw []byte) (types.MediaType, error) {
	var head struct {
		MediaType types.MediaType `json:"mediaType"`
	}
	if err := json.Unmarshal(raw, &head); err != nil {
		return "", fault.Wrap(fault.Download, fmt.Errorf("manifest is not JSON: %w", err))
	}
	if head.MediaType == "" {
		return "", fault.Wrap(fault.Download, errors.New("manifest has no mediaType"))
	}
	return head.MediaType, nil
}

// checkPlatform refuses an image whose stored config is not for linux/arch
// (a single-platform image pinned where a multi-arch index was meant, or a
// broken index), re-checking the config's digest as it reads it.
func (s *Store) checkPlatform(im *image, arch string) error {
	cfg := im.blobs[0]
	b, err := os.ReadFile(s.blobPath(cfg.Digest))
	if err != nil {
		return fault.Wrap(fault.Input, fmt.Errorf("the config of %s is not in the image cache (%s): run `kiln images pull` first", im.entry.Pinned(), s.Dir))
	}
	if got := digestOf(b); got != cfg.Digest {
		return fault.Wrap(fault.IO, fmt.Errorf("cached config %s of %s: %w (got %s): delete it and pull again", cfg.Digest, im.entry.Pinned(), ErrTampered, got))
	}
	var c struct {
		OS           string `json:"os"`
		Architecture string `json:"architecture"`
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return fault.Wrap(fault.Download, fmt.Errorf("the config of %s is not JSON: %w", im.entry.Pinned(), err))
	}
	if c.OS != "linux" || c.Architecture != arch {
		return fault.Wrap(fault.Unsupported, fmt.Errorf("%s is a %s/%s image, not linux/%s: pin the digest of a multi-arch index (or an image built for %s)", im.entry.Pinned(), c.OS, c.Architecture, arch, arch))
	}
	return nil
}

// PullResult says what one image pull did for one arch.
type PullResult struct {
	Name      string `json:"name"`
	Reference string `json:"reference"`
	Digest    string `json:"digest"`
	Arch      string `json:"arch"`
	// Bytes is the size of the arch's image (manifests, config, layers).
	Bytes int64 `json:"bytes"`
	// Fetched is what this run downloaded (0: all cached already).
	Fetched int64 `json:"fetched"`
}

// Pull puts every entry, for every arch, into the store: manifests, config
// and layers, each checked against its digest before it is kept. Blobs
// already stored are not fetched again, so an interrupted pull resumes
// where it stopped. Every entry must be pinned.
func (s *Store) Pull(ctx context.Context, entries []Entry, arches []string, src Source, progress io.Writer) ([]PullResult, error) {
	if err := RequirePinned(entries); err != nil {
		return nil, err
	}
	var results []PullResult
	for _, e := range entries {
		for _, arch := range arches {
			r, err := s.pullOne(ctx, e, arch, src, progress)
			if err != nil {
				return results, err
			}
			results = append(results, *r)
		}
	}
	return results, s.writeIndex(results)
}

func (s *Store) pullOne(ctx context.Context, e Entry, arch string, src Source, progress io.Writer) (*PullResult, error) {
	res := &PullResult{Name: e.Name, Reference: e.Reference, Digest: e.Digest, Arch: arch}
	get := func(d string) ([]byte, error) {
		if b, err := s.manifest(d); err == nil {
			return b, nil
		}
		b, err := src.Manifest(ctx, e.Reference, d)
		if err != nil {
			return nil, err
		}
		if err := s.put(d, -1, strings.NewReader(string(b)), fmt.Sprintf("manifest %s of %s", d, e.Reference)); err != nil {
			return nil, err
		}
		res.Fetched += int64(len(b))
		return b, nil
	}
	im, err := resolve(e, arch, get)
	if err != nil {
		if now, rerr := src.Resolve(ctx, e.Reference); rerr == nil && now != e.Digest {
			return nil, fault.Wrap(fault.Download, fmt.Errorf("%s: the source holds it as %s, the cluster file pins %s: re-pin with `kiln images pin` (--from the same layout) if the new one is right (%w)", e.Reference, now, e.Digest, err))
		}
		return nil, err
	}
	for _, m := range im.manifests {
		res.Bytes += m.Size
	}
	for _, b := range im.blobs {
		res.Bytes += b.Size
		if s.has(b) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		rc, err := src.Blob(ctx, e.Reference, b.Digest)
		if err != nil {
			return nil, err
		}
		meter := prog.New(progress, fmt.Sprintf("%s %s %s", e.Name, arch, b.Digest[7:19]), b.Size)
		err = s.put(b.Digest, b.Size, io.TeeReader(rc, meter), fmt.Sprintf("blob %s of %s", b.Digest, e.Pinned()))
		meter.Done()
		rc.Close()
		if err != nil {
			return nil, err
		}
		res.Fetched += b.Size
	}
	return res, s.checkPlatform(im, arch)
}

// writeIndex records the pulled images in the store's index.json (keeping
// those recorded before), so that OCI tools can read the cache too.
func (s *Store) writeIndex(results []PullResult) error {
	idx := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
	if b, err := os.ReadFile(filepath.Join(s.Dir, "index.json")); err == nil {
		if old, err := v1.ParseIndexManifest(strings.NewReader(string(b))); err == nil {
			idx.Manifests = old.Manifests
		}
	}
	for _, r := range results {
		name := r.Reference
		if slices.ContainsFunc(idx.Manifests, func(d v1.Descriptor) bool {
			return d.Digest.String() == r.Digest && d.Annotations[containerdName] == name
		}) {
			continue
		}
		raw, err := s.manifest(r.Digest)
		if err != nil {
			return err
		}
		mt, err := mediaType(raw)
		if err != nil {
			return err
		}
		idx.Manifests = append(idx.Manifests, v1.Descriptor{MediaType: mt, Digest: mustHash(r.Digest), Size: int64(len(raw)),
			Annotations: map[string]string{containerdName: name, ociRefName: name}})
	}
	if err := os.WriteFile(filepath.Join(s.Dir, "oci-layout"), []byte(ociLayout), 0o644); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	b, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(s.Dir, "index.json"), b, 0o644, true)
}

// ArchiveImage is one image in a node archive.
type ArchiveImage struct {
	Name      string `json:"name"`
	Reference string `json:"reference"`
	Digest    string `json:"digest"`
	Bytes     int64  `json:"bytes"`
}

// NodeName is the name a node's containerd gives an image: its reference
// with the tag, or REPO@DIGEST for an image pinned by digest alone.
func (e Entry) NodeName() string {
	if e.tagged() {
		return e.Reference
	}
	return e.Pinned()
}

// NodeNames are every name a node's containerd must hold for the image,
// as its CRI plugin records a pull: NodeName, and for a tagged reference
// also REPO@DIGEST. The CRI drops the tag of a reference that has both
// (docker.ParseDockerRef), so a pod naming REPO:TAG@DIGEST, as kiln's own
// load-balancer manifests do, is found only by REPO@DIGEST.
func (e Entry) NodeNames() []string {
	if !e.tagged() {
		return []string{e.Pinned()}
	}
	repo := e.Reference[:strings.LastIndex(e.Reference, ":")]
	return []string{e.Reference, repo + "@" + e.Digest}
}

func (e Entry) tagged() bool {
	return strings.Contains(e.Reference[strings.LastIndex(e.Reference, "/")+1:], ":")
}

// WriteArchive writes entries' images for arch, from the store only, as a
// tar of an OCI image layout that `ctr images import` reads: each image
// named in index.json by each of its NodeNames (annotation
// io.containerd.image.name), its
// pinned manifest kept byte for byte (so the node's containerd records the
// pinned digest), with the arch's manifest, config and layers (no other
// arch's). Every blob is checked against its digest as it is copied. The
// tar is reproducible: fixed order, times and owners.
func (s *Store) WriteArchive(ctx context.Context, w io.Writer, entries []Entry, arch string) ([]ArchiveImage, error) {
	if err := RequirePinned(entries); err != nil {
		return nil, err
	}
	tw := tar.NewWriter(w)
	written, named := map[string]bool{}, map[string]bool{}
	idx := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
	var out []ArchiveImage
	header := func(name string, size int64) *tar.Header {
		return &tar.Header{Name: name, Size: size, Mode: 0o644, ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg, Format: tar.FormatPAX}
	}
	if err := writeTarFile(tw, header("oci-layout", int64(len(ociLayout))), []byte(ociLayout)); err != nil {
		return nil, err
	}
	for _, e := range entries {
		im, err := resolve(e, arch, s.manifest)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil, fault.Wrap(fault.Input, fmt.Errorf("%s for %s is not in the image cache %s: run `kiln images pull --arch %s` first (with the same --cache-dir; --from LAYOUT offline)", e.Pinned(), arch, s.Dir, arch))
			}
			return nil, err
		}
		if err := s.checkPlatform(im, arch); err != nil {
			return nil, err
		}
		ai := ArchiveImage{Name: e.Name, Reference: e.Reference, Digest: e.Digest}
		for _, b := range append(im.manifests, im.blobs...) {
			ai.Bytes += b.Size
			if written[b.Digest] {
				continue
			}
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if err := s.copyBlob(tw, header, b, e); err != nil {
				return nil, err
			}
			written[b.Digest] = true
		}
		for _, name := range e.NodeNames() {
			if named[name] { // two tags of one image share REPO@DIGEST
				continue
			}
			named[name] = true
			top := im.top
			top.Annotations = map[string]string{containerdName: name, ociRefName: name}
			idx.Manifests = append(idx.Manifests, top)
		}
		out = append(out, ai)
	}
	b, err := json.Marshal(idx)
	if err != nil {
		return nil, err
	}
	if err := writeTarFile(tw, header("index.json", int64(len(b))), b); err != nil {
		return nil, err
	}
	return out, fault.Wrap(fault.IO, tw.Close())
}

func (s *Store) copyBlob(tw *tar.Writer, header func(string, int64) *tar.Header, b blobRef, e Entry) error {
	f, err := os.Open(s.blobPath(b.Digest))
	if err != nil {
		return fault.Wrap(fault.Input, fmt.Errorf("blob %s of %s is not in the image cache %s: run `kiln images pull` first", b.Digest, e.Pinned(), s.Dir))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if fi.Size() != b.Size {
		return fault.Wrap(fault.IO, fmt.Errorf("cached blob %s of %s: %w (%d bytes, the manifest says %d): delete it and pull again", b.Digest, e.Pinned(), ErrTampered, fi.Size(), b.Size))
	}
	if err := tw.WriteHeader(header("blobs/sha256/"+b.Digest[len("sha256:"):], b.Size)); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(tw, h), f); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != b.Digest {
		return fault.Wrap(fault.IO, fmt.Errorf("cached blob %s of %s: %w (got %s): delete %s and pull again", b.Digest, e.Pinned(), ErrTampered, got, s.blobPath(b.Digest)))
	}
	return nil
}

func writeTarFile(tw *tar.Writer, h *tar.Header, data []byte) error {
	if err := tw.WriteHeader(h); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	_, err := tw.Write(data)
	return fault.Wrap(fault.IO, err)
}
