package profiles

import (
	"strings"
	"testing"
	"testing/fstest"
)

func TestEmbeddedProfilesLoad(t *testing.T) {
	if got := strings.Join(OSNames(), ","); got != "fcos,flatcar" {
		t.Fatalf("OSNames() = %s", got)
	}
	fl, err := LookupOS("flatcar")
	if err != nil {
		t.Fatal(err)
	}
	if !fl.ValidVersion("4593.2.3") || !fl.ValidVersion("current") || fl.ValidVersion("42.20251012.3.0") {
		t.Error("flatcar version pattern")
	}
	if !fl.HasChannel("lts") || fl.HasChannel("testing") {
		t.Error("flatcar channels")
	}
	if _, err := LookupOS("ubuntu"); err == nil || !strings.Contains(err.Error(), "fcos, flatcar") {
		t.Errorf("unknown OS error: %v", err)
	}
	if got := (Download{}).Expand("k-{version}-{arch}.raw", "v1.37.2", "x86-64"); got != "k-v1.37.2-x86-64.raw" {
		t.Errorf("Expand = %s", got)
	}
	if got := (Download{Version: "v1.9.1"}).Expand("cni-{version}-{arch}.tgz", "v1.37.2", "arm64"); got != "cni-v1.9.1-arm64.tgz" {
		t.Errorf("Expand with its own version = %s", got)
	}
}

func TestBadProfilesRejected(t *testing.T) {
	good := `name: x
description: test
butane: {variant: flatcar, version: 1.1.0}
channels: [stable]
versionPattern: '^[0-9]+$'
agentPath: /opt/bin/a
criSocket: unix:///run/c.sock
volumePluginDir: /opt/v
containerd: {config: /etc/c.toml}
network: networkd
arches: {amd64: x86-64, arm64: arm64}
downloads:
  - {name: k, url: 'https://e/k', path: /opt/k, mode: 0644}
pxe: {kernelArgs: [a=1], initrdConfig: oem/config.ign, install: [/bin/i, '{disk}']}
`
	if _, err := loadAll[OS](fstest.MapFS{"os/x.yaml": {Data: []byte(good)}}, "os"); err != nil {
		t.Fatalf("good profile: %v", err)
	}
	for name, body := range map[string]string{
		"name mismatch":  strings.Replace(good, "name: x", "name: y", 1),
		"unknown field":  good + "extra: 1\n",
		"no arm64":       strings.Replace(good, ", arm64: arm64", "", 1),
		"http download":  strings.Replace(good, "https://e/k", "http://e/k", 1),
		"relative agent": strings.Replace(good, "/opt/bin/a", "bin/a", 1),
		"kubelet unit":   good + "kubeletUnit: true\n",
		"no pxe args":    strings.Replace(good, "[a=1]", "[]", 1),
		"network tool":   strings.Replace(good, "network: networkd", "network: netplan", 1),
		"abs initrd cfg": strings.Replace(good, "oem/config.ign", "/oem/config.ign", 1),
		"rel installer":  strings.Replace(good, "/bin/i", "bin/i", 1),
		"no containerd":  strings.Replace(good, "containerd: {config: /etc/c.toml}\n", "", 1),
		"drop-in unit":   strings.Replace(good, "{config: /etc/c.toml}", "{config: /etc/c.toml, dropIn: x}", 1),
	} {
		if _, err := loadAll[OS](fstest.MapFS{"os/x.yaml": {Data: []byte(body)}}, "os"); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
