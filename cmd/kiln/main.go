// Command kiln bakes immutable OS images and provisioning configs for the
// nodes of a highly available kubeadm cluster.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// A closed stdout (kiln pxe | head) fails the write instead of killing
	// kiln before it removes its work folders.
	signal.Ignore(syscall.SIGPIPE)
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
