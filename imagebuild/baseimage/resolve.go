// Package baseimage finds, downloads, verifies and caches vendor OS disk
// images. A download is verified before anything uses it (Flatcar: the
// SHA-512 in the release's .DIGESTS and the detached OpenPGP signature
// against the profile's embedded key; Fedora CoreOS: the sha256 in the
// stream metadata and, when a key is given, the signature the stream
// names), resumed when interrupted, decompressed once and
// cached sparse under its digest. Nothing unverified is ever cached.
package baseimage

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path"
	"strings"

	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/profiles"
)

// Source says which image to fetch.
type Source struct {
	Target  *profiles.Target
	Channel string
	// Version is a release, or "current".
	Version string
	// Mirror, if set, replaces the profile's origin.
	Mirror string
	// Keyring, if set, replaces the profile's embedded signing keys
	// (armored OpenPGP public keys).
	Keyring []byte
	// Unsigned accepts Fedora CoreOS files without their signature, checked against the stream's hashes alone (a mirror
	// without signatures, by the user's explicit choice).
	Unsigned bool
}

// signed reports whether s's files are checked against a signature:
// Flatcar's always, Fedora CoreOS's unless Unsigned.
func (s Source) signed() bool {
	if s.Unsigned && s.Target.Image.Source == profiles.SourceFCOSStream {
		return false
	}
	return s.Keyring != nil || s.Target.Image.SigningKey != ""
}

// Digest is a content hash.
type Digest struct {
	Algo string `json:"algo"` // sha512 or sha256
	Hex  string `json:"hex"`
}

func (d Digest) String() string { return d.Algo + ":" + d.Hex }

// Release is a resolved base image: where it is and how to check it.
type Release struct {
	Version string `json:"version"`
	URL     string `json:"url"`
	Digest  Digest `json:"digest"`
	// SignatureURL is the detached OpenPGP signature of the file at URL
	// (Flatcar).
	SignatureURL string `json:"signatureURL,omitempty"`
}

func (s Source) origin() string {
	if s.Mirror != "" {
		return s.Mirror
	}
	return s.Target.Image.Origin
}

func (s Source) expand(tmpl, version string) string {
	return s.Target.Image.Expand(tmpl, s.origin(), s.Channel, version)
}

// Resolve finds the release's URL and digest (small downloads only).
func Resolve(ctx context.Context, c *http.Client, s Source) (*Release, error) {
	switch s.Target.Image.Source {
	case profiles.SourceFlatcarRelease:
		return resolveFlatcar(ctx, c, s)
	case profiles.SourceFCOSStream:
		return resolveFCOS(ctx, c, s)
	default:
		return nil, fault.Wrap(fault.Unsupported, fmt.Errorf("image source %q is not supported", s.Target.Image.Source))
	}
}

func resolveFlatcar(ctx context.Context, c *http.Client, s Source) (*Release, error) {
	version, err := flatcarRelease(ctx, c, s)
	if err != nil {
		return nil, err
	}
	return flatcarFile(ctx, c, s.expand(s.Target.Image.URL, version), version)
}

// flatcarRelease resolves "current" to a release from version.txt.
func flatcarRelease(ctx context.Context, c *http.Client, s Source) (string, error) {
	if s.Version != "current" {
		return s.Version, nil
	}
	vu := s.expand(s.Target.Image.VersionURL, "current")
	body, err := getSmall(ctx, c, vu)
	if err != nil {
		return "", err
	}
	version := flatcarVersion(body)
	if version == "" {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s has no FLATCAR_VERSION line: is the mirror a Flatcar release server?", vu))
	}
	return version, nil
}

// flatcarFile reads a release file's SHA-512 from the .DIGESTS beside it;
// its detached signature is the .sig beside it.
func flatcarFile(ctx context.Context, c *http.Client, u, version string) (*Release, error) {
	digests, err := getSmall(ctx, c, u+".DIGESTS")
	if err != nil {
		return nil, err
	}
	sum, err := digestFor(digests, "SHA512", path.Base(u))
	if err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("%s.DIGESTS: %w", u, err))
	}
	return &Release{Version: version, URL: u, Digest: Digest{"sha512", sum}, SignatureURL: u + ".sig"}, nil
}

func flatcarVersion(body []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "FLATCAR_VERSION="); ok {
			return v
		}
	}
	return ""
}

// digestFor reads a Flatcar .DIGESTS file ("# SHA512 HASH" sections of
// "<hex>  <file>" lines) and returns the file's hash.
func digestFor(digests []byte, algo, file string) (string, error) {
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(digests))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if h, ok := strings.CutPrefix(line, "#"); ok {
			section = strings.Fields(h + " ?")[0]
			continue
		}
		f := strings.Fields(line)
		if section == algo && len(f) == 2 && strings.TrimPrefix(f[1], "*") == file {
			want := map[string]int{"SHA512": 128, "SHA256": 64}[algo]
			if len(f[0]) != want {
				return "", fmt.Errorf("malformed %s for %s", algo, file)
			}
			return strings.ToLower(f[0]), nil
		}
	}
	return "", fmt.Errorf("no %s hash for %s", algo, file)
}

