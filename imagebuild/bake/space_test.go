package bake

import (
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// TestNoSpace: a bake that cannot fit is refused before it starts, and a
// full disk met later is named as such, whether Go or a tool hit it.
func TestNoSpace(t *testing.T) {
	s := space{dir: "/out", need: 300 << 20, free: 100 << 20}
	err := s.check()
	if fault.KindOf(err) != fault.IO || !strings.Contains(err.Error(), "no space left in /out: needs 200 MiB more") {
		t.Errorf("check: %v", err)
	}
	roomy := space{dir: "/out", need: 100 << 20, free: 300 << 20}
	if err := roomy.check(); err != nil {
		t.Errorf("check with room: %v", err)
	}
	for _, full := range []error{
		&os.PathError{Op: "write", Path: "/out/.kiln-work-1/out.img", Err: syscall.ENOSPC},
		errors.New("mkfs.btrfs: ERROR: failed to write: No space left on device"),
	} {
		if got := roomy.noSpace(full); !strings.Contains(got.Error(), "no space left in /out: needs 1 MiB more") || !errors.Is(got, full) && !strings.Contains(got.Error(), full.Error()) {
			t.Errorf("noSpace(%v) = %v", full, got)
		}
	}
	other := errors.New("debugfs: bad inode")
	if got := roomy.noSpace(other); got != other {
		t.Errorf("noSpace changed an unrelated error: %v", got)
	}
}
