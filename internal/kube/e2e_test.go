package kube

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// joinPod puts a process of pod uid into ns (a second pod claiming the
// netns of another): a sleep entered into ns, then moved into the pod's
// kubelet-shaped cgroup.
func joinPod(t *testing.T, top, uid string, ns testenv.Netns) {
	t.Helper()
	dir := filepath.Join(top, "burstable", "pod"+uid, "c1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := testenv.Start(t, ns.Command(context.Background(), "sleep", "60"))
	pid := p.Cmd.Process.Pid
	// `ip netns exec` enters ns, then execs sleep in place: once the pid
	// runs sleep it is inside ns.
	waitFor(t, "the sleep to enter the netns", func() bool {
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		return strings.HasSuffix(exe, "/sleep")
	})
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(fmt.Sprint(pid)), 0o644); err != nil {
		t.Fatalf("move pid %d into %s: %v", pid, dir, err)
	}
}

// dials reports whether a connect from inside ns to 127.0.0.1:port works;
// nothing listens on the ports tests use but 3210, so only a redirect makes
// it succeed.
func dials(ns testenv.Netns, port int) bool {
	_, err := testenv.DialIn(ns.Target(), "tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
	return err == nil
}

func waitDial(t *testing.T, ns testenv.Netns, port int, want bool) {
	t.Helper()
	waitFor(t, fmt.Sprintf("dial 127.0.0.1:%d in %s to work=%v", port, ns.Name, want), func() bool { return dials(ns, port) == want })
}

// node is one nsredirect daemon of the test: daemon.Run with a Controller
// as its source and its own loader on the shared pin dir, as `nsredirect
// kube` runs, seen through its /metrics and /readyz.
type node struct {
	c    *Controller
	addr string // of /metrics and /readyz
	stop context.CancelFunc
	done chan error
	// describes counts the Controller's descriptions daemon.Run asked for
	// (every wake-up and every resync that looks at every target).
	describes atomic.Int64
}

// counted is the node's Controller, counting its descriptions.
type counted struct {
	*Controller
	n *node
}

func (c counted) Desired(ctx context.Context) ([]daemon.Target, error) {
	c.n.describes.Add(1)
	return c.Controller.Desired(ctx)
}

func startNode(t *testing.T, f *fakeAPI, pinDir string, cfg Config) *node {
	t.Helper()
	log := quietLog()
	cfg.Log = log
	cg := testenv.RootCgroup(t)
	kernel, err := loader.Attach(pinDir, cg, log)
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &node{c: startController(t, f, cfg), addr: ln.Addr().String(), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	n.stop = cancel
	go func() {
		n.done <- daemon.Run(ctx, counted{n.c, n}, daemon.Config{
			Kernel: kernel, Cookies: testenv.Cookies(t), Owner: "kube", Cgroup: cg,
			Resync: 100 * time.Millisecond, Metrics: ln, Log: log,
		})
	}()
	t.Cleanup(func() { n.shutdown(t) })
	// Run serves /readyz once its first reconcile is done.
	waitFor(t, "the daemon's first reconcile", func() bool { code, _ := n.get("/readyz"); return code != 0 })
	return n
}

// shutdown stops the daemon as SIGTERM does: the Controller decides whether
// it hands over or removes its rules (and, last out, everything).
func (n *node) shutdown(t *testing.T) {
	if n.stop == nil {
		return
	}
	n.stop()
	n.stop = nil
	if err := <-n.done; err != nil {
		t.Errorf("daemon.Run: %v", err)
	}
}

// get asks the daemon's metrics server; code 0 while it does not answer.
func (n *node) get(path string) (int, string) {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + n.addr + path)
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// serves reports whether the daemon has rules live for the pod name.
func (n *node) serves(name string) bool {
	_, body := n.get("/metrics")
	return strings.Contains(body, `nsredirect_redirects_total{netns="`+name+`"`)
}

// rules is how many rules the daemon has live.
func (n *node) rules() float64 {
	_, body := n.get("/metrics")
	return testenv.MetricValue(body, "nsredirect_rules ")
}

// enrollErrors is the daemon's count of failed enrollments of the pod name.
func (n *node) enrollErrors(name string) float64 {
	_, body := n.get("/metrics")
	return max(testenv.MetricValue(body, `nsredirect_enroll_errors_total{netns="`+name+`"}`), 0)
}

func serving(n *node, name string) func() bool {
	return func() bool { return n.serves(name) }
}

// TestControllerEndToEnd drives the controller with the fake clientset and
// proves each pod change through the kernel, with dials from inside the
// pods' netns.
func TestControllerEndToEnd(t *testing.T) {
	testenv.Privileged(t)
	pinDir := testenv.BPFFS(t)
	top := testenv.KubePods(t)
	f := newFakeAPI()
	n := startNode(t, f, pinDir, Config{Node: "node-a"})

	// add
	a := pod("shop", "web", "node-a", "80=3210")
	sa := testenv.PodSandbox(t, top, string(a.UID), "c1")
	f.add(t, a)
	waitDial(t, sa.Netns, 80, true)
	waitFor(t, "a Redirected event", func() bool { return len(f.eventsOf(t, "shop", "web", ReasonRedirected)) == 1 })

	// update: the new rules replace the old
	a.Annotations[DefaultAnnotation] = "81=3210"
	f.update(t, a)
	waitDial(t, sa.Netns, 81, true)
	waitDial(t, sa.Netns, 80, false)

	// re-create: a new sandbox (new netns, new process) for the same pod
	// UID, with no API event, is followed on the tick
	sb := testenv.PodSandbox(t, top, string(a.UID), "c2")
	sa.Proc.Kill()
	sa.Netns.Delete(t)
	waitDial(t, sb.Netns, 81, true)

	// bad annotation: an Event and the metric, the other pod unaffected
	bad := pod("shop", "broken", "node-a", "81=oops")
	f.add(t, bad)
	waitFor(t, "an InvalidRedirect event", func() bool { return len(f.eventsOf(t, "shop", "broken", ReasonInvalid)) == 1 })
	waitFor(t, "an enroll error counted for shop/broken", func() bool { return n.enrollErrors("shop/broken") >= 1 })
	if !dials(sb.Netns, 81) {
		t.Error("a bad annotation on another pod broke shop/web")
	}

	// hostNetwork: refused with an Event, the host's loopback untouched
	host := pod("shop", "hostnet", "node-a", "82=3210")
	host.Spec.HostNetwork = true
	f.add(t, host)
	waitFor(t, "a hostNetwork event", func() bool { return len(f.eventsOf(t, "shop", "hostnet", ReasonInvalid)) == 1 })

	// two annotated pods in one netns: the second (by name) is refused
	twin := pod("shop", "zz-twin", "node-a", "83=3210")
	joinPod(t, top, string(twin.UID), sb.Netns)
	f.add(t, twin)
	waitFor(t, "a shared-netns event", func() bool {
		ev := f.eventsOf(t, "shop", "zz-twin", ReasonInvalid)
		return len(ev) == 1 && strings.Contains(ev[0].Message, "shares its network namespace with pod shop/web")
	})
	if dials(sb.Netns, 83) {
		t.Error("the twin's rules were enrolled in shop/web's netns")
	}
	f.remove(t, twin)

	// a pod on another node is not ours, even if the API hands it over
	other := pod("shop", "elsewhere", "node-b", "80=3210")
	so := testenv.PodSandbox(t, top, string(other.UID), "c1")
	f.add(t, other)
	cached(t, n.c, "shop", "web", anyPod) // the cache is current up to here
	time.Sleep(300 * time.Millisecond)    // three ticks: it would have been enrolled by now
	if dials(so.Netns, 80) || n.serves("shop/elsewhere") {
		t.Error("a pod of node-b was enrolled by node-a's daemon")
	}
	if !n.serves("shop/web") || n.rules() != 1 {
		t.Errorf("serving %v rules; want only shop/web's", n.rules())
	}
	// Events are posted once per problem, not on every tick.
	if got := len(f.eventsOf(t, "shop", "broken", ReasonInvalid)); got != 1 {
		t.Errorf("%d InvalidRedirect events for one problem", got)
	}

	// delete: the rules go
	f.remove(t, a)
	waitDial(t, sb.Netns, 81, false)
	waitFor(t, "nothing served", func() bool { return n.rules() == 0 })
}

// TestRolloutHandsOver: a new daemon starts beside the old one (maxSurge),
// is ready while the old still serves, the old hands over on SIGTERM since
// a successor runs, and connects from inside the pod never fail across the
// switch. Then the last daemon, with no successor (uninstall), leaves
// nothing pinned or attached.
func TestRolloutHandsOver(t *testing.T) {
	testenv.Privileged(t)
	pinDir := testenv.BPFFS(t)
	top := testenv.KubePods(t)
	f := newFakeAPI()

	yes := true
	owner := []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "nsredirect", UID: "ds-uid-1", Controller: &yes}}
	daemonPod := func(name string) *corev1.Pod {
		p := pod("kube-system", name, "node-a", "")
		p.OwnerReferences = owner
		return p
	}
	oldPod := daemonPod("nsredirect-old")
	f.add(t, oldPod)
	app := pod("shop", "web", "node-a", "80=3210")
	sa := testenv.PodSandbox(t, top, string(app.UID), "c1")
	f.add(t, app)

	old := startNode(t, f, pinDir, Config{Node: "node-a", PodName: oldPod.Name, PodNamespace: oldPod.Namespace})
	waitDial(t, sa.Netns, 80, true)
	progs := testenv.ProgIDs(t, pinDir)

	// A connect loop inside the pod, bounded in count and time.
	var ok, failed atomic.Int64
	stopLoop := make(chan struct{})
	loopDone := make(chan struct{})
	go func() {
		defer close(loopDone)
		deadline := time.Now().Add(30 * time.Second)
		for i := 0; i < 100000 && time.Now().Before(deadline); i++ {
			select {
			case <-stopLoop:
				return
			default:
			}
			if dials(sa.Netns, 80) {
				ok.Add(1)
			} else {
				failed.Add(1)
			}
		}
	}()

	newPod := daemonPod("nsredirect-new")
	f.add(t, newPod)
	next := startNode(t, f, pinDir, Config{Node: "node-a", PodName: newPod.Name, PodNamespace: newPod.Namespace})
	if code, body := next.get("/readyz"); code != http.StatusOK {
		t.Fatalf("new daemon not ready while the old one serves: %d %s", code, body)
	}
	if next.serves("shop/web") {
		t.Fatal("new daemon took shop/web from a live owner")
	}
	if got := next.enrollErrors("shop/web"); got != 0 {
		t.Errorf("waiting for the old owner counted %v enroll errors", got)
	}
	// The new daemon replaced the programs in place (link.Update).
	progs = append(progs, testenv.ProgIDs(t, pinDir)...)

	// SIGTERM to the old pod: it is deleting, and a successor runs.
	cached(t, old.c, "kube-system", "nsredirect-new", anyPod)
	succ, known := old.c.Successor()
	if !succ || !known {
		t.Fatalf("old daemon: Successor() = %v, %v; want a successor", succ, known)
	}
	old.shutdown(t) // hands over: a successor runs
	waitFor(t, "the new daemon to adopt shop/web", serving(next, "shop/web"))
	time.Sleep(200 * time.Millisecond) // keep dialling after the adoption too
	close(stopLoop)
	<-loopDone
	if failed.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("connects across the handover: %d ok, %d failed; want none failed", ok.Load(), failed.Load())
	}
	t.Logf("connects across the handover: %d ok, 0 failed", ok.Load())
	testenv.AssertAttached(t, testenv.ProgIDs(t, pinDir))

	// Uninstall: the DaemonSet's pods are all deleting; no successor.
	f.remove(t, oldPod)
	now := metav1.Now()
	newPod.DeletionTimestamp = &now
	f.update(t, newPod)
	cached(t, next.c, "kube-system", "nsredirect-new", func(p *Pod) bool { return p.DeletionTimestamp != nil })
	if succ, known := next.c.Successor(); succ || !known {
		t.Fatalf("last daemon: Successor() = %v, %v; want none", succ, known)
	}
	next.shutdown(t) // removes: no successor
	if dials(sa.Netns, 80) {
		t.Error("rules still redirect after the uninstall")
	}
	testenv.AssertGone(t, pinDir, progs)
}
