package images

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// Source reads images by digest: from their registries, or from an OCI
// image layout. Nothing a Source returns is trusted: the caller checks
// every byte against the digest it asked for.
type Source interface {
	// Manifest returns the raw manifest or index with digest d of ref's
	// repository.
	Manifest(ctx context.Context, ref, d string) ([]byte, error)
	// Blob opens the blob with digest d of ref's repository.
	Blob(ctx context.Context, ref, d string) (io.ReadCloser, error)
	// Resolve returns the digest that ref (REGISTRY/REPO:TAG) names now.
	Resolve(ctx context.Context, ref string) (string, error)
	// Close releases what the source holds (a layout unpacked from a tar).
	Close() error
}

// Registry reads images from their registries over HTTPS (plain HTTP for
// localhost and private addresses, as go-containerregistry decides), with
// the credentials of the user's container tool configuration
// (~/.docker/config.json) where there are any. One Registry keeps its
// connections and tokens across requests.
type Registry struct{ puller *remote.Puller }

// NewRegistry returns a Registry.
func NewRegistry() (*Registry, error) {
	p, err := remote.NewPuller(remote.WithAuthFromKeychain(authn.DefaultKeychain))
	if err != nil {
		return nil, fault.Wrap(fault.Environment, err)
	}
	return &Registry{puller: p}, nil
}

func (r *Registry) options(ctx context.Context) []remote.Option {
	return []remote.Option{remote.WithContext(ctx), remote.Reuse(r.puller)}
}

func repoDigest(ref, d string) (name.Digest, error) {
	t, err := name.NewTag(ref)
	if err != nil {
		return name.Digest{}, fault.Wrap(fault.Input, err)
	}
	return t.Context().Digest(d), nil
}

// Manifest fetches a manifest by digest.
func (r *Registry) Manifest(ctx context.Context, ref, d string) ([]byte, error) {
	dg, err := repoDigest(ref, d)
	if err != nil {
		return nil, err
	}
	desc, err := remote.Get(dg, r.options(ctx)...)
	if err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("fetch %s: %w (offline? use --from LAYOUT)", dg, err))
	}
	return desc.Manifest, nil
}

// Blob opens a blob by digest.
func (r *Registry) Blob(ctx context.Context, ref, d string) (io.ReadCloser, error) {
	dg, err := repoDigest(ref, d)
	if err != nil {
		return nil, err
	}
	l, err := remote.Layer(dg, r.options(ctx)...)
	if err == nil {
		var rc io.ReadCloser
		if rc, err = l.Compressed(); err == nil {
			return rc, nil
		}
	}
	return nil, fault.Wrap(fault.Download, fmt.Errorf("fetch blob %s: %w", dg, err))
}

// Resolve asks the registry which digest a tag names.
func (r *Registry) Resolve(ctx context.Context, ref string) (string, error) {
	t, err := name.NewTag(ref)
	if err != nil {
		return "", fault.Wrap(fault.Input, err)
	}
	desc, err := remote.Head(t, r.options(ctx)...)
	if err != nil {
		return "", fault.Wrap(fault.Download, fmt.Errorf("resolve %s: %w (offline? use --from LAYOUT)", ref, err))
	}
	return desc.Digest.String(), nil
}

// Close does nothing.
func (*Registry) Close() error { return nil }

// Layout reads images from an OCI image layout (a folder, such as
// `skopeo copy ... oci:DIR:REF` writes, or a tar of one, gzip'd or not,
// such as kiln's own node archives). Images are found by the reference in their index.json
// annotations: io.containerd.image.name, or a full reference in
// org.opencontainers.image.ref.name.
type Layout struct {
	path layout.Path
	// tmp is the folder a tar was unpacked into, removed by Close.
	tmp string
}

// OpenLayout opens the layout at p; a tar is unpacked into a folder under
// scratch first (stopping when ctx ends), which Close removes.
func OpenLayout(ctx context.Context, p, scratch string) (*Layout, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("--from: %w", err))
	}
	l := &Layout{path: layout.Path(p)}
	if !fi.IsDir() {
		if err := os.MkdirAll(scratch, 0o700); err != nil {
			return nil, fault.Wrap(fault.IO, err)
		}
		if l.tmp, err = os.MkdirTemp(scratch, "from-*"); err != nil {
			return nil, fault.Wrap(fault.IO, err)
		}
		if err := untar(ctx, p, l.tmp); err != nil {
			os.RemoveAll(l.tmp)
			return nil, err
		}
		l.path = layout.Path(l.tmp)
	}
	if _, err := os.Stat(filepath.Join(string(l.path), "index.json")); err != nil {
		l.Close()
		hint := "an OCI image layout has index.json, oci-layout and blobs/ at its top"
		if l.tmp != "" {
			hint += ": tar the layout's contents, not its folder (tar -C LAYOUT -cf FILE.tar .)"
		}
		return nil, fault.Wrap(fault.Input, fmt.Errorf("--from %s: not an OCI image layout (no index.json at its top): %s", p, hint))
	}
	return l, nil
}

