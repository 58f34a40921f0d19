package kube

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// statLine is a /proc/PID/stat line with start time start (field 22).
func statLine(pid int, start uint64) string {
	return fmt.Sprintf("%d (a b) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 %d 0 0\n", pid, start)
}

// TestPodNetnsOldestByStartTime: after a pid wrap the pod's oldest process
// (the sandbox) has a higher pid than a newer one; it is the one chosen.
func TestPodNetnsOldestByStartTime(t *testing.T) {
	cg := "0::/kubepods/burstable/pod" + uid + "/c\n"
	root := fakeProc(t, map[int]string{120: cg, 30000: cg, 900: cg})
	for pid, start := range map[int]uint64{120: 9000, 30000: 100, 900: 5000} {
		if err := os.WriteFile(filepath.Join(root, fmt.Sprint(pid), "stat"), []byte(statLine(pid, start)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, pid, err := PodNetns(root, uid); err != nil || pid != 30000 {
		t.Errorf("PodNetns picked pid %d (%v); want 30000, the oldest by start time", pid, err)
	}
}

// TestSandboxRecreationIsNotAnError: while a pod's sandbox is being
// re-created no process of it is found; that is logged at info, not as an
// error, and not counted in the enroll errors.
func TestSandboxRecreationIsNotAnError(t *testing.T) {
	testenv.Privileged(t)
	f := newFakeAPI()
	root := fakeProc(t, map[int]string{1: "0::/init.scope\n"}) // no process of the pod
	log, hook := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	c := startController(t, f, Config{Node: "node-a", Proc: root, Log: log})
	p := pod("shop", "web", "node-a", "80=3210")
	f.add(t, p)
	cached(t, c, "shop", "web", anyPod)
	d := daemon.New(testenv.NewFakeKernel(), testenv.Cookies(t), daemon.Options{Owner: "kube", Log: log, WaitForOwners: true})
	for range 3 {
		step(context.Background(), c, d)
	}
	if n := d.Snapshot().EnrollErrors["shop/web"]; n != 0 {
		t.Errorf("enroll errors of a pod being re-created = %d; want 0", n)
	}
	for _, e := range hook.AllEntries() {
		if e.Level <= logrus.WarnLevel && !strings.Contains(e.Message, "pod list/watch") {
			t.Errorf("logged at %s: %s %v", e.Level, e.Message, e.Data)
		}
	}
	if got := f.eventsOf(t, "shop", "web", ReasonInvalid); len(got) != 0 {
		t.Errorf("a pod being re-created got Warnings: %+v", got)
	}
}

// listingAPI is the fake API server with events that can be listed, as a
// client with `list` on events has.
type listingAPI struct{ *fakeAPI }

func (a listingAPI) ListEvents(ctx context.Context, namespace, uid string) ([]Event, error) {
	l, err := a.cs.CoreV1().Events(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	var out []Event
	for _, e := range l.Items {
		if string(e.InvolvedObject.UID) == uid {
			out = append(out, Event{Reason: e.Reason, Message: e.Message, Type: e.Type})
		}
	}
	return out, nil
}

// TestWarningOnceAcrossRestarts: a restarted daemon (a new controller) does
// not post again the Warning its predecessor posted for the same problem;
// a new problem still gets one.
func TestWarningOnceAcrossRestarts(t *testing.T) {
	f := newFakeAPI()
	bad := pod("shop", "bad", "node-a", "80=nope")
	f.add(t, bad)
	for i := range 2 {
		c := NewController(Config{API: listingAPI{f}, Node: "node-a", Annotation: DefaultAnnotation, Proc: "/proc", Log: quietLog()})
		ctx, cancel := context.WithCancel(context.Background())
		if err := c.Start(ctx, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		step(ctx, c, &recorder{})
		cancel()
		if got := f.eventsOf(t, "shop", "bad", ReasonInvalid); len(got) != 1 {
			t.Fatalf("after daemon start %d: %d Warnings for one problem; want 1", i+1, len(got))
		}
	}
}

// TestOwnPodUnknownSaysSo: --pod-name naming a pod that is not there, or
// one with no controller, is as good as no --pod-name: the daemon says so
// (and hands over on shutdown, with the same warning).
func TestOwnPodUnknownSaysSo(t *testing.T) {
	f := newFakeAPI()
	lone := pod("kube-system", "lone", "node-a", "")
	delete(lone.Annotations, DefaultAnnotation)
	f.add(t, lone)
	for _, tc := range []struct{ name, want string }{
		{"missing", "is not on node node-a"},
		{"lone", "has no controller"},
	} {
		log, hook := test.NewNullLogger()
		c := startController(t, f, Config{Node: "node-a", PodName: tc.name, PodNamespace: "kube-system", Log: log})
		cached(t, c, "kube-system", "lone", anyPod)
		if why := c.OwnPodUnknown(); !strings.Contains(why, tc.want) {
			t.Errorf("--pod-name %s: OwnPodUnknown = %q; want it to say %q", tc.name, why, tc.want)
		}
		if !c.Handover(context.Background(), []string{"shop/web"}) {
			t.Errorf("--pod-name %s: no handover while pods are served", tc.name)
		}
		if e := hook.LastEntry(); e == nil || e.Level != logrus.WarnLevel || !strings.Contains(fmt.Sprint(e.Data["reason"]), tc.want) {
			t.Errorf("--pod-name %s: last log %+v; want a warning saying why", tc.name, e)
		}
	}
}

// TestChosenProcessExitsRefusesNothing: the process a pod's netns is found
// through exits while other processes of the pod keep the netns: no
// connect is refused. The pod's processes are shown through a proc root
// whose entries lead to real processes: a newer one with the lowest pid
// (after a pid wrap), the oldest, and another.
func TestChosenProcessExitsRefusesNothing(t *testing.T) {
	testenv.Privileged(t)
	pinDir := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	p := pod("shop", "web", "node-a", "80=3210")
	cg := "0::/kubepods/burstable/pod" + string(p.UID) + "/c\n"
	procs := map[int]*testenv.Proc{}
	root := fakeProc(t, map[int]string{100: cg, 500: cg, 700: cg})
	for pid, start := range map[int]uint64{100: 300, 500: 100, 700: 200} {
		s := testenv.Sleeper(t, ns)
		procs[pid] = s
		dir := filepath.Join(root, fmt.Sprint(pid))
		if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(statLine(pid, start)), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(dir, "ns"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", s.Cmd.Process.Pid), filepath.Join(dir, "ns", "net")); err != nil {
			t.Fatal(err)
		}
	}
	f := newFakeAPI()
	n := startNode(t, f, pinDir, Config{Node: "node-a", Proc: root})
	f.add(t, p)
	waitDial(t, ns, 80, true)

	stop := make(chan struct{})
	ok, failed, done := testenv.CountConnects(t, ns.Target(), "127.0.0.1:80", stop, 100000)
	progress := func(what string, more int64) {
		at := ok.Load() + failed.Load()
		waitFor(t, what, func() bool { return ok.Load()+failed.Load() > at+more })
	}
	progress("connects before", 50)
	procs[100].Kill() // the newest, lowest pid: what the lowest-pid rule chose
	progress("connects across two resyncs", 300)
	at := n.describes.Load()
	waitFor(t, "two resyncs", func() bool { return n.describes.Load() > at+2 })
	procs[500].Kill() // the oldest: the next oldest takes over
	at = n.describes.Load()
	waitFor(t, "two more resyncs", func() bool { return n.describes.Load() > at+2 })
	progress("connects after", 300)
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("connect loop while the pod's chosen processes exit: %d ok, %d refused", ok.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Errorf("%d connects refused; want 0", failed.Load())
	}
	if !n.serves("shop/web") || n.rules() != 1 {
		t.Errorf("serving %v rules; want shop/web's", n.rules())
	}
	// The pod goes, and its rules with it: the daemon (its own pod unknown)
	// then has nothing to hand over at the end of the test.
	f.remove(t, p)
	waitFor(t, "shop/web's rules removed with the pod", func() bool { return n.rules() == 0 })
}

// TestHostNetnsPodWarned: a pod whose processes are in the host's netns
// without hostNetwork in its spec (what the API says is not what the
// kernel says) is refused by netns identity, with a Warning Event.
func TestHostNetnsPodWarned(t *testing.T) {
	testenv.Privileged(t)
	f := newFakeAPI()
	p := pod("shop", "sneaky", "node-a", "80=3210")
	root := fakeProc(t, map[int]string{100: "0::/kubepods/burstable/pod" + string(p.UID) + "/c\n"})
	if err := os.MkdirAll(filepath.Join(root, "100", "ns"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Our parent runs in the host's netns.
	if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", os.Getppid()), filepath.Join(root, "100", "ns", "net")); err != nil {
		t.Fatal(err)
	}
	c := startController(t, f, Config{Node: "node-a", Proc: root, Log: quietLog()})
	f.add(t, p)
	cached(t, c, "shop", "sneaky", anyPod)
	k := testenv.NewFakeKernel()
	log, _ := test.NewNullLogger()
	d := daemon.New(k, testenv.Cookies(t), daemon.Options{Owner: "kube", Log: log, WaitForOwners: true})
	step(context.Background(), c, d)
	step(context.Background(), c, d)
	ev := f.eventsOf(t, "shop", "sneaky", ReasonInvalid)
	if len(ev) != 1 || ev[0].Type != corev1.EventTypeWarning || !strings.Contains(ev[0].Message, "host network namespace") || !strings.Contains(ev[0].Message, "pod shop/sneaky") {
		t.Errorf("events %+v; want one Warning naming the pod and the host network namespace", ev)
	}
	if len(k.Enrolled) != 0 || d.Snapshot().EnrollErrors["shop/sneaky"] != 1 {
		t.Errorf("enrolled %v, errors %v; want nothing enrolled, one error", k.Enrolled, d.Snapshot().EnrollErrors)
	}
}
