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
	// unauthenticated are matched anywhere in kubeadm's error: they are
	// never final, whoever said them.
	unauthenticated = []struct {
		class Class
		re    *regexp.Regexp
	}{
		{TokenRejected, regexp.MustCompile(`is invalid for this cluster or it has expired|failed to verify JWS signature of received cluster info object`)},
		{TokenUnknown, regexp.MustCompile(`could not find a JWS signature in the cluster-info ConfigMap`)},
		{CAMismatch, regexp.MustCompile(`none of the public keys .* are pinned`)},
	}
	certificateKeyRe      = regexp.MustCompile(`error decoding secret data with provided key|error decoding certificate key`)
	certificatesMissingRe = regexp.MustCompile(`Secret "kubeadm-certs" was not found`)
	preflightErrorRe      = regexp.MustCompile(`^\t\[ERROR ([^\]]+)\]`)
)

const (
	// phasePrefix starts kubeadm's error (cmd/kubeadm/app/cmd/phases/
	// workflow), after an "error: " in v1.34 and later.
	phasePrefix = "error execution phase "
	// downloadCerts is the phase that reads the kubeadm-certs Secret,
	// from the API server that discovery verified against the pinned CA.
	downloadCerts = "control-plane-prepare/download-certs"
	// fatalHeader opens kubeadm's list of failed preflight checks: inside
	// the error up to v1.33, printed just before it ("preflight checks
	// failed") since v1.34 (cmd/kubeadm/app/preflight/checks.go).
	fatalHeader     = "[preflight] Some fatal errors occurred:"
	preflightFailed = "preflight checks failed"
)

// Classify sorts kubeadm's output (stdout and stderr) from a failed run.
//
// Only kubeadm's own error is read: from the first line that starts with
// "error execution phase PHASE: " on. Before it, at kubeadm's default
// verbosity, the output holds no text from the endpoint; inside it, the
// endpoint's words may follow (an API server's error message, with line
// breaks of its choosing), so a final class needs kubeadm's own structure
// too: CertificateKeyRejected and CertificatesMissing only in the
// download-certs phase (after the endpoint proved to be the cluster), and
// HostUnfit only from the list of failed checks that kubeadm's preflight
// phase printed itself. Without such a line (a run cut short) nothing is
// final.
func Classify(output string) Class {
	lines := strings.Split(output, "\n")
	at, phase, msg := -1, "", ""
	for i, l := range lines {
		if rest, ok := strings.CutPrefix(strings.TrimPrefix(l, "error: "), phasePrefix); ok {
			at = i
			phase, msg, _ = strings.Cut(rest, ": ")
			msg = strings.Join(append([]string{msg}, lines[i+1:]...), "\n")
			break
		}
	}
	if at < 0 {
		msg = output
	}
	for _, p := range unauthenticated {
		if p.re.MatchString(msg) {
			return p.class
		}
	}
	switch {
	case phase == downloadCerts && certificateKeyRe.MatchString(msg):
		return CertificateKeyRejected
	case phase == downloadCerts && certificatesMissingRe.MatchString(msg):
		return CertificatesMissing
	case phase == "preflight":
		for _, check := range failedChecks(lines, at, msg) {
			if hostCheck(check) {
				return HostUnfit
			}
		}
	}
	return Transient
}

// failedChecks lists the checks of kubeadm's own list of failed preflight
// checks, for the error on line at with message msg: the list inside the
// error (up to v1.33) or the last one printed before it (v1.34 on). Only
// the lines right under the header count.
func failedChecks(lines []string, at int, msg string) []string {
	from := -1
	switch {
	case strings.HasPrefix(msg, fatalHeader):
		from = at + 1
	case strings.HasPrefix(msg, preflightFailed+"\n") || msg == preflightFailed:
		for i := at - 1; i >= 0 && from < 0; i-- {
			if lines[i] == fatalHeader {
				from = i + 1
			}
		}
	}
	var checks []string
	for i := from; i >= 0 && i < len(lines); i++ {
		m := preflightErrorRe.FindStringSubmatch(lines[i])
		if m == nil {
			break
		}
		checks = append(checks, m[1])
	}
	return checks
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
