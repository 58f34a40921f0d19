package deploy

import (
	"bufio"
	"bytes"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// defaultAnnotation is the controller's default --annotation: the daemon is
// started without the flag when this is the key.
const defaultAnnotation = "nsredirect.io/redirect"

// want is what one install must produce; wantDefaults is deploy/kubernetes.
type want struct {
	name, namespace string
	image           string
	pullPolicy      corev1.PullPolicy
	annotation      string
	metricsPort     int32
	logFormat       string
	cgroup2         string
	tolerations     []corev1.Toleration
	nodeSelector    map[string]string
	priorityClass   string
	requests        corev1.ResourceList
	limits          corev1.ResourceList
	extraPodAnn     map[string]string
}

func wantDefaults() want {
	return want{
		name:          "nsredirect",
		namespace:     "nsredirect",
		image:         "nsredirect:latest",
		pullPolicy:    corev1.PullIfNotPresent,
		annotation:    defaultAnnotation,
		metricsPort:   9590,
		logFormat:     "json",
		cgroup2:       "/sys/fs/cgroup",
		tolerations:   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
		nodeSelector:  map[string]string{"kubernetes.io/os": "linux"},
		priorityClass: "system-node-critical",
		requests: corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse("10m"),
			corev1.ResourceMemory: resource.MustParse("32Mi"),
		},
		limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("128Mi")},
	}
}

// The RBAC rules, exactly: read pods, create events and list them (a
// restarted daemon looks for the Warning it posted before). No patch: the
// daemon records events with plain creates.
var wantRules = []rbacv1.PolicyRule{
	{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}},
	{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "list"}},
}

// The capabilities, exactly, spelled without CAP_ as Kubernetes expects.
var wantCapAdd = []corev1.Capability{"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}

// checkBundle checks every field the issue and the controller contract name.
func checkBundle(t *testing.T, b *bundle, w want) {
	t.Helper()

	if b.namespace != nil {
		if b.namespace.Name != w.namespace {
			t.Errorf("Namespace is %q, want %q", b.namespace.Name, w.namespace)
		}
		// Without it a cluster enforcing baseline refuses the daemon pods.
		if got := b.namespace.Labels["pod-security.kubernetes.io/enforce"]; got != "privileged" {
			t.Errorf("Namespace label pod-security.kubernetes.io/enforce is %q, want privileged", got)
		}
	}

	checkQuota(t, b, w)

	if b.account.Name != w.name || b.account.Namespace != w.namespace {
		t.Errorf("ServiceAccount is %s/%s, want %s/%s", b.account.Namespace, b.account.Name, w.namespace, w.name)
	}
	if b.role.Name != w.name {
		t.Errorf("ClusterRole is %q, want %q", b.role.Name, w.name)
	}
	if !reflect.DeepEqual(b.role.Rules, wantRules) {
		t.Errorf("ClusterRole rules are %+v,\nwant exactly %+v", b.role.Rules, wantRules)
	}
	if b.role.AggregationRule != nil {
		t.Errorf("ClusterRole aggregates other roles: %+v", b.role.AggregationRule)
	}
	wantRef := rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: w.name}
	if b.binding.Name != w.name || b.binding.RoleRef != wantRef {
		t.Errorf("ClusterRoleBinding %q binds %+v, want %q binding %+v", b.binding.Name, b.binding.RoleRef, w.name, wantRef)
	}
	wantSubjects := []rbacv1.Subject{{Kind: "ServiceAccount", Name: w.name, Namespace: w.namespace}}
	if !reflect.DeepEqual(b.binding.Subjects, wantSubjects) {
		t.Errorf("ClusterRoleBinding subjects are %+v, want %+v", b.binding.Subjects, wantSubjects)
	}

	ds := b.daemonSet
	if ds.Name != w.name || ds.Namespace != w.namespace {
		t.Errorf("DaemonSet is %s/%s, want %s/%s", ds.Namespace, ds.Name, w.namespace, w.name)
	}
	checkUpdateStrategy(t, b)
	checkPodSpec(t, b, w)
}

