package main

import (
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// version and commit are stamped by the Makefile (go build -ldflags
// "-X main.version=... -X main.commit=..."): git describe's name and the
// full commit hash of the checkout bin/kiln was built from.
var version, commit string

// buildInfo is kiln's version, the commit it was built from and the Go
// release that built it. Without the Makefile's stamp it falls back to
// what the Go toolchain records: the module version of `go install
// ...@vX` and the VCS revision of a plain go build in a checkout; what
// neither knows is "unknown".
type buildInfo struct {
	Version string `json:"version"`
	Commit  string `json:"commit"`
	Go      string `json:"go"`
}

func readBuildInfo() buildInfo {
	b := buildInfo{Version: version, Commit: commit, Go: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if b.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			b.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && b.Commit == "" {
				b.Commit = s.Value
			}
		}
	}
	if b.Version == "" {
		b.Version = "unknown"
	}
	if b.Commit == "" {
		b.Commit = "unknown"
	}
	return b
}

func (b buildInfo) String() string {
	return b.Version + " (commit " + b.Commit + ", " + b.Go + ")"
}

func newVersionCmd(g *globals) *cobra.Command {
	var out outputFormat
	cmd := &cobra.Command{
		Use:     "version",
		Short:   "Print kiln's version and the commit it was built from",
		Example: "  kiln version\n  kiln version -o json\n  kiln --version",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			b := readBuildInfo()
			return emit(g.stdout, out, b, "kiln "+b.String())
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}
