package main

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/pin"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/manifests"
)

type initOptions struct {
	endpoint      string
	version       string
	osName        string
	channel       string
	osVersion     string
	controlPlanes int
	// controlPlanesSet: --control-planes was given; else the number of
	// --control-plane flags, if any, sets kubernetes.controlPlanes.
	controlPlanesSet bool
	sshKeys          []string
	loadBalancer     string
	nodes            []string // --control-plane NAME=IP
	images           []string // --image NAME=REFERENCE@sha256:DIGEST
	ignorePreflight  []string
	dest             string
	force            bool
	output           outputFormat
}

// flagFor maps cluster-file fields to the init flag that sets them, so
// validation errors name what the user typed.
var flagFor = map[string]string{
	"name":                             "NAME",
	"controlPlaneEndpoint":             "--endpoint",
	"kubernetes.version":               "--kubernetes-version",
	"kubernetes.controlPlanes":         "--control-planes",
	"kubernetes.ignorePreflightErrors": "--ignore-preflight-errors",
	"os.name":                          "--os",
	"os.channel":                       "--channel",
	"os.version":                       "--os-version",
	"loadBalancer.type":                "--load-balancer",
	"nodes":                            "--control-plane",
	"images":                           "--image",
}

func newInitCmd(g *globals) *cobra.Command {
	o := &initOptions{}
	cmd := &cobra.Command{
		Use:   "init NAME --endpoint HOST:PORT",
		Short: "Create a cluster file and the cluster's secrets",
		Long: `init writes DIR/cluster.yaml and DIR/secrets/ (mode 0700, files 0600): the
cluster CA, front-proxy CA and etcd CA (certificates and keys), the
service-account key pair, a bootstrap token and a certificate key. It prints
the CA certificate hash every joining node pins, never a private key.

The endpoint is the load balancer (or virtual IP) in front of the control
planes: a DNS name, an IPv4 address or a bracketed IPv6 address, with port.
With --load-balancer external (the default) you run that balancer. With
keepalived-haproxy or kube-vip the control planes hold the endpoint's
address themselves (it must then be an IP no node has): keepalived-haproxy
needs every control plane's address (--control-plane, the first one is the
init node) and a keepalived image pinned by digest (--image), since no
upstream image exists.
Existing secrets are never replaced unless you pass --force: nodes built
from the old secrets would no longer join.`,
		Example: `  kiln init demo --endpoint 192.168.1.50:6443
  kiln init lab --endpoint k8s.lab.example:6443 --os fcos --control-planes 3 --ssh-key ~/.ssh/id_ed25519.pub
  kiln init edge --endpoint [2001:db8::10]:6443 --kubernetes-version v1.34.4 --dest clusters/edge
  kiln init pis --endpoint 192.168.1.50:6443 --load-balancer kube-vip
  kiln init rack --endpoint 10.0.0.50:6443 --load-balancer keepalived-haproxy \
    --control-plane cp-1=10.0.0.11 --control-plane cp-2=10.0.0.12 --control-plane cp-3=10.0.0.13 \
    --image keepalived=registry.example/keepalived:2.3@sha256:<64 hex digits>`,
		Args: exactArgs(1, "the cluster NAME: kiln init NAME --endpoint HOST:PORT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.controlPlanesSet = cmd.Flags().Changed("control-planes")
			return runInit(g, o, args[0])
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.endpoint, "endpoint", "", "control-plane endpoint HOST:PORT (the load balancer); required")
	f.StringVar(&o.version, "kubernetes-version", cluster.DefaultKubernetesVersion, fmt.Sprintf("Kubernetes version (v1.%d to v1.%d)", cluster.MinMinor, cluster.MaxMinor))
	f.StringVar(&o.osName, "os", cluster.DefaultOS, "node OS: flatcar or fcos")
	f.StringVar(&o.channel, "channel", "stable", "OS release channel")
	f.StringVar(&o.osVersion, "os-version", "current", "OS version, or current")
	f.IntVar(&o.controlPlanes, "control-planes", cluster.DefaultControlPlanes, "expected number of control-plane nodes (odd)")
	f.StringArrayVar(&o.sshKeys, "ssh-key", nil, "SSH public key file for the core user (repeatable)")
	f.StringVar(&o.loadBalancer, "load-balancer", cluster.LBExternal, "what serves the endpoint: external, keepalived-haproxy or kube-vip")
	f.StringArrayVar(&o.nodes, "control-plane", nil, "inventory control plane NAME=IP, the first one the init node (repeatable; their number sets --control-planes)")
	f.StringArrayVar(&o.images, "image", nil, "pin an image of kiln's manifests NAME=REFERENCE@sha256:DIGEST (repeatable; NAME one of "+strings.Join(manifests.ImageNames(), ", ")+")")
	f.StringSliceVar(&o.ignorePreflight, "ignore-preflight-errors", nil, "kubeadm preflight checks every node skips, comma separated (kubernetes.ignorePreflightErrors; e.g. Mem for boards under 1700 MB)")
	f.StringVar(&o.dest, "dest", ".", "folder for cluster.yaml and secrets/")
	// --dir is what init took before every output folder became --dest.
	f.StringVar(&o.dest, "dir", ".", "")
	f.MarkDeprecated("dir", "use --dest")
	f.BoolVar(&o.force, "force", false, "replace an existing cluster file and secrets")
	addOutputFlag(cmd, &o.output)
	return cmd
}

type initResult struct {
	ClusterFile string `json:"clusterFile"`
	SecretsDir  string `json:"secretsDir"`
	CACertHash  string `json:"caCertHash"`
	TokenID     string `json:"tokenID"`
}

func runInit(g *globals, o *initOptions, name string) error {
	c := &cluster.Cluster{
		APIVersion:           cluster.APIVersion,
		Kind:                 cluster.Kind,
		Name:                 name,
		ControlPlaneEndpoint: o.endpoint,
		Kubernetes:           cluster.Kubernetes{Version: o.version, ControlPlanes: o.controlPlanes, IgnorePreflightErrors: o.ignorePreflight},
		OS:                   cluster.OS{Name: o.osName, Channel: o.channel, Version: o.osVersion},
		LoadBalancer:         cluster.LoadBalancer{Type: o.loadBalancer},
	}
	for i, v := range o.nodes {
		name, ip, ok := strings.Cut(v, "=")
		if !ok || name == "" || ip == "" {
			return fault.Wrap(fault.Input, fmt.Errorf("--control-plane %q: want NAME=IP, e.g. cp-1=10.0.0.11", v))
		}
		role := nodeconfig.RoleControlPlane
		if i == 0 {
			role = nodeconfig.RoleInit
		}
		c.Nodes = append(c.Nodes, cluster.Node{Name: name, Role: role, IP: ip})
	}
	if len(o.nodes) > 0 && !o.controlPlanesSet {
		c.Kubernetes.ControlPlanes = len(o.nodes)
	}
	for _, v := range o.images {
		name, ref, ok := strings.Cut(v, "=")
		if !ok || name == "" || ref == "" {
			return fault.Wrap(fault.Input, fmt.Errorf("--image %q: want NAME=REFERENCE@sha256:DIGEST, e.g. keepalived=registry.example/keepalived:2.3@sha256:<64 hex digits>", v))
		}
		if c.Images == nil {
			c.Images = map[string]string{}
		}
		c.Images[name] = ref
	}
	for _, p := range o.sshKeys {
		data, err := cluster.ReadLimited(p, "an SSH public key file", 1<<20)
		if err != nil {
			return fault.Wrap(fault.Input, fmt.Errorf("--ssh-key: %w", err))
		}
		if bytes.Contains(data, []byte("PRIVATE KEY")) {
			// Not a word of it goes anywhere: nodes get public keys only.
			return fault.Wrap(fault.Input, fmt.Errorf("--ssh-key %s is a private key: pass its public key instead (%s.pub, or ssh-keygen -y -f %s > key.pub)", p, p, p))
		}
		for _, line := range strings.Split(string(data), "\n") {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				c.SSH.AuthorizedKeys = append(c.SSH.AuthorizedKeys, line)
			}
		}
	}
	c.SetDefaults()
	if err := c.Validate(); err != nil {
		return nameFlags(err)
	}
	plan, _, err := pin.Plan(c, pin.Arches, false)
	if err != nil {
		return err
	}
	c.Kubernetes.Downloads = plan

	clusterFile := filepath.Join(o.dest, "cluster.yaml")
	secretsDir := filepath.Join(o.dest, "secrets")
	if g.secretsDir != "" {
		secretsDir = g.secretsDir
	}
	if !o.force {
		for _, p := range []string{clusterFile, secretsDir} {
			if _, err := os.Stat(p); err == nil {
				return fault.Wrap(fault.Input, fmt.Errorf("%s already exists: kiln init never replaces a cluster (nodes built from its secrets would no longer join); pass --force to replace it", p))
			}
		}
	}
	s, err := secrets.Generate(name, time.Now(), rand.Reader)
	if err != nil {
		return err
	}
	body, err := c.Encode()
	if err != nil {
		return err
	}
	if err := s.Write(secretsDir, o.force); err != nil {
		return err
	}
	file := append([]byte(clusterHeader), body...)
	if len(c.Nodes) == 0 {
		file = append(file, exampleInventory...)
	}
	if err := atomicfile.Write(clusterFile, file, 0o644, o.force); err != nil {
		return err
	}
	res := initResult{ClusterFile: clusterFile, SecretsDir: secretsDir, CACertHash: s.CACertHash(), TokenID: s.TokenID()}
	cf := ""
	if clusterFile != "cluster.yaml" {
		cf = " -c " + clusterFile
	}
	return emit(g.stdout, o.output, res,
		fmt.Sprintf("wrote %s and %s/ (keep the secrets folder private)", clusterFile, secretsDir),
		"CA certificate hash (every join pins it): "+res.CACertHash,
		"",
		"next:",
		fmt.Sprintf("  kiln%s pin                 # record the SHA-512 of the Kubernetes downloads (online once, or --file)", cf),
		fmt.Sprintf("  kiln%s render --role init --format ignition --dest init.ign", cf),
		fmt.Sprintf("  kiln%s kubeconfig          # admin kubeconfig for %s", cf, c.ControlPlaneEndpoint),
	)
}

