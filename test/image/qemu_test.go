//go:build oracle

package image

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/base64"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// Booting Debian's own kernels under QEMU (TCG) mounts the baked
// partitions with the real Linux drivers of both architectures: the
// host's kernel reads btrfs and ext4 above, but has no vfat driver and is
// only ever amd64. Kernels and busybox come from Debian packages fetched
// by test/tools/qemu-kernels.sh; the initramfs is made here.

// TestKernelsReadBakedImages boots the amd64 kernel with a Flatcar and a
// Fedora CoreOS image and the arm64 kernel with a Raspberry Pi 4 image;
// each reads back every partition the bake touched: the config equals
// kiln render's, the files that were there and the firmware are intact.
func TestKernelsReadBakedImages(t *testing.T) {
	for _, g := range guests {
		if _, err := exec.LookPath(g.qemu); err != nil {
			t.Fatalf("%s not found: install Debian's %s (.ci/install-deps)", g.qemu, g.pkg)
		}
	}
	// Both kernels, before the boots run in parallel: one apt at a time.
	if out, err := exec.Command(filepath.Join(repo, "test", "tools", "qemu-kernels.sh")).CombinedOutput(); err != nil {
		t.Fatalf("test/tools/qemu-kernels.sh: %v\n%s", err, out)
	}
	e := setup(t)
	flatcar := e.bake(t, e.flCluster, append(e.flatcarArgs(t.TempDir()), "--role", "init", "--dest", t.TempDir())...)
	fcos := e.bake(t, e.fcCluster, "--profile", "fcos-x86_64", "--role", "control-plane", "--mirror", e.srv.URL, "--insecure-mirror", "--cache-dir", t.TempDir(), "--dest", t.TempDir())
	base, zipPath, fw := rpi4Inputs(t, e)
	rpi := e.bakeRPi4(t, base, zipPath)

	oem := func(br bakeResult, fx fixture, role, arch string) readBack {
		files := map[string][]byte{"config.ign": render(t, e.flCluster, role, arch)}
		for p, data := range fx.files["OEM"] {
			files[p] = data
		}
		return readBack{br, "OEM", "btrfs", files}
	}
	configTxt := must(t, "mcopy", "-n", "-i", extract(t, rpi.Image, "EFI-SYSTEM"), "::/config.txt", "-")
	boots := []struct {
		g     guest
		reads []readBack
	}{
		{guests["amd64"], []readBack{
			oem(flatcar, e.flatcar, "init", "amd64"),
			{fcos, "boot", "ext4", map[string][]byte{"ignition/config.ign": render(t, e.fcCluster, "control-plane", "amd64"), "ignition.firstboot": e.fcos.files["boot"]["ignition.firstboot"]}},
		}},
		{guests["arm64"], []readBack{
			oem(rpi, e.arm, "worker", "arm64"),
			{rpi, "EFI-SYSTEM", "vfat", map[string][]byte{"config.txt": configTxt, "RPI_EFI.fd": fw["RPI_EFI.fd"], "firmware/brcm/brcmfmac43455-sdio.bin": fw["firmware/brcm/brcmfmac43455-sdio.bin"], "flatcar/first_boot": {}}},
		}},
	}
	for _, b := range boots {
		t.Run(b.g.arch, func(t *testing.T) {
			t.Parallel()
			bootAndRead(t, b.g, b.reads)
		})
	}
}

// guest is one QEMU machine and the kernel it boots.
type guest struct {
	arch, qemu, pkg string
	args            []string // machine and CPU
	console         string
}

var guests = map[string]guest{
	"amd64": {arch: "amd64", qemu: "qemu-system-x86_64", pkg: "qemu-system-x86", args: []string{"-M", "q35"}, console: "ttyS0"},
	"arm64": {arch: "arm64", qemu: "qemu-system-aarch64", pkg: "qemu-system-arm", args: []string{"-M", "virt", "-cpu", "cortex-a57"}, console: "ttyAMA0"},
}

// bootTimeout bounds one boot. Measured on the 2-core machine, loaded,
// both boots at once: amd64 30-50 s, arm64 25-35 s; the ~11 and ~8 MB of
// base64 on the serial console take most of it.
const bootTimeout = 4 * time.Minute

// guestModules are the drivers the checks need; their dependencies are
// added from the modules' own .modinfo.
var guestModules = []string{"virtio_pci", "virtio_blk", "btrfs", "vfat", "nls_cp437", "nls_ascii"}

// readBack names files to read from one partition of a baked image.
type readBack struct {
	img    bakeResult
	part   string // GPT partition name
	fstype string
	files  map[string][]byte // path -> expected content
}

// toolsDir is where test/tools/qemu-kernels.sh puts kernels and busybox.
func toolsDir() string { return filepath.Join(kilnToolsDir(), "qemu") }

// kilnToolsDir is where test/tools keeps what it builds and fetches.
func kilnToolsDir() string {
	if d := os.Getenv("KILN_TOOLS_DIR"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "kiln-tools")
}

