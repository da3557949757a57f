//go:build oracle

package oracle

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// Real kubeadm versions the oracle runs: every supported minor, each at the
// newest patch the module proxy serves (v1.34.4 is also the version of the
// rehearsal recipe in DESIGN.md).
var kubeadmVersions = []string{"v1.33.13", "v1.34.4", "v1.35.4", "v1.36.3", "v1.37.2"}

// TestKubeadmValidatesEveryConfig: a real kubeadm of the cluster's minor
// accepts every kubeadm configuration kiln renders, and rejects a broken
// one (so the oracle can fail).
func TestKubeadmValidatesEveryConfig(t *testing.T) {
	for _, v := range kubeadmVersions {
		kubeadm := tool(t, "kubeadm-"+v)
		for _, osName := range []string{"flatcar", "fcos"} {
			cf := newCluster(t, "--kubernetes-version", v, "--os", osName)
			editCluster(t, cf, func(m map[string]any) {
				m["kubeadmPatches"] = []any{map[string]any{"target": "kube-apiserver", "patch": "metadata:\n  annotations:\n    kiln: oracle\n"}}
				if osName == "flatcar" { // and fcos without: both shapes of nodeRegistration
					m["kubernetes"].(map[string]any)["ignorePreflightErrors"] = []any{"Mem", "SystemVerification"}
				}
				m["nodes"] = staticInventory
			})
			for _, c := range []struct{ role, node, format string }{
				{"init", "", "kubeadm"}, {"init", "", "kubeadm-join"}, {"control-plane", "", "kubeadm"}, {"worker", "", "kubeadm"},
				// Inventory nodes with a static address: node-ip, advertiseAddress.
				{"init", "cp-1", "kubeadm"}, {"init", "cp-1", "kubeadm-join"}, {"control-plane", "cp-2", "kubeadm"}, {"worker", "w-1", "kubeadm"},
			} {
				t.Run(v+"-"+osName+"-"+c.role+c.node+"-"+c.format, func(t *testing.T) {
					f := filepath.Join(t.TempDir(), "kubeadm.yaml")
					who := []string{"--role", c.role}
					if c.node != "" {
						who = []string{"--node", c.node}
					}
					os.WriteFile(f, kiln(t, append([]string{"-c", cf, "render", "--format", c.format}, who...)...), 0o600)
					out, err := run(t, kubeadm, "config", "validate", "--config", f)
					if err != nil || !strings.Contains(string(out), "ok") {
						t.Fatalf("kubeadm %s config validate: %v\n%s", v, err, out)
					}
				})
			}
		}
		t.Run(v+"-rejects-broken", func(t *testing.T) {
			cf := newCluster(t, "--kubernetes-version", v)
			cfg := kiln(t, "-c", cf, "render", "--role", "worker", "--format", "kubeadm")
			f := filepath.Join(t.TempDir(), "bad.yaml")
			os.WriteFile(f, bytes.Replace(cfg, []byte("discovery:"), []byte("discovry:"), 1), 0o600)
			if out, err := run(t, kubeadm, "config", "validate", "--config", f); err == nil {
				t.Fatalf("kubeadm accepted a misspelled field:\n%s", out)
			}
		})
	}
}

// TestKubeadmImagesMatch: for every supported minor, the images a real
// kubeadm deploys for kiln's rendered init configuration (`kubeadm config
// images list --config`) are exactly kubeadm's images in `kiln images`.
//
// Air-gapped clusters name etcd's and CoreDNS's tags in the
// ClusterConfiguration (any patch release of kubeadm then deploys what the
// archive holds): that config must validate and list the same images.
func TestKubeadmImagesMatch(t *testing.T) {
	for _, v := range kubeadmVersions {
		for _, airgap := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s-airgap=%v", v, airgap), func(t *testing.T) {
				kubeadmImagesMatch(t, v, airgap)
			})
		}
	}
}

