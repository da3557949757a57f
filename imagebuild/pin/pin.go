// Package pin resolves the artifacts nodes download (the Kubernetes
// binaries) to URLs and SHA-512 hashes recorded in the cluster file, so
// every rendered config is reproducible and every download verified.
package pin

import (
	"bytes"
	"context"
	"crypto/sha512"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/imagebuild/cancel"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	prog "github.com/kilnproject/kiln/imagebuild/progress"
	"github.com/kilnproject/kiln/profiles"
)

// Arches are the architectures kiln pins downloads for.
var Arches = []string{"amd64", "arm64"}

// Plan returns the downloads the cluster's OS needs for the given arches,
// and the entries it dropped: stale ones (Cluster.StalePin: made for
// another OS or Kubernetes version, for any arch) and, with refresh, those
// of the given arches. Every other entry is kept as it is; missing ones
// are added with the profile's URL and no hash yet. c need not be valid
// (a stale pin is what makes it invalid); the caller validates the result.
func Plan(c *cluster.Cluster, arches []string, refresh bool) (plan, dropped []cluster.Download, err error) {
	osp, err := profiles.LookupOS(c.OS.Name)
	if err != nil {
		return nil, nil, fault.Wrap(fault.Input, fmt.Errorf("os.name: %w", err))
	}
	have := map[string]bool{}
	for _, d := range c.Kubernetes.Downloads {
		if c.StalePin(d) != "" || refresh && slices.Contains(arches, d.Arch) {
			dropped = append(dropped, d)
			continue
		}
		plan = append(plan, d)
		have[d.Name+"/"+d.Arch] = true
	}
	for _, arch := range arches {
		for _, d := range osp.Downloads {
			if have[d.Name+"/"+arch] {
				continue
			}
			plan = append(plan, cluster.Download{
				Name:              d.Name,
				Arch:              arch,
				OS:                c.OS.Name,
				KubernetesVersion: c.Kubernetes.Version,
				URL:               d.Expand(d.URL, c.Kubernetes.Version, osp.Arches[arch]),
			})
		}
	}
	return plan, dropped, nil
}

// Source opens an artifact's content.
type Source interface {
	Open(ctx context.Context, d cluster.Download) (io.ReadCloser, int64, error)
}

// HTTP downloads artifacts from their URL.
type HTTP struct{ Client *http.Client }

// Open starts the download.
func (h HTTP) Open(ctx context.Context, d cluster.Download) (io.ReadCloser, int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.URL, nil)
	if err != nil {
		return nil, 0, err
	}
	resp, err := h.Client.Do(req)
	if err != nil {
		return nil, 0, fault.Wrap(fault.Download, fmt.Errorf("download %s: %w (offline? pin from a local copy with --file %s=PATH)", d.URL, err, d.Name))
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, 0, fault.Wrap(fault.Download, fmt.Errorf("download %s: %s", d.URL, resp.Status))
	}
	return resp.Body, resp.ContentLength, nil
}

// Files reads artifacts from local copies, by artifact name.
type Files map[string]string

// Open opens the local copy of an artifact.
func (f Files) Open(_ context.Context, d cluster.Download) (io.ReadCloser, int64, error) {
	p, ok := f[d.Name]
	if !ok {
		return nil, 0, fault.Wrap(fault.Input, fmt.Errorf("no local file given for %s: add --file %s=PATH", d.Name, d.Name))
	}
	file, err := os.Open(p)
	if err != nil {
		return nil, 0, fault.Wrap(fault.Input, fmt.Errorf("%s: %w", d.Name, err))
	}
	fi, err := file.Stat()
	if err != nil {
		file.Close()
		return nil, 0, fault.Wrap(fault.IO, err)
	}
	return file, fi.Size(), nil
}

// Hash computes the SHA-512 of each unpinned download for the given
// arches, reporting progress to progress, and returns the updated list.
func Hash(ctx context.Context, downloads []cluster.Download, arches []string, src Source, progress io.Writer) ([]cluster.Download, error) {
	out := append([]cluster.Download(nil), downloads...)
	for i, d := range out {
		if d.SHA512 != "" || !slices.Contains(arches, d.Arch) {
			continue
		}
		sum, err := hashOne(ctx, d, src, progress)
		if err != nil {
			return nil, err
		}
		out[i].SHA512 = sum
	}
	return out, nil
}

func hashOne(ctx context.Context, d cluster.Download, src Source, progress io.Writer) (string, error) {
	r, size, err := src.Open(ctx, d)
	if err != nil {
		return "", err
	}
	defer r.Close()
	h := sha512.New()
	meter := prog.New(progress, d.Name+" "+d.Arch, size)
	n, err := io.Copy(io.MultiWriter(h, meter), cancel.Reader(ctx, r))
	meter.Done()
	if ctx.Err() != nil {
		return "", ctx.Err()
	}
	if err != nil {
		return "", fault.Wrap(fault.Download, fmt.Errorf("read %s for %s: %w", d.Name, d.Arch, err))
	}
	if size > 0 && n != size {
		return "", fault.Wrap(fault.Download, fmt.Errorf("%s for %s: got %d of %d bytes", d.Name, d.Arch, n, size))
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Rewrite replaces kubernetes.downloads in a cluster file's YAML, keeping
// the rest of the file (comments included) as it was.
func Rewrite(file []byte, downloads []cluster.Download) ([]byte, error) {
	return SetField(file, downloads, "kubernetes", "downloads")
}

// SetField replaces (or adds) the field at path (mapping keys from the top)
// in a cluster file's YAML with value, keeping the rest of the file
// (comments included) as it was.
func SetField(file []byte, value any, path ...string) ([]byte, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(file, &doc); err != nil {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("parse cluster file: %w", err))
	}
	if len(doc.Content) != 1 || doc.Content[0].Kind != yaml.MappingNode {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("cluster file is not a YAML mapping"))
	}
	m := doc.Content[0]
	for _, key := range path[:len(path)-1] {
		next := mappingValue(m, key)
		if next == nil {
			next = &yaml.Node{Kind: yaml.MappingNode}
			m.Content = append(m.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: key}, next)
		}
		m = next
	}
	var v yaml.Node
	if err := v.Encode(value); err != nil {
		return nil, err
	}
	last := path[len(path)-1]
	if old := mappingValue(m, last); old != nil {
		*old = v
	} else {
		m.Content = append(m.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: last}, &v)
	}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&doc); err != nil {
		return nil, err
	}
	return buf.Bytes(), enc.Close()
}

func mappingValue(m *yaml.Node, key string) *yaml.Node {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}
