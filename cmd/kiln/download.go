package main

import (
	"cmp"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/baseimage"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/profiles"
)

// downloadOptions are the flags of commands that fetch vendor files.
type downloadOptions struct {
	mirror         string
	insecureMirror bool
	signingKey     string
	cacheDir       string
	timeout        time.Duration
}

func (o *downloadOptions) addFlags(f *pflag.FlagSet, what string) {
	f.StringVar(&o.mirror, "mirror", "", "download the "+what+" from this mirror instead of the profile's origin")
	f.BoolVar(&o.insecureMirror, "insecure-mirror", false, "accept a --mirror that nothing authenticates: plain http://, or Fedora CoreOS files without signatures (then checked only against the mirror's own stream)")
	f.StringVar(&o.signingKey, "signing-key", "", "armored OpenPGP public keys that sign the files (default: the embedded keys, Flatcar's or Fedora's 42 to 47)")
	f.StringVar(&o.cacheDir, "cache-dir", "", "download cache (default: kiln/ in the user cache folder)")
	f.DurationVar(&o.timeout, "timeout", 2*time.Hour, "give up downloading after this long")
}

// cache is the download cache, reporting progress on g's stderr.
func (o *downloadOptions) cache(g *globals) (*baseimage.Cache, error) {
	c := &baseimage.Cache{Dir: o.cacheDir, Client: &http.Client{Timeout: o.timeout}, Progress: g.stderr}
	if c.Dir == "" {
		var err error
		if c.Dir, err = baseimage.DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// source says what to fetch for the target: the cluster's OS channel and
// version, from the mirror if one is given.
func (o *downloadOptions) source(t *profiles.Target, c *cluster.Cluster) (baseimage.Source, error) {
	// Only a mirror may go without signatures, and only when asked.
	src := baseimage.Source{Target: t, Channel: c.OS.Channel, Version: c.OS.Version, Mirror: o.mirror, Unsigned: o.mirror != "" && o.insecureMirror}
	if err := o.checkMirror(); err != nil {
		return src, err
	}
	if o.signingKey != "" {
		var err error
		if src.Keyring, err = os.ReadFile(o.signingKey); err != nil {
			return src, fault.Wrap(fault.Input, fmt.Errorf("--signing-key: %w", err))
		}
	}
	return src, nil
}

// checkMirror refuses a plain-HTTP mirror unless --insecure-mirror says
// to accept it: anyone on the path then chooses the names and versions
// (only the files' signatures hold).
func (o *downloadOptions) checkMirror() error {
	if o.mirror == "" || o.insecureMirror {
		return nil
	}
	u, err := url.Parse(o.mirror)
	if err != nil || u.Host == "" {
		return fault.Wrap(fault.Input, fmt.Errorf("--mirror %q: give the mirror's URL, such as https://mirror.example/flatcar/{channel}", o.mirror))
	}
	if u.Scheme != "https" {
		return fault.Wrap(fault.Input, fmt.Errorf("--mirror %s is not https://: anyone on the way can then choose which release you get; use an https:// mirror, or pass --insecure-mirror to accept it", o.mirror))
	}
	return nil
}

// loadForTarget loads the cluster, its secrets and the target profile,
// which must be for the cluster's OS; an empty profile names the OS's
// generic amd64 profile.
func (g *globals) loadForTarget(profile string) (*profiles.Target, *cluster.Cluster, *secrets.Secrets, error) {
	if profile != "" { // a wrong name is found before the secrets are read
		if _, err := lookupTarget(profile); err != nil {
			return nil, nil, nil, err
		}
	}
	c, s, err := g.load()
	if err != nil {
		return nil, nil, nil, err
	}
	t, err := targetFor(c, cmp.Or(profile, genericProfile(c.OS.Name)))
	return t, c, s, err
}

// targetFor looks up a target profile, which must be for the cluster's OS.
func targetFor(c *cluster.Cluster, profile string) (*profiles.Target, error) {
	t, err := lookupTarget(profile)
	if err != nil {
		return nil, err
	}
	if c.OS.Name != t.OS {
		return nil, fault.Wrap(fault.Input, fmt.Errorf("--profile %s is for os %s, but the cluster file has os.name %s: pick a %s profile (kiln profiles) or change os.name", t.Name, t.OS, c.OS.Name, c.OS.Name))
	}
	return t, nil
}

// genericProfile is the generic amd64 target profile of an OS.
func genericProfile(osName string) string {
	for _, n := range profiles.TargetNames() {
		if t, err := profiles.LookupTarget(n); err == nil && t.OS == osName && t.Arch == "amd64" && t.Board == "generic" {
			return n
		}
	}
	return ""
}

// offline adds what to do without network to a failed download.
func offline(err error, hint string) error {
	if err == nil || fault.KindOf(err) != fault.Download {
		return err
	}
	return fmt.Errorf("%w (offline? %s)", err, hint)
}

// forNode is what the cluster file says about the machine a command
// works for: its role and target profile. An inventory node (--node)
// gives both, which --role and --profile may only repeat; otherwise the
// flags give them, the profile defaulting to the cluster's.
type forNode struct {
	role    nodeconfig.Role
	profile string // "" when neither the file nor a flag names one
}

func resolveNode(c *cluster.Cluster, node, role, profile string) (forNode, error) {
	if node == "" {
		out := forNode{profile: cmp.Or(profile, c.Profile)}
		if role != "" {
			r, err := nodeconfig.ParseRole(role)
			if err != nil {
				return out, fault.Wrap(fault.Input, fmt.Errorf("--role: %w", err))
			}
			out.role = r
		}
		return out, nil
	}
	i := slices.IndexFunc(c.Nodes, func(n cluster.Node) bool { return n.Name == node })
	if i < 0 {
		var names []string
		for _, n := range c.Nodes {
			names = append(names, n.Name)
		}
		known := "the cluster file lists no nodes"
		if len(names) > 0 {
			known = "it lists " + strings.Join(names, ", ")
		}
		return forNode{}, fault.Wrap(fault.Input, fmt.Errorf("--node %q is not in the cluster file's nodes list (%s)", node, known))
	}
	n := c.Nodes[i]
	out := forNode{role: n.Role, profile: c.NodeProfile(n)}
	var errs []error
	if role != "" && role != string(n.Role) {
		errs = append(errs, fmt.Errorf("--role %s contradicts nodes[%d].role %s of node %s: drop --role (the cluster file decides)", role, i, n.Role, node))
	}
	if profile != "" && out.profile != "" && profile != out.profile {
		field := fmt.Sprintf("nodes[%d].profile", i)
		if n.Profile == "" {
			field = "profile (the cluster's default)"
		}
		errs = append(errs, fmt.Errorf("--profile %s contradicts %s %s of node %s: drop --profile, or change the cluster file", profile, field, out.profile, node))
	}
	out.profile = cmp.Or(out.profile, profile)
	return out, fault.Wrap(fault.Input, errors.Join(errs...))
}
