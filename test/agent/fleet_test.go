package agent_test

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/test/agent/sim"
)

// fleetRoles is the simulated fleet: 3 control planes and 2 workers.
var fleetRoles = map[string]nodeconfig.Role{
	"cp-1": nodeconfig.RoleInit, "cp-2": nodeconfig.RoleControlPlane, "cp-3": nodeconfig.RoleControlPlane,
	"w-1": nodeconfig.RoleWorker, "w-2": nodeconfig.RoleWorker,
}

// Permanent failures a fleet node may end with, by the agent's advice.
const (
	certificatesGone = "the kubeadm-certs Secret is gone"
	tokenUnknown     = "the endpoint does not know the bootstrap token"
)

// scenario is one boot of the fleet.
type scenario struct {
	name string
	opts clusterOptions
	// lbAt is when the load balancer comes up.
	lbAt time.Duration
	// at overrides boot times of some nodes (others boot in a shuffled
	// order, 40ms apart).
	at map[string]time.Duration
	// after holds a node's boot until the cluster reaches a state.
	after map[string]func(*sim.Cluster) bool
	// kill names a node to SIGKILL in the middle of its join, then boot
	// again.
	kill string
	// mustFail maps nodes that must end with a permanent error to it;
	// mayFail is the one other nodes may end with.
	mustFail map[string]string
	mayFail  string
	// mustRetry maps nodes that must end their run still retrying (exit
	// 1, for systemd to start them again) to their last error: what the
	// endpoint said before it proved itself is never final.
	mustRetry map[string]string
}

func scenarios() []scenario {
	var out []scenario
	others := []string{"cp-2", "cp-3", "w-1", "w-2"}
	for seed := range 4 {
		rng := rand.New(rand.NewPCG(uint64(seed), 42))
		victim := others[rng.IntN(len(others))]
		out = append(out,
			scenario{name: "shuffled"},
			scenario{name: "lb-late", lbAt: 1500 * time.Millisecond},
			scenario{name: "init-last", at: map[string]time.Duration{"cp-1": 1500 * time.Millisecond}},
			scenario{name: "upload-expired", opts: clusterOptions{uploadWindow: "1s"},
				after:    map[string]func(*sim.Cluster) bool{"cp-3": (*sim.Cluster).CertificatesDeleted},
				mustFail: map[string]string{"cp-3": certificatesGone}, mayFail: certificatesGone},
			scenario{name: "token-expired", opts: clusterOptions{tokenTTL: "2s", uploadWindow: "5s"},
				after:     map[string]func(*sim.Cluster) bool{"w-2": (*sim.Cluster).TokenExpired},
				mustRetry: map[string]string{"w-2": tokenUnknown}},
			scenario{name: "sigkill-" + victim, kill: victim},
		)
	}
	return out
}

// TestFleet boots the fleet in shuffled orders with the failures the
// agent must survive or report.
func TestFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("fleet simulation skipped in -short mode")
	}
	start := time.Now()
	list := scenarios()
	t.Cleanup(func() { t.Logf("%d scenarios in %s", len(list), time.Since(start).Round(time.Millisecond)) })
	for i, sc := range list {
		t.Run(fmt.Sprintf("%02d-%s", i, sc.name), func(t *testing.T) {
			t.Parallel()
			runScenario(t, sc, rand.New(rand.NewPCG(uint64(i), 7)))
		})
	}
}

