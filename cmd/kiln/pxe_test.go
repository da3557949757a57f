package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/armor"
)

func TestPxe(t *testing.T) {
	dir, cf := newCluster(t)
	art := filepath.Join(dir, "stand-in")
	if err := os.WriteFile(art, []byte("stand-in"), 0o644); err != nil {
		t.Fatal(err)
	}
	kiln(t, "-c", cf, "pin", "--arch", "amd64", "--file", "kubernetes-sysext="+art).expect(t, exitOK)
	out := filepath.Join(dir, "pxe")
	initrd := filepath.Join(dir, "initrd.img")
	os.WriteFile(initrd, []byte("stand-in initrd"), 0o644)
	local := []string{"--kernel", art, "--initramfs", initrd}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--server-url", "http://10.0.0.5:8080"}, exitInput, "--dest and --server-url are required"},
		{[]string{"--dest", out, "--server-url", "10.0.0.5:8080"}, exitInput, "--server-url"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--matchbox-known-only"}, exitInput, "give --matchbox-url too"},
		{[]string{"--output", out, "--server-url", "http://10.0.0.5:8080"}, exitInput, "-o is the result's format; a command's output folder or file is --dest"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--profile", "flatcar-rpi4"}, exitUnsupported, "cannot boot from the network"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--profile", "fcos-x86_64"}, exitInput, "os.name flatcar"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--mode", "boss=live"}, exitInput, "--mode boss=live"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--mode", "worker=ram"}, exitInput, "use live or install"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--disk", "/dev/sda;reboot"}, exitInput, "--disk"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--kernel", art, "--initramfs", art}, exitInput, "distinct names"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--kernel", art}, exitInput, "give all of --kernel, --initramfs"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--kernel", art, "--initramfs", initrd, "--rootfs", art}, exitInput, "--rootfs"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--kernel", art, "--initramfs", filepath.Join(dir, "missing")}, exitInput, "--initramfs"},
		// A mirror nothing authenticates, refused before any download.
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--mirror", "http://127.0.0.1:9/{channel}"}, exitInput, "is not https://: anyone on the way can then choose which release you get"},
		{[]string{"--dest", out, "--server-url", "http://10.0.0.5:8080", "--mirror", "mirror.example"}, exitInput, "give the mirror's URL"},
	} {
		kiln(t, append([]string{"-c", cf, "pxe"}, c.args...)...).expect(t, c.code, c.want)
		if _, err := os.Stat(out); err == nil {
			t.Fatalf("%v: a refused pxe wrote %s", c.args, out)
		}
	}
	_, fcos := newCluster(t, "--os", "fcos")
	// An https mirror of Fedora CoreOS needs no flag: its files are checked
	// against Fedora's embedded keys, or the keys given (here: the mirror
	// is not there).
	kiln(t, "-c", fcos, "pxe", "--dest", out, "--server-url", "http://10.0.0.5:8080", "--profile", "fcos-x86_64", "--mirror", "https://127.0.0.1:9", "--cache-dir", t.TempDir()).
		expect(t, exitDownload, "127.0.0.1:9")
	fedora, _ := openpgp.NewEntity("fedora", "", "fedora@kiln.invalid", nil)
	var key bytes.Buffer
	w, _ := armor.Encode(&key, openpgp.PublicKeyType, nil)
	fedora.Serialize(w)
	w.Close()
	keyFile := filepath.Join(dir, "fedora.asc")
	os.WriteFile(keyFile, key.Bytes(), 0o644)
	kiln(t, "-c", fcos, "pxe", "--dest", out, "--server-url", "http://10.0.0.5:8080", "--profile", "fcos-x86_64", "--mirror", "https://127.0.0.1:9", "--signing-key", keyFile, "--cache-dir", t.TempDir()).
		expect(t, exitDownload, "127.0.0.1:9")
	r := kiln(t, append([]string{"-c", cf, "pxe", "--dest", out, "--server-url", "http://10.0.0.5:8080", "-o", "json"}, local...)...)
	r.expect(t, exitOK)
	var res struct {
		Dir   string
		Nodes []struct{ Name, Mode string }
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Dir != out || len(res.Nodes) != 3 {
		t.Fatalf("pxe -o json: %v\n%s", err, r.stdout)
	}
	for _, n := range res.Nodes {
		if want := map[string]string{"default-init": "install", "default-control-plane": "install", "default-worker": "live"}[n.Name]; n.Mode != want {
			t.Errorf("%s: mode %s, want %s", n.Name, n.Mode, want)
		}
	}
	// Refused before anything is downloaded (offline, a download fails
	// with exit 5).
	kiln(t, "-c", cf, "pxe", "--dest", out, "--server-url", "http://10.0.0.5:8080").expect(t, exitInput, "--force")
}