// bootAndRead boots the guest's kernel with the images as read-only
// virtio disks; its /init mounts each partition with the kernel's driver
// and prints the files base64-encoded between markers on the serial
// console. The files must equal the expected bytes.
func bootAndRead(t testing.TB, g guest, reads []readBack) {
	t.Helper()
	kdir := filepath.Join(toolsDir(), g.arch)
	var imgs []string
	disks := map[string]string{} // image -> vda, vdb, ...
	touched := map[string]bool{}
	for _, r := range reads {
		if disks[r.img.Image] == "" {
			disks[r.img.Image] = "vd" + string(rune('a'+len(imgs)))
			imgs = append(imgs, r.img.Image)
		}
		touched[r.img.Image+"/"+r.part] = true
	}
	for _, r := range reads {
		for _, p := range r.img.Touched {
			if !touched[r.img.Image+"/"+p] {
				t.Errorf("%s: touched partition %s is not read back", filepath.Base(r.img.Image), p)
			}
		}
	}
	initrd := filepath.Join(t.TempDir(), "initrd.cpio")
	writeInitramfs(t, initrd, kdir, initScript(reads, disks), guestModules)
	args := append([]string{"-accel", "tcg", "-m", "512", "-smp", "1", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-kernel", filepath.Join(kdir, "vmlinuz"), "-initrd", initrd,
		"-append", "console=" + g.console + " panic=-1 loglevel=4"}, g.args...)
	for i, img := range imgs {
		args = append(args, "-drive", fmt.Sprintf("file=%s,format=raw,if=none,id=d%d,readonly=on", img, i),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=d%d", i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, g.qemu, args...).CombinedOutput()
	console := strings.ReplaceAll(string(out), "\r", "")
	version, _ := os.ReadFile(filepath.Join(kdir, "version"))
	t.Logf("%s boot (%s): %s", g.arch, bytes.TrimSpace(version), time.Since(start).Round(100*time.Millisecond))
	if ctx.Err() != nil || err != nil || !strings.Contains(console, "KILN-DONE") {
		t.Fatalf("%s: %v (timeout %s: %v); console:\n%s", g.qemu, err, bootTimeout, ctx.Err(), withoutData(console))
	}
	if strings.Contains(console, "KILN-FAILED") {
		t.Errorf("the guest reported failures; console:\n%s", withoutData(console))
	}
	for i, r := range reads {
		if !regexp.MustCompile(fmt.Sprintf(`KILN-MOUNT %d /dev/vd\S+ /m/%d %s ro[, ]`, i, i, r.fstype)).MatchString(console) {
			t.Errorf("%s kernel did not mount %s of %s as %s read-only", g.arch, r.part, filepath.Base(r.img.Image), r.fstype)
		}
		for p, want := range r.files {
			got, ok := consoleFile(console, fmt.Sprintf("%d/%s", i, p))
			if !ok {
				t.Errorf("%s kernel: no %s from %s of %s on the console", g.arch, p, r.part, filepath.Base(r.img.Image))
			} else if !bytes.Equal(got, want) {
				t.Errorf("%s kernel reads %s from %s (%s) of %s: %d bytes that differ from the %d expected", g.arch, p, r.part, r.fstype, filepath.Base(r.img.Image), len(got), len(want))
			}
		}
	}
}

// withoutData is the console with runs of base64 lines (file data)
// replaced by their count.
func withoutData(console string) string {
	var s strings.Builder
	data := regexp.MustCompile(`^[A-Za-z0-9+/=]+\n$`)
	run := 0
	for _, l := range strings.SplitAfter(console, "\n") {
		if data.MatchString(l) {
			run++
			continue
		}
		if run > 0 {
			fmt.Fprintf(&s, "(%d lines of base64)\n", run)
			run = 0
		}
		s.WriteString(l)
	}
	return s.String()
}

// consoleFile decodes what /init printed between the markers of id.
func consoleFile(console, id string) ([]byte, bool) {
	_, rest, ok := strings.Cut(console, "KILN-BEGIN "+id+"\n")
	data, _, ended := strings.Cut(rest, "KILN-END "+id+"\n")
	if !ok || !ended {
		return nil, false
	}
	b, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(data), ""))
	return b, err == nil
}

