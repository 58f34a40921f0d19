package promsel

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, c := range []struct {
		expr     string
		sels     []Selector
		grouping []string
	}{
		{`up`, []Selector{{Metric: "up"}}, nil},
		{`up{job="nsredirect"} == 0`, []Selector{{Metric: "up", Labels: []string{"job"}}}, nil},
		{`absent(up{job="nsredirect"})`, []Selector{{Metric: "up", Labels: []string{"job"}}}, nil},
		{`sum by (netns, rule) (rate(nsredirect_redirects_total{job="$job", node=~"$node", netns=~"$netns"}[$__rate_interval]))`,
			[]Selector{{Metric: "nsredirect_redirects_total", Labels: []string{"job", "node", "netns"}}}, []string{"netns", "rule"}},
		{`sum(rate(x[5m])) without (instance)`, []Selector{{Metric: "x"}}, []string{"instance"}},
		{`a / on (map) group_left b`, []Selector{{Metric: "a"}, {Metric: "b"}}, []string{"map"}},
		{`a * ignoring(hook) group_right(node) b`, []Selector{{Metric: "a"}, {Metric: "b"}}, []string{"hook", "node"}},
		{`nsredirect_map_entries / nsredirect_map_capacity > 0.8`, []Selector{{Metric: "nsredirect_map_entries"}, {Metric: "nsredirect_map_capacity"}}, nil},
		{"(x unless x offset 15m)\nor\nincrease(x[15m]) > 0", []Selector{{Metric: "x"}, {Metric: "x"}, {Metric: "x"}}, nil},
		{`x offset -1h30m and bool y`, []Selector{{Metric: "x"}, {Metric: "y"}}, nil},
		{`count(up == 0) or vector(0)`, []Selector{{Metric: "up"}}, nil},
		{`max_over_time(x[1h:5m]) # a comment naming no_metric{a="b"}`, []Selector{{Metric: "x"}}, nil},
		{`{__name__="x", a!="1", b=~'2', c!~` + "`3`" + `,}`, []Selector{{Metric: "x", Labels: []string{"a", "b", "c"}}}, nil},
		{`x{a="b,c}d", a="e"}`, []Selector{{Metric: "x", Labels: []string{"a"}}}, nil},
		{`x{a="say \"hi\""}`, []Selector{{Metric: "x", Labels: []string{"a"}}}, nil},
		{`job:x:rate5m > 1e3 + 0x10 + .5 + Inf`, []Selector{{Metric: "job:x:rate5m"}}, nil},
		{`topk(3, x) and on() y`, []Selector{{Metric: "x"}, {Metric: "y"}}, nil},
		{`count_values("version", x)`, []Selector{{Metric: "x"}}, nil},
		{`histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m])))`, []Selector{{Metric: "x_bucket"}}, []string{"le"}},
		{`label_values(up{job="$job"}, node)`, []Selector{{Metric: "up", Labels: []string{"job"}}}, []string{"node"}},
		{`label_values(node)`, nil, []string{"node"}},
		{`label_values(count by (version) (nsredirect_build_info), version)`, []Selector{{Metric: "nsredirect_build_info"}}, []string{"version", "version"}},
		{`x[${__range}]`, []Selector{{Metric: "x"}}, nil},
	} {
		t.Run(c.expr, func(t *testing.T) {
			got, err := Parse(c.expr)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got.Selectors, c.sels) || !reflect.DeepEqual(got.Grouping, c.grouping) {
				t.Errorf("got selectors %+v grouping %v\nwant %+v grouping %v", got.Selectors, got.Grouping, c.sels, c.grouping)
			}
		})
	}
}

