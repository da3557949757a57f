package pin

import (
	"bytes"
	"context"
	"crypto/sha512"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnproject/kiln/imagebuild/cluster"
)

const clusterFile = `# my lab
apiVersion: kiln.dev/v1alpha1
kind: Cluster
name: lab
controlPlaneEndpoint: lb:6443 # the haproxy VIP
kubernetes:
  version: v1.36.3
os:
  name: fcos
`

func TestPlanKeepsPinsAndAddsMissing(t *testing.T) {
	c, err := cluster.Parse([]byte(clusterFile))
	if err != nil {
		t.Fatal(err)
	}
	c.Kubernetes.Downloads = []cluster.Download{{Name: "kubeadm", Arch: "amd64", URL: "https://mirror.lab/kubeadm", SHA512: strings.Repeat("a", 128)}}
	plan, err := Plan(c, []string{"amd64"})
	if err != nil {
		t.Fatal(err)
	}
	if len(plan) != 4 || plan[0].URL != "https://mirror.lab/kubeadm" {
		t.Fatalf("plan = %+v", plan)
	}
	if plan[1].URL != "https://dl.k8s.io/release/v1.36.3/bin/linux/amd64/kubelet" || plan[1].SHA512 != "" {
		t.Errorf("kubelet entry = %+v", plan[1])
	}
	// The CNI plugins follow their own release, not kubernetes.version.
	if plan[3].Name != "cni-plugins" || plan[3].URL != "https://github.com/containernetworking/plugins/releases/download/v1.9.1/cni-plugins-linux-amd64-v1.9.1.tgz" {
		t.Errorf("cni-plugins entry = %+v", plan[3])
	}
}

func TestHashFromFilesOnlyTheWantedArch(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "kubeadm")
	data := []byte("pretend kubeadm")
	os.WriteFile(p, data, 0o644)
	in := []cluster.Download{{Name: "kubeadm", Arch: "amd64"}, {Name: "kubeadm", Arch: "arm64"}}
	var progress bytes.Buffer
	out, err := Hash(context.Background(), in, []string{"amd64"}, Files{"kubeadm": p}, &progress)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha512.Sum512(data)
	if out[0].SHA512 != hex.EncodeToString(sum[:]) || out[1].SHA512 != "" {
		t.Errorf("out = %+v", out)
	}
	if !strings.Contains(progress.String(), "kubeadm amd64:") {
		t.Errorf("no progress: %q", progress.String())
	}
	if in[0].SHA512 != "" {
		t.Error("Hash changed its input")
	}
}

// shortSource claims more bytes than it delivers, like a cut download.
type shortSource struct{}

func (shortSource) Open(context.Context, cluster.Download) (io.ReadCloser, int64, error) {
	return io.NopCloser(strings.NewReader("abc")), 10, nil
}

func TestHashRefusesTruncated(t *testing.T) {
	_, err := Hash(context.Background(), []cluster.Download{{Name: "kubeadm", Arch: "amd64"}}, []string{"amd64"}, shortSource{}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "got 3 of 10 bytes") {
		t.Fatalf("got %v", err)
	}
}

func TestRewriteKeepsTheRestOfTheFile(t *testing.T) {
	dl := []cluster.Download{{Name: "kubeadm", Arch: "amd64", URL: "https://x/kubeadm", SHA512: strings.Repeat("b", 128)}}
	out, err := Rewrite([]byte(clusterFile), dl)
	if err != nil {
		t.Fatal(err)
	}
	for _, keep := range []string{"# my lab", "# the haproxy VIP", "version: v1.36.3", "name: fcos"} {
		if !strings.Contains(string(out), keep) {
			t.Errorf("rewrite lost %q:\n%s", keep, out)
		}
	}
	c, err := cluster.Parse(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Kubernetes.Downloads) != 1 || c.Kubernetes.Downloads[0] != dl[0] {
		t.Errorf("downloads = %+v", c.Kubernetes.Downloads)
	}
	// A second rewrite replaces, not appends.
	out2, err := Rewrite(out, dl)
	if err != nil || !bytes.Equal(out, out2) {
		t.Errorf("second rewrite changed the file: %v\n%s", err, out2)
	}
}
