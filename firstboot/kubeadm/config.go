// Package kubeadm reads the parts of kiln's kubeadm configuration files the
// agent needs, and classifies kubeadm's failures as transient or permanent.
//
// It does not validate the files the way kubeadm does: kubeadm reads them
// itself. It checks only what the agent relies on (the CRI socket, the
// certificates directory, the pinned CA) and collects the secrets the agent
// must never log.
package kubeadm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"

	"gopkg.in/yaml.v3"
)

// APIVersion is the kubeadm configuration API kiln writes.
const APIVersion = "kubeadm.k8s.io/v1beta4"

var tokenRe = regexp.MustCompile(`^([a-z0-9]{6})\.([a-z0-9]{16})$`)

// Config is what the agent takes from one kubeadm configuration file.
type Config struct {
	// CRISocket is nodeRegistration.criSocket.
	CRISocket string
	// CertificatesDir is ClusterConfiguration.certificatesDir (init only).
	CertificatesDir string
	// Endpoint is the control-plane endpoint the file names.
	Endpoint string
	// CACertHashes are the join discovery pins (join only).
	CACertHashes []string
	// TokenID is the public half of the bootstrap token.
	TokenID string
	// ControlPlane reports whether a join file joins a control plane.
	ControlPlane bool
	// Secrets are the values that must never appear in a log.
	Secrets []string
}

// The subset of v1beta4 fields read here; unknown fields are kubeadm's
// business.
type (
	header struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
	}
	nodeRegistration struct {
		CRISocket string `yaml:"criSocket"`
	}
	initConfiguration struct {
		BootstrapTokens []struct {
			Token string `yaml:"token"`
		} `yaml:"bootstrapTokens"`
		CertificateKey   string           `yaml:"certificateKey"`
		NodeRegistration nodeRegistration `yaml:"nodeRegistration"`
	}
	clusterConfiguration struct {
		ControlPlaneEndpoint string `yaml:"controlPlaneEndpoint"`
		CertificatesDir      string `yaml:"certificatesDir"`
	}
	joinConfiguration struct {
		Discovery struct {
			BootstrapToken struct {
				APIServerEndpoint string   `yaml:"apiServerEndpoint"`
				Token             string   `yaml:"token"`
				CACertHashes      []string `yaml:"caCertHashes"`
			} `yaml:"bootstrapToken"`
		} `yaml:"discovery"`
		NodeRegistration nodeRegistration `yaml:"nodeRegistration"`
		ControlPlane     *struct {
			CertificateKey string `yaml:"certificateKey"`
		} `yaml:"controlPlane"`
	}
)

