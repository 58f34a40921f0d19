package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/nsredirect/nsredirect/internal/daemon"
)

// fakeAPI drives the controller from client-go's fake clientset: the
// objects travel as the API server's JSON would, into our own types.
type fakeAPI struct {
	cs       *fake.Clientset
	watching chan struct{} // receives once per watch opened
	events   atomic.Int64
}

func newFakeAPI() *fakeAPI {
	return &fakeAPI{cs: fake.NewClientset(), watching: make(chan struct{}, 16)}
}

func convert[T any](in any) (*T, error) {
	b, err := json.Marshal(in)
	if err != nil {
		return nil, err
	}
	out := new(T)
	return out, json.Unmarshal(b, out)
}

func (f *fakeAPI) ListPods(ctx context.Context, o metav1.ListOptions) (*PodList, error) {
	l, err := f.cs.CoreV1().Pods("").List(ctx, o)
	if err != nil {
		return nil, err
	}
	return convert[PodList](l)
}

func (f *fakeAPI) WatchPods(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
	w, err := f.cs.CoreV1().Pods("").Watch(ctx, o)
	if err != nil {
		return nil, err
	}
	select {
	case f.watching <- struct{}{}:
	default:
	}
	return watch.Filter(w, func(in watch.Event) (watch.Event, bool) {
		p, err := convert[Pod](in.Object)
		if err != nil {
			panic(err)
		}
		in.Object = p
		return in, true
	}), nil
}

func (f *fakeAPI) CreateEvent(ctx context.Context, ev *Event) error {
	e, err := convert[corev1.Event](ev)
	if err != nil {
		return err
	}
	// The fake tracker does not generate names.
	e.Name = fmt.Sprintf("%s%d", e.GenerateName, f.events.Add(1))
	_, err = f.cs.CoreV1().Events(e.Namespace).Create(ctx, e, metav1.CreateOptions{})
	return err
}

// eventsOf lists the events on pod ns/name with reason.
func (f *fakeAPI) eventsOf(t *testing.T, ns, name, reason string) []corev1.Event {
	t.Helper()
	l, err := f.cs.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Event
	for _, e := range l.Items {
		if e.InvolvedObject.Name == name && e.Reason == reason {
			out = append(out, e)
		}
	}
	return out
}

var podSeq atomic.Int64

// pod builds a pod on node with a fresh UID.
func pod(ns, name, node, annotation string) *corev1.Pod {
	n := podSeq.Add(1)
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns, Name: name,
			UID: types.UID(fmt.Sprintf("%08x-1111-4222-8333-%012x", time.Now().UnixNano()&0xffffffff, n)),
		},
		Spec:   corev1.PodSpec{NodeName: node},
		Status: corev1.PodStatus{Phase: corev1.PodRunning},
	}
	if annotation != "" {
		p.Annotations = map[string]string{DefaultAnnotation: annotation}
	}
	return p
}

func (f *fakeAPI) add(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if _, err := f.cs.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (f *fakeAPI) update(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if _, err := f.cs.CoreV1().Pods(p.Namespace).Update(context.Background(), p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (f *fakeAPI) remove(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if err := f.cs.CoreV1().Pods(p.Namespace).Delete(context.Background(), p.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// recorder is a reconciler without a kernel, for the unit tests.
type recorder struct {
	mu   sync.Mutex
	last []string
	live []string
}

func (r *recorder) Reconcile(ts []daemon.Target) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.last = nil
	for _, t := range ts {
		r.last = append(r.last, t.Name)
	}
	return nil
}

func (r *recorder) Serving() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.live
}

// startController runs a controller over f and waits until its informer
// synced and its watch is open, so no change the test makes is missed.
func startController(t *testing.T, f *fakeAPI, cfg Config) *Controller {
	t.Helper()
	cfg.API = f
	if cfg.Annotation == "" {
		cfg.Annotation = DefaultAnnotation
	}
	if cfg.Proc == "" {
		cfg.Proc = "/proc"
	}
	c := NewController(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := c.Start(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case <-f.watching:
	case <-time.After(10 * time.Second):
		t.Fatal("the informer never opened its watch")
	}
	return c
}
