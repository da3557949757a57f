// Command kiln-firstboot is the first-boot agent kiln embeds in every node
// image. It reads the node's role metadata and brings the node into its
// cluster; see package firstboot/agent.
//
// Two environment variables exist for tests only: KILN_FIRSTBOOT_ROOT
// relocates every path under a directory, and KILN_FIRSTBOOT_TIME_SCALE
// divides the agent's intervals (polls, backoff, certificate uploads).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/kilnproject/kiln/firstboot/agent"
	"github.com/kilnproject/kiln/firstboot/endpoint"
	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/firstboot/system"
)

// Timeouts that stay real even when tests scale the agent's time.
const (
	probeTimeout  = 5 * time.Second
	reportTimeout = 5 * time.Second
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args[1:], os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stderr io.Writer) int {
	fl := flag.NewFlagSet("kiln-firstboot", flag.ContinueOnError)
	fl.SetOutput(stderr)
	config := fl.String("config", nodeconfig.DefaultPath, "node metadata file")
	uploadEvery := fl.Duration("upload-certs-every", agent.DefaultTiming().UploadEvery,
		"how often the init node re-uploads the control-plane certificates (under kubeadm's 2h expiry)")
	if err := fl.Parse(args); err != nil {
		return agent.ExitBadMetadata
	}
	timing := agent.DefaultTiming()
	if *uploadEvery <= 0 || *uploadEvery >= timing.CertificatesTTL {
		fmt.Fprintf(stderr, "kiln-firstboot: --upload-certs-every %s: use a duration above 0 and below %s\n", *uploadEvery, timing.CertificatesTTL)
		return agent.ExitBadMetadata
	}
	timing.UploadEvery = *uploadEvery
	if s := os.Getenv("KILN_FIRSTBOOT_TIME_SCALE"); s != "" {
		f, err := strconv.ParseFloat(s, 64)
		if err != nil || f <= 0 {
			fmt.Fprintf(stderr, "kiln-firstboot: KILN_FIRSTBOOT_TIME_SCALE=%q: use a positive number\n", s)
			return agent.ExitBadMetadata
		}
		timing = timing.Scaled(f)
	}
	root := system.Root("/")
	if dir := os.Getenv("KILN_FIRSTBOOT_ROOT"); dir != "" {
		root = system.Root(dir)
	}
	a := &agent.Agent{
		ConfigPath: *config,
		Log:        stderr,
		Deps: agent.Deps{
			FS:     root,
			Runner: system.Exec{},
			Clock:  system.Clock{},
			NewProber: func(nc *nodeconfig.NodeConfig) (agent.Prober, error) {
				ca, err := nodeconfig.ParseCACertificate(nc.Cluster.CACertificate)
				if err != nil {
					return nil, err
				}
				return endpoint.New(nc.Cluster.ControlPlaneEndpoint, ca, probeTimeout)
			},
			NewReporter: func(url string) agent.Reporter { return system.NewReporter(url, reportTimeout) },
			DialSocket:  root.DialSocket,
			Etcd:        system.Etcd{Timeout: probeTimeout},
			FirstMAC:    system.FirstMAC,
			Interfaces:  system.Interfaces,
			Jitter:      agent.RandomJitter,
			Timing:      timing,
		},
	}
	err := a.Run(ctx)
	if errors.Is(err, context.Canceled) {
		fmt.Fprintln(stderr, "kiln-firstboot: stopped by a signal")
	}
	return agent.ExitCode(err)
}
