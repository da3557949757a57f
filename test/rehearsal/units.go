package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// A real node's systemd, as far as the rehearsal's machines need one (PID 1
// here is not systemd). It reads the units the node really has, from the
// same places systemd does (/etc/systemd/system, then /usr/lib/systemd/
// system, each unit's .d/*.conf drop-ins), starts at boot the ones that are
// enabled (a .wants link or an Ignition preset), and honours the directives
// kiln's units and the OS's use: Environment, EnvironmentFile, ExecStart
// with $VAR and ${VAR}, Restart, RestartSec, RestartPreventExitStatus,
// ConditionPathExists, StartLimitBurst and StartLimitIntervalSec (5 starts
// in 10 s unless set; an interval of 0 means no limit). Times are divided
// by the
// rehearsal's time scale. The nodes' systemctl (shims.go) talks to it
// through controlSocket.

// controlSocket is where a machine's unit manager listens for systemctl.
const controlSocket = "/run/rehearsal/systemd.sock"

var unitDirs = []string{"/etc/systemd/system", "/usr/lib/systemd/system"}

// unitFile is the parsed, merged text of one unit and its drop-ins.
type unitFile struct {
	name       string
	env        []string // KEY=VALUE from Environment=
	envFiles   []string // EnvironmentFile=, "-" prefix kept
	execStart  []string // an empty ExecStart= resets the list
	restart    string
	restartSec time.Duration
	prevent    []int
	conditions []string // ConditionPathExists=
	burst      int
	interval   time.Duration // StartLimitIntervalSec; 0: no limit
}

// loadUnit reads a unit the way systemd merges it: the first unit file
// found in unitDirs, then every drop-in of every directory in name order.
// Only the node's own layers are read (nodeFiles): the test host's units
// and drop-ins lie beneath them in the merged /etc and /usr.
func loadUnit(name string) (*unitFile, error) {
	var files []string
	for _, d := range unitDirs {
		if fs := nodeFiles(filepath.Join(d, name)); len(fs) > 0 {
			files = fs[:1]
			break
		}
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("unit %s not found in %s", name, strings.Join(unitDirs, ", "))
	}
	seen := map[string]string{}
	for _, d := range slices.Backward(unitDirs) {
		for _, l := range slices.Backward(nodeLayers) {
			ms, _ := filepath.Glob(filepath.Join(l, d, name+".d", "*.conf"))
			for _, m := range ms {
				seen[filepath.Base(m)] = m // /etc overrides /usr/lib by name
			}
		}
	}
	var dropIns []string
	for _, p := range seen {
		dropIns = append(dropIns, p)
	}
	slices.SortFunc(dropIns, func(a, b string) int { return strings.Compare(filepath.Base(a), filepath.Base(b)) })
	u := &unitFile{name: name, restart: "no", restartSec: 100 * time.Millisecond, burst: 5, interval: 10 * time.Second}
	for _, f := range append(files, dropIns...) {
		if err := u.parse(f); err != nil {
			return nil, err
		}
	}
	switch len(u.execStart) {
	case 0:
		return nil, fmt.Errorf("unit %s has no ExecStart", name)
	case 1:
		return u, nil
	default: // systemd refuses it for any Type but oneshot
		return nil, fmt.Errorf("unit %s has %d ExecStart= lines (a drop-in must reset it with an empty ExecStart= first): %q", name, len(u.execStart), u.execStart)
	}
}

// nodeFiles lists where rel (an absolute path on the node) exists in the
// node's layers, top first.
func nodeFiles(rel string) []string {
	var out []string
	for _, l := range nodeLayers {
		if _, err := os.Stat(filepath.Join(l, rel)); err == nil {
			out = append(out, filepath.Join(l, rel))
		}
	}
	return out
}

