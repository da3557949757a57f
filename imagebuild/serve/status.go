package serve

import (
	"cmp"
	"slices"
	"time"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// Status is the answer at pxe.StatusPath: every entry of the bundle with
// the machines given it and their last reports.
type Status struct {
	Cluster string       `json:"cluster"`
	Time    time.Time    `json:"time"`
	Nodes   []NodeStatus `json:"nodes"`
}

// NodeStatus is one manifest entry.
type NodeStatus struct {
	Name    string          `json:"name"`
	Role    nodeconfig.Role `json:"role"`
	MAC     string          `json:"mac,omitempty"`
	Mode    string          `json:"mode"`
	Default bool            `json:"default,omitempty"`
	// Assigned lists the machines the pool gave this entry.
	Assigned []Assignment `json:"assigned,omitempty"`
	// Reports has one report per machine: an inventory entry has at most
	// one, a role default one per machine.
	Reports []Report `json:"reports,omitempty"`
	// Config is who fetched the entry's config, and when.
	Config ConfigStatus `json:"config"`
}

// ConfigStatus tells the deliveries of an entry's config.
type ConfigStatus struct {
	// HoldsKeys: an init or control-plane config, served once per arming.
	HoldsKeys bool `json:"holdsKeys,omitempty"`
	// Taken is the delivery that used up the arming (HoldsKeys only); a
	// config without it is armed unless the node installed or joined.
	Taken *Fetch `json:"taken,omitempty"`
	// Armed is when kiln rearm last re-armed the entry.
	Armed time.Time `json:"armed,omitzero"`
	// Fetches counts deliveries; Last lists the latest, oldest first.
	Fetches int     `json:"fetches"`
	Last    []Fetch `json:"last,omitempty"`
	// Refused counts fetches answered 410 since the last arming (a
	// machine asking for keys handed out already); LastRefused is the
	// latest.
	Refused     int    `json:"refused,omitempty"`
	LastRefused *Fetch `json:"lastRefused,omitempty"`
}

// Assignment is a machine the pool gave an entry.
type Assignment struct {
	MAC      string    `json:"mac"`
	Assigned time.Time `json:"assigned"`
}

// Report is a machine's last report.
type Report struct {
	// Host is the hostname the agent reported; From the address it
	// reported from.
	Host string `json:"host,omitempty"`
	From string `json:"from"`
	// MAC is the machine's, when its installer named it.
	MAC       string `json:"mac,omitempty"`
	Phase     string `json:"phase"`
	State     string `json:"state"`
	Attempt   int    `json:"attempt,omitempty"`
	LastError string `json:"lastError,omitempty"`
	Permanent bool   `json:"permanent,omitempty"`
	// LastReport is when the server received it.
	LastReport         time.Time `json:"lastReport"`
	SecondsSinceReport int64     `json:"secondsSinceReport"`
	// ConfigRetired: the machine reported installed or done, and a
	// control plane's config is no longer served to it.
	ConfigRetired bool `json:"configRetired,omitempty"`
}

func (s *Server) snapshot(now time.Time) Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	assigned := map[string][]Assignment{}
	for mac, a := range s.assigned {
		assigned[a.Node] = append(assigned[a.Node], Assignment{MAC: mac, Assigned: a.Assigned})
	}
	reports := map[string][]Report{}
	for _, r := range s.reports {
		n, _ := s.m.Node(r.Node) // records are only kept for the manifest's entries
		reports[r.Node] = append(reports[r.Node], Report{
			Host:               r.Host,
			From:               r.From,
			MAC:                r.MAC,
			Phase:              r.Status.Phase,
			State:              r.Status.State,
			Attempt:            r.Status.Attempt,
			LastError:          r.Status.LastError,
			Permanent:          r.Status.Permanent,
			LastReport:         r.Received,
			SecondsSinceReport: int64(now.Sub(r.Received) / time.Second),
			ConfigRetired:      r.Retired && n.Role.IsControlPlane(),
		})
	}
	st := Status{Cluster: s.m.Cluster, Time: now.UTC()}
	for _, n := range s.m.Nodes {
		as, rs := assigned[n.Name], reports[n.Name]
		slices.SortFunc(as, func(a, b Assignment) int { return cmp.Compare(a.MAC, b.MAC) })
		slices.SortFunc(rs, func(a, b Report) int { return cmp.Or(cmp.Compare(a.Host, b.Host), cmp.Compare(a.From, b.From)) })
		cs := ConfigStatus{HoldsKeys: n.Role.IsControlPlane()}
		if c := s.configs[n.Name]; c != nil {
			cs.Armed, cs.Fetches, cs.Last, cs.Refused = c.Armed, c.Count, slices.Clone(c.Last), c.Refused
			if c.Taken != nil {
				t := *c.Taken
				cs.Taken = &t
			}
			if c.LastRefused != nil {
				t := *c.LastRefused
				cs.LastRefused = &t
			}
		}
		st.Nodes = append(st.Nodes, NodeStatus{Name: n.Name, Role: n.Role, MAC: n.MAC, Mode: n.Mode, Default: n.Default, Assigned: as, Reports: rs, Config: cs})
	}
	return st
}
