package pxe

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// LockState takes the bundle's state lock (StateDir/lock): kiln serve
// holds it while it serves the bundle, and kiln pxe --force needs it to
// replace the bundle, so a rebuild never races a running server's state.
// The returned function releases it.
func LockState(dir string) (func(), error) {
	state := filepath.Join(dir, StateDir)
	if err := os.MkdirAll(state, 0o700); err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	f, err := os.OpenFile(filepath.Join(state, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fault.Wrap(fault.IO, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fault.Wrap(fault.Input, fmt.Errorf("%s is in use by a running kiln serve: stop it first (and start it again after kiln pxe --force)", dir))
		}
		return nil, fault.Wrap(fault.IO, fmt.Errorf("lock %s: %w", dir, err))
	}
	return func() { f.Close() }, nil
}
