package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/client-go/util/cert"
	"k8s.io/client-go/util/certificate/csr"
	"k8s.io/utils/ptr"
)

// Files the kubelet and kubeadm share.
const (
	kubeletConf   = "/etc/kubernetes/kubelet.conf"
	bootstrapConf = "/etc/kubernetes/bootstrap-kubelet.conf"
	kubeletPKI    = "/var/lib/kubelet/pki"
	currentPEM    = kubeletPKI + "/kubelet-client-current.pem"
)

// kubelet is the part of the kubelet kubeadm relies on: TLS bootstrap,
// the Node object (Ready, with a Lease) and mirror pods.
type kubelet struct {
	ip      string
	version string
	pods    *podManager

	confHash   string
	client     kubernetes.Interface
	node       string
	nodeUID    string
	lastStatus time.Time
}

func (k *kubelet) run(ctx context.Context) {
	for {
		if err := k.tick(ctx); err != nil {
			log.Printf("kubelet: %v", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

func hostname() string {
	b, _ := os.ReadFile("/proc/sys/kernel/hostname")
	return strings.ToLower(strings.TrimSpace(string(b)))
}

func (k *kubelet) tick(ctx context.Context) error {
	data, err := os.ReadFile(kubeletConf)
	if os.IsNotExist(err) {
		k.client, k.confHash = nil, ""
		if _, err := os.Stat(bootstrapConf); err == nil {
			return k.bootstrap(ctx)
		}
		return nil
	}
	if err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	if h := hex.EncodeToString(sum[:]); h != k.confHash || k.client == nil {
		if err := k.loadClient(); err != nil {
			return err
		}
		k.confHash = h
	}
	k.node = hostname()
	if err := k.syncNode(ctx); err != nil {
		return err
	}
	if err := k.syncLease(ctx); err != nil {
		return err
	}
	return k.syncMirrorPods(ctx)
}

// loadClient builds the node's client from kubelet.conf. A kubelet.conf
// with embedded credentials (kubeadm init writes one) is copied into the
// certificate store first, as the kubelet does at start.
func (k *kubelet) loadClient() error {
	cfg, err := clientcmd.LoadFromFile(kubeletConf)
	if err != nil {
		return err
	}
	if ctx := cfg.Contexts[cfg.CurrentContext]; ctx != nil {
		if a := cfg.AuthInfos[ctx.AuthInfo]; a != nil && len(a.ClientCertificateData) > 0 && len(a.ClientKeyData) > 0 {
			if _, err := os.Stat(currentPEM); os.IsNotExist(err) {
				if err := storeClientCert(a.ClientCertificateData, a.ClientKeyData); err != nil {
					return err
				}
			}
		}
	}
	cs, host, err := clientsetFor(cfg)
	if err != nil {
		return err
	}
	k.client = cs
	log.Printf("kubelet: using %s (server %s)", kubeletConf, host)
	return nil
}

// clientsetFor builds a client from a loaded kubeconfig, with the kubelet's
// request timeout; it also returns the server it talks to.
func clientsetFor(cfg *clientcmdapi.Config) (*kubernetes.Clientset, string, error) {
	rc, err := clientcmd.NewDefaultClientConfig(*cfg, nil).ClientConfig()
	if err != nil {
		return nil, "", err
	}
	rc.Timeout = 10 * time.Second
	cs, err := kubernetes.NewForConfig(rc)
	return cs, rc.Host, err
}

// storeClientCert writes kubelet-client-<time>.pem and points
// kubelet-client-current.pem at it.
func storeClientCert(certPEM, keyPEM []byte) error {
	if err := os.MkdirAll(kubeletPKI, 0o755); err != nil {
		return err
	}
	name := fmt.Sprintf("kubelet-client-%s.pem", time.Now().UTC().Format("2006-01-02-15-04-05"))
	data := append(append(append([]byte{}, certPEM...), '\n'), keyPEM...)
	if err := os.WriteFile(filepath.Join(kubeletPKI, name), data, 0o600); err != nil {
		return err
	}
	tmp := currentPEM + ".tmp"
	_ = os.Remove(tmp)
	if err := os.Symlink(filepath.Join(kubeletPKI, name), tmp); err != nil {
		return err
	}
	return os.Rename(tmp, currentPEM)
}

// bootstrap is the kubelet TLS bootstrap: a CSR for
// system:node:<hostname> in group system:nodes with the bootstrap token,
// approved and signed by the real controller manager.
func (k *kubelet) bootstrap(ctx context.Context) error {
	name := hostname()
	cfg, err := clientcmd.LoadFromFile(bootstrapConf)
	if err != nil {
		return err
	}
	cs, host, err := clientsetFor(cfg)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csrPEM, err := cert.MakeCSR(key, &pkix.Name{CommonName: "system:node:" + name, Organization: []string{"system:nodes"}}, nil, nil)
	if err != nil {
		return err
	}
	log.Printf("kubelet: TLS bootstrap of %s via %s", name, host)
	reqName, reqUID, err := csr.RequestCertificate(cs, csrPEM, "", certificatesv1.KubeAPIServerClientKubeletSignerName, nil,
		[]certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageClientAuth}, key)
	if err != nil {
		return fmt.Errorf("TLS bootstrap: request certificate: %w", err)
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	certPEM, err := csr.WaitForCertificate(wctx, cs, reqName, reqUID)
	if err != nil {
		return fmt.Errorf("TLS bootstrap: wait for %s: %w", reqName, err)
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := storeClientCert(bytes.TrimSpace(certPEM), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})); err != nil {
		return err
	}
	// kubelet.conf: the bootstrap file's cluster, the new certificate.
	bctx := cfg.Contexts[cfg.CurrentContext]
	if bctx == nil {
		return fmt.Errorf("%s has no current context", bootstrapConf)
	}
	cluster := cfg.Clusters[bctx.Cluster]
	if cluster == nil {
		return fmt.Errorf("%s has no cluster %q", bootstrapConf, bctx.Cluster)
	}
	out := clientcmdapi.NewConfig()
	out.Clusters["default-cluster"] = &clientcmdapi.Cluster{Server: cluster.Server, CertificateAuthorityData: cluster.CertificateAuthorityData, CertificateAuthority: cluster.CertificateAuthority}
	out.AuthInfos["default-auth"] = &clientcmdapi.AuthInfo{ClientCertificate: currentPEM, ClientKey: currentPEM}
	out.Contexts["default-context"] = &clientcmdapi.Context{Cluster: "default-cluster", AuthInfo: "default-auth", Namespace: "default"}
	out.CurrentContext = "default-context"
	body, err := clientcmd.Write(*out)
	if err != nil {
		return err
	}
	tmp := kubeletConf + ".tmp"
	if err := os.WriteFile(tmp, body, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, kubeletConf); err != nil {
		return err
	}
	log.Printf("kubelet: TLS bootstrap done: %s signed, %s written", reqName, kubeletConf)
	return nil
}

// syncNode registers the Node and reports it Ready every 10 s.
func (k *kubelet) syncNode(ctx context.Context) error {
	nodes := k.client.CoreV1().Nodes()
	n, err := nodes.Get(ctx, k.node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		n = &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name: k.node,
			Labels: map[string]string{
				"kubernetes.io/hostname": k.node,
				"kubernetes.io/os":       runtime.GOOS,
				"kubernetes.io/arch":     runtime.GOARCH,
			},
		}}
		if n, err = nodes.Create(ctx, n, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("register node %s: %w", k.node, err)
		}
		log.Printf("kubelet: registered node %s", k.node)
		k.lastStatus = time.Time{}
	} else if err != nil {
		return fmt.Errorf("get node %s: %w", k.node, err)
	}
	k.nodeUID = string(n.UID)
	if time.Since(k.lastStatus) < 10*time.Second && nodeReady(n) {
		return nil
	}
	now := metav1.Now()
	n.Status.Conditions = []corev1.NodeCondition{
		{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", Message: "rehearsal node emulator is posting ready status", LastHeartbeatTime: now, LastTransitionTime: transition(n, corev1.NodeReady, corev1.ConditionTrue, now)},
		{Type: corev1.NodeMemoryPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientMemory", LastHeartbeatTime: now, LastTransitionTime: transition(n, corev1.NodeMemoryPressure, corev1.ConditionFalse, now)},
		{Type: corev1.NodeDiskPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasNoDiskPressure", LastHeartbeatTime: now, LastTransitionTime: transition(n, corev1.NodeDiskPressure, corev1.ConditionFalse, now)},
		{Type: corev1.NodePIDPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientPID", LastHeartbeatTime: now, LastTransitionTime: transition(n, corev1.NodePIDPressure, corev1.ConditionFalse, now)},
	}
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: k.ip}, {Type: corev1.NodeHostName, Address: k.node}}
	n.Status.NodeInfo.KubeletVersion = k.version
	n.Status.NodeInfo.OperatingSystem = runtime.GOOS
	n.Status.NodeInfo.Architecture = runtime.GOARCH
	n.Status.NodeInfo.ContainerRuntimeVersion = "fake://0.1.0"
	n.Status.Capacity = corev1.ResourceList{}
	if _, err := nodes.UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update node %s status: %w", k.node, err)
	}
	k.lastStatus = time.Now()
	return nil
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func transition(n *corev1.Node, t corev1.NodeConditionType, s corev1.ConditionStatus, now metav1.Time) metav1.Time {
	for _, c := range n.Status.Conditions {
		if c.Type == t && c.Status == s && !c.LastTransitionTime.IsZero() {
			return c.LastTransitionTime
		}
	}
	return now
}

// syncLease renews the node's Lease in kube-node-lease.
func (k *kubelet) syncLease(ctx context.Context) error {
	leases := k.client.CoordinationV1().Leases("kube-node-lease")
	now := metav1.NewMicroTime(time.Now())
	l, err := leases.Get(ctx, k.node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: k.node, Namespace: "kube-node-lease", OwnerReferences: []metav1.OwnerReference{
				{APIVersion: "v1", Kind: "Node", Name: k.node, UID: typesUID(k.nodeUID)},
			}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(k.node), LeaseDurationSeconds: ptr.To[int32](40), RenewTime: &now},
		}
		_, err = leases.Create(ctx, l, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	if l.Spec.RenewTime != nil && time.Since(l.Spec.RenewTime.Time) < 10*time.Second {
		return nil
	}
	l.Spec.RenewTime = &now
	_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	return err
}

// syncMirrorPods mirrors the running static pods into the API, as the
// kubelet does: name <pod>-<node>, the manifest's annotations (kubeadm finds
// etcd's client URL there) plus kubernetes.io/config.mirror, bound to the
// node and owned by its Node object (the NodeRestriction admission plugin
// wants exactly that). Stale mirrors are deleted.
func (k *kubelet) syncMirrorPods(ctx context.Context) error {
	if k.nodeUID == "" {
		return nil
	}
	want := map[string]*staticPod{}
	for _, p := range k.pods.snapshot() {
		ns := p.pod.Namespace
		if ns == "" {
			ns = "default"
		}
		want[ns+"/"+p.pod.Name+"-"+k.node] = p
	}
	// The node authorizer denies GET of a missing pod: list this node's.
	list, err := k.client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + k.node})
	if err != nil {
		return fmt.Errorf("list mirror pods: %w", err)
	}
	have := map[string]*corev1.Pod{}
	for i := range list.Items {
		mp := &list.Items[i]
		if _, ok := mp.Annotations[corev1.MirrorPodAnnotationKey]; !ok {
			continue
		}
		key := mp.Namespace + "/" + mp.Name
		p := want[key]
		if p == nil || mp.Annotations[corev1.MirrorPodAnnotationKey] != p.hash {
			if err := k.client.CoreV1().Pods(mp.Namespace).Delete(ctx, mp.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("delete mirror pod %s: %w", key, err)
			}
			continue
		}
		have[key] = mp
	}
	for key, p := range want {
		mp := have[key]
		if mp == nil {
			mp = p.pod.DeepCopy()
			mp.Name = p.pod.Name + "-" + k.node
			if mp.Namespace == "" {
				mp.Namespace = "default"
			}
			if mp.Annotations == nil {
				mp.Annotations = map[string]string{}
			}
			mp.Annotations[corev1.MirrorPodAnnotationKey] = p.hash
			mp.Annotations["kubernetes.io/config.hash"] = p.hash
			mp.Annotations["kubernetes.io/config.source"] = "file"
			mp.Spec.NodeName = k.node
			mp.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: k.node, UID: typesUID(k.nodeUID), Controller: ptr.To(true)}}
			mp.Status = corev1.PodStatus{}
			if mp, err = k.client.CoreV1().Pods(mp.Namespace).Create(ctx, mp, metav1.CreateOptions{}); err != nil {
				if apierrors.IsAlreadyExists(err) {
					continue
				}
				return fmt.Errorf("create mirror pod %s: %w", key, err)
			}
			log.Printf("kubelet: created mirror pod %s", key)
		}
		if mp.Status.Phase == corev1.PodRunning {
			continue
		}
		started := metav1.NewTime(p.started)
		now := metav1.Now()
		mp.Status = corev1.PodStatus{
			Phase:     corev1.PodRunning,
			HostIP:    k.ip,
			HostIPs:   []corev1.HostIP{{IP: k.ip}},
			PodIP:     k.ip,
			PodIPs:    []corev1.PodIP{{IP: k.ip}},
			StartTime: &started,
			QOSClass:  corev1.PodQOSBurstable,
		}
		for _, t := range []corev1.PodConditionType{corev1.PodInitialized, corev1.PodReady, corev1.ContainersReady, corev1.PodScheduled} {
			mp.Status.Conditions = append(mp.Status.Conditions, corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now})
		}
		for _, c := range mp.Spec.Containers {
			mp.Status.ContainerStatuses = append(mp.Status.ContainerStatuses, corev1.ContainerStatus{
				Name: c.Name, Image: c.Image, ImageID: c.Image, Ready: true, Started: ptr.To(true),
				ContainerID: "fake://" + mp.Name,
				State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}},
			})
		}
		if _, err := k.client.CoreV1().Pods(mp.Namespace).UpdateStatus(ctx, mp, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) {
			return fmt.Errorf("update mirror pod %s status: %w", key, err)
		}
	}
	return nil
}
