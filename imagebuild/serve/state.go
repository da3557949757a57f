package serve

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"
	"unicode/utf8"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
	"github.com/kilnproject/kiln/imagebuild/atomicfile"
	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// The server's state files, under the bundle's pxe.StateDir. All are
// written whole and atomically, mode 0600 (they name the machines).
const (
	assignmentsFile = "assignments.json"
	reportsFile     = "reports.json"
	configsFile     = "configs.json"
	stateFormat     = 1
	// flushDelay is the longest a report waits before it is written:
	// agents report often, the disk is written at most this often.
	flushDelay = time.Second
)

// assignment is a pool entry given to a machine the inventory does not
// name.
type assignment struct {
	Node     string          `json:"node"`
	Role     nodeconfig.Role `json:"role"`
	Assigned time.Time       `json:"assigned"`
	// By is the address that asked for the machine's script.
	By string `json:"by,omitempty"`
	// ConfigFrom and ConfigAt are the address and time of the machine's
	// last config download, for role defaults: a report that names no
	// MAC (an offline-booted installer's) from that address after that
	// time is taken to be this machine's.
	ConfigFrom string    `json:"configFrom,omitempty"`
	ConfigAt   time.Time `json:"configAt,omitzero"`
}

type assignmentsJSON struct {
	Format      int                    `json:"format"`
	Assignments map[string]*assignment `json:"assignments"`
}

// record is the last report of one machine.
type record struct {
	Node string `json:"node"`
	// Host is the hostname the agent reported, From the address the
	// report came from.
	Host string `json:"host,omitempty"`
	From string `json:"from"`
	// MAC is the machine's, when its installer named it.
	MAC      string    `json:"mac,omitempty"`
	Received time.Time `json:"received"`
	// Retired is set once the machine reported installed or done: a
	// control plane's config is not served to it again.
	Retired bool              `json:"retired,omitempty"`
	Status  nodeconfig.Status `json:"status"`
}

type reportsJSON struct {
	Format  int       `json:"format"`
	Reports []*record `json:"reports"`
}

// Fetch is one delivery of an entry's config.
type Fetch struct {
	From string    `json:"from"`
	MAC  string    `json:"mac"`
	At   time.Time `json:"at"`
}

// maxFetches is how many of an entry's latest deliveries are kept.
const maxFetches = 16

// configLog is what the server knows of an entry's config deliveries.
type configLog struct {
	// Taken is the delivery that used up a key-carrying config's arming:
	// until the entry is re-armed, the config is not served again.
	Taken *Fetch `json:"taken,omitempty"`
	// Armed is when the operator last re-armed the entry.
	Armed time.Time `json:"armed,omitzero"`
	// Count counts deliveries; Last holds the latest, oldest first.
	Count int     `json:"count"`
	Last  []Fetch `json:"last"`
	// Refused counts the fetches answered 410 since the entry was last
	// armed; LastRefused is the latest.
	Refused     int    `json:"refused,omitempty"`
	LastRefused *Fetch `json:"lastRefused,omitempty"`
}

type configsJSON struct {
	Format  int                   `json:"format"`
	Configs map[string]*configLog `json:"configs"`
}

// reportKey tells machines apart: an inventory entry is one machine; a
// role default's machines by the hostname their agent reports, else the
// MAC their installer names, else their address.
func reportKey(n *pxe.Node, host, mac, from string) string {
	switch {
	case !n.Default:
		return n.Name
	case host != "":
		return n.Name + " host " + host
	case mac != "":
		return n.Name + " mac " + mac
	default:
		return n.Name + " from " + from
	}
}

func (s *Server) statePath(name string) string {
	return filepath.Join(s.dir, pxe.StateDir, name)
}

// readState decodes a state file; a missing one is empty.
func (s *Server) readState(name string, v any) error {
	p := s.statePath(name)
	data, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err == nil {
		err = json.Unmarshal(data, v)
	}
	if err != nil {
		return fault.Wrap(fault.Input, fmt.Errorf("%s: %w: repair or delete it (kiln serve then forgets what it held)", p, err))
	}
	return nil
}

