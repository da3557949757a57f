package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	fakeremote "k8s.io/cri-client/pkg/fake"
	"sigs.k8s.io/yaml"
)

// The node emulator: one process per node, started by the orchestrator
// inside the node's network, mount and UTS namespaces. It stands in for the
// machine's systemd, containerd and kubelet, and nothing else:
//   - overlays /etc and /var/lib (kubeadm hard-codes /etc/kubernetes and
//     /var/lib/kubelet) and binds a per-node directory on /run;
//   - serves an in-memory fake CRI on the node's criSocket;
//   - runs static pods as processes, answers the kubelet health endpoint,
//     does the kubelet TLS bootstrap, keeps the Node Ready (kubelet.go);
//   - runs kiln-firstboot as its systemd unit would (Restart=on-failure,
//     RestartPreventExitStatus=2 3, ConditionPathExists=!/var/lib/kiln/removed-after-join).

type nodeOptions struct {
	dir       string // per-node state on the host
	ip        string
	agent     string // kiln-firstboot binary
	agentArgs string
	timeScale string
	version   string
}

func nodeMain(args []string) error {
	var o nodeOptions
	fl := flag.NewFlagSet("node", flag.ContinueOnError)
	fl.StringVar(&o.dir, "dir", "", "node state directory on the host")
	fl.StringVar(&o.ip, "ip", "", "node IP")
	fl.StringVar(&o.agent, "agent", "", "kiln-firstboot binary")
	fl.StringVar(&o.agentArgs, "agent-args", "", "extra agent arguments (space separated)")
	fl.StringVar(&o.timeScale, "time-scale", "", "KILN_FIRSTBOOT_TIME_SCALE for the agent")
	fl.StringVar(&o.version, "version", "", "Kubernetes version the kubelet shim reports")
	if err := fl.Parse(args); err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(o.dir, "node.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	log.SetOutput(logf)
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.Printf("node emulator starting: pid %d, ip %s", os.Getpid(), o.ip)
	if err := mountNode(o.dir); err != nil {
		return fmt.Errorf("mount node filesystems: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	sock, err := criSocket(o.dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		return err
	}
	cri := fakeremote.NewFakeRemoteRuntime()
	if err := cri.Start("unix://" + sock); err != nil {
		return fmt.Errorf("fake CRI: %w", err)
	}
	defer cri.Stop()
	log.Printf("fake CRI serving on %s", sock)

	go serveHealthz()
	pods := newPodManager(filepath.Join(o.dir, "logs"))
	go pods.run(ctx)
	k := &kubelet{ip: o.ip, version: o.version, pods: pods}
	go k.run(ctx)
	go superviseAgent(ctx, o)
	<-ctx.Done()
	log.Printf("stopping")
	pods.stopAll()
	return nil
}

// mountNode gives the node its own /etc, /var/lib and /run. The emulator
// runs in a fresh mount namespace (unshare --mount, private propagation), so
// none of this is visible on the host, and all of it vanishes with the last
// process of the node.
func mountNode(dir string) error {
	for _, m := range []struct{ target, name string }{{"/etc", "etc"}, {"/var/lib", "var/lib"}} {
		upper, work := filepath.Join(dir, m.name), filepath.Join(dir, m.name+".work")
		for _, d := range []string{upper, work} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return err
			}
		}
		opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", m.target, upper, work)
		if err := syscall.Mount("overlay", m.target, "overlay", 0, opts); err != nil {
			return fmt.Errorf("overlay on %s: %w", m.target, err)
		}
	}
	run := filepath.Join(dir, "run")
	if err := os.MkdirAll(run, 0o755); err != nil {
		return err
	}
	if err := syscall.Mount(run, "/run", "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s on /run: %w", run, err)
	}
	return nil
}

// criSocket reads nodeRegistration.criSocket from the node's rendered join
// configuration (every role has one) on the first boot and keeps it in
// the node's state directory: the agent removes the file once the node
// joined.
func criSocket(dir string) (string, error) {
	kept := filepath.Join(dir, "cri-socket")
	if data, err := os.ReadFile(kept); err == nil {
		return string(data), nil
	}
	data, err := os.ReadFile("/etc/kiln/kubeadm-join.yaml")
	if err != nil {
		return "", err
	}
	var cfg struct {
		NodeRegistration struct {
			CRISocket string `json:"criSocket"`
		} `json:"nodeRegistration"`
	}
	if err := yaml.Unmarshal(data, &cfg); err != nil {
		return "", fmt.Errorf("kubeadm-join.yaml: %w", err)
	}
	s, ok := strings.CutPrefix(cfg.NodeRegistration.CRISocket, "unix://")
	if !ok {
		return "", fmt.Errorf("criSocket %q is not unix://", cfg.NodeRegistration.CRISocket)
	}
	return s, os.WriteFile(kept, []byte(s), 0o644)
}

// serveHealthz answers the kubelet health endpoint kubeadm polls.
func serveHealthz() {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	for {
		err := http.ListenAndServe("127.0.0.1:10248", mux)
		log.Printf("healthz: %v", err)
		time.Sleep(time.Second)
	}
}

// superviseAgent runs kiln-firstboot like its systemd unit.
func superviseAgent(ctx context.Context, o nodeOptions) {
	const restartSec = 2 * time.Second // the unit's 20s, scaled
	exits, err := os.OpenFile(filepath.Join(o.dir, "agent-exits"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		log.Printf("agent: %v", err)
		return
	}
	defer exits.Close()
	for start := 1; start <= 10; start++ { // StartLimitBurst=10
		if _, err := os.Stat("/var/lib/kiln/removed-after-join"); err == nil {
			log.Printf("agent: /var/lib/kiln/removed-after-join exists; the unit's condition skips it")
			return
		}
		out, err := os.OpenFile(filepath.Join(o.dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			log.Printf("agent: %v", err)
			return
		}
		args := []string{"--config", "/etc/kiln/node.yaml"}
		if o.agentArgs != "" {
			args = append(args, strings.Fields(o.agentArgs)...)
		}
		cmd := exec.Command(o.agent, args...)
		cmd.Stdout, cmd.Stderr = out, out
		cmd.Env = append(os.Environ(), "KILN_FIRSTBOOT_TIME_SCALE="+o.timeScale)
		cmd.Dir = "/"
		fmt.Fprintf(out, "=== rehearsal: agent start %d at %s\n", start, time.Now().UTC().Format(time.RFC3339Nano))
		if err := cmd.Start(); err != nil {
			log.Printf("agent: %v", err)
			out.Close()
			return
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-ctx.Done():
			_ = cmd.Process.Signal(syscall.SIGTERM)
			<-done
			out.Close()
			return
		case err = <-done:
		}
		out.Close()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			code = -1
		}
		fmt.Fprintf(exits, "%d\n", code)
		log.Printf("agent exited with %d", code)
		if code == 0 || code == 2 || code == 3 {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(restartSec):
		}
	}
	log.Printf("agent: start limit reached")
}
