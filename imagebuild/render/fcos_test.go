package render

import (
	"slices"
	"strings"
	"testing"

	"github.com/coreos/ignition/v2/config/v3_4"
	"github.com/coreos/ignition/v2/config/v3_4/types"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// TestFedoraCoreOSFacts checks every role's Fedora CoreOS config, on both
// arches, against what Fedora CoreOS is (its docs; README, "Fedora
// CoreOS parity"): an ostree system whose /usr is read-only except
// /usr/local (a link into /var), whose root is composefs since Fedora 41
// (no new top-level folders), which configures networks with
// NetworkManager, ships no kubelet, no sysext and its own containerd
// unit, and runs SELinux enforcing.
func TestFedoraCoreOSFacts(t *testing.T) {
	s := loadSecrets(t)
	c := loadCluster(t, "fcos")
	// Top-level folders Fedora CoreOS has and Ignition may write under.
	writable := []string{"etc", "var", "opt", "root", "home", "srv"}
	for _, arch := range Arches {
		for _, role := range nodeconfig.Roles {
			ign, err := Ignition(Input{Cluster: c, Secrets: s, Role: role, Arch: arch, Agent: fakeAgent(t, arch)})
			if err != nil {
				t.Fatal(err)
			}
			cfg, rpt, err := v3_4.Parse(ign)
			if err != nil || len(rpt.Entries) > 0 {
				t.Fatalf("%s/%s: %v %s", arch, role, err, rpt)
			}
			if cfg.Ignition.Version != "3.4.0" {
				t.Errorf("%s/%s: Ignition spec %s, want 3.4.0 (Butane fcos 1.5.0)", arch, role, cfg.Ignition.Version)
			}
			var paths []string
			for _, f := range cfg.Storage.Files {
				paths = append(paths, f.Path)
				if strings.HasPrefix(f.Path, "/usr/local/bin/") && (f.Mode == nil || *f.Mode != 0o755) {
					t.Errorf("%s/%s: %s is not mode 0755", arch, role, f.Path)
				}
			}
			for _, d := range cfg.Storage.Directories {
				paths = append(paths, d.Path)
			}
			for _, l := range cfg.Storage.Links {
				paths = append(paths, l.Path)
			}
			for _, p := range paths {
				top, _, _ := strings.Cut(strings.TrimPrefix(p, "/"), "/")
				switch {
				case strings.HasPrefix(p, "/usr/") && !strings.HasPrefix(p, "/usr/local/"):
					t.Errorf("%s/%s: %s is under the read-only /usr", arch, role, p)
				case top != "usr" && !slices.Contains(writable, top):
					t.Errorf("%s/%s: %s needs a top-level folder Fedora CoreOS does not have (composefs root)", arch, role, p)
				case strings.HasPrefix(p, "/etc/extensions/") || strings.HasPrefix(p, "/etc/sysupdate"):
					t.Errorf("%s/%s: %s is Flatcar's sysext machinery", arch, role, p)
				case strings.HasPrefix(p, "/etc/systemd/network/"):
					t.Errorf("%s/%s: %s is systemd-networkd's; Fedora CoreOS uses NetworkManager", arch, role, p)
				case p == "/etc/selinux/config":
					t.Errorf("%s/%s: kiln must leave SELinux as Fedora CoreOS sets it (enforcing)", arch, role)
				}
			}
			if slices.ContainsFunc(cfg.KernelArguments.ShouldExist, func(a types.KernelArgument) bool {
				return strings.HasPrefix(string(a), "selinux=") || strings.HasPrefix(string(a), "enforcing=")
			}) {
				t.Errorf("%s/%s: a kernel argument changes SELinux", arch, role)
			}
			units := map[string]string{}
			for _, u := range cfg.Systemd.Units {
				contents := ""
				if u.Contents != nil {
					contents = *u.Contents
				}
				units[u.Name] = contents
			}
			// Fedora CoreOS ships containerd.service: kiln enables it and
			// writes no unit of its own.
			if contents, ok := units["containerd.service"]; !ok || contents != "" {
				t.Errorf("%s/%s: containerd.service enabled %v, contents %q: want enabled, Fedora CoreOS's own unit", arch, role, ok, contents)
			}
			// No kubelet ships with it: kiln's unit runs the pinned binary.
			if !strings.Contains(units["kubelet.service"], "ExecStart=/usr/local/bin/kubelet ") {
				t.Errorf("%s/%s: kubelet.service does not run /usr/local/bin/kubelet:\n%s", arch, role, units["kubelet.service"])
			}
			files, _ := decodedFiles(t, ign)
			for _, cfgFile := range []string{"/etc/kiln/kubeadm-init.yaml", "/etc/kiln/kubeadm-join.yaml"} {
				kc, ok := files[cfgFile]
				if !ok {
					continue
				}
				// kubeadm's defaults put volume plugins under /usr/libexec,
				// read-only here.
				if strings.Contains(string(kc), "/usr/libexec") || !strings.Contains(string(kc), "volume-plugin-dir") {
					t.Errorf("%s/%s: %s leaves volume plugins under /usr/libexec:\n%s", arch, role, cfgFile, kc)
				}
			}
		}
	}
}