func (u *unitFile) parse(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == ';' || line[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		k = strings.TrimSpace(k)
		switch k {
		case "Environment":
			u.env = append(u.env, splitQuoted(v)...)
		case "EnvironmentFile":
			u.envFiles = append(u.envFiles, v)
		case "ExecStart":
			if v == "" {
				u.execStart = nil
			} else {
				u.execStart = append(u.execStart, v)
			}
		case "Restart":
			u.restart = v
		case "RestartSec":
			d, err := systemdDuration(v)
			if err != nil {
				return fmt.Errorf("%s: RestartSec=%s: %w", path, v, err)
			}
			u.restartSec = d
		case "StartLimitIntervalSec", "StartLimitInterval":
			d, err := systemdDuration(v)
			if err != nil {
				return fmt.Errorf("%s: %s=%s: %w", path, k, v, err)
			}
			u.interval = d
		case "RestartPreventExitStatus":
			for _, f := range strings.Fields(v) {
				n, err := strconv.Atoi(f)
				if err != nil {
					return fmt.Errorf("%s: RestartPreventExitStatus=%s: %w", path, v, err)
				}
				u.prevent = append(u.prevent, n)
			}
		case "ConditionPathExists":
			u.conditions = append(u.conditions, v)
		case "StartLimitBurst":
			n, err := strconv.Atoi(v)
			if err != nil {
				return fmt.Errorf("%s: StartLimitBurst=%s: %w", path, v, err)
			}
			u.burst = n
		}
	}
	return nil
}

// systemdDuration reads a systemd time span: Go's units, a bare number is
// seconds.
func systemdDuration(v string) (time.Duration, error) {
	if n, err := strconv.Atoi(v); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	return time.ParseDuration(v)
}

// splitQuoted splits a systemd value into words, double quotes grouping.
func splitQuoted(s string) []string {
	var out []string
	var cur strings.Builder
	in, quoted := false, false
	for _, r := range s {
		switch {
		case r == '"':
			in, quoted = !in, true
		case (r == ' ' || r == '\t') && !in:
			if quoted || cur.Len() > 0 {
				out = append(out, cur.String())
			}
			cur.Reset()
			quoted = false
		default:
			cur.WriteRune(r)
		}
	}
	if quoted || cur.Len() > 0 {
		out = append(out, cur.String())
	}
	return out
}

// environment is the unit's environment: Environment= then every
// EnvironmentFile= (KEY=VALUE lines; a "-" prefix tolerates a missing file).
func (u *unitFile) environment() (map[string]string, error) {
	env := map[string]string{}
	for _, kv := range u.env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	for _, f := range u.envFiles {
		optional := strings.HasPrefix(f, "-")
		data, err := os.ReadFile(strings.TrimPrefix(f, "-"))
		if err != nil {
			if optional && errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, err
		}
		for _, line := range strings.Split(string(data), "\n") {
			line = strings.TrimSpace(line)
			if line == "" || line[0] == '#' {
				continue
			}
			if k, v, ok := strings.Cut(line, "="); ok {
				env[k] = strings.Trim(v, `"'`)
			}
		}
	}
	return env, nil
}

// command expands ExecStart as systemd does: a word that is exactly $VAR
// becomes the value's words (none when empty), ${VAR} is replaced in place.
func (u *unitFile) command(env map[string]string) []string {
	var out []string
	for _, w := range splitQuoted(u.execStart[0]) {
		if strings.HasPrefix(w, "$") && !strings.HasPrefix(w, "${") {
			out = append(out, strings.Fields(env[w[1:]])...)
			continue
		}
		out = append(out, os.Expand(w, func(k string) string { return env[k] }))
	}
	return out
}

// conditionsMet evaluates ConditionPathExists= (a "!" negates).
func (u *unitFile) conditionsMet() (bool, string) {
	for _, c := range u.conditions {
		neg := strings.HasPrefix(c, "!")
		_, err := os.Stat(strings.TrimPrefix(c, "!"))
		if exists := err == nil; exists == neg {
			return false, "ConditionPathExists=" + c
		}
	}
	return true, ""
}

