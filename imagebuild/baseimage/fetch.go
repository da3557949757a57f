package baseimage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/cancel"
	"github.com/kilnproject/kiln/imagebuild/disk"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/progress"
	"github.com/kilnproject/kiln/imagebuild/sparse"
	"github.com/kilnproject/kiln/imagebuild/workdir"
	"github.com/kilnproject/kiln/profiles"
)

// Cache is kiln's base image cache: verified images, decompressed and
// sparse, under base/ALGO-HEX.raw (the digest of the download); downloads
// in progress under partial/.
type Cache struct {
	Dir      string
	Client   *http.Client
	Progress io.Writer
}

// DefaultCacheDir is kiln/ in the user's cache folder ($XDG_CACHE_HOME or
// ~/.cache).
func DefaultCacheDir() (string, error) {
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fault.Wrap(fault.Environment, fmt.Errorf("find the cache folder: %w (set XDG_CACHE_HOME)", err))
	}
	return filepath.Join(d, "kiln"), nil
}

func (c *Cache) rawPath(d Digest) string {
	return filepath.Join(c.Dir, "base", d.Algo+"-"+d.Hex+".raw")
}

// Fetch returns the cached raw image of s's release, downloading,
// verifying and decompressing it first if it is not cached yet. A Flatcar
// image must hold the release it was fetched as (bindVersion).
// hit reports a cache hit.
func (c *Cache) Fetch(ctx context.Context, s Source) (raw string, rel *Release, hit bool, err error) {
	rel, err = Resolve(ctx, c.Client, s)
	if err != nil {
		return "", nil, false, err
	}
	raw = c.rawPath(rel.Digest)
	flatcar := s.Target.Image.Source == profiles.SourceFlatcarRelease
	if _, err := os.Stat(raw); err == nil {
		if flatcar {
			if err := c.bindVersion(ctx, raw, rel, FlatcarImageVersion); err != nil {
				return "", nil, false, err
			}
		}
		fmt.Fprintf(c.Progress, "base image %s %s: cached (%s)\n", s.Target.Name, rel.Version, raw)
		return raw, rel, true, nil
	}
	keyring, err := s.keyring()
	if err != nil {
		return "", nil, false, err
	}
	part := filepath.Join(c.Dir, "partial", rel.Digest.Algo+"-"+rel.Digest.Hex+".part")
	if err := c.download(ctx, rel.URL, part); err != nil {
		return "", nil, false, err
	}
	if _, err := c.verify(ctx, part, rel, keyring); err != nil {
		os.Remove(part)
		return "", nil, false, err
	}
	if err := c.store(ctx, part, raw, rel.URL); err != nil {
		return "", nil, false, err
	}
	os.Remove(part)
	if flatcar {
		if err := c.bindVersion(ctx, raw, rel, FlatcarImageVersion); err != nil {
			return "", nil, false, err
		}
		fmt.Fprintf(c.Progress, "base image %s: Flatcar %s inside, as asked for\n", filepath.Base(rel.URL), rel.Version)
	}
	return raw, rel, false, nil
}

// keyring is the keys that sign s's files: the given ones, else the
// profile's embedded keys (Flatcar's, Fedora's); nil for unsigned
// Fedora CoreOS files (Source.Unsigned).
func (s Source) keyring() (openpgp.EntityList, error) {
	if !s.signed() {
		return nil, nil
	}
	armored := s.Keyring
	if armored == nil {
		k, err := profiles.SigningKey(s.Target.Image.SigningKey)
		if err != nil {
			return nil, err
		}
		armored = k
	}
	kr, err := openpgp.ReadArmoredKeyRing(bytes.NewReader(armored))
	if err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("read signing key: %w", err))
	}
	return kr, nil
}

