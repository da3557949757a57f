package bake

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

// Runner runs an external tool and returns its standard output. The
// error carries the tool's output.
type Runner interface {
	Run(ctx context.Context, name string, args ...string) ([]byte, error)
}

// Exec runs tools from PATH.
type Exec struct{}

// Run runs name with args; mtools is told not to second-guess image
// geometry (MTOOLS_SKIP_CHECK).
func (Exec) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1", "LC_ALL=C")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		out := strings.TrimSpace(stderr.String() + "\n" + stdout.String())
		return stdout.Bytes(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return stdout.Bytes(), nil
}

// tool is an external program and the Debian package that has it.
type tool struct{ name, pkg string }

var (
	debugfs    = tool{"debugfs", "e2fsprogs"}
	e2fsck     = tool{"e2fsck", "e2fsprogs"}
	btrfs      = tool{"btrfs", "btrfs-progs"}
	mkfsBtrfs  = tool{"mkfs.btrfs", "btrfs-progs"}
	unshare    = tool{"unshare", "util-linux"}
	mcopy      = tool{"mcopy", "mtools"}
	fsckVfat   = tool{"fsck.vfat", "dosfstools"}
	ext4Tools  = []tool{debugfs, e2fsck}
	btrfsTools = []tool{btrfs, mkfsBtrfs}
	fatTools   = []tool{mcopy, fsckVfat}
)

// asRootOwner runs a tool that reads or sets file owners (btrfs restore
// -m, mkfs.btrfs --rootdir) so that the files it makes are root's: as
// root, as it is; as a normal user, in a user namespace of its own in
// which that user is root (unshare --map-root-user, util-linux). There
// the builder's files read as root's, so the filesystem it builds holds
// uid 0 and not the builder's. Files owned by anyone else cannot be
// restored there: a base image's OEM files are root's.
func asRootOwner(ctx context.Context, r Runner, name string, args ...string) ([]byte, error) {
	if os.Geteuid() == 0 {
		return r.Run(ctx, name, args...)
	}
	out, err := r.Run(ctx, unshare.name, append([]string{"--map-root-user", "--", name}, args...)...)
	if err != nil && strings.Contains(err.Error(), "unshare failed") {
		err = fault.Wrap(fault.Environment, fmt.Errorf("%w\nas a normal user kiln builds btrfs in a user namespace, which this system refuses: allow unprivileged user namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, or the container's seccomp profile), or run as root", err))
	}
	return out, err
}

// need checks that the tools are installed, naming the packages to
// install when they are not.
func need(tools ...tool) error {
	var missing, pkgs []string
	for _, t := range tools {
		if _, err := exec.LookPath(t.name); err != nil {
			missing = append(missing, t.name)
			if !strings.Contains(strings.Join(pkgs, " "), t.pkg) {
				pkgs = append(pkgs, t.pkg)
			}
		}
	}
	if len(missing) > 0 {
		return fault.Wrap(fault.Environment, fmt.Errorf("%s not found: install %s (Debian/Ubuntu: apt-get install %s)", strings.Join(missing, ", "), strings.Join(pkgs, " "), strings.Join(pkgs, " ")))
	}
	return nil
}
