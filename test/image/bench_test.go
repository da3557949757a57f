//go:build oracle

package image

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/imagebuild/baseimage"
)

// BenchmarkBakeThreeRoles bakes init, control-plane and worker images
// from a Flatcar-sized base (8.5 GiB sparse, 1 GiB btrfs OEM, 256 MiB of
// USR data) and compares with the same outputs made by standard tools:
// cp --sparse=always, btrfs restore + mkfs.btrfs --rootdir + dd for the
// OEM, sha256sum and bmaptool create. It reports kiln's time as a ratio
// of the baseline's, measured in the same run.
//
//	go test -tags oracle -run '^$' -bench BakeThreeRoles -benchtime 1x ./test/image/
func BenchmarkBakeThreeRoles(b *testing.B) {
	e := setup(b)
	dir := b.TempDir()
	base := bigFlatcarBase(b, dir, "amd64")
	roles := []string{"init", "control-plane", "worker"}
	b.ResetTimer()
	var kilnTime, toolTime time.Duration
	for b.Loop() {
		out := b.TempDir()
		start := time.Now()
		for _, role := range roles {
			r := kilnRun(b, nil, "-c", e.flCluster, "build-image", "--profile", "flatcar-amd64", "--role", role, "--base-image", base, "--dest", out, "--cache-dir", filepath.Join(dir, "cache"))
			if r.code != 0 {
				b.Fatalf("bake %s: %s", role, r.stderr)
			}
		}
		kilnTime += time.Since(start)

		start = time.Now()
		for _, role := range roles {
			toolBake(b, base, filepath.Join(out, "tools-"+role+".img"), render(b, e.flCluster, role, "amd64"))
		}
		toolTime += time.Since(start)
	}
	b.ReportMetric(kilnTime.Seconds()/float64(b.N), "s-kiln/3roles")
	b.ReportMetric(toolTime.Seconds()/float64(b.N), "s-tools/3roles")
	b.ReportMetric(kilnTime.Seconds()/toolTime.Seconds(), "ratio-kiln/tools")
}

// bigFlatcarBase makes a Flatcar-sized base image of arch in dir (8.5
// GiB sparse, a 1 GiB btrfs OEM as from release 4593 on, 256 MiB of USR
// data).
func bigFlatcarBase(t testing.TB, dir, arch string) string {
	base := filepath.Join(dir, "flatcar-big-"+arch+".bin")
	loader := map[string]string{"amd64": "EFI/boot/bootx64.efi", "arm64": "EFI/boot/bootaa64.efi"}[arch]
	oem := map[string][]byte{"grub.cfg": []byte("set linux_append=\"\"\n")}
	buildDisk(t, base, flatcarDiskGUID, 8704, []part{
		{num: 1, name: "EFI-SYSTEM", typ: typeESP, mib: 1024, fill: fillFAT("32", map[string][]byte{loader: randomBytes(t, 1<<20), "flatcar/first_boot": {}}, "EFI-SYSTEM")},
		{num: 2, name: "BIOS-BOOT", typ: typeBIOS, mib: 2},
		{num: 3, name: "USR-A", typ: typeUSR, guid: usrAGUID, mib: 2048, fill: fillRandom(256 << 20)},
		{num: 4, name: "USR-B", typ: typeUSR, mib: 2048},
		{num: 6, name: "OEM", typ: typeLinux, mib: 1024, fill: fillBtrfs("OEM", oem)},
		{num: 7, name: "OEM-CONFIG", typ: typeOEMConfig, mib: 64},
		{num: 9, name: "ROOT", typ: typeRoot, fill: fillExt4("ROOT", map[string][]byte{"README": {}}, nil)},
	})
	return base
}

// realisticMiB approximates each image's compressed size for one arch, in
// MiB, from the sizes registries show for these releases (not measured
// here: no registry is reachable). The air-gap benchmark's stand-ins are
// random layers of these sizes, which do not compress.
var realisticMiB = map[string]int64{
	"kube-apiserver": 28, "kube-controller-manager": 26, "kube-scheduler": 18, "kube-proxy": 30,
	"etcd": 22, "coredns": 21, "pause": 1, "flannel": 33, "flannel-cni-plugin": 5,
}