// ParseInit reads an init configuration file: InitConfiguration and
// ClusterConfiguration documents (others are ignored).
func ParseInit(data []byte) (*Config, error) {
	var (
		ic *initConfiguration
		cc *clusterConfiguration
	)
	err := eachDoc(data, func(kind string, n *yaml.Node) error {
		switch kind {
		case "InitConfiguration":
			ic = &initConfiguration{}
			return n.Decode(ic)
		case "ClusterConfiguration":
			cc = &clusterConfiguration{}
			return n.Decode(cc)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if ic == nil {
		return nil, errors.New("no InitConfiguration document")
	}
	if cc == nil {
		return nil, errors.New("no ClusterConfiguration document")
	}
	c := Config{
		CRISocket:       ic.NodeRegistration.CRISocket,
		CertificatesDir: cc.CertificatesDir,
		Endpoint:        cc.ControlPlaneEndpoint,
	}
	var errs []error
	if c.CRISocket == "" {
		errs = append(errs, errors.New("InitConfiguration.nodeRegistration.criSocket: required (the agent waits for it)"))
	}
	if c.CertificatesDir == "" {
		errs = append(errs, errors.New("ClusterConfiguration.certificatesDir: required (the agent places the cluster PKI there)"))
	}
	if len(ic.BootstrapTokens) == 0 {
		errs = append(errs, errors.New("InitConfiguration.bootstrapTokens: required (joining nodes carry this token)"))
	}
	for i, t := range ic.BootstrapTokens {
		id, err := c.addToken(t.Token)
		if err != nil {
			errs = append(errs, fmt.Errorf("InitConfiguration.bootstrapTokens[%d].token: %w", i, err))
		}
		if i == 0 {
			c.TokenID = id
		}
	}
	if err := c.addCertificateKey(ic.CertificateKey); err != nil {
		errs = append(errs, fmt.Errorf("InitConfiguration.certificateKey: %w", err))
	}
	return &c, errors.Join(errs...)
}

// ParseJoin reads a join configuration file.
func ParseJoin(data []byte) (*Config, error) {
	var jc *joinConfiguration
	err := eachDoc(data, func(kind string, n *yaml.Node) error {
		if kind == "JoinConfiguration" {
			jc = &joinConfiguration{}
			return n.Decode(jc)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if jc == nil {
		return nil, errors.New("no JoinConfiguration document")
	}
	bt := jc.Discovery.BootstrapToken
	c := Config{
		CRISocket:    jc.NodeRegistration.CRISocket,
		Endpoint:     bt.APIServerEndpoint,
		CACertHashes: bt.CACertHashes,
		ControlPlane: jc.ControlPlane != nil,
	}
	var errs []error
	if c.CRISocket == "" {
		errs = append(errs, errors.New("JoinConfiguration.nodeRegistration.criSocket: required (the agent waits for it)"))
	}
	if c.Endpoint == "" {
		errs = append(errs, errors.New("JoinConfiguration.discovery.bootstrapToken.apiServerEndpoint: required"))
	}
	if len(c.CACertHashes) == 0 {
		errs = append(errs, errors.New("JoinConfiguration.discovery.bootstrapToken.caCertHashes: required (kiln always pins the CA)"))
	}
	id, err := c.addToken(bt.Token)
	if err != nil {
		errs = append(errs, fmt.Errorf("JoinConfiguration.discovery.bootstrapToken.token: %w", err))
	}
	c.TokenID = id
	if jc.ControlPlane != nil {
		if err := c.addCertificateKey(jc.ControlPlane.CertificateKey); err != nil {
			errs = append(errs, fmt.Errorf("JoinConfiguration.controlPlane.certificateKey: %w", err))
		}
	}
	return &c, errors.Join(errs...)
}

// PinsCA reports whether the join discovery pins the given CA hash.
func (c *Config) PinsCA(hash string) bool { return slices.Contains(c.CACertHashes, hash) }

// addToken records a bootstrap token as a secret and returns its public ID.
// Errors never quote the token.
func (c *Config) addToken(tok string) (string, error) {
	m := tokenRe.FindStringSubmatch(tok)
	if m == nil {
		return "", errors.New("not a bootstrap token of the form [a-z0-9]{6}.[a-z0-9]{16}")
	}
	// The token secret alone is as sensitive as the whole token.
	c.Secrets = append(c.Secrets, tok, m[2])
	return m[1], nil
}

var certKeyRe = regexp.MustCompile(`^[0-9a-f]{64}$`)

func (c *Config) addCertificateKey(key string) error {
	if !certKeyRe.MatchString(key) {
		return errors.New("not 64 lowercase hex digits (32 bytes)")
	}
	c.Secrets = append(c.Secrets, key)
	return nil
}

// eachDoc decodes a multi-document YAML file and calls fn for every
// document of the kubeadm API. A kubeadm kind under another API version is
// an error: kubeadm would refuse or convert it, and kiln writes v1beta4.
func eachDoc(data []byte, fn func(kind string, n *yaml.Node) error) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for i := 0; ; i++ {
		var n yaml.Node
		if err := dec.Decode(&n); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("document %d: %w", i+1, err)
		}
		var h header
		if err := n.Decode(&h); err != nil {
			return fmt.Errorf("document %d: %w", i+1, err)
		}
		switch h.Kind {
		case "InitConfiguration", "ClusterConfiguration", "JoinConfiguration":
			if h.APIVersion != APIVersion {
				return fmt.Errorf("document %d: %s has apiVersion %q: kiln writes %s; rebuild the image with a matching kiln", i+1, h.Kind, h.APIVersion, APIVersion)
			}
		}
		if err := fn(h.Kind, &n); err != nil {
			return fmt.Errorf("document %d (%s): %w", i+1, h.Kind, err)
		}
	}
}
