package integration

import (
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nsredirect/nsredirect/internal/promsel"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// targetLabels are what Prometheus adds to every series of a daemon: job
// and instance, and node, which the Helm chart's PodMonitor and
// ServiceMonitor relabel in from the pod's node.
var targetLabels = []string{"job", "instance", "node"}

// TestObservabilityQueriesLive runs the daemon as the DaemonSet does
// (`nsredirect kube`, against an HTTP API) with a pod that gets its
// redirect, a pod whose annotation is bad (an enroll error), one redirected
// connect from curl and one link detached under it (a repair), so every
// series the dashboard and the alert rules read is on /metrics. Then every
// query of deploy/grafana/nsredirect.json and every rule of
// deploy/prometheus/nsredirect-rules.yaml may name only metrics and labels
// that page has, or job, instance and node.
func TestObservabilityQueriesLive(t *testing.T) {
	pinDir := testenv.BPFFS(t)
	top := testenv.KubePods(t)
	api := newAPIServer(t)
	yes := true
	ds := &metav1.OwnerReference{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "nsredirect", UID: "ds-1", Controller: &yes}

	app := kubePod("shop", "web", "80=3210", nil)
	sb := testenv.PodSandbox(t, top, string(app.UID), "c1")
	api.put(t, app)
	api.put(t, kubePod("shop", "broken", "80=", nil))
	self := kubePod("nsredirect", "nsredirect-observe", "", ds)
	api.put(t, self)

	d := api.daemon(t, pinDir, self)
	url := testenv.MetricsURL(t, d)
	testenv.WaitStatus(t, pinDir, "shop/web enrolled", func(rows []testenv.StatusRow) bool { return len(testenv.RowsOf(rows, "shop/web")) == 1 })
	if got := curl(t, sb.Netns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Fatalf("curl http://127.0.0.1/ in the pod: %q, want the backend on :3210", got)
	}

	connect4 := testenv.LinkOf(t, pinDir, "connect4")
	if out, err := exec.Command(testenv.Tool(t, "bpftool"), "link", "detach", "id", strconv.Itoa(connect4.ID)).CombinedOutput(); err != nil {
		t.Fatalf("bpftool link detach: %v\n%s", err, out)
	}
	d.WaitOutput(t, "re-created and re-pinned", 10*time.Second)

	var body string
	waitFor(t, "an enroll error and a repair on /metrics", 10*time.Second, func() bool {
		_, body = testenv.HTTPGet(t, url+"/metrics")
		return testenv.MetricValue(body, `nsredirect_enroll_errors_total{netns="shop/broken"}`) >= 1 &&
			testenv.MetricValue(body, `nsredirect_link_repairs_total{hook="connect4"}`) >= 1
	})
	if v := metricValue(t, body, `nsredirect_redirects_total{netns="shop/web",rule="80=3210"}`); v < 1 {
		t.Errorf("redirects of shop/web = %v after curl's connect; want >= 1", v)
	}
	exported, err := promsel.FromText(strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}

	qs, err := promsel.DeployQueries(filepath.Join("..", "..", "deploy"))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		for _, err := range promsel.Check(q.Expr, exported, targetLabels) {
			t.Errorf("%s: %v", q.Where, err)
		}
	}
	checked := len(qs)
	if checked < 20 {
		t.Errorf("checked %d queries; the dashboard and the rules have more", checked)
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", body)
	}
}