// untar unpacks the regular files and folders of a tar into dir, refusing
// any other kind of entry and any path that leaves dir.
func untar(ctx context.Context, archive, dir string) error {
	f, err := os.Open(archive)
	if err != nil {
		return fault.Wrap(fault.Input, err)
	}
	defer f.Close()
	var r io.Reader = bufio.NewReader(f)
	if magic, _ := r.(*bufio.Reader).Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(r)
		if err != nil {
			return fault.Wrap(fault.Input, fmt.Errorf("--from %s: %w", archive, err))
		}
		r = zr
	}
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fault.Wrap(fault.Input, fmt.Errorf("--from %s: not a tar: %w", archive, err))
		}
		clean := path.Clean("/" + h.Name)[1:]
		if clean == "" {
			continue
		}
		dst := filepath.Join(dir, filepath.FromSlash(clean))
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(dst, 0o755)
		case tar.TypeReg:
			if err = os.MkdirAll(filepath.Dir(dst), 0o755); err == nil {
				err = writeFile(dst, tr)
			}
		default:
			return fault.Wrap(fault.Input, fmt.Errorf("--from %s: entry %s is not a file or folder", archive, h.Name))
		}
		if err != nil {
			return fault.Wrap(fault.IO, err)
		}
	}
}

func writeFile(dst string, r io.Reader) error {
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, r); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func (l *Layout) hash(d string) (v1.Hash, error) {
	h, err := v1.NewHash(d)
	if err != nil {
		return v1.Hash{}, fault.Wrap(fault.Input, err)
	}
	return h, nil
}

// Manifest reads a manifest blob.
func (l *Layout) Manifest(_ context.Context, ref, d string) ([]byte, error) {
	h, err := l.hash(d)
	if err != nil {
		return nil, err
	}
	b, err := l.path.Bytes(h)
	if err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("%s: the layout lacks manifest %s: %w", ref, d, err))
	}
	return b, nil
}

// Blob opens a blob.
func (l *Layout) Blob(_ context.Context, ref, d string) (io.ReadCloser, error) {
	h, err := l.hash(d)
	if err != nil {
		return nil, err
	}
	rc, err := l.path.Blob(h)
	if err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("%s: the layout lacks blob %s: %w", ref, d, err))
	}
	return rc, nil
}

// Resolve finds ref among the layout's annotated images.
func (l *Layout) Resolve(_ context.Context, ref string) (string, error) {
	idx, err := l.path.ImageIndex()
	if err == nil {
		var m *v1.IndexManifest
		if m, err = idx.IndexManifest(); err == nil {
			for _, desc := range m.Manifests {
				for _, key := range []string{containerdName, ociRefName} {
					if n, ok := desc.Annotations[key]; ok && sameRef(n, ref) {
						return desc.Digest.String(), nil
					}
				}
			}
			return "", fault.Wrap(fault.Download, fmt.Errorf("the layout holds no image named %s (it holds %s); images are found by the full reference in io.containerd.image.name or org.opencontainers.image.ref.name", ref, heldNames(m)))
		}
	}
	return "", fault.Wrap(fault.Input, fmt.Errorf("read the layout's index.json: %w", err))
}

// heldNames lists the first names a layout's index gives its images.
func heldNames(m *v1.IndexManifest) string {
	var names []string
	for _, d := range m.Manifests {
		n := d.Annotations[containerdName]
		if n == "" {
			n = d.Annotations[ociRefName]
		}
		if n == "" {
			n = "(unnamed " + d.Digest.String() + ")"
		}
		names = append(names, n)
	}
	switch {
	case len(names) == 0:
		return "nothing"
	case len(names) > 5:
		return strings.Join(names[:5], ", ") + fmt.Sprintf(" and %d more", len(names)-5)
	}
	return strings.Join(names, ", ")
}

// sameRef compares two references in normalized form.
func sameRef(a, b string) bool {
	na, da, err := Normalize(a)
	if err != nil || da != "" {
		return false
	}
	nb, _, err := Normalize(b)
	return err == nil && na == nb
}

// Close removes an unpacked tar.
func (l *Layout) Close() error {
	if l.tmp == "" {
		return nil
	}
	return os.RemoveAll(l.tmp)
}

// Index annotations that name an image in an OCI layout.
const (
	containerdName = "io.containerd.image.name"
	ociRefName     = "org.opencontainers.image.ref.name"
)
