package main

import (
	"context"
	"fmt"
	"net/http"
	"net/url"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/imagebuild/pxe"
	"github.com/kilnproject/kiln/imagebuild/serve"
)

type rearmOptions struct {
	serverFlags
	mac    string
	output outputFormat
}

func newRearmCmd(g *globals) *cobra.Command {
	o := &rearmOptions{}
	cmd := &cobra.Command{
		Use:   "rearm NODE [--mac MAC] (--bundle DIR | --server URL --token-file FILE)",
		Short: "Let kiln serve hand out a node's config once more, to rebuild or reinstall it",
		Long: `rearm tells a running kiln serve to provision a node again.

An init or control-plane config holds the cluster's keys, so kiln serve
hands it out once: the first fetch uses it up, and every later one gets
410 Gone until the node is re-armed. kiln status shows who fetched it
(address, MAC, time). Re-arming also forgets that the node reported
installed or joined, so an install-mode node boots its installer again
instead of its disk: run it to reinstall or replace a machine.

NODE is a name kiln status lists. On a role default (default-ROLE) rearm
lets one more machine fetch the config; add --mac to also reinstall the
machine with that MAC (one kiln status lists on that entry). On a worker,
whose config is served on every boot, rearm only sends installed
machines back to their installer.

Credentials and server as for kiln status.`,
		Example: `  kiln rearm cp-2 --bundle pxe/
  kiln rearm default-control-plane --mac 52:54:00:12:34:56 --bundle pxe/
  kiln rearm cp-2 --server http://10.0.0.5:8080 --token-file status-token -o json`,
		Args: exactArgs(1, "the NODE to re-arm, as kiln status names it: kiln rearm NODE --bundle DIR"),
		RunE: func(cmd *cobra.Command, args []string) error { return runRearm(cmd.Context(), g, o, args[0]) },
	}
	o.serverFlags.add(cmd)
	cmd.Flags().StringVar(&o.mac, "mac", "", "on a role default, the machine to provision again (as kiln status shows it)")
	addOutputFlag(cmd, &o.output)
	return cmd
}

func runRearm(ctx context.Context, g *globals, o *rearmOptions, node string) error {
	path := pxe.ArmPath + url.PathEscape(node)
	if o.mac != "" {
		path += "?" + url.Values{"mac": {o.mac}}.Encode()
	}
	var res serve.ArmResult
	if err := o.ask(ctx, http.MethodPost, path, &res); err != nil {
		return err
	}
	text := fmt.Sprintf("re-armed %s: its config may be fetched once more", res.Node)
	if !res.HoldsKeys {
		text = fmt.Sprintf("%s's config holds no cluster keys: it is served on every boot and needs no arming", res.Node)
	}
	if res.Cleared > 0 {
		text += fmt.Sprintf("; %d installed or joined machine(s) will be provisioned again on their next network boot", res.Cleared)
	}
	return emit(g.stdout, o.output, &res, text)
}
