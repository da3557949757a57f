// Package imagestest makes container images for tests: random layers
// (go-containerregistry's random package) under a multi-arch index whose
// every image's config names its platform, as real images do.
package imagestest

import (
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Index returns an OCI image index with one linux image per arch, each of
// layers random layers of layerSize bytes.
func Index(arches []string, layers, layerSize int64) (v1.ImageIndex, error) {
	idx := v1.ImageIndex(empty.Index)
	for _, arch := range arches {
		img, err := Image(arch, layers, layerSize)
		if err != nil {
			return nil, err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: arch}}})
	}
	return mutate.IndexMediaType(idx, types.OCIImageIndex), nil
}

// Image returns a linux/arch image of layers random layers of layerSize
// bytes.
func Image(arch string, layers, layerSize int64) (v1.Image, error) {
	img, err := random.Image(layerSize, layers)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	return mutate.ConfigFile(img, cf)
}
