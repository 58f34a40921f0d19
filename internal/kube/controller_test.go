package kube

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

func quietLog() *logrus.Logger {
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	return l
}

// waitFor polls cond for at most 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testenv.WaitFor(t, what, 10*time.Second, cond)
}

// cached waits until the informer's cache holds pod ns/name as wanted.
func cached(t *testing.T, c *Controller, ns, name string, ok func(*Pod) bool) {
	t.Helper()
	waitFor(t, "pod "+ns+"/"+name+" in the cache", func() bool {
		for _, p := range c.pods() {
			if p.Namespace == ns && p.Name == name {
				return ok(p)
			}
		}
		return false
	})
}

func anyPod(*Pod) bool { return true }

// TestEventsOncePerProblem: a bad annotation and a hostNetwork pod get one
// Warning each, not one per sync; a new problem gets a new one; pods on
// other nodes are not looked at.
func TestEventsOncePerProblem(t *testing.T) {
	f := newFakeAPI()
	c := startController(t, f, Config{Node: "node-a", Log: quietLog()})
	bad := pod("default", "bad", "node-a", "80=nope")
	host := pod("default", "host", "node-a", "80=3210")
	host.Spec.HostNetwork = true
	other := pod("default", "other", "node-b", "also=bad")
	for _, p := range []*corev1.Pod{bad, host, other} {
		f.add(t, p)
	}
	cached(t, c, "default", "host", anyPod)
	r := &recorder{}
	for range 3 {
		step(context.Background(), c, r)
	}
	if got := f.eventsOf(t, "default", "bad", ReasonInvalid); len(got) != 1 || got[0].Type != corev1.EventTypeWarning || !strings.Contains(got[0].Message, `"80=nope"`) {
		t.Fatalf("bad annotation: events %+v; want one Warning naming the value", got)
	}
	if got := f.eventsOf(t, "default", "host", ReasonInvalid); len(got) != 1 || !strings.Contains(got[0].Message, "hostNetwork") {
		t.Fatalf("hostNetwork pod: events %+v; want one Warning", got)
	}
	if got := f.eventsOf(t, "default", "other", ReasonInvalid); len(got) != 0 {
		t.Fatalf("pod on another node got events: %+v", got)
	}
	if !slices.Equal(r.last, []string{"default/bad", "default/host"}) {
		t.Errorf("desired %v; want this node's annotated pods only", r.last)
	}

	bad.Annotations[DefaultAnnotation] = "80=3210=9"
	f.update(t, bad)
	cached(t, c, "default", "bad", func(p *Pod) bool { return p.Annotations[DefaultAnnotation] == "80=3210=9" })
	step(context.Background(), c, r)
	step(context.Background(), c, r)
	if got := f.eventsOf(t, "default", "bad", ReasonInvalid); len(got) != 2 {
		t.Fatalf("a new problem: %d events, want 2", len(got))
	}
}

func TestSuccessorOf(t *testing.T) {
	ds := func(uid string) []metav1.OwnerReference {
		yes := true
		return []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "nsredirect", UID: types.UID(uid), Controller: &yes}}
	}
	mk := func(ns, name, owner, phase string, deleting bool) *Pod {
		p := &Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(ns + "/" + name)}, Status: PodStatus{Phase: phase}}
		if owner != "" {
			p.OwnerReferences = ds(owner)
		}
		if deleting {
			now := metav1.Now()
			p.DeletionTimestamp = &now
		}
		return p
	}
	self := mk("kube-system", "nsr-old", "ds1", PodRunning, true)
	for _, tc := range []struct {
		name   string
		others []*Pod
		want   bool
	}{
		{"rollout", []*Pod{mk("kube-system", "nsr-new", "ds1", PodRunning, false)}, true},
		{"uninstall: alone", nil, false},
		{"successor not running yet", []*Pod{mk("kube-system", "nsr-new", "ds1", "Pending", false)}, false},
		{"other pod deleting too", []*Pod{mk("kube-system", "nsr-new", "ds1", PodRunning, true)}, false},
		{"another DaemonSet", []*Pod{mk("kube-system", "nsr-x", "ds2", PodRunning, false)}, false},
		{"another namespace", []*Pod{mk("other", "nsr-new", "ds1", PodRunning, false)}, false},
		{"no controller", []*Pod{mk("kube-system", "nsr-new", "", PodRunning, false)}, false},
	} {
		if got := successorOf(self, append([]*Pod{self}, tc.others...)); got != tc.want {
			t.Errorf("%s: successorOf = %v, want %v", tc.name, got, tc.want)
		}
	}
}
