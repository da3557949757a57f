package sim

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"time"
)

// etcd is the cluster's etcd as a joining control plane's agent meets it:
// etcd's v3 JSON gateway (POST /v3/cluster/member/list and
// /v3/cluster/member/remove) over TLS that wants a client certificate from
// etcd's CA. Every member's client URL is the same (host:2379, since
// kubeadm's client port is fixed); members differ by peer port.
type etcd struct {
	srv             *httptest.Server
	host            string
	caPEM           []byte
	certPEM, keyPEM []byte // apiserver-etcd-client
	nextID          uint64
}

// etcdClientPort is kubeadm's etcd client port.
const etcdClientPort = 2379

// startEtcd listens on a random loopback address (127.x.y.z, port 2379).
func (c *Cluster) startEtcd() error {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "etcd-ca"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(cn string, usage x509.ExtKeyUsage, ip net.IP) (certPEM, keyPEM []byte, err error) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature,
		}
		if ip != nil {
			tmpl.IPAddresses = []net.IP{ip}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return nil, nil, err
		}
		kder, _ := x509.MarshalECPrivateKey(key)
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
	}
	e := &etcd{caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), nextID: 1}
	if e.certPEM, e.keyPEM, err = issue("kube-apiserver-etcd-client", x509.ExtKeyUsageClientAuth, nil); err != nil {
		return err
	}
	var ln net.Listener
	for range 100 {
		host := fmt.Sprintf("127.%d.%d.%d", 1+mrand.IntN(254), mrand.IntN(256), 1+mrand.IntN(254))
		if ln, err = net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(etcdClientPort))); err == nil {
			e.host = host
			break
		}
	}
	if ln == nil {
		return fmt.Errorf("sim etcd: no free loopback address for port %d: %w", etcdClientPort, err)
	}
	servPEM, servKey, err := issue("etcd", x509.ExtKeyUsageServerAuth, net.ParseIP(e.host))
	if err != nil {
		return err
	}
	serving, err := tls.X509KeyPair(servPEM, servKey)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	e.srv = httptest.NewUnstartedServer(http.HandlerFunc(c.serveEtcd))
	e.srv.Listener.Close()
	e.srv.Listener = ln
	e.srv.TLS = &tls.Config{Certificates: []tls.Certificate{serving}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert}
	e.srv.StartTLS()
	c.etcd = e
	return nil
}

// addMember gives m an etcd member ID and peer URL.
func (c *Cluster) addMember(m *Member) {
	m.EtcdID = c.etcd.nextID
	m.PeerURL = "https://" + net.JoinHostPort(c.etcd.host, strconv.FormatUint(24000+m.EtcdID, 10))
	c.etcd.nextID++
}

// etcdFiles is what kubeadm writes for a control plane's etcd member: the
// peer URLs its manifest names and the certificates beside it.
func (c *Cluster) etcdFiles(node string) Reply {
	var initial []string
	for n, m := range c.members {
		if m.PeerURL != "" {
			initial = append(initial, n+"="+m.PeerURL)
		}
	}
	return Reply{EtcdPeerURL: c.members[node].PeerURL, EtcdInitialCluster: strings.Join(initial, ","),
		EtcdCA: c.etcd.caPEM, EtcdClientCert: c.etcd.certPEM, EtcdClientKey: c.etcd.keyPEM}
}

// serveEtcd answers the JSON gateway's member list and remove.
func (c *Cluster) serveEtcd(w http.ResponseWriter, r *http.Request) {
	type member struct {
		ID       string   `json:"ID"`
		Name     string   `json:"name"`
		PeerURLs []string `json:"peerURLs"`
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch r.URL.Path {
	case "/v3/cluster/member/list":
		var list struct {
			Members []member `json:"members"`
		}
		for n, m := range c.members {
			if m.PeerURL != "" {
				list.Members = append(list.Members, member{ID: strconv.FormatUint(m.EtcdID, 10), Name: n, PeerURLs: []string{m.PeerURL}})
			}
		}
		json.NewEncoder(w).Encode(list)
	case "/v3/cluster/member/remove":
		var req struct{ ID string }
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		for n, m := range c.members {
			if strconv.FormatUint(m.EtcdID, 10) == req.ID && m.PeerURL != "" {
				c.events = append(c.events, "etcd-remove "+n)
				delete(c.members, n)
				if c.etcdBusy == n {
					c.etcdBusy = ""
				}
				fmt.Fprint(w, "{}")
				return
			}
		}
		http.Error(w, `{"error":"etcdserver: member not found","code":5}`, http.StatusNotFound)
	default:
		http.NotFound(w, r)
	}
}
