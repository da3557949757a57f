// Package servetest writes small PXE bundles for tests of kiln serve: a
// manifest with the nodes asked for, a config per node and tiny boot
// assets, without cluster secrets.
package servetest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// Initramfs is the initramfs asset's size: big enough for Range requests
// to be interesting.
const Initramfs = 256 << 10

// NewBundle writes a bundle in a new temporary folder. Each node gets a
// token, a report key and configs/NAME.ign (unless set); the bundle gets
// a kernel and an initramfs of Initramfs bytes.
func NewBundle(t testing.TB, nodes ...pxe.Node) (string, *pxe.Manifest) {
	t.Helper()
	dir := t.TempDir()
	m := &pxe.Manifest{
		Format:      pxe.FormatVersion,
		Cluster:     "lab",
		Profile:     "flatcar-amd64",
		OS:          "flatcar",
		Arch:        "amd64",
		OSVersion:   "4081.2.0",
		ServerURL:   "http://10.0.0.5:8080",
		KernelArgs:  []string{"flatcar.first_boot=1"},
		StatusToken: secret("status", "", 0),
		Assets: []pxe.Asset{
			{Kind: pxe.AssetKernel, File: "flatcar_production_pxe.vmlinuz"},
			{Kind: pxe.AssetInitramfs, File: "flatcar_production_pxe_image.cpio.gz"},
		},
	}
	write := func(rel string, data []byte) {
		t.Helper()
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join("assets", m.Assets[0].File), []byte("kernel bytes"))
	initramfs := make([]byte, Initramfs)
	for i := range initramfs {
		initramfs[i] = byte(i * 7 / 3)
	}
	write(filepath.Join("assets", m.Assets[1].File), initramfs)
	for i, n := range nodes {
		if n.Token == "" {
			n.Token = secret("token", n.Name, i)
		}
		if n.ReportKey == "" {
			n.ReportKey = secret("key", n.Name, i)
		}
		if n.Mode == "" {
			n.Mode = pxe.DefaultMode(n.Role)
		}
		if n.Config == "" {
			n.Config = filepath.Join("configs", n.Name+".ign")
		}
		write(n.Config, []byte(fmt.Sprintf(`{"ignition":{"version":"3.4.0"},"node":%q}`, n.Name)))
		m.Nodes = append(m.Nodes, n)
	}
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	write(pxe.ManifestFile, data)
	// What the server reads must be what a real bundle gives.
	read, err := pxe.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, read
}

// Buffer is a bytes.Buffer a running server writes while a test reads it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// secret is a stable stand-in for a bundle secret, shaped like kiln pxe's
// (64 hex digits), so that a test meets what a real bundle holds.
func secret(kind, node string, i int) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "%s %s %d", kind, node, i))
	return hex.EncodeToString(sum[:])
}
