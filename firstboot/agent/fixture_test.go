package agent

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/endpoint"
	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

const (
	testToken   = "abcdef.0123456789abcdef"
	testCertKey = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	testSocket  = "/run/containerd/containerd.sock"
	testEP      = "lb.test:6443"
)

var (
	epoch  = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	testCA = newCAPEM()
)

// newCAPEM returns a new self-signed CA certificate, PEM encoded.
func newCAPEM() string {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kubernetes"},
		NotBefore: epoch.Add(-time.Hour), NotAfter: epoch.Add(24 * time.Hour * 365),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// node is an agent with fakes around it, set up for one role.
type node struct {
	t        *testing.T
	nc       *nodeconfig.NodeConfig
	fs       *fakeFS
	runner   *fakeRunner
	clock    *fakeClock
	prober   *fakeProber
	reporter *fakeReporter
	log      bytes.Buffer
	agent    *Agent
	// staleSocket: the runtime's socket file is there but nothing listens.
	staleSocket bool
}

func newNode(t *testing.T, role nodeconfig.Role) *node {
	t.Helper()
	ca, err := nodeconfig.ParseCACertificate(testCA)
	if err != nil {
		t.Fatal(err)
	}
	n := &node{
		t:        t,
		fs:       newFakeFS(),
		runner:   &fakeRunner{},
		clock:    &fakeClock{now: epoch},
		prober:   &fakeProber{results: []endpoint.Result{{Stage: endpoint.Serving, ServingSince: epoch}}},
		reporter: &fakeReporter{},
	}
	n.nc = &nodeconfig.NodeConfig{
		APIVersion: nodeconfig.APIVersion, Kind: nodeconfig.Kind, Role: role,
		Cluster: nodeconfig.Cluster{
			Name: "test", ControlPlaneEndpoint: testEP, KubernetesVersion: "v1.37.2", ControlPlanes: 3,
			CACertificate: testCA, CACertHash: nodeconfig.CACertHash(ca),
			TokenTTL:                nodeconfig.Duration{Duration: 24 * time.Hour},
			CertificateUploadWindow: nodeconfig.Duration{Duration: 6 * time.Hour},
		},
		Hostname:  nodeconfig.Hostname{Name: "node-1"},
		Kubeadm:   nodeconfig.Kubeadm{JoinConfig: "/etc/kiln/kubeadm-join.yaml", CertificatesDir: "/etc/kubernetes/pki"},
		NotBefore: epoch.Add(-time.Hour),
		ReportURL: "http://report.test/status",
		// As kiln renders it for Flatcar.
		RemoveAfterJoin: []string{"/etc/kiln/kubeadm-join.yaml", "/oem/config.ign", "/usr/share/oem/config.ign"},
	}
	n.fs.put("/oem/config.ign", `{"ignition":{"version":"3.4.0"},"storage":{"files":[{"contents":{"source":"data:,`+testToken+`"}}]}}`, 0o600)
	cp := ""
	if role.IsControlPlane() {
		cp = "controlPlane:\n  certificateKey: " + testCertKey + "\n"
	}
	n.fs.put("/etc/kiln/kubeadm-join.yaml", fmt.Sprintf(`apiVersion: kubeadm.k8s.io/v1beta4
kind: JoinConfiguration
discovery:
  bootstrapToken:
    apiServerEndpoint: %s
    token: %s
    caCertHashes:
      - %s
nodeRegistration:
  criSocket: unix://%s
%s`, testEP, testToken, n.nc.Cluster.CACertHash, testSocket, cp), 0o600)
	if role == nodeconfig.RoleInit {
		n.nc.Kubeadm.InitConfig = "/etc/kiln/kubeadm-init.yaml"
		n.nc.PKIDir = "/etc/kiln/pki"
		n.nc.RemoveAfterJoin = append(n.nc.RemoveAfterJoin, "/etc/kiln/kubeadm-init.yaml", "/etc/kiln/pki")
		n.fs.put("/etc/kiln/kubeadm-init.yaml", fmt.Sprintf(`apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
bootstrapTokens:
  - token: %s
    ttl: 24h0m0s
certificateKey: %s
nodeRegistration:
  criSocket: unix://%s
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
clusterName: test
controlPlaneEndpoint: %s
certificatesDir: /etc/kubernetes/pki
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
`, testToken, testCertKey, testSocket, testEP), 0o600)
		for _, f := range []string{"ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key", "sa.key", "sa.pub"} {
			n.fs.put("/etc/kiln/pki/"+f, "PEM "+f, 0o600)
		}
		n.fs.put("/etc/kiln/pki/ca.crt", testCA, 0o600)
	}
	n.writeMetadata()
	n.fs.put(testSocket, "", fs.ModeSocket|0o660)
	for _, s := range sysctls {
		n.fs.put("/proc/sys/"+s.key, "0\n", 0o644)
	}
	n.fs.put("/proc/sys/kernel/hostname", "localhost", 0o644)
	n.agent = &Agent{
		ConfigPath: nodeconfig.DefaultPath,
		Log:        &n.log,
		Deps: Deps{
			FS: n.fs, Runner: n.runner, Clock: n.clock,
			NewProber:   func(*nodeconfig.NodeConfig) (Prober, error) { return n.prober, nil },
			NewReporter: func(string) Reporter { return n.reporter },
			DialSocket:  n.dialSocket,
			FirstMAC:    func() (string, error) { return "525400000001", nil },
			Interfaces: func() ([]Interface, error) {
				return []Interface{{Name: "eth0", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.11/24")}}}, nil
			},
			Jitter: func(d time.Duration) time.Duration { return d / 2 },
			Timing: DefaultTiming(),
		},
	}
	return n
}

func (n *node) dialSocket(_ context.Context, name string) error {
	fi, err := n.fs.Stat(name)
	switch {
	case err != nil:
		return fmt.Errorf("dial unix %s: %w", name, err)
	case fi.Mode()&fs.ModeSocket == 0 || n.staleSocket:
		return fmt.Errorf("dial unix %s: connect: connection refused", name)
	}
	return nil
}

func (n *node) writeMetadata() {
	n.t.Helper()
	data, err := n.nc.Encode()
	if err != nil {
		n.t.Fatal(err)
	}
	n.fs.put(nodeconfig.DefaultPath, string(data), 0o600)
}

// run runs the agent and returns its exit code.
func (n *node) run() int {
	n.t.Helper()
	err := n.agent.Run(context.Background())
	n.t.Logf("agent log:\n%s", n.log.String())
	for _, secret := range []string{testToken, "0123456789abcdef", testCertKey} {
		if strings.Contains(n.log.String(), secret) || strings.Contains(n.fs.read(StatusFile), secret) {
			n.t.Errorf("a secret leaked into the log or the status")
		}
		for _, b := range n.reporter.bodies {
			if strings.Contains(b, secret) {
				n.t.Errorf("a secret leaked into a status report")
			}
		}
	}
	if err != nil && ExitCode(err) == ExitOK {
		n.t.Fatalf("error %v maps to exit 0", err)
	}
	if err == nil && !n.fs.has(nodeconfig.DoneFile) {
		n.t.Fatalf("success without %s", nodeconfig.DoneFile)
	}
	if errors.Is(err, context.Canceled) {
		n.t.Fatal("agent was cancelled")
	}
	return ExitCode(err)
}

// kubeadm answers kubeadm commands in turn by prefix; others succeed.
func (n *node) script(answers map[string][]result) {
	next := map[string]int{}
	n.runner.handle = func(line string) (string, string, error) {
		for prefix, rs := range answers {
			if strings.HasPrefix(line, prefix) {
				i := min(next[prefix], len(rs)-1)
				next[prefix]++
				return rs[i].stdout, rs[i].stderr, rs[i].err
			}
		}
		return "", "", nil
	}
}

type result struct {
	stdout, stderr string
	err            error
}

// exitStatus is a command that ran and exited non-zero, as *exec.ExitError.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }
func (e exitStatus) ExitCode() int { return int(e) }

var (
	ok      = result{}
	exit1   = exitStatus(1)
	failing = func(stderr string) result { return result{stderr: stderr, err: exit1} }
)
