package main

import (
	"bytes"
	"cmp"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/agentbin"
	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/render"
)

type renderOptions struct {
	role   string
	arch   string
	node   string
	format string
	dest   string
	force  bool
}

var renderFormats = []string{"node", "kubeadm", "kubeadm-join", "butane", "ignition", "kernel-args", "manifests"}

func newRenderCmd(g *globals) *cobra.Command {
	o := &renderOptions{}
	cmd := &cobra.Command{
		Use:   "render --role ROLE | --node NAME",
		Short: "Print a role's provisioning config (node metadata, kubeadm, Butane, Ignition)",
		Long: `render prints what one node role gets, without touching any disk image:

  node          /etc/kiln/node.yaml, the metadata the first-boot agent reads
  kubeadm       the kubeadm configuration the role runs (init: kubeadm init;
                control-plane and worker: kubeadm join)
  kubeadm-join  the join configuration (for init: the fallback used when the
                cluster already exists)
  butane        kiln's Butane config for the role
  ignition      the Ignition 3.4.0 config: Butane translated, the cluster's
                Butane snippets merged, validated (default)
  kernel-args   the kernel arguments build-image adds for the node (its
                static network in the initramfs, dracut's ip=, ifname=,
                vlan= and nameserver=): one line, empty when there are none
  manifests     everything the init node applies after kubeadm init, in
                order: the pod network (network.cni), then the add-ons
                (an add-on given by URL is named, not fetched: Ignition
                downloads and checks it on the node)

Roles: init (the first control plane, runs kubeadm init and carries the
cluster CAs), control-plane, worker (carries no private key at all).
Output that holds secrets is written with mode 0600 when --dest is used.`,
		Example: `  kiln render --role init --format ignition --dest init.ign
  kiln render --role worker --arch arm64 --format butane
  kiln render --role control-plane --format kubeadm
  kiln render --node cp-2 --dest cp-2.ign
  kiln render --node pi-1 --format kernel-args
  kiln render --format manifests | kubectl diff --server-side -f -`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runRender(g, o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.role, "role", "", "node role: init, control-plane or worker (default with --node: the node's role)")
	f.StringVar(&o.arch, "arch", "", "node architecture: amd64 or arm64 (default: the arch of the node's profile, then of the cluster file's profile, then amd64)")
	f.StringVar(&o.node, "node", "", "render for this inventory node: its role, arch, hostname and static network")
	f.StringVar(&o.format, "format", "ignition", "node, kubeadm, kubeadm-join, butane, ignition, kernel-args or manifests")
	f.StringVar(&o.dest, "dest", "", "write to this file (mode 0600) instead of standard output")
	f.BoolVar(&o.force, "force", false, "replace --dest if it exists")
	return cmd
}

func runRender(g *globals, o *renderOptions) error {
	if o.arch != "" {
		if err := checkArches(o.arch); err != nil {
			return err
		}
	}
	c, s, err := g.load()
	if err != nil {
		return err
	}
	if o.format == "manifests" {
		out, err := renderManifests(c)
		if err != nil {
			return err
		}
		return g.emit(o.dest, o.force, out, "the init node's manifests")
	}
	fn, err := resolveNode(c, o.node, o.role, "")
	if err != nil {
		return err
	}
	if fn.role == "" {
		return fault.Wrap(fault.Input, fmt.Errorf("--role is required: init, control-plane or worker (or --node NAME of an inventory node)"))
	}
	role := fn.role
	if fn.profile != "" {
		t, err := targetFor(c, fn.profile)
		if err != nil {
			return err
		}
		if o.arch != "" && o.arch != t.Arch {
			who := "the cluster file's profile"
			if o.node != "" {
				who = "node " + o.node + "'s profile"
			}
			return fault.Wrap(fault.Input, fmt.Errorf("--arch %s contradicts %s %s, which is %s: drop --arch, or change the profile in the cluster file", o.arch, who, t.Name, t.Arch))
		}
		o.arch = t.Arch
	}
	o.arch = cmp.Or(o.arch, "amd64")
	in := render.Input{Cluster: c, Secrets: s, Role: role, Arch: o.arch, NodeName: o.node}
	var out []byte
	switch o.format {
	case "node":
		nc, err := render.NodeConfig(in)
		if err != nil {
			return err
		}
		out, err = nc.Encode()
		if err != nil {
			return err
		}
	case "kubeadm", "kubeadm-join":
		files, err := render.Kubeadm(in)
		if err != nil {
			return err
		}
		out = files[render.JoinConfigPath]
		if o.format == "kubeadm" && role == nodeconfig.RoleInit {
			out = files[render.InitConfigPath]
		}
	case "butane", "ignition":
		if in.Agent, err = agentbin.Gzipped(o.arch); err != nil {
			return err
		}
		if o.format == "butane" {
			out, err = render.Butane(in)
		} else {
			out, err = render.Ignition(in)
		}
		if err != nil {
			return err
		}
	case "kernel-args":
		if args := render.NetworkKernelArgs(c, o.node); len(args) > 0 {
			out = []byte(strings.Join(args, " ") + "\n")
		}
	default:
		return fault.Wrap(fault.Input, fmt.Errorf("--format %q: use one of %v", o.format, renderFormats))
	}
	return g.emit(o.dest, o.force, out, fmt.Sprintf("%s %s for %s", o.format, role, o.arch))
}

// emit writes a result to stdout, or to dest (mode 0600) saying so on
// stderr.
func (g *globals) emit(dest string, force bool, out []byte, what string) error {
	if dest == "" {
		_, err := g.stdout.Write(out)
		return err
	}
	if err := atomicfile.Write(dest, out, 0o600, force); err != nil {
		return err
	}
	fmt.Fprintf(g.stderr, "wrote %s (%d bytes, %s)\n", dest, len(out), what)
	return nil
}

// renderManifests joins the init node's manifests into one multi-document
// YAML stream, each headed by where it lands on the node.
func renderManifests(c *cluster.Cluster) ([]byte, error) {
	ms, err := render.Manifests(c)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	for _, m := range ms {
		b.WriteString("---\n")
		if m.URL != "" {
			fmt.Fprintf(&b, "# %s: downloaded by Ignition on the init node from %s (sha256 %s)\n", m.Path, m.URL, m.SHA256)
			continue
		}
		fmt.Fprintf(&b, "# %s\n", m.Path)
		b.Write(bytes.TrimPrefix(m.Data, []byte("---\n")))
		if !bytes.HasSuffix(m.Data, []byte("\n")) {
			b.WriteString("\n")
		}
	}
	if b.Len() == 0 {
		b.WriteString("# nothing: network.cni is none and the cluster file lists no add-on\n")
	}
	return b.Bytes(), nil
}