// download fetches url into part, resuming from what part already holds.
func (c *Cache) download(ctx context.Context, url, part string) error {
	if err := os.MkdirAll(filepath.Dir(part), 0o755); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	f, err := os.OpenFile(part, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("open download %s: %w", part, err))
	}
	defer f.Close()
	have, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	resp, err := get(ctx, c.Client, url, have)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	total := resp.ContentLength
	if resp.StatusCode == http.StatusPartialContent {
		start, size, ok := contentRange(resp.Header.Get("Content-Range"))
		if !ok || start != have {
			return fault.Wrap(fault.Download, fmt.Errorf("download %s: the server answered a resume from byte %d with %q", url, have, resp.Header.Get("Content-Range")))
		}
		total = size
		fmt.Fprintf(c.Progress, "resuming %s at %.1f MiB\n", url, float64(have)/(1<<20))
	} else {
		have = 0 // the server sent the whole file
		if err := f.Truncate(0); err != nil {
			return fault.Wrap(fault.IO, err)
		}
	}
	p := progress.New(c.Progress, "download "+filepath.Base(url), total)
	p.Add(have)
	n, err := io.Copy(io.MultiWriter(io.NewOffsetWriter(f, have), p), resp.Body)
	p.Done()
	if err == nil && total >= 0 && have+n != total {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return fault.Wrap(fault.Download, fmt.Errorf("download %s interrupted after %d of %d bytes: %w; run the same command again to resume", url, have+n, total, err))
	}
	if err := f.Sync(); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	return nil
}

// contentRange parses "bytes START-END/SIZE".
func contentRange(h string) (start, size int64, ok bool) {
	rest, found := strings.CutPrefix(h, "bytes ")
	rng, sz, found2 := strings.Cut(rest, "/")
	from, _, found3 := strings.Cut(rng, "-")
	if !found || !found2 || !found3 {
		return 0, 0, false
	}
	start, err1 := strconv.ParseInt(from, 10, 64)
	size, err2 := strconv.ParseInt(sz, 10, 64)
	return start, size, err1 == nil && err2 == nil
}

// verify checks the downloaded file's digest and, for signed sources,
// its detached OpenPGP signature, which it returns (nil: unsigned).
func (c *Cache) verify(ctx context.Context, part string, rel *Release, keyring openpgp.EntityList) ([]byte, error) {
	h, err := newHash(rel.Digest.Algo)
	if err != nil {
		return nil, fault.Wrap(fault.Download, err)
	}
	got, err := fileDigest(part, h)
	if err != nil {
		return nil, err
	}
	if got != rel.Digest.Hex {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("%s is corrupt: its %s is %s, the release lists %s; the download was deleted, run again to download it afresh", rel.URL, rel.Digest.Algo, got, rel.Digest.Hex))
	}
	if rel.SignatureURL == "" {
		return nil, nil
	}
	sig, err := getSmall(ctx, c.Client, rel.SignatureURL)
	if err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("%s is unsigned or its signature cannot be fetched: %w", rel.URL, err))
	}
	if err := checkSignature(part, sig, keyring); err != nil {
		return nil, fault.Wrap(fault.Download, fmt.Errorf("%s: %w; the download was deleted", rel.URL, err))
	}
	fmt.Fprintf(c.Progress, "verified %s (%s, OpenPGP signature good)\n", filepath.Base(rel.URL), rel.Digest.Algo)
	return sig, nil
}

// checkSignature checks that sig (armored or binary, detached) signs the
// file p with a key of keyring.
func checkSignature(p string, sig []byte, keyring openpgp.EntityList) error {
	f, err := os.Open(p)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	defer f.Close()
	if bytes.HasPrefix(sig, []byte("-----BEGIN")) {
		_, err = openpgp.CheckArmoredDetachedSignature(keyring, f, bytes.NewReader(sig), nil)
	} else {
		_, err = openpgp.CheckDetachedSignature(keyring, f, bytes.NewReader(sig), nil)
	}
	if err != nil {
		return fmt.Errorf("the OpenPGP signature does not verify against the signing key: %w", err)
	}
	return nil
}

// FetchInstallImage returns the cached, verified compressed OS image of
// s's release and its detached signature beside it (IMAGE.sig): what an
// installer such as flatcar-install downloads and checks itself, for a
// network-boot bundle to serve, holding the release asked for (bindVersion).
// Flatcar only: its installer takes an image from kiln serve.
func (c *Cache) FetchInstallImage(ctx context.Context, s Source) (rel *Release, image, sig string, err error) {
	if s.Target.Image.Source != profiles.SourceFlatcarRelease {
		return nil, "", "", fault.Wrap(fault.Unsupported, fmt.Errorf("%s's installer cannot install from kiln serve: boot those roles live (--mode ROLE=live)", s.Target.OS))
	}
	if rel, err = Resolve(ctx, c.Client, s); err != nil {
		return nil, "", "", err
	}
	keyring, err := s.keyring()
	if err != nil {
		return nil, "", "", err
	}
	if image, err = c.FetchVerified(ctx, rel, keyring); err != nil {
		return nil, "", "", err
	}
	if err := c.bindVersion(ctx, image, rel, FlatcarCompressedImageVersion); err != nil {
		return nil, "", "", err
	}
	return rel, image, image + ".sig", nil
}

