// Package fault classifies builder errors so the CLI can map them to its
// stable exit codes without knowing every package's error types.
package fault

import "errors"

// Kind is what went wrong, from the user's point of view.
type Kind int

// The kinds. Unknown means a bug or an unexpected condition.
const (
	Unknown     Kind = iota
	Input            // bad cluster file, flag or secret: the user must fix it
	Unsupported      // valid, but kiln does not support it
	Environment      // something missing on this machine
	Download         // a download or base image failed or did not verify
	IO               // reading or writing local files failed
)

type kindError struct {
	kind Kind
	err  error
}

func (e *kindError) Error() string { return e.err.Error() }
func (e *kindError) Unwrap() error { return e.err }

// Wrap marks err as being of kind k. It returns nil for a nil err.
func Wrap(k Kind, err error) error {
	if err == nil {
		return nil
	}
	return &kindError{kind: k, err: err}
}

// KindOf returns the outermost kind marked on err, or Unknown.
func KindOf(err error) Kind {
	var ke *kindError
	if errors.As(err, &ke) {
		return ke.kind
	}
	return Unknown
}
