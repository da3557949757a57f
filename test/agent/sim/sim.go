// Package sim is a simulated Kubernetes cluster for the agent's black-box
// tests: the state that kubeadm and kubectl stubs on many simulated nodes
// share, and the load balancer in front of it.
//
// The stubs call it over plain HTTP (Call); the agents see only the load
// balancer, a TLS endpoint that serves a certificate signed by whatever CA
// the init node's kubeadm init found in its certificates directory, from
// the moment of that init.
package sim

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kilnproject/kiln/test/testport"
)

// Env names the stubs read.
const (
	EnvURL   = "KILN_SIM_URL"
	EnvScale = "KILN_FIRSTBOOT_TIME_SCALE"
	EnvRoot  = "KILN_FIRSTBOOT_ROOT"
)

// Member is a node as the cluster sees it.
type Member struct {
	ControlPlane bool
	// Joined is false while a join is under way.
	Joined bool
	// EtcdID and PeerURL are a control plane's etcd member, from the
	// moment its kubeadm join added it.
	EtcdID  uint64
	PeerURL string
}

// Cluster is the shared state.
type Cluster struct {
	mu    sync.Mutex
	scale float64
	rpc   *httptest.Server
	lb    net.Listener
	addr  string
	lbUp  bool

	inits       []string
	caPEM       []byte
	serving     *tls.Certificate
	tokenID     string
	tokenSecret string
	tokenExpiry time.Time
	certKey     string
	certsExpiry time.Time
	members     map[string]*Member
	etcdBusy    string
	etcd        *etcd
	applied     []string
	// SlowJoin makes a node's kubeadm join hold in the middle for this
	// long (a window to SIGKILL it in).
	slowJoin map[string]time.Duration
	events   []string
}

// New starts the RPC server; the load balancer's address is reserved but it
// answers only after StartLB.
func New(scale float64) (*Cluster, error) {
	c := &Cluster{scale: scale, members: map[string]*Member{}, slowJoin: map[string]time.Duration{}}
	c.rpc = httptest.NewServer(http.HandlerFunc(c.serveRPC))
	addr, err := testport.Unassigned("127.0.0.1")
	if err != nil {
		return nil, err
	}
	c.addr = addr
	if err := c.startEtcd(); err != nil {
		c.rpc.Close()
		return nil, err
	}
	return c, nil
}

// URL is the RPC address for the stubs.
func (c *Cluster) URL() string { return c.rpc.URL }

// Endpoint is the load balancer's host:port.
func (c *Cluster) Endpoint() string { return c.addr }

// SlowJoin makes node's joins pause mid-way for d.
func (c *Cluster) SlowJoin(node string, d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.slowJoin[node] = d
}

// StartLB opens the load balancer. Before any init it has no backends: it
// accepts connections and closes them.
func (c *Cluster) StartLB() error {
	l, err := net.Listen("tcp", c.addr)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.lb, c.lbUp = l, true
	c.mu.Unlock()
	go c.serveLB(l)
	return nil
}

// Close stops everything.
func (c *Cluster) Close() {
	c.rpc.Close()
	c.etcd.srv.Close()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.lb != nil {
		c.lb.Close()
	}
}

func (c *Cluster) serveLB(l net.Listener) {
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/readyz":
			fmt.Fprint(w, "ok")
		case "/version":
			fmt.Fprint(w, `{"major":"1","minor":"37","gitVersion":"v1.37.2"}`)
		default:
			http.Error(w, `{"kind":"Status","code":403}`, http.StatusForbidden)
		}
	})}
	for {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		c.mu.Lock()
		cert := c.serving
		c.mu.Unlock()
		if cert == nil {
			conn.Close()
			continue
		}
		tc := tls.Server(conn, &tls.Config{Certificates: []tls.Certificate{*cert}})
		go hs.Serve(&oneConn{conn: tc, done: make(chan struct{})})
	}
}

// oneConn is a listener that yields a single connection.
type oneConn struct {
	conn net.Conn
	once sync.Once
	done chan struct{}
}

func (o *oneConn) Accept() (net.Conn, error) {
	var c net.Conn
	o.once.Do(func() { c = &closeNotify{Conn: o.conn, done: o.done} })
	if c != nil {
		return c, nil
	}
	<-o.done
	return nil, net.ErrClosed
}
func (o *oneConn) Close() error   { return nil }
func (o *oneConn) Addr() net.Addr { return o.conn.LocalAddr() }

type closeNotify struct {
	net.Conn
	done chan struct{}
	once sync.Once
}

func (c *closeNotify) Close() error {
	c.once.Do(func() { close(c.done) })
	return c.Conn.Close()
}

// Snapshot is the cluster state tests assert on.
type Snapshot struct {
	Inits   []string
	Members map[string]Member
	Applied []string
	Events  []string
}

