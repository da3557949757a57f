package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// AdminKubeconfig is the kubeconfig kubeadm init writes for kubectl.
const AdminKubeconfig = "/etc/kubernetes/admin.conf"

// kubectlAttempts bounds retries of one kubectl action in one agent run.
const kubectlAttempts = 10

// kubectl runs kubectl with the admin kubeconfig, retrying with backoff
// while the API server is not reachable yet (the load balancer may come up
// after the init node).
func (r *run) kubectl(ctx context.Context, args ...string) (string, error) {
	args = append([]string{"--kubeconfig", AdminKubeconfig}, args...)
	for n := 1; ; n++ {
		out, err := r.command(ctx, "kubectl", args...)
		if err == nil || n >= kubectlAttempts || ctx.Err() != nil {
			return out, err
		}
		delay := r.Timing.Backoff(n, r.Jitter)
		r.status.LastError = err.Error()
		r.publish(StateRetrying)
		if err := r.Clock.Sleep(ctx, delay); err != nil {
			return "", err
		}
	}
}

// applyManifests applies the metadata's manifests (the pod network, then
// the add-ons) once the cluster exists, in order, with server-side apply
// under kiln's field manager: applying again changes nothing. The init
// role that joined an existing cluster skips it.
func (r *run) applyManifests(ctx context.Context) error {
	if r.state.Bootstrap != "init" {
		r.log.printf("this node joined an existing cluster; the node that created it applied the manifests")
		return nil
	}
	if len(r.nc.Manifests) == 0 {
		if r.nc.PodNetwork == nodeconfig.PodNetworkNone {
			r.log.printf("network.cni is none and the cluster file lists no add-on: every Node stays NotReady (NetworkPluginNotReady) until a pod network is applied, e.g. kubectl apply -f YOUR-CNI.yaml")
		} else {
			r.log.printf("no manifests to apply")
		}
		return nil
	}
	for _, m := range r.nc.Manifests {
		if _, err := r.kubectl(ctx, "apply", "--server-side", "--field-manager", FieldManager, "--force-conflicts", "--filename", m); err != nil {
			return fmt.Errorf("apply %s: %w", m, err)
		}
		r.log.printf("applied %s", m)
	}
	return nil
}

// FieldManager is the server-side apply field manager of what kiln
// applies.
const FieldManager = "kiln"

// keepCertificates keeps the kubeadm-certs Secret alive for control planes
// that boot late: kubeadm deletes it 2 hours after an upload, so the init
// node uploads again every UploadEvery, until the expected control planes
// are Ready or the upload window ends. Then it deletes the Secret: the
// control-plane keys should not sit in the cluster longer than needed.
func (r *run) keepCertificates(ctx context.Context) error {
	if r.state.Bootstrap != "init" {
		r.log.printf("this node joined an existing cluster; the node that created it keeps the certificates")
		return nil
	}
	window := r.nc.Cluster.CertificateUploadWindow.Duration
	if window == 0 {
		r.log.printf("certificateUploadWindow is 0: the kubeadm-certs Secret expires on its own")
		return nil
	}
	end := r.state.InitAt.Add(window)
	want := r.nc.Cluster.ControlPlanes
	// After failed uploads, the next one waits for the retry backoff
	// rather than for UploadEvery after the last success (long past).
	failures := 0
	var retryAt time.Time
	nextUpload := func() time.Time {
		if failures > 0 {
			return retryAt
		}
		return r.state.UploadedAt.Add(r.Timing.UploadEvery)
	}
	for {
		ready, waiting, err := r.readyControlPlanes(ctx)
		if err == nil && ready < want {
			w := fmt.Sprintf("%d of %d control planes Ready", ready, want)
			if waiting != "" {
				w += "; " + waiting
			}
			if w != r.status.Waiting {
				r.log.printf("waiting for the control planes: %s", w)
				r.status.Waiting = w
			}
		}
		switch {
		case err != nil:
			r.log.printf("count Ready control planes: %v", err)
		case ready >= want:
			r.log.printf("%d of %d control planes are Ready", ready, want)
			return r.deleteCertificates(ctx)
		}
		now := r.Clock.Now()
		if !now.Before(end) {
			r.log.printf("the certificate upload window (%s) has ended with %d of %d control planes Ready", window, ready, want)
			return r.deleteCertificates(ctx)
		}
		next := nextUpload()
		if !now.Before(next) {
			if err := r.uploadCertificates(ctx); err != nil {
				// The Secret from the last upload may still be there;
				// try again after the backoff.
				failures++
				delay := r.Timing.Backoff(failures, r.Jitter)
				retryAt = r.Clock.Now().Add(delay)
				r.status.LastError = err.Error()
				r.log.printf("upload certificates failed; retrying in %s: %v", delay.Round(time.Millisecond), err)
			} else {
				failures, r.status.LastError = 0, ""
			}
			next = nextUpload()
		}
		r.publish(StateWaiting)
		wait := min(r.Timing.ReadyPoll, end.Sub(now), max(next.Sub(now), 0))
		if err := r.Clock.Sleep(ctx, max(wait, time.Millisecond)); err != nil {
			return err
		}
	}
}

