// Package deploy checks the Kubernetes manifests and the Helm chart without a
// cluster: both are built in-process (kustomize's krusty, as `kubectl apply
// -k` does; helm's engine, as `helm install` does), decoded strictly into
// k8s.io/api types and checked field by field.
package deploy

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/releaseutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// Paths from this module's directory (go test runs in test/deploy).
var (
	repoRoot       = filepath.Join("..", "..")
	kustomizeDir   = filepath.Join(repoRoot, "deploy", "kubernetes")
	chartDir       = filepath.Join(repoRoot, "deploy", "helm", "nsredirect")
	dockerfilePath = filepath.Join(repoRoot, "Dockerfile")
)

// releaseName and releaseNamespace are docs/kubernetes.md's `helm install nsredirect
// ... -n nsredirect`, under which the chart must match deploy/kubernetes.
const (
	releaseName      = "nsredirect"
	releaseNamespace = "nsredirect"
)

// bundle holds the objects nsredirect installs, one of each kind.
type bundle struct {
	namespace *corev1.Namespace
	quota     *corev1.ResourceQuota
	account   *corev1.ServiceAccount
	role      *rbacv1.ClusterRole
	binding   *rbacv1.ClusterRoleBinding
	daemonSet *appsv1.DaemonSet

	// Only with the chart's Prometheus Operator options (observe_test.go).
	metricsService *corev1.Service
	podMonitor     *podMonitor
	serviceMonitor *serviceMonitor
	prometheusRule *prometheusRule
}

// strictJSON decodes JSON the way the API server does with
// fieldValidation=Strict: field names are case-sensitive, and unknown or
// duplicate fields are errors. encoding/json would quietly accept
// `readonly` for `readOnly`; the API server would then drop it.
func strictJSON(js []byte, into any) error {
	strictErrs, err := kjson.UnmarshalStrict(js, into)
	if err != nil {
		return err
	}
	return errors.Join(strictErrs...)
}

// decodeStrict decodes one YAML document into the k8s.io/api type its
// apiVersion and kind name. Only the kinds nsredirect installs are accepted.
func decodeStrict(doc []byte) (any, error) {
	js, err := yaml.YAMLToJSONStrict(doc) // duplicate keys are errors
	if err != nil {
		return nil, fmt.Errorf("parse YAML: %w", err)
	}
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := json.Unmarshal(js, &head); err != nil {
		return nil, fmt.Errorf("read apiVersion and kind: %w", err)
	}
	var obj any
	switch head.APIVersion + " " + head.Kind {
	case "v1 Namespace":
		obj = &corev1.Namespace{}
	case "v1 ResourceQuota":
		obj = &corev1.ResourceQuota{}
	case "v1 ServiceAccount":
		obj = &corev1.ServiceAccount{}
	case "rbac.authorization.k8s.io/v1 ClusterRole":
		obj = &rbacv1.ClusterRole{}
	case "rbac.authorization.k8s.io/v1 ClusterRoleBinding":
		obj = &rbacv1.ClusterRoleBinding{}
	case "apps/v1 DaemonSet":
		obj = &appsv1.DaemonSet{}
	case "v1 Service":
		obj = &corev1.Service{}
	case monitoringV1 + " PodMonitor":
		obj = &podMonitor{}
	case monitoringV1 + " ServiceMonitor":
		obj = &serviceMonitor{}
	case monitoringV1 + " PrometheusRule":
		obj = &prometheusRule{}
	default:
		return nil, fmt.Errorf("unexpected object apiVersion %q kind %q", head.APIVersion, head.Kind)
	}
	if err := strictJSON(js, obj); err != nil {
		return nil, fmt.Errorf("decode %s strictly: %w", head.Kind, err)
	}
	return obj, nil
}

// add files a decoded object; a second object of the same kind is an error.
func (b *bundle) add(obj any) error {
	dup := false
	switch o := obj.(type) {
	case *corev1.Namespace:
		dup, b.namespace = b.namespace != nil, o
	case *corev1.ResourceQuota:
		dup, b.quota = b.quota != nil, o
	case *corev1.ServiceAccount:
		dup, b.account = b.account != nil, o
	case *rbacv1.ClusterRole:
		dup, b.role = b.role != nil, o
	case *rbacv1.ClusterRoleBinding:
		dup, b.binding = b.binding != nil, o
	case *appsv1.DaemonSet:
		dup, b.daemonSet = b.daemonSet != nil, o
	case *corev1.Service:
		dup, b.metricsService = b.metricsService != nil, o
	case *podMonitor:
		dup, b.podMonitor = b.podMonitor != nil, o
	case *serviceMonitor:
		dup, b.serviceMonitor = b.serviceMonitor != nil, o
	case *prometheusRule:
		dup, b.prometheusRule = b.prometheusRule != nil, o
	default:
		return fmt.Errorf("unexpected object %T", obj)
	}
	if dup {
		return fmt.Errorf("two objects of type %T", obj)
	}
	return nil
}

