package deploy

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/strvals"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/yaml"
)

// Every file of deploy/kubernetes is listed in the kustomization and decodes
// strictly on its own, and the kustomization itself has no unknown field.
func TestKustomizationFilesDecodeStrictly(t *testing.T) {
	var k types.Kustomization
	decodeFileStrict(t, filepath.Join(kustomizeDir, "kustomization.yaml"), &k)
	entries, err := os.ReadDir(kustomizeDir)
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, e := range entries {
		if e.Name() != "kustomization.yaml" {
			files = append(files, e.Name())
		}
	}
	listed := append([]string(nil), k.Resources...)
	sort.Strings(listed)
	if !reflect.DeepEqual(files, listed) {
		t.Errorf("deploy/kubernetes holds %v but kustomization.yaml lists %v", files, listed)
	}
	b := &bundle{}
	for _, f := range k.Resources {
		obj, err := decodeStrict(readFile(t, filepath.Join(kustomizeDir, f)))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if err := b.add(obj); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
	}
	if err := b.complete(true); err != nil {
		t.Fatal(err)
	}
}

// What `kubectl apply -k deploy/kubernetes` applies has every field the issue
// and the controller contract ask for.
func TestKustomizeBuild(t *testing.T) {
	checkBundle(t, kustomizeBundle(t, kustomizeDir), wantDefaults())
}

