// Package agentbin embeds the kiln-firstboot binaries that kiln puts into
// every node's config. `make build` compiles them (static, linux/amd64 and
// linux/arm64, gzip-compressed) into bin/ before building kiln.
package agentbin

import (
	"embed"
	"fmt"
	"io/fs"

	"github.com/kilnproject/kiln/imagebuild/fault"
)

//go:embed all:bin
var files embed.FS

// Name is the file name of the compressed agent for an arch.
func Name(arch string) string { return "kiln-firstboot-linux-" + arch + ".gz" }

// Gzipped returns the gzip-compressed agent binary for arch.
func Gzipped(arch string) ([]byte, error) {
	data, err := fs.ReadFile(files, "bin/"+Name(arch))
	if err != nil {
		return nil, fault.Wrap(fault.Environment, fmt.Errorf("this kiln was built without the kiln-firstboot binary for %s: build kiln with `make build`", arch))
	}
	return data, nil
}
