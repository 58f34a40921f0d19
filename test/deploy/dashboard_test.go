package deploy

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

var dashboardFile = filepath.Join(repoRoot, "deploy", "grafana", "nsredirect.json")

// The dashboard's shape, as far as the tests read it. Grafana has more
// fields; they are not checked here.
type dashboard struct {
	UID           string           `json:"uid"`
	Title         string           `json:"title"`
	SchemaVersion int              `json:"schemaVersion"`
	Inputs        []any            `json:"__inputs"`
	Panels        []dashboardPanel `json:"panels"`
	Templating    struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type dashboardPanel struct {
	ID      int    `json:"id"`
	Type    string `json:"type"`
	Title   string `json:"title"`
	GridPos struct {
		X int `json:"x"`
		Y int `json:"y"`
		W int `json:"w"`
		H int `json:"h"`
	} `json:"gridPos"`
	Targets []struct {
		RefID      string `json:"refId"`
		Expr       string `json:"expr"`
		Datasource any    `json:"datasource"`
	} `json:"targets"`
	Panels []dashboardPanel `json:"panels"` // a collapsed row's
}

// The one data source reference the dashboard may make: its own variable,
// so an import asks for no UID and works with any Prometheus data source.
const datasourceRef = `{"type":"prometheus","uid":"${datasource}"}`

func readDashboard(t *testing.T) (dashboard, any) {
	t.Helper()
	raw := readFile(t, dashboardFile)
	var d dashboard
	var generic any
	for _, into := range []any{&d, &generic} {
		// A duplicate key is an error: Grafana would silently keep one.
		if strictErrs, err := kjson.UnmarshalStrict(raw, into, kjson.DisallowDuplicateFields); err != nil || len(strictErrs) > 0 {
			t.Fatalf("%s: %v %v", dashboardFile, err, strictErrs)
		}
	}
	return d, generic
}

// Grafana imports the dashboard as it is (Dashboards > New > Import, or a
// provisioning directory): a datasource variable, no hard-coded data source,
// panels that fit the 24-column grid without overlapping, unique ids.
func TestGrafanaDashboard(t *testing.T) {
	d, generic := readDashboard(t)
	if d.UID != "nsredirect" || d.Title != "nsredirect" || d.SchemaVersion < 36 {
		t.Errorf("uid %q title %q schemaVersion %d, want nsredirect, nsredirect, >= 36", d.UID, d.Title, d.SchemaVersion)
	}
	if d.Inputs != nil {
		t.Error("the dashboard has __inputs (Grafana's export for sharing): its ${DS_...} placeholders work only through the import dialog; use the datasource variable")
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	if vars["datasource"] != "datasource" {
		t.Errorf("no variable datasource of type datasource; variables: %v", vars)
	}

	// Every datasource reference, at any depth: the variable, or Grafana's
	// own for the built-in annotations.
	walkJSON(generic, "", func(path string, key string, v any) {
		if key != "datasource" {
			return
		}
		js := compactJSON(t, v)
		if js != datasourceRef && !(strings.HasPrefix(path, ".annotations.") && js == `{"type":"grafana","uid":"-- Grafana --"}`) {
			t.Errorf("%s.datasource is %s, want %s", path, js, datasourceRef)
		}
	})

	ids := map[int]string{}
	type rect struct{ x, y, w, h int }
	var placed []rect
	var titles []string
	var check func(ps []dashboardPanel)
	check = func(ps []dashboardPanel) {
		for _, p := range ps {
			if prev, dup := ids[p.ID]; dup || p.ID == 0 {
				t.Errorf("panel %q has id %d, also %q's (or zero)", p.Title, p.ID, prev)
			}
			ids[p.ID] = p.Title
			g := p.GridPos
			if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
				t.Errorf("panel %q gridPos %+v does not fit the 24-column grid", p.Title, g)
			}
			r := rect{g.X, g.Y, g.W, g.H}
			for _, o := range placed {
				if r.x < o.x+o.w && o.x < r.x+r.w && r.y < o.y+o.h && o.y < r.y+r.h {
					t.Errorf("panel %q at %+v overlaps another at %+v", p.Title, r, o)
				}
			}
			placed = append(placed, r)
			check(p.Panels)
			if p.Type == "row" {
				continue
			}
			titles = append(titles, p.Title)
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				if tg.RefID == "" || strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("panel %q has a target with refId %q expr %q", p.Title, tg.RefID, tg.Expr)
				}
			}
		}
	}
	check(d.Panels)

	// What the issue asks the dashboard to show, by the metric each needs.
	exprs := strings.Join(dashboardExprs(t, d), "\n")
	for _, m := range []string{"up{", "nsredirect_redirects_total{", "nsredirect_enroll_errors_total{", "nsredirect_link_repairs_total{",
		"nsredirect_map_entries{", "nsredirect_map_capacity{", "nsredirect_peer_storage_failures_total{"} {
		if !strings.Contains(exprs, m) {
			t.Errorf("no panel queries %s", strings.TrimSuffix(m, "{"))
		}
	}
	sort.Strings(titles)
	for i := 1; i < len(titles); i++ {
		if titles[i] == titles[i-1] {
			t.Errorf("two panels are titled %q", titles[i])
		}
	}
}

