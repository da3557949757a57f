package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
)

// shims are the host commands a node needs that the rehearsal machine
// cannot provide as they are. Each is installed on the nodes' PATH under its
// name, as a link to this binary.
var shims = map[string]func(args []string) int{
	// kubeadm calls systemctl to check, enable and restart the kubelet
	// service. On a real node (machine.go) the machine's unit manager
	// answers. The node emulator is the kubelet (and containerd) and always
	// runs; every other unit (firewalld, ...) is reported inactive, as on a
	// node that has none.
	"systemctl": func(args []string) int {
		if _, err := os.Stat(controlSocket); err == nil {
			return forwardSystemctl(args)
		}
		verb, units := systemctlArgs(args)
		ours := len(units) > 0
		for _, u := range units {
			ours = ours && (u == "kubelet.service" || u == "containerd.service")
		}
		switch verb {
		case "is-active":
			if ours {
				fmt.Println("active")
				return 0
			}
			fmt.Println("inactive")
			return 3
		case "is-enabled":
			if ours {
				fmt.Println("enabled")
				return 0
			}
			fmt.Println("disabled")
			return 1
		}
		return 0
	},
	// kubeadm's preflight reads `kubelet --version` (KubeletVersion check).
	"kubelet": func(args []string) int {
		if len(args) == 1 && args[0] == "--version" {
			fmt.Println("Kubernetes " + os.Getenv("REHEARSAL_KUBERNETES_VERSION"))
			return 0
		}
		fmt.Fprintln(os.Stderr, "kubelet shim: only --version is emulated (the node emulator is the kubelet)")
		return 1
	},
	// The agent runs `modprobe -a overlay br_netfilter`. The CI kernel
	// (Firecracker) has no loadable modules and no /lib/modules: the shim
	// succeeds for a module that is built in, and fails like modprobe for
	// one that is not.
	"modprobe": func(args []string) int {
		rc := 0
		for _, m := range args {
			if strings.HasPrefix(m, "-") {
				continue
			}
			if builtIn(m) {
				continue
			}
			fmt.Fprintf(os.Stderr, "modprobe: FATAL: Module %s not found (the rehearsal's modprobe shim only accepts built-in modules)\n", m)
			rc = 1
		}
		return rc
	},
	// The agent runs `swapoff -a`. Emulated nodes share the host's kernel,
	// so a real swapoff would switch off the swap of the machine running the
	// rehearsal; the shim only reports what is active.
	"swapoff": func(args []string) int {
		data, _ := os.ReadFile("/proc/swaps")
		if n := strings.Count(strings.TrimSpace(string(data)), "\n"); n > 0 {
			fmt.Fprintf(os.Stderr, "swapoff shim: the host has %d active swap area(s); left on (kubeadm's preflight warns)\n", n)
		}
		return 0
	},
}

func builtIn(module string) bool {
	if _, err := os.Stat("/sys/module/" + module); err == nil {
		return true
	}
	// br_netfilter shows no /sys/module entry when built in, only its sysctls.
	if module == "br_netfilter" {
		_, err := os.Stat("/proc/sys/net/bridge/bridge-nf-call-iptables")
		return err == nil
	}
	return false
}

// forwardSystemctl hands systemctl's arguments to the machine's unit
// manager (units.go) and prints its answer.
func forwardSystemctl(args []string) int {
	c, err := net.Dial("unix", controlSocket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "systemctl: %v\n", err)
		return 1
	}
	defer c.Close()
	if _, err := io.WriteString(c, strings.Join(args, "\x00")+"\n"); err != nil {
		fmt.Fprintf(os.Stderr, "systemctl: %v\n", err)
		return 1
	}
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	code, cerr := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || cerr != nil {
		fmt.Fprintf(os.Stderr, "systemctl: bad answer %q from the unit manager\n", line)
		return 1
	}
	_, _ = io.Copy(os.Stdout, r)
	return code
}
