package agent

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// containerdNamespace is where the kubelet's CRI finds images.
const containerdNamespace = "k8s.io"

// PinnedLabel is the containerd image label that its CRI reports as
// Pinned (io.cri-containerd.pinned, containerd 1.7 and later): the
// kubelet's image garbage collection then never removes the image, which
// an air-gapped node could not pull back.
const PinnedLabel = "io.cri-containerd.pinned=pinned"

// ImportArgs are the ctr arguments, after the global flags, with which
// the agent imports an image archive: every image pinned.
func ImportArgs(archive string) []string {
	return []string{"images", "import", "--label", PinnedLabel, archive}
}

// importImages makes an air-gapped node's container images available
// before anything needs them (the load balancer's static pods, kubeadm's
// preflight pull check): it checks the archive the node's disk image
// carries (every blob against its digest, every expected image named in
// its index), imports it into containerd's k8s.io namespace with ctr,
// pinned so that the kubelet's image garbage collection keeps it, and
// checks that containerd then lists every image with its pinned digest.
// Images containerd already lists with their digests are not imported
// again, so the step is cheap after the first boot.
//
// A missing or damaged archive, or an import that leaves an image with
// another digest, is a permanent error naming the file: retrying cannot
// mend it, reflashing can.
func (r *run) importImages(ctx context.Context) error {
	im := r.nc.Images
	addr := strings.TrimPrefix(r.join.CRISocket, "unix://")
	ctr := func(args ...string) (string, error) {
		return r.command(ctx, "ctr", append([]string{"--address", addr, "--namespace", containerdNamespace}, args...)...)
	}
	missing := func() ([]string, error) {
		out, err := ctr("images", "ls")
		if err != nil {
			return nil, err
		}
		have := listedImages(out)
		var miss []string
		for _, ref := range im.References {
			name, digest, _ := nodeconfig.SplitImageReference(ref)
			if have[name] != digest {
				miss = append(miss, ref)
			}
		}
		return miss, nil
	}
	miss, err := missing()
	if err != nil || len(miss) == 0 {
		return err
	}
	r.log.printf("%d of %d images not in containerd yet: checking and importing %s", len(miss), len(im.References), im.Archive)
	if err := r.checkArchive(); err != nil {
		return &PermanentError{Advice: fmt.Sprintf("the image archive %s that this node's disk image carries is missing or damaged; rebuild what the node booted from (kiln build-image and reflash, or kiln pxe --force)", im.Archive), Err: err}
	}
	if _, err := ctr(ImportArgs(im.Archive)...); err != nil {
		return err
	}
	if miss, err = missing(); err != nil {
		return err
	}
	if len(miss) > 0 {
		return &PermanentError{Advice: fmt.Sprintf("containerd does not list the images of %s with their pinned digests after importing it", im.Archive), Err: fmt.Errorf("missing: %s", strings.Join(miss, ", "))}
	}
	r.log.printf("containerd holds all %d images of %s", len(im.References), im.Archive)
	return nil
}

// listedImages parses `ctr images ls`: REF TYPE DIGEST SIZE PLATFORMS
// LABELS, one image per line after the header.
func listedImages(out string) map[string]string {
	have := map[string]string{}
	for i, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) < 3 {
			continue
		}
		have[f[0]] = f[2]
	}
	return have
}

// checkArchive reads the image archive once: a tar of an OCI image layout
// whose index.json names every expected image with its digest, and every
// blob of which hashes to its name.
func (r *run) checkArchive() error {
	f, err := r.FS.Open(r.nc.Images.Archive)
	if err != nil {
		return err
	}
	defer f.Close()
	names := map[string]string{}
	blobs := map[string]bool{}
	tr := tar.NewReader(bufio.NewReaderSize(f, 1<<20))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read the archive: %w", err)
		}
		if h.Name == "index.json" {
			var idx struct {
				Manifests []struct {
					Digest      string            `json:"digest"`
					Annotations map[string]string `json:"annotations"`
				} `json:"manifests"`
			}
			if err := json.NewDecoder(io.LimitReader(tr, 4<<20)).Decode(&idx); err != nil {
				return fmt.Errorf("index.json: %w", err)
			}
			for _, m := range idx.Manifests {
				names[m.Annotations["io.containerd.image.name"]] = m.Digest
			}
			continue
		}
		hexd, ok := strings.CutPrefix(h.Name, "blobs/sha256/")
		if !ok {
			continue
		}
		sum := sha256.New()
		if _, err := io.Copy(sum, tr); err != nil {
			return fmt.Errorf("read blob %s: %w", hexd, err)
		}
		if got := hex.EncodeToString(sum.Sum(nil)); got != hexd {
			return fmt.Errorf("blob sha256:%s is damaged: its content hashes to sha256:%s", hexd, got)
		}
		blobs["sha256:"+hexd] = true
	}
	for _, ref := range r.nc.Images.References {
		name, digest, _ := nodeconfig.SplitImageReference(ref)
		switch {
		case names[name] != digest:
			return fmt.Errorf("the archive's index.json does not name %s", ref)
		case !blobs[digest]:
			return fmt.Errorf("the archive lacks the manifest of %s", ref)
		}
	}
	return nil
}
