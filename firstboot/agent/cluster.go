package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"path"
	"time"

	"github.com/kilnproject/kiln/firstboot/endpoint"
	"github.com/kilnproject/kiln/firstboot/kubeadm"
	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// repeatLimit is how many kubeadm attempts in a row may fail with a
// CertificatesMissing before the agent gives up. kubeadm already waits
// its discovery timeout inside each attempt.
const repeatLimit = 3

// maxAttempts bounds one agent run's kubeadm attempts; systemd then
// restarts the agent, up to the unit's StartLimitBurst.
const maxAttempts = 20

// bootstrap is the init role's step: join the cluster if the endpoint
// already serves it, otherwise create it. Two nodes must never both run
// kubeadm init, and only the init role ever does.
func (r *run) bootstrap(ctx context.Context) error {
	if r.resumed {
		// A half-done init or join leaves manifests, certificates and
		// kubeconfigs that make kubeadm's preflight fail; a half-done init
		// may even serve the endpoint. Clean up before looking.
		r.log.printf("an earlier bootstrap was interrupted: resetting before starting over")
		if err := r.reset(ctx); err != nil {
			return err
		}
	}
	// Every attempt looks at the endpoint first: after a failed attempt
	// and its reset, the cluster may exist without this node (control
	// planes joined before the failure, or another init node).
	err := r.retry(ctx, "kubeadm init", false, func(ctx context.Context) error {
		res, err := r.probeSettled(ctx)
		if err != nil {
			return err
		}
		if res.Stage == endpoint.Serving || res.Stage == endpoint.NotReady {
			r.log.printf("%s already serves this cluster (%s): joining it as a control plane instead of running kubeadm init", r.nc.Cluster.ControlPlaneEndpoint, res.Stage)
			return errClusterExists
		}
		r.log.printf("%s does not serve this cluster yet (%s: %v): creating it", r.nc.Cluster.ControlPlaneEndpoint, res.Stage, res.Err)
		if err := r.placePKI(); err != nil {
			return err
		}
		_, err = r.command(ctx, "kubeadm", "init", "--config", r.nc.Kubeadm.InitConfig, "--upload-certs",
			"--skip-token-print", "--skip-certificate-key-print")
		return err
	})
	switch {
	case errors.Is(err, errClusterExists):
		if err := r.joinCluster(ctx, false); err != nil {
			return err
		}
		r.state.Bootstrap = "join"
		return r.state.save(r.FS)
	case err != nil:
		return err
	}
	now := r.Clock.Now().UTC()
	r.state.Bootstrap, r.state.InitAt, r.state.UploadedAt = "init", now, now
	return r.state.save(r.FS)
}

// checkKubeadmConfig has the node's own kubeadm check the configuration
// kiln rendered for it (`kubeadm config validate`, offline) before any
// attempt depends on it. Nothing the network says reaches that check, so a
// rejection is final: kubeadm init or join would refuse the same file on
// every retry. kiln's tests hold every rendered config to the real kubeadm
// of each supported minor, so a rejection means the cluster file holds a
// value kiln's validation let through, or the file was edited.
func (r *run) checkKubeadmConfig(ctx context.Context) error {
	files := []string{r.nc.Kubeadm.JoinConfig}
	if r.nc.Role == nodeconfig.RoleInit {
		files = append([]string{r.nc.Kubeadm.InitConfig}, files...)
	}
	for _, f := range files {
		_, err := r.command(ctx, "kubeadm", "config", "validate", "--config", f)
		if err == nil {
			continue
		}
		// Only a kubeadm that ran and said no: not one that could not
		// start, was cut off or killed.
		var exit interface{ ExitCode() int }
		if ctx.Err() == nil && errors.As(err, &exit) && exit.ExitCode() > 0 {
			return &PermanentError{
				Advice: fmt.Sprintf("kubeadm rejects the configuration kiln rendered for this node (%s): fix what kubeadm names in the cluster file, check it with kiln validate, and rebuild this node's image (please report it: kiln validate should have caught it)", f),
				Err:    err,
			}
		}
		return err
	}
	return nil
}

// errClusterExists stops the init attempts: the endpoint serves the
// cluster.
var errClusterExists = errors.New("the endpoint serves this cluster")

