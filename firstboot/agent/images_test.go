package agent

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

const testArchive = "/oem/kiln/images.tar"

// imageArchive is a tar of an OCI layout holding one manifest blob, named
// name in index.json; damage flips a byte of the blob.
func imageArchive(t *testing.T, name string, damage bool) (string, string) {
	t.Helper()
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}`)
	sum := sha256.Sum256(manifest)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	if damage {
		manifest[10] ^= 0xff
	}
	index := fmt.Sprintf(`{"schemaVersion":2,"manifests":[{"digest":%q,"annotations":{"io.containerd.image.name":%q}}]}`, digest, name)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range []struct {
		name string
		data []byte
	}{{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)}, {"blobs/sha256/" + digest[7:], manifest}, {"index.json", []byte(index)}} {
		tw.WriteHeader(&tar.Header{Name: f.name, Size: int64(len(f.data)), Mode: 0o644, Typeflag: tar.TypeReg})
		tw.Write(f.data)
	}
	tw.Close()
	return buf.String(), digest
}

// airgapNode is a worker whose metadata names an image archive; ctr lists
// listed before the import and imported after it.
func airgapNode(t *testing.T, damage bool, imported func(name, digest string) string) (*node, string) {
	n := newNode(t, nodeconfig.RoleWorker)
	name := "registry.k8s.io/pause:3.10.2"
	archive, digest := imageArchive(t, name, damage)
	n.fs.put(testArchive, archive, 0o644)
	n.nc.Images = &nodeconfig.Images{Archive: testArchive, References: []string{name + "@" + digest}}
	n.writeMetadata()
	header := "REF TYPE DIGEST SIZE PLATFORMS LABELS\n"
	done := false
	n.runner.handle = func(line string) (string, string, error) {
		switch {
		case strings.HasPrefix(line, "ctr ") && strings.Contains(line, " images import "):
			done = true
		case strings.HasPrefix(line, "ctr ") && strings.HasSuffix(line, " images ls"):
			if done {
				return header + imported(name, digest), "", nil
			}
			return header, "", nil
		}
		return "", "", nil
	}
	return n, digest
}

func TestImagesImportedBeforeJoin(t *testing.T) {
	n, _ := airgapNode(t, false, func(name, digest string) string {
		return name + " application/vnd.oci.image.index.v1+json " + digest + " 310.1 KiB linux/amd64 io.cri-containerd.image=managed\n"
	})
	if code := n.run(); code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	want := "ctr --address " + testSocket + " --namespace k8s.io images import --label io.cri-containerd.pinned=pinned " + testArchive
	imp, join := -1, -1
	for i, c := range n.runner.calls {
		if c == want {
			imp = i
		}
		if strings.HasPrefix(c, "kubeadm join") && join < 0 {
			join = i
		}
	}
	if imp < 0 || join < imp {
		t.Fatalf("calls %q: want %q before kubeadm join", n.runner.calls, want)
	}
}

func TestImagesAlreadyThereNotImported(t *testing.T) {
	n, digest := airgapNode(t, false, nil)
	n.runner.handle = func(line string) (string, string, error) {
		if strings.HasSuffix(line, " images ls") {
			return "REF TYPE DIGEST SIZE PLATFORMS LABELS\nregistry.k8s.io/pause:3.10.2 application/vnd.oci.image.index.v1+json " + digest + " 1 KiB linux/amd64 -\n", "", nil
		}
		return "", "", nil
	}
	if code := n.run(); code != ExitOK || n.runner.count("ctr --address "+testSocket+" --namespace k8s.io images import") != 0 {
		t.Fatalf("exit %d, calls %q: want success without an import", code, n.runner.calls)
	}
}

func TestImagesArchiveProblemsArePermanent(t *testing.T) {
	for _, tc := range []struct {
		name     string
		damage   bool
		remove   bool
		imported func(name, digest string) string
		want     string
	}{
		{name: "damaged blob", damage: true, want: "is damaged"},
		{name: "missing archive", remove: true, want: "file does not exist"},
		{name: "other digest after import", imported: func(name, _ string) string {
			return name + " application/vnd.oci.image.index.v1+json sha256:" + strings.Repeat("0", 64) + " 1 KiB linux/amd64 -\n"
		}, want: "missing: registry.k8s.io/pause:3.10.2@"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			imported := tc.imported
			if imported == nil {
				imported = func(string, string) string { return "" }
			}
			n, _ := airgapNode(t, tc.damage, imported)
			if tc.remove {
				delete(n.fs.m, strings.TrimPrefix(testArchive, "/"))
			}
			if code := n.run(); code != ExitPermanent {
				t.Fatalf("exit %d, want %d (permanent)", code, ExitPermanent)
			}
			status := n.fs.read(StatusFile)
			if !strings.Contains(status, testArchive) || !strings.Contains(status, tc.want) {
				t.Fatalf("status does not name %s and %q:\n%s", testArchive, tc.want, status)
			}
			if n.runner.bootstraps() != 0 {
				t.Fatalf("kubeadm ran after an archive problem: %q", n.runner.calls)
			}
			if tc.damage && n.runner.count("ctr --address "+testSocket+" --namespace k8s.io images import") != 0 {
				t.Fatal("a damaged archive was imported")
			}
		})
	}
}