func runScenario(t *testing.T, sc scenario, rng *rand.Rand) {
	c := newCluster(t, sc.opts)
	names := []string{"cp-1", "cp-2", "cp-3", "w-1", "w-2"}
	rng.Shuffle(len(names), func(i, j int) { names[i], names[j] = names[j], names[i] })
	at := map[string]time.Duration{}
	for i, n := range names {
		at[n] = time.Duration(i) * 40 * time.Millisecond
	}
	for n, d := range sc.at {
		at[n] = d
	}
	nodes := map[string]*simNode{}
	for _, n := range names {
		nodes[n] = c.node(n, fleetRoles[n])
	}
	if sc.kill != "" {
		c.sim.SlowJoin(sc.kill, time.Second)
	}
	t.Logf("boot order %v, times %v, load balancer at %s", names, at, sc.lbAt)

	begin := time.Now()
	deadline := begin.Add(90 * time.Second)
	go func() {
		time.Sleep(sc.lbAt)
		if err := c.sim.StartLB(); err != nil {
			t.Error(err)
		}
	}()
	booted := make(chan string, len(names))
	for _, n := range names {
		go func() {
			time.Sleep(at[n])
			if cond := sc.after[n]; cond != nil {
				for !cond(c.sim) && time.Now().Before(deadline) {
					time.Sleep(20 * time.Millisecond)
				}
			}
			nodes[n].start(c)
			booted <- n
		}()
	}
	for range names {
		<-booted
	}
	if sc.kill != "" {
		v := nodes[sc.kill]
		// The kill point: mid-join, before the kubelet has bootstrapped;
		// on a control plane, after kubeadm added the etcd member and
		// wrote its manifest.
		waitFor(t, 60*time.Second, func() bool {
			m, ok := c.sim.Snapshot().Members[sc.kill]
			return ok && !m.Joined && (!fleetRoles[sc.kill].IsControlPlane() || strings.Contains(v.read("/etc/kubernetes/manifests/etcd.yaml"), "--initial-cluster="))
		})
		v.kill()
		if c.sim.Snapshot().Members[sc.kill].Joined {
			t.Fatalf("%s joined before the kill", sc.kill)
		}
		v.start(c)
	}

	codes := map[string]int{}
	for _, n := range names {
		codes[n] = nodes[n].wait(deadline)
	}
	took := time.Since(begin)
	snap := c.sim.Snapshot()
	if fleetRoles[sc.kill].IsControlPlane() {
		// kubeadm reset could not remove the member (no kubelet.conf): the
		// agent's own removal through etcd did, before that reset.
		events := strings.Join(snap.Events, "\n")
		removed, kept := strings.Index(events, "etcd-remove "+sc.kill), strings.Index(events, "reset-kept-etcd-member "+sc.kill)
		if removed < 0 || kept >= 0 && kept < removed {
			t.Errorf("%s's stale etcd member was not removed by its agent before kubeadm reset:\n%s", sc.kill, events)
		}
	}
	if len(snap.Inits) != 1 {
		t.Errorf("kubeadm init ran %d times (%v), want exactly once", len(snap.Inits), snap.Inits)
	}
	for _, name := range names {
		n := nodes[name]
		code, want := codes[name], sc.mustFail[name]
		switch {
		case code == 0:
			if want != "" || sc.mustRetry[name] != "" {
				t.Errorf("%s joined; want it to fail with %q%q", name, want, sc.mustRetry[name])
			}
			if !snap.Members[name].Joined || n.read(nodeconfig.DoneFile) == "" {
				t.Errorf("%s exited 0 but is not a joined member (%+v) with a done file", name, snap.Members[name])
			}
		case code == 3:
			s := status(t, n)
			msg, _ := s["lastError"].(string)
			if want == "" {
				want = sc.mayFail
			}
			if want == "" || s["permanent"] != true || !strings.Contains(msg, want) {
				t.Errorf("%s failed permanently with %q; want %q", name, msg, want)
			}
		case code == 1 && sc.mustRetry[name] != "":
			s := status(t, n)
			if msg, _ := s["lastError"].(string); s["permanent"] == true || !strings.Contains(msg, sc.mustRetry[name]) {
				t.Errorf("%s stopped with %q (permanent %v); want it retrying with %q", name, msg, s["permanent"], sc.mustRetry[name])
			}
		default:
			t.Errorf("%s: exit %d (-1: still running at the deadline)", name, code)
		}
		if t.Failed() {
			t.Logf("%s log:\n%s", name, n.log())
		}
	}
	if sc.kill != "" && nodes[sc.kill].runs != 2 {
		t.Errorf("%s booted %d times", sc.kill, nodes[sc.kill].runs)
	}
	c.checkNoSecrets(nodesOf(nodes)...)
	t.Logf("exits %v in %s", codes, took.Round(time.Millisecond))
}

func nodesOf(m map[string]*simNode) []*simNode {
	var out []*simNode
	for _, n := range m {
		out = append(out, n)
	}
	return out
}
