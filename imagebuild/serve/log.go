package serve

import (
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/kilnproject/kiln/imagebuild/pxe"
)

// logWriter notes a response's status and size for the access log.
type logWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (w *logWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *logWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

// ReadFrom keeps the kernel's file-to-socket copy (sendfile) that
// http.ServeContent reaches through the ResponseWriter.
func (w *logWriter) ReadFrom(r io.Reader) (int64, error) {
	var n int64
	var err error
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(w.ResponseWriter, r)
	}
	w.bytes += n
	return n, err
}

// Unwrap lets http.ResponseController reach the connection.
func (w *logWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *logWriter) code() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}

// redactor writes to w with every secret of the bundle (node tokens,
// report keys, the status token) replaced, in any letter case: wherever a
// request carries one, in its path, as another parameter's value or in an
// error about it, no log line holds it. Each Write must hold whole lines
// (a log.Logger writes one line per call).
type redactor struct {
	w       io.Writer
	secrets *regexp.Regexp
}

func newRedactor(w io.Writer, secrets []string) io.Writer {
	var quoted []string
	for _, s := range secrets {
		if s != "" {
			quoted = append(quoted, regexp.QuoteMeta(s))
		}
	}
	if len(quoted) == 0 {
		return w
	}
	return redactor{w: w, secrets: regexp.MustCompile("(?i)" + strings.Join(quoted, "|"))}
}

func (r redactor) Write(b []byte) (int, error) {
	if _, err := r.w.Write(r.secrets.ReplaceAll(b, []byte("REDACTED"))); err != nil {
		return 0, err
	}
	return len(b), nil
}

// loggedURI is the request's path and query with every query value but a
// MAC's replaced, so that a log also holds no secret kiln serve does not
// know of. An empty value stays empty: a missing token shows as missing.
func loggedURI(r *http.Request) string {
	s := r.URL.EscapedPath()
	if r.URL.RawQuery == "" {
		return s
	}
	parts := strings.Split(r.URL.RawQuery, "&")
	for i, p := range parts {
		k, v, hasValue := strings.Cut(p, "=")
		if _, err := pxe.NormalizeMAC(v); hasValue && v != "" && (k != "mac" || err != nil) {
			parts[i] = k + "=REDACTED"
		}
	}
	return s + "?" + strings.Join(parts, "&")
}

// Lines about what a client did (refusals, and what its reports
// displaced) are logged at most logBurst a minute per client address: a
// flood of bad requests cannot fill the server's log (the access log,
// which the operator asks for, still has every request).
const logBurst = 20

// clientLines counts the lines logged about each client address, per
// minute.
type clientLines struct {
	mu  sync.Mutex
	per map[string]*lineWindow
}

type lineWindow struct {
	start  time.Time
	logged int
}

// logFrom logs a line about a request from address from, unless logBurst
// were logged about that address this minute; the first line of the next
// minute says how many were not.
func (s *Server) logFrom(from, format string, args ...any) {
	cl := &s.clientLines
	now := time.Now()
	cl.mu.Lock()
	w := cl.per[from]
	if w == nil || now.Sub(w.start) >= time.Minute {
		if w != nil && w.logged > logBurst {
			s.log.Printf("%d more lines about requests from %s were not logged", w.logged-logBurst, from)
		}
		if cl.per == nil || len(cl.per) > 4096 {
			cl.per = map[string]*lineWindow{}
		}
		w = &lineWindow{start: now}
		cl.per[from] = w
	}
	w.logged++
	logged := w.logged
	cl.mu.Unlock()
	switch {
	case logged < logBurst:
		s.log.Printf(format, args...)
	case logged == logBurst:
		s.log.Printf(format+" (no more lines about this address this minute)", args...)
	}
}
