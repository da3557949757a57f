package nodeconfig

import (
	"strings"
	"testing"
)

func TestCheckEndpoint(t *testing.T) {
	for ep, wantErr := range map[string]string{
		"lb.example.net:6443":  "",
		"10.0.0.1:6443":        "",
		"[2001:db8::1]:6443":   "",
		"LB.Example.NET:443":   "lowercase only (RFC 1123): use lb.example.net:443",
		"lb.example.net.:443":  "no final dot in a host name: use lb.example.net:443",
		"lb:+443":              "1 to 65535",
		"lb:06443":             "",
		"010.0.0.1:6443":       "is not an IPv4 address",
		"lb.1:6443":            "is not an IPv4 address",
		"1lb.example:6443":     "",
		"":                     "required",
		"lb.example.net":       "add the port",
		"2001:db8::1":          "brackets",
		"0.0.0.0:6443":         "not an address nodes can reach",
		"lb:0":                 "1 to 65535",
		"-lb.example.net:6443": "not a valid DNS name",
	} {
		err := CheckEndpoint(ep)
		if wantErr == "" && err != nil || wantErr != "" && (err == nil || !strings.Contains(err.Error(), wantErr)) {
			t.Errorf("CheckEndpoint(%q) = %v, want %q", ep, err, wantErr)
		}
	}
}

func TestHostnameTemplate(t *testing.T) {
	if got := ExpandHostname("{cluster}-{role}-{mac}", "lab", RoleWorker, "525400000001"); got != "lab-worker-525400000001" {
		t.Errorf("got %q", got)
	}
	for tmpl, ok := range map[string]bool{"{cluster}-{mac}": true, "{nope}": false, "UPPER-{mac}": false, "a..b": false} {
		if err := CheckHostnameTemplate(tmpl, "lab"); (err == nil) != ok {
			t.Errorf("CheckHostnameTemplate(%q) = %v", tmpl, err)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	for name, doc := range map[string]string{
		"wrong kind":    "apiVersion: kiln.dev/v1alpha1\nkind: Cluster\n",
		"unknown field": "apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nrole: worker\nextra: 1\n",
		"bad duration":  "apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\ncluster:\n  tokenTTL: soon\n",
	} {
		if _, err := Decode(strings.NewReader(doc)); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
	_, err := Decode(strings.NewReader("apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nrole: boss\n"))
	for _, field := range []string{"role:", "cluster.name:", "cluster.controlPlaneEndpoint:", "cluster.caCertHash:", "cluster.caCertificate:", "hostname:", "kubeadm.joinConfig:", "notBefore:"} {
		if err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("validation error lacks %s: %v", field, err)
		}
	}
}

// TestHostnameTemplateUsesTheClusterName: a long cluster name makes the
// default template too long for a host name; validation must say so at
// build time, not the agent at boot.
func TestHostnameTemplateUsesTheClusterName(t *testing.T) {
	long := "a-very-long-cluster-name-for-the-edge-sites-01" // 46 characters
	if err := CheckHostnameTemplate("{cluster}-{role}-{mac}", long); err == nil || !strings.Contains(err.Error(), "at most 63") {
		t.Errorf("got %v", err)
	}
	if err := CheckHostnameTemplate("{cluster}-{mac}", long); err != nil {
		t.Errorf("59 characters is fine: %v", err)
	}
}

// removeAfterJoin may not reach what the node keeps: kubeadm's
// certificates, node.yaml and the agent's state, nor a folder holding
// them.
func TestRemoveAfterJoinKeepsWhatTheNodeNeeds(t *testing.T) {
	for p, ok := range map[string]bool{
		"/etc/kiln/kubeadm-join.yaml":      true,
		"/etc/kiln/pki":                    true,
		"/oem/config.ign":                  true,
		"/etc/kubernetes/pki":              false,
		"/etc/kubernetes/pki/ca.key":       false,
		"/etc/kubernetes":                  false,
		"/etc/kiln/node.yaml":              false,
		"/etc/kiln":                        false,
		"/var/lib/kiln":                    false,
		"/var/lib/kiln/removed-after-join": false,
		"/var":                             false,
		"/":                                false,
		"relative/file":                    false,
		"/etc/kiln/../kubernetes/pki":      false,
	} {
		nc := &NodeConfig{Kubeadm: Kubeadm{CertificatesDir: "/etc/kubernetes/pki"}, RemoveAfterJoin: []string{p}}
		err := nc.Validate()
		if got := err == nil || !strings.Contains(err.Error(), "removeAfterJoin[0]"); got != ok {
			t.Errorf("removeAfterJoin %q: accepted %v, want %v (%v)", p, got, ok, err)
		}
	}
}
