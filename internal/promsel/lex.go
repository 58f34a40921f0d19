package promsel

import (
	"fmt"
	"strconv"
	"strings"
)

type kind int

const (
	tEOF kind = iota
	tIdent
	tString
	tNumber
	tDuration
	tVar // a Grafana variable: $name, ${name}
	tOp  // an operator or punctuation
)

type token struct {
	kind  kind
	text  string
	value string // a string's unquoted value
	pos   int
}

func (t token) is(op string) bool { return t.kind == tOp && t.text == op }

// Operators and punctuation, longest first.
var ops = []string{"==", "!=", "<=", ">=", "=~", "!~", "(", ")", "{", "}", "[", "]", ",", "+", "-", "*", "/", "%", "^", "<", ">", "=", "@", ":"}

var matchOps = map[string]bool{"=": true, "!=": true, "=~": true, "!~": true}

var binaryKeywords = map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "atan2": true}

var clauses = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true}

var aggregations = set("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio")

// Prometheus's functions but label_replace and label_join, which name
// labels inside strings.
var functions = set("abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
	"avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time",
	"day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor",
	"histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
	"histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "last_over_time",
	"ln", "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
	"predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar",
	"sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "stddev_over_time",
	"stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year")

func set(names ...string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[n] = true
	}
	return m
}

func isLetter(c byte) bool { return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }
func isDigit(c byte) bool  { return c >= '0' && c <= '9' }

// lex splits s into tokens; # starts a comment to the end of the line.
func lex(s string) ([]token, error) {
	var toks []token
	i := 0
	for i < len(s) {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '#':
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '"' || c == '\'' || c == '`':
			j, val, err := lexString(s, i)
			if err != nil {
				return nil, err
			}
			toks = append(toks, token{kind: tString, text: s[i:j], value: val, pos: i})
			i = j
		case c == '$':
			j := i + 1
			if j < len(s) && s[j] == '{' {
				k := strings.IndexByte(s[j:], '}')
				if k < 0 {
					return nil, fmt.Errorf("${ at %d is not closed", i)
				}
				j += k + 1
			} else {
				for j < len(s) && (isLetter(s[j]) || isDigit(s[j])) {
					j++
				}
			}
			if j == i+1 {
				return nil, fmt.Errorf("$ at %d names no variable", i)
			}
			toks = append(toks, token{kind: tVar, text: s[i:j], pos: i})
			i = j
		case isLetter(c):
			// Recording rules' names have colons (job:rate:sum); one may
			// not start with a colon here, which is the subquery step's.
			j := i
			for j < len(s) && (isLetter(s[j]) || isDigit(s[j]) || s[j] == ':') {
				j++
			}
			toks = append(toks, token{kind: tIdent, text: s[i:j], pos: i})
			i = j
		case isDigit(c) || c == '.' && i+1 < len(s) && isDigit(s[i+1]):
			j, k := lexNumber(s, i)
			toks = append(toks, token{kind: k, text: s[i:j], pos: i})
			i = j
		default:
			op := ""
			for _, o := range ops {
				if strings.HasPrefix(s[i:], o) {
					op = o
					break
				}
			}
			if op == "" {
				return nil, fmt.Errorf("unexpected %q at %d", c, i)
			}
			toks = append(toks, token{kind: tOp, text: op, pos: i})
			i += len(op)
		}
	}
	return toks, nil
}

// lexString reads the quoted string at i; it returns the offset after it
// and its value.
func lexString(s string, i int) (int, string, error) {
	q := s[i]
	j := i + 1
	for j < len(s) && s[j] != q {
		if s[j] == '\\' && q != '`' {
			j++
		}
		j++
	}
	if j >= len(s) {
		return 0, "", fmt.Errorf("string at %d is not closed", i)
	}
	raw := s[i : j+1]
	if q == '`' {
		return j + 1, raw[1 : len(raw)-1], nil
	}
	if q == '\'' {
		raw = `"` + strings.ReplaceAll(strings.ReplaceAll(raw[1:len(raw)-1], `\'`, `'`), `"`, `\"`) + `"`
	}
	val, err := strconv.Unquote(raw)
	if err != nil {
		return 0, "", fmt.Errorf("string at %d: %w", i, err)
	}
	return j + 1, val, nil
}

// lexNumber reads a number (1, 0.8, 1e3, 0x1f) or a duration (5m, 1h30m,
// 500ms) at i.
func lexNumber(s string, i int) (int, kind) {
	j := i
	if strings.HasPrefix(s[i:], "0x") || strings.HasPrefix(s[i:], "0X") {
		j += 2
		for j < len(s) && strings.IndexByte("0123456789abcdefABCDEF", s[j]) >= 0 {
			j++
		}
		return j, tNumber
	}
	for j < len(s) && (isDigit(s[j]) || s[j] == '.') {
		j++
	}
	if j < len(s) && (s[j] == 'e' || s[j] == 'E') {
		k := j + 1
		if k < len(s) && (s[k] == '+' || s[k] == '-') {
			k++
		}
		if k < len(s) && isDigit(s[k]) {
			for k < len(s) && isDigit(s[k]) {
				k++
			}
			return k, tNumber
		}
	}
	if j < len(s) && strings.IndexByte("smhdwy", s[j]) >= 0 {
		// Units, each after its digits: 1h30m, 500ms.
		for j < len(s) {
			switch {
			case strings.HasPrefix(s[j:], "ms"):
				j += 2
			case strings.IndexByte("smhdwy", s[j]) >= 0:
				j++
			default:
				return j, tDuration
			}
			for j < len(s) && isDigit(s[j]) {
				j++
			}
		}
		return j, tDuration
	}
	return j, tNumber
}
