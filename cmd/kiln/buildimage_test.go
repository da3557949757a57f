package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestProfilesCommand(t *testing.T) {
	r := kiln(t, "profiles")
	r.expect(t, exitOK)
	for _, name := range []string{"flatcar-amd64", "flatcar-arm64", "flatcar-rpi4", "fcos-x86_64", "fcos-aarch64"} {
		if !strings.Contains(r.stdout, name) {
			t.Errorf("profiles lacks %s:\n%s", name, r.stdout)
		}
	}
	r = kiln(t, "profiles", "fcos-aarch64", "-o", "json")
	r.expect(t, exitOK)
	var p struct {
		OS, Arch string
		Image    struct{ StreamArch string }
	}
	if err := json.Unmarshal([]byte(r.stdout), &p); err != nil || p.OS != "fcos" || p.Arch != "arm64" || p.Image.StreamArch != "aarch64" {
		t.Errorf("profiles -o json: %+v %v\n%s", p, err, r.stdout)
	}
	kiln(t, "profiles", "flatcar-rpi5").expect(t, exitUnsupported, "Raspberry Pi 5", "Ethernet")
	kiln(t, "profiles", "ubuntu-amd64").expect(t, exitInput, "flatcar-amd64")
}

func TestBuildImageInputErrors(t *testing.T) {
	dir, cf := newCluster(t)
	art := filepath.Join(dir, "sysext.raw")
	if err := os.WriteFile(art, []byte("stand-in"), 0o644); err != nil {
		t.Fatal(err)
	}
	kiln(t, "-c", cf, "pin", "--arch", "amd64", "--file", "kubernetes-sysext="+art).expect(t, exitOK)
	base := filepath.Join(t.TempDir(), "missing.bin")
	fleet := filepath.Join(dir, "fleet.yaml")
	data, err := os.ReadFile(cf)
	if err != nil {
		t.Fatal(err)
	}
	data = append(data, "profile: flatcar-amd64\nnodes:\n  - {name: pi-1, role: init, profile: flatcar-rpi4}\n  - {name: mini-1, role: worker}\n"...)
	if err := os.WriteFile(fleet, data, 0o600); err != nil {
		t.Fatal(err)
	}
	noProfile := filepath.Join(dir, "fleet-no-profile.yaml")
	if err := os.WriteFile(noProfile, bytes.Replace(data, []byte("profile: flatcar-amd64\n"), nil, 1), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		code int
		want []string
	}{
		{[]string{"--profile", "flatcar-amd64"}, exitInput, []string{"--role is required", "or --node NAME"}},
		{[]string{"--role", "worker"}, exitInput, []string{"--profile is required", "profile: for every node, nodes[].profile for one"}},
		{[]string{"--node", "nobody"}, exitInput, []string{`--node "nobody" is not in the cluster file's nodes list (it lists pi-1, mini-1)`}},
		{[]string{"--node", "pi-1", "--role", "worker"}, exitInput, []string{"--role worker contradicts nodes[0].role init of node pi-1"}},
		{[]string{"--node", "pi-1", "--profile", "flatcar-amd64"}, exitInput, []string{"--profile flatcar-amd64 contradicts nodes[0].profile flatcar-rpi4 of node pi-1"}},
		{[]string{"--node", "mini-1", "--profile", "flatcar-arm64"}, exitInput, []string{"--profile flatcar-arm64 contradicts profile (the cluster's default) flatcar-amd64 of node mini-1"}},
		{[]string{"--node", "pi-1", "--base-image", art}, exitInput, []string{"kubernetes-sysext for arm64 is not pinned"}},
		{[]string{"--node", "mini-1", "--base-image", art}, exitInput, []string{"--base-image " + art + ": base image: not a disk image kiln can bake"}},
		{[]string{"--role", "boss", "--profile", "flatcar-amd64"}, exitInput, []string{"--role"}},
		{[]string{"--role", "worker", "--profile", "flatcar-rpi5"}, exitUnsupported, []string{"Raspberry Pi 5"}},
		{[]string{"--role", "worker", "--profile", "fcos-x86_64"}, exitInput, []string{"os.name flatcar"}},
		{[]string{"--role", "worker", "--profile", "flatcar-amd64", "--base-image", base}, exitInput, []string{"--base-image"}},
		{[]string{"--role", "worker", "--profile", "flatcar-amd64", "--base-image", art, "--firmware", art}, exitInput, []string{"takes no firmware"}},
		{[]string{"--role", "worker", "--profile", "flatcar-amd64", "--base-image", art, "--compress", "gz"}, exitInput, []string{"--compress"}},
		{[]string{"--role", "worker", "--profile", "flatcar-amd64", "--base-image", art}, exitInput, []string{"--base-image " + art + ": base image: not a disk image kiln can bake"}},
		{[]string{"--role", "worker", "--profile", "flatcar-amd64", "--base-image", art, "--base-image", art}, exitInput, []string{"--base-image is given 2 times"}},
		{[]string{"--node", "mini-1", "--base-image", "flatcar-rpi4=" + art}, exitInput, []string{"--base-image flatcar-rpi4=" + art + ": no image is baked for profile flatcar-rpi4 (the profiles are flatcar-amd64)"}},
		{[]string{"--all", "--node", "pi-1"}, exitInput, []string{"--all bakes every node and role: drop --node and --role"}},
		{[]string{"--all", "--base-image", art}, exitInput, []string{"the images are for 2 profiles (flatcar-rpi4, flatcar-amd64): give --base-image PROFILE=FILE for each"}},
		{[]string{"--all", "--base-image", "fcos-x86_64=" + art}, exitInput, []string{"no image is baked for profile fcos-x86_64"}},
		{[]string{"--all", "--base-image", "flatcar-amd64=" + art}, exitInput, []string{"pi-1: ", "kubernetes-sysext for arm64 is not pinned"}},
	} {
		file := cf // names no profile
		if slices.Contains(c.args, "--node") || slices.Contains(c.args, "--all") {
			file = fleet
		}
		r := kiln(t, append([]string{"-c", file, "build-image"}, c.args...)...)
		r.expect(t, c.code, c.want...)
	}
	kiln(t, "-c", noProfile, "build-image", "--all").expect(t, exitInput, "mini-1 has no profile: set nodes[1].profile, or profile: for the whole cluster, or give --profile")
	kiln(t, "-c", cf, "build-image", "--all").expect(t, exitInput, "nothing to bake")
	// render takes the node's arch from its profile too.
	kiln(t, "-c", fleet, "render", "--node", "pi-1", "--arch", "amd64").expect(t, exitInput, "--arch amd64 contradicts node pi-1's profile flatcar-rpi4, which is arm64")
	kiln(t, "-c", fleet, "render", "--node", "pi-1").expect(t, exitInput, "kubernetes-sysext for arm64 is not pinned")
	kiln(t, "-c", fleet, "render", "--node", "mini-1", "--format", "node").expect(t, exitOK)
}
