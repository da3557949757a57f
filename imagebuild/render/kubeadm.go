package render

import (
	"bytes"
	"fmt"
	"path"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/cluster"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/manifests"
	"github.com/kilnproject/kiln/profiles"
)

// Where kiln's files land on a node.
const (
	KilnDir         = "/etc/kiln"
	InitConfigPath  = KilnDir + "/kubeadm-init.yaml"
	JoinConfigPath  = KilnDir + "/kubeadm-join.yaml"
	PKIPath         = KilnDir + "/pki"
	PatchesPath     = KilnDir + "/kubeadm-patches"
	CertificatesDir = "/etc/kubernetes/pki"
	kubeadmAPI      = "kubeadm.k8s.io/v1beta4"
)

// The subset of kubeadm's v1beta4 API that kiln writes. Field names and
// shapes follow kubeadm.k8s.io/v1beta4; the real kubeadm validates the
// result in kiln's oracle tests.
type (
	typeMeta struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
	}
	arg struct {
		Name  string `yaml:"name"`
		Value string `yaml:"value"`
	}
	nodeRegistration struct {
		CRISocket             string   `yaml:"criSocket"`
		KubeletExtraArgs      []arg    `yaml:"kubeletExtraArgs,omitempty"`
		IgnorePreflightErrors []string `yaml:"ignorePreflightErrors,omitempty"`
	}
	patches struct {
		Directory string `yaml:"directory"`
	}
	bootstrapToken struct {
		Token  string   `yaml:"token"`
		TTL    string   `yaml:"ttl"`
		Usages []string `yaml:"usages"`
		Groups []string `yaml:"groups"`
	}
	apiEndpoint struct {
		AdvertiseAddress string `yaml:"advertiseAddress,omitempty"`
		BindPort         int    `yaml:"bindPort,omitempty"`
	}
	initConfiguration struct {
		typeMeta         `yaml:",inline"`
		BootstrapTokens  []bootstrapToken `yaml:"bootstrapTokens"`
		CertificateKey   string           `yaml:"certificateKey"`
		LocalAPIEndpoint *apiEndpoint     `yaml:"localAPIEndpoint,omitempty"`
		NodeRegistration nodeRegistration `yaml:"nodeRegistration"`
		Patches          *patches         `yaml:"patches,omitempty"`
	}
	component struct {
		ExtraArgs []arg `yaml:"extraArgs,omitempty"`
	}
	clusterConfiguration struct {
		typeMeta             `yaml:",inline"`
		ClusterName          string    `yaml:"clusterName"`
		KubernetesVersion    string    `yaml:"kubernetesVersion"`
		ControlPlaneEndpoint string    `yaml:"controlPlaneEndpoint"`
		CertificatesDir      string    `yaml:"certificatesDir"`
		Networking           network   `yaml:"networking"`
		ControllerManager    component `yaml:"controllerManager"`
		Etcd                 *etcd     `yaml:"etcd,omitempty"`
		DNS                  *imageTag `yaml:"dns,omitempty"`
	}
	etcd struct {
		Local imageTag `yaml:"local"`
	}
	imageTag struct {
		ImageTag string `yaml:"imageTag"`
	}
	network struct {
		PodSubnet     string `yaml:"podSubnet"`
		ServiceSubnet string `yaml:"serviceSubnet"`
		DNSDomain     string `yaml:"dnsDomain"`
	}
	kubeletConfiguration struct {
		typeMeta     `yaml:",inline"`
		CgroupDriver string `yaml:"cgroupDriver"`
	}
	joinConfiguration struct {
		typeMeta         `yaml:",inline"`
		Discovery        discovery         `yaml:"discovery"`
		NodeRegistration nodeRegistration  `yaml:"nodeRegistration"`
		ControlPlane     *joinControlPlane `yaml:"controlPlane,omitempty"`
		Patches          *patches          `yaml:"patches,omitempty"`
	}
	discovery struct {
		BootstrapToken discoveryToken `yaml:"bootstrapToken"`
	}
	discoveryToken struct {
		APIServerEndpoint string   `yaml:"apiServerEndpoint"`
		Token             string   `yaml:"token"`
		CACertHashes      []string `yaml:"caCertHashes"`
	}
	joinControlPlane struct {
		CertificateKey   string       `yaml:"certificateKey"`
		LocalAPIEndpoint *apiEndpoint `yaml:"localAPIEndpoint,omitempty"`
	}
)

// KubeadmFiles are the kubeadm files one role gets, by path on the node.
type KubeadmFiles map[string][]byte

