package serve

import (
	"io"
	"net/http"
	"strings"
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

// loggedURI is the request's path and query with every query value but a
// MAC's replaced: tokens and report keys never reach a log.
func loggedURI(r *http.Request) string {
	s := r.URL.EscapedPath()
	if r.URL.RawQuery == "" {
		return s
	}
	parts := strings.Split(r.URL.RawQuery, "&")
	for i, p := range parts {
		k, v, hasValue := strings.Cut(p, "=")
		if hasValue && (k != "mac" || strings.Trim(v, "0123456789abcdefABCDEF:-") != "") {
			parts[i] = k + "=REDACTED"
		}
	}
	return s + "?" + strings.Join(parts, "&")
}
