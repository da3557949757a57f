package agent

import (
	"context"
	"io"
	"io/fs"
	"math/rand/v2"
	"time"

	"github.com/kilnproject/kiln/firstboot/endpoint"
	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// Runner runs an external command and returns what it wrote to stdout and
// stderr.
type Runner interface {
	Run(ctx context.Context, name string, args ...string) (stdout, stderr []byte, err error)
}

// FS is the node's filesystem. Names are absolute paths on the node; tests
// relocate them under a directory.
type FS interface {
	ReadFile(name string) ([]byte, error)
	// Open opens a file for streaming (large files).
	Open(name string) (io.ReadCloser, error)
	// WriteFile overwrites an existing file in place, as /proc/sys files
	// are written; it never creates one.
	WriteFile(name string, data []byte) error
	// Replace writes atomically and durably (state that must survive a
	// power loss).
	Replace(name string, data []byte, perm fs.FileMode) error
	MkdirAll(name string, perm fs.FileMode) error
	// RemoveAll removes a file, or a folder and all it holds, durably; a
	// missing one is no error.
	RemoveAll(name string) error
	Stat(name string) (fs.FileInfo, error)
	ReadDir(name string) ([]fs.DirEntry, error)
}

// Clock tells and waits for time. Every wait in the agent goes through it.
type Clock interface {
	Now() time.Time
	// Sleep waits for d; it returns early with ctx's error.
	Sleep(ctx context.Context, d time.Duration) error
}

// Prober checks the control-plane endpoint once.
type Prober interface {
	Probe(ctx context.Context) endpoint.Result
}

// Reporter sends status documents somewhere; Report must not block.
type Reporter interface {
	Report(body []byte)
	// Close flushes, waiting at most until ctx ends.
	Close(ctx context.Context)
}

// Deps are the agent's side effects.
type Deps struct {
	FS     FS
	Runner Runner
	Clock  Clock
	// NewProber returns the prober for the node's endpoint and CA.
	NewProber func(nc *nodeconfig.NodeConfig) (Prober, error)
	// NewReporter returns the reporter for a report URL.
	NewReporter func(url string) Reporter
	// DialSocket connects to a unix socket on the node and hangs up: it
	// tells whether a server accepts connections there.
	DialSocket func(ctx context.Context, name string) error
	// Etcd removes a control plane's own etcd member left by an unfinished
	// join (see forgetEtcdMember); nil skips that.
	Etcd EtcdMembers
	// FirstMAC returns the MAC address hostname templates use.
	FirstMAC func() (string, error)
	// Interfaces lists the node's network interfaces with their address
	// prefixes (the virtual IP's interface is found among them).
	Interfaces func() ([]Interface, error)
	// Jitter returns a random duration in [0, max).
	Jitter func(max time.Duration) time.Duration
	Timing Timing
}

// Timing holds the agent's intervals. Tests shrink them with Scaled.
type Timing struct {
	// Poll is the interval of the clock, socket and endpoint waits.
	Poll time.Duration
	// BackoffBase and BackoffMax bound the retry delays.
	BackoffBase, BackoffMax time.Duration
	// UploadEvery is how often the init node re-uploads the control-plane
	// certificates; kubeadm deletes them after 2 hours.
	UploadEvery time.Duration
	// ReadyPoll is how often the init node counts Ready control planes.
	ReadyPoll time.Duration
	// CommandTimeout bounds one kubeadm or kubectl run.
	CommandTimeout time.Duration
	// CertificatesTTL is how long kubeadm keeps the kubeadm-certs Secret.
	CertificatesTTL time.Duration
	// Settle is how long the init node keeps probing an endpoint that
	// does not answer (no TCP, no TLS) before it creates the cluster: a
	// node re-imaged into a running cluster may boot before its network
	// or the load balancer is up. Name resolution failures do not count
	// towards it.
	Settle time.Duration
	// EtcdQuorum is how long a control plane keeps trying to remove its
	// own etcd member from a cluster without quorum before it resets (see
	// forgetEtcdMember).
	EtcdQuorum time.Duration
}

// DefaultTiming is the timing on a real node.
func DefaultTiming() Timing {
	return Timing{
		Poll:            2 * time.Second,
		BackoffBase:     10 * time.Second,
		BackoffMax:      5 * time.Minute,
		UploadEvery:     time.Hour,
		ReadyPoll:       30 * time.Second,
		CommandTimeout:  20 * time.Minute,
		CertificatesTTL: 2 * time.Hour,
		Settle:          time.Minute,
		EtcdQuorum:      5 * time.Minute,
	}
}

// Scaled divides every interval by f (tests run a day in seconds).
func (t Timing) Scaled(f float64) Timing {
	s := func(d time.Duration) time.Duration { return time.Duration(float64(d) / f) }
	return Timing{
		Poll:            s(t.Poll),
		BackoffBase:     s(t.BackoffBase),
		BackoffMax:      s(t.BackoffMax),
		UploadEvery:     s(t.UploadEvery),
		ReadyPoll:       s(t.ReadyPoll),
		CommandTimeout:  s(t.CommandTimeout),
		CertificatesTTL: s(t.CertificatesTTL),
		Settle:          s(t.Settle),
		EtcdQuorum:      s(t.EtcdQuorum),
	}
}

// Backoff is the delay before retry n (n >= 1): exponential from
// BackoffBase, capped at BackoffMax, with the upper half jittered so that
// nodes booted together spread out.
func (t Timing) Backoff(n int, jitter func(time.Duration) time.Duration) time.Duration {
	d := t.BackoffBase
	for i := 1; i < n && d < t.BackoffMax; i++ {
		d *= 2
	}
	d = min(d, t.BackoffMax)
	return d/2 + jitter(d/2+1)
}

// RandomJitter is the real Jitter.
func RandomJitter(max time.Duration) time.Duration { return rand.N(max) }
