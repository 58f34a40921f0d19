package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/nsredirect/nsredirect/internal/cli"
)

// Every command and every flag of every command is in docs/cli.md, with its
// environment variable.
func TestCLIMarkdownHasEveryFlag(t *testing.T) {
	md := string(cliMarkdown())
	for _, c := range cli.Reference() {
		if !strings.Contains(md, "\n## "+c.Name+"\n") {
			t.Errorf("no section for %s", c.Name)
		}
		for _, f := range c.Flags {
			if !strings.Contains(md, "`--"+f.Name) || !strings.Contains(md, "`"+f.Env+"`") {
				t.Errorf("%s: --%s or %s missing", c.Name, f.Name, f.Env)
			}
		}
	}
	for _, e := range cli.ExitCodes() {
		if !strings.Contains(md, fmt.Sprintf("| `%d` |", e.Code)) {
			t.Errorf("exit code %d missing", e.Code)
		}
	}
}

// Every metric the collector describes, and the build info, is in
// docs/metrics.md with its type.
func TestMetricsMarkdownHasEveryMetric(t *testing.T) {
	b, err := metricsMarkdown()
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	for _, want := range []string{
		"| `nsredirect_redirects_total` | counter | `netns`, `rule` |",
		"| `nsredirect_build_info` | gauge | `version` |",
		"| `nsredirect_map_capacity` | gauge | `map` |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("metrics.md lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "go_goroutines") {
		t.Error("metrics.md lists the Go collector's metrics; it should list ours only")
	}
}
