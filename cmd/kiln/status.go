package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/pxe"
	"github.com/kilnproject/kiln/imagebuild/serve"
)

// serverFlags say how to reach a running kiln serve as its operator.
type serverFlags struct {
	server    string
	bundle    string
	tokenFile string
	timeout   time.Duration
}

func (o *serverFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&o.server, "server", "", "kiln serve's URL (default: the bundle's server URL)")
	f.StringVar(&o.bundle, "bundle", "", "the bundle kiln serve serves: its status token and server URL")
	f.StringVar(&o.tokenFile, "token-file", "", "file holding the status token, instead of --bundle")
	f.DurationVar(&o.timeout, "timeout", 30*time.Second, "give up waiting for kiln serve after this long")
}

type statusOptions struct {
	serverFlags
	output outputFormat
}

func newStatusCmd(g *globals) *cobra.Command {
	o := &statusOptions{}
	cmd := &cobra.Command{
		Use:   "status --bundle DIR | --server URL --token-file FILE",
		Short: "Show what every network-booted node last reported to kiln serve",
		Long: `status asks kiln serve for every entry of its bundle: inventory nodes and
role defaults, the machines the pool gave them, and the last report of each
machine's first-boot agent (phase, state, when, last error).

The status token comes from the bundle's bundle.json (--bundle), or from
--token-file (a file holding only the token, for machines without the
bundle); --server defaults to the bundle's server URL. A role default's
machines are listed one per line as default-ROLE/HOSTNAME.`,
		Example: `  kiln status --bundle pxe/
  kiln status --bundle pxe/ --server http://127.0.0.1:8080 -o json
  kiln status --server http://10.0.0.5:8080 --token-file status-token`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runStatus(cmd.Context(), g, o) },
	}
	o.serverFlags.add(cmd)
	addOutputFlag(cmd, &o.output)
	return cmd
}

func runStatus(ctx context.Context, g *globals, o *statusOptions) error {
	var st serve.Status
	if err := o.ask(ctx, http.MethodGet, pxe.StatusPath, &st); err != nil {
		return err
	}
	return emit(g.stdout, o.output, &st, statusTable(&st))
}

// credentials returns the server URL and the status token.
func (o *serverFlags) credentials() (string, string, error) {
	server, token := o.server, ""
	switch {
	case (o.bundle == "") == (o.tokenFile == ""):
		return "", "", fault.Wrap(fault.Input, fmt.Errorf("pass --bundle DIR (the bundle kiln serve serves) or --token-file FILE, one of them"))
	case o.bundle != "":
		m, err := pxe.ReadManifest(o.bundle)
		if err != nil {
			return "", "", err
		}
		token = m.StatusToken
		if server == "" {
			server = m.ServerURL
		}
	default:
		data, err := os.ReadFile(o.tokenFile)
		if err != nil {
			return "", "", fault.Wrap(fault.Input, fmt.Errorf("--token-file: %w", err))
		}
		if token = strings.TrimSpace(string(data)); token == "" {
			return "", "", fault.Wrap(fault.Input, fmt.Errorf("--token-file %s is empty: put the bundle's statusToken in it", o.tokenFile))
		}
		if server == "" {
			return "", "", fault.Wrap(fault.Input, fmt.Errorf("--server is required with --token-file, for example --server http://10.0.0.5:8080"))
		}
	}
	if u, err := url.Parse(server); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", "", fault.Wrap(fault.Input, fmt.Errorf("--server %q: give kiln serve's URL, such as http://10.0.0.5:8080", server))
	}
	return strings.TrimSuffix(server, "/"), token, nil
}

// ask sends an operator's request to kiln serve (path with its query) and
// decodes the JSON answer into out.
func (o *serverFlags) ask(ctx context.Context, method, path string, out any) error {
	server, token, err := o.credentials()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, server+path, nil)
	if err != nil {
		return fault.Wrap(fault.Input, fmt.Errorf("--server %q: %w", server, err))
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fault.Wrap(fault.Environment, fmt.Errorf("cannot reach kiln serve at %s: %w: start it (kiln serve --bundle DIR) or check --server", server, err))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	switch {
	case err != nil:
		return fault.Wrap(fault.Environment, fmt.Errorf("read the answer of %s: %w", server, err))
	case resp.StatusCode == http.StatusUnauthorized:
		return fault.Wrap(fault.Input, fmt.Errorf("kiln serve at %s refused the status token: pass the --bundle it serves, or a --token-file with that bundle's statusToken", server))
	case resp.StatusCode == http.StatusBadRequest:
		return fault.Wrap(fault.Input, fmt.Errorf("kiln serve at %s: %s", server, cell(strings.TrimPrefix(string(bytes.TrimSpace(body)), "kiln: "), 300)))
	case resp.StatusCode != http.StatusOK:
		return fault.Wrap(fault.Environment, fmt.Errorf("%s%s answered %s: %s (is it kiln serve?)", server, req.URL.Path, resp.Status, cell(string(bytes.TrimSpace(body)), 200)))
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fault.Wrap(fault.Environment, fmt.Errorf("%s%s: %w (is it kiln serve?)", server, req.URL.Path, err))
	}
	return nil
}

