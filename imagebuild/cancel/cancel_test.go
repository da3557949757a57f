package cancel

import (
	"context"
	"errors"
	"io"
	"testing"
)

// endless is a reader that never ends, like a huge image.
type endless struct{ reads int }

func (e *endless) Read(p []byte) (int, error) { e.reads++; return len(p), nil }

func TestReaderStopsACopy(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	src := &endless{}
	done := make(chan error)
	go func() {
		_, err := io.Copy(io.Discard, Reader(ctx, src))
		done <- err
	}()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("copy ended with %v, want context.Canceled", err)
	}
	n := src.reads
	if _, err := Reader(ctx, src).Read(make([]byte, 8)); !errors.Is(err, context.Canceled) || src.reads != n {
		t.Errorf("a read after the end: %v, %d reads more", err, src.reads-n)
	}
}
