package daemon

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/rule"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// fakeKernel records what the daemon asks of the loader.
type fakeKernel = testenv.FakeKernel

func newFake() *fakeKernel { return testenv.NewFakeKernel() }

func rules(t *testing.T, s string) []rule.Rule {
	r, err := rule.ParseList(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func quiet() logrus.FieldLogger {
	l := logrus.New()
	l.SetLevel(logrus.PanicLevel)
	return l
}

func TestReconcileAddUpdateRemove(t *testing.T) {
	a, b := testenv.NewNetns(t), testenv.NewNetns(t)
	k := newFake()
	d := New(k, testenv.Cookies(t), Options{Owner: "test", Log: quiet()})

	err := d.Reconcile([]Target{{Name: "a", Netns: a.Target(), Rules: rules(t, "80=3210")}, {Name: "b", Netns: b.Target(), Rules: rules(t, "80=3211")}})
	if err != nil {
		t.Fatal(err)
	}
	ca, cb := a.Cookie(t), b.Cookie(t)
	if len(k.Enrolled) != 2 || k.Enrolled[ca].Name != "a" || k.Enrolled[cb].Rules[0].Label != "80=3211" || k.Enrolled[ca].Owner != "test" {
		t.Fatalf("enrolled %+v", k.Enrolled)
	}
	if err := d.Ready(); err != nil {
		t.Errorf("Ready: %v", err)
	}
	// Update a's rules, drop b.
	if err := d.Reconcile([]Target{{Name: "a", Netns: a.Target(), Rules: rules(t, "80=4000,443=4001")}}); err != nil {
		t.Fatal(err)
	}
	if len(k.Enrolled) != 1 || len(k.Enrolled[ca].Rules) != 2 {
		t.Fatalf("after update: %+v", k.Enrolled)
	}
	if got := d.Snapshot(); len(got.Rules) != 2 || got.Rules[0].Netns != "a" {
		t.Errorf("snapshot %+v", got)
	}
	if err := d.Shutdown(false); err != nil || len(k.Enrolled) != 0 {
		t.Fatalf("shutdown: %v, left %+v", err, k.Enrolled)
	}
}

func TestFailureIsolatedAndCounted(t *testing.T) {
	a := testenv.NewNetns(t)
	k := newFake()
	k.Fail["bad"] = errors.New("boom")
	d := New(k, testenv.Cookies(t), Options{Owner: "test", Log: quiet()})
	missing, _ := netnsx.ParseTarget("/run/netns/nsr-missing-for-test")
	err := d.Reconcile([]Target{
		{Name: "good", Netns: a.Target(), Rules: rules(t, "80=3210")},
		{Name: "bad", Netns: a.Target(), Rules: rules(t, "81=3210")},
		{Name: "gone", Netns: missing, Rules: rules(t, "80=3210")},
		{Name: "badlabel", Err: errors.New(`label "80=x" is not a spec`)},
	})
	if err == nil || !strings.Contains(err.Error(), "boom") || !strings.Contains(err.Error(), "nsr-missing-for-test") {
		t.Errorf("Reconcile error = %v; want both failures", err)
	}
	if e, ok := k.Enrolled[a.Cookie(t)]; !ok || e.Name != "good" {
		t.Errorf("good target not enrolled: %+v", k.Enrolled)
	}
	if err := d.Ready(); err == nil || !strings.Contains(err.Error(), "bad, gone") || strings.Contains(err.Error(), "badlabel") {
		t.Errorf("Ready = %v; want it to name the targets that failed to enroll, not the one its source could not describe", err)
	}
	_ = d.Resync() // the same failure again is counted once
	s := d.Snapshot()
	if s.EnrollErrors["bad"] != 1 || s.EnrollErrors["gone"] != 1 || s.EnrollErrors["badlabel"] != 1 || s.EnrollErrors["good"] != 0 {
		t.Errorf("enroll errors %+v", s.EnrollErrors)
	}
}

func TestHandoverReleasesWithoutRemoving(t *testing.T) {
	a := testenv.NewNetns(t)
	k := newFake()
	d := New(k, testenv.Cookies(t), Options{Owner: "test", Log: quiet()})
	if err := d.Reconcile([]Target{{Name: "a", Netns: a.Target(), Rules: rules(t, "80=3210")}}); err != nil {
		t.Fatal(err)
	}
	if err := d.Shutdown(true); err != nil {
		t.Fatal(err)
	}
	c := a.Cookie(t)
	if _, still := k.Enrolled[c]; !still || !k.Released[c] {
		t.Errorf("handover: enrolled=%v released=%v; want rules kept and ownership released", k.Enrolled, k.Released)
	}
}

func TestTargetErrIsCountedNotEnrolled(t *testing.T) {
	a := testenv.NewNetns(t)
	k := newFake()
	d := New(k, testenv.Cookies(t), Options{Owner: "test", Log: quiet()})
	_, badErr := rule.ParseList("80=99999")
	err := d.Reconcile([]Target{
		{Name: "good", Netns: a.Target(), Rules: rules(t, "80=3210")},
		{Name: "badlabel", Netns: a.Target(), Err: badErr},
	})
	if err == nil || !strings.Contains(err.Error(), "99999") {
		t.Errorf("Reconcile error = %v; want the bad label's", err)
	}
	if len(k.Enrolled) != 1 || k.Enrolled[a.Cookie(t)].Name != "good" {
		t.Errorf("enrolled %+v; want only the good target", k.Enrolled)
	}
	_ = d.Resync()
	if s := d.Snapshot(); s.EnrollErrors["badlabel"] != 1 || s.EnrollErrors["good"] != 0 {
		t.Errorf("enroll errors %+v; want badlabel counted once", s.EnrollErrors)
	}
}

// TestWaitForOwners: with the option, a netns another live nsredirect
// serves is a wait (ready, not an error) and is adopted once it lets go;
// without it, it is a failure.
func TestWaitForOwners(t *testing.T) {
	a := testenv.NewNetns(t)
	busy := fmt.Errorf("%w: pid 1 serves %q", loader.ErrBusy, "a")
	want := []Target{{Name: "a", Netns: a.Target(), Rules: rules(t, "80=3210")}}

	k := newFake()
	k.Fail["a"] = busy
	d := New(k, testenv.Cookies(t), Options{Owner: "kube", Log: quiet(), WaitForOwners: true})
	_ = d.Reconcile(want)
	if err := d.Ready(); err != nil {
		t.Errorf("Ready while another owner serves: %v; want ready", err)
	}
	if n := d.Snapshot().EnrollErrors["a"]; n != 0 || len(d.Serving()) != 0 {
		t.Errorf("held target: %d errors, serving %v; want none of either", n, d.Serving())
	}
	k.Lock()
	delete(k.Fail, "a") // the old owner let go
	k.Unlock()
	_ = d.Reconcile(want)
	if got := d.Serving(); len(got) != 1 || got[0] != "a" {
		t.Errorf("after the owner let go: serving %v; want a adopted", got)
	}

	k2 := newFake()
	k2.Fail["a"] = busy
	d2 := New(k2, testenv.Cookies(t), Options{Owner: "run", Log: quiet()})
	_ = d2.Reconcile(want)
	if err := d2.Ready(); err == nil || d2.Snapshot().EnrollErrors["a"] != 1 {
		t.Errorf("without WaitForOwners: Ready = %v, errors %v; want a failure", err, d2.Snapshot().EnrollErrors)
	}
}