// newHash returns the hash of a digest algorithm: sha512 or sha256.
func newHash(algo string) (hash.Hash, error) {
	switch algo {
	case "sha512":
		return sha512.New(), nil
	case "sha256":
		return sha256.New(), nil
	}
	return nil, fmt.Errorf("unsupported digest %s", algo)
}

func fileDigest(p string, h hash.Hash) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	defer f.Close()
	if _, err := io.Copy(h, f); err != nil {
		return "", fault.Wrap(fault.IO, fmt.Errorf("hash %s: %w", p, err))
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// store decompresses src into the cache file raw, sparse, atomically.
func (c *Cache) store(ctx context.Context, src, raw, name string) error {
	in, err := os.Open(src)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(raw), 0o755); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	// A killed decompression left its file of gigabytes here.
	if err := workdir.Sweep(filepath.Dir(raw), ".unpack-*", c.Progress); err != nil {
		fmt.Fprintf(c.Progress, "could not remove a killed decompression's file: %v\n", err)
	}
	tmp, err := workdir.File(filepath.Dir(raw), ".unpack-*")
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	ok := false
	defer func() {
		tmp.Close()
		if !ok {
			os.Remove(tmp.Name())
		}
	}()
	fi, _ := in.Stat()
	p := progress.New(c.Progress, "decompress "+filepath.Base(name), fi.Size())
	r, kind, err := Decompress(ctx, io.TeeReader(cancel.Reader(ctx, in), p))
	if err != nil {
		return err
	}
	defer r.Close()
	w := sparse.NewWriter(tmp)
	if _, err := io.Copy(w, cancel.Reader(ctx, r)); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fault.Wrap(fault.Download, fmt.Errorf("decompress %s (%s): %w", name, kind, err))
	}
	p.Done()
	if err := w.Close(); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if err := tmp.Sync(); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if err := os.Rename(tmp.Name(), raw); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	ok = true
	return nil
}

// Local prepares a base image given as a file (--base-image): a raw image
// is used as it is; a compressed one is decompressed once into the cache,
// under the sha256 of the file.
func (c *Cache) Local(ctx context.Context, p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", fault.Wrap(fault.Input, fmt.Errorf("--base-image: %w", err))
	}
	var magic [2]byte
	_, _ = io.ReadFull(f, magic[:])
	_, _ = f.Seek(0, io.SeekStart)
	kind, err := Sniff(f)
	f.Close()
	if err != nil {
		return "", fault.Wrap(fault.Input, fmt.Errorf("--base-image %s: %w", p, err))
	}
	if kind == "raw" {
		if magic == [2]byte{0x1f, 0x8b} {
			return "", fault.Wrap(fault.Input, fmt.Errorf("--base-image %s is gzip-compressed, which kiln does not read: gunzip it, or give the raw, .bz2, .xz or .zst image", p))
		}
		return p, nil // the bake reads its partition table
	}
	sum, err := fileDigest(p, sha256.New())
	if err != nil {
		return "", err
	}
	raw := c.rawPath(Digest{"sha256", sum})
	if _, err := os.Stat(raw); err == nil {
		return raw, nil
	}
	if err := c.store(ctx, p, raw, p); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fault.Wrap(fault.Input, err)
		}
		if fault.KindOf(err) == fault.Download { // it does not decompress
			err = fault.Wrap(fault.Input, fmt.Errorf("--base-image %s: %w", p, err))
		}
		return "", err
	}
	if err := checkDiskImage(raw, p); err != nil {
		os.Remove(raw)
		return "", err
	}
	return raw, nil
}

// checkDiskImage refuses a compressed --base-image (given) whose content
// (decompressed at raw) has no GPT: bad input, not a failed download.
func checkDiskImage(raw, given string) error {
	if _, err := disk.Read(raw); err != nil {
		return fault.Wrap(fault.Input, fmt.Errorf("--base-image %s: %w", given, disk.NotAnImage(err)))
	}
	return nil
}