// What the extractor cannot read for certain it refuses, saying why.
func TestParseRefuses(t *testing.T) {
	for _, c := range []struct{ expr, wantErr string }{
		{`ratee(x[5m])`, "unknown function ratee"},
		{`label_replace(x, "dst", "$1", "src", "(.*)")`, "names labels inside strings"},
		{`sum(rate(x[5m])`, "unclosed ("},
		{`sum(x))`, "unbalanced )"},
		{`x{a="b"`, `"" after a matcher`},
		{`x{a=b}`, "is not LABEL"},
		{`x{a}`, "is not LABEL"},
		{`{a="b"}`, "names no metric"},
		{`{__name__=~"x.*"}`, "__name__=~"},
		{`x[5m`, "not closed"},
		{`x[5m] offset`, "not followed by a duration"},
		{`sum by x`, "not followed by ("},
		{`x{a="b}`, "not closed"},
		{`x $`, "names no variable"},
		{`x ; y`, `unexpected ';'`},
	} {
		t.Run(c.expr, func(t *testing.T) {
			_, err := Parse(c.expr)
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Fatalf("Parse gave error %v, want one containing %q", err, c.wantErr)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	exported := Exported{
		"nsredirect_redirects_total": {"netns": true, "rule": true},
		"nsredirect_rules":           {},
	}
	target := []string{"job", "instance", "node"}
	for _, c := range []struct {
		expr    string
		wantErr []string
	}{
		{`sum by (netns, node) (rate(nsredirect_redirects_total{job="j", netns="a"}[5m]))`, nil},
		{`up{node="a"} == 0`, nil},
		{`nsredirect_rules{instance="x"}`, nil},
		{`nsredirect_redirect_total`, []string{"metric nsredirect_redirect_total is not exported"}},
		{`nsredirect_redirects_total{pod="a"}`, []string{"has no label pod (it has netns, rule; Prometheus adds job, instance, node)"}},
		{`up{netns="a"}`, []string{"metric up has no label netns"}},
		{`sum by (hook) (nsredirect_redirects_total)`, []string{"no metric of the expression has label hook"}},
		{`sum by (rule) (nsredirect_rules)`, []string{"no metric of the expression has label rule"}},
		{`sum(`, []string{"unclosed ("}},
	} {
		t.Run(c.expr, func(t *testing.T) {
			errs := Check(c.expr, exported, target)
			if len(errs) != len(c.wantErr) {
				t.Fatalf("errors %v, want %d: %v", errs, len(c.wantErr), c.wantErr)
			}
			for i, e := range errs {
				if !strings.Contains(e.Error(), c.wantErr[i]) {
					t.Errorf("error %q, want one containing %q", e, c.wantErr[i])
				}
			}
		})
	}
}

func TestFromText(t *testing.T) {
	e, err := FromText(strings.NewReader(`# HELP a_total A.
# TYPE a_total counter
a_total{netns="x",rule="80=3210"} 3
# TYPE s summary
s{quantile="0.5"} 1
s_sum 2
s_count 3
# TYPE h histogram
h_bucket{le="1",map="rules"} 1
h_bucket{le="+Inf",map="rules"} 1
h_sum{map="rules"} 1
h_count{map="rules"} 1
# TYPE empty counter
`))
	if err != nil {
		t.Fatal(err)
	}
	want := Exported{
		"a_total":  {"netns": true, "rule": true},
		"s":        {"quantile": true},
		"s_sum":    {},
		"s_count":  {},
		"h_bucket": {"le": true, "map": true},
		"h_sum":    {"map": true},
		"h_count":  {"map": true},
	}
	if !reflect.DeepEqual(e, want) {
		t.Errorf("got %v\nwant %v", e, want)
	}
}

// The shipped dashboard and rules read without error and name what the
// tests elsewhere check against the daemon.
func TestShippedQueriesParse(t *testing.T) {
	root := filepath.Join("..", "..", "deploy")
	dash, err := os.ReadFile(filepath.Join(root, "grafana", "nsredirect.json"))
	if err != nil {
		t.Fatal(err)
	}
	rules, err := os.ReadFile(filepath.Join(root, "prometheus", "nsredirect-rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	dq, err := DashboardQueries(dash)
	if err != nil {
		t.Fatal(err)
	}
	rq, err := RuleQueries(rules)
	if err != nil {
		t.Fatal(err)
	}
	if len(dq) < 10 || len(rq) != 5 {
		t.Fatalf("%d dashboard queries and %d rules, want 10 or more and 5", len(dq), len(rq))
	}
	for _, q := range append(dq, rq...) {
		refs, err := Parse(q.Expr)
		if err != nil {
			t.Errorf("%s: %v", q.Where, err)
		} else if len(refs.Selectors) == 0 {
			t.Errorf("%s: %q selects no metric", q.Where, q.Expr)
		}
	}
}
