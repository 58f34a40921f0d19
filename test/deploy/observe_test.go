package deploy

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

var (
	rulesFile      = filepath.Join(repoRoot, "deploy", "prometheus", "nsredirect-rules.yaml")
	rulesTestFile  = filepath.Join(repoRoot, "deploy", "prometheus", "nsredirect-rules.test.yaml")
	chartRulesFile = filepath.Join(chartDir, "files", "nsredirect-rules.yaml")
)

// The Prometheus Operator's API group. Its Go types
// (github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring)
// are not a dependency: the types below copy, with the same JSON names, the
// fields of its v1 PodMonitor, ServiceMonitor and PrometheusRule (v0.95.2)
// that the chart writes, so a strict decode refuses a misspelt or misplaced
// field as the operator's would-be types do.
const monitoringV1 = "monitoring.coreos.com/v1"

type podMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Selector            metav1.LabelSelector `json:"selector"`
		NamespaceSelector   namespaceSelector    `json:"namespaceSelector,omitempty"`
		PodMetricsEndpoints []scrapeEndpoint     `json:"podMetricsEndpoints"`
	} `json:"spec"`
}

type serviceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector namespaceSelector    `json:"namespaceSelector,omitempty"`
		Endpoints         []scrapeEndpoint     `json:"endpoints"`
	} `json:"spec"`
}

type namespaceSelector struct {
	Any        bool     `json:"any,omitempty"`
	MatchNames []string `json:"matchNames,omitempty"`
}

// scrapeEndpoint is the part PodMetricsEndpoint and Endpoint share.
type scrapeEndpoint struct {
	Port          string          `json:"port,omitempty"`
	Path          string          `json:"path,omitempty"`
	Interval      string          `json:"interval,omitempty"`
	ScrapeTimeout string          `json:"scrapeTimeout,omitempty"`
	Relabelings   []relabelConfig `json:"relabelings,omitempty"`
}

type relabelConfig struct {
	SourceLabels []string `json:"sourceLabels,omitempty"`
	Separator    *string  `json:"separator,omitempty"`
	TargetLabel  string   `json:"targetLabel,omitempty"`
	Regex        string   `json:"regex,omitempty"`
	Replacement  *string  `json:"replacement,omitempty"`
	Action       string   `json:"action,omitempty"`
}

type prometheusRule struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              ruleFile `json:"spec"`
}

// ruleFile is a Prometheus rule file, and a PrometheusRule's spec.
type ruleFile struct {
	Groups []ruleGroup `json:"groups"`
}

type ruleGroup struct {
	Name     string `json:"name"`
	Interval string `json:"interval,omitempty"`
	Rules    []rule `json:"rules"`
}