// FetchFile returns the cached copy of a file pinned by its digest (such
// as board firmware), downloading (resumably) and verifying it first if
// needed.
func (c *Cache) FetchFile(ctx context.Context, url string, d Digest) (string, error) {
	return c.FetchVerified(ctx, &Release{URL: url, Digest: d}, nil)
}

// CheckLocal verifies a local copy of a pinned file (such as --file
// NAME=PATH) against its digest and returns its path.
func CheckLocal(p string, d Digest) (string, error) {
	h, err := newHash(d.Algo)
	if err != nil {
		return "", fault.Wrap(fault.Input, err)
	}
	got, err := fileDigest(p, h)
	if err != nil {
		return "", fault.Wrap(fault.Input, err)
	}
	if got != d.Hex {
		return "", fault.Wrap(fault.Input, fmt.Errorf("%s is not the pinned file: its %s is %s, the cluster file pins %s", p, d.Algo, got, d.Hex))
	}
	return p, nil
}

// FetchVerified returns the cached copy of a release file (kept as it was
// downloaded, not decompressed), downloading (resumably) and verifying its
// digest and, when the release has one, its signature against keyring.
// The signature is kept beside the file (FILE.sig), and a cached file is
// verified again on every use, digest and signature: a file planted in or
// changed in the cache is removed and downloaded afresh, never used.
func (c *Cache) FetchVerified(ctx context.Context, rel *Release, keyring openpgp.EntityList) (string, error) {
	d := rel.Digest
	dst := filepath.Join(c.Dir, "files", d.Algo+"-"+d.Hex)
	if _, err := os.Stat(dst); err == nil {
		err := c.recheck(dst, rel, keyring)
		if err == nil {
			return dst, nil
		}
		fmt.Fprintf(c.Progress, "cached %s does not verify (%v): removed, downloading it again\n", filepath.Base(rel.URL), err)
		os.Remove(dst)
		os.Remove(dst + ".sig")
		os.Remove(dst + ".version")
	}
	part := filepath.Join(c.Dir, "partial", d.Algo+"-"+d.Hex+".part")
	if err := c.download(ctx, rel.URL, part); err != nil {
		return "", err
	}
	sig, err := c.verify(ctx, part, rel, keyring)
	if err != nil {
		os.Remove(part)
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	if sig != nil {
		if err := atomicfile.Write(dst+".sig", sig, 0o644, true); err != nil {
			return "", err
		}
	}
	if err := os.Rename(part, dst); err != nil {
		return "", fault.Wrap(fault.IO, err)
	}
	return dst, nil
}

// recheck verifies a cached release file again: its digest, and for a
// signed release the signature kept beside it.
func (c *Cache) recheck(p string, rel *Release, keyring openpgp.EntityList) error {
	h, err := newHash(rel.Digest.Algo)
	if err != nil {
		return err
	}
	got, err := fileDigest(p, h)
	if err != nil {
		return err
	}
	if got != rel.Digest.Hex {
		return fmt.Errorf("its %s is %s, the release lists %s", rel.Digest.Algo, got, rel.Digest.Hex)
	}
	if rel.SignatureURL == "" {
		return nil
	}
	sig, err := os.ReadFile(p + ".sig")
	if err != nil {
		return fmt.Errorf("no kept signature: %w", err)
	}
	return checkSignature(p, sig, keyring)
}

// FetchPXE returns the cached, verified network-boot files of s's
// release, downloading what is missing.
func (c *Cache) FetchPXE(ctx context.Context, s Source) (version string, files []PXEFile, paths []string, err error) {
	version, files, err = ResolvePXE(ctx, c.Client, s)
	if err != nil {
		return "", nil, nil, err
	}
	keyring, err := s.keyring()
	if err != nil {
		return "", nil, nil, err
	}
	for _, f := range files {
		p, err := c.FetchVerified(ctx, &f.Release, keyring)
		if err != nil {
			return "", nil, nil, err
		}
		// Flatcar's initramfs carries /usr: it must be the release asked
		// for (Fedora CoreOS's files are named by the stream's release).
		if f.Kind == "initramfs" && s.Target.Image.Source == profiles.SourceFlatcarRelease {
			if err := c.bindVersion(ctx, p, &f.Release, FlatcarPXEVersion); err != nil {
				return "", nil, nil, err
			}
		}
		paths = append(paths, p)
	}
	return version, files, paths, nil
}
