// Package promsel finds the metrics and labels a PromQL expression refers
// to, so the dashboard and the alert rules can be checked against what the
// daemon exports. It is a lexer and a small walker over its tokens, not a
// PromQL parser (Prometheus's own pulls in most of Prometheus): it refuses
// what it cannot read for certain (an unknown function, labels named inside
// strings, an unbalanced bracket) rather than guess; promtool checks the
// grammar.
package promsel

import (
	"fmt"
	"sort"
	"strings"
)

// Selector is one vector selector: a metric and the labels its matchers
// name.
type Selector struct {
	Metric string
	Labels []string
}

// Refs is what one expression refers to.
type Refs struct {
	Selectors []Selector
	// Grouping holds the labels of by, without, on, ignoring, group_left
	// and group_right clauses, and the label of Grafana's
	// label_values(SELECTOR, LABEL).
	Grouping []string
}

// Parse reads expr, a PromQL expression or a Grafana variable query
// label_values(SELECTOR, LABEL), which may hold Grafana variables ($var,
// ${var}) inside strings and range brackets.
func Parse(expr string) (Refs, error) {
	toks, err := lex(expr)
	if err != nil {
		return Refs{}, err
	}
	w := walker{toks: toks}
	if err := w.walk(); err != nil {
		return Refs{}, fmt.Errorf("%q: %w", expr, err)
	}
	return w.refs, nil
}

type walker struct {
	toks []token
	i    int
	refs Refs
}

func (w *walker) peek(k int) token {
	if w.i+k < len(w.toks) {
		return w.toks[w.i+k]
	}
	return token{kind: tEOF}
}

func (w *walker) walk() error {
	depth := 0
	for w.i < len(w.toks) {
		t := w.toks[w.i]
		switch {
		case t.kind == tIdent:
			if err := w.ident(); err != nil {
				return err
			}
			continue
		case t.is("{"):
			// A selector with no name before its braces.
			sel, err := w.matchers("")
			if err != nil {
				return err
			}
			if sel.Metric == "" {
				return fmt.Errorf("selector %s names no metric (give it a name or __name__=\"...\")", t.text)
			}
			w.refs.Selectors = append(w.refs.Selectors, sel)
			continue
		case t.is("["):
			if err := w.skipRange(); err != nil {
				return err
			}
			continue
		case t.is("("):
			depth++
		case t.is(")"):
			depth--
			if depth < 0 {
				return fmt.Errorf("unbalanced ) at offset %d", t.pos)
			}
		case t.is("}") || t.is("]"):
			return fmt.Errorf("unbalanced %s at offset %d", t.text, t.pos)
		}
		w.i++
	}
	if depth != 0 {
		return fmt.Errorf("%d unclosed (", depth)
	}
	return nil
}

// ident handles the identifier at w.i: a keyword, a clause, a function or
// a metric name.
func (w *walker) ident() error {
	t := w.toks[w.i]
	name := t.text
	lower := strings.ToLower(name)
	switch {
	case binaryKeywords[lower] || lower == "inf" || lower == "nan":
		w.i++
		return nil
	case lower == "offset":
		w.i++
		if w.peek(0).is("-") {
			w.i++
		}
		if k := w.peek(0).kind; k != tDuration && k != tVar {
			return fmt.Errorf("offset at %d is not followed by a duration", t.pos)
		}
		w.i++
		return nil
	case clauses[lower]:
		w.i++
		if !w.peek(0).is("(") {
			if lower == "group_left" || lower == "group_right" {
				return nil // their label list is optional
			}
			return fmt.Errorf("%s at %d is not followed by (", name, t.pos)
		}
		labels, err := w.labelList()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		w.refs.Grouping = append(w.refs.Grouping, labels...)
		return nil
	case aggregations[name] && w.peek(1).kind == tIdent && clauses[strings.ToLower(w.peek(1).text)]:
		w.i++ // sum by (l) (...): the clause comes next
		return nil
	case w.peek(1).is("("):
		if name == "label_values" {
			return w.labelValues()
		}
		if strings.HasPrefix(name, "label_") {
			return fmt.Errorf("%s names labels inside strings, which this check cannot follow", name)
		}
		if !functions[name] && !aggregations[name] {
			return fmt.Errorf("unknown function %s at %d", name, t.pos)
		}
		w.i++ // the ( is counted by walk
		return nil
	}
	sel := Selector{Metric: name}
	w.i++
	if w.peek(0).is("{") {
		m, err := w.matchers(name)
		if err != nil {
			return err
		}
		sel = m
	}
	w.refs.Selectors = append(w.refs.Selectors, sel)
	return nil
}