// checkQuota: GKE admits a system-critical priority class outside
// kube-system only in a namespace with a ResourceQuota scoped to it. The
// quota must admit the class and never bind a DaemonSet.
func checkQuota(t *testing.T, b *bundle, w want) {
	t.Helper()
	critical := w.priorityClass == "system-node-critical" || w.priorityClass == "system-cluster-critical"
	if !critical {
		if b.quota != nil {
			t.Errorf("ResourceQuota %s without a system-critical priority class", b.quota.Name)
		}
		return
	}
	q := b.quota
	if q == nil {
		t.Fatalf("no ResourceQuota for priority class %s: GKE would refuse the daemon pods", w.priorityClass)
	}
	if q.Name != w.name+"-critical-pods" || q.Namespace != w.namespace {
		t.Errorf("ResourceQuota is %s/%s, want %s/%s-critical-pods", q.Namespace, q.Name, w.namespace, w.name)
	}
	wantScope := &corev1.ScopeSelector{MatchExpressions: []corev1.ScopedResourceSelectorRequirement{{
		ScopeName: corev1.ResourceQuotaScopePriorityClass, Operator: corev1.ScopeSelectorOpIn, Values: []string{w.priorityClass},
	}}}
	if !reflect.DeepEqual(q.Spec.ScopeSelector, wantScope) || len(q.Spec.Scopes) != 0 {
		t.Errorf("ResourceQuota scopes %v selector %+v, want only %+v", q.Spec.Scopes, q.Spec.ScopeSelector, wantScope)
	}
	pods, ok := q.Spec.Hard[corev1.ResourcePods]
	if len(q.Spec.Hard) != 1 || !ok || pods.Cmp(resource.MustParse("1M")) < 0 {
		t.Errorf("ResourceQuota hard %v, want pods only, far above any node count", q.Spec.Hard)
	}
}

func checkUpdateStrategy(t *testing.T, b *bundle) {
	t.Helper()
	us := b.daemonSet.Spec.UpdateStrategy
	one, zero := intstr.FromInt32(1), intstr.FromInt32(0)
	if us.Type != "RollingUpdate" || us.RollingUpdate == nil ||
		us.RollingUpdate.MaxSurge == nil || *us.RollingUpdate.MaxSurge != one ||
		us.RollingUpdate.MaxUnavailable == nil || *us.RollingUpdate.MaxUnavailable != zero {
		t.Errorf("updateStrategy is %+v (rollingUpdate %+v), want RollingUpdate with maxSurge 1, maxUnavailable 0: the successor must start before the old daemon stops",
			us, us.RollingUpdate)
	}
	sel := b.daemonSet.Spec.Selector
	if sel == nil || len(sel.MatchLabels) == 0 || len(sel.MatchExpressions) != 0 {
		t.Fatalf("DaemonSet selector is %+v, want matchLabels only", sel)
	}
	for k, v := range sel.MatchLabels {
		if b.daemonSet.Spec.Template.Labels[k] != v {
			t.Errorf("selector label %s=%s is not on the pod template (%v)", k, v, b.daemonSet.Spec.Template.Labels)
		}
	}
}

