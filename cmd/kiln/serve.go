package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/pxe"
	"github.com/kilnproject/kiln/imagebuild/serve"
)

type serveOptions struct {
	bundle    string
	listen    string
	pool      []string
	accessLog string
	minRate   int64
	tlsProxy  bool
}

func newServeCmd(g *globals) *cobra.Command {
	o := &serveOptions{}
	cmd := &cobra.Command{
		Use:   "serve --bundle DIR",
		Short: "Serve a kiln pxe bundle to network-booting machines",
		Long: `serve is the boot server for a bundle made by kiln pxe. Point DHCP's iPXE
boot file at SERVER-URL/boot.ipxe (SERVER-URL is the bundle's --server-url);
each machine then gets:

  /boot.ipxe               the entry script DHCP points iPXE at: it chains
                           to /ipxe with the machine's MAC
  /ipxe?mac=MAC            its iPXE script, found by the MAC it boots from;
                           an install-mode node that reported installed
                           gets a script that boots its disk instead
  /config/NAME             its Ignition config, only with its MAC and token
                           (init and control-plane configs hold cluster
                           keys: handed out once, then 410 until kiln
                           rearm NODE)
  /assets/FILE             the kernel, initramfs and rootfs (Range requests)
  /report/NAME             where its first-boot agent reports (POST)
  /status                  every node's last report, for kiln status
  /arm/NAME                re-arms a node, for kiln rearm (POST)

Machines the inventory does not name are refused, unless --pool gives them
an entry: the next inventory node without a MAC of a pool role (in the
cluster file's order), else the role default of the first pool role that has
one (default-init at most once). Assignments and reports are kept in the
bundle's state/ folder: they survive restarts and kiln pxe --force, which
refuses to rebuild while kiln serve runs (it reads the bundle once: stop it,
rebuild, start it again).
A pool of init or control-plane hands cluster keys to whichever unknown
machine asks first: use it only on a closed provisioning network.

` + fmt.Sprintf(`One client address holds at most %d connections and gets at most %d pool
machines; downloads that fall below --min-rate are dropped, and at most %d
run at once, so scripts are answered while downloads saturate the server.`,
			serve.MaxConnsPerClient, serve.MaxAssignmentsPerClient, serve.MaxDownloads) + `

Each request is logged (tokens and keys redacted) to --access-log. serve
runs until SIGINT or SIGTERM, then lets running requests finish for a few
seconds and saves its state. It speaks plain HTTP (iPXE's usual); a bundle
made for an https:// server URL is refused unless --tls-proxy says a TLS
proxy at that URL forwards to kiln serve. A token
only proves that a request came through the script served for that MAC,
and a MAC can be claimed by any machine on the network: run kiln serve on a
provisioning network that workloads (pods) cannot reach.`,
		Example: `  kiln serve --bundle pxe/
  kiln serve --bundle pxe/ --listen 10.0.0.5:8080 --access-log /var/log/kiln-access.log
  kiln serve --bundle pxe/ --pool worker
  kiln serve --bundle pxe/ --pool control-plane,worker`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := interruptible(cmd.Context())
			defer stop()
			return runServe(ctx, g, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.bundle, "bundle", "", "the folder kiln pxe wrote (required)")
	f.StringVar(&o.listen, "listen", ":8080", "address to listen on, HOST:PORT")
	f.StringSliceVar(&o.pool, "pool", nil, "give machines the inventory does not name an entry of these roles, in order (init, control-plane, worker)")
	f.StringVar(&o.accessLog, "access-log", "", "append the access log to this file (default: stderr)")
	f.BoolVar(&o.tlsProxy, "tls-proxy", false, "the bundle's https:// server URL is a TLS proxy that forwards to this kiln serve")
	f.Int64Var(&o.minRate, "min-rate", serve.DefaultMinRate>>10, "drop a download slower than this many KiB/s over any MiB (a client that stopped reading)")
	return cmd
}

func runServe(ctx context.Context, g *globals, o *serveOptions) error {
	if o.bundle == "" {
		return fault.Wrap(fault.Input, fmt.Errorf("--bundle is required: the folder kiln pxe --dest wrote"))
	}
	if _, _, err := net.SplitHostPort(o.listen); err != nil {
		return fault.Wrap(fault.Input, fmt.Errorf("--listen %q: %v: give HOST:PORT, such as :8080 or 10.0.0.5:8080", o.listen, strings.TrimPrefix(err.Error(), "address "+o.listen+": ")))
	}
	var pool []nodeconfig.Role
	for _, s := range o.pool {
		r, err := nodeconfig.ParseRole(strings.TrimSpace(s))
		if err != nil {
			return fault.Wrap(fault.Input, fmt.Errorf("--pool: %w", err))
		}
		pool = append(pool, r)
	}
	var access io.Writer = g.stderr
	if o.accessLog != "" {
		f, err := os.OpenFile(o.accessLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fault.Wrap(fault.Input, fmt.Errorf("--access-log: %w", err))
		}
		defer f.Close()
		access = f
	}
	if o.minRate < 1 || o.minRate > maxMinRate {
		return fault.Wrap(fault.Input, fmt.Errorf("--min-rate %d: give 1 to %d (KiB/s): machines that share a link each get a share of it, and a download below the floor is dropped", o.minRate, maxMinRate))
	}
	srv, err := serve.New(serve.Options{Dir: o.bundle, Pool: pool, AccessLog: access, Log: g.stderr, MinRate: o.minRate << 10})
	if err != nil {
		return err
	}
	m := srv.Manifest()
	if err := checkScheme(m.ServerURL, o.tlsProxy); err != nil {
		srv.Close()
		return err
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		srv.Close()
		return fault.Wrap(fault.Environment, fmt.Errorf("--listen %s: %w: pick a free address or stop what uses it", o.listen, err))
	}
	fmt.Fprintf(g.stdout, "serving %s (cluster %s, %d entries) on http://%s; nodes use %s (DHCP boot file: %s)\n",
		o.bundle, m.Cluster, len(m.Nodes), ln.Addr(), m.ServerURL, strings.TrimSuffix(m.ServerURL, "/")+pxe.EntryPath)
	if warning := checkServerURL(m.ServerURL, ln.Addr()); warning != "" && !o.tlsProxy {
		fmt.Fprintf(g.stderr, "kiln serve: warning: %s\n", warning)
	}
	if err := srv.Serve(ctx, ln); err != nil {
		return err
	}
	fmt.Fprintf(g.stderr, "kiln serve: stopped; assignments and reports are saved in %s\n", filepath.Join(o.bundle, pxe.StateDir))
	return nil
}

// maxMinRate bounds --min-rate, in KiB/s: a floor near a whole
// 100 Mbit/s link (12 MiB/s) drops machines that share one.
const maxMinRate = 8 << 10

// checkScheme refuses a bundle whose nodes use https://, which kiln serve
// (plain HTTP) cannot answer, unless the operator says a TLS proxy at that
// URL forwards to it.
func checkScheme(serverURL string, tlsProxy bool) error {
	u, err := url.Parse(serverURL)
	switch {
	case err != nil:
		return fault.Wrap(fault.Input, fmt.Errorf("the bundle's server URL %q: %v: rebuild the bundle with kiln pxe --server-url http://...", serverURL, err))
	case u.Scheme == "https" && !tlsProxy:
		return fault.Wrap(fault.Input, fmt.Errorf("the bundle's nodes use %s, but kiln serve speaks plain HTTP: rebuild the bundle with kiln pxe --server-url http://..., or put a TLS proxy at that URL in front of kiln serve and pass --tls-proxy", serverURL))
	case u.Scheme == "http" && tlsProxy:
		return fault.Wrap(fault.Input, fmt.Errorf("--tls-proxy: the bundle's nodes use %s, plain HTTP, which no TLS proxy answers: drop --tls-proxy", serverURL))
	}
	return nil
}

// checkServerURL warns when the nodes' http:// server URL cannot reach
// this listener.
func checkServerURL(serverURL string, addr net.Addr) string {
	u, err := url.Parse(serverURL)
	tcp, ok := addr.(*net.TCPAddr)
	if err != nil || !ok {
		return ""
	}
	port := u.Port()
	if port == "" {
		port = "80"
	}
	if port != strconv.Itoa(tcp.Port) {
		return fmt.Sprintf("nodes use port %s (%s) but kiln serve listens on port %d: pass --listen :%s, or rebuild the bundle with kiln pxe --server-url", port, serverURL, tcp.Port, port)
	}
	return ""
}
