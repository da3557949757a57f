package kubeadm

import (
	"os"
	"strings"
	"testing"
)

const token = "abcdef.0123456789abcdef"

func TestParseJoin(t *testing.T) {
	c, err := ParseJoin([]byte(`apiVersion: kubeadm.k8s.io/v1beta4
kind: JoinConfiguration
discovery:
  bootstrapToken:
    apiServerEndpoint: lb:6443
    token: ` + token + `
    caCertHashes: [sha256:aa]
nodeRegistration:
  criSocket: unix:///run/containerd/containerd.sock
controlPlane:
  certificateKey: ` + strings.Repeat("ab", 32) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !c.ControlPlane || c.TokenID != "abcdef" || !c.PinsCA("sha256:aa") || c.Endpoint != "lb:6443" {
		t.Errorf("%+v", c)
	}
	if want := []string{token, "0123456789abcdef", strings.Repeat("ab", 32)}; strings.Join(c.Secrets, ",") != strings.Join(want, ",") {
		t.Errorf("secrets %v", c.Secrets)
	}
}

func TestParseProblemsNeverQuoteSecrets(t *testing.T) {
	_, err := ParseInit([]byte(`apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
bootstrapTokens: [{token: "abcdef.NOT-A-TOKEN-XX"}]
certificateKey: "short-secret"
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
`))
	if err == nil {
		t.Fatal("no error")
	}
	for _, w := range []string{"bootstrapTokens[0].token", "certificateKey", "certificatesDir", "criSocket"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%v does not name %s", err, w)
		}
	}
	if strings.Contains(err.Error(), "NOT-A-TOKEN") || strings.Contains(err.Error(), "short-secret") {
		t.Errorf("error quotes a secret: %v", err)
	}
	if _, err := ParseJoin([]byte("apiVersion: kubeadm.k8s.io/v1beta3\nkind: JoinConfiguration\n")); err == nil || !strings.Contains(err.Error(), "v1beta3") {
		t.Errorf("v1beta3 accepted: %v", err)
	}
}

func TestClassify(t *testing.T) {
	for out, want := range map[string]Class{
		`couldn't validate the identity of the API Server: token id "abcdef" is invalid for this cluster or it has expired. Use "kubeadm token create"`: TokenRejected,
		`failed to verify JWS signature of received cluster info object, can't trust this API Server`:                                                   TokenRejected,
		`could not find a JWS signature in the cluster-info ConfigMap for token ID "abcdef"`:                                                            TokenUnknown,
		`cluster CA found in cluster-info ConfigMap is invalid: none of the public keys "sha256:00" are pinned`:                                         CAMismatch,
		`error downloading certs: error decoding secret data with provided key: cipher: message authentication failed`:                                  CertificateKeyRejected,
		`error downloading the secret: Secret "kubeadm-certs" was not found in the "kube-system" Namespace. This Secret might have expired.`:            CertificatesMissing,
		`error creating local etcd static pod manifest file: etcd cluster is not healthy: context deadline exceeded`:                                    Transient,
		`Get "https://lb:6443/api/v1/namespaces/kube-public/configmaps/cluster-info": dial tcp 10.0.0.1:6443: connect: connection refused`:              Transient,
		"[preflight] Some fatal errors occurred:\n\t[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: exists\n\t[ERROR Port-10250]: in use\n":         Transient,
		"[preflight] Some fatal errors occurred:\n\t[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: exists\n\t[ERROR Swap]: swap is on\n":           HostUnfit,
		// Transient preflight failures: a registry blip, containerd not
		// serving CRI yet (ImagePull in kubeadm's own format, from
		// preflight.ImagePullCheck).
		"[preflight] Some fatal errors occurred:\n\t[ERROR ImagePull]: failed to pull image registry.k8s.io/kube-apiserver:v1.37.2: failed to pull image registry.k8s.io/kube-apiserver:v1.37.2: rpc error: code = Unknown desc = failed to pull and unpack image \"registry.k8s.io/kube-apiserver:v1.37.2\": failed to resolve reference \"registry.k8s.io/kube-apiserver:v1.37.2\": dial tcp: lookup registry.k8s.io: no such host\n[preflight] If you know what you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`\n": Transient,
		"[preflight] Some fatal errors occurred:\n\t[ERROR DirAvailable--var-lib-etcd]: /var/lib/etcd is not empty\n\t[ERROR Port-2379]: Port 2379 is in use\n": Transient,
		"[preflight] Some fatal errors occurred:\n\t[ERROR FileExisting-conntrack]: conntrack not found in system path\n":                                       HostUnfit,
		"[preflight] Some fatal errors occurred:\n\t[ERROR NumCPU]: the number of available CPUs 1 is less than the required 2\n":                               HostUnfit,
	} {
		if got := Classify(out); got != want {
			t.Errorf("Classify(%q) = %d, want %d", out, got, want)
		}
	}
	// What the endpoint says before it proves itself is never final.
	for _, c := range []Class{TokenRejected, TokenUnknown, CAMismatch} {
		if c.Permanent() || !c.Unauthenticated() {
			t.Errorf("class %d: permanent %v, unauthenticated %v", c, c.Permanent(), c.Unauthenticated())
		}
	}
	if CertificatesMissing.Permanent() || !CertificateKeyRejected.Permanent() || !HostUnfit.Permanent() || CertificateKeyRejected.Unauthenticated() {
		t.Error("wrong permanence")
	}
}

// Output of the real kubeadm v1.37.2 (see testdata/README).
func TestClassifyRealPreflight(t *testing.T) {
	for file, want := range map[string]Class{
		"preflight-init-no-kubelet.txt":         HostUnfit,
		"preflight-init-cri-socket-missing.txt": Transient,
		"preflight-join-cri-not-serving.txt":    Transient,
	} {
		out, err := os.ReadFile("testdata/" + file)
		if err != nil {
			t.Fatal(err)
		}
		if got := Classify(string(out)); got != want {
			t.Errorf("%s: Classify = %d, want %d", file, got, want)
		}
	}
}
