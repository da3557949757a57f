package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/grpclog"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
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

func scenarioForeignCA(e *env) error {
	other := filepath.Join(e.dir, "other-cluster")
	if err := kilnInit(e.o, other); err != nil {
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
	if err := e.waitUntil(ctx, "the foreign node's agent to give up", func(context.Context) (bool, string) {
		st, err := e.status("foreign")
		exits := e.agentExits("foreign")
		return err == nil && st.State == "failed" && len(exits) > 0, fmt.Sprintf("%s %s exits %v", st.Phase, st.State, exits)
	}); err != nil {
		return err
	}
	st, _ := e.status("foreign")
	exits := e.agentExits("foreign")
	var errs []string
	if !st.Permanent {
		errs = append(errs, "status.permanent is false")
	}
	if len(exits) != 1 || exits[0] != 3 {
		errs = append(errs, fmt.Sprintf("agent exit codes %v, want [3] (permanent, not restarted)", exits))
	}
	if !strings.Contains(st.LastError, "serves another cluster") {
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
	e.logf("foreign node: failed permanently (exit 3) with %q", st.LastError)
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
		if _, err := os.Stat(e.nodePath(n.name, "varlib", "kiln", "done")); err != nil {
			errs = append(errs, fmt.Sprintf("%s: no /var/lib/kiln/done", n.name))
		}
	}
	if inits != 1 {
		errs = append(errs, fmt.Sprintf("kubeadm init ran %d times, want exactly 1", inits))
	}
	state, _ := os.ReadFile(e.nodePath("cp1", "varlib", "kiln", "state.json"))
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
