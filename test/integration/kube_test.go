package integration

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// apiServer serves the three calls `nsredirect kube` makes (list and
// watch pods, post events) over TLS from client-go's fake clientset, so the
// binary runs against an HTTP API as in a cluster.
type apiServer struct {
	cs         *fake.Clientset
	kubeconfig string
	watches    chan struct{}
	events     atomic.Int64
}

const apiToken = "test-token"

func newAPIServer(t *testing.T) *apiServer {
	t.Helper()
	a := &apiServer{cs: fake.NewClientset(), watches: make(chan struct{}, 16)}
	srv := httptest.NewTLSServer(http.HandlerFunc(a.serve))
	t.Cleanup(srv.Close)
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	a.kubeconfig = filepath.Join(t.TempDir(), "kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
current-context: test
contexts:
- name: test
  context: {cluster: test, user: test}
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: test
  user: {token: %s}
`, srv.URL, base64.StdEncoding.EncodeToString(ca), apiToken)
	if err := os.WriteFile(a.kubeconfig, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	return a
}

func (a *apiServer) serve(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json") // as kube-apiserver: client-go decodes by it
	if r.Header.Get("Authorization") != "Bearer "+apiToken {
		w.WriteHeader(http.StatusUnauthorized)
		_ = json.NewEncoder(w).Encode(metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}, Status: metav1.StatusFailure, Reason: metav1.StatusReasonUnauthorized, Code: 401, Message: "Unauthorized"})
		return
	}
	ctx := r.Context()
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/pods" && r.URL.Query().Get("watch") == "true":
		wt, err := a.cs.CoreV1().Pods("").Watch(ctx, metav1.ListOptions{})
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer wt.Stop()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		select {
		case a.watches <- struct{}{}:
		default:
		}
		enc := json.NewEncoder(w)
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-wt.ResultChan():
				if !ok {
					return
				}
				_ = enc.Encode(map[string]any{"type": ev.Type, "object": ev.Object})
				w.(http.Flusher).Flush()
			}
		}
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/pods":
		l, err := a.cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_ = json.NewEncoder(w).Encode(l)
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/events"):
		var ev corev1.Event
		if err := json.NewDecoder(r.Body).Decode(&ev); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		ev.Name = fmt.Sprintf("%s%d", ev.GenerateName, a.events.Add(1))
		if _, err := a.cs.CoreV1().Events(ev.Namespace).Create(ctx, &ev, metav1.CreateOptions{}); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(ev)
	default:
		http.NotFound(w, r)
	}
}

func (a *apiServer) put(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if _, err := a.cs.CoreV1().Pods(p.Namespace).Update(context.Background(), p, metav1.UpdateOptions{}); err == nil {
		return
	}
	if _, err := a.cs.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (a *apiServer) remove(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if err := a.cs.CoreV1().Pods(p.Namespace).Delete(context.Background(), p.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (a *apiServer) eventReasons(t *testing.T, ns, pod string) []string {
	t.Helper()
	l, err := a.cs.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range l.Items {
		if e.InvolvedObject.Name == pod {
			out = append(out, e.Reason)
		}
	}
	return out
}

var uidSeq atomic.Int64

func kubePod(ns, name, annotation string, owner *metav1.OwnerReference) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name,
			UID: types.UID(fmt.Sprintf("%08x-2222-4333-8444-%012x", time.Now().UnixNano()&0xffffffff, uidSeq.Add(1)))},
		Spec:   corev1.PodSpec{NodeName: "node-a"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning},
	}
	if annotation != "" {
		p.Annotations = map[string]string{"nsredirect.io/redirect": annotation}
	}
	if owner != nil {
		p.OwnerReferences = []metav1.OwnerReference{*owner}
	}
	return p
}

func (a *apiServer) daemon(t *testing.T, pinDir string, self *corev1.Pod) *testenv.Proc {
	t.Helper()
	// On a hybrid host, pass the v1 root as a DaemonSet's hostPath would:
	// the daemon must find the cgroup2 part under it.
	cgroup := testenv.RootCgroup(t)
	if filepath.Base(cgroup) == "unified" {
		cgroup = filepath.Dir(cgroup)
	}
	p := testenv.StartNsredirect(t, pinDir, "kube", "--kubeconfig", a.kubeconfig, "--node-name", "node-a", "--cgroup", cgroup,
		"--pod-name", self.Name, "--pod-namespace", self.Namespace, "--metrics-addr", "127.0.0.1:0", "--log-level", "debug")
	p.WaitOutput(t, "nsredirect running", 20*time.Second)
	if cgroup != testenv.RootCgroup(t) && !strings.Contains(p.Output(), "attaching at its cgroup2 part") {
		t.Errorf("--cgroup %s (hybrid): the daemon did not say it used its cgroup2 part:\n%s", cgroup, p.Output())
	}
	select {
	case <-a.watches:
	case <-time.After(10 * time.Second):
		t.Fatal("the daemon never opened its pod watch")
	}
	return p
}

// TestKubeRolloutAndUninstall runs the binary as a DaemonSet's pods would
// be run, against an HTTP API: a pod gets its rules, a bad annotation gets
// an Event and the metric, a new daemon (maxSurge) is ready while the old
// one serves, the old one hands over on SIGTERM with zero failed connects
// in the pod, and the last one out (uninstall) leaves nothing.
func TestKubeRolloutAndUninstall(t *testing.T) {
	pinDir := testenv.BPFFS(t)
	top := testenv.KubePods(t)
	api := newAPIServer(t)
	yes := true
	ds := &metav1.OwnerReference{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "nsredirect", UID: "ds-1", Controller: &yes}

	app := kubePod("shop", "web", "80=3210", nil)
	sb := testenv.PodSandbox(t, top, string(app.UID), "c1")
	api.put(t, app)
	broken := kubePod("shop", "broken", "80=", nil)
	api.put(t, broken)
	oldPod := kubePod("kube-system", "nsredirect-old", "", ds)
	api.put(t, oldPod)

	old := api.daemon(t, pinDir, oldPod)
	oldURL := testenv.MetricsURL(t, old)
	testenv.WaitStatus(t, pinDir, "shop/web enrolled", func(rows []testenv.StatusRow) bool { return len(testenv.RowsOf(rows, "shop/web")) == 1 })
	if _, err := sb.Netns.Dial("tcp", "127.0.0.1:80"); err != nil {
		t.Fatalf("dial in the pod: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(strings.Join(api.eventReasons(t, "shop", "broken"), ","), "InvalidRedirect") {
		if time.Now().After(deadline) {
			t.Fatalf("no InvalidRedirect event; events: %v", api.eventReasons(t, "shop", "broken"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, body := testenv.HTTPGet(t, oldURL+"/metrics")
	if v := metricValue(t, body, `nsredirect_enroll_errors_total{netns="shop/broken"}`); v < 1 {
		t.Errorf("enroll errors of shop/broken = %v", v)
	}
	progs := testenv.ProgIDs(t, pinDir)

	stop := make(chan struct{})
	ok, failed, done := connectLoop(t, sb.Netns, "127.0.0.1:80", stop, 200000)
	waitFor(t, "connect loop started", 30*time.Second, func() bool { return ok.Load() > 10 })

	newPod := kubePod("kube-system", "nsredirect-new", "", ds)
	api.put(t, newPod)
	next := api.daemon(t, pinDir, newPod)
	nextURL := testenv.MetricsURL(t, next)
	if code, body := testenv.HTTPGet(t, nextURL+"/readyz"); code != http.StatusOK {
		t.Fatalf("new daemon not ready while the old one serves: %d %s", code, body)
	}
	if rows := testenv.RowsOf(testenv.Status(t, pinDir), "shop/web"); len(rows) != 1 || rows[0].OwnerPID != old.Cmd.Process.Pid {
		t.Fatalf("shop/web rows %+v; want still owned by the old daemon (pid %d)", rows, old.Cmd.Process.Pid)
	}
	old.WaitOutput(t, `pod=kube-system/nsredirect-new`, 10*time.Second)
	if err := old.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("old daemon: %v\n%s", err, old.Output())
	}
	if !strings.Contains(old.Output(), "handover=true") {
		t.Errorf("old daemon did not hand over:\n%s", old.Output())
	}
	testenv.WaitStatus(t, pinDir, "shop/web adopted by the new daemon", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, "shop/web")
		return len(r) == 1 && r[0].OwnerPID == next.Cmd.Process.Pid && r[0].Alive
	})
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if failed.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("connects across the rollout: %d ok, %d failed; want none failed", ok.Load(), failed.Load())
	}
	t.Logf("connects across the rollout: %d ok, 0 failed", ok.Load())
	progs = append(progs, testenv.ProgIDs(t, pinDir)...)

	// Uninstall: the DaemonSet's pods are deleted; no successor.
	api.remove(t, oldPod)
	now := metav1.Now()
	newPod.DeletionTimestamp = &now
	api.put(t, newPod)
	next.WaitOutput(t, `deleting=true`, 10*time.Second)
	if err := next.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("last daemon: %v\n%s", err, next.Output())
	}
	if !strings.Contains(next.Output(), "handover=false") {
		t.Errorf("last daemon handed over:\n%s", next.Output())
	}
	testenv.AssertGone(t, pinDir, progs)
	if _, err := sb.Netns.Dial("tcp", "127.0.0.1:80"); err == nil {
		t.Error("the pod's rules outlived the uninstall")
	}
}

// TestKubeAPIUnreachable: no API server, exit 1 with one line, nothing
// attached or pinned.
func TestKubeAPIUnreachable(t *testing.T) {
	pinDir := testenv.BPFFS(t)
	api := newAPIServer(t)
	raw, err := os.ReadFile(api.kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	kc := string(raw)
	server := strings.Fields(kc[strings.Index(kc, "server: "):])[1]
	dead := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(dead, []byte(strings.Replace(kc, server, "https://127.0.0.1:1", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	badToken := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(badToken, []byte(strings.Replace(kc, apiToken, "wrong", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	for kubeconfig, mention := range map[string]string{dead: "127.0.0.1:1", badToken: "Unauthorized"} {
		code, _, stderr := testenv.Run(t, nil, "kube", "--kubeconfig", kubeconfig, "--node-name", "node-a", "--pin-dir", pinDir)
		if code != 1 || !strings.Contains(stderr, mention) || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("exit %d, stderr %q; want exit 1 and one line naming %q", code, stderr, mention)
		}
		if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
			t.Errorf("pin dir %s exists after a failed start", pinDir)
		}
	}
}

// warningMessages are the messages of the Warning events of reason posted
// for pod.
func (a *apiServer) warningMessages(t *testing.T, ns, pod, reason string) []string {
	t.Helper()
	l, err := a.cs.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range l.Items {
		if e.InvolvedObject.Name == pod && e.Reason == reason && e.Type == corev1.EventTypeWarning {
			out = append(out, e.Message)
		}
	}
	return out
}

// TestKubeUDPAnnotation: the annotation nsredirect.io/redirect: "53=5353/udp"
// redirects a pod's UDP as --redirect does (a datagram to 127.0.0.1:53 in
// the pod's netns is answered by its server on 5353, from port 53); a bad
// protocol suffix gets a Warning Event naming it and counts an enroll
// error; and changing the annotation to TCP only, the last UDP rule, takes
// the UDP programs off the cgroup2 root while the pod keeps its TCP rule.
func TestKubeUDPAnnotation(t *testing.T) {
	pinDir := testenv.BPFFS(t)
	top := testenv.KubePods(t)
	api := newAPIServer(t)
	yes := true
	ds := &metav1.OwnerReference{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "nsredirect", UID: "ds-1", Controller: &yes}

	dns := kubePod("shop", "dns", "53=5353/udp", nil)
	sb := testenv.PodSandbox(t, top, string(dns.UID), "c1")
	startUDPServer(t, &sb.Netns, "::", 5353, "pod")
	api.put(t, dns)
	bad := kubePod("shop", "badudp", "53=5353/sctp", nil)
	api.put(t, bad)
	self := kubePod("kube-system", "nsredirect-udp", "", ds)
	api.put(t, self)

	d := api.daemon(t, pinDir, self)
	url := testenv.MetricsURL(t, d)
	testenv.WaitStatus(t, pinDir, "shop/dns enrolled", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, "shop/dns")
		return len(r) == 1 && r[0].Rule == "53=5353/udp"
	})
	got := mustClient(t, sb.Netns, testenv.Tool(t, "python3"), "-c", udpClient, "127.0.0.1", "53")
	for _, want := range []string{"unconnected pod:unconnected 127.0.0.1 53", "connected pod:connected 127.0.0.1 53", "peer 127.0.0.1 53"} {
		if !hasLine(got, want) {
			t.Errorf("UDP in the annotated pod: want %q in\n%s", want, got)
		}
	}
	ids := udpProgIDs(t, pinDir)
	if got := attachedOf(t, ids); len(got) != len(ids) {
		t.Errorf("UDP programs at the root with the pod's UDP rule: %v; want all %d", got, len(ids))
	}

	waitFor(t, "an InvalidRedirect Warning for shop/badudp", 30*time.Second, func() bool {
		return len(api.warningMessages(t, "shop", "badudp", "InvalidRedirect")) > 0
	})
	if msgs := api.warningMessages(t, "shop", "badudp", "InvalidRedirect"); !strings.Contains(msgs[0], `"sctp"`) || strings.Contains(msgs[0], "\n") {
		t.Errorf("the Warning for 53=5353/sctp: %q; want one line naming \"sctp\"", msgs)
	}
	_, body := testenv.HTTPGet(t, url+"/metrics")
	if v := metricValue(t, body, `nsredirect_enroll_errors_total{netns="shop/badudp"}`); v < 1 {
		t.Errorf("enroll errors of shop/badudp = %v; want >= 1", v)
	}
	if r := testenv.RowsOf(testenv.Status(t, pinDir), "shop/badudp"); len(r) != 0 {
		t.Errorf("the badly annotated pod was enrolled: %+v", r)
	}
	if !strings.Contains(d.Output(), "shop/badudp") {
		t.Errorf("the daemon did not log the bad annotation:\n%s", d.Output())
	}

	// The annotation changes to TCP only: the last UDP rule of the host.
	dns.Annotations["nsredirect.io/redirect"] = "80=3210"
	api.put(t, dns)
	testenv.WaitStatus(t, pinDir, "shop/dns on TCP only", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, "shop/dns")
		return len(r) == 1 && r[0].Rule == "80=3210"
	})
	waitDetached(t, ids)
	if got := udpLinksPinned(pinDir); len(got) != 0 {
		t.Errorf("UDP links pinned after the pod's UDP rule went: %v", got)
	}
	if got := curl(t, sb.Netns, "http://127.0.0.1/"); !strings.Contains(got, ":3210") {
		t.Errorf("the pod's TCP rule: %q", got)
	}
}
