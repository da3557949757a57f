package pin

import (
	"bytes"
	"context"
	"crypto/sha512"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"slices"
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
	c.Kubernetes.Downloads = []cluster.Download{{Name: "kubeadm", Arch: "amd64", OS: "fcos", KubernetesVersion: "v1.36.3", URL: "https://mirror.lab/kubeadm", SHA512: strings.Repeat("a", 128)}}
	plan, dropped, err := Plan(c, []string{"amd64"}, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(plan) != 4 || plan[0].URL != "https://mirror.lab/kubeadm" || len(dropped) != 0 {
		t.Fatalf("plan = %+v, dropped %+v", plan, dropped)
	}
	if plan[1].URL != "https://dl.k8s.io/release/v1.36.3/bin/linux/amd64/kubelet" || plan[1].SHA512 != "" || plan[1].OS != "fcos" || plan[1].KubernetesVersion != "v1.36.3" {
		t.Errorf("kubelet entry = %+v", plan[1])
	}
	// The CNI plugins follow their own release, not kubernetes.version.
	if plan[3].Name != "cni-plugins" || plan[3].URL != "https://github.com/containernetworking/plugins/releases/download/v1.9.1/cni-plugins-linux-amd64-v1.9.1.tgz" {
		t.Errorf("cni-plugins entry = %+v", plan[3])
	}
}

// TestPlanReplacesStalePins: pins made for another Kubernetes version or
// OS (or with no record) are dropped and planned again, for any arch; with
// refresh, the given arches' pins too, and never another arch's good pin.
func TestPlanReplacesStalePins(t *testing.T) {
	c, err := cluster.Parse([]byte(clusterFile))
	if err != nil {
		t.Fatal(err)
	}
	sum := strings.Repeat("a", 128)
	good := cluster.Download{Name: "kubeadm", Arch: "arm64", OS: "fcos", KubernetesVersion: "v1.36.3", URL: "https://mirror.lab/kubeadm-arm64", SHA512: sum}
	c.Kubernetes.Downloads = []cluster.Download{
		{Name: "kubeadm", Arch: "amd64", OS: "fcos", KubernetesVersion: "v1.35.4", URL: "https://dl.k8s.io/release/v1.35.4/bin/linux/amd64/kubeadm", SHA512: sum},
		{Name: "kubernetes-sysext", Arch: "amd64", OS: "flatcar", KubernetesVersion: "v1.36.3", URL: "https://x/sysext", SHA512: sum},
		{Name: "kubelet", Arch: "amd64", URL: "https://x/kubelet", SHA512: sum},
		{Name: "kubelet", Arch: "arm64", OS: "fcos", KubernetesVersion: "v1.35.4", URL: "https://x/kubelet-arm64", SHA512: sum},
		good,
	}
	for _, refresh := range []bool{false, true} {
		plan, dropped, err := Plan(c, []string{"amd64"}, refresh)
		if err != nil {
			t.Fatal(err)
		}
		if len(dropped) != 4 {
			t.Errorf("refresh %t: dropped %+v", refresh, dropped)
		}
		if !slices.Contains(plan, good) {
			t.Errorf("refresh %t: the good arm64 pin was dropped", refresh)
		}
		for _, d := range plan {
			if c.StalePin(d) != "" {
				t.Errorf("refresh %t: stale entry planned: %+v", refresh, d)
			}
			if d.Arch == "amd64" && d.SHA512 != "" {
				t.Errorf("refresh %t: amd64 entry not planned again: %+v", refresh, d)
			}
		}
	}
	// Refreshing arm64 drops its good pin and plans it again.
	plan, _, err := Plan(c, []string{"arm64"}, true)
	if err != nil || slices.Contains(plan, good) {
		t.Errorf("refresh arm64 kept its pin: %v %+v", err, plan)
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
	dl := []cluster.Download{{Name: "kubeadm", Arch: "amd64", OS: "fcos", KubernetesVersion: "v1.36.3", URL: "https://x/kubeadm", SHA512: strings.Repeat("b", 128)}}
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
