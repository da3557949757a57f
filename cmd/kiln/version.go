package main

import (
	"runtime/debug"

	"github.com/spf13/cobra"
)

func newVersionCmd(g *globals) *cobra.Command {
	var out outputFormat
	cmd := &cobra.Command{
		Use:     "version",
		Short:   "Print kiln's version",
		Example: "  kiln version\n  kiln version -o json",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := "(devel)"
			if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
				v = bi.Main.Version
			}
			return emit(g.stdout, out, map[string]string{"version": v}, "kiln "+v)
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}