// probeSettled probes the endpoint until its answer can be trusted: it
// serves this cluster (or its API server is starting), or it did not
// answer (no TCP, no TLS) for the whole settle window. While the
// endpoint's name does not resolve, the network is not up and the window
// starts again; while it presents another CA, the agent waits (see
// foreignWait) and the window starts again.
func (r *run) probeSettled(ctx context.Context) (endpoint.Result, error) {
	var res endpoint.Result
	foreign := 0
	start := r.Clock.Now()
	what := fmt.Sprintf("an answer from %s (up to %s)", r.nc.Cluster.ControlPlaneEndpoint, r.Timing.Settle)
	err := r.waitFor(ctx, what, func() (bool, string, time.Duration) {
		res = r.probe(ctx)
		why := fmt.Sprintf("%s: %v", res.Stage, res.Err)
		var dns *net.DNSError
		switch {
		case res.Stage == endpoint.Serving || res.Stage == endpoint.NotReady:
			return true, "", 0
		case res.Stage == endpoint.Foreign:
			foreign++
			start = r.Clock.Now()
			return false, r.foreignWhy(res, foreign), r.Timing.Backoff(foreign, r.Jitter)
		case errors.As(res.Err, &dns):
			foreign, start = 0, r.Clock.Now()
			return false, why + " (is the network up?)", 0
		}
		foreign = 0
		return !r.Clock.Now().Before(start.Add(r.Timing.Settle)), why, 0
	})
	return res, err
}

func (r *run) probe(ctx context.Context) endpoint.Result {
	res := r.prober.Probe(ctx)
	if s := res.ServingSince; !s.IsZero() && res.Stage >= endpoint.NotReady && (r.servingSince.IsZero() || s.Before(r.servingSince)) {
		r.servingSince = s
	}
	return res
}

// foreignWhy is what the agent reports while the endpoint presents a
// certificate from another CA. That is not a reason to stop for good:
// anyone who answers on the endpoint's address can present one. The agent
// never joins it (kubeadm's discovery pins the CA) and keeps probing, the
// n-th time after a backoff capped at Timing.BackoffMax.
func (r *run) foreignWhy(res endpoint.Result, n int) string {
	return fmt.Sprintf("THE ENDPOINT SERVES ANOTHER CLUSTER: %s presents a certificate not under the pinned CA %s (%v); not joining it, probe %d, probing again with a backoff up to %s: check where the load balancer or the virtual IP routes, look for a stranger answering on that address, or rebuild the image from this cluster's secrets",
		r.nc.Cluster.ControlPlaneEndpoint, r.nc.Cluster.CACertHash, res.Err, n, r.Timing.BackoffMax)
}

// joinStep is the control-plane and worker roles' step.
func (r *run) joinStep(ctx context.Context) error {
	return r.joinCluster(ctx, r.resumed)
}

// joinCluster waits for the endpoint to serve the cluster, then runs
// kubeadm join until it succeeds or fails for good.
func (r *run) joinCluster(ctx context.Context, resetFirst bool) error {
	if err := r.waitServing(ctx); err != nil {
		return err
	}
	return r.retry(ctx, "kubeadm join", resetFirst, func(ctx context.Context) error {
		_, err := r.command(ctx, "kubeadm", "join", "--config", r.nc.Kubeadm.JoinConfig)
		return err
	})
}

// waitServing waits until the endpoint accepts TCP, speaks TLS with a
// certificate under the pinned CA, and answers /readyz or /version.
func (r *run) waitServing(ctx context.Context) error {
	foreign := 0
	return r.waitFor(ctx, r.nc.Cluster.ControlPlaneEndpoint+" to serve the cluster", func() (bool, string, time.Duration) {
		res := r.probe(ctx)
		if res.Stage != endpoint.Foreign {
			foreign = 0
			return res.Stage == endpoint.Serving, fmt.Sprintf("%s: %v", res.Stage, res.Err), 0
		}
		foreign++
		return false, r.foreignWhy(res, foreign), r.Timing.Backoff(foreign, r.Jitter)
	})
}

// retry runs a kubeadm attempt until it succeeds, with kubeadm reset -f and
// an exponential, jittered backoff between attempts. Permanent failures
// stop it at once; CertificatesMissing stops it when it persists or when
// the upload must have expired.
func (r *run) retry(ctx context.Context, what string, resetFirst bool, attempt func(context.Context) error) error {
	var (
		lastClass kubeadm.Class
		repeats   int
	)
	for n := 1; ; n++ {
		if n > 1 || resetFirst {
			if err := r.reset(ctx); err != nil {
				return err
			}
		}
		r.status.Attempt = n
		r.publish(StateRunning)
		err := attempt(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return err
		}
		var ce *CommandError
		if !errors.As(err, &ce) {
			return err
		}
		class := kubeadm.Classify(ce.Full)
		if class == lastClass {
			repeats++
		} else {
			lastClass, repeats = class, 1
		}
		if class.Permanent() || r.gaveUp(class, repeats) {
			return &PermanentError{Advice: class.Advice(), Err: err}
		}
		if class != kubeadm.Transient {
			// Say what it means, loudly for what the endpoint can forge.
			err = fmt.Errorf("%s: %w", class.Advice(), err)
		}
		if n >= maxAttempts {
			return fmt.Errorf("%s failed %d times; the last failure: %w", what, n, err)
		}
		delay := r.Timing.Backoff(n, r.Jitter)
		r.status.LastError = err.Error()
		r.publish(StateRetrying)
		r.log.printf("%s attempt %d failed (%s); retrying in %s", what, n, class.Advice(), delay.Round(1e6))
		if err := r.Clock.Sleep(ctx, delay); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
	}
}