// complete reports a missing object. The chart has no Namespace (helm
// install --create-namespace makes it), so it is asked for separately. The
// ResourceQuota depends on the priority class: checkBundle checks it.
func (b *bundle) complete(withNamespace bool) error {
	var missing []string
	if withNamespace && b.namespace == nil {
		missing = append(missing, "Namespace")
	}
	if !withNamespace && b.namespace != nil {
		return errors.New("a Namespace object, which `--create-namespace` makes")
	}
	for name, present := range map[string]bool{
		"ServiceAccount":     b.account != nil,
		"ClusterRole":        b.role != nil,
		"ClusterRoleBinding": b.binding != nil,
		"DaemonSet":          b.daemonSet != nil,
	} {
		if !present {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return fmt.Errorf("missing %s", strings.Join(missing, ", "))
	}
	return nil
}

// kustomizeYAML builds a kustomization directory exactly as `kubectl apply
// -k` does, and returns one YAML document per object.
func kustomizeYAML(t *testing.T, dir string) [][]byte {
	t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var docs [][]byte
	for _, r := range m.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatalf("kustomize build %s: %s as YAML: %v", dir, r.CurId(), err)
		}
		docs = append(docs, y)
	}
	return docs
}

// kustomizeBundle is a kustomization built and decoded strictly.
func kustomizeBundle(t *testing.T, dir string) *bundle {
	t.Helper()
	b := &bundle{}
	for _, doc := range kustomizeYAML(t, dir) {
		obj, err := decodeStrict(doc)
		if err != nil {
			t.Fatalf("kustomize build %s: %v\n%s", dir, err, doc)
		}
		if err := b.add(obj); err != nil {
			t.Fatalf("kustomize build %s: %v", dir, err)
		}
	}
	if err := b.complete(true); err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	return b
}

// renderChart renders the chart as `helm install RELEASE -n nsredirect`
// would with the given values on top of values.yaml (nil: the defaults),
// after the values.schema.json check helm makes. It returns the rendered
// files by template path.
func renderChart(release string, overrides map[string]any) (map[string]string, error) {
	ch, err := loader.Load(chartDir)
	if err != nil {
		return nil, fmt.Errorf("load chart %s: %w", chartDir, err)
	}
	vals, err := chartutil.ToRenderValues(ch, overrides, chartutil.ReleaseOptions{
		Name: release, Namespace: releaseNamespace, Revision: 1, IsInstall: true,
	}, chartutil.DefaultCapabilities)
	if err != nil {
		return nil, fmt.Errorf("chart values: %w", err)
	}
	// Strict: a template naming a value that does not exist fails, as
	// under `helm lint --strict`.
	files, err := engine.Engine{Strict: true}.Render(ch, vals)
	if err != nil {
		return nil, fmt.Errorf("render chart: %w", err)
	}
	return files, nil
}

// chartBundle renders the chart and decodes every manifest strictly. It also
// returns the rendered NOTES.txt.
func chartBundle(t *testing.T, release string, overrides map[string]any) (*bundle, string) {
	t.Helper()
	files, err := renderChart(release, overrides)
	if err != nil {
		t.Fatal(err)
	}
	b := &bundle{}
	var notes string
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		switch {
		case strings.HasSuffix(p, "NOTES.txt"):
			notes = files[p]
			continue
		case strings.HasSuffix(p, ".tpl"):
			continue
		}
		for _, doc := range releaseutil.SplitManifests(files[p]) {
			if onlyComments(doc) {
				continue
			}
			obj, err := decodeStrict([]byte(doc))
			if err != nil {
				t.Fatalf("chart %s: %v\n%s", p, err, doc)
			}
			if err := b.add(obj); err != nil {
				t.Fatalf("chart %s: %v", p, err)
			}
		}
	}
	if err := b.complete(false); err != nil {
		t.Fatalf("chart: %v", err)
	}
	if notes == "" {
		t.Fatal("chart: no NOTES.txt rendered")
	}
	return b, notes
}

// onlyComments reports a document with nothing but comments and blank lines
// (what a template whose body is disabled leaves).
func onlyComments(doc string) bool {
	for _, line := range strings.Split(doc, "\n") {
		if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

// decodeFileStrict decodes a YAML file strictly into a typed struct (a
// Kustomization, a chart's metadata).
func decodeFileStrict(t *testing.T, path string, into any) {
	t.Helper()
	js, err := yaml.YAMLToJSONStrict(readFile(t, path))
	if err == nil {
		err = strictJSON(js, into)
	}
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
