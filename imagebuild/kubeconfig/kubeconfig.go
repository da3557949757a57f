// Package kubeconfig writes admin kubeconfigs signed by the cluster CA.
package kubeconfig

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/secrets"
)

// AdminGroup is the group kubeadm (since 1.29, so every version kiln
// supports) binds to cluster-admin through the ClusterRoleBinding
// kubeadm:cluster-admins that kubeadm init creates.
const AdminGroup = "kubeadm:cluster-admins"

// Options for an admin kubeconfig.
type Options struct {
	// User is the certificate's common name (kubeadm's is kubernetes-admin).
	User     string
	Validity time.Duration
	Now      time.Time
	Rand     io.Reader
}

type (
	config struct {
		APIVersion     string         `yaml:"apiVersion"`
		Kind           string         `yaml:"kind"`
		Clusters       []namedCluster `yaml:"clusters"`
		Contexts       []namedContext `yaml:"contexts"`
		CurrentContext string         `yaml:"current-context"`
		Users          []namedUser    `yaml:"users"`
	}
	namedCluster struct {
		Name    string `yaml:"name"`
		Cluster struct {
			Server string `yaml:"server"`
			CAData string `yaml:"certificate-authority-data"`
		} `yaml:"cluster"`
	}
	namedContext struct {
		Name    string `yaml:"name"`
		Context struct {
			Cluster string `yaml:"cluster"`
			User    string `yaml:"user"`
		} `yaml:"context"`
	}
	namedUser struct {
		Name string `yaml:"name"`
		User struct {
			CertData string `yaml:"client-certificate-data"`
			KeyData  string `yaml:"client-key-data"`
		} `yaml:"user"`
	}
)

// Admin returns a kubeconfig for the cluster's endpoint with a client
// certificate in AdminGroup, signed by the cluster CA.
func Admin(c *cluster.Cluster, s *secrets.Secrets, o Options) ([]byte, error) {
	caKey, err := s.CAKeySigner()
	if err != nil {
		return nil, fmt.Errorf("load CA key: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), o.Rand)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(o.Rand, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	notAfter := o.Now.Add(o.Validity)
	if ca := s.CA(); notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: o.User, Organization: []string{AdminGroup}},
		NotBefore:    o.Now.Add(-5 * time.Minute).UTC().Truncate(time.Second),
		NotAfter:     notAfter.UTC().Truncate(time.Second),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(o.Rand, tmpl, s.CA(), &key.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("sign client certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}

	ctx := o.User + "@" + c.Name
	var cfg config
	cfg.APIVersion, cfg.Kind, cfg.CurrentContext = "v1", "Config", ctx
	cfg.Clusters = make([]namedCluster, 1)
	cfg.Clusters[0].Name = c.Name
	cfg.Clusters[0].Cluster.Server = "https://" + c.ControlPlaneEndpoint
	cfg.Clusters[0].Cluster.CAData = b64(s.PKI[secrets.CACert])
	cfg.Contexts = make([]namedContext, 1)
	cfg.Contexts[0].Name = ctx
	cfg.Contexts[0].Context.Cluster, cfg.Contexts[0].Context.User = c.Name, o.User
	cfg.Users = make([]namedUser, 1)
	cfg.Users[0].Name = o.User
	cfg.Users[0].User.CertData = b64(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	cfg.Users[0].User.KeyData = b64(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))

	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(cfg); err != nil {
		return nil, err
	}
	return buf.Bytes(), enc.Close()
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
