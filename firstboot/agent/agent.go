// Package agent is kiln-firstboot: an ordered list of idempotent steps that
// turns a node's role metadata into a member of its cluster. Every side
// effect goes through the interfaces in deps.go.
package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
	"time"

	"github.com/kilnproject/kiln/firstboot/kubeadm"
	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// Exit codes of kiln-firstboot.
const (
	ExitOK = 0
	// ExitRetry: a transient or unexpected failure; systemd restarts the
	// agent.
	ExitRetry = 1
	// ExitBadMetadata: node.yaml or the kubeadm files are missing or wrong.
	ExitBadMetadata = 2
	// ExitPermanent: the cluster refused this node for good (token, CA,
	// certificate key); retrying cannot help.
	ExitPermanent = 3
)

// MetadataError is bad or missing node metadata.
type MetadataError struct{ Err error }

func (e *MetadataError) Error() string { return "bad node metadata: " + e.Err.Error() }
func (e *MetadataError) Unwrap() error { return e.Err }

// PermanentError is a failure retrying cannot fix.
type PermanentError struct {
	// Advice says what went wrong and what to do.
	Advice string
	Err    error
}

func (e *PermanentError) Error() string { return e.Advice + ": " + e.Err.Error() }
func (e *PermanentError) Unwrap() error { return e.Err }

// ExitCode maps an error from Run to the process exit code.
func ExitCode(err error) int {
	var me *MetadataError
	var pe *PermanentError
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &me):
		return ExitBadMetadata
	case errors.As(err, &pe):
		return ExitPermanent
	}
	return ExitRetry
}

// Agent brings one node into its cluster.
type Agent struct {
	Deps
	// ConfigPath is the node metadata file.
	ConfigPath string
	// Log receives progress lines (stderr).
	Log io.Writer
}

// run is one execution of the agent.
type run struct {
	*Agent
	log          *logger
	nc           *nodeconfig.NodeConfig
	join         *kubeadm.Config
	init         *kubeadm.Config // role init only
	state        *State
	status       nodeconfig.Status
	statusWarned bool
	reporter     Reporter
	prober       Prober
	// resumed is set while a recorded step runs again after an earlier
	// run of it was interrupted (power loss, SIGKILL).
	resumed bool
	// servingSince is the oldest API server certificate seen.
	servingSince time.Time
}

// step is one idempotent unit of work. Recorded steps are skipped once the
// state file says they finished; the others (host preparation, waits)
// repeat on every start because a reboot undoes them.
type step struct {
	name   string
	record bool
	do     func(ctx context.Context) error
}

