package endpoint

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(t *testing.T, name string) ca {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return ca{cert, key}
}

func (c ca) serve(t *testing.T, status int) *httptest.Server {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(status) }))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func probe(t *testing.T, c ca, ep string) Result {
	p, err := New(ep, c.cert, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return p.Probe(context.Background())
}

func TestProbe(t *testing.T) {
	cluster, other := newCA(t, "kubernetes"), newCA(t, "other")
	ep := func(s *httptest.Server) string { return strings.TrimPrefix(s.URL, "https://") }

	if r := probe(t, cluster, ep(cluster.serve(t, 200))); r.Stage != Serving || r.ServingSince.IsZero() {
		t.Errorf("own CA: %v %v", r.Stage, r.Err)
	}
	if r := probe(t, cluster, ep(cluster.serve(t, 500))); r.Stage != NotReady {
		t.Errorf("not ready: %v %v", r.Stage, r.Err)
	}
	if r := probe(t, cluster, ep(other.serve(t, 200))); r.Stage != Foreign || !strings.Contains(r.Err.Error(), `issued by "other"`) {
		t.Errorf("foreign CA: %v %v", r.Stage, r.Err)
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	go func() { // a load balancer without backends: accepts, then hangs up
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if r := probe(t, cluster, addr); r.Stage != NoTLS {
		t.Errorf("no backends: %v %v", r.Stage, r.Err)
	}
	l.Close()
	if r := probe(t, cluster, addr); r.Stage != Unreachable {
		t.Errorf("closed: %v %v", r.Stage, r.Err)
	}
}