func kubeadmImagesMatch(t *testing.T, v string, airgap bool) {
	cf := newCluster(t, "--kubernetes-version", v)
	var list []struct{ Name, Reference, Digest string }
	if err := json.Unmarshal(kiln(t, "-c", cf, "images", "-o", "json"), &list); err != nil {
		t.Fatal(err)
	}
	if airgap {
		editCluster(t, cf, func(m map[string]any) {
			m["airgap"] = true
			pins := map[string]any{}
			for i, e := range list {
				if e.Digest == "" { // stand-in digests: rendering fetches nothing
					pins[e.Name] = fmt.Sprintf("%s@sha256:%064x", e.Reference, i+1)
				}
			}
			m["images"] = pins
		})
	}
	f := filepath.Join(t.TempDir(), "init.yaml")
	os.WriteFile(f, kiln(t, "-c", cf, "render", "--role", "init", "--format", "kubeadm"), 0o600)
	kubeadm := tool(t, "kubeadm-"+v)
	if out, err := run(t, kubeadm, "config", "validate", "--config", f); err != nil {
		t.Fatalf("kubeadm %s config validate: %v\n%s", v, err, out)
	}
	out, err := exec.Command(kubeadm, "config", "images", "list", "--config", f).Output()
	if err != nil {
		t.Fatalf("kubeadm config images list: %v\n%s", err, out)
	}
	want := strings.Fields(string(out))
	var got []string
	for _, e := range list {
		if strings.HasPrefix(e.Reference, "registry.k8s.io/") { // not the pod network's
			got = append(got, e.Reference)
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("kubeadm %s deploys\n  %s\nkiln images lists\n  %s", v, strings.Join(want, "\n  "), strings.Join(got, "\n  "))
	}
}

// TestKubeadmUsesOurCA: kubeadm init phase certs all, on the rendered init
// configuration, keeps kiln's CAs and service-account key and issues an
// API server certificate that verifies against our CA with the endpoint in
// its names. The test changes three fields of the rendered config, all of
// which the agent leaves to the node: certificatesDir points at a scratch
// folder (the host's /etc/kubernetes stays untouched), and the advertise
// address and node name are fixed so kubeadm does not depend on this
// machine's routes or hostname.
func TestKubeadmUsesOurCA(t *testing.T) {
	for _, v := range kubeadmVersions {
		t.Run(v, func(t *testing.T) {
			cf := newCluster(t, "--kubernetes-version", v)
			pki := filepath.Join(t.TempDir(), "pki")
			src := filepath.Join(filepath.Dir(cf), "secrets", "pki")
			originals := map[string][]byte{}
			for _, f := range []string{"ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key", "sa.key", "sa.pub"} {
				data, err := os.ReadFile(filepath.Join(src, f))
				if err != nil {
					t.Fatal(err)
				}
				originals[f] = data
				os.MkdirAll(filepath.Dir(filepath.Join(pki, f)), 0o700)
				os.WriteFile(filepath.Join(pki, f), data, 0o600)
			}
			cfg := forScratch(t, kiln(t, "-c", cf, "render", "--role", "init", "--format", "kubeadm"), pki)
			f := filepath.Join(t.TempDir(), "init.yaml")
			os.WriteFile(f, cfg, 0o600)
			out, err := run(t, tool(t, "kubeadm-"+v), "init", "phase", "certs", "all", "--config", f)
			if err != nil {
				t.Fatalf("kubeadm init phase certs all: %v\n%s", err, out)
			}
			for _, want := range []string{
				"Using existing ca certificate authority",
				"Using existing front-proxy-ca certificate authority",
				"Using existing etcd/ca certificate authority",
				`Using the existing "sa" key`,
			} {
				if !strings.Contains(string(out), want) {
					t.Errorf("kubeadm output lacks %q:\n%s", want, out)
				}
			}
			for f, data := range originals {
				if got, _ := os.ReadFile(filepath.Join(pki, f)); !bytes.Equal(got, data) {
					t.Errorf("kubeadm replaced %s", f)
				}
			}
			ca := parseCert(t, originals["ca.crt"])
			apiserver := parseCert(t, mustRead(t, filepath.Join(pki, "apiserver.crt")))
			pool := x509.NewCertPool()
			pool.AddCert(ca)
			if _, err := apiserver.Verify(x509.VerifyOptions{Roots: pool, DNSName: "lb.oracle.test"}); err != nil {
				t.Errorf("apiserver certificate does not verify for the endpoint under our CA: %v", err)
			}
		})
	}
}

// staticInventory is an inventory whose nodes have static addresses
// (nodes[].network).
var staticInventory = []any{
	map[string]any{"name": "cp-1", "role": "init", "network": map[string]any{"interface": "eth0", "address": "192.0.2.11/24"}},
	map[string]any{"name": "cp-2", "role": "control-plane", "network": map[string]any{"interface": "eth0", "address": "192.0.2.12/24"}},
	map[string]any{"name": "w-1", "role": "worker", "network": map[string]any{"interface": "eth0", "address": "2001:db8::21/64"}},
}

// TestKubeadmTakesTheNodeAddress: for an inventory init node with a
// static address, kubeadm init phase certs all issues the API server's
// certificate for that address, read from the rendered advertiseAddress.
func TestKubeadmTakesTheNodeAddress(t *testing.T) {
	v := kubeadmVersions[len(kubeadmVersions)-1]
	cf := newCluster(t, "--kubernetes-version", v)
	editCluster(t, cf, func(m map[string]any) { m["nodes"] = staticInventory })
	pki := filepath.Join(t.TempDir(), "pki")
	f := filepath.Join(t.TempDir(), "init.yaml")
	os.WriteFile(f, forScratch(t, kiln(t, "-c", cf, "render", "--node", "cp-1", "--format", "kubeadm"), pki), 0o600)
	if out, err := run(t, tool(t, "kubeadm-"+v), "init", "phase", "certs", "all", "--config", f); err != nil {
		t.Fatalf("kubeadm init phase certs all: %v\n%s", err, out)
	}
	cert := parseCert(t, mustRead(t, filepath.Join(pki, "apiserver.crt")))
	if !slices.ContainsFunc(cert.IPAddresses, func(ip net.IP) bool { return ip.String() == "192.0.2.11" }) {
		t.Errorf("apiserver certificate's IPs %v lack the node's address 192.0.2.11", cert.IPAddresses)
	}
}

// forScratch sets ClusterConfiguration.certificatesDir and the init node's
// name, and its advertise address unless the config has one (an inventory
// node with a static address).
func forScratch(t *testing.T, cfg []byte, dir string) []byte {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(cfg))
	var out bytes.Buffer
	enc := yaml.NewEncoder(&out)
	found := false
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); err != nil {
			break
		}
		switch doc["kind"] {
		case "ClusterConfiguration":
			doc["certificatesDir"] = dir
			found = true
		case "InitConfiguration":
			if ep, _ := doc["localAPIEndpoint"].(map[string]any); ep["advertiseAddress"] == nil {
				doc["localAPIEndpoint"] = map[string]any{"advertiseAddress": "192.0.2.10"}
			}
			doc["nodeRegistration"].(map[string]any)["name"] = "oracle-init"
		}
		if err := enc.Encode(doc); err != nil {
			t.Fatal(err)
		}
	}
	if !found {
		t.Fatal("rendered init config has no ClusterConfiguration")
	}
	return out.Bytes()
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func parseCert(t *testing.T, data []byte) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatal("not PEM")
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