func checkPodSpec(t *testing.T, b *bundle, w want) {
	t.Helper()
	tmpl := b.daemonSet.Spec.Template
	spec := tmpl.Spec
	if spec.ServiceAccountName != w.name {
		t.Errorf("serviceAccountName is %q, want %q", spec.ServiceAccountName, w.name)
	}
	if spec.HostPID || spec.HostNetwork || spec.HostIPC {
		t.Errorf("hostPID %v hostNetwork %v hostIPC %v, want all false: the host /proc mount gives the pids",
			spec.HostPID, spec.HostNetwork, spec.HostIPC)
	}
	if spec.TerminationGracePeriodSeconds == nil || *spec.TerminationGracePeriodSeconds != 30 {
		t.Errorf("terminationGracePeriodSeconds is %v, want 30", spec.TerminationGracePeriodSeconds)
	}
	if spec.PriorityClassName != w.priorityClass {
		t.Errorf("priorityClassName is %q, want %q", spec.PriorityClassName, w.priorityClass)
	}
	if !reflect.DeepEqual(spec.Tolerations, w.tolerations) {
		t.Errorf("tolerations are %+v, want %+v", spec.Tolerations, w.tolerations)
	}
	if !reflect.DeepEqual(spec.NodeSelector, w.nodeSelector) {
		t.Errorf("nodeSelector is %v, want %v", spec.NodeSelector, w.nodeSelector)
	}
	if spec.SecurityContext != nil && !reflect.DeepEqual(*spec.SecurityContext, corev1.PodSecurityContext{}) {
		t.Errorf("pod securityContext is %+v, want none: the container's says it all", *spec.SecurityContext)
	}
	if len(spec.InitContainers) != 0 || len(spec.Containers) != 1 {
		t.Fatalf("%d init containers and %d containers, want 0 and 1", len(spec.InitContainers), len(spec.Containers))
	}

	wantAnn := map[string]string{
		"prometheus.io/scrape": "true",
		"prometheus.io/port":   strconv.Itoa(int(w.metricsPort)),
		"prometheus.io/path":   "/metrics",
	}
	for k, v := range w.extraPodAnn {
		wantAnn[k] = v
	}
	if !reflect.DeepEqual(tmpl.Annotations, wantAnn) {
		t.Errorf("pod template annotations are %v, want %v", tmpl.Annotations, wantAnn)
	}

	c := spec.Containers[0]
	if c.Image != w.image || c.ImagePullPolicy != w.pullPolicy {
		t.Errorf("image %q pull %q, want %q pull %q", c.Image, c.ImagePullPolicy, w.image, w.pullPolicy)
	}
	checkCommand(t, c, w)
	checkEnv(t, c)
	checkPortsAndProbes(t, c, w)
	checkResources(t, c, w)
	checkSecurityContext(t, c)
	checkMounts(t, c, spec.Volumes, w)
}

// checkCommand: the binary the image really has, and the controller's flags.
func checkCommand(t *testing.T, c corev1.Container, w want) {
	t.Helper()
	entry := prebuiltBinary(t)
	if !reflect.DeepEqual(c.Command, []string{entry}) {
		t.Errorf("command is %q, want [%s] (the Dockerfile's prebuilt stage)", c.Command, entry)
	}
	flags, err := parseArgs(c.Args)
	if err != nil {
		t.Fatalf("args %q: %v", c.Args, err)
	}
	wantFlags := map[string]string{
		"--proc":         "/host/proc",
		"--cgroup":       "/host/cgroup2",
		"--metrics-addr": fmt.Sprintf(":%d", w.metricsPort),
		"--log-format":   w.logFormat,
	}
	if w.annotation != defaultAnnotation {
		wantFlags["--annotation"] = w.annotation
	}
	if !reflect.DeepEqual(flags, wantFlags) {
		t.Errorf("args %q give flags %v, want exactly %v", c.Args, flags, wantFlags)
	}
}

// parseArgs reads `kube --flag value ...` into a map, refusing anything else.
func parseArgs(args []string) (map[string]string, error) {
	if len(args) == 0 || args[0] != "kube" {
		return nil, fmt.Errorf("the first argument must be the kube command")
	}
	rest := args[1:]
	if len(rest)%2 != 0 {
		return nil, fmt.Errorf("flags must come as --flag value pairs")
	}
	flags := map[string]string{}
	for i := 0; i < len(rest); i += 2 {
		if !strings.HasPrefix(rest[i], "--") || strings.Contains(rest[i], "=") {
			return nil, fmt.Errorf("%q is not a --flag", rest[i])
		}
		if _, dup := flags[rest[i]]; dup {
			return nil, fmt.Errorf("%s given twice", rest[i])
		}
		flags[rest[i]] = rest[i+1]
	}
	return flags, nil
}

