package bake

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/kilnproject/kiln/imagebuild/fault"
	"github.com/kilnproject/kiln/profiles"
)

// unpackFirmware extracts the firmware archive into dir, checks that it
// is the firmware the profile names (its required files are present)
// and adds the profile's config.txt when the archive has none. It
// returns the archive's sha256.
func unpackFirmware(archive, dir string, fw *profiles.Firmware) (string, error) {
	data, err := os.ReadFile(archive)
	if err != nil {
		return "", fault.Wrap(fault.Input, fmt.Errorf("--firmware: %w", err))
	}
	sum := sha256.Sum256(data)
	zr, err := zip.NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return "", fault.Wrap(fault.Input, fmt.Errorf("--firmware %s: not a zip archive (%w): give the %s release zip", archive, err, fw.Name))
	}
	have := map[string]bool{}
	for _, f := range zr.File {
		name := path.Clean(f.Name)
		if path.IsAbs(name) || name == ".." || strings.HasPrefix(name, "../") {
			return "", fault.Wrap(fault.Input, fmt.Errorf("--firmware %s: entry %q points outside the archive", archive, f.Name))
		}
		dst := filepath.Join(dir, filepath.FromSlash(name))
		if f.FileInfo().IsDir() {
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return "", fault.Wrap(fault.IO, err)
			}
			continue
		}
		if !f.Mode().IsRegular() {
			return "", fault.Wrap(fault.Input, fmt.Errorf("--firmware %s: %s is not a regular file (FAT holds only files)", archive, f.Name))
		}
		if err := extract(f, dst); err != nil {
			return "", err
		}
		have[strings.ToLower(name)] = true
	}
	var missing []string
	for _, r := range fw.RequiredFiles {
		if !have[strings.ToLower(r)] {
			missing = append(missing, r)
		}
	}
	if len(missing) > 0 {
		return "", fault.Wrap(fault.Input, fmt.Errorf("--firmware %s lacks %s: it is not the %s archive", archive, strings.Join(missing, ", "), fw.Name))
	}
	if !have["config.txt"] {
		if err := os.WriteFile(filepath.Join(dir, "config.txt"), []byte(fw.ConfigTxt), 0o644); err != nil {
			return "", fault.Wrap(fault.IO, err)
		}
	}
	return hex.EncodeToString(sum[:]), nil
}

func extract(f *zip.File, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fault.Wrap(fault.IO, err)
	}
	rc, err := f.Open()
	if err != nil {
		return fault.Wrap(fault.Input, fmt.Errorf("firmware %s: %w", f.Name, err))
	}
	defer rc.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return fault.Wrap(fault.IO, err)
	}
	if _, err := io.Copy(out, rc); err != nil {
		out.Close()
		return fault.Wrap(fault.Input, fmt.Errorf("firmware %s: %w", f.Name, err))
	}
	return out.Close()
}