// statusTable has a line per inventory node and per machine on a role
// default.
func statusTable(st *serve.Status) string {
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tMAC\tMODE\tCONFIG\tPHASE\tSTATE\tLAST-REPORT\tLAST-ERROR")
	for _, n := range st.Nodes {
		mac := n.MAC
		switch {
		case mac != "":
		case len(n.Assigned) == 1:
			mac = n.Assigned[0].MAC
		case len(n.Assigned) > 1:
			mac = fmt.Sprintf("%d machines", len(n.Assigned))
		default:
			mac = "-"
		}
		row := func(name string, r *serve.Report) {
			phase, state, last, lastErr := "-", "-", "never", ""
			if r != nil {
				phase, state, last, lastErr = cell(r.Phase, 30), cell(r.State, 12), ago(r.SecondsSinceReport), cell(r.LastError, 60)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, n.Role, mac, n.Mode, configCell(st.Time, &n), phase, state, last, lastErr)
		}
		if len(n.Reports) == 0 {
			row(n.Name, nil)
		}
		for i := range n.Reports {
			r := &n.Reports[i]
			name := n.Name
			if n.Default {
				name += "/" + cell(cmp.Or(r.Host, r.From), 63)
			}
			row(name, r)
		}
	}
	tw.Flush()
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	for i, l := range lines {
		lines[i] = strings.TrimRight(l, " ")
	}
	return strings.Join(lines, "\n")
}

// configCell says where an entry's config went: a key-carrying config is
// "armed" until it is handed out ("given 3m ago to 10.0.0.9", until kiln
// rearm), or "retired" once its machine installed or joined.
func configCell(now time.Time, n *serve.NodeStatus) string {
	c := n.Config
	since := func(t time.Time) string { return ago(int64(now.Sub(t) / time.Second)) }
	switch {
	case c.Taken != nil && c.LastRefused != nil:
		return fmt.Sprintf("given %s to %s, %d refused (last %s from %s)", since(c.Taken.At), cell(c.Taken.From, 45), c.Refused, since(c.LastRefused.At), cell(c.LastRefused.From, 45))
	case c.Taken != nil:
		return fmt.Sprintf("given %s to %s", since(c.Taken.At), cell(c.Taken.From, 45))
	case c.HoldsKeys && slices.ContainsFunc(n.Reports, func(r serve.Report) bool { return r.ConfigRetired }) && c.LastRefused != nil:
		return fmt.Sprintf("retired, %d refused (last %s from %s)", c.Refused, since(c.LastRefused.At), cell(c.LastRefused.From, 45))
	case c.HoldsKeys && slices.ContainsFunc(n.Reports, func(r serve.Report) bool { return r.ConfigRetired }):
		return "retired"
	case c.HoldsKeys:
		return "armed"
	case c.Fetches == 0:
		return "-"
	case len(c.Last) == 0: // a server that keeps no deliveries
		return fmt.Sprintf("%d fetched", c.Fetches)
	default:
		return fmt.Sprintf("%d fetched, last %s", c.Fetches, since(c.Last[len(c.Last)-1].At))
	}
}

// cell makes a reported value fit a table cell: one line, no control
// characters, at most limit runes.
func cell(s string, limit int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	if r := []rune(s); len(r) > limit {
		return string(r[:limit-1]) + "…"
	}
	return s
}

// ago says how long ago, roughly: 42s ago, 5m ago, 3h ago, 2d ago.
func ago(seconds int64) string {
	d := time.Duration(max(seconds, 0)) * time.Second
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	default:
		return fmt.Sprintf("%dd ago", int(d.Hours()/24))
	}
}