// initScript is the guest's /init: load the modules, mount each partition
// read-only, print its files, power off. Partition numbers are found by
// GPT name in sysfs (PARTNAME in each partition's uevent).
func initScript(reads []readBack, disks map[string]string) string {
	var s strings.Builder
	s.WriteString(`#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in /lib/modules/*.ko; do insmod "$m" || echo "KILN-FAILED insmod $m"; done
fail() { echo "KILN-FAILED $*"; dmesg | tail -n 20; }
part() { # disk, GPT name -> /dev node, waiting for the kernel's scan
	for try in $(seq 100); do
		for u in /sys/block/$1/$1*/uevent; do
			grep -qx "PARTNAME=$2" "$u" 2>/dev/null && { echo /dev/$(sed -n 's/^DEVNAME=//p' "$u"); return; }
		done
		sleep 0.1
	done
}
show() { # id, file
	[ -f "$2" ] || { fail "no file $2"; return; }
	echo "KILN-BEGIN $1"; base64 "$2" || echo "KILN-FAILED read $2"; echo "KILN-END $1"
}
echo 1 >/proc/sys/kernel/printk
`)
	for i, r := range reads {
		disk := disks[r.img.Image]
		fmt.Fprintf(&s, "mkdir -p /m/%d; dev=$(part %s %s)\n", i, disk, r.part)
		fmt.Fprintf(&s, "if mount -t %s -o ro \"$dev\" /m/%d; then echo \"KILN-MOUNT %d $(grep \" /m/%d \" /proc/mounts)\"; else fail mount %s %s \"$dev\"; fi\n", r.fstype, i, i, i, disk, r.part)
		paths := make([]string, 0, len(r.files))
		for p := range r.files {
			paths = append(paths, p)
		}
		sort.Strings(paths)
		for _, p := range paths {
			fmt.Fprintf(&s, "show %d/%s /m/%d/%s\n", i, p, i, p)
		}
	}
	s.WriteString("echo KILN-DONE\npoweroff -f\n")
	return s.String()
}

// writeInitramfs writes a newc cpio: busybox, /init and the modules with
// their dependencies in load order (numbered, so the shell's glob keeps
// the order).
func writeInitramfs(t testing.TB, path, kdir, init string, modules []string) {
	t.Helper()
	busybox, err := os.ReadFile(filepath.Join(kdir, "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	c := pxe.NewCPIO(&buf)
	for _, d := range []string{"bin", "dev", "proc", "sys", "m", "lib/modules"} {
		c.Dir(d, 0o755)
	}
	c.File("bin/busybox", 0o755, busybox)
	c.File("init", 0o755, []byte(init))
	for i, ko := range moduleOrder(t, filepath.Join(kdir, "modules"), modules) {
		data, err := os.ReadFile(ko)
		if err != nil {
			t.Fatal(err)
		}
		c.File(fmt.Sprintf("lib/modules/%03d-%s", i, filepath.Base(ko)), 0o644, data)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// moduleOrder lists the .ko files for the wanted modules and everything
// they depend on, dependencies first, from each module's .modinfo as
// modprobe reads it. A depends= module must be a file here or built in
// (modules.builtin); a softdep pre: names an optional algorithm (btrfs
// asks for xxhash64, blake2b-256... which only some checksum types use)
// and is loaded when a module file of that name exists.
func moduleOrder(t testing.TB, moddir string, want []string) []string {
	t.Helper()
	norm := func(n string) string { return strings.ReplaceAll(n, "-", "_") }
	files := map[string]string{}
	filepath.WalkDir(filepath.Join(moddir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(p, ".ko") {
			files[norm(strings.TrimSuffix(d.Name(), ".ko"))] = p
		}
		return nil
	})
	builtin, err := os.ReadFile(filepath.Join(moddir, "modules.builtin"))
	if err != nil {
		t.Fatal(err)
	}
	isBuiltin := func(name string) bool {
		return regexp.MustCompile(`(?m)/` + regexp.QuoteMeta(name) + `\.ko$`).Match(bytes.ReplaceAll(builtin, []byte("-"), []byte("_")))
	}
	var order []string
	seen := map[string]bool{}
	var visit func(name string, required bool)
	visit = func(name string, required bool) {
		name = norm(name)
		ko, ok := files[name]
		if seen[name] || !ok && !required {
			return
		}
		seen[name] = true
		if !ok {
			if !isBuiltin(name) {
				t.Fatalf("module %s is neither in %s nor built in", name, moddir)
			}
			return
		}
		depends, softPre := modDeps(t, ko)
		for _, dep := range depends {
			visit(dep, true)
		}
		for _, dep := range softPre {
			visit(dep, false)
		}
		order = append(order, ko)
	}
	for _, m := range want {
		visit(m, true)
	}
	return order
}

// modDeps reads depends= and softdep=pre: from a module's .modinfo.
func modDeps(t testing.TB, ko string) (depends, softPre []string) {
	f, err := elf.Open(ko)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		t.Fatalf("%s has no .modinfo", ko)
	}
	info, err := sec.Data()
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		k, v, _ := strings.Cut(string(kv), "=")
		switch k {
		case "depends":
			depends = append(depends, strings.FieldsFunc(v, func(r rune) bool { return r == ',' })...)
		case "softdep":
			if pre, ok := strings.CutPrefix(v, "pre:"); ok {
				softPre = append(softPre, strings.Fields(strings.Split(pre, "post:")[0])...)
			}
		}
	}
	return depends, softPre
}
