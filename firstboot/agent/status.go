package agent

import (
	"context"
	"encoding/json"
	"path"
	"time"
)

// Status states.
const (
	StateRunning  = "running"
	StateWaiting  = "waiting"
	StateRetrying = "retrying"
	StateDone     = "done"
	StateFailed   = "failed"
)

// publish writes the status file and hands the status to the reporter.
// Failing to write the status is logged, never fatal: it must not stop a
// join.
func (r *run) publish(state string) {
	st := &r.status
	st.State = state
	st.Updated = r.Clock.Now().UTC()
	st.LastError = r.log.redact(st.LastError)
	st.TokenTimeLeft, st.CertificateUploadTimeLeft, st.Estimated = "", "", false
	if origin, estimated := r.clusterOrigin(); !origin.IsZero() && r.nc != nil {
		st.Estimated = estimated
		if ttl := r.nc.Cluster.TokenTTL.Duration; ttl > 0 {
			st.TokenTimeLeft = timeLeft(origin.Add(ttl), st.Updated)
		}
		st.CertificateUploadTimeLeft = timeLeft(r.certificatesGone(origin), st.Updated)
	}
	body, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		r.log.printf("encode status: %v", err)
		return
	}
	body = append(body, '\n')
	if err := r.FS.MkdirAll(path.Dir(StatusFile), 0o755); err == nil {
		err = r.FS.Replace(StatusFile, body, 0o644)
	}
	if err != nil && !r.statusWarned {
		r.statusWarned = true
		r.log.printf("write status %s: %v (continuing)", StatusFile, err)
	}
	if r.reporter != nil {
		r.reporter.Report(body)
	}
}

// clusterOrigin is when kubeadm init ran: exact on the node that ran it,
// otherwise estimated from the oldest API server certificate seen.
func (r *run) clusterOrigin() (time.Time, bool) {
	if !r.state.InitAt.IsZero() {
		return r.state.InitAt, false
	}
	return r.servingSince, true
}

// certificatesGone is when the kubeadm-certs Secret disappears at the
// latest: the init node deletes it when the upload window ends, and without
// a window kubeadm's own expiry applies.
func (r *run) certificatesGone(origin time.Time) time.Time {
	if w := r.nc.Cluster.CertificateUploadWindow.Duration; w > 0 {
		return origin.Add(w)
	}
	return origin.Add(r.Timing.CertificatesTTL)
}

func timeLeft(deadline, now time.Time) string {
	return max(deadline.Sub(now), 0).Round(time.Second).String()
}

func (r *run) closeReporter() {
	if r.reporter == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	r.reporter.Close(ctx)
}
