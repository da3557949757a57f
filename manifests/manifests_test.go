package manifests

import (
	"encoding/json"
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// netConf pulls flannel's net-conf.json out of a rendered manifest.
func netConf(t *testing.T, manifest []byte) map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(strings.NewReader(string(manifest)))
	for {
		var doc struct {
			Kind string            `yaml:"kind"`
			Data map[string]string `yaml:"data"`
		}
		if err := dec.Decode(&doc); err != nil {
			t.Fatalf("no ConfigMap with net-conf.json: %v", err)
		}
		if raw, ok := doc.Data["net-conf.json"]; ok && doc.Kind == "ConfigMap" {
			var conf map[string]any
			if err := json.Unmarshal([]byte(raw), &conf); err != nil {
				t.Fatalf("net-conf.json: %v\n%s", err, raw)
			}
			return conf
		}
	}
}

func TestFlannelFamilies(t *testing.T) {
	for _, tc := range []struct {
		subnet string
		want   map[string]any
	}{
		{"10.244.0.0/16", map[string]any{"Network": "10.244.0.0/16"}},
		{"fd00:10:244::/56", map[string]any{"IPv6Network": "fd00:10:244::/56", "EnableIPv6": true, "EnableIPv4": false}},
		{"10.244.0.0/16,fd00:10:244::/56", map[string]any{"Network": "10.244.0.0/16", "IPv6Network": "fd00:10:244::/56", "EnableIPv6": true}},
	} {
		m, err := Flannel(tc.subnet, nil)
		if err != nil {
			t.Fatalf("%s: %v", tc.subnet, err)
		}
		conf := netConf(t, m)
		if b := conf["Backend"].(map[string]any); b["Type"] != "vxlan" {
			t.Errorf("%s: backend %v", tc.subnet, b)
		}
		delete(conf, "Backend")
		if len(conf) != len(tc.want) {
			t.Errorf("%s: net-conf %v, want %v", tc.subnet, conf, tc.want)
		}
		for k, v := range tc.want {
			if conf[k] != v {
				t.Errorf("%s: %s = %v, want %v", tc.subnet, k, conf[k], v)
			}
		}
	}
	if _, err := Flannel("10.244.0.0", nil); err == nil {
		t.Error("a pod subnet without a prefix length was accepted")
	}
}