// stream is the part of a Fedora CoreOS stream document kiln reads:
// formats map a format ("raw.xz", "pxe") to its files ("disk"; "kernel",
// "initramfs", "rootfs").
type stream struct {
	Architectures map[string]struct {
		Artifacts map[string]struct {
			Release string                           `json:"release"`
			Formats map[string]map[string]streamFile `json:"formats"`
		} `json:"artifacts"`
	} `json:"architectures"`
}

type streamFile struct {
	Location string `json:"location"`
	SHA256   string `json:"sha256"`
	// Signature is the file's detached OpenPGP signature (Fedora's key).
	Signature string `json:"signature"`
}

func resolveFCOS(ctx context.Context, c *http.Client, s Source) (*Release, error) {
	_, files, err := resolveStream(ctx, c, s, "raw.xz", "disk")
	if err != nil {
		return nil, err
	}
	return &files[0], nil
}

// resolveStream finds the current release's files of one format of the
// metal artifact in the stream, on the mirror if one is given.
func resolveStream(ctx context.Context, c *http.Client, s Source, format string, names ...string) (string, []Release, error) {
	su := s.expand(s.Target.Image.StreamURL, s.Version)
	body, err := getSmall(ctx, c, su)
	if err != nil {
		return "", nil, err
	}
	var st stream
	if err := json.Unmarshal(body, &st); err != nil {
		return "", nil, fault.Wrap(fault.Download, fmt.Errorf("parse stream %s: %w", su, err))
	}
	metal := st.Architectures[s.Target.Image.StreamArch].Artifacts["metal"]
	if s.Version != "current" && s.Version != metal.Release {
		return "", nil, fault.Wrap(fault.Input, fmt.Errorf("os.version %s is not the current %s release (the stream lists %s): set os.version to current or %s, or give local files", s.Version, s.Channel, metal.Release, metal.Release))
	}
	var out []Release
	for _, name := range names {
		f := metal.Formats[format][name]
		if f.Location == "" || len(f.SHA256) != 64 {
			return "", nil, fault.Wrap(fault.Download, fmt.Errorf("stream %s lists no metal %s %s with a sha256 for %s", su, format, name, s.Target.Image.StreamArch))
		}
		onMirror := func(u string) string {
			if rest, ok := strings.CutPrefix(u, s.Target.Image.Origin); ok && s.Mirror != "" {
				return strings.TrimSuffix(s.Mirror, "/") + rest
			}
			return u
		}
		r := Release{Version: metal.Release, URL: onMirror(f.Location), Digest: Digest{"sha256", strings.ToLower(f.SHA256)}}
		// The signature (Fedora's key) is checked too: the stream alone
		// is only as good as where it came from.
		if s.signed() {
			if f.Signature == "" {
				return "", nil, fault.Wrap(fault.Download, fmt.Errorf("stream %s lists no signature for the metal %s %s: kiln cannot check it against Fedora's keys (a mirror without signatures needs --insecure-mirror)", su, format, name))
			}
			r.SignatureURL = onMirror(f.Signature)
		}
		out = append(out, r)
	}
	return metal.Release, out, nil
}

// PXEFile is one verified network-boot file.
type PXEFile struct {
	// Kind is kernel, initramfs or rootfs.
	Kind string
	Release
}

// ResolvePXE finds the network-boot files of s's release: Flatcar's PXE
// kernel and initramfs (each verified by its .DIGESTS and signature),
// or Fedora CoreOS's live kernel, initramfs and rootfs (sha256 from the
// stream).
func ResolvePXE(ctx context.Context, c *http.Client, s Source) (string, []PXEFile, error) {
	p := s.Target.PXE
	if p == nil {
		return "", nil, fault.Wrap(fault.Unsupported, fmt.Errorf("profile %s cannot boot from the network (no pxe files): use a generic flatcar or fcos profile", s.Target.Name))
	}
	kinds := []string{"kernel", "initramfs"}
	if p.Stream {
		kinds = append(kinds, "rootfs")
		version, rels, err := resolveStream(ctx, c, s, "pxe", kinds...)
		if err != nil {
			return "", nil, err
		}
		files := make([]PXEFile, len(rels))
		for i, r := range rels {
			files[i] = PXEFile{Kind: kinds[i], Release: r}
		}
		return version, files, nil
	}
	version, err := flatcarRelease(ctx, c, s)
	if err != nil {
		return "", nil, err
	}
	var files []PXEFile
	for i, tmpl := range []string{p.Kernel, p.Initramfs} {
		rel, err := flatcarFile(ctx, c, s.expand(tmpl, version), version)
		if err != nil {
			return "", nil, err
		}
		files = append(files, PXEFile{Kind: kinds[i], Release: *rel})
	}
	return version, files, nil
}

// getSmall downloads a small metadata file (at most 4 MiB).
func getSmall(ctx context.Context, c *http.Client, u string) ([]byte, error) {
	resp, err := get(ctx, c, u, 0)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("download %s: %w", u, err))
	}
	return b, nil
}

// get starts a GET, from byte offset from (a Range request) when from > 0.
// Any status but 200 or 206 is an error.
func get(ctx context.Context, c *http.Client, u string, from int64) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("base image URL %s: %w", u, err))
	}
	if from > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", from))
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("download %s: %w", u, err))
	}
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent {
		resp.Body.Close()
		return nil, fault.Wrap(fault.Download, fmt.Errorf("download %s: %s", u, resp.Status))
	}
	return resp, nil
}
