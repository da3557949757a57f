package profiles

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"path"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"
)

// profile is what every kind of embedded profile provides: a pointer type
// that validates itself and knows its name.
type profile[T any] interface {
	*T
	Validate() error
	profileName() string
}

// loadAll decodes every dir/*.yaml in fsys strictly, validates each and
// checks that its name matches its file name; it reports every problem.
func loadAll[T any, P profile[T]](fsys fs.FS, dir string) (map[string]*T, error) {
	names, err := fs.Glob(fsys, dir+"/*.yaml")
	if err != nil {
		return nil, err
	}
	out := map[string]*T{}
	var errs []error
	for _, n := range names {
		data, err := fs.ReadFile(fsys, n)
		if err != nil {
			return nil, err
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		p := P(new(T))
		if err := dec.Decode(p); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
			continue
		}
		if err := p.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
		}
		if want := strings.TrimSuffix(path.Base(n), ".yaml"); p.profileName() != want {
			errs = append(errs, fmt.Errorf("%s: name %q must match the file name", n, p.profileName()))
		}
		out[p.profileName()] = (*T)(p)
	}
	return out, errors.Join(errs...)
}

// mustLoadAll loads embedded profiles; the package's tests check them, so
// a failure here is a build defect.
func mustLoadAll[T any, P profile[T]](fsys fs.FS, dir string) map[string]*T {
	out, err := loadAll[T, P](fsys, dir)
	if err != nil {
		panic(err)
	}
	return out
}

func sortedNames[T any](m map[string]*T) []string {
	return slices.Sorted(maps.Keys(m))
}
