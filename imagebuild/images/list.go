// Package images knows the container images a cluster's nodes run and
// carries them to nodes that cannot reach a registry: it lists them per
// role (kubeadm's own, the pod network's, the load balancer's and the
// add-ons'), pins them by digest, pulls them for each architecture into a
// content-addressed cache, and writes the per-role OCI archive that an
// air-gapped node imports into containerd.
//
// Registry and OCI-layout access go through go-containerregistry; every
// manifest and blob kiln keeps is checked against its sha256 digest by kiln
// itself before it is stored.
package images

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/manifests"
)

// Entry is one image the cluster's nodes run.
type Entry struct {
	// Name is the key of the cluster file's images map: kiln's name for
	// kubeadm's and its own manifests' images (kube-apiserver, flannel,
	// ...), the reference as the manifest writes it for an add-on's.
	Name string `json:"name"`
	// Reference is the normalized registry/repository:tag the node knows
	// the image by (docker.io/library/haproxy:3.2-alpine).
	Reference string `json:"reference"`
	// Digest is the sha256 digest of the image's index (or of its
	// manifest, for a single-platform image); "" when not pinned yet.
	Digest string `json:"digest"`
	// Roles are the node roles that carry the image.
	Roles []nodeconfig.Role `json:"roles"`
	// Source says where the reference and digest come from.
	Source string `json:"source"`
	// Addon: an add-on's manifest runs it (Name is the reference it writes).
	Addon bool `json:"addon,omitempty"`
	// Fixed: the add-on's manifest pins the digest itself; kiln never
	// re-pins it.
	Fixed bool `json:"fixed,omitempty"`
	// Stale is a cluster-file pin that List ignored because it names
	// another reference than kubeadm of this Kubernetes version runs (the
	// version changed since it was pinned); kiln images pin replaces it.
	Stale string `json:"stalePin,omitempty"`
}

// Pinned is REFERENCE@DIGEST.
func (e Entry) Pinned() string { return e.Reference + "@" + e.Digest }

var (
	controlPlanes = []nodeconfig.Role{nodeconfig.RoleInit, nodeconfig.RoleControlPlane}
	allRoles      = nodeconfig.Roles
)

// List returns every image the cluster's nodes run, kubeadm's first, each
// with the cluster file's pin if it has one, else kiln's default (which may
// be no digest). It fails when the images map names an image no node runs.
// Add-ons given by URL are not read (their images are not listed); an
// air-gapped cluster has none (cluster validation).
func List(c *cluster.Cluster) ([]Entry, error) {
	var out []Entry
	kubeadm, err := manifests.KubeadmImages(c.Kubernetes.Version)
	if err != nil {
		return nil, fault.Wrap(fault.Input, err)
	}
	for _, im := range kubeadm {
		roles := allRoles
		switch im.Name {
		case "kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd":
			roles = controlPlanes
		}
		out = append(out, Entry{Name: im.Name, Reference: im.Reference, Roles: roles, Source: im.Source})
	}
	defaults := map[string]manifests.Image{}
	for _, im := range manifests.Images() {
		defaults[im.Name] = im
	}
	own := func(roles []nodeconfig.Role, names ...string) {
		for _, n := range names {
			im := defaults[n]
			out = append(out, Entry{Name: n, Reference: im.Reference, Digest: im.Digest, Roles: roles, Source: "kiln default: " + im.Source})
		}
	}
	if c.Network.CNI == cluster.CNIFlannel {
		own(allRoles, "flannel", "flannel-cni-plugin")
	}
	switch c.LoadBalancer.Type {
	case cluster.LBKeepalivedHAProxy:
		own(controlPlanes, "keepalived", "haproxy")
	case cluster.LBKubeVIP:
		own(controlPlanes, "kube-vip")
	}
	for i, a := range c.Addons {
		refs, err := AddonImages(a.Data)
		if err != nil {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("addons[%d]: %w", i, err))
		}
		for _, r := range refs {
			if !slices.ContainsFunc(out, func(e Entry) bool { return e.Name == r }) {
				out = append(out, Entry{Name: r, Reference: r, Roles: allRoles, Addon: true, Source: fmt.Sprintf("addons[%d] (%s)", i, a.Path)})
			}
		}
	}
	var errs []error
	for i := range out {
		e := &out[i]
		ref, digest, err := Normalize(e.Reference)
		if err != nil {
			errs = append(errs, fmt.Errorf("images.%s: %w", e.Name, err))
			continue
		}
		e.Reference = ref
		if digest != "" { // an add-on that pins its image itself
			e.Digest, e.Fixed, e.Source = digest, true, e.Source+", pinned in the manifest"
		}
		pin, ok := c.Images[e.Name]
		if !ok {
			continue
		}
		p, err := manifests.ParsePinned(pin)
		var pinned string
		if err == nil {
			pinned, _, err = Normalize(p.Reference)
		}
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("images.%s: %w", e.Name, err))
		case e.Fixed:
			errs = append(errs, fmt.Errorf("images.%s: the add-on's manifest pins this image by digest itself, and the node runs what the manifest says: remove the entry", e.Name))
		case slices.Contains(manifests.KubeadmImageNames, e.Name) && pinned != e.Reference:
			e.Stale = pin
		default:
			e.Reference, e.Digest, e.Source = pinned, p.Digest, "cluster file"
		}
	}
	names := make([]string, 0, len(c.Images))
	for n := range c.Images {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if !slices.ContainsFunc(out, func(e Entry) bool { return e.Name == n }) {
			errs = append(errs, fmt.Errorf("images.%s: no node of this cluster runs that image (kiln images lists those that do): remove the entry", n))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fault.Wrap(fault.Input, err)
	}
	return out, nil
}