// BenchmarkAirgapBake bakes each role from the Flatcar-sized base with
// and without airgap, in the same run: the air-gapped bake also writes the
// role's image archive (stand-in images of realisticMiB sizes) and a
// 100 MiB stand-in sysext into the OEM btrfs. It reports both times per
// role, their ratio, and the payload's size.
//
//	go test -tags oracle -run '^$' -bench AirgapBake -benchtime 1x ./test/image/
func BenchmarkAirgapBake(b *testing.B) {
	e := setup(b)
	dir := b.TempDir()
	base := bigFlatcarBase(b, dir, "amd64")
	sysext := filepath.Join(dir, "sysext.raw")
	os.WriteFile(sysext, randomBytes(b, 100<<20), 0o644)
	cache := filepath.Join(dir, "cache")
	cf := airgapClusterSized(b, e, cache, dir, func(name string) int64 { return realisticMiB[name] << 20 })
	repinSysext(b, cf, sysext)
	plainCF := plainCopy(b, cf)
	for _, role := range []string{"init", "control-plane", "worker"} {
		b.Run(role, func(b *testing.B) {
			var plain, airgap time.Duration
			var payload int64
			for b.Loop() {
				bake := func(cluster string, extra ...string) result {
					return kilnRun(b, nil, append([]string{"-c", cluster, "build-image", "--profile", "flatcar-amd64", "--role", role,
						"--base-image", base, "--cache-dir", cache, "--dest", b.TempDir()}, extra...)...)
				}
				start := time.Now()
				if r := bake(plainCF); r.code != 0 {
					b.Fatalf("plain bake: %s", r.stderr)
				}
				plain += time.Since(start)
				start = time.Now()
				r := bake(cf, "--file", "kubernetes-sysext="+sysext)
				if r.code != 0 {
					b.Fatalf("air-gapped bake: %s", r.stderr)
				}
				airgap += time.Since(start)
				payload = payloadMiB(r.stderr) + 100
			}
			n := float64(b.N)
			b.ReportMetric(plain.Seconds()/n, "s-plain")
			b.ReportMetric(airgap.Seconds()/n, "s-airgap")
			b.ReportMetric(airgap.Seconds()/plain.Seconds(), "ratio-airgap/plain")
			b.ReportMetric(float64(payload), "MiB-payload")
		})
	}
}

// plainCopy is the cluster file without airgap: true, beside it.
func plainCopy(b *testing.B, cf string) string {
	data, err := os.ReadFile(cf)
	if err != nil {
		b.Fatal(err)
	}
	p := filepath.Join(filepath.Dir(cf), "plain.yaml")
	os.WriteFile(p, bytes.ReplaceAll(data, []byte("airgap: true\n"), nil), 0o644)
	return p
}

// payloadMiB reads the image archive's size from build-image's progress
// ("airgap: images-ROLE.tar: N images for ROLE ARCH (X MiB)").
func payloadMiB(stderr string) int64 {
	for _, line := range strings.Split(stderr, "\n") {
		if i := strings.LastIndex(line, "("); strings.HasPrefix(line, "airgap: ") && i > 0 {
			var mib float64
			fmt.Sscanf(line[i+1:], "%f MiB", &mib)
			return int64(mib + 0.5)
		}
	}
	return 0
}

// toolBake is the baseline: the same image, .sha256 and .bmap made by
// hand with standard tools.
func toolBake(b *testing.B, base, out string, config []byte) {
	sh := func(script string) {
		if o, err := exec.Command("sh", "-euc", script).CombinedOutput(); err != nil {
			b.Fatalf("%s: %v\n%s", script, err, o)
		}
	}
	work := b.TempDir()
	os.WriteFile(filepath.Join(work, "config.ign"), config, 0o600)
	e := readTable(b, base).byName(b, "OEM")
	off, size := e.Start*512, e.Size*512
	sh(fmt.Sprintf(`cd %[1]s
cp --sparse=always %[2]s %[3]s
dd if=%[2]s of=oem.img bs=1M iflag=skip_bytes,count_bytes skip=%[4]d count=%[5]d conv=sparse status=none
uuid=$(btrfs inspect-internal dump-super oem.img | awk '$1=="fsid"{print $2}')
mkdir tree && btrfs restore -m -S -x oem.img tree >/dev/null && cp config.ign tree/
truncate -s %[5]d new.img && mkfs.btrfs -q -f -L OEM -U "$uuid" --rootdir tree new.img
fallocate --punch-hole --keep-size --offset %[4]d --length %[5]d %[3]s
dd if=new.img of=%[3]s bs=1M oflag=seek_bytes seek=%[4]d conv=notrunc,sparse status=none
sha256sum %[3]s > %[3]s.sha256
bmaptool -q create -o %[3]s.bmap %[3]s`, work, base, out, off, size))
}