// uploadCertificates re-uploads the control-plane certificates under the
// same key. The key comes from the init configuration file (kubeadm allows
// --upload-certs with --config, not --certificate-key), so it never
// appears on a command line.
func (r *run) uploadCertificates(ctx context.Context) error {
	_, err := r.command(ctx, "kubeadm", "init", "phase", "upload-certs", "--upload-certs",
		"--config", r.nc.Kubeadm.InitConfig, "--skip-certificate-key-print")
	if err != nil {
		return err
	}
	r.state.UploadedAt = r.Clock.Now().UTC()
	return r.state.save(r.FS)
}

func (r *run) deleteCertificates(ctx context.Context) error {
	_, err := r.kubectl(ctx, "--namespace", "kube-system", "delete", "secret", "kubeadm-certs", "--ignore-not-found")
	return err
}

// nodeList is the part of kubectl's NodeList JSON the agent reads.
type nodeList struct {
	Items []struct {
		Metadata struct {
			Name string `json:"name"`
		} `json:"metadata"`
		Status struct {
			Conditions []struct {
				Type    string `json:"type"`
				Status  string `json:"status"`
				Reason  string `json:"reason"`
				Message string `json:"message"`
			} `json:"conditions"`
		} `json:"status"`
	} `json:"items"`
}

// readyControlPlanes counts control-plane nodes whose Ready condition is
// True, and says what the others wait for.
func (r *run) readyControlPlanes(ctx context.Context) (int, string, error) {
	out, err := r.command(ctx, "kubectl", "--kubeconfig", AdminKubeconfig, "get", "nodes",
		"--selector", "node-role.kubernetes.io/control-plane", "--output", "json")
	if err != nil {
		return 0, "", err
	}
	var list nodeList
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return 0, "", fmt.Errorf("read kubectl get nodes output: %w", err)
	}
	ready := 0
	var waiting []string
	for _, n := range list.Items {
		why := "no Ready condition yet"
		for _, c := range n.Status.Conditions {
			if c.Type != "Ready" {
				continue
			}
			why = ""
			if c.Status == "True" {
				ready++
			} else {
				why = r.notReadyReason(c.Reason, c.Message)
			}
		}
		if why != "" {
			waiting = append(waiting, n.Metadata.Name+": "+why)
		}
	}
	return ready, strings.Join(waiting, "; "), nil
}

// notReadyReason turns a Node's Ready condition into what the node waits
// for. The kubelet reports a missing pod network as NetworkPluginNotReady
// ("cni plugin not initialized") until a CNI config and its plugins exist.
func (r *run) notReadyReason(reason, message string) string {
	if strings.Contains(message, "NetworkPluginNotReady") || strings.Contains(message, "cni plugin not initialized") || strings.Contains(message, "network plugin is not ready") {
		switch r.nc.PodNetwork {
		case nodeconfig.PodNetworkNone:
			return "no network plugin (network.cni is none: apply a pod network)"
		default:
			return "network plugin not ready yet (its pods must run on this node)"
		}
	}
	if message == "" {
		return "NotReady (" + reason + ")"
	}
	return "NotReady: " + message
}