// ForRole returns the entries that nodes of role carry.
func ForRole(entries []Entry, role nodeconfig.Role) []Entry {
	var out []Entry
	for _, e := range entries {
		if slices.Contains(e.Roles, role) {
			out = append(out, e)
		}
	}
	return out
}

// RequirePinned fails, naming every unpinned image and the command that
// pins them, unless every entry has a digest.
func RequirePinned(entries []Entry) error {
	var missing []string
	for _, e := range entries {
		if e.Digest == "" {
			missing = append(missing, e.Name+" ("+e.Reference+")")
		}
	}
	if len(missing) == 0 {
		return nil
	}
	return fault.Wrap(fault.Input, fmt.Errorf("images without a digest: %s: run `kiln images pin` (on a connected machine) or `kiln images pin --from LAYOUT` (from an OCI image layout you trust)", strings.Join(missing, ", ")))
}

// Normalize returns a reference in the form containerd and the kubelet's
// CRI know it by (docker.io/library/NAME:TAG; no tag and no digest means
// latest), and the digest it pins, if any. A reference pinned by digest
// alone comes back without a tag.
func Normalize(s string) (ref, digest string, err error) {
	head, digest, pinned := strings.Cut(s, "@")
	if pinned && !manifests.IsDigest(digest) {
		return "", "", fmt.Errorf("%q: the digest is not sha256:<64 hex digits>", s)
	}
	t, err := name.NewTag(head, name.WithDefaultRegistry("docker.io"))
	if err != nil {
		return "", "", fmt.Errorf("%q is not an image reference: %w", s, err)
	}
	registry := t.RegistryStr()
	if registry == name.DefaultRegistry { // go-containerregistry's index.docker.io
		registry = "docker.io"
	}
	base := registry + "/" + t.RepositoryStr()
	if hasTag := strings.Contains(head[strings.LastIndex(head, "/")+1:], ":"); pinned && !hasTag {
		return base, digest, nil
	}
	return base + ":" + t.TagStr(), digest, nil
}

// AddonImages returns the images an add-on's manifests name in their pod
// templates (containers, initContainers, ephemeralContainers), sorted, each
// once.
func AddonImages(data []byte) ([]string, error) {
	var out []string
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var doc any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			sort.Strings(out)
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		walkContainers(doc, func(image string) {
			if !slices.Contains(out, image) {
				out = append(out, image)
			}
		})
	}
}

func walkContainers(v any, found func(string)) {
	switch v := v.(type) {
	case map[string]any:
		for k, child := range v {
			if list, ok := child.([]any); ok && (k == "containers" || k == "initContainers" || k == "ephemeralContainers") {
				for _, c := range list {
					if m, ok := c.(map[string]any); ok {
						if image, ok := m["image"].(string); ok && image != "" {
							found(image)
						}
					}
				}
			}
			walkContainers(child, found)
		}
	case []any:
		for _, child := range v {
			walkContainers(child, found)
		}
	}
}

// Pin reads from src the digest each entry's reference names now and
// checks that the manifest src serves has that digest. With all, every
// entry src knows is re-pinned (a site's own layout overrides kiln's
// defaults); otherwise only entries without a digest are. It returns the
// entries whose pin changed, and fails if an entry is left without one.
func Pin(ctx context.Context, entries []Entry, src Source, all bool) ([]Entry, error) {
	changed := []Entry{}
	var missing []error
	for _, e := range entries {
		if e.Fixed || (e.Digest != "" && !all) {
			continue
		}
		d, err := src.Resolve(ctx, e.Reference)
		if err != nil {
			if e.Digest == "" {
				missing = append(missing, fmt.Errorf("images.%s: %w", e.Name, err))
			}
			continue
		}
		raw, err := src.Manifest(ctx, e.Reference, d)
		if err != nil {
			return nil, err
		}
		if got := digestOf(raw); got != d {
			return nil, fault.Wrap(fault.Download, fmt.Errorf("%s: the manifest served as %s hashes to %s: %w", e.Reference, d, got, ErrTampered))
		}
		if d != e.Digest {
			e.Digest = d
			changed = append(changed, e)
		}
	}
	if err := errors.Join(missing...); err != nil {
		return changed, fault.Wrap(fault.KindOf(missing[0]), err)
	}
	return changed, nil
}