// BenchmarkBuildAll bakes the mixed-fleet persona (fleetNodes: three
// Raspberry Pi 4 control planes, two x86 workers) from Flatcar-sized
// bases, in the same run: five single build-image --node bakes one after
// the other, then one build-image --all. It reports both times, their
// ratio, and --all's time over the mean single bake (the goal: at most
// 2). The bases are raw files: no decompression is timed.
//
//	go test -tags oracle -run '^$' -bench BuildAll -benchtime 1x ./test/image/
func BenchmarkBuildAll(b *testing.B) {
	e := setup(b)
	cf := fleetCluster(b)
	dir := b.TempDir()
	bases := map[string]string{"flatcar-amd64": bigFlatcarBase(b, dir, "amd64"), "flatcar-rpi4": bigFlatcarBase(b, dir, "arm64")}
	_, zipPath, _ := rpi4Inputs(b, e)
	cache := filepath.Join(dir, "cache")
	var seqT, allT time.Duration
	for b.Loop() {
		out := b.TempDir()
		start := time.Now()
		for _, n := range fleetNodes {
			args := []string{"-c", cf, "build-image", "--node", n.name, "--base-image", bases[n.profile], "--cache-dir", cache, "--dest", out}
			if n.profile == "flatcar-rpi4" {
				args = append(args, "--firmware", zipPath)
			}
			if r := kilnRun(b, nil, args...); r.code != 0 {
				b.Fatalf("bake %s: %s", n.name, r.stderr)
			}
		}
		seqT += time.Since(start)
		start = time.Now()
		if r := kilnRun(b, nil, "-c", cf, "build-image", "--all", "--base-image", "flatcar-amd64="+bases["flatcar-amd64"], "--base-image", "flatcar-rpi4="+bases["flatcar-rpi4"], "--firmware", zipPath, "--cache-dir", cache, "--dest", b.TempDir()); r.code != 0 {
			b.Fatalf("build-image --all: %s", r.stderr)
		}
		allT += time.Since(start)
	}
	n := float64(b.N)
	b.ReportMetric(seqT.Seconds()/n, "s-5-single-bakes")
	b.ReportMetric(allT.Seconds()/n, "s-all")
	b.ReportMetric(allT.Seconds()/seqT.Seconds(), "ratio-all/sequential")
	b.ReportMetric(allT.Seconds()/(seqT.Seconds()/float64(len(fleetNodes))), "ratio-all/one-bake")
}

// BenchmarkDecompress compares kiln's decompression of 128 MiB of
// disk-like data (what the first bake of a base image does) with the
// system's parallel decompressors on the same cores, in the same run:
// lbzip2 -dc for bzip2 (Flatcar), xz -T0 -dc for xz (Fedora CoreOS; the
// stream is made multi-block by xz -T0, as parallel decoding needs), zstd
// -T0 -dc for zstd. It also times kiln's Go fallback (PATH without the
// tools) against the single-threaded bzip2 -dc and xz -dc.
//
//	go test -tags oracle -run '^$' -bench Decompress -benchtime 3x ./test/image/
func BenchmarkDecompress(b *testing.B) {
	raw := append(randomBytes(b, 32<<20), make([]byte, 64<<20)...)
	raw = append(raw, bytes.Repeat([]byte("#!/bin/sh\necho kiln\n"), 32<<20/20)...)
	dir := b.TempDir()
	src := filepath.Join(dir, "raw")
	os.WriteFile(src, raw, 0o644)
	empty := b.TempDir()
	for _, c := range []struct{ ext, compress, parallel, single string }{
		{"bz2", "bzip2 -c", "lbzip2 -dc", "bzip2 -dc"},
		{"xz", "xz -T0 -c", "xz -T0 -dc", "xz -T1 -dc"},
		{"zst", "zstd -q -T0 -c", "zstd -q -T0 -dc", ""},
	} {
		comp := filepath.Join(dir, "raw."+c.ext)
		if o, err := exec.Command("sh", "-c", c.compress+" "+src+" > "+comp).CombinedOutput(); err != nil {
			b.Fatalf("%s: %v %s", c.compress, err, o)
		}
		b.Run(c.ext, func(b *testing.B) {
			var kilnT, goT, parT, singleT time.Duration
			for b.Loop() {
				kilnT += kilnDecompress(b, comp, len(raw), "")
				parT += toolTime(b, c.parallel+" "+comp)
				if c.single != "" {
					goT += kilnDecompress(b, comp, len(raw), empty)
					singleT += toolTime(b, c.single+" "+comp)
				}
			}
			mib := float64(len(raw)) / (1 << 20) * float64(b.N)
			b.ReportMetric(mib/kilnT.Seconds(), "MiB/s-kiln")
			b.ReportMetric(mib/parT.Seconds(), "MiB/s-parallel-tool")
			b.ReportMetric(parT.Seconds()/kilnT.Seconds(), "speed-ratio-kiln/parallel-tool")
			if c.single != "" {
				b.ReportMetric(singleT.Seconds()/goT.Seconds(), "speed-ratio-go-fallback/single-thread-tool")
			}
		})
	}
}

// kilnDecompress times baseimage.Decompress of comp to the end, with PATH
// set to path unless it is "".
func kilnDecompress(b *testing.B, comp string, size int, path string) time.Duration {
	if path != "" {
		old := os.Getenv("PATH")
		os.Setenv("PATH", path)
		defer os.Setenv("PATH", old)
	}
	start := time.Now()
	f, _ := os.Open(comp)
	defer f.Close()
	r, _, err := baseimage.Decompress(context.Background(), f)
	if err != nil {
		b.Fatal(err)
	}
	n, err := io.Copy(io.Discard, r)
	r.Close()
	if err != nil || n != int64(size) {
		b.Fatalf("decompress: %v (%d bytes)", err, n)
	}
	return time.Since(start)
}

// toolTime times a shell command line that writes to /dev/null.
func toolTime(b *testing.B, line string) time.Duration {
	start := time.Now()
	if o, err := exec.Command("sh", "-c", line+" > /dev/null").CombinedOutput(); err != nil {
		b.Fatalf("%s: %v %s", line, err, strings.TrimSpace(string(o)))
	}
	return time.Since(start)
}