// Snapshot copies the state.
func (c *Cluster) Snapshot() Snapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := Snapshot{Inits: append([]string(nil), c.inits...), Members: map[string]Member{}, Applied: append([]string(nil), c.applied...), Events: append([]string(nil), c.events...)}
	for n, m := range c.members {
		s.Members[n] = *m
	}
	return s
}

// Request is every RPC's input; fields are used per operation.
type Request struct {
	Node         string
	CACert       []byte
	CAKey        []byte
	TokenID      string
	TokenSecret  string
	TokenTTL     time.Duration
	CertKey      string
	UploadCerts  bool
	ControlPlane bool
	Files        []string
	// Bootstrapped (reset) says the node's kubelet had bootstrapped: its
	// kubelet.conf was there.
	Bootstrapped bool
}

// Reply is every RPC's output.
type Reply struct {
	Error        string
	CACert       []byte
	TokenSigned  bool
	TokenValid   bool
	Hold         time.Duration
	NodeListJSON string
	// A control plane's etcd member (init, join-start): its peer URL,
	// every member's (the manifest's --initial-cluster), etcd's CA and an
	// apiserver-etcd-client certificate, PEM.
	EtcdPeerURL        string
	EtcdInitialCluster string
	EtcdCA             []byte
	EtcdClientCert     []byte
	EtcdClientKey      []byte
}

// Call performs one RPC from a stub.
func Call(op string, req Request) (Reply, error) {
	var rep Reply
	body, _ := json.Marshal(req)
	resp, err := http.Post(os.Getenv(EnvURL)+"/"+op, "application/json", bytes.NewReader(body))
	if err != nil {
		return rep, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		return rep, err
	}
	if rep.Error != "" {
		return rep, errors.New(rep.Error)
	}
	return rep, nil
}

func (c *Cluster) serveRPC(w http.ResponseWriter, r *http.Request) {
	var req Request
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	c.mu.Lock()
	rep, err := c.handle(strings.TrimPrefix(r.URL.Path, "/"), req)
	c.mu.Unlock()
	if err != nil {
		rep.Error = err.Error()
	}
	json.NewEncoder(w).Encode(rep)
}

// connRefused is what clients of the load balancer see while it is down.
func (c *Cluster) connRefused() error {
	return fmt.Errorf("The connection to the server %s was refused - did you specify the right host or port?", c.addr)
}

func (c *Cluster) handle(op string, req Request) (Reply, error) {
	now := time.Now()
	c.events = append(c.events, op+" "+req.Node)
	switch op {
	case "init":
		c.inits = append(c.inits, req.Node)
		cert, err := servingCert(req.CACert, req.CAKey, c.addr)
		if err != nil {
			return Reply{}, err
		}
		c.caPEM, c.serving = req.CACert, cert
		c.tokenID, c.tokenSecret = req.TokenID, req.TokenSecret
		c.tokenExpiry = time.Time{}
		if req.TokenTTL > 0 {
			c.tokenExpiry = now.Add(req.TokenTTL)
		}
		c.members = map[string]*Member{req.Node: {ControlPlane: true, Joined: true}}
		c.addMember(c.members[req.Node])
		c.certKey, c.certsExpiry = "", time.Time{}
		if req.UploadCerts {
			c.certKey, c.certsExpiry = req.CertKey, now.Add(c.certsTTL())
		}
		return c.etcdFiles(req.Node), nil
	case "upload-certs":
		if !c.lbUp {
			return Reply{}, c.connRefused()
		}
		c.certKey, c.certsExpiry = req.CertKey, now.Add(c.certsTTL())
		return Reply{}, nil
	case "cluster-info":
		if !c.lbUp || c.serving == nil {
			return Reply{}, c.connRefused()
		}
		signed := req.TokenID == c.tokenID && (c.tokenExpiry.IsZero() || now.Before(c.tokenExpiry))
		return Reply{CACert: c.caPEM, TokenSigned: signed, TokenValid: signed && req.TokenSecret == c.tokenSecret}, nil
	case "download-certs":
		if c.certKey == "" || now.After(c.certsExpiry) {
			return Reply{}, errors.New(`error downloading certs: error downloading the secret: Secret "kubeadm-certs" was not found in the "kube-system" Namespace. This Secret might have expired. Please, run ` + "`kubeadm init phase upload-certs --upload-certs`" + ` on a control plane to generate a new one`)
		}
		if req.CertKey != c.certKey {
			return Reply{}, errors.New("error downloading certs: error decoding secret data with provided key: cipher: message authentication failed")
		}
		return Reply{}, nil
	case "join-start":
		if !req.ControlPlane {
			c.members[req.Node] = &Member{}
			return Reply{Hold: c.slowJoin[req.Node]}, nil
		}
		// kubeadm adds the member (a learner) and writes its manifest. A
		// learner this node's unfinished join left behind has its peer
		// URL: kubeadm keeps it, and the new etcd, with that member's ID
		// and no data, crashes; while it is a learner, no other control
		// plane can add one. (A voter of the same name is a machine
		// replaced at another address here: its peer URL differs.)
		if m, ok := c.members[req.Node]; ok && m.PeerURL != "" && !m.Joined {
			return Reply{}, errors.New("error execution phase control-plane-join/etcd: error creating local etcd static pod manifest file: etcd cluster is not healthy: failed to dial endpoint https://" + c.etcd.host + ":2379 with maintenance client: context deadline exceeded")
		}
		if c.etcdBusy != "" && c.etcdBusy != req.Node {
			return Reply{}, errors.New("error execution phase control-plane-join/etcd: error creating local etcd static pod manifest file: etcdserver: too many learner members in cluster")
		}
		c.etcdBusy = req.Node
		m := &Member{ControlPlane: true}
		c.members[req.Node] = m
		c.addMember(m)
		rep := c.etcdFiles(req.Node)
		rep.Hold = c.slowJoin[req.Node]
		return rep, nil
	case "join-finish":
		m, ok := c.members[req.Node]
		if !ok {
			return Reply{}, errors.New("node was removed during its join")
		}
		m.Joined = true
		if c.etcdBusy == req.Node {
			c.etcdBusy = ""
		}
		return Reply{}, nil
	case "reset":
		// kubeadm reset removes a control plane's etcd member only through
		// the node's kubelet.conf and Node object: before the kubelet has
		// bootstrapped, the member stays (the agent must remove it).
		if m, ok := c.members[req.Node]; ok && m.PeerURL != "" && !req.Bootstrapped {
			c.events = append(c.events, "reset-kept-etcd-member "+req.Node)
			return Reply{}, nil
		}
		delete(c.members, req.Node)
		if c.etcdBusy == req.Node {
			c.etcdBusy = ""
		}
		return Reply{}, nil
	case "apply":
		if !c.lbUp {
			return Reply{}, c.connRefused()
		}
		c.applied = append(c.applied, req.Files...)
		return Reply{}, nil
	case "nodes":
		if !c.lbUp {
			return Reply{}, c.connRefused()
		}
		return Reply{NodeListJSON: c.nodeList()}, nil
	case "delete-certs":
		if !c.lbUp {
			return Reply{}, c.connRefused()
		}
		c.certKey = ""
		return Reply{}, nil
	}
	return Reply{}, fmt.Errorf("sim: unknown operation %q", op)
}