var (
	grafanaVar   = regexp.MustCompile(`\$(\{([A-Za-z0-9_]+)\}|[A-Za-z0-9_]+)`)
	labelValues  = regexp.MustCompile(`^label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)$`)
	grafanaBuilt = map[string]string{"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
)

// dashboardExprs are the PromQL expressions of every panel and query
// variable; a variable's label_values(SELECTOR, LABEL) gives SELECTOR.
func dashboardExprs(t *testing.T, d dashboard) []string {
	t.Helper()
	var out []string
	var walk func(ps []dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				out = append(out, tg.Expr)
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := v.Query.(string)
		if m, ok := v.Query.(map[string]any); ok {
			q, _ = m["query"].(string)
		}
		lv := labelValues.FindStringSubmatch(q)
		if lv == nil {
			t.Errorf("variable %s: query %q is not label_values(SELECTOR, LABEL)", v.Name, q)
			continue
		}
		out = append(out, lv[1])
	}
	return out
}

// Every dashboard query is PromQL Prometheus accepts, once Grafana has put
// in its variables: they go through promtool as recording rules. Every
// variable a query names is one the dashboard defines or a Grafana built-in.
func TestGrafanaDashboardQueriesParse(t *testing.T) {
	d, _ := readDashboard(t)
	defined := map[string]bool{}
	for _, v := range d.Templating.List {
		defined[v.Name] = true
	}
	var rules []map[string]string
	for i, e := range dashboardExprs(t, d) {
		expanded := grafanaVar.ReplaceAllStringFunc(e, func(s string) string {
			m := grafanaVar.FindStringSubmatch(s)
			name := m[2]
			if name == "" {
				name = m[1]
			}
			if v, ok := grafanaBuilt[name]; ok {
				return v
			}
			if !defined[name] {
				t.Errorf("query %q uses $%s, which the dashboard does not define", e, name)
			}
			return "x"
		})
		rules = append(rules, map[string]string{"record": fmt.Sprintf("dashboard:query%d", i), "expr": expanded})
	}
	y, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "dashboard-queries.yaml")
	if err := os.WriteFile(f, y, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(promtool(t), "check", "rules", f).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "SUCCESS") {
		t.Errorf("promtool check rules on the dashboard's queries: %v\n%s\n%s", err, out, y)
	}
}

// walkJSON calls fn for every object member, with the path of its object.
func walkJSON(v any, path string, fn func(path, key string, v any)) {
	switch x := v.(type) {
	case map[string]any:
		for k, c := range x {
			fn(path, k, c)
			walkJSON(c, path+"."+k, fn)
		}
	case []any:
		for i, c := range x {
			walkJSON(c, fmt.Sprintf("%s[%d]", path, i), fn)
		}
	}
}

func compactJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