// prebuiltBinary is where the Dockerfile's prebuilt stage (what `make image`
// builds) puts bin/nsredirect.
func prebuiltBinary(t *testing.T) string {
	t.Helper()
	sc := bufio.NewScanner(bytes.NewReader(readFile(t, dockerfilePath)))
	inStage := false
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 4 && strings.EqualFold(f[0], "FROM"):
			inStage = strings.EqualFold(f[2], "AS") && f[3] == "prebuilt"
		case inStage && len(f) == 3 && strings.EqualFold(f[0], "COPY") && f[1] == "bin/nsredirect":
			return f[2]
		}
	}
	t.Fatalf("%s: no `COPY bin/nsredirect DEST` in the stage `AS prebuilt`", dockerfilePath)
	return ""
}

func checkEnv(t *testing.T, c corev1.Container) {
	t.Helper()
	wantEnv := map[string]string{
		"NSREDIRECT_NODE_NAME":     "spec.nodeName",
		"NSREDIRECT_POD_NAME":      "metadata.name",
		"NSREDIRECT_POD_NAMESPACE": "metadata.namespace",
	}
	got := map[string]string{}
	for _, e := range c.Env {
		if e.Value != "" || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil {
			t.Errorf("env %s is not from the downward API: %+v", e.Name, e)
			continue
		}
		got[e.Name] = e.ValueFrom.FieldRef.FieldPath
	}
	if len(c.EnvFrom) != 0 || !reflect.DeepEqual(got, wantEnv) {
		t.Errorf("env fieldRefs are %v (envFrom %v), want exactly %v", got, c.EnvFrom, wantEnv)
	}
}

func checkPortsAndProbes(t *testing.T, c corev1.Container, w want) {
	t.Helper()
	wantPorts := []corev1.ContainerPort{{Name: "metrics", ContainerPort: w.metricsPort, Protocol: corev1.ProtocolTCP}}
	if !reflect.DeepEqual(c.Ports, wantPorts) {
		t.Errorf("ports are %+v, want %+v (no hostPort)", c.Ports, wantPorts)
	}
	for _, p := range []struct {
		kind  string
		probe *corev1.Probe
		path  string
	}{
		{"liveness", c.LivenessProbe, "/healthz"},
		{"readiness", c.ReadinessProbe, "/readyz"},
	} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s probe is %+v, want httpGet %s", p.kind, p.probe, p.path)
			continue
		}
		g := p.probe.HTTPGet
		if g.Path != p.path || g.Host != "" || (g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP) {
			t.Errorf("%s probe gets %s://%s%s, want path %s on the pod", p.kind, g.Scheme, g.Host, g.Path, p.path)
		}
		if port := resolvePort(c, g.Port); port != w.metricsPort {
			t.Errorf("%s probe port %s is %d, want the metrics port %d", p.kind, g.Port.String(), port, w.metricsPort)
		}
	}
	if c.StartupProbe != nil || c.Lifecycle != nil {
		t.Errorf("startupProbe %+v lifecycle %+v, want none", c.StartupProbe, c.Lifecycle)
	}
}

// resolvePort is what the kubelet probes: a named port or a number.
func resolvePort(c corev1.Container, p intstr.IntOrString) int32 {
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	return -1
}

func checkResources(t *testing.T, c corev1.Container, w want) {
	t.Helper()
	for _, l := range []struct {
		kind      string
		got, want corev1.ResourceList
	}{
		{"requests", c.Resources.Requests, w.requests},
		{"limits", c.Resources.Limits, w.limits},
	} {
		if !sameQuantities(l.got, l.want) {
			t.Errorf("resources.%s are %v, want %v", l.kind, l.got, l.want)
		}
	}
}

func sameQuantities(a, b corev1.ResourceList) bool {
	if len(a) != len(b) {
		return false
	}
	for k, q := range a {
		if qb, ok := b[k]; !ok || q.Cmp(qb) != 0 {
			return false
		}
	}
	return true
}