// certsTTL is kubeadm's 2 hour kubeadm-certs lifetime, scaled.
func (c *Cluster) certsTTL() time.Duration { return time.Duration(float64(2*time.Hour) / c.scale) }

func (c *Cluster) nodeList() string {
	type cond struct{ Type, Status string }
	type item struct {
		Metadata struct {
			Name string `json:"name"`
		} `json:"metadata"`
		Status struct {
			Conditions []cond `json:"conditions"`
		} `json:"status"`
	}
	var names []string
	for n, m := range c.members {
		if m.ControlPlane && m.Joined {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	items := []item{}
	for _, n := range names {
		var it item
		it.Metadata.Name = n
		it.Status.Conditions = []cond{{"Ready", "True"}}
		items = append(items, it)
	}
	out, _ := json.Marshal(map[string]any{"kind": "NodeList", "apiVersion": "v1", "items": items})
	return strings.ReplaceAll(strings.ReplaceAll(string(out), `"Type"`, `"type"`), `"Status"`, `"status"`)
}

// servingCert issues the API server certificate for the load balancer's
// address under the cluster CA, as kubeadm init's certs phase does.
func servingCert(caPEM, keyPEM []byte, addr string) (*tls.Certificate, error) {
	pair, err := tls.X509KeyPair(caPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("cluster CA: %w", err)
	}
	ca, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, err
	}
	host, _, _ := net.SplitHostPort(addr)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: time.Now().Add(-time.Second), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP(host)}, DNSNames: []string{"kubernetes"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, pair.PrivateKey)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der, ca.Raw}, PrivateKey: key}, nil
}

// CAHash is kubeadm's pin of a PEM CA certificate.
func CAHash(caPEM []byte) (string, error) {
	block, _ := pem.Decode(caPEM)
	if block == nil {
		return "", errors.New("no PEM block")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

// ServeForeignCA makes the load balancer present a certificate from a CA
// that is not the cluster's (another cluster behind the same address).
func (c *Cluster) ServeForeignCA() error {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other-cluster-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	cert, err := servingCert(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), c.addr)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.serving = cert
	return nil
}

// StopServingForeignCA takes the foreign certificate away again: the
// load balancer then answers nothing, as before the cluster exists.
func (c *Cluster) StopServingForeignCA() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.serving = nil
}

// CertificatesDeleted reports whether the init node deleted the
// kubeadm-certs Secret.
func (c *Cluster) CertificatesDeleted() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.ContainsFunc(c.events, func(e string) bool { return strings.HasPrefix(e, "delete-certs ") })
}

// TokenExpired reports whether the bootstrap token has expired.
func (c *Cluster) TokenExpired() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.tokenExpiry.IsZero() && time.Now().After(c.tokenExpiry)
}