// Caps on what unauthenticated machines can make the server remember: an
// assignment per unknown MAC (with --pool; at most MaxAssignmentsPerClient
// asked for from one address), and per role default a record per machine
// that reports on it, at most MaxReportsPerClient from one address
// (inventory entries have one record each).
// A record holds at most maxRecordText bytes of reported text, so the
// reports file stays under about 2 KiB per record.
const (
	MaxAssignments          = 4096
	MaxAssignmentsPerClient = 16
	MaxReports              = 2048
	MaxReportsPerClient     = 64
	maxRecordText           = 2 << 10
)

// errReportsFull answers a report that was not stored.
var errReportsFull = errors.New("report table full")

// load reads the state, keeping what still fits the manifest: a rebuilt
// bundle may have renamed nodes or given them MACs.
func (s *Server) load() error {
	var as assignmentsJSON
	var rs reportsJSON
	var cs configsJSON
	if err := errors.Join(s.readState(assignmentsFile, &as), s.readState(reportsFile, &rs), s.readState(configsFile, &cs)); err != nil {
		return err
	}
	s.assigned, s.reports, s.configs = map[string]*assignment{}, map[string]*record{}, map[string]*configLog{}
	for name, c := range cs.Configs {
		if _, ok := s.m.Node(name); ok && c != nil {
			s.configs[name] = c
		}
	}
	taken := map[string]bool{}
	for mac, a := range as.Assignments {
		n, ok := s.m.Node(a.Node)
		norm, err := pxe.NormalizeMAC(mac)
		_, inInventory := s.m.NodeByMAC(norm)
		if !ok || err != nil || inInventory || n.MAC != "" || n.Role != a.Role || (!n.Default && taken[n.Name]) {
			s.log.Printf("forgetting the assignment of %s to %s: the bundle no longer has it as a pool entry", mac, a.Node)
			continue
		}
		taken[n.Name] = true
		s.assigned[norm] = a
	}
	for _, r := range rs.Reports {
		n, ok := s.m.Node(r.Node)
		if !ok {
			s.log.Printf("forgetting the reports of %s: the bundle no longer has it", r.Node)
			continue
		}
		s.reports[reportKey(n, r.Host, r.MAC, r.From)] = r
	}
	return nil
}

// nodeFor finds the entry of a machine: by its MAC in the manifest, by an
// earlier assignment, or (with a pool) by assigning it the next free
// entry, saved before it is used; from is the address asking. s.mu is
// held.
func (s *Server) nodeFor(mac, from string) (*pxe.Node, *assignment, error) {
	if n, ok := s.m.NodeByMAC(mac); ok {
		return n, nil, nil
	}
	if a, ok := s.assigned[mac]; ok {
		n, _ := s.m.Node(a.Node)
		return n, a, nil
	}
	n := s.free()
	if n == nil {
		return nil, nil, nil
	}
	if len(s.assigned) >= MaxAssignments {
		return nil, nil, fmt.Errorf("%d machines are assigned already, the most kiln serve keeps: is something inventing MACs? Give real machines MACs in the cluster file", MaxAssignments)
	}
	by := 0
	for _, a := range s.assigned {
		if a.By == from {
			by++
		}
	}
	if by >= MaxAssignmentsPerClient {
		return nil, nil, fmt.Errorf("%s asked for %d machines already, the most one address gets: is it inventing MACs? Give real machines MACs in the cluster file", from, MaxAssignmentsPerClient)
	}
	a := &assignment{Node: n.Name, Role: n.Role, Assigned: time.Now().UTC(), By: from}
	s.assigned[mac] = a
	if err := s.saveAssignments(); err != nil {
		delete(s.assigned, mac)
		return nil, nil, err
	}
	s.log.Printf("assigned %s to %s (%s), asked for by %s", mac, n.Name, n.Role, from)
	return n, a, nil
}