// enabled says whether systemd would start the unit at boot: a link in a
// .wants folder of /etc/systemd/system, or an "enable" line in a preset
// file (Ignition writes presets when it applies a config to a root). Only
// the node's own layers count (nodeLayers): the test host's /etc and /usr
// lie beneath them, with the host's units.
func enabled(name string) bool {
	for _, l := range nodeLayers {
		if ms, _ := filepath.Glob(filepath.Join(l, "etc/systemd/system/*.wants", name)); len(ms) > 0 {
			return true
		}
		for _, d := range []string{"etc/systemd/system-preset", "usr/lib/systemd/system-preset"} {
			ms, _ := filepath.Glob(filepath.Join(l, d, "*.preset"))
			for _, m := range ms {
				data, _ := os.ReadFile(m)
				for _, line := range strings.Split(string(data), "\n") {
					if f := strings.Fields(line); len(f) == 2 && f[0] == "enable" && f[1] == name {
						return true
					}
				}
			}
		}
	}
	return false
}

// nodeLayers are the machine's own layers on the host (its disk and the
// OS layer, machine.go), set once at start.
var nodeLayers []string

// unitLog says where a unit's output goes on the host and where its exit
// codes are recorded ("" for nowhere).
type unitLog struct{ out, exits string }

// manager runs a machine's units.
type manager struct {
	scale  float64
	logs   func(unit string) unitLog
	extra  map[string]string // unit -> arguments appended to ExecStart
	mu     sync.Mutex
	active map[string]*runningUnit
}

type runningUnit struct {
	once sync.Once // closes stop
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	cmd  *exec.Cmd
}

// start starts a unit unless it runs (systemctl start).
func (m *manager) start(ctx context.Context, name string) error {
	u, err := loadUnit(name)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if r, ok := m.active[name]; ok {
		select {
		case <-r.done:
		default:
			return nil
		}
	}
	r := &runningUnit{stop: make(chan struct{}), done: make(chan struct{})}
	m.active[name] = r
	go m.supervise(ctx, u, r)
	return nil
}

// stopUnit stops a unit and waits for its process (systemctl stop).
func (m *manager) stopUnit(name string) {
	m.mu.Lock()
	r := m.active[name]
	m.mu.Unlock()
	if r == nil {
		return
	}
	defer func() {
		m.mu.Lock()
		if m.active[name] == r {
			delete(m.active, name)
		}
		m.mu.Unlock()
	}()
	r.once.Do(func() { close(r.stop) })
	r.mu.Lock()
	if r.cmd != nil && r.cmd.Process != nil {
		_ = r.cmd.Process.Signal(syscall.SIGTERM)
	}
	r.mu.Unlock()
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		r.mu.Lock()
		if r.cmd != nil && r.cmd.Process != nil {
			_ = r.cmd.Process.Kill()
		}
		r.mu.Unlock()
		<-r.done
	}
}

func (m *manager) isActive(name string) bool {
	m.mu.Lock()
	r := m.active[name]
	m.mu.Unlock()
	if r == nil {
		return false
	}
	select {
	case <-r.done:
		return false
	default:
		return true
	}
}

