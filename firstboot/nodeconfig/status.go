package nodeconfig

import "time"

// Status is the agent's progress: written to the node's status file and
// POSTed to the metadata's reportURL, where kiln serve reads it. The
// installer of a network-booted node POSTs {"phase":"installed"} to the
// same place.
type Status struct {
	Node    string `json:"node,omitempty"`
	Role    string `json:"role,omitempty"`
	Cluster string `json:"cluster,omitempty"`
	// Phase is the current step, or "done".
	Phase string `json:"phase"`
	// State is running, waiting, retrying, done or failed.
	State string `json:"state"`
	// Attempt counts kubeadm attempts in the current step.
	Attempt int `json:"attempt,omitempty"`
	// Waiting says what the current step waits for, when it waits.
	Waiting   string `json:"waiting,omitempty"`
	LastError string `json:"lastError,omitempty"`
	// Permanent marks a failure retrying cannot fix.
	Permanent bool `json:"permanent,omitempty"`
	// TokenTimeLeft and CertificateUploadTimeLeft count down the bootstrap
	// token's and the kubeadm-certs Secret's lifetimes (Go durations).
	TokenTimeLeft             string `json:"tokenTimeLeft,omitempty"`
	CertificateUploadTimeLeft string `json:"certificateUploadTimeLeft,omitempty"`
	// Estimated marks time-left values derived from the API server
	// certificate's age rather than from this node's own kubeadm init.
	Estimated bool      `json:"estimated,omitempty"`
	Updated   time.Time `json:"updated,omitzero"`
}
