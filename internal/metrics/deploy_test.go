package metrics_test

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/nsredirect/nsredirect/internal/metrics"
	"github.com/nsredirect/nsredirect/internal/promsel"
)

// targetLabels are what Prometheus adds to every series of a daemon: job
// and instance, and node, which the Helm chart's PodMonitor and
// ServiceMonitor relabel in from the pod's node.
var targetLabels = []string{"job", "instance", "node"}

// Every query of the Grafana dashboard and every alert rule names only
// metrics and labels this registry exports (with one sample of each), so a
// renamed metric or label fails here, without root. test/integration's
// TestObservabilityQueriesLive checks the same against a running daemon.
func TestDeployQueriesUseExportedMetrics(t *testing.T) {
	exported := exportedWithOneOfEach(t)
	qs, err := promsel.DeployQueries(filepath.Join("..", "..", "deploy"))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		for _, err := range promsel.Check(q.Expr, exported, targetLabels) {
			t.Errorf("%s: %v", q.Where, err)
		}
	}
}

// exportedWithOneOfEach is what the registry exports with one sample of
// every nsredirect series.
func exportedWithOneOfEach(t *testing.T) promsel.Exported {
	t.Helper()
	reg := metrics.Registry(func() metrics.Snapshot {
		return metrics.Snapshot{
			Rules:        []metrics.RuleStat{{Netns: "shop/web", Rule: "80=3210", Redirects: 1}},
			EnrollErrors: map[string]uint64{"shop/broken": 1},
			LinkRepairs:  map[string]uint64{"connect4": 1},
			Maps:         []metrics.MapFill{{Map: "rules", Entries: 6, Capacity: 65536}},
		}
	}, "test")
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return promsel.FromFamilies(fams)
}

var backticked = regexp.MustCompile("`([a-z_]+)`")

// docs/observability.md's table of metrics lists every nsredirect_ metric
// with its labels, and nothing else.
func TestObservabilityDocListsMetrics(t *testing.T) {
	want := map[string][]string{}
	for name, labels := range exportedWithOneOfEach(t) {
		if strings.HasPrefix(name, "nsredirect_") {
			want[name] = sortedKeys(labels)
		}
	}
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "observability.md"))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	for _, line := range strings.Split(string(doc), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 4 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`nsredirect_") {
			continue
		}
		var labels []string
		for _, m := range backticked.FindAllStringSubmatch(cells[2], -1) {
			labels = append(labels, m[1])
		}
		sort.Strings(labels)
		for _, m := range backticked.FindAllStringSubmatch(cells[1], -1) {
			got[m[1]] = labels
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("docs/observability.md lists metrics and labels\n%v\nthe daemon exports\n%v", got, want)
	}
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