// matchers reads {label op "value", ...} at w.i. A __name__="x" matcher
// names the metric when metric is empty.
func (w *walker) matchers(metric string) (Selector, error) {
	open := w.toks[w.i]
	w.i++
	sel := Selector{Metric: metric}
	for {
		t := w.peek(0)
		if t.is("}") {
			w.i++
			return sel, nil
		}
		if t.kind != tIdent {
			return sel, fmt.Errorf("matcher at %d starts with %q, want a label name", t.pos, t.text)
		}
		op, val := w.peek(1), w.peek(2)
		if op.kind != tOp || !matchOps[op.text] || val.kind != tString {
			return sel, fmt.Errorf("matcher %s at %d is not LABEL (=|!=|=~|!~) \"VALUE\"", t.text, t.pos)
		}
		if t.text == "__name__" {
			if op.text != "=" || sel.Metric != "" {
				return sel, fmt.Errorf("__name__%s at %d: only one __name__=\"...\" in a selector with no name is followed", op.text, t.pos)
			}
			sel.Metric = val.value
		} else {
			sel.Labels = appendNew(sel.Labels, t.text)
		}
		w.i += 3
		switch t := w.peek(0); {
		case t.is(","):
			w.i++
		case t.is("}"):
		default:
			return sel, fmt.Errorf("selector opened at %d: %q after a matcher, want , or }", open.pos, t.text)
		}
	}
}

// labelList reads (label, ...) at w.i.
func (w *walker) labelList() ([]string, error) {
	w.i++ // (
	var labels []string
	for {
		t := w.peek(0)
		switch {
		case t.is(")"):
			w.i++
			return labels, nil
		case t.kind == tIdent:
			labels = append(labels, t.text)
			w.i++
			if w.peek(0).is(",") {
				w.i++
			} else if !w.peek(0).is(")") {
				return nil, fmt.Errorf("%q at %d in a label list", w.peek(0).text, w.peek(0).pos)
			}
		default:
			return nil, fmt.Errorf("%q at %d in a label list", t.text, t.pos)
		}
	}
}

// labelValues reads Grafana's label_values(LABEL) or
// label_values(SELECTOR, LABEL).
func (w *walker) labelValues() error {
	start := w.i
	depth := 0
	end := -1
	for j := start + 1; j < len(w.toks); j++ {
		switch {
		case w.toks[j].is("("):
			depth++
		case w.toks[j].is(")"):
			depth--
		}
		if depth == 0 {
			end = j
			break
		}
	}
	if end < 0 {
		return fmt.Errorf("label_values at %d is not closed", w.toks[start].pos)
	}
	last := w.toks[end-1]
	if last.kind != tIdent || !(w.toks[end-2].is(",") || end-2 == start+1) {
		return fmt.Errorf("label_values at %d does not end with a label name", w.toks[start].pos)
	}
	w.refs.Grouping = append(w.refs.Grouping, last.text)
	if end-2 == start+1 {
		w.i = end + 1 // label_values(LABEL)
		return nil
	}
	// The selector alone, walked as an expression.
	inner := walker{toks: w.toks[start+2 : end-2]}
	if err := inner.walk(); err != nil {
		return err
	}
	w.refs.Selectors = append(w.refs.Selectors, inner.refs.Selectors...)
	w.refs.Grouping = append(w.refs.Grouping, inner.refs.Grouping...)
	w.i = end + 1
	return nil
}

// skipRange skips a range or subquery, [5m] or [$__rate_interval:1m].
func (w *walker) skipRange() error {
	open := w.toks[w.i]
	for w.i++; w.i < len(w.toks); w.i++ {
		t := w.toks[w.i]
		switch {
		case t.is("]"):
			w.i++
			return nil
		case t.kind == tDuration || t.kind == tVar || t.kind == tNumber || t.is(":"):
		default:
			return fmt.Errorf("%q inside the range opened at %d", t.text, open.pos)
		}
	}
	return fmt.Errorf("range opened at %d is not closed", open.pos)
}

func appendNew(s []string, v string) []string {
	for _, x := range s {
		if x == v {
			return s
		}
	}
	return append(s, v)
}

// Exported is what a /metrics page offers: each metric (sample) name with
// the label names its samples carry.
type Exported map[string]map[string]bool

// Check returns an error for every metric or label expr refers to that
// exported lacks. The labels Prometheus adds to every target (job,
// instance, and what the scrape config relabels in) are given as target;
// `up` is Prometheus's own and carries only those.
func Check(expr string, exported Exported, target []string) []error {
	refs, err := Parse(expr)
	if err != nil {
		return []error{err}
	}
	var errs []error
	inExpr := map[string]bool{}
	for _, l := range target {
		inExpr[l] = true
	}
	for _, s := range refs.Selectors {
		labels, ok := exported[s.Metric]
		if s.Metric == "up" {
			labels, ok = map[string]bool{}, true
		}
		if !ok {
			errs = append(errs, fmt.Errorf("%q: metric %s is not exported", expr, s.Metric))
			continue
		}
		for l := range labels {
			inExpr[l] = true
		}
		for _, l := range s.Labels {
			if !labels[l] && !contains(target, l) {
				errs = append(errs, fmt.Errorf("%q: metric %s has no label %s (it has %s; Prometheus adds %s)",
					expr, s.Metric, l, strings.Join(keys(labels), ", "), strings.Join(target, ", ")))
			}
		}
	}
	for _, l := range refs.Grouping {
		if !inExpr[l] {
			errs = append(errs, fmt.Errorf("%q: no metric of the expression has label %s", expr, l))
		}
	}
	return errs
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
