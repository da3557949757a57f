// Package endpoint probes the cluster's control-plane endpoint: does it
// accept TCP, does it speak TLS with a certificate under the pinned cluster
// CA, and does the API server answer /readyz or /version.
package endpoint

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// Stage is how far a probe got.
type Stage int

// Probe stages, in order.
const (
	// Unreachable: no TCP connection.
	Unreachable Stage = iota
	// NoTLS: TCP works but no TLS handshake with a valid certificate
	// (a load balancer without backends, a clock out of range).
	NoTLS
	// Foreign: the endpoint presents a certificate from another CA.
	Foreign
	// NotReady: TLS under the cluster CA, but the API server does not
	// answer /readyz or /version yet.
	NotReady
	// Serving: the endpoint serves this cluster.
	Serving
)

func (s Stage) String() string {
	switch s {
	case Unreachable:
		return "unreachable"
	case NoTLS:
		return "no TLS"
	case Foreign:
		return "foreign CA"
	case NotReady:
		return "API server not ready"
	case Serving:
		return "serving this cluster"
	}
	return fmt.Sprintf("stage(%d)", int(s))
}

// Result is one probe's outcome.
type Result struct {
	Stage Stage
	// Err says why the probe stopped before Serving.
	Err error
	// ServingSince is the NotBefore of the server certificate: kubeadm
	// issues it at init (or at a control plane's join), so it bounds when
	// the cluster's token and certificate upload started to age.
	ServingSince time.Time
}

// Prober probes one endpoint against one pinned CA.
type Prober struct {
	endpoint string
	pin      string
	tls      *tls.Config
	timeout  time.Duration
}

// New returns a prober for endpoint (host:port) that trusts only ca.
func New(endpoint string, ca *x509.Certificate, timeout time.Duration) (*Prober, error) {
	host, _, err := net.SplitHostPort(endpoint)
	if err != nil {
		return nil, fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &Prober{
		endpoint: endpoint,
		pin:      nodeconfig.CACertHash(ca),
		tls:      &tls.Config{RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS12},
		timeout:  timeout,
	}, nil
}

// Probe checks the endpoint once.
func (p *Prober) Probe(ctx context.Context) Result {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", p.endpoint)
	if err != nil {
		return Result{Stage: Unreachable, Err: err}
	}
	tc := tls.Client(conn, p.tls)
	err = tc.HandshakeContext(ctx)
	if err != nil {
		conn.Close()
		var unknown x509.UnknownAuthorityError
		if errors.As(err, &unknown) {
			return Result{Stage: Foreign, Err: foreignError(unknown.Cert)}
		}
		return Result{Stage: NoTLS, Err: err}
	}
	state := tc.ConnectionState()
	leaf := state.PeerCertificates[0]
	res := Result{ServingSince: leaf.NotBefore}
	if root := state.VerifiedChains[0][len(state.VerifiedChains[0])-1]; nodeconfig.CACertHash(root) != p.pin {
		tc.Close()
		res.Stage, res.Err = Foreign, fmt.Errorf("server certificate chains to a CA with hash %s, not the pinned %s", nodeconfig.CACertHash(root), p.pin)
		return res
	}
	res.Stage, res.Err = p.ready(ctx, tc)
	return res
}

// ready asks the API server, over the verified connection, for /readyz and
// then /version; either answering 200 means it serves.
func (p *Prober) ready(ctx context.Context, conn *tls.Conn) (Stage, error) {
	used := false
	client := &http.Client{Transport: &http.Transport{
		DialTLSContext: func(context.Context, string, string) (net.Conn, error) {
			if used {
				return nil, errors.New("probe connection already used")
			}
			used = true
			return conn, nil
		},
	}}
	defer client.CloseIdleConnections()
	var lastErr error
	for _, path := range []string{"/readyz", "/version"} {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+p.endpoint+path, nil)
		if err != nil {
			return NotReady, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return NotReady, err
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			return Serving, nil
		}
		lastErr = fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return NotReady, lastErr
}

func foreignError(cert *x509.Certificate) error {
	if cert == nil {
		return errors.New("server certificate is not signed by the cluster CA")
	}
	return fmt.Errorf("server certificate %q is issued by %q, not by the cluster CA", cert.Subject.CommonName, cert.Issuer.CommonName)
}
