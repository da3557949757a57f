package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/grpclog"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

func init() {
	// The etcd client's gRPC logs connection attempts to nodes not up yet.
	grpclog.SetLoggerV2(grpclog.NewLoggerV2(io.Discard, io.Discard, io.Discard))
}

// The standard cluster: node cp1 is the init role.
var (
	cp1 = nodeSpec{name: "cp1", role: "init", octet: 11}
	cp2 = nodeSpec{name: "cp2", role: "control-plane", octet: 12}
	cp3 = nodeSpec{name: "cp3", role: "control-plane", octet: 13}
	w1  = nodeSpec{name: "w1", role: "worker", octet: 21}
	w2  = nodeSpec{name: "w2", role: "worker", octet: 22}
	all = []nodeSpec{cp1, cp2, cp3, w1, w2}
)

// uploadArgs makes the init node re-upload the certificates every 20s
// divided by the time scale, instead of every hour.
var uploadArgs = []string{"--upload-certs-every=20s"}

func scenarioTogether(e *env) error {
	for _, n := range all {
		if err := e.boot(n, uploadArgs...); err != nil {
			return err
		}
	}
	return e.expectFullCluster(all)
}

func scenarioJoinersFirst(e *env) error {
	for _, n := range []nodeSpec{w2, cp3, w1, cp2} {
		if err := e.boot(n, uploadArgs...); err != nil {
			return err
		}
	}
	ctx, cancel := e.deadline()
	defer cancel()
	// The joiners must be up and waiting for the endpoint before the init
	// node exists.
	err := e.waitUntil(ctx, "every joiner to wait for the endpoint", func(context.Context) (bool, string) {
		for _, n := range []nodeSpec{w2, cp3, w1, cp2} {
			st, err := e.status(n.name)
			if err != nil || st.Phase != "join" || st.State != "waiting" {
				return false, fmt.Sprintf("%s: %s %s %v", n.name, st.Phase, st.State, err)
			}
		}
		return true, ""
	})
	if err != nil {
		return err
	}
	e.logf("every joiner waits; booting the init node")
	if err := e.boot(cp1, uploadArgs...); err != nil {
		return err
	}
	return e.expectFullCluster(all)
}

func scenarioCertsDeleted(e *env) error {
	for _, n := range []nodeSpec{cp1, cp2, w1, w2} {
		if err := e.boot(n, uploadArgs...); err != nil {
			return err
		}
	}
	ctx, cancel := e.deadline()
	defer cancel()
	if err := e.waitUntil(ctx, "cp2 to join", func(context.Context) (bool, string) {
		st, err := e.status("cp2")
		return err == nil && st.Phase == "done", fmt.Sprintf("cp2 %s %s", st.Phase, st.State)
	}); err != nil {
		return err
	}
	// The init agent re-uploads every 4 s here; it is paused (SIGSTOP to
	// that one process, nothing else of cp1) until cp3 has met the missing
	// Secret, so that cp3's join really fails for it first.
	agentPID, err := e.agentPID("cp1")
	if err != nil {
		return err
	}
	if err := syscall.Kill(agentPID, syscall.SIGSTOP); err != nil {
		return err
	}
	stopped := true
	defer func() {
		if stopped {
			_ = syscall.Kill(agentPID, syscall.SIGCONT)
		}
	}()
	cs, err := e.client()
	if err != nil {
		return err
	}
	if err := cs.CoreV1().Secrets("kube-system").Delete(ctx, "kubeadm-certs", metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete kubeadm-certs: %w", err)
	}
	deleted := len(e.agentLog("cp1"))
	e.logf("paused cp1's agent, deleted Secret kube-system/kubeadm-certs (standing in for its 2 h expiry); booting cp3")
	if err := e.boot(cp3, uploadArgs...); err != nil {
		return err
	}
	missing := "kubeadm join attempt 1 failed (the kubeadm-certs Secret is gone"
	if err := e.waitUntil(ctx, "cp3's join to fail for the missing Secret", func(context.Context) (bool, string) {
		st, _ := e.status("cp3")
		return strings.Contains(e.agentLog("cp3"), missing), fmt.Sprintf("cp3 %s %s#%d", st.Phase, st.State, st.Attempt)
	}); err != nil {
		return err
	}
	if err := syscall.Kill(agentPID, syscall.SIGCONT); err != nil {
		return err
	}
	stopped = false
	e.logf("cp3's first join failed for the missing Secret; resumed cp1's agent")
	if err := e.expectFullCluster(all); err != nil {
		return err
	}
	uploads := countFinished(e.agentLog("cp1")[deleted:], "run kubeadm init phase upload-certs")
	retries := strings.Count(e.agentLog("cp3"), "kubeadm join attempt")
	e.logf("the init node re-uploaded the certificates %d time(s) after the deletion; cp3's join failed %d time(s) before it succeeded", uploads, retries)
	if uploads == 0 {
		return fmt.Errorf("the init node never re-uploaded the certificates after the deletion")
	}
	return nil
}