// Paths returns the file paths in a stable order.
func (k KubeadmFiles) Paths() []string {
	out := make([]string, 0, len(k))
	for p := range k {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// Kubeadm renders the kubeadm configuration files and patches for a role.
func Kubeadm(in Input) (KubeadmFiles, error) {
	if err := in.check(); err != nil {
		return nil, err
	}
	c, s := in.Cluster, in.Secrets
	osp, err := profiles.LookupOS(c.OS.Name)
	if err != nil {
		return nil, err
	}
	out := KubeadmFiles{}
	var patch *patches
	for name, body := range rolePatches(c, in.Role) {
		out[path.Join(PatchesPath, name)] = body
		patch = &patches{Directory: PatchesPath}
	}
	reg := nodeRegistration{
		CRISocket:             osp.CRISocket,
		KubeletExtraArgs:      []arg{{Name: "volume-plugin-dir", Value: osp.VolumePluginDir}},
		IgnorePreflightErrors: c.Kubernetes.IgnorePreflightErrors,
	}
	join := joinConfiguration{
		typeMeta: typeMeta{kubeadmAPI, "JoinConfiguration"},
		Discovery: discovery{BootstrapToken: discoveryToken{
			APIServerEndpoint: c.ControlPlaneEndpoint,
			Token:             s.Token,
			CACertHashes:      []string{s.CACertHash()},
		}},
		NodeRegistration: reg,
		Patches:          patch,
	}
	// An inventory node's address is its kubelet's node IP and, on a
	// control plane, its API server's advertise address (kubeadm's
	// default is the address of the default route's interface, which on
	// a machine with several networks may be another).
	var bind *apiEndpoint
	if p := c.LoadBalancer.APIServerPort; p != cluster.DefaultAPIServerPort {
		bind = &apiEndpoint{BindPort: p}
	}
	if n, ok := c.InventoryNode(in.NodeName); ok && in.NodeName != "" && n.Address().IsValid() {
		addr := n.Address().String()
		reg.KubeletExtraArgs = append(reg.KubeletExtraArgs, arg{Name: "node-ip", Value: addr})
		join.NodeRegistration = reg
		if bind == nil {
			bind = &apiEndpoint{}
		}
		bind.AdvertiseAddress = addr
	}
	if in.Role.IsControlPlane() {
		join.ControlPlane = &joinControlPlane{CertificateKey: s.CertificateKey, LocalAPIEndpoint: bind}
	}
	if out[JoinConfigPath], err = encodeDocs(join); err != nil {
		return nil, err
	}
	if in.Role != nodeconfig.RoleInit {
		return out, nil
	}
	k := c.Kubernetes
	initCfg := initConfiguration{
		typeMeta: typeMeta{kubeadmAPI, "InitConfiguration"},
		BootstrapTokens: []bootstrapToken{{
			Token:  s.Token,
			TTL:    k.TokenTTL.String(),
			Usages: []string{"signing", "authentication"},
			Groups: []string{"system:bootstrappers:kubeadm:default-node-token"},
		}},
		CertificateKey:   s.CertificateKey,
		LocalAPIEndpoint: bind,
		NodeRegistration: reg,
		Patches:          patch,
	}
	clusterCfg := clusterConfiguration{
		typeMeta:             typeMeta{kubeadmAPI, "ClusterConfiguration"},
		ClusterName:          c.Name,
		KubernetesVersion:    k.Version,
		ControlPlaneEndpoint: c.ControlPlaneEndpoint,
		CertificatesDir:      CertificatesDir,
		Networking:           network{PodSubnet: k.PodSubnet, ServiceSubnet: k.ServiceSubnet, DNSDomain: k.DNSDomain},
		ControllerManager:    component{ExtraArgs: []arg{{Name: "flex-volume-plugin-dir", Value: osp.VolumePluginDir}}},
	}
	if c.Airgap {
		// The archive holds the etcd and CoreDNS tags of kiln's table
		// (manifests/kubeadm-images.yaml); a kubeadm of another patch
		// release may default to others, so name them. (kubeadm upgrade
		// then keeps them until the config says otherwise.)
		tags := map[string]string{}
		list, err := manifests.KubeadmImages(k.Version)
		if err != nil {
			return nil, fault.Wrap(fault.Input, err)
		}
		for _, im := range list {
			tags[im.Name] = im.Reference[strings.LastIndex(im.Reference, ":")+1:]
		}
		clusterCfg.Etcd = &etcd{Local: imageTag{tags["etcd"]}}
		clusterCfg.DNS = &imageTag{tags["coredns"]}
	}
	kubelet := kubeletConfiguration{
		typeMeta:     typeMeta{"kubelet.config.k8s.io/v1beta1", "KubeletConfiguration"},
		CgroupDriver: KubeletCgroupDriver,
	}
	if out[InitConfigPath], err = encodeDocs(initCfg, clusterCfg, kubelet); err != nil {
		return nil, err
	}
	return out, nil
}

// rolePatches returns the kubeadm patch files for a role, named
// target + ordering suffix + "+" + type, as kubeadm's patches directory
// expects.
func rolePatches(c *cluster.Cluster, role nodeconfig.Role) map[string][]byte {
	out := map[string][]byte{}
	for i, p := range c.KubeadmPatches {
		if len(p.Roles) > 0 && !slices.Contains(p.Roles, role) {
			continue
		}
		out[fmt.Sprintf("%s%02d+%s.yaml", p.Target, i, p.Type)] = []byte(p.Patch)
	}
	return out
}

func encodeDocs(docs ...any) ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	for _, d := range docs {
		if err := enc.Encode(d); err != nil {
			return nil, fmt.Errorf("encode kubeadm config: %w", err)
		}
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