const clusterHeader = `# kiln cluster file, written by kiln init. Edit it, then check it with
# kiln validate. kubernetes.downloads pins what nodes download: after
# changing kubernetes.version or os.name, run kiln pin again.
`

// exampleInventory ends a cluster file that names no node: what an
// inventory looks like, commented out.
const exampleInventory = `# nodes: the machines kiln knows by name (none yet). A machine the
# inventory does not name boots as its role's default and is named by
# hostname.template. A node's mac lets kiln pxe and kiln serve know the
# machine; kiln render --node NAME and kiln build-image --node NAME build
# for it alone (its role and hostname). ip is its fixed address, which
# keepalived-haproxy balances to on control planes (kiln does not set it on
# the machine). One init node at most; kiln validate checks the rest.
#
# nodes:
#   - name: cp-1
#     role: init
#     mac: 52:54:00:00:00:01
#     ip: 192.168.1.11
#   - name: cp-2
#     role: control-plane
#     mac: 52:54:00:00:00:02
#     ip: 192.168.1.12
#   - name: worker-1
#     role: worker
#     mac: 52:54:00:00:00:11
`

// nameFlags rewrites cluster-file field paths in validation problems into
// the init flags that set them.
func nameFlags(err error) error {
	var inv *cluster.InvalidError
	if !errors.As(err, &inv) {
		return err
	}
	out := make([]error, len(inv.Problems))
	for i, p := range inv.Problems {
		field, msg, _ := strings.Cut(p.Error(), ": ")
		flag, ok := flagFor[field]
		if !ok { // kubernetes.ignorePreflightErrors[1]
			before, _, _ := strings.Cut(field, "[")
			flag, ok = flagFor[before]
		}
		if !ok { // nodes[0].ip, images.keepalived: the flag that wrote them
			flag, ok = flagFor[strings.FieldsFunc(field, func(r rune) bool { return r == '.' || r == '[' })[0]]
		}
		if ok {
			out[i] = errors.New(flag + ": " + msg)
		} else {
			out[i] = p
		}
	}
	return fault.Wrap(fault.Input, &cluster.InvalidError{Problems: out})
}
