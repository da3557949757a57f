package render

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"path"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/secrets"
	"github.com/kilnproject/kiln/manifests"
	"github.com/kilnproject/kiln/profiles"
)

// AgentUnit is the systemd unit that runs the agent.
const AgentUnit = "kiln-firstboot.service"

// Files kiln writes on every node besides those under KilnDir.
const (
	modulesPath = "/etc/modules-load.d/kiln-kubernetes.conf"
	sysctlPath  = "/etc/sysctl.d/90-kiln-kubernetes.conf"
)

// The Butane subset kiln writes (field names from the Butane spec).
type (
	butaneDoc struct {
		Variant string        `yaml:"variant"`
		Version string        `yaml:"version"`
		Passwd  *butanePasswd `yaml:"passwd,omitempty"`
		Storage butaneStorage `yaml:"storage"`
		Systemd butaneSystemd `yaml:"systemd"`
	}
	butanePasswd struct {
		Users []butaneUser `yaml:"users"`
	}
	butaneUser struct {
		Name              string   `yaml:"name"`
		SSHAuthorizedKeys []string `yaml:"ssh_authorized_keys"`
	}
	butaneStorage struct {
		Directories []butaneDir  `yaml:"directories"`
		Files       []butaneFile `yaml:"files"`
		Links       []butaneLink `yaml:"links,omitempty"`
	}
	butaneDir struct {
		Path string `yaml:"path"`
		Mode mode   `yaml:"mode"`
	}
	butaneFile struct {
		Path      string         `yaml:"path"`
		Mode      mode           `yaml:"mode"`
		Overwrite bool           `yaml:"overwrite,omitempty"`
		Contents  butaneContents `yaml:"contents"`
	}
	butaneContents struct {
		Inline       string              `yaml:"inline,omitempty"`
		Source       string              `yaml:"source,omitempty"`
		Compression  string              `yaml:"compression,omitempty"`
		Verification *butaneVerification `yaml:"verification,omitempty"`
	}
	butaneVerification struct {
		Hash string `yaml:"hash"`
	}
	butaneLink struct {
		Path   string `yaml:"path"`
		Target string `yaml:"target"`
	}
	butaneSystemd struct {
		Units []butaneUnit `yaml:"units"`
	}
	butaneUnit struct {
		Name     string         `yaml:"name"`
		Enabled  bool           `yaml:"enabled"`
		Contents string         `yaml:"contents,omitempty"`
		DropIns  []butaneDropIn `yaml:"dropins,omitempty"`
	}
	butaneDropIn struct {
		Name     string `yaml:"name"`
		Contents string `yaml:"contents"`
	}
)

// mode is a file mode written in octal, as people read modes.
type mode int

func (m mode) MarshalYAML() (any, error) {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!int", Value: fmt.Sprintf("0%o", int(m))}, nil
}

