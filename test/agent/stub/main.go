// Command stub stands in for kubeadm, kubectl, systemctl, modprobe and
// swapoff on a simulated node (it acts as the command it is named as). It
// checks arguments and kubeadm configuration files the way the real tools
// do for what kiln uses, keeps node files under $KILN_FIRSTBOOT_ROOT, and
// shares cluster state through the simulator at $KILN_SIM_URL.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/test/agent/sim"
)

func main() {
	name := filepath.Base(os.Args[0])
	logCall(name, os.Args[1:])
	var err error
	switch name {
	case "kubeadm":
		err = kubeadm(os.Args[1:])
	case "kubectl":
		err = kubectl(os.Args[1:])
	case "modprobe":
		err = modprobe(os.Args[1:])
	case "swapoff":
		err = swapoff(os.Args[1:])
	case "systemctl":
		err = systemctl(os.Args[1:])
	default:
		err = fmt.Errorf("stub: unknown command %q", name)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s\nTo see the stack trace of this error execute with --v=5 or higher\n", err)
		os.Exit(1)
	}
}

// node maps a node path into the simulated node's root.
func node(p string) string { return filepath.Join(os.Getenv(sim.EnvRoot), p) }

// swapoff takes -a, as the agent calls it; anything else is swapoff's
// usage error.
func swapoff(args []string) error {
	if len(args) != 1 || args[0] != "-a" {
		return fmt.Errorf("swapoff: bad usage %q\nTry 'swapoff --help' for more information.", args)
	}
	return nil
}

// systemctl knows the units a kubeadm node has and the verbs used on
// them; an unknown unit fails as systemd says.
func systemctl(args []string) error {
	if len(args) == 1 && args[0] == "daemon-reload" {
		return nil
	}
	if len(args) != 2 || !slices.Contains([]string{"start", "stop", "restart", "enable", "disable", "is-active"}, args[0]) {
		return fmt.Errorf("systemctl stub: unexpected systemctl %q", args)
	}
	unit := strings.TrimSuffix(args[1], ".service")
	if !slices.Contains([]string{"kubelet", "containerd"}, unit) {
		return fmt.Errorf("Failed to %s %s.service: Unit %s.service not found.", args[0], unit, unit)
	}
	return nil
}

