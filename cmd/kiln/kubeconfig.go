package main

import (
	"crypto/rand"
	"fmt"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/kubeconfig"
)

type kubeconfigOptions struct {
	user     string
	validity time.Duration
	dest     string
	force    bool
	output   outputFormat
}

func newKubeconfigCmd(g *globals) *cobra.Command {
	o := &kubeconfigOptions{}
	cmd := &cobra.Command{
		Use:   "kubeconfig",
		Short: "Write an admin kubeconfig for the cluster endpoint",
		Long: `kubeconfig writes a kubeconfig (mode 0600) for the control-plane endpoint
with a client certificate signed by the cluster CA in the group
` + kubeconfig.AdminGroup + `, which kubeadm init binds to cluster-admin. It works
as soon as the init node has run kubeadm init.`,
		Example: `  kiln kubeconfig
  kiln kubeconfig --user alice --validity 720h --dest ~/.kube/lab.conf`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runKubeconfig(g, o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.user, "user", "kubernetes-admin", "user name (certificate common name)")
	f.DurationVar(&o.validity, "validity", 365*24*time.Hour, "certificate lifetime")
	f.StringVar(&o.dest, "dest", "", "kubeconfig file (default: admin.conf beside the cluster file)")
	f.BoolVar(&o.force, "force", false, "replace --dest if it exists")
	addOutputFlag(cmd, &o.output)
	return cmd
}

func runKubeconfig(g *globals, o *kubeconfigOptions) error {
	if o.validity <= 0 {
		return fault.Wrap(fault.Input, fmt.Errorf("--validity %s: must be positive, for example 8760h", o.validity))
	}
	if o.user == "" {
		return fault.Wrap(fault.Input, fmt.Errorf("--user: must not be empty"))
	}
	c, s, err := g.load()
	if err != nil {
		return err
	}
	dest := o.dest
	if dest == "" {
		dest = filepath.Join(filepath.Dir(g.clusterFile), "admin.conf")
	}
	data, err := kubeconfig.Admin(c, s, kubeconfig.Options{User: o.user, Validity: o.validity, Now: time.Now(), Rand: rand.Reader})
	if err != nil {
		return err
	}
	if err := atomicfile.Write(dest, data, 0o600, o.force); err != nil {
		return err
	}
	res := map[string]string{"kubeconfig": dest, "server": "https://" + c.ControlPlaneEndpoint, "user": o.user, "group": kubeconfig.AdminGroup}
	return emit(g.stdout, o.output, res, fmt.Sprintf("wrote %s: user %s (group %s) at https://%s", dest, o.user, kubeconfig.AdminGroup, c.ControlPlaneEndpoint))
}