// agentPID finds the node's running kiln-firstboot process: in the node's
// process group, named like the agent binary.
func (e *env) agentPID(name string) (int, error) {
	e.mu.Lock()
	cmd := e.procs[name]
	e.mu.Unlock()
	if cmd == nil {
		return 0, fmt.Errorf("%s is not running", name)
	}
	pgid := cmd.Process.Pid
	comm := filepath.Base(e.o.agent)
	if e.o.real {
		comm = "kiln-firstboot" // as the node's config installs it
	}
	if len(comm) > 15 {
		comm = comm[:15] // the kernel's TASK_COMM_LEN
	}
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		c, err := os.ReadFile(filepath.Join("/proc", d.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(c)) != comm {
			continue
		}
		if g, err := syscall.Getpgid(pid); err == nil && g == pgid {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no kiln-firstboot process on %s", name)
}

func scenarioKilledJoin(e *env) error {
	for _, n := range all {
		if err := e.boot(n, uploadArgs...); err != nil {
			return err
		}
	}
	ctx, cancel := e.deadline()
	defer cancel()
	// Mid-join: kubeadm join has written cp3's etcd manifest (the member is
	// being added) but has not finished.
	etcdManifest := e.nodePath("cp3", "etc", "kubernetes", "manifests", "etcd.yaml")
	err := e.waitUntil(ctx, "cp3 to be mid-join", func(context.Context) (bool, string) {
		if _, err := os.Stat(etcdManifest); err == nil {
			return true, ""
		}
		st, _ := e.status("cp3")
		return false, fmt.Sprintf("cp3 %s %s", st.Phase, st.State)
	})
	if err != nil {
		return err
	}
	e.kill("cp3")
	e.logf("killed cp3 mid-join (power cut: every process at once)")
	time.Sleep(3 * time.Second)
	if err := e.boot(cp3, uploadArgs...); err != nil {
		return err
	}
	return e.expectFullCluster(all)
}

// probeRe finds the probe count in the agent's foreign-CA report.
var probeRe = regexp.MustCompile(`probe (\d+),`)

func scenarioForeignCA(e *env) error {
	other := filepath.Join(e.dir, "other-cluster")
	if err := kilnInit(e.o, other, "keepalived-haproxy", netPrefix); err != nil {
		return err
	}
	foreign := nodeSpec{name: "foreign", role: "worker", octet: 31, source: other}
	nodes := append(append([]nodeSpec{}, all...), foreign)
	for _, n := range nodes {
		if err := e.boot(n, uploadArgs...); err != nil {
			return err
		}
	}
	if err := e.expectFullCluster(all); err != nil {
		return err
	}
	ctx, cancel := e.deadline()
	defer cancel()
	// The agent never joins it, and never stops for good either (anyone
	// answering on an endpoint can present another CA): it keeps probing,
	// loudly.
	if err := e.waitUntil(ctx, "the foreign node's agent to report the other cluster three times", func(context.Context) (bool, string) {
		st, err := e.status("foreign")
		probe, _ := strconv.Atoi(probeRe.FindStringSubmatch(st.LastError + "probe 0,")[1])
		return err == nil && st.State == "waiting" && probe >= 3, fmt.Sprintf("%s %s %q", st.Phase, st.State, st.LastError)
	}); err != nil {
		return err
	}
	st, _ := e.status("foreign")
	var errs []string
	if st.Permanent {
		errs = append(errs, "status.permanent is true")
	}
	if exits := e.agentExits("foreign"); len(exits) != 0 {
		errs = append(errs, fmt.Sprintf("agent exit codes %v, want none (still probing)", exits))
	}
	if !strings.Contains(st.LastError, "THE ENDPOINT SERVES ANOTHER CLUSTER") {
		errs = append(errs, fmt.Sprintf("lastError %q does not say the endpoint serves another cluster", st.LastError))
	}
	if strings.Contains(e.agentLog("foreign"), "run kubeadm join") {
		errs = append(errs, "the foreign node ran kubeadm join")
	}
	cs, err := e.client()
	if err != nil {
		return err
	}
	nodes2, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	if len(nodes2.Items) != len(all) {
		errs = append(errs, fmt.Sprintf("%d Nodes, want %d", len(nodes2.Items), len(all)))
	}
	if len(errs) > 0 {
		return fmt.Errorf("foreign node: %s", strings.Join(errs, "; "))
	}
	e.logf("foreign node: still probing, not joined, reporting %q", st.LastError)
	return nil
}

// scenarioRefusals: beside the standard cluster, nodes the real kubeadm
// must refuse, so that the agent's reading of kubeadm's messages
// (firstboot/kubeadm/classify.go) is checked against kubeadm itself, not
// against texts copied into a test:
//   - bad-token, a worker whose bootstrap token has the cluster's token ID
//     and another secret (a token rotated since the image was built):
//     kubeadm cannot verify cluster-info's signature;
//   - bad-key, a fourth control plane whose certificate key is another
//     one: kubeadm cannot decrypt the kubeadm-certs Secret.
//
// Each must stop at its first kubeadm join with the permanent error's
// advice (exit 3, not restarted) and never become a Node. And cut-off, a
// worker with the cluster's own metadata whose route to the endpoint is
// blocked (a prohibit route in its network namespace: connect fails at
// once) from boot until the cluster is complete, then opened: the
// agent must wait and then join, an outage being transient.
func scenarioRefusals(e *env) error {
	badToken := nodeSpec{name: "bad-token", role: "worker", octet: 31}
	// Below the control planes' addresses: its keepalived (the emulator
	// runs static pods before the join, a real kubelet would not) loses
	// every VRRP tie, so the endpoint never goes through a refused node.
	badKey := nodeSpec{name: "bad-key", role: "control-plane", octet: 9}
	cutOff := nodeSpec{name: "cut-off", role: "worker", octet: 23}
	var err error
	if badToken.source, err = e.variant("rotated-token", func(secrets string) error {
		return replaceSecret(filepath.Join(secrets, "token"), func(old string) string {
			id, _, _ := strings.Cut(old, ".")
			return id + "." + strings.Repeat("x", 16)
		})
	}); err != nil {
		return err
	}
	if badKey.source, err = e.variant("other-key", func(secrets string) error {
		return replaceSecret(filepath.Join(secrets, "certificate-key"), func(string) string { return strings.Repeat("ab", 32) })
	}); err != nil {
		return err
	}
	for _, n := range append(append([]nodeSpec{}, all...), badToken, badKey) {
		if err := e.boot(n, uploadArgs...); err != nil {
			return err
		}
	}
	if err := e.prepare(cutOff); err != nil {
		return err
	}
	blocked := []string{"ip", "-n", nsPrefix + cutOff.name, "route", "add", "prohibit", vip + "/32"}
	if err := sh(blocked...); err != nil {
		return err
	}
	if err := e.boot(cutOff, uploadArgs...); err != nil {
		return err
	}
	if err := e.expectFullCluster(all); err != nil {
		return err
	}
	var errs []string
	for _, r := range []struct {
		n      nodeSpec
		advice string
		final  bool
	}{
		{badToken, "the bootstrap token is invalid or has expired", false},
		{badKey, "the certificate key does not decrypt the kubeadm-certs Secret", true},
	} {
		if err := e.expectRefused(r.n, r.advice, r.final); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if holders := e.vipHolders(); slices.Contains(holders, badKey.name) {
		errs = append(errs, fmt.Sprintf("the refused %s holds the virtual IP (%v)", badKey.name, holders))
	}
	st, _ := e.status(cutOff.name)
	if st.Phase != "join" || st.State != "waiting" {
		errs = append(errs, fmt.Sprintf("cut-off: %s/%s while the endpoint is blocked, want join/waiting", st.Phase, st.State))
	}
	if len(errs) > 0 {
		return fmt.Errorf("refusals: %s", strings.Join(errs, "; "))
	}
	e.logf("cut-off: waiting for the endpoint (%s); opening its route", st.LastError)
	blocked[4] = "del"
	if err := sh(blocked...); err != nil {
		return err
	}
	ctx, cancel := e.deadline()
	defer cancel()
	cs, err := e.client()
	if err != nil {
		return err
	}
	return e.waitUntil(ctx, "the cut-off worker to join", func(ctx context.Context) (bool, string) {
		st, err := e.status(cutOff.name)
		if err != nil {
			return false, err.Error()
		}
		if st.Phase != "done" || st.State != "done" {
			return false, fmt.Sprintf("%s/%s#%d", st.Phase, st.State, st.Attempt)
		}
		list, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		if len(list.Items) != len(all)+1 {
			return false, fmt.Sprintf("%d Nodes, want %d", len(list.Items), len(all)+1)
		}
		for _, n := range list.Items {
			if !nodeReady(&n) {
				return false, n.Name + " not Ready"
			}
		}
		e.logf("cut-off: joined once its route opened; %d Nodes Ready, none for the refused nodes", len(list.Items))
		return true, ""
	})
}

// variant copies the scenario's cluster (its file, its add-on, its
// secrets) to a sibling folder and lets change alter the copy's secrets:
// what an image built before a secret changed, or from another cluster's
// secret, carries.
func (e *env) variant(name string, change func(secrets string) error) (string, error) {
	dir := filepath.Join(e.dir, name)
	if err := sh("cp", "-a", e.cluster, dir); err != nil {
		return "", err
	}
	return dir, change(filepath.Join(dir, "secrets"))
}

// replaceSecret rewrites a one-line secret file (mode kept).
func replaceSecret(path string, with func(old string) string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return os.WriteFile(path, []byte(with(strings.TrimSpace(string(data)))+"\n"), 0o600)
}

// expectRefused checks a node the real kubeadm refuses. What the cluster
// itself says (a certificate key that does not decrypt its Secret) is
// final: the agent ran kubeadm join once and stopped with exit 3. What
// the endpoint says before it proves itself (a token whose signature does
// not verify) could come from anyone answering there: the agent keeps
// retrying, never permanent, with the advice in its status.
func (e *env) expectRefused(n nodeSpec, advice string, final bool) error {
	ctx, cancel := e.deadline()
	defer cancel()
	if err := e.waitUntil(ctx, n.name+"'s agent to be refused", func(context.Context) (bool, string) {
		st, err := e.status(n.name)
		exits := e.agentExits(n.name) // written once the process is gone, after its status
		if !final {
			return err == nil && st.State == "retrying" && st.Attempt >= 2, fmt.Sprintf("%s/%s#%d", st.Phase, st.State, st.Attempt)
		}
		return err == nil && st.State == "failed" && len(exits) > 0, fmt.Sprintf("%s/%s exits %v", st.Phase, st.State, exits)
	}); err != nil {
		return err
	}
	st, _ := e.status(n.name)
	var errs []string
	exits, joins := e.agentExits(n.name), countStarted(e.agentLog(n.name), "run kubeadm join")
	switch {
	case final && !slices.Equal(exits, []int{3}):
		errs = append(errs, fmt.Sprintf("agent exit codes %v, want [3]", exits))
	case !final && len(exits) != 0:
		errs = append(errs, fmt.Sprintf("agent exit codes %v, want none (still retrying)", exits))
	}
	if st.Permanent != final || !strings.Contains(st.LastError, advice) {
		errs = append(errs, fmt.Sprintf("status permanent=%v lastError %q, want permanent=%v with %q", st.Permanent, st.LastError, final, advice))
	}
	switch {
	case final && joins != 1:
		errs = append(errs, fmt.Sprintf("%d kubeadm joins, want 1 (refused by kubeadm itself, then never retried)", joins))
	case !final && joins < 2:
		errs = append(errs, fmt.Sprintf("%d kubeadm joins, want 2 or more (retried)", joins))
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s: %s", n.name, strings.Join(errs, "; "))
	}
	how := "stopped permanently"
	if !final {
		how = fmt.Sprintf("still retrying after %d joins", joins)
	}
	e.logf("%s: refused by kubeadm, %s: %q", n.name, how, st.LastError)
	return nil
}

// expectNoBootstrapSecrets scans what each joined node keeps on its disk
// (Ignition's and the agent's files under etc, opt and var/lib) for the
// secrets only the bootstrap needs: the token's secret, the certificate
// key and the pre-made CA and service-account private keys. Only kubeadm's
// certificates directory may hold a CA key once the node joined; the
// cluster's own stores (etcd's data, containerd's content) are not
// scanned: the token is a Secret in the cluster until it expires.
func (e *env) expectNoBootstrapSecrets(nodes []nodeSpec) error {
	secretsDir := filepath.Join(e.cluster, "secrets")
	var secrets []string
	token, err := os.ReadFile(filepath.Join(secretsDir, "token"))
	if err != nil {
		return err
	}
	_, tokenSecret, _ := strings.Cut(strings.TrimSpace(string(token)), ".")
	secrets = append(secrets, tokenSecret)
	for _, f := range []string{"certificate-key", "pki/ca.key", "pki/front-proxy-ca.key", "pki/sa.key", "pki/etcd/ca.key"} {
		data, err := os.ReadFile(filepath.Join(secretsDir, f))
		if err != nil {
			return err
		}
		// A PEM key's body line is enough to find any copy of it.
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		secrets = append(secrets, lines[len(lines)/2])
	}
	skip := []string{"etc/kubernetes/pki", "var/lib/etcd", "var/lib/containerd", "var/lib/kubelet/pods"}
	var found []string
	scanned := 0
	for _, n := range nodes {
		for _, top := range []string{"etc", "opt", "var/lib"} {
			root := e.nodePath(n.name)
			filepath.WalkDir(filepath.Join(root, top), func(p string, d fs.DirEntry, err error) error {
				rel, _ := filepath.Rel(root, p)
				if err != nil || d.IsDir() && slices.ContainsFunc(skip, func(s string) bool { return rel == s }) {
					return filepath.SkipDir
				}
				info, ierr := d.Info()
				if d.IsDir() || ierr != nil || !info.Mode().IsRegular() || info.Size() > 64<<20 {
					return nil
				}
				data, rerr := os.ReadFile(p)
				if rerr != nil {
					return nil
				}
				scanned++
				for _, s := range secrets {
					if bytes.Contains(data, []byte(s)) {
						found = append(found, n.name+":/"+rel)
						break
					}
				}
				return nil
			})
		}
	}
	if len(found) > 0 {
		return fmt.Errorf("bootstrap secrets left on joined nodes: %s", strings.Join(found, ", "))
	}
	e.logf("no bootstrap secret on any joined node's disk (%d files scanned)", scanned)
	return nil
}

func (e *env) deadline() (context.Context, context.CancelFunc) {
	return context.WithDeadline(context.Background(), e.startOrNow().Add(e.o.timeout))
}

// client is an admin client through the load balancer, from `kiln
// kubeconfig` (a certificate the cluster CA signs on the build host).
func (e *env) client() (kubernetes.Interface, error) {
	conf := filepath.Join(e.dir, "admin.conf")
	if _, err := os.Stat(conf); err != nil {
		if err := sh(e.o.kiln, "-c", filepath.Join(e.cluster, "cluster.yaml"), "kubeconfig", "--dest", conf); err != nil {
			return nil, err
		}
	}
	rc, err := clientcmd.BuildConfigFromFlags("", conf)
	if err != nil {
		return nil, err
	}
	rc.Timeout = 10 * time.Second
	return kubernetes.NewForConfig(rc)
}

// etcdMembers lists etcd's members through cp1's etcd, with the API
// server's etcd client certificate.
func (e *env) etcdMembers(ctx context.Context) (voters, learners int, err error) {
	pki := e.nodePath("cp1", "etc", "kubernetes", "pki")
	cert, err := tls.LoadX509KeyPair(filepath.Join(pki, "apiserver-etcd-client.crt"), filepath.Join(pki, "apiserver-etcd-client.key"))
	if err != nil {
		return 0, 0, err
	}
	caPEM, err := os.ReadFile(filepath.Join(pki, "etcd", "ca.crt"))
	if err != nil {
		return 0, 0, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{"https://" + cp1.ip() + ":2379", "https://" + cp2.ip() + ":2379", "https://" + cp3.ip() + ":2379"},
		DialTimeout: 3 * time.Second,
		TLS:         &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool},
		Logger:      nil,
	})
	if err != nil {
		return 0, 0, err
	}
	defer cli.Close()
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := cli.MemberList(cctx)
	if err != nil {
		return 0, 0, err
	}
	for _, m := range resp.Members {
		switch {
		case m.IsLearner:
			learners++
		case m.Name != "":
			voters++
		}
	}
	return voters, learners, nil
}

// expectFullCluster waits until the cluster is complete and every agent
// is done, then prints the time it took.
func (e *env) expectFullCluster(nodes []nodeSpec) error {
	ctx, cancel := e.deadline()
	defer cancel()
	var cs kubernetes.Interface
	err := e.waitUntil(ctx, "the full cluster", func(ctx context.Context) (bool, string) {
		var why []string
		for _, n := range nodes {
			st, err := e.status(n.name)
			switch {
			case err != nil:
				why = append(why, n.name+": no status")
			case st.State == "failed" && st.Permanent:
				why = append(why, fmt.Sprintf("%s: FAILED PERMANENTLY: %s", n.name, st.LastError))
			case st.Phase != "done" || st.State != "done":
				why = append(why, fmt.Sprintf("%s: %s/%s#%d", n.name, st.Phase, st.State, st.Attempt))
			}
		}
		if len(why) > 0 {
			return false, strings.Join(why, ", ")
		}
		if cs == nil {
			var err error
			if cs, err = e.client(); err != nil {
				return false, err.Error()
			}
		}
		list, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, "list nodes: " + err.Error()
		}
		cps, workers := 0, 0
		for _, n := range list.Items {
			if !nodeReady(&n) {
				continue
			}
			if _, ok := n.Labels["node-role.kubernetes.io/control-plane"]; ok {
				cps++
			} else {
				workers++
			}
		}
		if cps != 3 || workers != 2 {
			return false, fmt.Sprintf("%d control planes and %d workers Ready", cps, workers)
		}
		voters, learners, err := e.etcdMembers(ctx)
		if err != nil {
			return false, "etcd member list: " + err.Error()
		}
		if voters != 3 || learners != 0 {
			return false, fmt.Sprintf("etcd: %d voting members, %d learners", voters, learners)
		}
		if e.o.real {
			return podNetworkUp(ctx, cs, len(nodes))
		}
		return true, ""
	})
	if err != nil {
		e.dumpLogs()
		return err
	}
	took := time.Since(e.start)
	e.full = took
	// Now the invariants.
	var errs []string
	inits := 0
	for _, n := range nodes {
		inits += countStarted(e.agentLog(n.name), "run kubeadm init --config")
		exits := e.agentExits(n.name)
		if len(exits) == 0 || exits[len(exits)-1] != 0 {
			errs = append(errs, fmt.Sprintf("%s: agent exit codes %v, want a last 0", n.name, exits))
		}
		if _, err := os.Stat(e.nodePath(n.name, "var", "lib", "kiln", "done")); err != nil {
			errs = append(errs, fmt.Sprintf("%s: no /var/lib/kiln/done", n.name))
		}
	}
	if inits != 1 {
		errs = append(errs, fmt.Sprintf("kubeadm init ran %d times, want exactly 1", inits))
	}
	state, _ := os.ReadFile(e.nodePath("cp1", "var", "lib", "kiln", "state.json"))
	if !strings.Contains(string(state), `"bootstrap": "init"`) {
		errs = append(errs, "cp1's state.json does not record bootstrap=init")
	}
	// The init agent deletes the kubeadm-certs Secret once every control
	// plane is Ready: the keys do not stay in the cluster.
	if _, err := cs.CoreV1().Secrets("kube-system").Get(ctx, "kubeadm-certs", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		errs = append(errs, fmt.Sprintf("Secret kube-system/kubeadm-certs still exists (or cannot be read: %v)", err))
	}
	if !strings.Contains(e.agentLog("cp1"), "3 of 3 control planes are Ready") {
		errs = append(errs, "cp1's agent never saw 3 of 3 control planes Ready")
	}
	if h := e.vipHolders(); len(h) != 1 {
		errs = append(errs, fmt.Sprintf("the virtual IP %s is held by %v, want exactly one control plane", vip, h))
	} else {
		e.logf("the virtual IP %s is on %s", vip, h[0])
	}
	if err := e.checkManifests(); err != nil {
		errs = append(errs, err.Error())
	}
	if err := e.expectNoBootstrapSecrets(nodes); err != nil {
		errs = append(errs, err.Error())
	}
	if e.o.real {
		if err := e.expectServiceAcrossNodes(ctx, cs); err != nil {
			errs = append(errs, err.Error())
		}
		if err := e.expectReported(nodes); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		e.dumpLogs()
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	list, _ := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	for _, n := range list.Items {
		role := "worker"
		if _, ok := n.Labels["node-role.kubernetes.io/control-plane"]; ok {
			role = "control-plane"
		}
		e.logf("node %s (%s) Ready=%t", n.Name, role, nodeReady(&n))
	}
	e.logf("FULL CLUSTER in %s: 3 control planes + 2 workers Ready, etcd 3 voting members, 1 kubeadm init, every agent done", took.Round(100*time.Millisecond))
	return nil
}

// countStarted counts the agent's "run <command>: started" lines.
func countStarted(log, prefix string) int { return countLines(log, prefix, ": started") }

// countFinished counts the agent's "run <command>: finished in ..." lines.
func countFinished(log, prefix string) int { return countLines(log, prefix, ": finished in") }

func countLines(log, prefix, suffix string) int {
	n := 0
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, prefix) && strings.Contains(line, suffix) {
			n++
		}
	}
	return n
}

