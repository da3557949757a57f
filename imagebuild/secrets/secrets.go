// Package secrets generates, stores and loads a cluster's secrets: the three
// CAs kubeadm uses, the service-account key pair, the bootstrap token and
// the certificate key. On disk they live in one folder (mode 0700, files
// 0600) laid out like kubeadm's certificatesDir under pki/.
package secrets

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/fault"
)

// CAValidity is how long generated CAs are valid (kubeadm's default).
const CAValidity = 10 * 365 * 24 * time.Hour

// Files in the secrets folder.
const (
	TokenFile          = "token"
	CertificateKeyFile = "certificate-key"
	pkiDir             = "pki"
)

// PKI file names, relative to kubeadm's certificatesDir.
const (
	CACert           = "ca.crt"
	CAKey            = "ca.key"
	FrontProxyCACert = "front-proxy-ca.crt"
	FrontProxyCAKey  = "front-proxy-ca.key"
	EtcdCACert       = "etcd/ca.crt"
	EtcdCAKey        = "etcd/ca.key"
	SAKey            = "sa.key"
	SAPub            = "sa.pub"
)

// PKIFiles lists the PKI files in a stable order.
var PKIFiles = []string{CACert, CAKey, FrontProxyCACert, FrontProxyCAKey, EtcdCACert, EtcdCAKey, SAKey, SAPub}

var (
	tokenRe   = regexp.MustCompile(`^[a-z0-9]{6}\.[a-z0-9]{16}$`)
	certKeyRe = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// Secrets are a cluster's secrets.
type Secrets struct {
	// PKI maps a file name from PKIFiles to its PEM content.
	PKI map[string][]byte
	// Token is the kubeadm bootstrap token, [a-z0-9]{6}.[a-z0-9]{16}.
	Token string
	// CertificateKey encrypts the control-plane certificates kubeadm
	// uploads: 32 random bytes, hex.
	CertificateKey string

	ca *x509.Certificate
}

// CA returns the parsed cluster CA certificate.
func (s *Secrets) CA() *x509.Certificate { return s.ca }

// CAKeySigner returns the cluster CA's private key.
func (s *Secrets) CAKeySigner() (crypto.Signer, error) {
	return parseKey(s.PKI[CAKey])
}

// CACertHash returns the kubeadm pin of the cluster CA.
func (s *Secrets) CACertHash() string { return nodeconfig.CACertHash(s.ca) }

// TokenID is the public half of the bootstrap token.
func (s *Secrets) TokenID() string { return s.Token[:6] }

// Generate makes a fresh set of secrets for the named cluster.
func Generate(cluster string, now time.Time, rnd io.Reader) (*Secrets, error) {
	s := &Secrets{PKI: map[string][]byte{}}
	for _, ca := range []struct{ cert, key, cn string }{
		{CACert, CAKey, "kubernetes"},
		{FrontProxyCACert, FrontProxyCAKey, "front-proxy-ca"},
		{EtcdCACert, EtcdCAKey, "etcd-ca"},
	} {
		certPEM, keyPEM, err := newCA(ca.cn, cluster, now, rnd)
		if err != nil {
			return nil, fmt.Errorf("generate %s: %w", ca.cert, err)
		}
		s.PKI[ca.cert], s.PKI[ca.key] = certPEM, keyPEM
	}
	sa, err := rsa.GenerateKey(rnd, 2048)
	if err != nil {
		return nil, fmt.Errorf("generate service-account key: %w", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		return nil, err
	}
	s.PKI[SAKey] = pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(sa)})
	s.PKI[SAPub] = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})

	if s.Token, err = NewToken(rnd); err != nil {
		return nil, err
	}
	key := make([]byte, 32)
	if _, err := io.ReadFull(rnd, key); err != nil {
		return nil, fmt.Errorf("generate certificate key: %w", err)
	}
	s.CertificateKey = hex.EncodeToString(key)
	return s, s.check()
}

// NewToken returns a random bootstrap token.
func NewToken(rnd io.Reader) (string, error) {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 23)
	for i := range b {
		if i == 6 {
			b[i] = '.'
			continue
		}
		n, err := rand.Int(rnd, big.NewInt(int64(len(alphabet))))
		if err != nil {
			return "", fmt.Errorf("generate token: %w", err)
		}
		b[i] = alphabet[n.Int64()]
	}
	return string(b), nil
}

func newCA(cn, cluster string, now time.Time, rnd io.Reader) (certPEM, keyPEM []byte, err error) {
	key, err := rsa.GenerateKey(rnd, 2048)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rnd, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn, OrganizationalUnit: []string{"kiln cluster " + cluster}},
		NotBefore:             now.Add(-5 * time.Minute).UTC().Truncate(time.Second),
		NotAfter:              now.Add(CAValidity).UTC().Truncate(time.Second),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rnd, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), nil
}

// check validates the secrets: every file present, each CA a CA matching
// its key, the token and certificate key well formed.
func (s *Secrets) check() error {
	var errs []error
	for _, pair := range [][2]string{{CACert, CAKey}, {FrontProxyCACert, FrontProxyCAKey}, {EtcdCACert, EtcdCAKey}} {
		cert, err := checkPair(s.PKI[pair[0]], s.PKI[pair[1]])
		if err != nil {
			errs = append(errs, fmt.Errorf("%s/%s: %w", pkiDir, pair[0], err))
			continue
		}
		if pair[0] == CACert {
			s.ca = cert
		}
	}
	if err := checkSA(s.PKI[SAKey], s.PKI[SAPub]); err != nil {
		errs = append(errs, fmt.Errorf("%s/%s: %w", pkiDir, SAKey, err))
	}
	if !tokenRe.MatchString(s.Token) {
		errs = append(errs, fmt.Errorf("%s: not a bootstrap token ([a-z0-9]{6}.[a-z0-9]{16})", TokenFile))
	}
	if !certKeyRe.MatchString(s.CertificateKey) {
		errs = append(errs, fmt.Errorf("%s: not 64 lowercase hex digits (32 bytes)", CertificateKeyFile))
	}
	if err := errors.Join(errs...); err != nil {
		return fault.Wrap(fault.Input, err)
	}
	return nil
}

func checkPair(certPEM, keyPEM []byte) (*x509.Certificate, error) {
	if certPEM == nil || keyPEM == nil {
		return nil, errors.New("missing certificate or key")
	}
	cert, err := nodeconfig.ParseCACertificate(string(certPEM))
	if err != nil {
		return nil, err
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, err
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return nil, errors.New("the key does not belong to the certificate")
	}
	return cert, nil
}

func checkSA(keyPEM, pubPEM []byte) error {
	key, err := parseKey(keyPEM)
	if err != nil {
		return err
	}
	block, _ := pem.Decode(pubPEM)
	if block == nil {
		return fmt.Errorf("%s: not PEM", SAPub)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return fmt.Errorf("%s: %w", SAPub, err)
	}
	if !publicKeysEqual(pub, key.Public()) {
		return fmt.Errorf("%s does not belong to %s", SAPub, SAKey)
	}
	return nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}

func parseKey(keyPEM []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, errors.New("key is not PEM")
	}
	var (
		k   any
		err error
	)
	switch block.Type {
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(block.Bytes)
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("unsupported key block %q", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse key: %w", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("key cannot sign")
	}
	return signer, nil
}

// Exists reports whether dir already holds secrets.
func Exists(dir string) bool {
	_, err := os.Stat(dir)
	return err == nil
}

