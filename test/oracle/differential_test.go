//go:build oracle

package oracle

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/render"
	"github.com/kilnproject/kiln/imagebuild/secrets"
)

// The differential test: whatever `kiln validate` accepts, the real
// kubeadm accepts. Each candidate sets the cluster file's fields that kiln
// hands to kubeadm as they are; kiln's validation and the real kubeadm's
// `config validate` of every file kiln renders from it (init, control
// plane, worker) must agree. Where kiln refuses what kubeadm takes, the
// value must break one of kiln's deliberate stricter rules (stricter), or
// the test fails too. It runs at the oldest and the newest supported
// minor.

// candidate holds the cluster file's values kiln passes to kubeadm.
type candidate struct {
	endpoint, podSubnet, serviceSubnet, dnsDomain string
}

// differentialTable: the reported disagreements (an uppercase endpoint
// host, a pod subnet smaller than a node's /24), the edges of every size
// rule on both sides, and the shapes each field takes.
var differentialTable = []candidate{
	{"lb.example.com:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"LB.Example.COM:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"lb.example.com.:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"lb.example.com", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"lb.example.com:+6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"lb.example.com:06443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"lb.example.com:0", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"lb_1.example.com:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"010.0.0.1:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"10.0.0.1:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"[2001:db8::10]:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"[fe80::1%eth0]:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"2001:db8::10:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"lb:6443", "10.244.0.0/25", "10.96.0.0/12", "cluster.local"},
	{"lb:6443", "10.244.0.0/24", "10.96.0.0/12", "cluster.local"},
	{"lb:6443", "10.0.0.0/8", "172.16.0.0/12", "cluster.local"},
	{"lb:6443", "8.0.0.0/7", "172.16.0.0/12", "cluster.local"},
	{"lb:6443", "10.244.1.0/16", "10.96.0.0/12", "cluster.local"},
	{"lb:6443", "10.244.0.0/16, fd00:10:244::/56", "10.96.0.0/12", "cluster.local"},
	{"lb:6443", "10.244.0.0/16,fd00:10:244::/56", "10.96.0.0/12,fd00:10:96::/112", "cluster.local"},
	{"lb:6443", "10.244.0.0/16,10.245.0.0/16", "10.96.0.0/12", "cluster.local"},
	{"lb:6443", "fd00:10:244::/64", "fd00:10:96::/112", "cluster.local"},
	{"lb:6443", "fd00:10:244::/65", "fd00:10:96::/112", "cluster.local"},
	{"lb:6443", "fd00::/48", "fd01::/108", "cluster.local"},
	{"lb:6443", "fd00::/47", "fd01::/107", "cluster.local"},
	{"lb:6443", "10.244.0.0/16", "10.96.0.0/28", "cluster.local"},
	{"lb:6443", "10.244.0.0/16", "10.96.0.0/29", "cluster.local"},
	{"lb:6443", "10.244.0.0/16", "10.96.0.0/11", "cluster.local"},
	{"lb:6443", "10.244.0.0/16", "fd00:10:96::/124", "cluster.local"},
	{"lb:6443", "10.244.0.0/16", "fd00:10:96::/125", "cluster.local"},
	{"lb:6443", "10.244.0.0/16", "10.244.0.0/16", "cluster.local"},
	{"lb:6443", "10.244.0.0/16", "10.96.0.0/12", "Cluster.Local"},
	{"lb:6443", "10.244.0.0/16", "10.96.0.0/12", "cluster.local."},
	{"lb:6443", "10.244.0.0/16", "10.96.0.0/12", "k8s"},
	{"lb:6443", "10.244.0.0/16", "10.96.0.0/12", strings.Repeat("a", 64) + ".local"},
}

func TestValidateAgreesWithKubeadm(t *testing.T) {
	for _, c := range differentialTable {
		checkAgreement(t, c)
	}
}

// FuzzValidateAgreesWithKubeadm: the same check on generated values. The
// endpoint and DNS domain are free text; the IPv4 pod and service subnets
// are built from an address and a prefix length (the fuzzer walks every
// size), and podExtra is appended to the pod subnet (a second family, or
// anything). testdata/fuzz holds the corpus a longer run found (`go test
// -tags oracle -run '^$' -fuzz FuzzValidateAgreesWithKubeadm -fuzztime 10m
// ./test/oracle/`), which plain `go test` replays.
func FuzzValidateAgreesWithKubeadm(f *testing.F) {
	f.Add("lb.example.com:6443", uint32(0x0af40000), uint8(16), "", uint32(0x0a600000), uint8(12), "cluster.local")
	f.Add("LB.example.com:6443", uint32(0x0af40000), uint8(25), ",fd00:10:244::/56", uint32(0x0a600000), uint8(29), "cluster.local")
	f.Add("[2001:db8::10]:6443", uint32(0x0a000000), uint8(8), ", fd00::/64", uint32(0xac100000), uint8(28), "Cluster.local.")
	f.Fuzz(func(t *testing.T, endpoint string, podAddr uint32, podBits uint8, podExtra string, svcAddr uint32, svcBits uint8, domain string) {
		checkAgreement(t, candidate{endpoint, cidr4(podAddr, podBits) + podExtra, cidr4(svcAddr, svcBits), domain})
	})
}

// cidr4 writes an IPv4 subnet; bits may be out of range (33 and up).
func cidr4(addr uint32, bits uint8) string {
	return fmt.Sprintf("%d.%d.%d.%d/%d", addr>>24, addr>>16&0xff, addr>>8&0xff, addr&0xff, bits%40)
}

// kubeadmEdges are the oldest and newest supported minors.
var kubeadmEdges = []string{kubeadmVersions[0], kubeadmVersions[len(kubeadmVersions)-1]}

var differentialSecrets = sync.OnceValues(func() (*secrets.Secrets, error) {
	return secrets.Generate("oracle", time.Now(), rand.Reader)
})

// checkAgreement compares kiln's and kubeadm's verdicts on c.
func checkAgreement(t *testing.T, c candidate) {
	t.Helper()
	s, err := differentialSecrets()
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range kubeadmEdges {
		cl, err := cluster.Parse([]byte("apiVersion: kiln.dev/v1alpha1\nkind: Cluster\nname: oracle\ncontrolPlaneEndpoint: lb.oracle.test:6443\nloadBalancer: {type: external}\nkubernetes: {version: " + v + "}\n"))
		if err != nil {
			t.Fatal(err)
		}
		cl.ControlPlaneEndpoint = c.endpoint
		cl.Kubernetes.PodSubnet, cl.Kubernetes.ServiceSubnet, cl.Kubernetes.DNSDomain = c.podSubnet, c.serviceSubnet, c.dnsDomain
		var invalid *cluster.InvalidError
		kilnErr := cl.Validate()
		if kilnErr != nil && !errors.As(kilnErr, &invalid) {
			t.Fatalf("%+v: %v", c, kilnErr)
		}
		out, kubeadmOK := kubeadmVerdict(t, tool(t, "kubeadm-"+v), cl, s)
		switch {
		case kilnErr == nil && !kubeadmOK:
			t.Errorf("%+v: kiln validate accepts it, kubeadm %s rejects it:\n%s", c, v, out)
		case kilnErr != nil && kubeadmOK && stricter(c) == "":
			t.Errorf("%+v: kiln rejects it, kubeadm %s accepts it, and it breaks none of kiln's deliberate stricter rules: make kiln agree or add the rule to stricter:\n%v", c, v, kilnErr)
		}
	}
}

// kubeadmVerdict runs the real kubeadm's config validate on every file
// kiln renders for cl; ok only if it accepts them all.
func kubeadmVerdict(t *testing.T, kubeadm string, cl *cluster.Cluster, s *secrets.Secrets) (string, bool) {
	t.Helper()
	dir := t.TempDir()
	for _, role := range []nodeconfig.Role{nodeconfig.RoleInit, nodeconfig.RoleControlPlane, nodeconfig.RoleWorker} {
		files, err := render.Kubeadm(render.Input{Cluster: cl, Secrets: s, Role: role, Arch: "amd64"})
		if err != nil {
			t.Fatalf("render %s: %v", role, err)
		}
		for _, p := range []string{render.InitConfigPath, render.JoinConfigPath} {
			data, ok := files[p]
			if !ok {
				continue
			}
			f := filepath.Join(dir, string(role)+"-"+filepath.Base(p))
			if err := os.WriteFile(f, data, 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := run(t, kubeadm, "config", "validate", "--config", f)
			if err != nil {
				return string(role) + " " + filepath.Base(p) + ": " + string(out), false
			}
		}
	}
	return "", true
}

var (
	numericLabel = regexp.MustCompile(`(^|\.)[0-9]+$`)
	longLabel    = regexp.MustCompile(`[^.]{64,}`)
)

// stricter names the deliberate rule of kiln's that c breaks where kubeadm
// is more lenient, or "". Each is checked here on its own, not with kiln's
// code:
//   - an endpoint host that ends in a number but is no IPv4 address Go
//     reads (leading zeros: kubeadm reads 010 as 10, the node's resolver
//     does not), or is the unspecified address;
//   - a DNS label over 63 characters (DNS itself allows no more);
//   - a subnet with host bits set (kubeadm drops them silently);
//   - pod and service subnets that overlap (kubeadm does not compare them).
func stricter(c candidate) string {
	if i := strings.LastIndex(c.endpoint, ":"); i > 0 {
		host := strings.Trim(c.endpoint[:i], "[]")
		if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
			return "the endpoint is the unspecified address"
		} else if err != nil && numericLabel.MatchString(host) {
			return "the endpoint host ends in a number but is no IPv4 address"
		}
		if longLabel.MatchString(host) {
			return "a DNS label over 63 characters"
		}
	}
	if longLabel.MatchString(c.dnsDomain) {
		return "a DNS label over 63 characters"
	}
	var all [2][]netip.Prefix
	for i, list := range []string{c.podSubnet, c.serviceSubnet} {
		for _, part := range strings.Split(list, ",") {
			p, err := netip.ParsePrefix(part)
			if err != nil {
				continue
			}
			if p.Masked() != p {
				return "a subnet with host bits set"
			}
			all[i] = append(all[i], p)
		}
	}
	for _, p := range all[0] {
		for _, q := range all[1] {
			if p.Overlaps(q) {
				return "pod and service subnets overlap"
			}
		}
	}
	return ""
}
