package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// What only real nodes can show: the pod network, cluster DNS and Service
// routing work.

// probeAddon is the real nodes' add-on besides rehearsalAddon: a probe
// server (a Deployment, on a worker: control planes are tainted) behind a
// ClusterIP Service. Being in an add-on, its image is in kiln's image
// list and so in every node's air-gapped payload.
const probeAddon = `apiVersion: apps/v1
kind: Deployment
metadata:
  name: probe
  namespace: kiln-rehearsal
  labels:
    app: probe
spec:
  replicas: 1
  selector:
    matchLabels:
      app: probe
  template:
    metadata:
      labels:
        app: probe
    spec:
      containers:
        - name: probe
          image: ` + probeImageRef + `
          args: [serve, --listen, ":8080"]
          env:
            - name: NODE_NAME
              valueFrom:
                fieldRef:
                  fieldPath: spec.nodeName
          ports:
            - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: probe
  namespace: kiln-rehearsal
spec:
  selector:
    app: probe
  ports:
    - port: 80
      targetPort: 8080
`

// podNetworkUp says what is missing before the pod network counts as up:
// a Running and Ready flannel pod on each of nodes Nodes, and a Running,
// Ready CoreDNS pod.
func podNetworkUp(ctx context.Context, cs kubernetes.Interface, nodes int) (bool, string) {
	fl, err := cs.CoreV1().Pods("kube-flannel").List(ctx, metav1.ListOptions{})
	if err != nil {
		return false, "list flannel pods: " + err.Error()
	}
	on := map[string]bool{}
	for _, p := range fl.Items {
		if podReady(&p) {
			on[p.Spec.NodeName] = true
		}
	}
	dns, err := cs.CoreV1().Pods("kube-system").List(ctx, metav1.ListOptions{LabelSelector: "k8s-app=kube-dns"})
	if err != nil {
		return false, "list CoreDNS pods: " + err.Error()
	}
	ready := 0
	for _, p := range dns.Items {
		if podReady(&p) {
			ready++
		}
	}
	if len(on) < nodes || ready == 0 {
		return false, fmt.Sprintf("flannel Ready on %d of %d nodes, %d CoreDNS pods Ready", len(on), nodes, ready)
	}
	return true, ""
}

func podReady(p *corev1.Pod) bool {
	if p.Status.Phase != corev1.PodRunning {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// expectServiceAcrossNodes runs a probe client on another worker than the
// probe server's: it resolves the Service's name through CoreDNS (its
// resolv.conf names the cluster DNS Service) and GETs it through the
// ClusterIP (kube-proxy's rules), which flannel carries to the server's
// node. The answer must name the server's node.
func (e *env) expectServiceAcrossNodes(ctx context.Context, cs kubernetes.Interface) error {
	const ns = "kiln-rehearsal"
	var server *corev1.Pod
	err := e.waitUntil(ctx, "the probe server", func(ctx context.Context) (bool, string) {
		list, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=probe"})
		if err != nil {
			return false, err.Error()
		}
		for i := range list.Items {
			if podReady(&list.Items[i]) {
				server = &list.Items[i]
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d probe pods, none Ready", len(list.Items))
	})
	if err != nil {
		return err
	}
	nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	client := ""
	for _, n := range nodes.Items {
		if _, cp := n.Labels["node-role.kubernetes.io/control-plane"]; !cp && n.Name != server.Spec.NodeName {
			client = n.Name
			break
		}
	}
	if client == "" {
		return fmt.Errorf("no worker besides %s for the probe client", server.Spec.NodeName)
	}
	url := "http://probe." + ns + ".svc.cluster.local/"
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "probe-client", Namespace: ns},
		Spec: corev1.PodSpec{
			NodeName:      client,
			RestartPolicy: corev1.RestartPolicyNever,
			Containers: []corev1.Container{{
				Name:            "get",
				Image:           probeImageRef,
				ImagePullPolicy: corev1.PullNever,
				Args:            []string{"get", "--timeout", "60s", url},
			}},
		},
	}
	if err := cs.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	start := time.Now()
	if _, err := cs.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create the probe client: %w", err)
	}
	var phase corev1.PodPhase
	err = e.waitUntil(ctx, "the probe client on "+client, func(ctx context.Context) (bool, string) {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		phase = p.Status.Phase
		return phase == corev1.PodSucceeded || phase == corev1.PodFailed, string(phase)
	})
	if err != nil {
		return err
	}
	out, lerr := cs.CoreV1().Pods(ns).GetLogs(pod.Name, &corev1.PodLogOptions{}).DoRaw(ctx)
	if phase != corev1.PodSucceeded {
		return fmt.Errorf("probe client on %s: GET %s failed: %s (logs: %v)", client, url, strings.TrimSpace(string(out)), lerr)
	}
	if lerr != nil {
		return fmt.Errorf("probe client logs: %w", lerr)
	}
	if !strings.Contains(string(out), "node="+server.Spec.NodeName) {
		return fmt.Errorf("probe client on %s: GET %s answered %q, want the server on %s", client, url, out, server.Spec.NodeName)
	}
	e.logf("from a pod on %s, %s resolved through CoreDNS and its ClusterIP answered from %s (%s) in %s",
		client, url, server.Name, server.Spec.NodeName, time.Since(start).Round(100*time.Millisecond))
	return nil
}

// expectReported checks that kiln serve (GET /status, what `kiln status`
// prints) holds a done/done report from every node's own address: the
// agents report to a real receiver, as PXE nodes do in the field.
func (e *env) expectReported(nodes []nodeSpec) error {
	body, err := e.serve.status()
	if err != nil {
		return fmt.Errorf("kiln serve /status: %w", err)
	}
	var st struct {
		Nodes []struct {
			Name    string `json:"name"`
			Reports []struct {
				From  string `json:"from"`
				Phase string `json:"phase"`
				State string `json:"state"`
			} `json:"reports"`
		} `json:"nodes"`
	}
	if err := json.Unmarshal(body, &st); err != nil {
		return fmt.Errorf("kiln serve /status: %w", err)
	}
	var missing []string
	for _, n := range nodes {
		done := false
		for _, ns := range st.Nodes {
			for _, r := range ns.Reports {
				done = done || (r.From == n.ip() && r.Phase == "done" && r.State == "done")
			}
		}
		if !done {
			missing = append(missing, n.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("kiln serve has no done report from %s: %s", strings.Join(missing, ", "), body)
	}
	e.logf("kiln serve holds a done report from each of the %d nodes", len(nodes))
	return nil
}
