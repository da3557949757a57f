package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/images"
	"github.com/kilnproject/kiln/imagebuild/render"
	"github.com/kilnproject/kiln/imagebuild/secrets"
)

// load reads the cluster file and its secrets.
func (g *globals) load() (*cluster.Cluster, *secrets.Secrets, error) {
	c, err := g.loadCluster()
	if err != nil {
		return nil, nil, err
	}
	s, err := secrets.Load(g.secrets())
	if err != nil {
		return nil, nil, err
	}
	return c, s, nil
}

// loadCluster reads the cluster file, noting on stderr the settings
// nobody should carry unknowingly; every command reads it through here.
func (g *globals) loadCluster() (*cluster.Cluster, error) {
	c, err := cluster.Load(g.clusterFile)
	if err != nil {
		return nil, err
	}
	if skip := preflightNote(c); skip != "" {
		fmt.Fprintln(g.stderr, "kiln: note: "+skip)
	}
	return c, nil
}

// preflightNote says which kubeadm preflight checks the nodes skip, if
// any: a setting nobody should carry unknowingly.
func preflightNote(c *cluster.Cluster) string {
	if len(c.Kubernetes.IgnorePreflightErrors) == 0 {
		return ""
	}
	return "kubernetes.ignorePreflightErrors: kubeadm on every node skips the preflight checks " + strings.Join(c.Kubernetes.IgnorePreflightErrors, ", ")
}

func newValidateCmd(g *globals) *cobra.Command {
	var out outputFormat
	cmd := &cobra.Command{
		Use:   "validate",
		Short: "Check the cluster file and secrets",
		Long: `validate reads the cluster file strictly and reports every problem at once,
each with its field path and the fix, then checks the secrets folder
(permissions, CA and key pairs, token and certificate key format).`,
		Example: `  kiln validate
  kiln validate -c clusters/edge/cluster.yaml -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, s, err := g.load()
			if err == nil {
				err = render.CheckSnippets(c, s)
			}
			if err != nil && out == "json" && fault.KindOf(err) == fault.Input {
				// The problems as JSON on stdout; the error, as always, on
				// stderr and in the exit code.
				problems := cluster.Problems(err)
				if problems == nil {
					problems = []cluster.Problem{{Message: err.Error()}}
				}
				if jerr := emit(g.stdout, out, map[string]any{"valid": false, "problems": problems}); jerr != nil {
					return jerr
				}
			}
			if err != nil {
				return err
			}
			arches := pinnedArches(c)
			res := map[string]any{
				"valid":             true,
				"cluster":           c.Name,
				"endpoint":          c.ControlPlaneEndpoint,
				"kubernetesVersion": c.Kubernetes.Version,
				"os":                c.OS.Name,
				"caCertHash":        s.CACertHash(),
				"pinnedArches":      arches,
			}
			if len(c.Kubernetes.IgnorePreflightErrors) > 0 {
				res["ignorePreflightErrors"] = c.Kubernetes.IgnorePreflightErrors
			}
			lines := []string{
				fmt.Sprintf("%s: valid (cluster %s, Kubernetes %s, %s, endpoint %s)", g.clusterFile, c.Name, c.Kubernetes.Version, c.OS.Name, c.ControlPlaneEndpoint),
				"CA certificate hash: " + s.CACertHash(),
			}
			// One arch is enough: a cluster that builds for one is not
			// told about the other.
			if len(arches) == 0 {
				lines = append(lines, "downloads: no arch is pinned yet: run kiln pin --arch amd64 (or arm64, or both) before rendering Ignition")
			} else {
				lines = append(lines, "downloads pinned for "+strings.Join(arches, ", "))
			}
			list, err := images.List(c)
			if err != nil && c.Airgap {
				return err
			}
			if err != nil {
				lines = append(lines, fmt.Sprintf("kiln images cannot list the nodes' images: %v", err))
			}
			unpinnedImages := 0
			for _, e := range list {
				if e.Digest == "" {
					unpinnedImages++
				}
				if untagged := !strings.Contains(e.Name[strings.LastIndex(e.Name, "/")+1:], ":"); c.Airgap && e.Addon && (untagged || strings.HasSuffix(e.Name, ":latest")) {
					lines = append(lines, fmt.Sprintf("%s: an image without a tag, or :latest, is pulled Always by the kubelet unless its pod says imagePullPolicy: IfNotPresent; on an air-gapped node that pull fails", e.Name))
				}
				if e.Stale != "" {
					lines = append(lines, fmt.Sprintf("images.%s: pinned for another Kubernetes version (%s), ignored: run kiln images pin", e.Name, e.Stale))
				}
			}
			res["unpinnedImages"] = unpinnedImages
			if c.Airgap && unpinnedImages > 0 {
				lines = append(lines, fmt.Sprintf("airgap: %d image(s) without a digest: run kiln images pin, then kiln images pull, before build-image", unpinnedImages))
			}
			if c.Network.CNI == cluster.CNINone && len(c.Addons) == 0 {
				lines = append(lines, "network.cni is none and there is no add-on: no pod network will be installed, and every node stays NotReady until you apply one")
			}
			return emit(g.stdout, out, res, lines...)
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}
