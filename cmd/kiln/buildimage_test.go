package main

import (
	"encoding/json"
	"os"
	"path/filepath"
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
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--profile", "flatcar-amd64"}, exitInput, "--role and --profile are required"},
		{[]string{"--role", "boss", "--profile", "flatcar-amd64"}, exitInput, "--role"},
		{[]string{"--role", "worker", "--profile", "flatcar-rpi5"}, exitUnsupported, "Raspberry Pi 5"},
		{[]string{"--role", "worker", "--profile", "fcos-x86_64"}, exitInput, "os.name flatcar"},
		{[]string{"--role", "worker", "--profile", "flatcar-amd64", "--base-image", base}, exitInput, "--base-image"},
		{[]string{"--role", "worker", "--profile", "flatcar-amd64", "--base-image", art, "--firmware", art}, exitInput, "takes no firmware"},
		{[]string{"--role", "worker", "--profile", "flatcar-amd64", "--base-image", art, "--compress", "gz"}, exitInput, "--compress"},
		{[]string{"--role", "worker", "--profile", "flatcar-amd64", "--base-image", art}, exitInput, "--base-image " + art + ": base image: not a disk image kiln can bake"},
	} {
		r := kiln(t, append([]string{"-c", cf, "build-image"}, c.args...)...)
		r.expect(t, c.code, c.want)
	}
}