// Write stores the secrets in dir. The folder is written beside dir and
// renamed into place, so dir is never half-written. An existing dir is
// replaced only if force is set.
func (s *Secrets) Write(dir string, force bool) error {
	if Exists(dir) && !force {
		return fault.Wrap(fault.Input, fmt.Errorf("%s already exists: kiln will not replace a cluster's secrets (nodes built from them would no longer join); pass --force to replace them", dir))
	}
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	tmp, err := os.MkdirTemp(parent, ".secrets-*")
	if err != nil {
		return fault.Wrap(fault.IO, fmt.Errorf("write secrets: %w", err))
	}
	defer os.RemoveAll(tmp)
	files := map[string][]byte{
		TokenFile:          []byte(s.Token + "\n"),
		CertificateKeyFile: []byte(s.CertificateKey + "\n"),
	}
	for name, data := range s.PKI {
		files[filepath.Join(pkiDir, name)] = data
	}
	for name, data := range files {
		p := filepath.Join(tmp, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			return fault.Wrap(fault.IO, err)
		}
		if err := atomicfile.Write(p, data, 0o600, false); err != nil {
			return fmt.Errorf("write secrets: %w", err)
		}
	}
	if err := os.Chmod(tmp, 0o700); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if err := atomicfile.ReplaceDir(tmp, dir); err != nil {
		return fmt.Errorf("write secrets: %w", err)
	}
	return nil
}

// maxFile bounds a secret file, in bytes: the largest, an RSA key, is
// about 3 KiB, so a bigger file is the wrong file.
const maxFile = 64 << 10

// Load reads and checks the secrets in dir. It refuses a folder (dir or
// its pki/) or a secret file that other users can read, and a file larger
// than maxFile, each with the fix (fault.Input).
func Load(dir string) (*Secrets, error) {
	for _, d := range []string{dir, filepath.Join(dir, pkiDir)} {
		fi, err := os.Stat(d)
		switch {
		case os.IsNotExist(err) && d == dir:
			return nil, fault.Wrap(fault.Input, fmt.Errorf("no secrets at %s: run `kiln init` first, or pass --secrets", dir))
		case err != nil:
			return nil, fault.Wrap(fault.Input, fmt.Errorf("secrets: %w", err))
		case !fi.IsDir():
			return nil, fault.Wrap(fault.Input, fmt.Errorf("secrets: %s is not a folder: give --secrets the folder kiln init wrote", d))
		case fi.Mode().Perm()&0o077 != 0:
			return nil, fault.Wrap(fault.Input, fmt.Errorf("secrets: the folder %s is mode %04o: other users can reach the cluster's keys; run chmod 700 %s", d, fi.Mode().Perm(), d))
		}
	}
	read := func(name string) ([]byte, error) {
		p := filepath.Join(dir, name)
		f, err := os.Open(p)
		if err != nil {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("secrets: %w", err))
		}
		defer f.Close()
		fi, err := f.Stat()
		switch {
		case err != nil:
			return nil, fault.Wrap(fault.IO, fmt.Errorf("secrets: %w", err))
		case !fi.Mode().IsRegular():
			return nil, fault.Wrap(fault.Input, fmt.Errorf("secrets: %s is not a regular file", p))
		case fi.Mode().Perm()&0o077 != 0:
			return nil, fault.Wrap(fault.Input, fmt.Errorf("secrets: %s is mode %04o: others can read it; run chmod 600 %s", p, fi.Mode().Perm(), p))
		case fi.Size() > maxFile:
			return nil, fault.Wrap(fault.Input, fmt.Errorf("secrets: %s is %d bytes, more than any secret kiln writes (%d KiB at most): is it the right file?", p, fi.Size(), maxFile>>10))
		}
		data, err := io.ReadAll(io.LimitReader(f, maxFile+1))
		if err != nil {
			return nil, fault.Wrap(fault.IO, fmt.Errorf("secrets: %w", err))
		}
		if len(data) > maxFile {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("secrets: %s grew past %d KiB while kiln read it", p, maxFile>>10))
		}
		return data, nil
	}
	s := &Secrets{PKI: map[string][]byte{}}
	for _, name := range PKIFiles {
		data, err := read(filepath.Join(pkiDir, name))
		if err != nil {
			return nil, err
		}
		s.PKI[name] = data
	}
	tok, err := read(TokenFile)
	if err != nil {
		return nil, err
	}
	key, err := read(CertificateKeyFile)
	if err != nil {
		return nil, err
	}
	s.Token = string(trimNewline(tok))
	s.CertificateKey = string(trimNewline(key))
	if err := s.check(); err != nil {
		return nil, fmt.Errorf("secrets in %s: %w", dir, err)
	}
	return s, nil
}

func trimNewline(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}