// supervise runs the unit's process and restarts it as its Restart= says,
// until stopped or the start limit is hit.
func (m *manager) supervise(ctx context.Context, u *unitFile, r *runningUnit) {
	defer close(r.done)
	lg := m.logs(u.name)
	var starts []time.Time
	for start := 1; ; start++ {
		now := time.Now()
		starts = append(starts, now)
		window := time.Duration(float64(u.interval) / m.scale)
		if u.interval > 0 && len(starts) > u.burst && now.Sub(starts[len(starts)-1-u.burst]) < window {
			log.Printf("%s: start limit hit (%d starts within %s)", u.name, u.burst, window)
			return
		}
		if ok, why := u.conditionsMet(); !ok {
			log.Printf("%s: skipped: %s", u.name, why)
			return
		}
		env, err := u.environment()
		if err != nil {
			log.Printf("%s: %v", u.name, err)
			return
		}
		argv := u.command(env)
		if x := m.extra[u.name]; x != "" {
			argv = append(argv, strings.Fields(x)...)
		}
		if len(argv) == 0 {
			log.Printf("%s: ExecStart expands to nothing", u.name)
			return
		}
		out, err := os.OpenFile(lg.out, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			log.Printf("%s: %v", u.name, err)
			return
		}
		fmt.Fprintf(out, "=== rehearsal: %s start %d at %s: %s\n", u.name, start, time.Now().UTC().Format(time.RFC3339Nano), strings.Join(argv, " "))
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Stdout, cmd.Stderr, cmd.Dir = out, out, "/"
		cmd.Env = os.Environ()
		for k, v := range env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		r.mu.Lock()
		select {
		case <-r.stop: // stopped while this start was being prepared
			r.mu.Unlock()
			out.Close()
			return
		default:
		}
		err = cmd.Start()
		r.cmd = cmd
		r.mu.Unlock()
		if err != nil {
			fmt.Fprintf(out, "=== rehearsal: %s: %v\n", u.name, err)
			out.Close()
			return
		}
		werr := cmd.Wait()
		out.Close()
		code := 0
		var ee *exec.ExitError
		if errors.As(werr, &ee) {
			code = ee.ExitCode()
		} else if werr != nil {
			code = -1
		}
		if lg.exits != "" {
			if f, err := os.OpenFile(lg.exits, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
				fmt.Fprintf(f, "%d\n", code)
				f.Close()
			}
		}
		log.Printf("%s exited with %d", u.name, code)
		select {
		case <-r.stop:
			return
		case <-ctx.Done():
			return
		default:
		}
		switch {
		case u.restart == "always":
		case u.restart == "on-failure" && code != 0 && !slices.Contains(u.prevent, code):
		default:
			return
		}
		select {
		case <-r.stop:
			return
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(float64(u.restartSec) / m.scale)):
		}
	}
}

// serveControl answers the nodes' systemctl: one request per connection,
// the arguments NUL-separated; the reply is the exit code, a newline and
// what systemctl would print.
func (m *manager) serveControl(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(controlSocket), 0o755); err != nil {
		return err
	}
	_ = os.Remove(controlSocket)
	l, err := net.Listen("unix", controlSocket)
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); l.Close() }()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				code, out := m.systemctl(ctx, strings.Split(strings.TrimSuffix(req, "\n"), "\x00"))
				fmt.Fprintf(c, "%d\n%s", code, out)
			}()
		}
	}()
	return nil
}

// systemctl does what systemctl would for the verbs kubeadm and the agent
// use; units the node does not have are inactive and disabled.
func (m *manager) systemctl(ctx context.Context, args []string) (int, string) {
	verb, units := systemctlArgs(args)
	log.Printf("systemctl %s", strings.Join(args, " "))
	var out strings.Builder
	code := 0
	for _, u := range units {
		switch verb {
		case "is-active":
			if m.isActive(u) {
				out.WriteString("active\n")
			} else {
				out.WriteString("inactive\n")
				code = 3
			}
		case "is-enabled":
			if enabled(u) {
				out.WriteString("enabled\n")
			} else {
				out.WriteString("disabled\n")
				code = 1
			}
		case "start":
			if err := m.start(ctx, u); err != nil {
				fmt.Fprintf(&out, "Failed to start %s: %v\n", u, err)
				code = 5
			}
		case "restart":
			m.stopUnit(u)
			if err := m.start(ctx, u); err != nil {
				fmt.Fprintf(&out, "Failed to restart %s: %v\n", u, err)
				code = 5
			}
		case "stop":
			m.stopUnit(u)
		case "enable", "disable", "daemon-reload", "mask", "unmask":
			// Units are read at every start, and enablement at boot
			// comes from the node's files.
		default:
			fmt.Fprintf(&out, "rehearsal systemctl: verb %q not emulated\n", verb)
			code = 1
		}
	}
	return code, out.String()
}

// systemctlArgs splits systemctl's arguments into the verb and the units
// (options dropped; a bare NAME is NAME.service, as systemctl reads it).
func systemctlArgs(args []string) (verb string, units []string) {
	for _, a := range args {
		switch {
		case strings.HasPrefix(a, "-"):
		case verb == "":
			verb = a
		default:
			if !strings.Contains(a, ".") {
				a += ".service"
			}
			units = append(units, a)
		}
	}
	return verb, units
}
