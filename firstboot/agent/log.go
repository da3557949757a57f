package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// logger writes progress lines to stderr, with every known secret
// replaced: kubeadm prints tokens and keys in some messages.
type logger struct {
	w       io.Writer
	hidden  []string
	secrets *strings.Replacer
}

const redacted = "[redacted]"

func newLogger(w io.Writer) *logger { return &logger{w: w, secrets: strings.NewReplacer()} }

// hide adds secrets to redact from now on. Longer secrets go first so a
// token is hidden whole, not just its secret half.
func (l *logger) hide(secrets ...string) {
	for _, s := range secrets {
		if s != "" && !slices.Contains(l.hidden, s) {
			l.hidden = append(l.hidden, s)
		}
	}
	slices.SortFunc(l.hidden, func(a, b string) int { return len(b) - len(a) })
	var pairs []string
	for _, s := range l.hidden {
		pairs = append(pairs, s, redacted)
	}
	l.secrets = strings.NewReplacer(pairs...)
}

func (l *logger) redact(s string) string { return l.secrets.Replace(s) }

func (l *logger) printf(format string, a ...any) {
	fmt.Fprintf(l.w, "kiln-firstboot: %s\n", l.redact(fmt.Sprintf(format, a...)))
}

// CommandError is a failed external command with its (redacted) output:
// Output ends with the cause and is cut to outputLimit for people, Full is
// all of it, for kubeadm.Classify (a cut could start inside text that the
// endpoint chose).
type CommandError struct {
	Command string
	Err     error
	Output  string
	Full    string
}

func (e *CommandError) Error() string {
	msg := fmt.Sprintf("%s: %v", e.Command, e.Err)
	if e.Output != "" {
		msg += "\n" + indent(e.Output)
	}
	return msg
}

func (e *CommandError) Unwrap() error { return e.Err }

// outputLimit keeps the tail of long outputs: kubeadm ends with the cause.
const outputLimit = 4000

// command runs one external command, logging it as started and finished or
// failed, and returns its stdout. Its output (stdout, then stderr) is kept,
// redacted, in the error.
func (r *run) command(ctx context.Context, name string, args ...string) (string, error) {
	line := r.log.redact(strings.Join(append([]string{name}, args...), " "))
	r.log.printf("run %s: started", line)
	ctx, cancel := context.WithTimeout(ctx, r.Timing.CommandTimeout)
	defer cancel()
	start := r.Clock.Now()
	stdout, stderr, err := r.Runner.Run(ctx, name, args...)
	took := r.Clock.Now().Sub(start).Round(time.Millisecond)
	if err != nil {
		text := r.log.redact(strings.TrimSpace(string(stdout) + "\n" + string(stderr)))
		if ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = fmt.Errorf("timed out after %s: %w", r.Timing.CommandTimeout, err)
		}
		r.log.printf("run %s: failed after %s: %v", line, took, err)
		full := text
		if len(text) > outputLimit {
			text = "…" + text[len(text)-outputLimit:]
		}
		return text, &CommandError{Command: line, Err: err, Output: text, Full: full}
	}
	r.log.printf("run %s: finished in %s", line, took)
	return string(stdout), nil
}

func indent(s string) string {
	return "  | " + strings.ReplaceAll(s, "\n", "\n  | ")
}
