package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/baseimage"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/images"
	"github.com/kilnproject/kiln/imagebuild/render"
)

// payloadFile is one file of an air-gapped payload on this machine.
type payloadFile struct {
	// Name is its name in the payload (render.Payload).
	Name string
	// Path is the file here.
	Path string
}

// airgapFiles gathers the payload of air-gapped nodes of roles and arch:
// each download their OS needs, once (a --file NAME=PATH copy, or the
// download cache; both checked against the pin), and each role's image
// archive, written from the image cache into a temporary file in dir
// (removed by cleanup, which is always safe to call).
func airgapFiles(ctx context.Context, g *globals, c *cluster.Cluster, roles []nodeconfig.Role, arch string, cache *baseimage.Cache, fileFlags []string, dir string) ([]payloadFile, func(), error) {
	var temps []string
	cleanup := func() {
		for _, t := range temps {
			os.Remove(t)
		}
	}
	local := map[string]string{}
	for _, spec := range fileFlags {
		name, p, ok := strings.Cut(spec, "=")
		if !ok || name == "" || p == "" {
			return nil, cleanup, fault.Wrap(fault.Input, fmt.Errorf("--file %q: use NAME=PATH, for example kubernetes-sysext=./kubernetes.raw", spec))
		}
		local[name] = p
	}
	list, err := images.List(c)
	if err != nil {
		return nil, cleanup, err
	}
	st := &images.Store{Dir: filepath.Join(cache.Dir, "images")}
	var out []payloadFile
	used := map[string]bool{}
	for _, role := range roles {
		files, err := render.Payload(c, role, arch)
		if err != nil {
			return nil, cleanup, err
		}
		for _, f := range files {
			if slices.ContainsFunc(out, func(p payloadFile) bool { return p.Name == f.Name }) {
				continue
			}
			if d := f.Download; d != nil {
				digest := baseimage.Digest{Algo: "sha512", Hex: d.SHA512}
				var src string
				if p, ok := local[d.Name]; ok {
					src, err = baseimage.CheckLocal(p, digest)
					used[d.Name] = true
				} else {
					src, err = cache.FetchFile(ctx, d.URL, digest)
					err = offline(err, "give a local copy with --file "+d.Name+"=PATH")
				}
				if err != nil {
					return nil, cleanup, fmt.Errorf("airgap: %s: %w", d.Name, err)
				}
				out = append(out, payloadFile{Name: f.Name, Path: src})
				continue
			}
			tmp, err := os.CreateTemp(dir, ".kiln-images-*.tar")
			if err != nil {
				return nil, cleanup, fault.Wrap(fault.IO, err)
			}
			temps = append(temps, tmp.Name())
			written, err := st.WriteArchive(ctx, tmp, images.ForRole(list, role), arch)
			if cerr := tmp.Close(); err == nil {
				err = fault.Wrap(fault.IO, cerr)
			}
			if err != nil {
				return nil, cleanup, fmt.Errorf("airgap: %w", err)
			}
			var size int64
			for _, im := range written {
				size += im.Bytes
			}
			fmt.Fprintf(g.stderr, "airgap: %s: %d images for %s %s (%.1f MiB)\n", f.Name, len(written), role, arch, mib(size))
			out = append(out, payloadFile{Name: f.Name, Path: tmp.Name()})
		}
	}
	for name := range local {
		if !used[name] {
			return nil, cleanup, fault.Wrap(fault.Input, fmt.Errorf("--file %s=...: %s nodes carry no download of that name", name, c.OS.Name))
		}
	}
	return out, cleanup, nil
}
