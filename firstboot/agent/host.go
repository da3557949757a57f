package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// waitClock waits until the clock reads at least the metadata's notBefore:
// a Raspberry Pi boots in 1970 until NTP answers, and TLS fails until then.
func (r *run) waitClock(ctx context.Context) error {
	return r.waitFor(ctx, "a synchronised clock", func() (bool, string, time.Duration) {
		now := r.Clock.Now()
		if now.Before(r.nc.NotBefore) {
			return false, fmt.Sprintf("clock reads %s, before notBefore %s", now.UTC().Format("2006-01-02T15:04:05Z"), r.nc.NotBefore.UTC().Format("2006-01-02T15:04:05Z")), 0
		}
		return true, "", 0
	})
}

// Kernel modules kubeadm's preflight checks and pod networking need.
var kernelModules = []string{"overlay", "br_netfilter"}

func (r *run) loadModules(ctx context.Context) error {
	_, err := r.command(ctx, "modprobe", append([]string{"-a"}, kernelModules...)...)
	return err
}

// Sysctls kubeadm's preflight checks need. Optional ones are skipped when
// the kernel lacks them (IPv6 disabled).
var sysctls = []struct {
	key      string
	optional bool
}{
	{"net/bridge/bridge-nf-call-iptables", false},
	{"net/bridge/bridge-nf-call-ip6tables", true},
	{"net/ipv4/ip_forward", false},
	{"net/ipv6/conf/all/forwarding", true},
}

func (r *run) setSysctls(context.Context) error {
	for _, s := range sysctls {
		name := strings.ReplaceAll(s.key, "/", ".")
		err := r.FS.WriteFile("/proc/sys/"+s.key, []byte("1\n"))
		switch {
		case s.optional && errors.Is(err, fs.ErrNotExist):
			r.log.printf("sysctl %s: not in this kernel; skipped", name)
		case err != nil:
			return fmt.Errorf("set sysctl %s: %w", name, err)
		}
	}
	return nil
}

func (r *run) swapOff(ctx context.Context) error {
	_, err := r.command(ctx, "swapoff", "-a")
	return err
}

// setHostname names the node: kubeadm registers it under the kernel
// hostname. A name made from the template is recorded in the state file
// before it is used, so a run resumed after a power loss names the node
// as kubeadm already knows it.
func (r *run) setHostname(context.Context) error {
	name := r.nc.Hostname.Name
	if name == "" {
		name = r.state.Hostname
	}
	if name == "" {
		mac, err := r.FirstMAC()
		if err != nil {
			return err
		}
		name = nodeconfig.ExpandHostname(r.nc.Hostname.Template, r.nc.Cluster.Name, r.nc.Role, mac)
		if err := nodeconfig.CheckNodeName(name); err != nil {
			return &MetadataError{Err: fmt.Errorf("hostname.template: %w", err)}
		}
		r.state.Hostname = name
		if err := r.state.save(r.FS); err != nil {
			return err
		}
	}
	r.status.Node = name
	if cur, err := r.FS.ReadFile("/etc/hostname"); err != nil || strings.TrimSpace(string(cur)) != name {
		if err := r.FS.Replace("/etc/hostname", []byte(name+"\n"), 0o644); err != nil {
			return fmt.Errorf("write /etc/hostname: %w", err)
		}
	}
	if err := r.FS.WriteFile("/proc/sys/kernel/hostname", []byte(name)); err != nil {
		return fmt.Errorf("set hostname: %w", err)
	}
	r.log.printf("node name %s", name)
	return nil
}

// socketTimeout bounds one connection attempt to the runtime's socket.
const socketTimeout = 5 * time.Second

// waitRuntime waits until the container runtime accepts connections on its
// socket: the socket file alone may be left from before a crash or
// reboot.
func (r *run) waitRuntime(ctx context.Context) error {
	sock, ok := strings.CutPrefix(r.join.CRISocket, "unix://")
	if !ok {
		return &MetadataError{Err: fmt.Errorf("%s: nodeRegistration.criSocket %q is not a unix:// socket", r.nc.Kubeadm.JoinConfig, r.join.CRISocket)}
	}
	return r.waitFor(ctx, "the container runtime at "+sock, func() (bool, string, time.Duration) {
		dctx, cancel := context.WithTimeout(ctx, socketTimeout)
		defer cancel()
		if err := r.DialSocket(dctx, sock); err != nil {
			return false, err.Error(), 0
		}
		return true, "", 0
	})
}

// waitFor polls cond until it holds, logging when the reason it does not
// changes, so a long wait leaves a few lines rather than thousands. cond
// says how long to wait before it is asked again (0: Timing.Poll).
func (r *run) waitFor(ctx context.Context, what string, cond func() (bool, string, time.Duration)) error {
	last := ""
	for {
		ok, why, wait := cond()
		if ok {
			if last != "" {
				r.log.printf("waited for %s", what)
			}
			return nil
		}
		if why != last {
			r.log.printf("waiting for %s: %s", what, why)
			r.status.LastError = why
			r.publish(StateWaiting)
			last = why
		}
		if err := r.Clock.Sleep(ctx, cmp.Or(wait, r.Timing.Poll)); err != nil {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
	}
}
