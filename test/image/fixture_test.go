//go:build oracle

package image

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// GPT facts from DESIGN.md section 4.
const (
	flatcarDiskGUID = "00000000-0000-0000-0000-000000000001"
	fcosDiskGUID    = "00000000-0000-4000-A000-000000000001"
	usrAGUID        = "7130C94A-213A-4E5A-8E26-6CCE9662F132"
	typeESP         = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
	typeBIOS        = "21686148-6449-6E6F-744E-656564454649"
	typeUSR         = "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6"
	typeLinux       = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
	typeOEMConfig   = "C95DC21A-DF0E-4340-8D7B-26CBFA9A03E0"
	typeRoot        = "3884DD41-8582-4404-B9A8-E9B84F2DF50E"
	typeXBOOTLDR    = "BC13C2FF-59E6-4262-A352-B275FD6F7172"
)

// part is one fixture partition: GPT entry plus how to fill it.
type part struct {
	num       int
	name, typ string
	guid      string // empty: random
	mib       int    // 0: rest of the disk
	fill      func(t testing.TB, path string, size int64)
}

// must runs a tool and fails the test with its output if it fails.
func must(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s\n%s", name, strings.Join(args, " "), err, out, stderr.String())
	}
	return out
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// tree writes files (path -> content) under a new folder.
func tree(t testing.TB, files map[string][]byte) string {
	dir := t.TempDir()
	for p, data := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func fillRandom(n int) func(t testing.TB, path string, size int64) {
	return func(t testing.TB, path string, size int64) {
		if err := os.WriteFile(path, randomBytes(t, n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func fillFAT(bits string, files map[string][]byte, label string) func(t testing.TB, path string, size int64) {
	return func(t testing.TB, path string, size int64) {
		must(t, "mkfs.vfat", "-C", "-F", bits, "-s", "1", "-n", label, path, fmt.Sprint(size/1024))
		dir := tree(t, files)
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		args := []string{"-s", "-m", "-i", path}
		for _, e := range entries {
			args = append(args, filepath.Join(dir, e.Name()))
		}
		must(t, "mcopy", append(args, "::/")...)
	}
}

func fillBtrfs(label string, files map[string][]byte) func(t testing.TB, path string, size int64) {
	return func(t testing.TB, path string, size int64) {
		if err := os.WriteFile(path, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, size); err != nil {
			t.Fatal(err)
		}
		must(t, "mkfs.btrfs", "-q", "-L", label, "--rootdir", tree(t, files), path)
		// mkfs.btrfs grows a file below its minimum size (about 109 MiB,
		// more with data).
		if fi, err := os.Stat(path); err != nil || fi.Size() != size {
			t.Fatalf("%s: a %d MiB partition is too small for btrfs (%v)", label, size>>20, err)
		}
	}
}

func fillExt4(label string, files map[string][]byte, links map[string]string) func(t testing.TB, path string, size int64) {
	return func(t testing.TB, path string, size int64) {
		dir := tree(t, files)
		for name, target := range links {
			if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
		// Below 512 MiB mke2fs picks 1 KiB blocks: the case DESIGN.md
		// says go-diskfs corrupts.
		must(t, "mke2fs", "-q", "-t", "ext4", "-O", "metadata_csum", "-L", label, "-d", dir, path, fmt.Sprintf("%dk", size/1024))
	}
}

// buildDisk makes a GPT disk image with sgdisk and writes each
// partition's filesystem (made by its standard tool) into place.
func buildDisk(t testing.TB, path, diskGUID string, totalMiB int, parts []part) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, int64(totalMiB)<<20); err != nil {
		t.Fatal(err)
	}
	args := []string{"-U", diskGUID}
	for _, p := range parts {
		end := fmt.Sprintf("+%dM", p.mib)
		if p.mib == 0 {
			end = "0"
		}
		args = append(args, fmt.Sprintf("-n%d:0:%s", p.num, end), fmt.Sprintf("-t%d:%s", p.num, p.typ), fmt.Sprintf("-c%d:%s", p.num, p.name))
		if p.guid != "" {
			args = append(args, fmt.Sprintf("-u%d:%s", p.num, p.guid))
		}
	}
	must(t, "sgdisk", append(args, path)...)
	table := readTable(t, path)
	for _, p := range parts {
		if p.fill == nil {
			continue
		}
		e := table.byName(t, p.name)
		fs := filepath.Join(t.TempDir(), "fs.img")
		p.fill(t, fs, e.Size*512)
		must(t, "dd", "if="+fs, "of="+path, "bs=1M", "oflag=seek_bytes", fmt.Sprintf("seek=%d", e.Start*512), "conv=notrunc,sparse", "status=none")
	}
}

// sfdiskTable is `sfdisk --json` output.
type sfdiskTable struct {
	PartitionTable struct {
		Label      string `json:"label"`
		ID         string `json:"id"`
		Partitions []struct {
			Node  string `json:"node"`
			Start int64  `json:"start"`
			Size  int64  `json:"size"`
			Type  string `json:"type"`
			UUID  string `json:"uuid"`
			Name  string `json:"name"`
		} `json:"partitions"`
	} `json:"partitiontable"`
}

type sfEntry struct{ Start, Size int64 }

func readTable(t testing.TB, path string) sfdiskTable {
	t.Helper()
	var tab sfdiskTable
	if err := json.Unmarshal(must(t, "sfdisk", "--json", path), &tab); err != nil {
		t.Fatal(err)
	}
	return tab
}

func (s sfdiskTable) byName(t testing.TB, name string) sfEntry {
	t.Helper()
	for _, p := range s.PartitionTable.Partitions {
		if p.Name == name {
			return sfEntry{p.Start, p.Size}
		}
	}
	t.Fatalf("no partition %s", name)
	return sfEntry{}
}

// fixture is a vendor-like base image and what it holds.
type fixture struct {
	path  string
	files map[string]map[string][]byte // partition -> files made by the fixture
}

// flatcarFixture mirrors Flatcar's GPT at small sizes: an OEM btrfs that
// already holds files, USR-A with its fixed GUID and a btrfs /usr naming
// its release (lib/os-release), the ESP with the first-boot flag.
func flatcarFixture(t testing.TB, dir, arch string) fixture {
	efi := map[string]string{"amd64": "EFI/boot/bootx64.efi", "arm64": "EFI/boot/bootaa64.efi"}[arch]
	esp := map[string][]byte{efi: randomBytes(t, 64<<10), "flatcar/first_boot": {}}
	oem := map[string][]byte{"grub.cfg": []byte("set linux_append=\"\"\n"), "oem-release": []byte("ID=kiln-fixture\n")}
	f := fixture{path: filepath.Join(dir, "flatcar-"+arch+".bin"), files: map[string]map[string][]byte{"EFI-SYSTEM": esp, "OEM": oem}}
	buildDisk(t, f.path, flatcarDiskGUID, 432, []part{
		{num: 1, name: "EFI-SYSTEM", typ: typeESP, mib: 64, fill: fillFAT("32", esp, "EFI-SYSTEM")},
		{num: 2, name: "BIOS-BOOT", typ: typeBIOS, mib: 2, fill: fillRandom(1 << 20)},
		{num: 3, name: "USR-A", typ: typeUSR, guid: usrAGUID, mib: 128, fill: fillBtrfs("USR", map[string][]byte{"lib/os-release": []byte("ID=flatcar\nVERSION=" + flatcarVersion + "\nVERSION_ID=" + flatcarVersion + "\n"), "bin/stand-in": randomBytes(t, 8<<20)})},
		{num: 4, name: "USR-B", typ: typeUSR, mib: 32},
		{num: 6, name: "OEM", typ: typeLinux, mib: 128, fill: fillBtrfs("OEM", oem)},
		{num: 7, name: "OEM-CONFIG", typ: typeOEMConfig, mib: 8},
		{num: 9, name: "ROOT", typ: typeRoot, fill: fillExt4("ROOT", map[string][]byte{"README": []byte("root\n")}, nil)},
	})
	return f
}

// fcosFixture mirrors Fedora CoreOS's metal image at small sizes: an ext4
// boot made by mke2fs with metadata_csum and 1 KiB blocks, holding a
// kernel, a BLS entry, a symlink and ignition.firstboot with GRUB settings.
func fcosFixture(t testing.TB, dir string) fixture {
	boot := map[string][]byte{
		"loader.1/entries/ostree-1.conf":        []byte("title Fedora CoreOS\nlinux /ostree/fedora-coreos-1/vmlinuz\n"),
		"ostree/fedora-coreos-1/vmlinuz":        randomBytes(t, 2<<20),
		"ignition.firstboot":                    []byte("set ignition_network_kcmdline=''\n"),
		"grub2/grub.cfg":                        []byte("set timeout=1\n"),
		"ostree/fedora-coreos-1/initramfs.img":  randomBytes(t, 1<<20),
		"coreos/platforms.json":                 []byte("{}\n"),
		"ostree/fedora-coreos-1/.vmlinuz.hmac":  []byte("hmac\n"),
		"efi/placeholder-for-mountpoint/.keep":  {},
		"loader.1/entries/.keep-entries-folder": {},
	}
	esp := map[string][]byte{"EFI/BOOT/BOOTX64.EFI": randomBytes(t, 64<<10), "EFI/fedora/grub.cfg": []byte("search --label boot\n")}
	f := fixture{path: filepath.Join(dir, "fcos.raw"), files: map[string]map[string][]byte{"boot": boot, "EFI-SYSTEM": esp}}
	buildDisk(t, f.path, fcosDiskGUID, 180, []part{
		{num: 1, name: "BIOS-BOOT", typ: typeBIOS, mib: 1, fill: fillRandom(512 << 10)},
		{num: 2, name: "EFI-SYSTEM", typ: typeESP, mib: 32, fill: fillFAT("16", esp, "EFI-SYSTEM")},
		{num: 3, name: "boot", typ: typeXBOOTLDR, mib: 64, fill: fillExt4("boot", boot, map[string]string{"loader": "loader.1"})},
		{num: 4, name: "root", typ: typeLinux, fill: fillRandom(4 << 20)},
	})
	return f
}