// The decoding the other tests rely on refuses what the API server would
// refuse (or silently drop): an unknown field, a field in the wrong case, a
// duplicate key, an unknown kind.
func TestStrictDecodeRefusesTypos(t *testing.T) {
	ds := string(readFile(t, filepath.Join(kustomizeDir, "daemonset.yaml")))
	for _, c := range []struct {
		name, old, new, wantErr string
	}{
		{"unknown field", "      hostPID: false\n", "      hostPID: false\n      hostPid: true\n", `unknown field "spec.template.spec.hostPid"`},
		{"wrong case", "              readOnly: true\n", "              readonly: true\n", `unknown field "spec.template.spec.containers[0].volumeMounts[1].readonly"`},
		{"duplicate key", "      hostPID: false\n", "      hostPID: false\n      hostPID: true\n", `key "hostPID" already set`},
		{"unknown kind", "kind: DaemonSet\n", "kind: DaemonSett\n", `unexpected object apiVersion "apps/v1" kind "DaemonSett"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			bad := strings.Replace(ds, c.old, c.new, 1)
			if bad == ds {
				t.Fatalf("daemonset.yaml has no %q to change", c.old)
			}
			_, err := decodeStrict([]byte(bad))
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Fatalf("decode gave error %v, want one containing %s", err, c.wantErr)
			}
		})
	}
	if _, err := decodeStrict([]byte(ds)); err != nil {
		t.Fatalf("the unchanged daemonset.yaml: %v", err)
	}
}

// Chart.yaml has no unknown field and the chart passes helm's own checks.
func TestChartMetadata(t *testing.T) {
	var md chart.Metadata
	decodeFileStrict(t, filepath.Join(chartDir, "Chart.yaml"), &md)
	if err := md.Validate(); err != nil {
		t.Fatalf("Chart.yaml: %v", err)
	}
	// The default image tag is appVersion: it must be the tag `make image` builds.
	if md.Name != "nsredirect" || md.AppVersion != "latest" {
		t.Errorf("Chart.yaml name %q appVersion %q, want nsredirect and latest (make image builds nsredirect:latest)", md.Name, md.AppVersion)
	}
}

// helm's labels, which only the chart sets. app.kubernetes.io/instance is
// not among them: `helm install nsredirect` must give the same selector.
var helmOnlyLabels = []string{"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version"}

// The chart with its default values renders the same objects as
// deploy/kubernetes, field by field, but for helm's own labels (and the
// Namespace, which `helm install --create-namespace` makes).
func TestChartDefaultsMatchKustomize(t *testing.T) {
	fromChart, notes := chartBundle(t, releaseName, nil)
	checkBundle(t, fromChart, wantDefaults())
	if !strings.Contains(notes, defaultAnnotation+`: "80=3210"`) {
		t.Errorf("NOTES.txt does not show the annotation:\n%s", notes)
	}

	fromKustomize := kustomizeBundle(t, kustomizeDir)
	for _, labels := range []map[string]string{
		fromChart.quota.Labels, fromChart.account.Labels, fromChart.role.Labels, fromChart.binding.Labels,
		fromChart.daemonSet.Labels, fromChart.daemonSet.Spec.Template.Labels,
	} {
		for _, l := range helmOnlyLabels {
			if _, ok := labels[l]; !ok {
				t.Errorf("chart object labels %v lack %s", labels, l)
			}
			delete(labels, l)
		}
	}
	for _, pair := range []struct {
		kind         string
		chart, kusto any
	}{
		{"ResourceQuota", fromChart.quota, fromKustomize.quota},
		{"ServiceAccount", fromChart.account, fromKustomize.account},
		{"ClusterRole", fromChart.role, fromKustomize.role},
		{"ClusterRoleBinding", fromChart.binding, fromKustomize.binding},
		{"DaemonSet", fromChart.daemonSet, fromKustomize.daemonSet},
	} {
		for _, d := range diff(t, pair.chart, pair.kusto) {
			t.Errorf("%s: chart != deploy/kubernetes at %s", pair.kind, d)
		}
	}
}

// diff lists the paths where two objects' JSON forms differ, as
// "PATH: A != B".
func diff(t *testing.T, a, b any) []string {
	t.Helper()
	var ma, mb any
	for _, p := range []struct {
		from any
		to   *any
	}{{a, &ma}, {b, &mb}} {
		js, err := json.Marshal(p.from)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(js, p.to); err != nil {
			t.Fatal(err)
		}
	}
	var out []string
	var walk func(path string, x, y any)
	walk = func(path string, x, y any) {
		switch xv := x.(type) {
		case map[string]any:
			yv, ok := y.(map[string]any)
			if !ok {
				break
			}
			keys := map[string]bool{}
			for k := range xv {
				keys[k] = true
			}
			for k := range yv {
				keys[k] = true
			}
			sorted := make([]string, 0, len(keys))
			for k := range keys {
				sorted = append(sorted, k)
			}
			sort.Strings(sorted)
			for _, k := range sorted {
				walk(path+"."+k, xv[k], yv[k])
			}
			return
		case []any:
			yv, ok := y.([]any)
			if !ok || len(xv) != len(yv) {
				break
			}
			for i := range xv {
				walk(fmt.Sprintf("%s[%d]", path, i), xv[i], yv[i])
			}
			return
		}
		if !reflect.DeepEqual(x, y) {
			out = append(out, fmt.Sprintf("%s: %v != %v", path, x, y))
		}
	}
	walk("", ma, mb)
	return out
}

// Overridden values reach every field that depends on them: the annotation
// key (as --annotation), the metrics port (container port, probes, args and
// the Prometheus annotation), the image, the cgroup2 host path, tolerations,
// node selector, resources, priority class and extra pod annotations; given
// as a values file (helm install -f) and as --set.
func TestChartValuesOverride(t *testing.T) {
	valuesFile := `
image:
  repository: registry.example/nsredirect
  tag: v1.2.3
  pullPolicy: Always
annotation: example.com/loopback-redirect
metricsPort: 9100
logFormat: text
cgroup2HostPath: /sys/fs/cgroup/unified
tolerations:
  - key: dedicated
    operator: Equal
    value: db
    effect: NoSchedule
nodeSelector:
  kubernetes.io/os: linux
  example.com/nsredirect: "yes"
resources:
  requests: {cpu: 20m, memory: 48Mi}
  limits: {memory: 256Mi}
priorityClassName: ""
podAnnotations:
  example.com/team: net
`
	fromFile, err := chartutil.ReadValues([]byte(valuesFile))
	if err != nil {
		t.Fatal(err)
	}
	w := wantDefaults()
	w.image = "registry.example/nsredirect:v1.2.3"
	w.pullPolicy = corev1.PullAlways
	w.annotation = "example.com/loopback-redirect"
	w.metricsPort = 9100
	w.logFormat = "text"
	w.cgroup2 = "/sys/fs/cgroup/unified"
	w.tolerations = []corev1.Toleration{{Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "db", Effect: corev1.TaintEffectNoSchedule}}
	w.nodeSelector = map[string]string{"kubernetes.io/os": "linux", "example.com/nsredirect": "yes"}
	w.requests = corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("20m"), corev1.ResourceMemory: resource.MustParse("48Mi")}
	w.limits = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")}
	w.priorityClass = ""
	w.extraPodAnn = map[string]string{"example.com/team": "net"}
	t.Run("values file", func(t *testing.T) {
		b, notes := chartBundle(t, releaseName, fromFile)
		checkBundle(t, b, w)
		if !strings.Contains(notes, "example.com/loopback-redirect:") || !strings.Contains(notes, "/sys/fs/cgroup/unified") {
			t.Errorf("NOTES.txt does not follow the values:\n%s", notes)
		}
	})

	// --set gives integers where a values file gives float64s.
	t.Run("--set", func(t *testing.T) {
		set, err := strvals.Parse("annotation=example.com/loopback-redirect,metricsPort=9100,image.tag=v1.2.3")
		if err != nil {
			t.Fatal(err)
		}
		w := wantDefaults()
		w.annotation = "example.com/loopback-redirect"
		w.metricsPort = 9100
		w.image = "nsredirect:v1.2.3"
		b, _ := chartBundle(t, releaseName, set)
		checkBundle(t, b, w)
	})

	// Another release name names every object, and the references between
	// them, RELEASE-nsredirect.
	t.Run("release name", func(t *testing.T) {
		b, _ := chartBundle(t, "edge", nil)
		w := wantDefaults()
		w.name = "edge-nsredirect"
		checkBundle(t, b, w)
		if got := b.daemonSet.Spec.Selector.MatchLabels["app.kubernetes.io/instance"]; got != "edge" {
			t.Errorf("selector instance label is %q, want the release name edge", got)
		}
	})

	// Scraping can be switched off through podAnnotations.
	t.Run("scrape off", func(t *testing.T) {
		b, _ := chartBundle(t, releaseName, map[string]any{"podAnnotations": map[string]any{"prometheus.io/scrape": "false"}})
		if got := b.daemonSet.Spec.Template.Annotations["prometheus.io/scrape"]; got != "false" {
			t.Errorf("prometheus.io/scrape is %q, want the override false", got)
		}
	})
}

// Bad values fail at install time with helm's schema error naming the value,
// instead of rendering a daemon that cannot start.
func TestChartRefusesBadValues(t *testing.T) {
	for _, c := range []struct {
		set, field string
	}{
		{"metricsPort=0", "metricsPort"},
		{"metricsPort=70000", "metricsPort"},
		{"metricsPort=abc", "metricsPort"},
		{"annotation=not a key!", "annotation"},
		{"annotation=", "annotation"},
		{"logFormat=xml", "logFormat"},
		{"cgroup2HostPath=sys/fs/cgroup", "cgroup2HostPath"},
		{"image.pullPolicy=Sometimes", "pullPolicy"},
		{"podMonitor.enable=true", "enable"},
		{"podMonitor.interval=30", "interval"},
		{"serviceMonitor.scrapeTimeout=10sec", "scrapeTimeout"},
		{"prometheusRule.enabled=yes", "enabled"},
		{"prometheusRule.labels.release=1", "release"},
	} {
		t.Run(c.set, func(t *testing.T) {
			vals, err := strvals.Parse(c.set)
			if err != nil {
				t.Fatal(err)
			}
			_, err = renderChart(releaseName, vals)
			if err == nil || !strings.Contains(err.Error(), c.field) {
				t.Fatalf("--set %s rendered with error %v, want a schema error naming %s", c.set, err, c.field)
			}
		})
	}
}

// kubectl's own kustomize (what `kubectl apply -k` runs) builds the same
// objects as the krusty the other tests use. kubectl is optional here: CI
// machines need not have it.
func TestKubectlKustomizeMatchesKrusty(t *testing.T) {
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Skip("kubectl is not on PATH; the in-process kustomize build is checked by the other tests")
	}
	out, err := exec.Command(kubectl, "kustomize", kustomizeDir).Output()
	if err != nil {
		t.Fatalf("%s kustomize %s: %v", kubectl, kustomizeDir, err)
	}
	var fromKubectl []any
	for _, doc := range strings.Split(string(out), "\n---\n") {
		var obj any
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			t.Fatalf("kubectl kustomize output: %v\n%s", err, doc)
		}
		fromKubectl = append(fromKubectl, obj)
	}
	var fromKrusty []any
	for _, doc := range kustomizeYAML(t, kustomizeDir) {
		var obj any
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			t.Fatal(err)
		}
		fromKrusty = append(fromKrusty, obj)
	}
	if len(fromKubectl) != len(fromKrusty) {
		t.Fatalf("kubectl kustomize gives %d objects, krusty %d", len(fromKubectl), len(fromKrusty))
	}
	for i := range fromKrusty {
		for _, d := range diff(t, fromKubectl[i], fromKrusty[i]) {
			t.Errorf("object %d: kubectl kustomize != krusty at %s", i, d)
		}
	}
}
