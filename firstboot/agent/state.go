package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"time"
)

// Where the agent keeps its records on the node.
const (
	StateFile  = "/var/lib/kiln/state.json"
	StatusFile = "/run/kiln/status.json"
)

// State is what survives a reboot or power loss: which steps started and
// finished, and how the node bootstrapped.
type State struct {
	Steps map[string]StepRecord `json:"steps"`
	// Bootstrap is "init" once this node ran kubeadm init, "join" once it
	// joined (the init role joins when the cluster already exists).
	Bootstrap string `json:"bootstrap,omitempty"`
	// InitAt is when kubeadm init finished: the bootstrap token and the
	// certificate upload age from then.
	InitAt time.Time `json:"initAt,omitzero"`
	// UploadedAt is the last certificate upload.
	UploadedAt time.Time `json:"uploadedAt,omitzero"`
	// Hostname is the node name the agent chose from the hostname
	// template; later starts keep it even if the MAC it came from is no
	// longer the first one (interfaces can enumerate in another order).
	Hostname string `json:"hostname,omitempty"`
}

// StepRecord times one step. A step with Started but no Finished was
// interrupted.
type StepRecord struct {
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished,omitzero"`
}

func (s *State) finished(step string) bool { return !s.Steps[step].Finished.IsZero() }

func (s *State) interrupted(step string) bool {
	r, ok := s.Steps[step]
	return ok && r.Finished.IsZero()
}

func loadState(fsys FS) (*State, error) {
	data, err := fsys.ReadFile(StateFile)
	if errors.Is(err, fs.ErrNotExist) {
		return &State{Steps: map[string]StepRecord{}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state: %w", err)
	}
	var s State
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("read state %s: %w (delete it to start over)", StateFile, err)
	}
	if s.Steps == nil {
		s.Steps = map[string]StepRecord{}
	}
	return &s, nil
}

func (s *State) save(fsys FS) error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if err := fsys.MkdirAll(path.Dir(StateFile), 0o700); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err := fsys.Replace(StateFile, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	return nil
}
