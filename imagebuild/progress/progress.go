// Package progress reports how far a long step is, on stderr, at most
// once a second: "download x.bin.bz2: 120.0 / 480.0 MiB (25%)".
package progress

import (
	"fmt"
	"io"
	"time"
)

// Meter counts bytes of a step; it is an io.Writer for io.TeeReader and
// io.MultiWriter.
type Meter struct {
	w     io.Writer
	label string
	total int64
	done  int64
	last  time.Time
}

// New starts a meter; total <= 0 means unknown.
func New(w io.Writer, label string, total int64) *Meter {
	return &Meter{w: w, label: label, total: total, last: time.Now()}
}

// Write counts len(b) bytes.
func (m *Meter) Write(b []byte) (int, error) {
	m.Add(int64(len(b)))
	return len(b), nil
}

// Add counts n bytes.
func (m *Meter) Add(n int64) {
	m.done += n
	if now := time.Now(); now.Sub(m.last) >= time.Second {
		m.last = now
		m.print()
	}
}

// Done prints the final count.
func (m *Meter) Done() { m.print() }

func (m *Meter) print() {
	const mib = 1 << 20
	if m.total > 0 {
		fmt.Fprintf(m.w, "%s: %.1f / %.1f MiB (%d%%)\n", m.label, float64(m.done)/mib, float64(m.total)/mib, m.done*100/m.total)
	} else {
		fmt.Fprintf(m.w, "%s: %.1f MiB\n", m.label, float64(m.done)/mib)
	}
}
