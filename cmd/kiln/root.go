package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// Exit codes (stable; scripts rely on them).
const (
	exitOK          = 0
	exitUnexpected  = 1
	exitInput       = 2
	exitUnsupported = 3
	exitEnvironment = 4
	exitDownload    = 5
	exitIO          = 6
	// exitInterrupted: stopped by SIGINT or SIGTERM (128 + SIGINT, as a
	// shell reports a process its Ctrl-C ended).
	exitInterrupted = 130
)

// globals are the options every command shares.
type globals struct {
	clusterFile string
	secretsDir  string
	stdout      io.Writer
	stderr      io.Writer
}

// secrets returns the secrets folder: --secrets, or secrets/ beside the
// cluster file.
func (g *globals) secrets() string {
	if g.secretsDir != "" {
		return g.secretsDir
	}
	return filepath.Join(filepath.Dir(g.clusterFile), "secrets")
}

func run(args []string, stdout, stderr io.Writer) int {
	root := newRootCmd(stdout, stderr)
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return exitOK
	}
	if errors.Is(err, context.Canceled) {
		// Every long operation stops at the signal and removes what it
		// had begun; one that keeps something says what itself.
		msg := err.Error()
		if !strings.HasPrefix(msg, "interrupted") {
			msg = "interrupted, nothing written"
		}
		fmt.Fprintf(stderr, "kiln: %s\n", msg)
		return exitInterrupted
	}
	fmt.Fprintf(stderr, "kiln: %v\n", err)
	return exitCode(err)
}

// interruptible is the context of a long operation: done at the first
// SIGINT or SIGTERM, which the operation answers by stopping, removing its
// work and returning context.Canceled (exit 130). A second signal then
// ends kiln at once, as if it had no handler (the next run removes what
// that leaves).
func interruptible(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, stop := signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
	context.AfterFunc(ctx, stop)
	return ctx, stop
}

func exitCode(err error) int {
	switch fault.KindOf(err) {
	case fault.Input:
		return exitInput
	case fault.Unsupported:
		return exitUnsupported
	case fault.Environment:
		return exitEnvironment
	case fault.Download:
		return exitDownload
	case fault.IO:
		return exitIO
	default:
		return exitUnexpected
	}
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	g := &globals{stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:   "kiln",
		Short: "Bake node images and configs for a highly available kubeadm cluster",
		Long: `kiln turns one cluster file into everything the nodes of a highly available
kubeadm cluster need: the cluster's secrets, and per role (init,
control-plane, worker) an Ignition config for Flatcar Container Linux or
Fedora CoreOS with a first-boot agent that runs kubeadm init or join.`,
		Example: `  kiln init demo --endpoint 192.168.1.50:6443
  kiln pin
  kiln render --role init --format ignition --dest init.ign
  kiln kubeconfig`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          noArgs,
		RunE:          func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	root.Version = readBuildInfo().String()
	root.SetVersionTemplate("kiln {{.Version}}\n")
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return fault.Wrap(fault.Input, err)
	})
	pf := root.PersistentFlags()
	pf.StringVarP(&g.clusterFile, "cluster", "c", "cluster.yaml", "cluster file")
	pf.StringVar(&g.secretsDir, "secrets", "", "secrets folder (default: secrets/ beside the cluster file)")
	root.AddCommand(
		newInitCmd(g),
		newValidateCmd(g),
		newPinCmd(g),
		newImagesCmd(g),
		newRenderCmd(g),
		newKubeconfigCmd(g),
		newBuildImageCmd(g),
		newPxeCmd(g),
	)
	// These read no cluster file: their help does not offer -c/--secrets.
	for _, cmd := range []*cobra.Command{newVersionCmd(g), newProfilesCmd(g), newServeCmd(g), newStatusCmd(g), newRearmCmd(g)} {
		cmd.SetHelpFunc(func(c *cobra.Command, args []string) {
			for _, name := range []string{"cluster", "secrets"} {
				f := c.InheritedFlags().Lookup(name)
				f.Hidden = true
				defer func() { f.Hidden = false }()
			}
			root.HelpFunc()(c, args)
		})
		root.AddCommand(cmd)
	}
	return root
}

// noArgs refuses positional arguments as bad input.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return fault.Wrap(fault.Input, fmt.Errorf("unknown command or argument %q for %q: see `%s --help`", args[0], cmd.CommandPath(), cmd.CommandPath()))
	}
	return nil
}

// exactArgs wants n positional arguments; usage shows how they are given.
func exactArgs(n int, usage string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return fault.Wrap(fault.Input, fmt.Errorf("%s takes %d argument(s), not %d: %s", cmd.CommandPath(), n, len(args), usage))
		}
		return nil
	}
}

// outputFormat is the -o flag: text for people, json for programs.
type outputFormat string

func (o *outputFormat) String() string { return string(*o) }
func (o *outputFormat) Type() string   { return "text|json" }
func (o *outputFormat) Set(s string) error {
	if s != "text" && s != "json" {
		return errors.New("use text or json (-o is the result's format; a command's output folder or file is --dest)")
	}
	*o = outputFormat(s)
	return nil
}

func addOutputFlag(cmd *cobra.Command, o *outputFormat) {
	*o = "text"
	cmd.Flags().VarP(o, "output", "o", "result format: text or json")
}

// checkArches checks --arch values: Go's and the OCI spec's names, amd64
// and arm64, with a hint for the kernel's names (uname -m).
func checkArches(arches ...string) error {
	for _, a := range arches {
		switch a {
		case "amd64", "arm64":
		case "x86_64", "x86-64", "x64":
			return fault.Wrap(fault.Input, fmt.Errorf("--arch %q: kiln names it amd64 (the Go and OCI name of x86_64): use --arch amd64", a))
		case "aarch64", "arm64v8", "armv8":
			return fault.Wrap(fault.Input, fmt.Errorf("--arch %q: kiln names it arm64 (the Go and OCI name of aarch64): use --arch arm64", a))
		default:
			return fault.Wrap(fault.Input, fmt.Errorf("--arch %q: use amd64 or arm64", a))
		}
	}
	return nil
}

// emit prints a result: JSON, or the text lines.
func emit(w io.Writer, o outputFormat, result any, text ...string) error {
	if o == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(result)
	}
	_, err := fmt.Fprintln(w, strings.Join(text, "\n"))
	return err
}
