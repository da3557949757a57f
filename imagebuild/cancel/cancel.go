// Package cancel makes long copies stop when their context ends: reads of
// a Reader fail with the context's error once it is done, so an io.Copy
// of gigabytes returns within one buffer of a Ctrl-C instead of running
// to its end.
package cancel

import (
	"context"
	"io"
)

// Reader returns r whose reads fail with ctx.Err() once ctx is done.
func Reader(ctx context.Context, r io.Reader) io.Reader { return reader{ctx, r} }

type reader struct {
	ctx context.Context
	r   io.Reader
}

func (c reader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