func logCall(name string, args []string) {
	f, err := os.OpenFile(node("/var/log/stub-calls.log"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err == nil {
		fmt.Fprintln(f, strings.Join(append([]string{name}, args...), " "))
		f.Close()
	}
}

func hostname() string {
	b, _ := os.ReadFile(node("/proc/sys/kernel/hostname"))
	return strings.TrimSpace(string(b))
}

func scaled(d time.Duration) time.Duration {
	var f float64 = 1
	fmt.Sscan(os.Getenv(sim.EnvScale), &f)
	return time.Duration(float64(d) / f)
}

// modprobe -a loads modules; br_netfilter brings its sysctls. A module
// Flatcar and Fedora CoreOS do not ship fails as modprobe fails.
func modprobe(args []string) error {
	if len(args) < 2 || args[0] != "-a" {
		return fmt.Errorf("modprobe stub: expected -a MODULE..., got %q", args)
	}
	for _, m := range args[1:] {
		if !slices.Contains([]string{"overlay", "br_netfilter", "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "nf_conntrack"}, m) {
			return fmt.Errorf("modprobe: FATAL: Module %s not found in directory /lib/modules/6.6.0-flatcar", m)
		}
	}
	if slices.Contains(args[1:], "br_netfilter") {
		dir := node("/proc/sys/net/bridge")
		os.MkdirAll(dir, 0o755)
		for _, f := range []string{"bridge-nf-call-iptables", "bridge-nf-call-ip6tables"} {
			if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
				os.WriteFile(filepath.Join(dir, f), []byte("0\n"), 0o644)
			}
		}
	}
	return nil
}

// flags parses like cobra: known flags only, and kubeadm's rule that
// --config mixes only with a few flags (validation.ValidateMixedArguments).
func flags(cmd string, args []string, define func(*flag.FlagSet)) (*flag.FlagSet, error) {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.String("config", "", "")
	define(fs)
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("%s: %v", cmd, strings.Replace(err.Error(), "flag provided but not defined: -", "unknown flag: --", 1))
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("%s: unexpected arguments %q", cmd, fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["config"] {
		var mixed []string
		allowed := []string{"config", "ignore-preflight-errors", "dry-run", "kubeconfig", "node-name", "upload-certs", "rootfs", "v"}
		fs.Visit(func(f *flag.Flag) {
			if !slices.Contains(allowed, f.Name) && !strings.HasPrefix(f.Name, "skip-") {
				mixed = append(mixed, f.Name)
			}
		})
		if len(mixed) > 0 {
			return nil, fmt.Errorf("can not mix '--config' with arguments %v", mixed)
		}
	}
	return fs, nil
}

func kubeadm(args []string) error {
	switch {
	case len(args) >= 3 && args[0] == "init" && args[1] == "phase" && args[2] == "upload-certs":
		return uploadCerts(args[3:])
	case len(args) >= 1 && args[0] == "init":
		return initCmd(args[1:])
	case len(args) >= 1 && args[0] == "join":
		return join(args[1:])
	case len(args) >= 1 && args[0] == "reset":
		return reset(args[1:])
	case len(args) >= 2 && args[0] == "config" && args[1] == "validate":
		return configValidate(args[2:])
	}
	return fmt.Errorf("kubeadm stub: unsupported command %q", args)
}

func initCmd(args []string) error {
	fs, err := flags("init", args, func(fs *flag.FlagSet) {
		fs.Bool("upload-certs", false, "")
		fs.Bool("skip-token-print", false, "")
		fs.Bool("skip-certificate-key-print", false, "")
		fs.String("cert-dir", "", "")
		fs.String("token", "", "")
		fs.String("certificate-key", "", "")
	})
	if err != nil {
		return err
	}
	cfg, err := loadConfig(fs.Lookup("config").Value.String(), "InitConfiguration", "ClusterConfiguration")
	if err != nil {
		return err
	}
	if err := preflight(append(controlPlaneFiles, "/etc/kubernetes/admin.conf", "/etc/kubernetes/kubelet.conf")...); err != nil {
		return err
	}
	pki := node(cfg.Cluster.CertificatesDir)
	caCert, err1 := os.ReadFile(filepath.Join(pki, "ca.crt"))
	caKey, err2 := os.ReadFile(filepath.Join(pki, "ca.key"))
	if err1 != nil || err2 != nil {
		return fmt.Errorf("kubeadm stub: no CA in %s (the stub does not generate one): %v", cfg.Cluster.CertificatesDir, errors.Join(err1, err2))
	}
	for _, f := range []string{"ca.key", "sa.key", "front-proxy-ca.key", "etcd/ca.key"} {
		if fi, err := os.Stat(filepath.Join(pki, f)); err != nil || fi.Mode().Perm()&0o077 != 0 {
			return fmt.Errorf("kubeadm stub: %s missing or readable by others: %v", f, err)
		}
	}
	tok := cfg.Init.BootstrapTokens[0]
	ttl, err := time.ParseDuration(tok.TTL)
	if err != nil {
		return fmt.Errorf("bootstrapTokens[0].ttl: %v", err)
	}
	upload := fs.Lookup("upload-certs").Value.String() == "true"
	id, secret, _ := strings.Cut(tok.Token, ".")
	if err := writeFiles("/etc/kubernetes/kubelet.conf", "/var/lib/kubelet/config.yaml", "/etc/kubernetes/admin.conf",
		"/etc/kubernetes/manifests/kube-apiserver.yaml", "/etc/kubernetes/manifests/kube-controller-manager.yaml",
		"/etc/kubernetes/manifests/kube-scheduler.yaml", "/etc/kubernetes/manifests/etcd.yaml", "/var/lib/etcd/member/wal/0.wal"); err != nil {
		return err
	}
	// kubeadm's kubelet-start phase restarts the kubelet.
	if out, err := exec.Command("systemctl", "restart", "kubelet").CombinedOutput(); err != nil {
		fmt.Printf("[kubelet-start] WARNING: %v %s\n", err, out)
	}
	if _, err := sim.Call("init", sim.Request{Node: hostname(), CACert: caCert, CAKey: caKey, TokenID: id, TokenSecret: secret, TokenTTL: ttl, CertKey: cfg.Init.CertificateKey, UploadCerts: upload}); err != nil {
		return err
	}
	fmt.Println("Your Kubernetes control-plane has initialized successfully!")
	if upload && fs.Lookup("skip-certificate-key-print").Value.String() != "true" {
		fmt.Printf("[upload-certs] Using certificate key:\n%s\n", cfg.Init.CertificateKey)
	}
	if fs.Lookup("skip-token-print").Value.String() != "true" {
		fmt.Printf("kubeadm join %s --token %s --discovery-token-ca-cert-hash ...\n", cfg.Cluster.ControlPlaneEndpoint, tok.Token)
	}
	return nil
}

func uploadCerts(args []string) error {
	fs, err := flags("upload-certs", args, func(fs *flag.FlagSet) {
		fs.Bool("upload-certs", false, "")
		fs.Bool("skip-certificate-key-print", false, "")
		fs.String("certificate-key", "", "")
		fs.String("kubeconfig", "/etc/kubernetes/admin.conf", "")
	})
	if err != nil {
		return err
	}
	if fs.Lookup("upload-certs").Value.String() != "true" {
		fmt.Println("[upload-certs] Skipping phase. Please see --upload-certs")
		return nil
	}
	cfg, err := loadConfig(fs.Lookup("config").Value.String(), "InitConfiguration", "ClusterConfiguration")
	if err != nil {
		return err
	}
	if _, err := os.Stat(node(fs.Lookup("kubeconfig").Value.String())); err != nil {
		return fmt.Errorf("failed to load admin kubeconfig: %v", err)
	}
	_, err = sim.Call("upload-certs", sim.Request{Node: hostname(), CertKey: cfg.Init.CertificateKey})
	return err
}

var tokenRe = regexp.MustCompile(`^[a-z0-9]{6}\.[a-z0-9]{16}$`)

func join(args []string) error {
	fs, err := flags("join", args, func(fs *flag.FlagSet) {
		fs.Bool("control-plane", false, "")
		fs.String("certificate-key", "", "")
		fs.String("token", "", "")
		fs.String("discovery-token-ca-cert-hash", "", "")
	})
	if err != nil {
		return err
	}
	cfg, err := loadConfig(fs.Lookup("config").Value.String(), "JoinConfiguration")
	if err != nil {
		return err
	}
	j := cfg.Join
	cp := j.ControlPlane != nil
	checks := []string{"/etc/kubernetes/kubelet.conf", "/etc/kubernetes/bootstrap-kubelet.conf"}
	if cp {
		checks = append(checks, controlPlaneFiles...)
	} else {
		checks = append(checks, "/etc/kubernetes/pki/ca.crt")
	}
	if err := preflight(checks...); err != nil {
		return err
	}
	bt := j.Discovery.BootstrapToken
	id, secret, _ := strings.Cut(bt.Token, ".")
	// Discovery: fetch cluster-info through the endpoint until the JWS
	// signature for the token shows up or the discovery timeout passes.
	deadline := time.Now().Add(scaled(5 * time.Minute))
	var info sim.Reply
	for {
		info, err = sim.Call("cluster-info", sim.Request{Node: hostname(), TokenID: id, TokenSecret: secret})
		switch {
		case err != nil:
			err = fmt.Errorf("couldn't validate the identity of the API Server: failed to request the cluster-info ConfigMap: Get \"https://%s/api/v1/namespaces/kube-public/configmaps/cluster-info?timeout=10s\": %v", bt.APIServerEndpoint, err)
		case !info.TokenSigned:
			err = fmt.Errorf("couldn't validate the identity of the API Server: could not find a JWS signature in the cluster-info ConfigMap for token ID %q", id)
		}
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(scaled(5 * time.Second))
	}
	if err != nil {
		return fmt.Errorf("error execution phase preflight: %w", err)
	}
	if !info.TokenValid {
		return errors.New("error execution phase preflight: couldn't validate the identity of the API Server: failed to verify JWS signature of received cluster info object, can't trust this API Server")
	}
	hash, err := sim.CAHash(info.CACert)
	if err != nil {
		return err
	}
	if !slices.Contains(bt.CACertHashes, hash) {
		return fmt.Errorf("error execution phase preflight: couldn't validate the identity of the API Server: cluster CA found in cluster-info ConfigMap is invalid: none of the public keys %q are pinned", hash)
	}
	if cp {
		if _, err := sim.Call("download-certs", sim.Request{Node: hostname(), CertKey: j.ControlPlane.CertificateKey}); err != nil {
			return fmt.Errorf("error execution phase control-plane-prepare/download-certs: %w", err)
		}
	}
	// kubeadm's phases in order: control-plane-prepare (the control
	// plane's kubeconfigs and manifests), the etcd member (added, its
	// manifest and certificates written), and only then the kubelet's TLS
	// bootstrap (kubelet.conf; the Node object), which waits for the local
	// API server on a control plane (ControlPlaneKubeletLocalMode).
	if cp {
		if err := writeFiles("/etc/kubernetes/admin.conf", "/etc/kubernetes/manifests/kube-apiserver.yaml",
			"/etc/kubernetes/manifests/kube-controller-manager.yaml", "/etc/kubernetes/manifests/kube-scheduler.yaml"); err != nil {
			return err
		}
	}
	start, err := sim.Call("join-start", sim.Request{Node: hostname(), ControlPlane: cp})
	if err != nil {
		return err
	}
	if cp {
		if err := writeEtcd(start); err != nil {
			return err
		}
	}
	time.Sleep(start.Hold)
	if err := writeFiles("/etc/kubernetes/kubelet.conf", "/var/lib/kubelet/config.yaml", "/etc/kubernetes/pki/ca.crt"); err != nil {
		return err
	}
	if _, err := sim.Call("join-finish", sim.Request{Node: hostname()}); err != nil {
		return err
	}
	fmt.Println("This node has joined the cluster")
	return nil
}

func reset(args []string) error {
	fs, err := flags("reset", args, func(fs *flag.FlagSet) {
		fs.Bool("f", false, "")
		fs.Bool("force", false, "")
	})
	if err != nil {
		return err
	}
	if fs.Lookup("f").Value.String() != "true" && fs.Lookup("force").Value.String() != "true" {
		return errors.New("[reset] Are you sure you want to proceed? [y/N]: aborted reset operation")
	}
	_, err = os.Stat(node("/etc/kubernetes/kubelet.conf"))
	bootstrapped := err == nil
	for _, p := range []string{"/etc/kubernetes/manifests", "/etc/kubernetes/pki", "/var/lib/kubelet", "/var/lib/etcd"} {
		entries, _ := os.ReadDir(node(p))
		for _, e := range entries {
			os.RemoveAll(filepath.Join(node(p), e.Name()))
		}
	}
	for _, f := range []string{"admin.conf", "super-admin.conf", "kubelet.conf", "bootstrap-kubelet.conf", "controller-manager.conf", "scheduler.conf"} {
		os.Remove(node("/etc/kubernetes/" + f))
	}
	_, err = sim.Call("reset", sim.Request{Node: hostname(), Bootstrapped: bootstrapped})
	return err
}

// controlPlaneFiles are what kubeadm's preflight wants absent on a
// control plane: the static pod manifests, and etcd's data folder empty.
// (Its Port checks need a network namespace per node, which these
// simulated nodes do not have; the rehearsal's nodes do.)
var controlPlaneFiles = []string{
	"/etc/kubernetes/manifests/kube-apiserver.yaml", "/etc/kubernetes/manifests/kube-controller-manager.yaml",
	"/etc/kubernetes/manifests/kube-scheduler.yaml", "/etc/kubernetes/manifests/etcd.yaml", "/var/lib/etcd/",
}

// preflight fails like kubeadm's FileAvailable and DirAvailable checks
// (a path ending in / is a folder that must be missing or empty).
func preflight(files ...string) error {
	var errs []string
	for _, f := range files {
		if dir, ok := strings.CutSuffix(f, "/"); ok {
			if entries, err := os.ReadDir(node(dir)); err == nil && len(entries) > 0 {
				errs = append(errs, fmt.Sprintf("\t[ERROR DirAvailable-%s]: %s is not empty", strings.ReplaceAll(dir, "/", "-"), dir))
			}
			continue
		}
		if _, err := os.Stat(node(f)); err == nil {
			errs = append(errs, fmt.Sprintf("\t[ERROR FileAvailable-%s]: %s already exists", strings.ReplaceAll(f, "/", "-"), f))
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("error execution phase preflight: [preflight] Some fatal errors occurred:\n%s\n[preflight] If you know what you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`", strings.Join(errs, "\n"))
}

// writeEtcd writes a control plane's etcd files in kubeadm's order: the
// certificates (control-plane-prepare), then the member's data folder and
// last its manifest, which names its peers.
func writeEtcd(rep sim.Reply) error {
	manifest := fmt.Sprintf("# written by the kubeadm stub\nspec:\n  containers:\n  - command:\n    - etcd\n    - --initial-advertise-peer-urls=%s\n    - --initial-cluster=%s\n", rep.EtcdPeerURL, rep.EtcdInitialCluster)
	for _, f := range []struct {
		path string
		data []byte
	}{
		{"/etc/kubernetes/pki/etcd/ca.crt", rep.EtcdCA},
		{"/etc/kubernetes/pki/apiserver-etcd-client.crt", rep.EtcdClientCert},
		{"/etc/kubernetes/pki/apiserver-etcd-client.key", rep.EtcdClientKey},
		{"/var/lib/etcd/member/wal/0.wal", []byte("stand-in etcd data\n")},
		{"/etc/kubernetes/manifests/etcd.yaml", []byte(manifest)},
	} {
		if err := os.MkdirAll(filepath.Dir(node(f.path)), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(node(f.path), f.data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// writeFiles writes stand-ins for the files kubeadm writes.
func writeFiles(files ...string) error {
	for _, f := range files {
		if err := os.MkdirAll(filepath.Dir(node(f)), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(node(f), []byte("# written by the kubeadm stub\n"), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// The kubeadm.k8s.io/v1beta4 subset kiln writes, decoded strictly: an
// unknown field is an error, as in kubeadm's strict decoding.
type (
	arg              struct{ Name, Value string }
	nodeRegistration struct {
		CRISocket        string `yaml:"criSocket"`
		KubeletExtraArgs []arg  `yaml:"kubeletExtraArgs"`
		Name             string `yaml:"name"`
	}
	patches        struct{ Directory string }
	bootstrapToken struct {
		Token  string
		TTL    string `yaml:"ttl"`
		Usages []string
		Groups []string
	}
	initConfiguration struct {
		APIVersion       string `yaml:"apiVersion"`
		Kind             string
		BootstrapTokens  []bootstrapToken `yaml:"bootstrapTokens"`
		CertificateKey   string           `yaml:"certificateKey"`
		NodeRegistration nodeRegistration `yaml:"nodeRegistration"`
		Patches          *patches
	}
	clusterConfiguration struct {
		APIVersion           string `yaml:"apiVersion"`
		Kind                 string
		ClusterName          string `yaml:"clusterName"`
		KubernetesVersion    string `yaml:"kubernetesVersion"`
		ControlPlaneEndpoint string `yaml:"controlPlaneEndpoint"`
		CertificatesDir      string `yaml:"certificatesDir"`
		Networking           struct {
			PodSubnet     string `yaml:"podSubnet"`
			ServiceSubnet string `yaml:"serviceSubnet"`
			DNSDomain     string `yaml:"dnsDomain"`
		}
		ControllerManager struct {
			ExtraArgs []arg `yaml:"extraArgs"`
		} `yaml:"controllerManager"`
	}
	joinConfiguration struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string
		Discovery  struct {
			BootstrapToken struct {
				APIServerEndpoint string   `yaml:"apiServerEndpoint"`
				Token             string   `yaml:"token"`
				CACertHashes      []string `yaml:"caCertHashes"`
			} `yaml:"bootstrapToken"`
		}
		NodeRegistration nodeRegistration `yaml:"nodeRegistration"`
		ControlPlane     *struct {
			CertificateKey string `yaml:"certificateKey"`
		} `yaml:"controlPlane"`
		Patches *patches
	}
	config struct {
		Init    initConfiguration
		Cluster clusterConfiguration
		Join    joinConfiguration
	}
)

var (
	certKeyRe = regexp.MustCompile(`^[0-9a-f]{64}$`)
	versionRe = regexp.MustCompile(`^v1\.\d+\.\d+$`)
	hashRe    = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
)

// configValidate is kubeadm config validate: the file alone, decoded
// strictly and checked as loadConfig does, without looking at the node
// (the container runtime need not run yet).
func configValidate(args []string) error {
	fs := flag.NewFlagSet("config validate", flag.ContinueOnError)
	path := fs.String("config", "", "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if _, err := decodeConfig(*path, false); err != nil {
		return err
	}
	fmt.Println("ok")
	return nil
}

// loadConfig reads a kubeadm configuration file that must hold the given
// kinds, strictly, and checks the fields kubeadm would reject.
func loadConfig(path string, kinds ...string) (*config, error) {
	return decodeConfig(path, true, kinds...)
}

// decodeConfig reads a kubeadm configuration file that must hold the
// given kinds; live: also check the node (its container runtime's socket),
// as kubeadm init and join do.
func decodeConfig(path string, live bool, kinds ...string) (*config, error) {
	if path == "" {
		return nil, errors.New("kubeadm stub: only --config is supported")
	}
	data, err := os.ReadFile(node(path))
	if err != nil {
		return nil, fmt.Errorf("unable to read config from %q: %w", path, err)
	}
	var cfg config
	seen := map[string]bool{}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var n yaml.Node
		if err := dec.Decode(&n); err == io.EOF {
			break
		} else if err != nil {
			return nil, err
		}
		var head struct{ APIVersion, Kind string }
		head.APIVersion = field(&n, "apiVersion")
		head.Kind = field(&n, "kind")
		var target any
		switch head.Kind {
		case "InitConfiguration":
			target = &cfg.Init
		case "ClusterConfiguration":
			target = &cfg.Cluster
		case "JoinConfiguration":
			target = &cfg.Join
		case "KubeletConfiguration":
			if head.APIVersion != "kubelet.config.k8s.io/v1beta1" {
				return nil, fmt.Errorf("KubeletConfiguration: unsupported apiVersion %q", head.APIVersion)
			}
			continue
		default:
			return nil, fmt.Errorf("unknown configuration kind %q", head.Kind)
		}
		if head.APIVersion != "kubeadm.k8s.io/v1beta4" {
			return nil, fmt.Errorf("%s: your configuration file uses an old API spec: %q; this version of kubeadm supports kubeadm.k8s.io/v1beta4", head.Kind, head.APIVersion)
		}
		var buf bytes.Buffer
		enc := yaml.NewEncoder(&buf)
		enc.Encode(&n)
		strict := yaml.NewDecoder(&buf)
		strict.KnownFields(true)
		if err := strict.Decode(target); err != nil {
			return nil, fmt.Errorf("error unmarshaling %s: strict decoding error: %v", head.Kind, err)
		}
		seen[head.Kind] = true
	}
	for _, k := range kinds {
		if !seen[k] {
			return nil, fmt.Errorf("no %s found in %s", k, path)
		}
	}
	return &cfg, validate(&cfg, seen, live)
}

func field(n *yaml.Node, key string) string {
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1].Value
		}
	}
	return ""
}

func validate(cfg *config, seen map[string]bool, live bool) error {
	var errs []string
	bad := func(f string, a ...any) { errs = append(errs, fmt.Sprintf(f, a...)) }
	sock := func(kind, s string) {
		if !strings.HasPrefix(s, "unix://") {
			bad("%s.nodeRegistration.criSocket: %q must be a unix:// URL", kind, s)
			return
		}
		if fi, err := os.Stat(node(strings.TrimPrefix(s, "unix://"))); live && (err != nil || fi.Mode()&os.ModeSocket == 0) {
			bad("[ERROR CRI]: container runtime is not running: %s", s)
		}
	}
	if seen["InitConfiguration"] {
		i := cfg.Init
		if len(i.BootstrapTokens) == 0 || !tokenRe.MatchString(i.BootstrapTokens[0].Token) {
			bad("InitConfiguration.bootstrapTokens[0].token: the bootstrap token is invalid")
		}
		if i.CertificateKey != "" && !certKeyRe.MatchString(i.CertificateKey) {
			bad("InitConfiguration.certificateKey: invalid certificate key")
		}
		sock("InitConfiguration", i.NodeRegistration.CRISocket)
	}
	if seen["ClusterConfiguration"] {
		c := cfg.Cluster
		if !versionRe.MatchString(c.KubernetesVersion) {
			bad("ClusterConfiguration.kubernetesVersion: %q is invalid", c.KubernetesVersion)
		}
		if !filepath.IsAbs(c.CertificatesDir) {
			bad("ClusterConfiguration.certificatesDir: %q must be absolute", c.CertificatesDir)
		}
		if c.ControlPlaneEndpoint == "" {
			bad("ClusterConfiguration.controlPlaneEndpoint: required for an HA cluster")
		}
	}
	if seen["JoinConfiguration"] {
		j := cfg.Join
		bt := j.Discovery.BootstrapToken
		if !tokenRe.MatchString(bt.Token) {
			bad("JoinConfiguration.discovery.bootstrapToken.token: the bootstrap token is invalid")
		}
		if len(bt.CACertHashes) == 0 {
			bad("JoinConfiguration.discovery.bootstrapToken.caCertHashes: using token-based discovery without caCertHashes can be unsafe")
		}
		for _, h := range bt.CACertHashes {
			if !hashRe.MatchString(h) {
				bad("JoinConfiguration.discovery.bootstrapToken.caCertHashes: invalid hash %q", h)
			}
		}
		if bt.APIServerEndpoint == "" {
			bad("JoinConfiguration.discovery.bootstrapToken.apiServerEndpoint: required")
		}
		if j.ControlPlane != nil && !certKeyRe.MatchString(j.ControlPlane.CertificateKey) {
			bad("JoinConfiguration.controlPlane.certificateKey: invalid certificate key")
		}
		sock("JoinConfiguration", j.NodeRegistration.CRISocket)
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "\n"))
	}
	return nil
}

// kubectl supports what the agent runs: apply --server-side -f, get nodes,
// delete secret.
func kubectl(args []string) error {
	fs := flag.NewFlagSet("kubectl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	kubeconfig := fs.String("kubeconfig", "", "")
	namespace := fs.String("namespace", "default", "")
	var files multi
	fs.Var(&files, "f", "")
	fs.Var(&files, "filename", "")
	serverSide := fs.Bool("server-side", false, "")
	fieldManager := fs.String("field-manager", "", "")
	fs.Bool("force-conflicts", false, "")
	selector := fs.String("selector", "", "")
	output := fs.String("output", "", "")
	ignore := fs.Bool("ignore-not-found", false, "")
	// kubectl takes flags anywhere: parse them out between words.
	var words []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			return fmt.Errorf("error: %v", err)
		}
		if fs.NArg() == 0 {
			break
		}
		words = append(words, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	if *kubeconfig == "" {
		return errors.New("kubectl stub: --kubeconfig is required (the agent always names it)")
	}
	if _, err := os.Stat(node(*kubeconfig)); err != nil {
		return fmt.Errorf("error: stat %s: no such file or directory", *kubeconfig)
	}
	switch strings.Join(words, " ") {
	case "apply":
		if len(files) == 0 {
			return errors.New("error: must specify one of -f and -k")
		}
		if !*serverSide || *fieldManager == "" {
			return errors.New("kubectl stub: kiln applies server-side under its own field manager (--server-side --field-manager)")
		}
		for _, f := range files {
			if err := checkManifest(f); err != nil {
				return err
			}
		}
		_, err := sim.Call("apply", sim.Request{Node: hostname(), Files: files})
		return err
	case "get nodes":
		if *selector != "node-role.kubernetes.io/control-plane" || *output != "json" {
			return fmt.Errorf("kubectl stub: unexpected get nodes --selector %q --output %q", *selector, *output)
		}
		rep, err := sim.Call("nodes", sim.Request{Node: hostname()})
		if err == nil {
			fmt.Println(rep.NodeListJSON)
		}
		return err
	case "delete secret kubeadm-certs":
		if *namespace != "kube-system" || !*ignore {
			return fmt.Errorf("kubectl stub: unexpected delete in namespace %q (ignore-not-found %t)", *namespace, *ignore)
		}
		_, err := sim.Call("delete-certs", sim.Request{Node: hostname()})
		return err
	}
	return fmt.Errorf("kubectl stub: unsupported command %q", words)
}

// checkManifest fails as kubectl apply does on a missing file, a file
// that is not YAML, or an object without apiVersion or kind.
func checkManifest(f string) error {
	data, err := os.ReadFile(node(f))
	if err != nil {
		return fmt.Errorf("error: the path %q does not exist", f)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var obj map[string]any
		err := dec.Decode(&obj)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("error: error parsing %s: error converting YAML to JSON: %v", f, err)
		}
		if obj == nil {
			continue
		}
		var missing []string
		for _, k := range []string{"apiVersion", "kind"} {
			if v, _ := obj[k].(string); v == "" {
				missing = append(missing, k+" not set")
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("error: error validating %q: error validating data: [%s]; if you choose to ignore these errors, turn validation off with --validate=false", f, strings.Join(missing, ", "))
		}
	}
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }
