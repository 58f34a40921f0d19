package promsel

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"sigs.k8s.io/yaml"
)

// Query is one expression and where it comes from.
type Query struct {
	Where, Expr string
}

// DashboardQueries returns every PromQL expression of a Grafana dashboard:
// each panel target's (rows' panels included) and each query variable's.
func DashboardQueries(dashboardJSON []byte) ([]Query, error) {
	type panel struct {
		Title   string `json:"title"`
		Targets []struct {
			RefID string `json:"refId"`
			Expr  string `json:"expr"`
		} `json:"targets"`
		Panels []json.RawMessage `json:"panels"`
	}
	var d struct {
		Panels     []json.RawMessage `json:"panels"`
		Templating struct {
			List []struct {
				Name  string          `json:"name"`
				Type  string          `json:"type"`
				Query json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(dashboardJSON, &d); err != nil {
		return nil, fmt.Errorf("read dashboard: %w", err)
	}
	var out []Query
	var walk func(raw []json.RawMessage) error
	walk = func(raw []json.RawMessage) error {
		for _, r := range raw {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				return fmt.Errorf("read panel: %w", err)
			}
			for _, t := range p.Targets {
				out = append(out, Query{Where: fmt.Sprintf("panel %q target %s", p.Title, t.RefID), Expr: t.Expr})
			}
			if err := walk(p.Panels); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(d.Panels); err != nil {
		return nil, err
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		// A string, or {"query": "...", ...} (Grafana 9 and later).
		var q string
		if err := json.Unmarshal(v.Query, &q); err != nil {
			var obj struct {
				Query string `json:"query"`
			}
			if err := json.Unmarshal(v.Query, &obj); err != nil {
				return nil, fmt.Errorf("variable %s: %w", v.Name, err)
			}
			q = obj.Query
		}
		out = append(out, Query{Where: "variable " + v.Name, Expr: q})
	}
	return out, nil
}

// RuleQueries returns the expression of every rule of a Prometheus rule
// file.
func RuleQueries(rulesYAML []byte) ([]Query, error) {
	var f struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []struct {
				Alert  string `json:"alert"`
				Record string `json:"record"`
				Expr   string `json:"expr"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.Unmarshal(rulesYAML, &f); err != nil {
		return nil, fmt.Errorf("read rules: %w", err)
	}
	var out []Query
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			out = append(out, Query{Where: fmt.Sprintf("group %s rule %s%s", g.Name, r.Alert, r.Record), Expr: r.Expr})
		}
	}
	return out, nil
}

// DeployQueries returns every query of the shipped Grafana dashboard and
// alert rules under deployDir (the repository's deploy/), each with the
// file it came from in Where.
func DeployQueries(deployDir string) ([]Query, error) {
	var all []Query
	for _, f := range []struct {
		path  string
		parse func([]byte) ([]Query, error)
	}{
		{filepath.Join(deployDir, "grafana", "nsredirect.json"), DashboardQueries},
		{filepath.Join(deployDir, "prometheus", "nsredirect-rules.yaml"), RuleQueries},
	} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			return nil, err
		}
		qs, err := f.parse(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f.path, err)
		}
		for _, q := range qs {
			all = append(all, Query{Where: f.path + ", " + q.Where, Expr: q.Expr})
		}
	}
	return all, nil
}