func checkSecurityContext(t *testing.T, c corev1.Container) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil {
		t.Fatal("container has no securityContext")
	}
	if sc.Privileged == nil || *sc.Privileged {
		t.Errorf("privileged is %v, want false", sc.Privileged)
	}
	if sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Errorf("runAsUser is %v, want 0 (bpffs and other pods' namespaces are root's)", sc.RunAsUser)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("readOnlyRootFilesystem is %v, want true", sc.ReadOnlyRootFilesystem)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("allowPrivilegeEscalation is %v, want false", sc.AllowPrivilegeEscalation)
	}
	if sc.Capabilities == nil {
		t.Fatal("no capabilities: want drop ALL, add only what is needed")
	}
	if !reflect.DeepEqual(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities.drop is %v, want [ALL]", sc.Capabilities.Drop)
	}
	add := append([]corev1.Capability(nil), sc.Capabilities.Add...)
	sort.Slice(add, func(i, j int) bool { return add[i] < add[j] })
	if !reflect.DeepEqual(add, wantCapAdd) {
		t.Errorf("capabilities.add is %v, want exactly %v", sc.Capabilities.Add, wantCapAdd)
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("seccompProfile is %+v, want RuntimeDefault", sc.SeccompProfile)
	}
	if sc.AppArmorProfile == nil || sc.AppArmorProfile.Type != corev1.AppArmorProfileTypeUnconfined {
		t.Errorf("appArmorProfile is %+v, want Unconfined (the runtime default denies writes in /sys/fs/bpf)", sc.AppArmorProfile)
	}
	if sc.SELinuxOptions == nil || sc.SELinuxOptions.Type != "spc_t" {
		t.Errorf("seLinuxOptions are %+v, want type spc_t", sc.SELinuxOptions)
	}
	if sc.ProcMount != nil && *sc.ProcMount != corev1.DefaultProcMount {
		t.Errorf("procMount is %v, want the default", *sc.ProcMount)
	}
}

// checkMounts: exactly the three host mounts, read-only where the daemon
// only reads, and the paths the args name.
func checkMounts(t *testing.T, c corev1.Container, volumes []corev1.Volume, w want) {
	t.Helper()
	// No mountPropagation on the bpffs: HostToContainer is refused where
	// the node's /sys/fs/bpf is a private mount, and pins need none.
	wantMounts := map[string]corev1.VolumeMount{
		"bpffs":   {Name: "bpffs", MountPath: "/sys/fs/bpf"},
		"cgroup2": {Name: "cgroup2", MountPath: "/host/cgroup2", ReadOnly: true},
		"proc":    {Name: "proc", MountPath: "/host/proc", ReadOnly: true},
	}
	wantHostPaths := map[string]string{"bpffs": "/sys/fs/bpf", "cgroup2": w.cgroup2, "proc": "/proc"}

	if len(c.VolumeMounts) != len(wantMounts) || len(volumes) != len(wantHostPaths) {
		t.Errorf("%d mounts and %d volumes, want %d and %d", len(c.VolumeMounts), len(volumes), len(wantMounts), len(wantHostPaths))
	}
	for _, m := range c.VolumeMounts {
		if wm, ok := wantMounts[m.Name]; !ok || !reflect.DeepEqual(m, wm) {
			t.Errorf("mount %+v, want %+v", m, wantMounts[m.Name])
		}
	}
	dir := corev1.HostPathDirectory
	for _, v := range volumes {
		hp := v.HostPath
		if hp == nil || !reflect.DeepEqual(v.VolumeSource, corev1.VolumeSource{HostPath: hp}) {
			t.Errorf("volume %s is %+v, want a hostPath only", v.Name, v.VolumeSource)
			continue
		}
		if p, ok := wantHostPaths[v.Name]; !ok || hp.Path != p || hp.Type == nil || *hp.Type != dir {
			t.Errorf("volume %s is hostPath %+v, want %q of type Directory", v.Name, hp, p)
		}
	}

	// The args name the mounts: a path moved in one place only breaks here.
	flags, err := parseArgs(c.Args)
	if err != nil {
		return // reported by checkCommand
	}
	if flags["--proc"] != wantMounts["proc"].MountPath || flags["--cgroup"] != wantMounts["cgroup2"].MountPath {
		t.Errorf("--proc %s --cgroup %s do not name the mounts %s and %s", flags["--proc"], flags["--cgroup"],
			wantMounts["proc"].MountPath, wantMounts["cgroup2"].MountPath)
	}
}