// gaveUp decides whether a repeated CertificatesMissing is final: kubeadm
// reads the kubeadm-certs Secret from the API server it verified, so
// unlike the Unauthenticated classes it is the cluster's own word.
func (r *run) gaveUp(class kubeadm.Class, repeats int) bool {
	if class != kubeadm.CertificatesMissing {
		return false
	}
	origin, _ := r.clusterOrigin()
	return repeats >= repeatLimit || (!origin.IsZero() && r.Clock.Now().After(r.certificatesGone(origin)))
}

// reset undoes a half-done kubeadm init or join.
func (r *run) reset(ctx context.Context) error {
	r.forgetEtcdMember(ctx)
	if _, err := r.command(ctx, "kubeadm", "reset", "-f"); err != nil {
		return err
	}
	// kubeadm reset empties the static pod folder: the load balancer's
	// pods go back before the next attempt needs the endpoint.
	return r.placeLoadBalancer(ctx)
}

// placePKI copies the pre-made cluster PKI into kubeadm's certificates
// directory, keeping files already there when they are this cluster's
// (kubeadm reuses an existing CA and creates only what is missing).
// Every file is checked before any is written, so a certificate and its
// key are placed together or not at all. Private keys are written 0600.
func (r *run) placePKI() error {
	src, dst := r.nc.PKIDir, r.nc.Kubeadm.CertificatesDir
	var missing []string
	var check func(rel string) error
	check = func(rel string) error {
		entries, err := r.FS.ReadDir(path.Join(src, rel))
		if err != nil {
			return fmt.Errorf("place PKI: %w", err)
		}
		for _, e := range entries {
			name := path.Join(rel, e.Name())
			if e.IsDir() {
				if err := check(name); err != nil {
					return err
				}
				continue
			}
			have, err := r.FS.ReadFile(path.Join(dst, name))
			switch {
			case errors.Is(err, fs.ErrNotExist):
				missing = append(missing, name)
				continue
			case err != nil:
				return fmt.Errorf("place PKI: %w", err)
			}
			want, err := r.FS.ReadFile(path.Join(src, name))
			if err != nil {
				return fmt.Errorf("place PKI: %w", err)
			}
			if err := r.checkPlaced(name, have, want); err != nil {
				return err
			}
		}
		return nil
	}
	if err := check(""); err != nil {
		return err
	}
	for _, name := range missing {
		data, err := r.FS.ReadFile(path.Join(src, name))
		if err != nil {
			return fmt.Errorf("place PKI: %w", err)
		}
		if err := r.FS.MkdirAll(path.Join(dst, path.Dir(name)), 0o700); err != nil {
			return fmt.Errorf("place PKI: %w", err)
		}
		mode := fs.FileMode(0o644)
		if path.Ext(name) == ".key" {
			mode = 0o600
		}
		if err := r.FS.Replace(path.Join(dst, name), data, mode); err != nil {
			return fmt.Errorf("place PKI: %w", err)
		}
		r.log.printf("placed %s", path.Join(dst, name))
	}
	return nil
}

// checkPlaced checks a pre-made PKI file already in the certificates
// directory, which kubeadm would use as it is: ca.crt must be the pinned
// CA, and any other file the one this image carries, so that no
// certificate is kept beside a key from another cluster. A leftover from
// another cluster makes every join fail later with a CA mismatch, so the
// agent stops.
func (r *run) checkPlaced(name string, have, want []byte) error {
	if bytes.Equal(have, want) {
		return nil
	}
	target := path.Join(r.nc.Kubeadm.CertificatesDir, name)
	err := errors.New("its content differs")
	if name == "ca.crt" {
		ca, perr := nodeconfig.ParseCACertificate(string(have))
		switch {
		case perr != nil:
			err = perr
		case nodeconfig.CACertHash(ca) == r.nc.Cluster.CACertHash:
			return nil
		default:
			err = fmt.Errorf("its CA hash is %s, cluster.caCertHash is %s", nodeconfig.CACertHash(ca), r.nc.Cluster.CACertHash)
		}
	}
	return &PermanentError{
		Advice: fmt.Sprintf("%s is already there and differs from this cluster's %s: kubeadm would use it instead; if it is left from another cluster, empty %s (or run `kubeadm reset -f`) and restart kiln-firstboot", target, path.Join(r.nc.PKIDir, name), r.nc.Kubeadm.CertificatesDir),
		Err:    err,
	}
}