type rule struct {
	Alert       string            `json:"alert,omitempty"`
	Record      string            `json:"record,omitempty"`
	Expr        string            `json:"expr"`
	For         string            `json:"for,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// The alerts the issue asks for, by name; docs/observability.md explains each.
var wantAlerts = []string{"NsredirectEnrollErrors", "NsredirectLinkRepairs", "NsredirectMapNearlyFull", "NsredirectDown", "NsredirectAbsent"}

func readRules(t *testing.T, path string) ruleFile {
	t.Helper()
	var rf ruleFile
	decodeFileStrict(t, path, &rf)
	return rf
}

// The plain rules file has the alerts, each with a severity and a runbook
// link to its section of docs/observability.md, and the chart carries it
// unchanged: helm reads only files inside the chart, so the chart holds a
// copy, which must not drift.
func TestRulesFile(t *testing.T) {
	rf := readRules(t, rulesFile)
	var names []string
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			names = append(names, r.Alert)
			if r.Labels["severity"] != "warning" && r.Labels["severity"] != "critical" {
				t.Errorf("alert %s has severity %q, want warning or critical", r.Alert, r.Labels["severity"])
			}
			anchor := "docs/observability.md#" + strings.ToLower(r.Alert)
			if !strings.HasSuffix(r.Annotations["runbook_url"], anchor) {
				t.Errorf("alert %s runbook_url %q, want one ending in %s", r.Alert, r.Annotations["runbook_url"], anchor)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s lacks a summary or a description", r.Alert)
			}
		}
	}
	if !reflect.DeepEqual(names, wantAlerts) {
		t.Errorf("alerts are %v, want %v", names, wantAlerts)
	}
	doc := string(readFile(t, filepath.Join(repoRoot, "docs", "observability.md")))
	for _, a := range wantAlerts {
		if !strings.Contains(doc, "\n### "+a+"\n") {
			t.Errorf("docs/observability.md has no section \"### %s\" for the alert's runbook_url", a)
		}
	}
	if !bytes.Equal(readFile(t, rulesFile), readFile(t, chartRulesFile)) {
		t.Errorf("%s is not a copy of %s: cp %s %s", chartRulesFile, rulesFile, rulesFile, chartRulesFile)
	}
}

// With default values the chart makes no Prometheus Operator object (a
// cluster without its CRDs would refuse the install) and no Service.
func TestChartMonitoringOffByDefault(t *testing.T) {
	b, _ := chartBundle(t, releaseName, nil)
	if b.metricsService != nil || b.podMonitor != nil || b.serviceMonitor != nil || b.prometheusRule != nil {
		t.Errorf("default values render Service %v PodMonitor %v ServiceMonitor %v PrometheusRule %v, want none",
			b.metricsService != nil, b.podMonitor != nil, b.serviceMonitor != nil, b.prometheusRule != nil)
	}
}

var wantRelabelings = []relabelConfig{
	{Action: "replace", TargetLabel: "job", Replacement: ptr("nsredirect")},
	{Action: "replace", SourceLabels: []string{"__meta_kubernetes_pod_node_name"}, TargetLabel: "node"},
}

func ptr[T any](v T) *T { return &v }

// checkEndpoint: /metrics, the values' interval, and the job and node
// labels the alert rules and the dashboard select on.
func checkEndpoint(t *testing.T, kind string, e scrapeEndpoint, interval string) {
	t.Helper()
	if e.Path != "/metrics" || e.Interval != interval || e.ScrapeTimeout != "" {
		t.Errorf("%s endpoint path %q interval %q scrapeTimeout %q, want /metrics, %q and none", kind, e.Path, e.Interval, e.ScrapeTimeout, interval)
	}
	if !reflect.DeepEqual(e.Relabelings, wantRelabelings) {
		t.Errorf("%s relabelings are %+v, want %+v", kind, e.Relabelings, wantRelabelings)
	}
}

// The chart's objects select the DaemonSet's pods, in the release namespace,
// labelled for the Prometheus that must find them.
func checkSelects(t *testing.T, kind string, b *bundle, meta metav1.ObjectMeta, sel metav1.LabelSelector, ns namespaceSelector) {
	t.Helper()
	if meta.Name != releaseName || meta.Namespace != releaseNamespace {
		t.Errorf("%s is %s/%s, want %s/%s", kind, meta.Namespace, meta.Name, releaseNamespace, releaseName)
	}
	if meta.Labels["release"] != "kps" || meta.Labels["app.kubernetes.io/name"] != "nsredirect" {
		t.Errorf("%s labels %v, want the chart's and the values' release=kps", kind, meta.Labels)
	}
	if !reflect.DeepEqual(ns, namespaceSelector{MatchNames: []string{releaseNamespace}}) {
		t.Errorf("%s namespaceSelector %+v, want the release namespace only", kind, ns)
	}
	if !reflect.DeepEqual(sel, *b.daemonSet.Spec.Selector) {
		t.Errorf("%s selector %+v, want the DaemonSet's %+v", kind, sel, *b.daemonSet.Spec.Selector)
	}
}

// podMonitor.enabled: a PodMonitor for the daemon pods' named metrics port;
// the rest of the chart is what it is without it.
func TestChartPodMonitor(t *testing.T) {
	b, _ := chartBundle(t, releaseName, map[string]any{"podMonitor": map[string]any{
		"enabled": true, "labels": map[string]any{"release": "kps"}, "interval": "30s",
	}})
	checkBundle(t, b, wantDefaults())
	pm := b.podMonitor
	if pm == nil {
		t.Fatal("podMonitor.enabled=true rendered no PodMonitor")
	}
	if b.serviceMonitor != nil || b.metricsService != nil || b.prometheusRule != nil {
		t.Error("podMonitor.enabled rendered a ServiceMonitor, Service or PrometheusRule too")
	}
	checkSelects(t, "PodMonitor", b, pm.ObjectMeta, pm.Spec.Selector, pm.Spec.NamespaceSelector)
	if len(pm.Spec.PodMetricsEndpoints) != 1 {
		t.Fatalf("PodMonitor has %d endpoints, want 1", len(pm.Spec.PodMetricsEndpoints))
	}
	e := pm.Spec.PodMetricsEndpoints[0]
	c := b.daemonSet.Spec.Template.Spec.Containers[0]
	if got := resolvePort(c, intstr.FromString(e.Port)); got != wantDefaults().metricsPort {
		t.Errorf("PodMonitor port %q is container port %d, want the metrics port %d", e.Port, got, wantDefaults().metricsPort)
	}
	checkEndpoint(t, "PodMonitor", e, "30s")
}

// serviceMonitor.enabled: a headless Service over the daemon pods' metrics
// port and a ServiceMonitor for it.
func TestChartServiceMonitor(t *testing.T) {
	b, _ := chartBundle(t, releaseName, map[string]any{"metricsPort": 9100, "serviceMonitor": map[string]any{
		"enabled": true, "labels": map[string]any{"release": "kps"},
	}})
	w := wantDefaults()
	w.metricsPort = 9100
	checkBundle(t, b, w)
	sm, svc := b.serviceMonitor, b.metricsService
	if sm == nil || svc == nil {
		t.Fatalf("serviceMonitor.enabled=true rendered ServiceMonitor %v Service %v, want both", sm != nil, svc != nil)
	}
	if b.podMonitor != nil || b.prometheusRule != nil {
		t.Error("serviceMonitor.enabled rendered a PodMonitor or PrometheusRule too")
	}
	checkSelects(t, "ServiceMonitor", b, sm.ObjectMeta, sm.Spec.Selector, sm.Spec.NamespaceSelector)

	if svc.Name != releaseName+"-metrics" || svc.Namespace != releaseNamespace || svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("Service %s/%s clusterIP %q, want headless %s/%s-metrics", svc.Namespace, svc.Name, svc.Spec.ClusterIP, releaseNamespace, releaseName)
	}
	if !reflect.DeepEqual(svc.Spec.Selector, b.daemonSet.Spec.Selector.MatchLabels) {
		t.Errorf("Service selector %v, want the DaemonSet's %v", svc.Spec.Selector, b.daemonSet.Spec.Selector.MatchLabels)
	}
	for k, v := range sm.Spec.Selector.MatchLabels {
		if svc.Labels[k] != v {
			t.Errorf("ServiceMonitor selects %s=%s, which the Service (labels %v) lacks", k, v, svc.Labels)
		}
	}
	if len(svc.Spec.Ports) != 1 || len(sm.Spec.Endpoints) != 1 {
		t.Fatalf("Service has %d ports and ServiceMonitor %d endpoints, want 1 and 1", len(svc.Spec.Ports), len(sm.Spec.Endpoints))
	}
	sp, e := svc.Spec.Ports[0], sm.Spec.Endpoints[0]
	c := b.daemonSet.Spec.Template.Spec.Containers[0]
	if sp.Name != e.Port || sp.Port != 9100 || resolvePort(c, sp.TargetPort) != 9100 {
		t.Errorf("Service port %+v and ServiceMonitor port %q, want port metrics 9100 to the container's metrics port", sp, e.Port)
	}
	checkEndpoint(t, "ServiceMonitor", e, "")

	// Helm's longest release name (53 characters) still names a Service
	// within the 63 characters of a DNS label.
	long, _ := chartBundle(t, strings.Repeat("r", 53), map[string]any{"serviceMonitor": map[string]any{"enabled": true}})
	if n := long.metricsService.Name; len(n) > 63 || strings.HasSuffix(n, "-") {
		t.Errorf("Service name %q under a 53-character release: not a DNS label", n)
	}
}

// Both monitors at once would scrape every daemon twice: the install fails
// saying so.
func TestChartRefusesBothMonitors(t *testing.T) {
	_, err := renderChart(releaseName, map[string]any{
		"podMonitor": map[string]any{"enabled": true}, "serviceMonitor": map[string]any{"enabled": true},
	})
	if err == nil || !strings.Contains(err.Error(), "not both") {
		t.Fatalf("both monitors rendered with error %v, want one saying to turn on one, not both", err)
	}
}

// prometheusRule.enabled: the plain rules file's groups, unchanged by the
// round trip through helm (the alerts' {{ $labels }} templates included).
func TestChartPrometheusRule(t *testing.T) {
	b, _ := chartBundle(t, releaseName, map[string]any{"prometheusRule": map[string]any{
		"enabled": true, "labels": map[string]any{"release": "kps"},
	}})
	pr := b.prometheusRule
	if pr == nil {
		t.Fatal("prometheusRule.enabled=true rendered no PrometheusRule")
	}
	if pr.Name != releaseName || pr.Namespace != releaseNamespace || pr.Labels["release"] != "kps" {
		t.Errorf("PrometheusRule %s/%s labels %v, want %s/%s with release=kps", pr.Namespace, pr.Name, pr.Labels, releaseNamespace, releaseName)
	}
	if want := readRules(t, rulesFile); !reflect.DeepEqual(pr.Spec, want) {
		t.Errorf("PrometheusRule spec differs from %s:\n got %+v\nwant %+v", rulesFile, pr.Spec, want)
	}
	if !strings.Contains(pr.Spec.Groups[0].Rules[0].Annotations["summary"], "{{ $labels.netns }}") {
		t.Errorf("the alert templates did not reach the PrometheusRule untouched: %q", pr.Spec.Groups[0].Rules[0].Annotations["summary"])
	}
}

// promtool is $PROMTOOL (make test-deploy sets it from scripts/promtool.sh)
// or the one on PATH; under CI=true its absence fails the test.
func promtool(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("PROMTOOL"); p != "" {
		return p
	}
	if p, err := exec.LookPath("promtool"); err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("no promtool: make test-deploy gets it with scripts/promtool.sh")
	}
	t.Skip("no promtool: run `make test-deploy`, or PROMTOOL=$(scripts/promtool.sh) go test ./...")
	return ""
}

// The rules pass `promtool check rules`, as the plain file and as the
// chart renders them, and `promtool test rules`: each alert fires on the
// series the daemon exports and not on healthy ones.
func TestRulesPassPromtool(t *testing.T) {
	bin := promtool(t)
	b, _ := chartBundle(t, releaseName, map[string]any{"prometheusRule": map[string]any{"enabled": true}})
	fromChart, err := yaml.Marshal(b.prometheusRule.Spec)
	if err != nil {
		t.Fatal(err)
	}
	rendered := filepath.Join(t.TempDir(), "chart-rules.yaml")
	if err := os.WriteFile(rendered, fromChart, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"check", "rules", rulesFile},
		{"check", "rules", rendered},
		{"test", "rules", rulesTestFile},
	} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("%s: %v", bin, err)
			}
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		} else if !strings.Contains(string(out), "SUCCESS") {
			t.Errorf("promtool %s said no SUCCESS:\n%s", strings.Join(args, " "), out)
		}
	}
}