// Butane renders the role's Butane config (before snippets are merged).
func Butane(in Input) ([]byte, error) {
	doc, err := butaneFor(in)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(doc); err != nil {
		return nil, fmt.Errorf("encode butane: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func butaneFor(in Input) (*butaneDoc, error) {
	n, err := renderNode(in)
	if err != nil {
		return nil, err
	}
	nc := n.nc
	kubeadm, err := Kubeadm(in)
	if err != nil {
		return nil, err
	}
	if len(in.Agent) == 0 {
		return nil, fault.Wrap(fault.Environment, fmt.Errorf("no kiln-firstboot binary for %s was given to render", in.Arch))
	}
	c := in.Cluster
	osp, err := profiles.LookupOS(c.OS.Name)
	if err != nil {
		return nil, err
	}
	nodeYAML, err := nc.Encode()
	if err != nil {
		return nil, err
	}

	doc := &butaneDoc{Variant: osp.Butane.Variant, Version: osp.Butane.Version}
	if len(c.SSH.AuthorizedKeys) > 0 {
		doc.Passwd = &butanePasswd{Users: []butaneUser{{Name: "core", SSHAuthorizedKeys: c.SSH.AuthorizedKeys}}}
	}
	st := &doc.Storage
	st.Directories = append(st.Directories, butaneDir{Path: KilnDir, Mode: 0o700})
	secret := func(p string, data []byte) {
		st.Files = append(st.Files, butaneFile{Path: p, Mode: 0o600, Contents: butaneContents{Inline: string(data)}})
	}
	secret(nodeconfigPath, nodeYAML)
	for _, p := range kubeadm.Paths() {
		if strings.HasPrefix(p, PatchesPath+"/") && !hasDir(st.Directories, PatchesPath) {
			st.Directories = append(st.Directories, butaneDir{Path: PatchesPath, Mode: 0o700})
		}
		secret(p, kubeadm[p])
	}
	if nc.PKIDir != "" {
		st.Directories = append(st.Directories, butaneDir{Path: PKIPath, Mode: 0o700}, butaneDir{Path: PKIPath + "/etcd", Mode: 0o700})
		for _, name := range secrets.PKIFiles {
			secret(path.Join(PKIPath, name), in.Secrets.PKI[name])
		}
	}
	if len(n.manifests) > 0 {
		st.Directories = append(st.Directories, butaneDir{Path: ManifestsPath, Mode: 0o700})
	}
	for _, m := range n.manifests {
		if m.URL == "" {
			secret(m.Path, m.Data)
			continue
		}
		st.Files = append(st.Files, butaneFile{Path: m.Path, Mode: 0o600, Contents: butaneContents{Source: m.URL, Verification: &butaneVerification{Hash: "sha256-" + m.SHA256}}})
	}
	if len(n.lbFiles) > 0 {
		st.Directories = append(st.Directories, butaneDir{Path: manifests.ConfigDir, Mode: 0o700})
	}
	for _, f := range n.lbFiles {
		p := path.Join(manifests.ConfigDir, f.Name)
		if !slices.Contains(nc.LoadBalancer.Configs, p) {
			secret(p, f.Data) // a static pod
			continue
		}
		st.Files = append(st.Files, butaneFile{Path: p, Mode: nodeconfig.LoadBalancerConfigMode, Contents: butaneContents{Inline: string(f.Data)}})
	}
	if sn := nodeNetwork(c, in.NodeName); sn != nil {
		files, err := networkFiles(osp, sn)
		if err != nil {
			return nil, fault.Wrap(fault.Unsupported, err)
		}
		st.Files = append(st.Files, files...)
	}
	if nc.Hostname.Name != "" {
		// The OS may ship a default /etc/hostname; the node's name wins.
		st.Files = append(st.Files, butaneFile{Path: "/etc/hostname", Mode: 0o644, Overwrite: true, Contents: butaneContents{Inline: nc.Hostname.Name + "\n"}})
	}
	st.Files = append(st.Files,
		butaneFile{Path: modulesPath, Mode: 0o644, Contents: butaneContents{Inline: modulesConf}},
		butaneFile{Path: sysctlPath, Mode: 0o644, Contents: butaneContents{Inline: sysctlConf}},
		butaneFile{Path: osp.AgentPath, Mode: 0o755, Contents: butaneContents{
			Source:      "data:;base64," + base64.StdEncoding.EncodeToString(in.Agent),
			Compression: "gzip",
		}},
	)
	arch := osp.Arches[in.Arch]
	for _, d := range osp.Downloads {
		pin, err := pinned(c, d.Name, in.Arch)
		if err != nil {
			return nil, err
		}
		p := d.Expand(d.Path, c.Kubernetes.Version, arch)
		switch {
		case c.Airgap && in.Served == nil:
			// The disk image carries the file (Payload): link to it
			// where it lies instead of downloading it.
			carried := payloadPath(osp, in, payloadName(osp, d, c, in.Arch))
			if d.Link != "" {
				st.Links = append(st.Links, butaneLink{Path: d.Link, Target: carried})
			} else {
				st.Links = append(st.Links, butaneLink{Path: p, Target: carried})
			}
		default:
			url := pin.URL
			if c.Airgap { // from kiln serve, same pin
				url = in.Served.URL + "/" + payloadName(osp, d, c, in.Arch)
			}
			st.Files = append(st.Files, butaneFile{Path: p, Mode: mode(d.Mode), Contents: butaneContents{
				Source:       url,
				Verification: &butaneVerification{Hash: "sha512-" + pin.SHA512},
			}})
			if d.Link != "" {
				st.Links = append(st.Links, butaneLink{Path: d.Link, Target: p})
			}
		}
		if d.ExtractTo != "" {
			doc.Systemd.Units = append(doc.Systemd.Units, butaneUnit{Name: "kiln-" + d.Name + ".service", Enabled: true, Contents: extractUnit(d.Name, p, d.ExtractTo)})
		}
	}
	if c.Airgap && in.Served != nil {
		name := ImagesArchive(in.Role)
		st.Directories = append(st.Directories, butaneDir{Path: FetchedPayloadDir, Mode: 0o755})
		st.Files = append(st.Files, butaneFile{Path: payloadPath(osp, in, name), Mode: 0o644, Contents: butaneContents{
			Source:       in.Served.URL + "/" + name,
			Verification: &butaneVerification{Hash: "sha256-" + in.Served.ArchiveSHA256},
		}})
	}
	var containerdDropIns []butaneDropIn
	if osp.Containerd.Always || c.Airgap {
		st.Files = append(st.Files, butaneFile{Path: osp.Containerd.Config, Mode: 0o644, Overwrite: true, Contents: butaneContents{Inline: containerdConfig(n.sandbox)}})
		if n.sandbox != "" {
			st.Files = append(st.Files, butaneFile{Path: ContainerdHostsDir + "/_default/hosts.toml", Mode: 0o644, Contents: butaneContents{Inline: noRegistryHosts}})
		}
		if osp.Containerd.DropIn != "" {
			containerdDropIns = []butaneDropIn{{Name: "10-kiln-config.conf", Contents: osp.Containerd.DropIn}}
		}
	}

	for _, l := range osp.Links {
		st.Links = append(st.Links, butaneLink{Path: l.Path, Target: l.Target})
	}

	units := &doc.Systemd.Units
	if osp.KubeletUnit {
		*units = append(*units, butaneUnit{Name: "kubelet.service", Enabled: true, Contents: kubeletUnit(osp)})
	}
	for _, u := range osp.EnableUnits {
		if u == "kubelet.service" && osp.KubeletUnit {
			continue
		}
		unit := butaneUnit{Name: u, Enabled: true}
		if u == "containerd.service" { // profiles.OS.Validate: the drop-in's unit
			unit.DropIns = containerdDropIns
		}
		*units = append(*units, unit)
	}
	*units = append(*units, butaneUnit{Name: AgentUnit, Enabled: true, Contents: agentUnit(osp, nodeconfigPath)})
	return doc, nil
}

const nodeconfigPath = nodeconfig.DefaultPath

func hasDir(dirs []butaneDir, p string) bool {
	for _, d := range dirs {
		if d.Path == p {
			return true
		}
	}
	return false
}

// Kernel modules and sysctls kubeadm's preflight checks and pod networking
// need.
const modulesConf = `overlay
br_netfilter
`

const sysctlConf = `net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
net.ipv4.ip_forward = 1
net.ipv6.conf.all.forwarding = 1
`

func agentUnit(osp *profiles.OS, nodeYAML string) string {
	return fmt.Sprintf(`[Unit]
Description=kiln first-boot agent: join this node to its Kubernetes cluster
Wants=network-online.target
After=network-online.target containerd.service systemd-sysext.service
# Once the agent has finished (joined, and removed the bootstrap secrets),
# later boots skip it.
ConditionPathExists=!%s
StartLimitIntervalSec=1h
StartLimitBurst=10

[Service]
Type=exec
ExecStart=%s --config %s
Restart=on-failure
RestartSec=20s
# Bad metadata (2) and a permanent refusal by the cluster (3) need a person.
RestartPreventExitStatus=2 3

[Install]
WantedBy=multi-user.target
`, nodeconfig.RemovedFile, osp.AgentPath, nodeYAML)
}

// extractUnit unpacks a downloaded archive (gzip'd tar) into dir on every
// boot, before the runtime and the kubelet start: what Ignition verified
// is what containerd runs.
func extractUnit(name, archive, dir string) string {
	return fmt.Sprintf(`[Unit]
Description=kiln: unpack %s into %s
Before=containerd.service kubelet.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/mkdir -p %s
ExecStart=/usr/bin/tar --extract --gzip --no-same-owner --file %s --directory %s

[Install]
WantedBy=multi-user.target
`, name, dir, dir, archive, dir)
}

// KubeletCgroupDriver is the kubelet's cgroupDriver in every rendered
// KubeletConfiguration (kubeadm's default since 1.22); containerd's runc
// runtime must use the same driver.
const KubeletCgroupDriver = "systemd"

// CNIBinDir and CNIConfDir are where containerd's CRI plugin looks for
// CNI plugins and network configs (containerd's defaults, and where
// flannel's DaemonSet writes its plugin and config).
const (
	CNIBinDir  = "/opt/cni/bin"
	CNIConfDir = "/etc/cni/net.d"
)

// ContainerdHostsDir is where an air-gapped node's containerd looks up
// registries (containerd's hosts.toml folders, config_path).
const ContainerdHostsDir = "/etc/containerd/certs.d"

// ContainerdConfigDir holds drop-in files that kiln's containerd
// configuration imports after its own settings (later files win): where a
// site, or a Butane snippet, changes containerd without replacing kiln's.
const ContainerdConfigDir = "/etc/containerd/conf.d"

// containerdConfig is kiln's containerd configuration, in config version
// 2, which containerd 1.7 reads and 2.x migrates on load. With sandbox
// (an air-gapped node) the CRI runs that pod sandbox image, the one the
// node imported, and looks registries up in ContainerdHostsDir only.
func containerdConfig(sandbox string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# Written by kiln: containerd for the kubelet.
version = 2
imports = [%q]

[plugins."io.containerd.grpc.v1.cri"]
enable_unprivileged_ports = true
enable_unprivileged_icmp = true
`, ContainerdConfigDir+"/*.toml")
	if sandbox != "" {
		fmt.Fprintf(&b, "# Imported from this node's payload (kubeadm's pause image).\nsandbox_image = %q\n", sandbox)
	}
	fmt.Fprintf(&b, `
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
# The kubelet's cgroupDriver is %s.
SystemdCgroup = %t

[plugins."io.containerd.grpc.v1.cri".cni]
bin_dir = %q
conf_dir = %q
`, KubeletCgroupDriver, KubeletCgroupDriver == "systemd", CNIBinDir, CNIConfDir)
	if sandbox != "" {
		fmt.Fprintf(&b, `
[plugins."io.containerd.grpc.v1.cri".registry]
config_path = %q
`, ContainerdHostsDir)
	}
	return b.String()
}

// noRegistryHosts is an air-gapped node's hosts.toml for every registry
// (containerd's _default folder): a pull of an image the payload did not
// bring goes to a host that cannot exist (.invalid, RFC 6761) and fails
// at once, naming it, instead of reaching out to a public registry.
const noRegistryHosts = `# Written by kiln: this node is air-gapped. Its images were imported from
# its payload; no registry is ever contacted.
server = "https://no-registry.invalid"
`

// kubeletUnit is the kubelet service for an OS without one; the
// environment variables are the ones kubeadm writes and expects.
func kubeletUnit(osp *profiles.OS) string {
	kubelet, _ := osp.Download("kubelet")
	return fmt.Sprintf(`[Unit]
Description=kubelet: the Kubernetes node agent
Wants=network-online.target containerd.service
After=network-online.target containerd.service

[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
ExecStart=%s $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
Restart=always
RestartSec=10s

[Install]
WantedBy=multi-user.target
`, kubelet.Path)
}