// TestImagesComeFromTheList: every image a rendered manifest names is a
// pin from images.yaml (or the cluster file's override), by digest.
func TestImagesComeFromTheList(t *testing.T) {
	override := "registry.test/keepalived:1@sha256:" + strings.Repeat("ab", 32)
	lb := LoadBalancer{
		VIP: netip.MustParseAddr("10.0.0.50"), VIPBits: 32, Port: 6443, Interface: "eth0", RouterID: 7, RouterName: "lab", AdvertInterval: 1,
		Backends:  []Backend{{"cp-1", netip.MustParseAddrPort("10.0.0.11:6444")}},
		Overrides: map[string]string{"keepalived": override},
	}
	var rendered []string
	fl, err := Flannel("10.244.0.0/16", nil)
	if err != nil {
		t.Fatal(err)
	}
	rendered = append(rendered, string(fl))
	kh, err := KeepalivedHAProxy(lb)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := KubeVIP(lb, AdminKubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range append(kh, kv...) {
		rendered = append(rendered, string(f.Data))
	}
	pins := map[string]bool{override: true}
	for _, im := range Images() {
		if im.Digest != "" {
			pins[im.Pinned()] = true
		}
	}
	imageRe := regexp.MustCompile(`(?m)^\s*image:\s*(\S+)`)
	seen := 0
	for _, m := range rendered {
		for _, match := range imageRe.FindAllStringSubmatch(m, -1) {
			seen++
			if !pins[match[1]] {
				t.Errorf("image %s is not a pin from images.yaml", match[1])
			}
		}
	}
	if seen < 5 { // flannel, its CNI plugin, keepalived, HAProxy, kube-vip
		t.Errorf("found %d images in the rendered manifests", seen)
	}
}

func TestKeepalivedNeedsAPin(t *testing.T) {
	lb := LoadBalancer{VIP: netip.MustParseAddr("10.0.0.50"), VIPBits: 32, Port: 6443, Backends: []Backend{{"cp-1", netip.MustParseAddrPort("10.0.0.11:6444")}}}
	if _, err := KeepalivedHAProxy(lb); err == nil || !strings.Contains(err.Error(), "images.keepalived") {
		t.Errorf("unpinned keepalived: %v", err)
	}
	if _, err := ParsePinned("docker.io/library/haproxy:3.2-alpine"); err == nil {
		t.Error("a tag without a digest was accepted")
	}
}

// TestStaticPodsReadTheirConfig: each static pod's command reads its
// config where its volume mounts the file kiln writes.
func TestStaticPodsReadTheirConfig(t *testing.T) {
	lb := LoadBalancer{
		VIP: netip.MustParseAddr("10.0.0.50"), VIPBits: 32, Port: 6443, Interface: "eth0", RouterID: 7, RouterName: "lab", AdvertInterval: 1,
		Backends:  []Backend{{"cp-1", netip.MustParseAddrPort("10.0.0.11:6444")}, {"cp-2", netip.MustParseAddrPort("10.0.0.12:6444")}},
		Overrides: map[string]string{"keepalived": "registry.test/keepalived:1@sha256:" + strings.Repeat("ab", 32)},
	}
	files, err := KeepalivedHAProxy(lb)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]string{}
	for _, f := range files {
		byName[f.Name] = string(f.Data)
	}
	for pod, config := range map[string]string{"keepalived.yaml": "keepalived.conf", "haproxy.yaml": "haproxy.cfg"} {
		var p struct {
			Spec struct {
				Containers []struct {
					Command      []string `yaml:"command"`
					VolumeMounts []struct {
						Name      string `yaml:"name"`
						MountPath string `yaml:"mountPath"`
					} `yaml:"volumeMounts"`
				} `yaml:"containers"`
				Volumes []struct {
					Name     string `yaml:"name"`
					HostPath struct {
						Path string `yaml:"path"`
					} `yaml:"hostPath"`
				} `yaml:"volumes"`
			} `yaml:"spec"`
		}
		if err := yaml.Unmarshal([]byte(byName[pod]), &p); err != nil {
			t.Fatalf("%s: %v", pod, err)
		}
		c := p.Spec.Containers[0]
		if len(p.Spec.Volumes) != 1 || p.Spec.Volumes[0].HostPath.Path != ConfigDir+"/"+config || len(c.VolumeMounts) != 1 {
			t.Fatalf("%s: volumes %+v", pod, p.Spec)
		}
		if cmd := strings.Join(c.Command, " "); !strings.Contains(cmd, " "+c.VolumeMounts[0].MountPath) {
			t.Errorf("%s: command %q does not read %s", pod, cmd, c.VolumeMounts[0].MountPath)
		}
	}
	cfg := byName["haproxy.cfg"]
	for _, want := range []string{"bind :6443", "server cp-1 10.0.0.11:6444", "server cp-2 10.0.0.12:6444", "option httpchk GET /readyz"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("haproxy.cfg lacks %q:\n%s", want, cfg)
		}
	}
	ka := byName["keepalived.conf"]
	for _, want := range []string{"virtual_router_id 7", "interface eth0", "10.0.0.50/32", "https://127.0.0.1:6443/readyz"} {
		if !strings.Contains(ka, want) {
			t.Errorf("keepalived.conf lacks %q:\n%s", want, ka)
		}
	}
}

// TestHAProxyListensOnTheVIPFamily: an IPv6 VIP gets an IPv6 listener
// (the IPv4 one stays: keepalived checks HAProxy on 127.0.0.1).
func TestHAProxyListensOnTheVIPFamily(t *testing.T) {
	for vip, want := range map[string]bool{"10.0.0.50": false, "2001:db8::50": true} {
		lb := LoadBalancer{
			VIP: netip.MustParseAddr(vip), VIPBits: netip.MustParseAddr(vip).BitLen(), Port: 6443, Interface: "eth0", RouterID: 7, RouterName: "lab", AdvertInterval: 1,
			Backends:  []Backend{{"cp-1", netip.MustParseAddrPort("[2001:db8::11]:6444")}},
			Overrides: map[string]string{"keepalived": "registry.test/keepalived:1@sha256:" + strings.Repeat("ab", 32)},
		}
		files, err := KeepalivedHAProxy(lb)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if f.Name == "haproxy.cfg" {
				cfg := string(f.Data)
				if got := strings.Contains(cfg, "bind [::]:6443 v6only"); got != want || !strings.Contains(cfg, "bind :6443\n") {
					t.Errorf("VIP %s: IPv6 listener %t, want %t:\n%s", vip, got, want, cfg)
				}
			}
		}
	}
}