// free is the next pool entry: an inventory node without a MAC, in the
// manifest's order, then a role default in the pool's order (init's only
// once, a control plane's only while armed). s.mu is held.
func (s *Server) free() *pxe.Node {
	used := map[string]bool{}
	for _, a := range s.assigned {
		used[a.Node] = true
	}
	for i := range s.m.Nodes {
		n := &s.m.Nodes[i]
		if !n.Default && n.MAC == "" && !used[n.Name] && slices.Contains(s.pool, n.Role) {
			return n
		}
	}
	for _, r := range s.pool {
		for i := range s.m.Nodes {
			n := &s.m.Nodes[i]
			if n.Default && n.Role == r && (r != nodeconfig.RoleInit || !used[n.Name]) && !s.spent(n) {
				return n
			}
		}
	}
	return nil
}

// spent reports whether a role default's config holds keys that were
// handed out since it was last armed: a machine given it now would only
// get 410, so the pool's next role is tried. s.mu is held.
func (s *Server) spent(n *pxe.Node) bool {
	c := s.configs[n.Name]
	return n.Role.IsControlPlane() && c != nil && c.Taken != nil
}

func (s *Server) saveAssignments() error {
	data, err := json.MarshalIndent(assignmentsJSON{Format: stateFormat, Assignments: s.assigned}, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(s.statePath(assignmentsFile), append(data, '\n'), 0o600, true)
}

// deliver notes a delivery of n's config to the machine with assignment
// a, and saves what must be on disk before it is sent: on a role default
// of an installer or a control plane, where and when its machine fetched
// it (a report that names no MAC is matched by that later; an fsync per
// such download, so a boot storm of them is serialized here), and a
// key-carrying config's used-up arming. If saving fails, the delivery is
// undone and nothing is used up. s.mu is held, and released on return.
func (s *Server) deliver(n *pxe.Node, a *assignment, f Fetch) error {
	var err error
	if n.Default && (n.Mode == pxe.ModeInstall || n.Role.IsControlPlane()) {
		from, at := a.ConfigFrom, a.ConfigAt
		a.ConfigFrom, a.ConfigAt = f.From, f.At
		if err = s.saveAssignments(); err != nil {
			a.ConfigFrom, a.ConfigAt = from, at
			s.mu.Unlock()
			return err
		}
	}
	fetch, snap := s.delivered(n, f)
	s.mu.Unlock()
	if err = s.writeConfigs(snap); err != nil {
		s.mu.Lock()
		s.undeliver(n, fetch)
		s.mu.Unlock()
	}
	return err
}

// taken returns the delivery that used up n's arming, if n's config holds
// cluster keys and was delivered (or the node installed or joined) since
// it was last armed. s.mu is held.
func (s *Server) taken(n *pxe.Node, mac string, a *assignment) (*Fetch, bool) {
	if !n.Role.IsControlPlane() {
		return nil, false
	}
	if c := s.configs[n.Name]; c != nil && c.Taken != nil {
		return c.Taken, true
	}
	return nil, s.retired(n, mac, a)
}

// delivered notes a delivery of n's config and returns it and the state
// to write before the config is sent, for a key-carrying config: its
// delivery uses up its arming (from now on every fetch gets 410). Other
// deliveries are written with the reports. s.mu is held.
func (s *Server) delivered(n *pxe.Node, f Fetch) (*Fetch, *configsSnapshot) {
	c := s.configLog(n.Name)
	c.Count++
	c.Last = append(c.Last, f)
	if len(c.Last) > maxFetches {
		c.Last = slices.Delete(c.Last, 0, len(c.Last)-maxFetches)
	}
	if !n.Role.IsControlPlane() {
		s.configsChanged(false)
		return nil, nil
	}
	c.Taken = &f
	return c.Taken, s.configsChanged(true)
}

// undeliver takes back a key-carrying delivery that could not be saved:
// its arming is not used up. s.mu is held.
func (s *Server) undeliver(n *pxe.Node, f *Fetch) {
	c := s.configs[n.Name]
	if c == nil || f == nil || c.Taken != f {
		return
	}
	c.Taken = nil
	c.Count--
	if i := slices.Index(c.Last, *f); i >= 0 {
		c.Last = slices.Delete(c.Last, i, i+1)
	}
	s.configsChanged(false)
}

// refusedDelivery counts a fetch of a config whose keys were handed out
// already, for kiln status; written with the reports. s.mu is held.
func (s *Server) refusedDelivery(n *pxe.Node, f Fetch) {
	c := s.configLog(n.Name)
	c.Refused++
	c.LastRefused = &f
	s.configsChanged(false)
}

func (s *Server) configLog(name string) *configLog {
	c := s.configs[name]
	if c == nil {
		c = &configLog{}
		s.configs[name] = c
	}
	return c
}

// Arm re-arms an entry: its config may be delivered once more, and the
// records of its machines that reported installed or done are cleared, so
// that such a machine boots its installer (install mode) or gets its
// config (live) again: an inventory node's record, and on a role default
// the records of the machine with mac (none without a MAC). It returns
// how many records it cleared once the change is on disk.
func (s *Server) Arm(name, mac string, now time.Time) (int, error) {
	n, ok := s.m.Node(name)
	if !ok {
		return 0, fault.Wrap(fault.Input, fmt.Errorf("the bundle has no node %q (kiln status lists them)", name))
	}
	if mac != "" {
		norm, err := pxe.NormalizeMAC(mac)
		if err != nil {
			return 0, fault.Wrap(fault.Input, fmt.Errorf("--mac: %w", err))
		}
		if mac = norm; !s.boundTo(n, mac) {
			return 0, fault.Wrap(fault.Input, fmt.Errorf("MAC %s is not %s's (kiln status shows the machines of each node)", mac, name))
		}
	}
	s.mu.Lock()
	c := s.configLog(n.Name)
	c.Taken, c.Armed, c.Refused, c.LastRefused = nil, now.UTC(), 0, nil
	cleared := 0
	a := s.assigned[mac]
	for _, r := range s.reports {
		if r.Node == n.Name && r.Retired && (!n.Default || mac != "" && machineOf(r, mac, a)) {
			r.Retired = false
			cleared++
		}
	}
	if cleared > 0 {
		s.dirty = true
	}
	snap := s.configsChanged(true)
	s.mu.Unlock()
	// Both are on disk before the answer: a restart must not bring back
	// a cleared record, which would keep the machine from its config.
	if err := errors.Join(s.writeConfigs(snap), s.Flush()); err != nil {
		return 0, fmt.Errorf("%s is re-armed until kiln serve stops, but the state could not be saved: %w", n.Name, err)
	}
	on := ""
	if mac != "" {
		on = " for " + mac
	}
	what := "its config holds no cluster keys (served on every boot)"
	if n.Role.IsControlPlane() {
		what = "its config may be fetched once more"
	}
	s.log.Printf("re-armed %s%s: %s; %d installed or joined machine(s) cleared", n.Name, on, what, cleared)
	return cleared, nil
}

// configsSnapshot is configs.json as of one change.
type configsSnapshot struct {
	data []byte
	seq  uint64
}

// configsChanged counts a change of s.configs and, if now, returns what to
// write; else it is written within flushDelay. s.mu is held.
func (s *Server) configsChanged(now bool) *configsSnapshot {
	s.configsSeq++
	if !now {
		s.schedule()
		return nil
	}
	return s.configsSnapshot()
}

// configsSnapshot encodes s.configs. s.mu is held.
func (s *Server) configsSnapshot() *configsSnapshot {
	data, err := json.MarshalIndent(configsJSON{Format: stateFormat, Configs: s.configs}, "", "  ")
	if err != nil {
		panic(err) // plain structs
	}
	return &configsSnapshot{data: append(data, '\n'), seq: s.configsSeq}
}

// writeConfigs writes a snapshot unless a newer one is on disk: writers
// run without s.mu, in any order.
func (s *Server) writeConfigs(snap *configsSnapshot) error {
	s.configsMu.Lock()
	defer s.configsMu.Unlock()
	if snap == nil || snap.seq <= s.configsWritten {
		return nil
	}
	if err := atomicfile.Write(s.statePath(configsFile), snap.data, 0o600, true); err != nil {
		return fmt.Errorf("save config deliveries: %w", err)
	}
	s.configsWritten = snap.seq
	return nil
}

// retired reports whether the machine with this MAC behind an entry (a is
// its assignment, nil for inventory MACs) reported installed or done. A
// role default's machine is found by the MAC its installer named, else by
// the address it fetched its config from. s.mu is held.
func (s *Server) retired(n *pxe.Node, mac string, a *assignment) bool {
	if !n.Default {
		r, ok := s.reports[n.Name]
		return ok && r.Retired
	}
	for _, r := range s.reports {
		if r.Retired && r.Node == n.Name && machineOf(r, mac, a) {
			return true
		}
	}
	return false
}

// machineOf reports whether a role default's record is of the machine
// with this MAC and assignment: by the MAC its installer named, else by
// the address it fetched its config from, reported from after that.
func machineOf(r *record, mac string, a *assignment) bool {
	if r.MAC != "" {
		return r.MAC == mac
	}
	return a != nil && a.ConfigFrom != "" && r.From == a.ConfigFrom && r.Received.After(a.ConfigAt)
}

// boundTo reports whether a machine's MAC belongs to an entry: its own, or
// assigned to it.
func (s *Server) boundTo(n *pxe.Node, mac string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.assigned[mac]
	return n.MAC == mac || a != nil && a.Node == n.Name
}

// record keeps a report and schedules writing it. mac is the MAC the
// report names (bound to n), if any. A role default's new machine may
// take the place of an older one that gates nothing (see makeRoom); when
// there is none, the report is refused with errReportsFull. Records of
// other entries are never touched.
func (s *Server) record(n *pxe.Node, st nodeconfig.Status, from, mac string, now time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	bound(&st)
	k := reportKey(n, st.Node, mac, from)
	r, ok := s.reports[k]
	if !ok {
		r = &record{Node: n.Name, MAC: mac}
		// The agent's first report, from where the installer reported,
		// continues that machine's record.
		if st.Node != "" {
			for old, prev := range s.reports {
				if prev.Node == n.Name && prev.Host == "" && prev.From == from {
					r.Retired, r.MAC = prev.Retired, prev.MAC
					delete(s.reports, old)
					break
				}
			}
		}
		if n.Default {
			if err := s.makeRoom(n, from); err != nil {
				s.logFrom(from, "refused a report for %s from %s: %v", n.Name, from, err)
				return errReportsFull
			}
		}
		s.reports[k] = r
	}
	if st.Node != "" {
		r.Host = st.Node
	}
	r.From, r.Received, r.Status = from, now.UTC(), st
	r.Retired = r.Retired || st.Phase == PhaseInstalled || st.Phase == PhaseDone
	s.schedule()
	return nil
}

// schedule writes the state within flushDelay. s.mu is held.
func (s *Server) schedule() {
	s.dirty = true
	if s.flushTimer == nil {
		s.flushTimer = time.AfterFunc(flushDelay, func() {
			if err := s.Flush(); err != nil {
				s.log.Printf("%v (retrying with the next report)", err)
			}
		})
	}
}

// gates reports whether a record decides what a machine is served: an
// installed or joined machine of a control-plane entry (its keys are not
// handed out again) or of an installer (it boots its disk). A live
// worker's "done" decides nothing: it boots from the network anyway.
func gates(n *pxe.Node, r *record) bool {
	return r.Retired && (n.Role.IsControlPlane() || n.Mode == pxe.ModeInstall)
}

// makeRoom makes room for one more record of role default n, from
// address from: one address holds at most MaxReportsPerClient of its
// records, all of them at most MaxReports. Past either, the oldest record
// there that gates nothing is dropped; if every one gates, there is no
// room. s.mu is held.
func (s *Server) makeRoom(n *pxe.Node, from string) error {
	count, byFrom := 0, 0
	oldest, oldestFrom := "", ""
	older := func(k, than string) bool { return than == "" || s.reports[k].Received.Before(s.reports[than].Received) }
	for k, r := range s.reports {
		if r.Node != n.Name {
			continue
		}
		count++
		if r.From == from {
			byFrom++
		}
		if gates(n, r) {
			continue
		}
		if older(k, oldest) {
			oldest = k
		}
		if r.From == from && older(k, oldestFrom) {
			oldestFrom = k
		}
	}
	drop := ""
	switch {
	case byFrom >= MaxReportsPerClient && oldestFrom == "":
		return fmt.Errorf("%d machines at %s reported installed or joined on %s, the most kiln serve keeps from one address (an invented flood? see kiln status)", byFrom, from, n.Name)
	case byFrom >= MaxReportsPerClient:
		drop = oldestFrom
	case count >= MaxReports && oldest == "":
		return fmt.Errorf("%d machines reported installed or joined on %s, the most kiln serve keeps (an invented flood? see kiln status)", count, n.Name)
	case count >= MaxReports:
		drop = oldest
	default:
		return nil
	}
	r := s.reports[drop]
	s.logFrom(from, "forgot the report of %s from %s (%s) on %s: room for a new machine", r.Host, r.From, r.Status.Phase, n.Name)
	delete(s.reports, drop)
	return nil
}

// bound cuts every text a report carries to maxRecordText bytes in all,
// at rune boundaries: a record's size does not depend on the reporter.
func bound(st *nodeconfig.Status) {
	left := maxRecordText
	for _, f := range []*string{&st.Node, &st.Role, &st.Cluster, &st.Phase, &st.State, &st.TokenTimeLeft, &st.CertificateUploadTimeLeft, &st.Waiting, &st.LastError} {
		if len(*f) > left {
			cut := left
			for cut > 0 && !utf8.RuneStart((*f)[cut]) {
				cut--
			}
			*f = (*f)[:cut]
		}
		left -= len(*f)
	}
}

// Flush writes the reports and the config deliveries now if they changed.
func (s *Server) Flush() error {
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	s.mu.Lock()
	if s.flushTimer != nil {
		s.flushTimer.Stop()
		s.flushTimer = nil
	}
	if !s.dirty {
		s.mu.Unlock()
		return nil
	}
	rs := reportsJSON{Format: stateFormat}
	for _, r := range s.reports {
		rs.Reports = append(rs.Reports, r)
	}
	slices.SortFunc(rs.Reports, compareRecords)
	data, err := json.MarshalIndent(rs, "", "  ")
	configs := s.configsSnapshot()
	s.dirty = false
	s.mu.Unlock()
	if err == nil {
		if err = atomicfile.Write(s.statePath(reportsFile), append(data, '\n'), 0o600, true); err != nil {
			err = fmt.Errorf("save reports: %w", err)
		}
		err = errors.Join(err, s.writeConfigs(configs))
	}
	if err != nil {
		s.mu.Lock()
		s.dirty = true
		s.mu.Unlock()
		return err
	}
	return nil
}

// Close writes what is not yet written. A Server used as a handler
// without Serve must be closed.
func (s *Server) Close() error {
	err := s.Flush()
	s.unlock()
	return err
}

func compareRecords(a, b *record) int {
	return cmp.Or(cmp.Compare(a.Node, b.Node), cmp.Compare(a.Host, b.Host), cmp.Compare(a.From, b.From))
}
