package profiles

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/ProtonMail/go-crypto/openpgp"
)

func TestEmbeddedTargetsLoad(t *testing.T) {
	want := "fcos-aarch64,fcos-x86_64,flatcar-amd64,flatcar-arm64,flatcar-rpi4"
	if got := strings.Join(TargetNames(), ","); got != want {
		t.Fatalf("TargetNames() = %s, want %s", got, want)
	}
	rpi, err := LookupTarget("flatcar-rpi4")
	if err != nil {
		t.Fatal(err)
	}
	if rpi.Firmware == nil || rpi.Arch != "arm64" || rpi.Inject.Method != InjectFlatcarOEM {
		t.Errorf("flatcar-rpi4 = %+v", rpi)
	}
	fl, _ := LookupTarget("flatcar-amd64")
	if got := fl.Image.Expand(fl.Image.URL, fl.Image.Origin, "beta", "4593.1.0"); got != "https://beta.release.flatcar-linux.net/amd64-usr/4593.1.0/flatcar_production_image.bin.bz2" {
		t.Errorf("flatcar URL = %s", got)
	}
	if got := fl.Image.Expand(fl.Image.URL, "https://mirror.test/flatcar/", "beta", "1.2.3"); got != "https://mirror.test/flatcar/amd64-usr/1.2.3/flatcar_production_image.bin.bz2" {
		t.Errorf("mirrored URL = %s", got)
	}
	if _, err := LookupTarget("flatcar-x86"); err == nil || !strings.Contains(err.Error(), "flatcar-amd64") {
		t.Errorf("unknown target error: %v", err)
	}
}

func TestRaspberryPi5Refused(t *testing.T) {
	for _, name := range []string{"flatcar-rpi5", "fcos-RPi5"} {
		_, err := LookupTarget(name)
		var u *UnsupportedTargetError
		if !errors.As(err, &u) || !strings.Contains(err.Error(), "Ethernet") || !strings.Contains(err.Error(), "flatcar-rpi4") {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestSigningKeyEmbedded(t *testing.T) {
	k, err := SigningKey("flatcar")
	if err != nil || !strings.Contains(string(k), "BEGIN PGP PUBLIC KEY BLOCK") {
		t.Fatalf("flatcar key: %v", err)
	}
	for _, bad := range []string{"", "../os/fcos", "nope"} {
		if _, err := SigningKey(bad); err == nil {
			t.Errorf("SigningKey(%q) accepted", bad)
		}
	}
}

// The embedded Fedora keys are Fedora's primary keys for releases 42 to
// 47, by fingerprint (keys/README: taken from Debian's signed archive;
// 42 to 44 also match fedoraproject.org/security as quoted in public
// repositories).
func TestFedoraKeysEmbedded(t *testing.T) {
	k, err := SigningKey("fedora")
	if err != nil {
		t.Fatal(err)
	}
	ring, err := openpgp.ReadArmoredKeyRing(bytes.NewReader(k))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ring {
		got = append(got, strings.ToUpper(hex.EncodeToString(e.PrimaryKey.Fingerprint)))
	}
	want := []string{
		"B0F4950458F69E1150C6C5EDC8AC4916105EF944", // 42
		"C6E7F081CF80E13146676E88829B606631645531", // 43
		"36F612DCF27F7D1A48A835E4DBFCF71C6D9F90A6", // 44
		"4F50A6114CD5C6976A7F1179655A4B02F577861E", // 45
		"D924B10D3E810DABDD8B56B596E7E91491211FCE", // 46
		"B2E766FA50CA6FA2D5ED06FC09D879E09488FB64", // 47
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("fedora keys %v, want %v", got, want)
	}
}

func TestBadTargetsRejected(t *testing.T) {
	good := `name: x
description: test
os: fcos
arch: amd64
board: generic
image: {source: fcos-stream, origin: 'https://o.test', streamURL: '{origin}/s/{channel}.json', streamArch: x86_64, signingKey: fedora}
inject: {method: fcos-boot, partition: boot}
`
	for _, ok := range []string{good, good + "pxe: {stream: true}\n"} {
		if _, err := loadAll[Target](fstest.MapFS{"target/x.yaml": {Data: []byte(ok)}}, "target"); err != nil {
			t.Fatalf("good target: %v", err)
		}
	}
	for name, body := range map[string]string{
		"name mismatch":   strings.Replace(good, "name: x", "name: y", 1),
		"unknown field":   good + "extra: 1\n",
		"bad arch":        strings.Replace(good, "arch: amd64", "arch: riscv64", 1),
		"bad board":       strings.Replace(good, "board: generic", "board: rpi3", 1),
		"rpi4 no fw":      strings.Replace(strings.Replace(good, "board: generic", "board: rpi4", 1), "arch: amd64", "arch: arm64", 1),
		"http origin":     strings.Replace(good, "https://o.test", "http://o.test", 1),
		"unknown source":  strings.Replace(good, "source: fcos-stream", "source: ftp", 1),
		"no signing key":  strings.Replace(good, ", signingKey: fedora", "", 1),
		"method for os":   strings.Replace(good, "method: fcos-boot", "method: flatcar-oem", 1),
		"unknown os":      strings.Replace(good, "os: fcos", "os: ubuntu", 1),
		"no partition":    strings.Replace(good, ", partition: boot", "", 1),
		"pxe urls stream": good + "pxe: {kernel: 'https://o.test/k'}\n",
		"pxe nothing":     good + "pxe: {}\n",
		"firmware on gen": good + "firmware: {name: f, url: 'https://f.test/f.zip', sha256: '', partition: ESP, requiredFiles: [a], configTxt: x}\n",
	} {
		if _, err := loadAll[Target](fstest.MapFS{"target/x.yaml": {Data: []byte(body)}}, "target"); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
