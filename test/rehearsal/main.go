// Command rehearsal is kiln's real-kubeadm rehearsal (issue 6): real
// kubeadm, kube-apiserver, kube-controller-manager, kube-scheduler and etcd,
// built from their Go modules at the cluster's Kubernetes version, brought up
// by the real kiln-firstboot agent on nodes emulated as Linux namespaces,
// reached through a virtual IP that the control planes' own keepalived and
// HAProxy (Debian's) hold. Only the container runtime and the kubelet are
// replaced (by the node emulator in node.go, pods.go and kubelet.go).
//
//	rehearsal run [-real-nodes] [flags] [scenario...]   orchestrate scenarios (as root)
//	rehearsal provision check [flags]                   kiln serve + Ignition per node, checked (as root)
//	rehearsal images [flags]                            the real nodes' images as an OCI layout
//	rehearsal node [flags]                              one emulated node (started by run)
//	rehearsal machine [flags]                           one real node (started by run)
//	rehearsal probe serve|get|resolve                   the probe image's commands
//
// The same binary is installed as the nodes' systemctl, kubelet, modprobe
// and swapoff (shims.go), chosen by the name it is called under.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/apimachinery/pkg/types"
)

func main() {
	if shim, ok := shims[filepath.Base(os.Args[0])]; ok {
		os.Exit(shim(os.Args[1:]))
	}
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: rehearsal run [-real-nodes] [flags] [scenario...] | provision check [flags] | images [flags] | probe serve|get|resolve ... (node, machine: started by run)")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "run":
		err = runMain(os.Args[2:])
	case "node":
		err = nodeMain(os.Args[2:])
	case "machine":
		err = machineMain(os.Args[2:])
	case podExecCommand:
		err = podExec(os.Args[2:])
	case "provision":
		err = provisionMain(os.Args[2:])
	case "images":
		err = imagesMain(os.Args[2:])
	case "probe":
		err = probeMain(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q: use run, provision check or images (node, machine and probe are started by run)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "rehearsal: %v\n", err)
		os.Exit(1)
	}
}

func typesUID(s string) types.UID { return types.UID(s) }
