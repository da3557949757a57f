package kubeadm

import (
	"regexp"
	"strings"
)

// Class sorts a kubeadm failure by what the agent should do about it.
type Class int

// The classes. The message patterns are kubeadm's own error texts
// (cmd/kubeadm/app/discovery/token, util/pubkeypin, phases/copycerts,
// preflight), current in v1.34 to v1.37.
const (
	// Transient failures are retried after kubeadm reset -f: connection
	// refused, etcd not healthy yet, a half-done earlier attempt.
	Transient Class = iota
	// TokenRejected: the cluster knows the token ID but the token is
	// invalid or has expired.
	TokenRejected
	// TokenUnknown: kubeadm waited its whole discovery timeout without the
	// cluster-info ConfigMap ever being signed for the token ID. Right after
	// init this is a race; later it means the token expired or was never
	// created.
	TokenUnknown
	// CAMismatch: the cluster's CA is not the one pinned.
	CAMismatch
	// CertificateKeyRejected: the certificate key does not decrypt the
	// kubeadm-certs Secret. Permanent.
	CertificateKeyRejected
	// CertificatesMissing: the kubeadm-certs Secret is absent (expired, or
	// deleted when the upload window ended). The agent gives up when it
	// persists.
	CertificatesMissing
	// HostUnfit: a preflight check about the machine itself, which
	// neither kubeadm reset nor waiting fixes (CPU, memory, swap, kernel,
	// missing tools). Permanent.
	HostUnfit
)

// Permanent reports whether retrying cannot help. No Unauthenticated
// class is: whoever answers on the endpoint can make kubeadm say it.
func (c Class) Permanent() bool {
	switch c {
	case CertificateKeyRejected, HostUnfit:
		return true
	}
	return false
}

// Unauthenticated reports whether the failure rests on what the endpoint
// said before it proved to be this cluster: kubeadm's token discovery
// reads the cluster-info ConfigMap without TLS verification, checks its
// JWS signature and only then the CA pin (cmd/kubeadm/app/discovery/token),
// so anyone answering on the endpoint's address can cause these. The
// agent keeps retrying them with a capped backoff and reports them loudly.
func (c Class) Unauthenticated() bool {
	switch c {
	case TokenRejected, TokenUnknown, CAMismatch:
		return true
	}
	return false
}

// Advice is the plain message the agent gives for a class: what went
// wrong and what to do.
func (c Class) Advice() string {
	switch c {
	case TokenRejected:
		return "the endpoint says the bootstrap token is invalid or has expired (before it proved to be this cluster: retrying): create a token with `kubeadm token create` on a control plane, put it in the cluster's secrets and rebuild this node's image, or find what else answers on the endpoint"
	case TokenUnknown:
		return "the endpoint does not know the bootstrap token (it has expired or was never created, or this is not the cluster: retrying): create a token with `kubeadm token create` on a control plane, put it in the cluster's secrets and rebuild this node's image, or find what else answers on the endpoint"
	case CAMismatch:
		return "THE ENDPOINT SERVES ANOTHER CLUSTER: its CA is not the CA this image pins; not joining it, retrying: check where the load balancer or the virtual IP routes, or rebuild the image from this cluster's secrets"
	case CertificateKeyRejected:
		return "the certificate key does not decrypt the kubeadm-certs Secret: this image carries another cluster's certificate key; rebuild it from this cluster's secrets"
	case CertificatesMissing:
		return "the kubeadm-certs Secret is gone (the certificate upload window has ended): on a control plane, upload the certificates again under the cluster's certificate key (`kubeadm init phase upload-certs --upload-certs --certificate-key` with the key in kiln's secrets/certificate-key), then `systemctl restart kiln-firstboot` here"
	case HostUnfit:
		return "this machine fails kubeadm's preflight checks: fix what they name (see the output above) and restart kiln-firstboot"
	}
	return "transient failure: retrying"
}

var (
	patterns = []struct {
		class Class
		re    *regexp.Regexp
	}{
		{TokenRejected, regexp.MustCompile(`is invalid for this cluster or it has expired|failed to verify JWS signature of received cluster info object`)},
		{TokenUnknown, regexp.MustCompile(`could not find a JWS signature in the cluster-info ConfigMap`)},
		{CAMismatch, regexp.MustCompile(`none of the public keys .* are pinned`)},
		{CertificateKeyRejected, regexp.MustCompile(`error decoding secret data with provided key|error decoding certificate key`)},
		{CertificatesMissing, regexp.MustCompile(`Secret "kubeadm-certs" was not found`)},
	}
	preflightRe = regexp.MustCompile(`\[ERROR ([^\]]+)\]`)
)

// Classify sorts kubeadm's output (stdout and stderr) from a failed run.
func Classify(output string) Class {
	for _, p := range patterns {
		if p.re.MatchString(output) {
			return p.class
		}
	}
	if strings.Contains(output, "[preflight] Some fatal errors occurred") {
		for _, m := range preflightRe.FindAllStringSubmatch(output, -1) {
			if hostCheck(m[1]) {
				return HostUnfit
			}
		}
	}
	return Transient
}

// hostCheck reports whether a failed preflight check is about the machine
// itself, which neither kubeadm reset nor waiting fixes. The names are
// kubeadm's (cmd/kubeadm/app/preflight/checks.go). Every other check is
// transient: files, directories and ports left by an interrupted attempt
// (FileAvailable, DirAvailable, Port), a container runtime still starting
// (CRI, ContainerRuntimeVersion), a registry that did not answer
// (ImagePull).
func hostCheck(check string) bool {
	switch check {
	case "NumCPU", "Mem", "Swap", "SystemVerification", "KubeletVersion", "KubernetesVersion", "IsPrivilegedUser":
		return true
	}
	// FileExisting-<tool>: a binary missing from PATH (conntrack, mount,
	// ...); FileContent--proc-...: a kernel setting the agent has already
	// written but the kernel refuses.
	return strings.HasPrefix(check, "FileExisting-") || strings.HasPrefix(check, "FileContent--proc-")
}