// dumpLogs prints the end of every node's agent log (on failure).
func (e *env) dumpLogs() {
	for name := range e.specs {
		log := e.agentLog(name)
		lines := strings.Split(strings.TrimRight(log, "\n"), "\n")
		if len(lines) > 15 {
			lines = lines[len(lines)-15:]
		}
		fmt.Printf("----- %s agent.log (last lines; all logs in %s)\n%s\n", name, e.nodePath(name), strings.Join(lines, "\n"))
	}
}

// vipHolders lists the control planes whose eth0 has the virtual IP.
func (e *env) vipHolders() []string {
	var out []string
	for name, n := range e.specs {
		if n.role == "worker" {
			continue
		}
		b, err := exec.Command("ip", "-n", nsPrefix+name, "-o", "addr", "show", "dev", "eth0").Output()
		if err == nil && strings.Contains(string(b), " "+vip+"/") {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// checkManifests checks what the init agent applied: every object of
// every file in cp1's /etc/kiln/manifests (flannel, then the add-on)
// exists with kiln among its field managers (if it has any), and applying each file again
// as the agent does leaves every object's resourceVersion as it was.
func (e *env) checkManifests() error {
	dir := e.nodePath("cp1", "etc", "kiln", "manifests")
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) < 2 {
		return fmt.Errorf("manifests on cp1: %v %v, want the pod network and the add-on", files, err)
	}
	if _, err := e.client(); err != nil { // writes admin.conf
		return err
	}
	for _, f := range files {
		name := filepath.Base(f)
		before, err := e.objects(f)
		if err != nil {
			return fmt.Errorf("%s was not applied: %w", name, err)
		}
		if docs := strings.Count("\n"+string(mustRead(f)), "\nkind:"); len(before) != docs {
			return fmt.Errorf("%s: %d objects in the cluster, %d in the file", name, len(before), docs)
		}
		for id, o := range before {
			// An object that holds nothing but its name (flannel's
			// ServiceAccount) has no managed fields at all.
			if len(o.managers) > 0 && !slices.Contains(o.managers, "kiln") {
				return fmt.Errorf("%s: %s is managed by %v, not by field manager kiln", name, id, o.managers)
			}
		}
		if _, err := e.kubectl("apply", "--server-side", "--field-manager", "kiln", "--force-conflicts", "--filename", f); err != nil {
			return err
		}
		after, err := e.objects(f)
		if err != nil {
			return err
		}
		for id, o := range before {
			if after[id].resourceVersion != o.resourceVersion {
				return fmt.Errorf("%s: applying it again changed %s (resourceVersion %s, then %s)", name, id, o.resourceVersion, after[id].resourceVersion)
			}
		}
		e.logf("%s: %d objects applied by the init agent under field manager kiln; applying again changed no resourceVersion", name, len(before))
	}
	return nil
}

type object struct {
	resourceVersion string
	managers        []string
}

// objects reads the cluster's objects of a manifest file, by
// kind/namespace/name.
func (e *env) objects(file string) (map[string]object, error) {
	out, err := e.kubectl("get", "--show-managed-fields", "--filename", file, "--output", "json")
	if err != nil {
		return nil, err
	}
	type item struct {
		Kind     string `json:"kind"`
		Metadata struct {
			Name            string `json:"name"`
			Namespace       string `json:"namespace"`
			ResourceVersion string `json:"resourceVersion"`
			ManagedFields   []struct {
				Manager string `json:"manager"`
			} `json:"managedFields"`
		} `json:"metadata"`
	}
	var list struct {
		item
		Items []item `json:"items"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, err
	}
	items := list.Items
	if list.Kind != "List" { // kubectl prints one object as itself
		items = []item{list.item}
	}
	objs := map[string]object{}
	for _, it := range items {
		o := object{resourceVersion: it.Metadata.ResourceVersion}
		for _, m := range it.Metadata.ManagedFields {
			o.managers = append(o.managers, m.Manager)
		}
		objs[it.Kind+"/"+it.Metadata.Namespace+"/"+it.Metadata.Name] = o
	}
	return objs, nil
}

func mustRead(p string) []byte {
	b, _ := os.ReadFile(p)
	return b
}

// kubectl runs the cluster's kubectl with the admin kubeconfig.
func (e *env) kubectl(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(e.o.tools, "kubectl-"+e.o.version), append([]string{"--kubeconfig", filepath.Join(e.dir, "admin.conf")}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// failoverBound is what the vip-failover scenario allows from the power
// cut to the first API answer through the moved virtual IP: keepalived
// declares the holder dead after 3 advertisements (advertInterval 1 s)
// plus its skew, HAProxy drops a dead backend after 2 failed 1 s checks.
const failoverBound = 15 * time.Second

func scenarioVIPFailover(e *env) error {
	for _, n := range all {
		if err := e.boot(n, uploadArgs...); err != nil {
			return err
		}
	}
	if err := e.expectFullCluster(all); err != nil {
		return err
	}
	holders := e.vipHolders()
	if len(holders) != 1 {
		return fmt.Errorf("virtual IP held by %v", holders)
	}
	old := holders[0]
	probe, err := e.readyzProbe()
	if err != nil {
		return err
	}
	if err := probe(); err != nil {
		return fmt.Errorf("the API does not answer through %s before the failover: %w", endpoint, err)
	}
	cut := time.Now() // the kill's SIGKILL ends keepalived's advertisements
	e.kill(old)
	e.logf("power cut on %s, the virtual IP's holder (its processes were gone %s after the SIGKILL)", old, time.Since(cut).Round(100*time.Millisecond))
	var moved, answered time.Duration
	var newHolder string
	failures := 0
	for answered == 0 {
		if time.Since(cut) > failoverBound {
			return fmt.Errorf("no API answer through %s within %s of the power cut (virtual IP moved after %s, holders now %v)", endpoint, failoverBound, moved, e.vipHolders())
		}
		if moved == 0 {
			if h := e.vipHolders(); len(h) == 1 {
				moved, newHolder = time.Since(cut), h[0]
			}
		}
		if err := probe(); err != nil {
			failures++
		} else if moved > 0 {
			answered = time.Since(cut)
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.logf("VIP FAILOVER: %s lost power; the virtual IP moved to %s after %s; the API answered through %s after %s (%d probes failed in between)",
		old, newHolder, moved.Round(100*time.Millisecond), endpoint, answered.Round(100*time.Millisecond), failures)
	cs, err := e.client()
	if err != nil {
		return err
	}
	ctx, cancel := e.deadline()
	defer cancel()
	if _, err := cs.CoreV1().ConfigMaps("kiln-rehearsal").Update(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "addon", Namespace: "kiln-rehearsal"},
		Data:       map[string]string{"applied-by": "kiln-firstboot", "written-after-failover": "yes"},
	}, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("write through the moved virtual IP: %w", err)
	}
	e.logf("a write through the moved virtual IP succeeded (etcd has 2 of 3 members)")
	return nil
}

// readyzProbe returns a check of GET /readyz through the endpoint on a new
// connection each time (as a fresh kubectl would make), 1 s at most.
func (e *env) readyzProbe() (func() error, error) {
	if _, err := e.client(); err != nil {
		return nil, err
	}
	rc, err := clientcmd.BuildConfigFromFlags("", filepath.Join(e.dir, "admin.conf"))
	if err != nil {
		return nil, err
	}
	tlsConf, err := rest.TLSConfigFor(rc)
	if err != nil {
		return nil, err
	}
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{TLSClientConfig: tlsConf, DisableKeepAlives: true}}
	return func() error {
		resp, err := hc.Get("https://" + endpoint + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("readyz: %s", resp.Status)
		}
		return nil
	}, nil
}

// scenarioKubeVIPInit checks kube-vip's kubeconfig switch on a real init
// node. kube-vip itself cannot run here (the module proxy does not serve
// it), so the rehearsal puts the VIP on cp1 the way kube-vip's ARP mode
// would; everything else is real: kubeadm init, the agent, the API server.
func scenarioKubeVIPInit(e *env) error {
	const manifest = "etc/kubernetes/manifests/kube-vip.yaml"
	if err := e.boot(cp1, uploadArgs...); err != nil {
		return err
	}
	ctx, cancel := e.deadline()
	defer cancel()
	var before string
	if err := e.waitUntil(ctx, "cp1 to place kube-vip before kubeadm init", func(context.Context) (bool, string) {
		b, err := os.ReadFile(e.nodePath("cp1", manifest))
		before = string(b)
		return err == nil, fmt.Sprint(err)
	}); err != nil {
		return err
	}
	if !strings.Contains(before, "path: /etc/kubernetes/super-admin.conf") || strings.Contains(before, "path: /etc/kubernetes/admin.conf") {
		return fmt.Errorf("before kubeadm init, kube-vip.yaml should mount super-admin.conf:\n%s", before)
	}
	if err := sh("ip", "-n", nsPrefix+"cp1", "addr", "add", vip+"/32", "dev", "eth0"); err != nil {
		return err
	}
	e.logf("kube-vip.yaml placed with super-admin.conf; %s put on cp1 in kube-vip's place", vip)
	var after string
	if err := e.waitUntil(ctx, "the agent to switch kube-vip to admin.conf", func(context.Context) (bool, string) {
		b, _ := os.ReadFile(e.nodePath("cp1", manifest))
		after = string(b)
		st, _ := e.status("cp1")
		return strings.Contains(after, "path: /etc/kubernetes/admin.conf"), fmt.Sprintf("cp1 %s/%s#%d", st.Phase, st.State, st.Attempt)
	}); err != nil {
		e.dumpLogs()
		return err
	}
	if strings.Contains(after, "super-admin.conf") {
		return fmt.Errorf("kube-vip.yaml still names super-admin.conf:\n%s", after)
	}
	// What kube-vip does with its kubeconfig: leader election on a Lease
	// in kube-system, through the local API server. admin.conf may, now
	// that kubeadm init has bound its group (kubeadm's part; kiln's is to
	// switch only after init).
	adminConf := e.nodePath("cp1", "etc", "kubernetes", "admin.conf")
	for _, verb := range []string{"get", "create", "update"} {
		out, err := exec.Command(filepath.Join(e.o.tools, "kubectl-"+e.o.version), "--kubeconfig", adminConf, "--server", "https://"+cp1.ip()+":6443",
			"auth", "can-i", verb, "leases.coordination.k8s.io", "--namespace", "kube-system").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "yes" {
			return fmt.Errorf("admin.conf may not %s Leases in kube-system: %v: %s", verb, err, out)
		}
	}
	e.logf("after kubeadm init the agent switched kube-vip.yaml to admin.conf, which (by kubeadm's binding) may get, create and update kube-system Leases, as kube-vip's leader election needs")
	return nil
}
