package main

// Attacks on a real kiln serve (the command, its listener and its limits)
// by a stranger on the provisioning network. Each test names the attack
// and what it did before it was closed.

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// get sends one request and drains the answer.
func (p *serveProc) get(t *testing.T, method, path string, header ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, p.server+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// Before: a token sent where it does not belong (as a MAC, in the path, to
// another endpoint) was logged in clear, six lines for one set of
// requests. After: no secret of the bundle reaches either log, whatever
// the request looks like.
func TestAttackSecretsInLogs(t *testing.T) {
	dir, m := pxeBundle(t)
	accessLog := filepath.Join(t.TempDir(), "access.log")
	p := startServe(t, "--bundle", dir, "--access-log", accessLog, "--pool", "worker")
	cp1, _ := m.Node("cp1")
	w1, _ := m.Node("w1")
	secrets := map[string]string{"cp1 token": cp1.Token, "w1 report key": w1.ReportKey, "status token": m.StatusToken}
	for _, r := range [][]string{
		{"GET", pxe.ScriptPath + "?mac=" + cp1.Token},
		{"GET", pxe.ScriptPath + "?mac=" + strings.ToUpper(cp1.Token)},
		{"GET", pxe.ConfigPath + "cp1/" + cp1.Token},
		{"GET", pxe.ConfigPath + cp1.Token},
		{"GET", pxe.ConfigPath + "cp1?mac=" + cp1.Token + "&token=" + cp1.Token},
		{"GET", pxe.ConfigPath + "cp1?token=" + cp1.Token + ";mac=52-54-00-00-00-01"},
		{"GET", pxe.ConfigPath + "cp1%2F" + cp1.Token},
		{"POST", pxe.ReportPath + w1.ReportKey},
		{"POST", pxe.ReportPath + "w1/" + w1.ReportKey},
		{"GET", pxe.StatusPath + "?token=" + m.StatusToken},
		{"GET", "/" + m.StatusToken},
		{"GET", pxe.StatusPath, "Authorization", m.StatusToken},
		{"GET", pxe.AssetPath + w1.ReportKey},
	} {
		if code, _ := p.get(t, r[0], r[1], r[2:]...); code < 400 {
			t.Errorf("%s %s: %d, want a refusal", r[0], r[1], code)
		}
	}
	p.stop(t)
	logged, err := os.ReadFile(accessLog)
	if err != nil {
		t.Fatal(err)
	}
	all := string(logged) + p.out.String() + p.errOut.String()
	if strings.Count(string(logged), "\n") < 12 {
		t.Fatalf("access log has too few lines to judge:\n%s", logged)
	}
	for what, secret := range secrets {
		for _, line := range strings.Split(all, "\n") {
			if strings.Contains(strings.ToLower(line), secret) {
				t.Errorf("%s logged: %s", what, line)
			}
		}
	}
}