// Run executes the steps for the node's role.
func (a *Agent) Run(ctx context.Context) error {
	r := &run{Agent: a, log: newLogger(a.Log), state: &State{Steps: map[string]StepRecord{}}}
	r.status.Phase = "metadata"
	defer r.closeReporter()
	if err := r.loadNodeConfig(); err != nil {
		err = &MetadataError{Err: err}
		r.fail(err)
		return err
	}
	if _, err := r.FS.Stat(nodeconfig.DoneFile); err == nil {
		r.log.printf("%s exists: this node already joined its cluster", nodeconfig.DoneFile)
		// A power loss may have come between the two.
		if err := r.removeAfterJoin(); err != nil {
			r.fail(err)
			return err
		}
		r.status.Phase = "done"
		r.publish(StateDone)
		return nil
	}
	if err := r.loadKubeadm(); err != nil {
		err = &MetadataError{Err: err}
		r.fail(err)
		return err
	}
	var err error
	if r.state, err = loadState(r.FS); err != nil {
		r.fail(err)
		return err
	}
	r.log.printf("node metadata %s: role %s of cluster %s, endpoint %s", a.ConfigPath, r.nc.Role, r.nc.Cluster.Name, r.nc.Cluster.ControlPlaneEndpoint)
	for _, s := range r.steps() {
		if err := r.runStep(ctx, s); err != nil {
			r.fail(err)
			return err
		}
	}
	if err := r.FS.Replace(nodeconfig.DoneFile, []byte(r.Clock.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		err = fmt.Errorf("write %s: %w", nodeconfig.DoneFile, err)
		r.fail(err)
		return err
	}
	if err := r.removeAfterJoin(); err != nil {
		r.fail(err)
		return err
	}
	r.status.Phase, r.status.LastError, r.status.Attempt = "done", "", 0
	r.publish(StateDone)
	r.log.printf("node %s is a member of cluster %s", r.status.Node, r.nc.Cluster.Name)
	return nil
}

func (r *run) steps() []step {
	host := []step{
		{"clock", false, r.waitClock},
		{"kernel-modules", false, r.loadModules},
		{"sysctls", false, r.setSysctls},
		{"swap", false, r.swapOff},
		{"hostname", false, r.setHostname},
		{"kubeadm-config", false, r.checkKubeadmConfig},
		{"container-runtime", false, r.waitRuntime},
	}
	if r.nc.Images != nil {
		host = append(host, step{"images", false, r.importImages})
	}
	if r.nc.LoadBalancer != nil {
		host = append(host, step{"load-balancer", false, r.placeLoadBalancer})
	}
	switch r.nc.Role {
	case nodeconfig.RoleInit:
		return append(host,
			step{"bootstrap", true, r.bootstrap},
			// kube-vip switches from super-admin.conf to admin.conf.
			step{"load-balancer-kubeconfig", false, r.placeLoadBalancer},
			step{"manifests", true, r.applyManifests},
			step{"certificate-upload", true, r.keepCertificates},
		)
	case nodeconfig.RoleControlPlane, nodeconfig.RoleWorker:
		return append(host, step{"join", true, r.joinStep})
	}
	panic(fmt.Sprintf("role %q passed validation", r.nc.Role))
}

func (r *run) runStep(ctx context.Context, s step) error {
	if s.record && r.state.finished(s.name) {
		r.log.printf("step %s: finished before; skipping", s.name)
		return nil
	}
	r.status.Phase, r.status.Attempt, r.status.LastError, r.status.Waiting = s.name, 0, "", ""
	r.publish(StateRunning)
	r.log.printf("step %s: started", s.name)
	r.resumed = s.record && r.state.interrupted(s.name)
	if s.record {
		rec := r.state.Steps[s.name]
		if rec.Started.IsZero() {
			rec.Started = r.Clock.Now().UTC()
			r.state.Steps[s.name] = rec
		}
		if err := r.state.save(r.FS); err != nil {
			return err
		}
	}
	if err := s.do(ctx); err != nil {
		r.log.printf("step %s: failed: %v", s.name, err)
		return fmt.Errorf("%s: %w", s.name, err)
	}
	if s.record {
		rec := r.state.Steps[s.name]
		rec.Finished = r.Clock.Now().UTC()
		r.state.Steps[s.name] = rec
		if err := r.state.save(r.FS); err != nil {
			return err
		}
	}
	r.log.printf("step %s: finished", s.name)
	return nil
}

// fail records a final failure in the status.
func (r *run) fail(err error) {
	var pe *PermanentError
	r.status.Permanent = errors.As(err, &pe)
	r.status.LastError = err.Error()
	r.publish(StateFailed)
	switch ExitCode(err) {
	case ExitBadMetadata, ExitPermanent:
		r.log.printf("giving up: %v", err)
	default:
		r.log.printf("stopping (systemd restarts the agent): %v", err)
	}
}

// loadNodeConfig reads node.yaml.
func (r *run) loadNodeConfig() error {
	data, err := r.FS.ReadFile(r.ConfigPath)
	if err != nil {
		return fmt.Errorf("read %s: %w", r.ConfigPath, err)
	}
	nc, err := nodeconfig.Decode(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("%s: %w", r.ConfigPath, err)
	}
	r.nc = nc
	r.status.Role, r.status.Cluster = string(nc.Role), nc.Cluster.Name
	if nc.ReportURL != "" && r.NewReporter != nil {
		r.reporter = r.NewReporter(nc.ReportURL)
	}
	return nil
}

// loadKubeadm reads the kubeadm files and checks that they agree with
// node.yaml.
func (r *run) loadKubeadm() error {
	nc := r.nc
	var errs []error
	var err error
	r.join, err = r.readKubeadm(nc.Kubeadm.JoinConfig, kubeadm.ParseJoin)
	if err != nil {
		errs = append(errs, err)
	} else {
		errs = append(errs, r.checkJoin()...)
	}
	if nc.Role == nodeconfig.RoleInit {
		r.init, err = r.readKubeadm(nc.Kubeadm.InitConfig, kubeadm.ParseInit)
		if err != nil {
			errs = append(errs, err)
		} else {
			errs = append(errs, r.checkInit()...)
		}
	}
	for i, m := range nc.Manifests {
		if _, err := r.FS.Stat(m); err != nil {
			errs = append(errs, fmt.Errorf("manifests[%d]: %w", i, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if r.prober, err = r.NewProber(nc); err != nil {
		return fmt.Errorf("cluster.controlPlaneEndpoint: %w", err)
	}
	return nil
}

func (r *run) readKubeadm(file string, parse func([]byte) (*kubeadm.Config, error)) (*kubeadm.Config, error) {
	data, err := r.FS.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	c, err := parse(data)
	if c != nil {
		r.log.hide(c.Secrets...)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return c, nil
}

func (r *run) checkJoin() []error {
	var errs []error
	nc, j, file := r.nc, r.join, r.nc.Kubeadm.JoinConfig
	if !j.PinsCA(nc.Cluster.CACertHash) {
		errs = append(errs, fmt.Errorf("%s: discovery.bootstrapToken.caCertHashes does not pin cluster.caCertHash %s", file, nc.Cluster.CACertHash))
	}
	if j.Endpoint != nc.Cluster.ControlPlaneEndpoint {
		errs = append(errs, fmt.Errorf("%s: discovery.bootstrapToken.apiServerEndpoint %s is not cluster.controlPlaneEndpoint %s", file, j.Endpoint, nc.Cluster.ControlPlaneEndpoint))
	}
	if j.ControlPlane != nc.Role.IsControlPlane() {
		errs = append(errs, fmt.Errorf("%s: controlPlane is set=%t but role %s", file, j.ControlPlane, nc.Role))
	}
	return errs
}

func (r *run) checkInit() []error {
	var errs []error
	nc, c, file := r.nc, r.init, r.nc.Kubeadm.InitConfig
	if c.CertificatesDir != nc.Kubeadm.CertificatesDir {
		errs = append(errs, fmt.Errorf("%s: certificatesDir %s is not kubeadm.certificatesDir %s", file, c.CertificatesDir, nc.Kubeadm.CertificatesDir))
	}
	if c.Endpoint != nc.Cluster.ControlPlaneEndpoint {
		errs = append(errs, fmt.Errorf("%s: controlPlaneEndpoint %s is not cluster.controlPlaneEndpoint %s", file, c.Endpoint, nc.Cluster.ControlPlaneEndpoint))
	}
	// Without a valid join file (reported on its own) there is no token
	// to compare.
	if r.join != nil && c.TokenID != r.join.TokenID {
		errs = append(errs, fmt.Errorf("%s: the bootstrap token is not the one in %s", file, nc.Kubeadm.JoinConfig))
	}
	if _, err := r.FS.Stat(path.Join(nc.PKIDir, "ca.crt")); err != nil {
		errs = append(errs, fmt.Errorf("pkiDir: %w", err))
	}
	return errs
}

// removeAfterJoin removes what only the bootstrap needed (node.yaml's
// removeAfterJoin: the token, the certificate key, the pre-made CA keys,
// the OS's copy of the first-boot config) and notes each removal in
// nodeconfig.RemovedFile, which it writes last. It runs once DoneFile is
// written, and again on later starts (the unit runs until RemovedFile
// exists) after a power loss or a failed removal.
func (r *run) removeAfterJoin() error {
	var removed []string
	for _, p := range r.nc.RemoveAfterJoin {
		if _, err := r.FS.Stat(p); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err := r.FS.RemoveAll(p); err != nil {
			return fmt.Errorf("remove %s, which holds bootstrap secrets: %w", p, err)
		}
		r.log.printf("removed %s: the node is in its cluster and no longer needs it", p)
		removed = append(removed, r.Clock.Now().UTC().Format(time.RFC3339)+" "+p+"\n")
	}
	// Written last, and also when nothing was left: its existence tells
	// the agent's unit that the agent has nothing more to do.
	old, err := r.FS.ReadFile(nodeconfig.RemovedFile)
	switch {
	case err == nil && len(removed) == 0:
		return nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return err
	}
	return r.FS.Replace(nodeconfig.RemovedFile, append(old, strings.Join(removed, "")...), 0o644)
}
