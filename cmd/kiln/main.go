// Command kiln bakes immutable OS images and provisioning configs for the
// nodes of a highly available kubeadm cluster.
package main

import (
	"os"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
