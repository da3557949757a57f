package secrets

import (
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

func generate(t *testing.T) *Secrets {
	t.Helper()
	s, err := Generate("lab", time.Now(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestGenerateFormats(t *testing.T) {
	s := generate(t)
	if !regexp.MustCompile(`^[a-z0-9]{6}\.[a-z0-9]{16}$`).MatchString(s.Token) {
		t.Errorf("token %q", s.Token)
	}
	if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(s.CertificateKey) {
		t.Errorf("certificate key has wrong form")
	}
	if !s.CA().IsCA || time.Until(s.CA().NotAfter) < 9*365*24*time.Hour {
		t.Errorf("CA: IsCA %v, NotAfter %v", s.CA().IsCA, s.CA().NotAfter)
	}
	for _, f := range PKIFiles {
		if len(s.PKI[f]) == 0 {
			t.Errorf("%s missing", f)
		}
	}
	if s2 := generate(t); s2.Token == s.Token || s2.CertificateKey == s.CertificateKey || s2.CACertHash() == s.CACertHash() {
		t.Error("two generations share a secret")
	}
}

// TestCACertHashMatchesOpenSSL computes kubeadm's pin the way kubeadm's
// documentation does, with openssl, and compares.
func TestCACertHashMatchesOpenSSL(t *testing.T) {
	s := generate(t)
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(ca, s.PKI[CACert], 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", "openssl x509 -pubkey -in "+ca+" | openssl rsa -pubin -outform der 2>/dev/null | openssl dgst -sha256 -hex | sed 's/^.* //'")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("openssl (install it: apt-get install openssl): %v", err)
	}
	want := "sha256:" + strings.TrimSpace(string(out))
	if got := s.CACertHash(); got != want {
		t.Errorf("CACertHash = %s, openssl says %s", got, want)
	}
}

func TestWriteLoad(t *testing.T) {
	s := generate(t)
	dir := filepath.Join(t.TempDir(), "secrets")
	if err := s.Write(dir, false); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("secrets dir mode %v, %v", fi.Mode().Perm(), err)
	}
	err = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		want := os.FileMode(0o600)
		if fi.IsDir() {
			want = 0o700
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode %o, want %o", p, fi.Mode().Perm(), want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Token != s.Token || got.CertificateKey != s.CertificateKey || got.CACertHash() != s.CACertHash() {
		t.Error("loaded secrets differ from written ones")
	}

	// No overwrite without force; with force, the old secrets are gone.
	other := generate(t)
	if err := other.Write(dir, false); err == nil || fault.KindOf(err) != fault.Input || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("overwrite without force: %v", err)
	}
	if again, _ := Load(dir); again.Token != s.Token {
		t.Fatal("refused write changed the secrets")
	}
	if err := other.Write(dir, true); err != nil {
		t.Fatal(err)
	}
	if again, _ := Load(dir); again.Token != other.Token {
		t.Fatal("forced write did not replace the secrets")
	}
	if leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(dir), ".secrets-*")); len(leftovers) > 0 {
		t.Errorf("temporary folders left behind: %v", leftovers)
	}
}

func TestLoadRefusesBadSecrets(t *testing.T) {
	s := generate(t)
	tests := []struct {
		name   string
		mutate func(dir string)
		want   string
	}{
		{"readable by others", func(d string) { os.Chmod(filepath.Join(d, "pki", CAKey), 0o644) }, "chmod 600"},
		{"folder readable by others", func(d string) { os.Chmod(d, 0o755) }, "the folder %s is mode 0755: other users can reach the cluster's keys; run chmod 700 %s"},
		{"pki folder readable by others", func(d string) { os.Chmod(filepath.Join(d, "pki"), 0o750) }, "the folder %s/pki is mode 0750: other users can reach the cluster's keys; run chmod 700 %s/pki"},
		{"not a folder", func(d string) { os.RemoveAll(d); os.WriteFile(d, nil, 0o600) }, "%s is not a folder"},
		{"huge file", func(d string) { os.WriteFile(filepath.Join(d, TokenFile), make([]byte, 1<<20), 0o600) }, "is 1048576 bytes, more than any secret kiln writes (64 KiB at most)"},
		{"a device", func(d string) {
			os.Remove(filepath.Join(d, TokenFile))
			os.Symlink("/dev/zero", filepath.Join(d, TokenFile))
		}, "is not a regular file"},
		{"missing file", func(d string) { os.Remove(filepath.Join(d, "pki", SAPub)) }, SAPub},
		{"bad token", func(d string) { os.WriteFile(filepath.Join(d, TokenFile), []byte("abc.def\n"), 0o600) }, "not a bootstrap token"},
		{"bad certificate key", func(d string) { os.WriteFile(filepath.Join(d, CertificateKeyFile), []byte("xyz\n"), 0o600) }, "64 lowercase hex"},
		{"key swapped", func(d string) {
			os.WriteFile(filepath.Join(d, "pki", CAKey), s.PKI[EtcdCAKey], 0o600)
		}, "does not belong"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "s")
			if err := s.Write(dir, false); err != nil {
				t.Fatal(err)
			}
			tt.mutate(dir)
			_, err := Load(dir)
			want := strings.ReplaceAll(tt.want, "%s", dir) // %s: the secrets folder
			if err == nil || fault.KindOf(err) != fault.Input || !strings.Contains(err.Error(), want) {
				t.Fatalf("got %v, want an input error containing %q", err, want)
			}
		})
	}
}
