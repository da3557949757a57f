package cluster

import (
	"cmp"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/kilnproject/kiln/firstboot/nodeconfig"
)

// The messages of yaml.v3's decoder (yaml.TypeError lists every one).
var (
	unknownFieldRe = regexp.MustCompile(`^line (\d+): field (\S+) not found in type \S+$`)
	wrongTypeRe    = regexp.MustCompile("^line (\\d+): cannot unmarshal !!(\\w+)(?: `(.*)`)? into \\S+$")
	syntaxLineRe   = regexp.MustCompile(`^yaml: line (\d+): `)
)

// explain restates a decoding error of a cluster file in the file's own
// terms: each problem by its line and path in the file (nodes[1].mac),
// unknown fields with the fields allowed there, wrong types with what the
// field wants. Every problem yaml.v3 found is kept; a syntax error on a
// line with a tab says so.
func explain(data []byte, err error) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		// yaml.v3 names the line of the problem or the one before it.
		if m := syntaxLineRe.FindStringSubmatch(err.Error()); m != nil && !strings.Contains(err.Error(), "tab") {
			n, _ := strconv.Atoi(m[1])
			for _, l := range []int{n, n + 1} {
				if ls := lines(data); l >= 1 && l <= len(ls) && strings.Contains(ls[l-1], "\t") {
					return fmt.Errorf("%w (line %d holds a tab: YAML indents with spaces only)", err, l)
				}
			}
		}
		return err
	}
	var root yaml.Node
	if yaml.Unmarshal(data, &root) != nil {
		return err
	}
	paths := map[int][]string{} // line -> paths of keys and values on it
	index(&root, "", paths)
	var problems decodeError
	for _, msg := range te.Errors {
		problems = append(problems, restate(msg, paths))
	}
	return problems
}

// decodeError lists a decoding's problems, one per line, each "line N:
// path: what is wrong".
type decodeError []string

func (e decodeError) Error() string { return strings.Join(e, "\n") }

// Problem is one problem of a cluster file, as kiln validate -o json
// prints it: the line (decoding problems only, 0 when not known), the
// field's path in the file (nodes[1].mac; empty when the problem is the
// file's syntax) and what is wrong, with the fix.
type Problem struct {
	Line    int    `json:"line,omitempty"`
	Field   string `json:"field,omitempty"`
	Message string `json:"message"`
}

var (
	syntaxRe       = regexp.MustCompile(`yaml: line \d+: .*`)
	problemLineRe  = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)
	problemFieldRe = regexp.MustCompile(`^([A-Za-z][A-Za-z0-9_.\[\]-]*): (.*)$`)
)

// Problems lists the problems err reports about a cluster file (Load's,
// Parse's or Validate's), each split into line, field and message; nil if
// err reports none.
func Problems(err error) []Problem {
	var texts []string
	var inv *InvalidError
	var dec decodeError
	switch {
	case errors.As(err, &inv):
		for _, p := range inv.Problems {
			texts = append(texts, p.Error())
		}
	case errors.As(err, &dec):
		texts = dec
	case syntaxRe.MatchString(err.Error()):
		texts = []string{syntaxRe.FindString(err.Error())}
	default:
		return nil
	}
	out := make([]Problem, 0, len(texts))
	for _, t := range texts {
		var p Problem
		if m := problemLineRe.FindStringSubmatch(t); m != nil {
			p.Line, _ = strconv.Atoi(m[1])
			t = m[2]
		}
		if m := problemFieldRe.FindStringSubmatch(t); m != nil {
			p.Field, t = m[1], m[2]
		}
		p.Message = t
		out = append(out, p)
	}
	return out
}

func lines(data []byte) []string { return strings.Split(string(data), "\n") }

// index records the path of every mapping key and sequence item by line.
func index(n *yaml.Node, path string, paths map[int][]string) {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			index(c, path, paths)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			p := n.Content[i].Value
			if path != "" {
				p = path + "." + p
			}
			paths[n.Content[i].Line] = append(paths[n.Content[i].Line], p)
			index(n.Content[i+1], p, paths)
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			paths[c.Line] = append(paths[c.Line], p)
			index(c, p, paths)
		}
	}
}

// restate rewrites one of yaml.v3's messages, or keeps it.
func restate(msg string, paths map[int][]string) string {
	if m := unknownFieldRe.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		path := pathOn(paths[line], func(p string) bool { return p == m[2] || strings.HasSuffix(p, "."+m[2]) })
		if path == "" {
			path = m[2]
		}
		known := fieldsAt(parent(path))
		hint := ""
		if i := slices.IndexFunc(known, func(k string) bool { return strings.EqualFold(k, m[2]) }); i >= 0 {
			hint = fmt.Sprintf("; did you mean %s?", known[i])
		}
		return fmt.Sprintf("line %d: %s: unknown field%s (fields here: %s)", line, path, hint, strings.Join(known, ", "))
	}
	if m := wrongTypeRe.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		path := pathOn(paths[line], func(p string) bool { return typeAt(p) != nil })
		got := map[string]string{"str": "text", "int": "a number", "float": "a number", "bool": "true or false", "seq": "a list", "map": "a mapping", "null": "nothing"}[m[2]]
		if m[3] != "" {
			got += " " + strconv.Quote(m[3])
		}
		return fmt.Sprintf("line %d: %s: wants %s, not %s", line, cmp.Or(path, "?"), want(typeAt(path)), cmp.Or(got, m[2]))
	}
	return msg
}

// pathOn picks the deepest path on a line that matches.
func pathOn(ps []string, match func(string) bool) string {
	best := ""
	for _, p := range ps {
		if match(p) && len(p) > len(best) {
			best = p
		}
	}
	return best
}

// parent is the path holding path's last field.
func parent(path string) string {
	if i := strings.LastIndexByte(path, '.'); i >= 0 {
		return path[:i]
	}
	return ""
}

// typeAt follows a path (fields and [i]) from Cluster; nil if it leads
// nowhere known.
func typeAt(path string) reflect.Type {
	t := reflect.TypeOf(Cluster{})
	for _, seg := range strings.FieldsFunc(path, func(r rune) bool { return r == '.' || r == '[' }) {
		for t != nil && t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		if t == nil {
			return nil
		}
		switch {
		case strings.HasSuffix(seg, "]") && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array):
			t = t.Elem()
		case t.Kind() == reflect.Map:
			t = t.Elem()
		case t.Kind() == reflect.Struct:
			f, ok := fieldByYAML(t, seg)
			if !ok {
				return nil
			}
			t = f.Type
		default:
			return nil
		}
	}
	return t
}

// fieldByYAML finds a struct field by its yaml name.
func fieldByYAML(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		if f := t.Field(i); yamlName(f) == name {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func yamlName(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	if name == "-" || !f.IsExported() {
		return ""
	}
	return name
}

// fieldsAt lists the fields a mapping at path takes.
func fieldsAt(path string) []string {
	t := typeAt(path)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return nil
	}
	var names []string
	for i := range t.NumField() {
		if n := yamlName(t.Field(i)); n != "" {
			names = append(names, n)
		}
	}
	return names
}

// want says in words what a field of type t takes.
func want(t reflect.Type) string {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil {
		return "another value"
	}
	if t == reflect.TypeFor[nodeconfig.Duration]() {
		return "a duration such as 24h"
	}
	switch t.Kind() {
	case reflect.String:
		return "text"
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64, reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice, reflect.Array:
		return "a list"
	case reflect.Map, reflect.Struct:
		return "a mapping (key: value)"
	}
	return "another value"
}
