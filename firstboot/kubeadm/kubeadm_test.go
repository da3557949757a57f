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
	const (
		discovery = "error: error execution phase preflight: couldn't validate the identity of the API Server: "
		certs     = "error: error execution phase control-plane-prepare/download-certs: error downloading certs: "
		failed    = "[preflight] If you know what you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`\nerror: error execution phase preflight: preflight checks failed\nTo see the stack trace of this error execute with --v=5 or higher\n"
		fatal     = "[preflight] Some fatal errors occurred:\n"
		old       = "error execution phase preflight: " + fatal // kubeadm v1.33
	)
	for out, want := range map[string]Class{
		discovery + `token id "abcdef" is invalid for this cluster or it has expired. Use "kubeadm token create"`:                                                   TokenRejected,
		discovery + `failed to verify JWS signature of received cluster info object, can't trust this API Server`:                                                   TokenRejected,
		discovery + `could not find a JWS signature in the cluster-info ConfigMap for token ID "abcdef"`:                                                            TokenUnknown,
		discovery + `cluster CA found in cluster-info ConfigMap is invalid: none of the public keys "sha256:00" are pinned`:                                         CAMismatch,
		certs + `error decoding secret data with provided key: cipher: message authentication failed`:                                                               CertificateKeyRejected,
		certs + `error downloading the secret: Secret "kubeadm-certs" was not found in the "kube-system" Namespace. This Secret might have expired.`:                CertificatesMissing,
		"error execution phase control-plane-join/etcd: error creating local etcd static pod manifest file: etcd cluster is not healthy: context deadline exceeded": Transient,
		discovery + `Get "https://lb:6443/api/v1/namespaces/kube-public/configmaps/cluster-info": dial tcp 10.0.0.1:6443: connect: connection refused`:              Transient,
		fatal + "\t[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: exists\n\t[ERROR Port-10250]: in use\n" + failed:                                             Transient,
		fatal + "\t[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: exists\n\t[ERROR Swap]: swap is on\n" + failed:                                               HostUnfit,
		old + "\t[ERROR Swap]: swap is on\n[preflight] If you know what you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`\n":       HostUnfit,
		// Transient preflight failures: a registry blip, containerd not
		// serving CRI yet (ImagePull in kubeadm's own format, from
		// preflight.ImagePullCheck).
		fatal + "\t[ERROR ImagePull]: failed to pull image registry.k8s.io/kube-apiserver:v1.37.2: failed to pull image registry.k8s.io/kube-apiserver:v1.37.2: rpc error: code = Unknown desc = failed to pull and unpack image \"registry.k8s.io/kube-apiserver:v1.37.2\": failed to resolve reference \"registry.k8s.io/kube-apiserver:v1.37.2\": dial tcp: lookup registry.k8s.io: no such host\n" + failed: Transient,
		fatal + "\t[ERROR DirAvailable--var-lib-etcd]: /var/lib/etcd is not empty\n\t[ERROR Port-2379]: Port 2379 is in use\n" + failed: Transient,
		fatal + "\t[ERROR FileExisting-conntrack]: conntrack not found in system path\n" + failed:                                       HostUnfit,
		fatal + "\t[ERROR NumCPU]: the number of available CPUs 1 is less than the required 2\n" + failed:                               HostUnfit,
		// A run cut short, without kubeadm's error, is never final.
		fatal + "\t[ERROR NumCPU]: the number of available CPUs 1 is less than the required 2\n": Transient,
		`error decoding secret data with provided key`:                                           Transient,
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

// Whoever answers on the endpoint before it proves to be the cluster (an
// API server's error message in discovery, line breaks included) cannot
// make a failure final, however it imitates kubeadm.
func TestClassifyEndpointTextIsNeverFinal(t *testing.T) {
	const discovery = "error: error execution phase preflight: couldn't validate the identity of the API Server: failed to request the cluster-info ConfigMap: "
	for _, forged := range []string{
		"error decoding secret data with provided key",
		"error decoding certificate key",
		`Secret "kubeadm-certs" was not found in the "kube-system" Namespace.`,
		"\nerror execution phase control-plane-prepare/download-certs: error downloading certs: error decoding secret data with provided key",
		"\n[preflight] Some fatal errors occurred:\n\t[ERROR NumCPU]: 1 CPU\n",
		"\nerror execution phase preflight: [preflight] Some fatal errors occurred:\n\t[ERROR Mem]: too little\n",
		"\n[preflight] Some fatal errors occurred:\n\t[ERROR Swap]: on\nerror: error execution phase preflight: preflight checks failed\n",
	} {
		out := "[preflight] Running pre-flight checks\n" + discovery + forged + "\nTo see the stack trace of this error execute with --v=5 or higher\n"
		if got := Classify(out); got.Permanent() || got == CertificatesMissing {
			t.Errorf("forged %q: class %d", forged, got)
		}
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
