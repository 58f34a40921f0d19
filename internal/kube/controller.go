package kube

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/rule"
)

// DefaultAnnotation carries a pod's specs: nsredirect.io/redirect: "80=3210".
const DefaultAnnotation = "nsredirect.io/redirect"

// Event reasons.
const (
	ReasonInvalid    = "InvalidRedirect"
	ReasonRedirected = "Redirected"
)

// Config is what a Controller watches and where it finds pods' netns.
type Config struct {
	API API
	// Node is this node's name: only pods scheduled here are watched.
	Node string
	// Annotation is the key whose value is SPEC[,SPEC...].
	Annotation string
	// Proc is the host's /proc (a hostPath mount in a DaemonSet).
	Proc string
	// PodName and PodNamespace are the daemon's own pod (downward API),
	// to tell a rollout (a successor runs) from an uninstall. Empty: unknown.
	PodName, PodNamespace string
	Log                   logrus.FieldLogger
}

// Controller turns the annotated running pods of one node into desired
// targets, and reports bad annotations as Events on their pods.
type Controller struct {
	cfg      Config
	informer cache.SharedIndexInformer
	kick     chan struct{}

	mu      sync.Mutex        // guards the fields below
	warned  map[string]string // pod UID -> the warning last posted for it
	serving map[string]bool   // target names live after the last sync
	// last and lastWarn are the pods and warnings of the last Desired,
	// for Reconciled.
	last     map[string]*Pod
	lastWarn map[string]bool

	errMu   sync.Mutex
	lastErr error // the informer's last list/watch failure
}

// NewController builds the pod informer (field selector spec.nodeName) over
// cfg.API; Start runs it.
func NewController(cfg Config) *Controller {
	c := &Controller{cfg: cfg, kick: make(chan struct{}, 1), warned: map[string]string{}, serving: map[string]bool{}}
	lw := &listWatch{ListWatch: &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = "spec.nodeName=" + cfg.Node
			return cfg.API.ListPods(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = "spec.nodeName=" + cfg.Node
			return cfg.API.WatchPods(ctx, o)
		},
	}}
	c.informer = cache.NewSharedIndexInformer(lw, &Pod{}, 0, cache.Indexers{})
	_ = c.informer.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		c.errMu.Lock()
		c.lastErr = err
		c.errMu.Unlock()
		cfg.Log.WithError(err).Warn("pod list/watch failed; retrying")
	})
	changed := func(o any) {
		if p, ok := o.(*Pod); ok {
			cfg.Log.WithFields(logrus.Fields{"pod": key(p), "phase": p.Status.Phase, "deleting": p.DeletionTimestamp != nil}).Debug("pod changed")
		}
		c.poke()
	}
	_, _ = c.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    changed,
		UpdateFunc: func(_, o any) { changed(o) },
		DeleteFunc: changed,
	})
	return c
}

// listWatch says the reflector must list then watch: the WatchList stream
// (sendInitialEvents) is not implemented by our small client or the fake
// clientset, and list+watch works with every API server.
type listWatch struct{ *cache.ListWatch }

func (*listWatch) IsWatchListSemanticsUnSupported() bool { return true }

func (c *Controller) poke() {
	select {
	case c.kick <- struct{}{}:
	default: // a sync is already due; it will see this change too
	}
}

// Start runs the informer until ctx ends and waits until its first listing
// is in the cache, for at most timeout. A failure to reach the API server
// in time is returned with the last error seen.
func (c *Controller) Start(ctx context.Context, timeout time.Duration) error {
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// One plain request first: a refused connection, a bad certificate or
	// token is reported as it is, at once, not after the informer's retries.
	if _, err := c.cfg.API.ListPods(wctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + c.cfg.Node, Limit: 1}); err != nil {
		return fmt.Errorf("reach the API server: %w", err)
	}
	go c.informer.RunWithContext(klog.NewContext(ctx, klogTo(c.cfg.Log)))
	if cache.WaitForCacheSync(wctx.Done(), c.informer.HasSynced) {
		return nil
	}
	c.errMu.Lock()
	last := c.lastErr
	c.errMu.Unlock()
	if last == nil {
		last = errors.New("no answer")
	}
	return fmt.Errorf("list the pods of node %s within %s: %w", c.cfg.Node, timeout, last)
}

// Watch calls wake on every pod change until ctx ends.
func (c *Controller) Watch(ctx context.Context, wake func()) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.kick:
			wake()
		}
	}
}

// Policy: a rollout starts the new daemon while the old one serves every
// pod (WaitForOwners); a pod's processes come and go (a sandbox re-created,
// the process its netns was found through exiting), so a resync that looks
// at every target scans the proc root again rather than re-resolving old
// paths (RedescribeEachResync); each reconcile's outcome is posted as
// Events on the pods (Reconciled); a rollout hands over and an uninstall
// removes (Handover).
func (c *Controller) Policy() daemon.Policy {
	return daemon.Policy{WaitForOwners: true, RedescribeEachResync: true, Reconciled: c.Reconciled, Handover: c.Handover}
}

// pods returns the cached pods of this node.
func (c *Controller) pods() []*Pod {
	var out []*Pod
	for _, o := range c.informer.GetStore().List() {
		if p, ok := o.(*Pod); ok && p.Spec.NodeName == c.cfg.Node {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return key(out[i]) < key(out[j]) })
	return out
}

func key(p *Pod) string { return p.Namespace + "/" + p.Name }

// desired is one pass over the cache and one scan of the proc root.
// warn names the targets whose error is the pod's to fix (an Event on it),
// as opposed to one of the node's (no process found under --proc).
func (c *Controller) desired() (ts []daemon.Target, byName map[string]*Pod, warn map[string]bool) {
	byName, warn = map[string]*Pod{}, map[string]bool{}
	var procs Pods
	scanErr := error(nil)
	scanned := false
	for _, p := range c.pods() {
		value, annotated := p.Annotations[c.cfg.Annotation]
		if !annotated || p.DeletionTimestamp != nil || p.Status.Phase != PodRunning {
			continue
		}
		t := daemon.Target{Name: key(p), Kind: "pod", ID: string(p.UID)}
		byName[t.Name] = p
		rules, err := rule.ParseList(value)
		switch {
		case err != nil:
			t.Err = fmt.Errorf("pod %s: annotation %s=%q: %w; fix the annotation", t.Name, c.cfg.Annotation, value, err)
			warn[t.Name] = true
		case p.Spec.HostNetwork:
			// An annotation must never steer the loopback of every process
			// on the node. Said early, with the reason; the daemon refuses
			// any target whose netns is the host's by identity all the same.
			t.Err = fmt.Errorf("pod %s uses the host network namespace (hostNetwork: true); nsredirect kube redirects only in pods' own: remove the annotation", t.Name)
			warn[t.Name] = true
		default:
			if !scanned {
				procs, scanErr = ScanPods(c.cfg.Proc)
				scanned = true
			}
			t.Rules = rules
			if scanErr != nil {
				t.Err = fmt.Errorf("%w: %w", daemon.ErrLookup, scanErr)
			} else if t.Netns, _, err = procs.Netns(string(p.UID)); errors.Is(err, ErrNoPodProcess) {
				// The sandbox is being (re-)created: not an error, and
				// rules already live stay until its old netns is gone.
				t.Err = fmt.Errorf("pod %s: %w (%w)", t.Name, err, daemon.ErrPending)
			} else if err != nil {
				t.Err = fmt.Errorf("pod %s: %w", t.Name, err)
			}
		}
		ts = append(ts, t)
	}
	daemon.RefuseSharedNetns(ts, func(name, first string) error {
		warn[name] = true
		return fmt.Errorf("pod %s shares its network namespace with pod %s, which is annotated too; annotate only one of them", name, first)
	})
	return ts, byName, warn
}

// Desired describes the annotated running pods of this node.
func (c *Controller) Desired(context.Context) ([]daemon.Target, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ts, pods, warn := c.desired()
	c.last, c.lastWarn = pods, warn
	return ts, nil
}

// Reconciled posts the Events a reconcile of ts calls for: a Warning once
// per distinct problem of a pod (a bad annotation, a netns shared or the
// host's), a Normal when a pod's rules go live.
func (c *Controller) Reconciled(ctx context.Context, ts []daemon.Target, serving []string, failures map[string]error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	pods, warn := c.last, c.lastWarn
	now := map[string]bool{}
	for _, n := range serving {
		now[n] = true
	}
	seen := map[string]bool{}
	for _, t := range ts {
		p := pods[t.Name]
		if p == nil {
			continue
		}
		uid := string(p.UID)
		seen[uid] = true
		problem := t.Err
		if !warn[t.Name] {
			problem = nil
			if err := failures[t.Name]; errors.Is(err, daemon.ErrHostNetns) {
				problem = err
			}
		}
		if problem != nil {
			if msg := problem.Error(); c.warned[uid] != msg {
				c.warned[uid] = msg
				c.postOnce(ctx, p, EventWarning, ReasonInvalid, msg)
			}
			continue
		}
		delete(c.warned, uid)
		if now[t.Name] && !c.serving[t.Name] {
			c.post(ctx, p, EventNormal, ReasonRedirected, "nsredirect redirects "+rule.FormatList(t.Rules)+" in this pod's network namespace")
		}
	}
	for uid := range c.warned {
		if !seen[uid] {
			delete(c.warned, uid)
		}
	}
	c.serving = now
}

// EventLister is an API that can list the Events on one object; with it a
// restarted daemon does not post again a Warning its predecessor posted.
// (RBAC: `list` on events.)
type EventLister interface {
	// ListEvents returns the Events in namespace whose involvedObject.uid
	// is uid.
	ListEvents(ctx context.Context, namespace, uid string) ([]Event, error)
}

// postOnce posts the Event unless the same reason and message is already
// on the pod (posted by an earlier run of this daemon, or by another pod
// of it): once per distinct problem, across restarts.
func (c *Controller) postOnce(ctx context.Context, p *Pod, typ, reason, msg string) {
	if l, ok := c.cfg.API.(EventLister); ok {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		evs, err := l.ListEvents(lctx, p.Namespace, string(p.UID))
		cancel()
		if err == nil {
			for _, ev := range evs {
				if ev.Reason == reason && ev.Message == msg && ev.Type == typ {
					c.cfg.Log.WithFields(logrus.Fields{"pod": key(p), "reason": reason}).Debug("event already posted")
					return
				}
			}
		} else {
			c.cfg.Log.WithError(err).WithField("pod", key(p)).Debug("cannot list the pod's events; posting")
		}
	}
	c.post(ctx, p, typ, reason, msg)
}

// post creates an Event on p; a failure is logged, never fatal.
func (c *Controller) post(ctx context.Context, p *Pod, typ, reason, msg string) {
	now := metav1.Now()
	ev := &Event{
		TypeMeta:   metav1.TypeMeta{Kind: "Event", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{GenerateName: p.Name + ".", Namespace: p.Namespace},
		InvolvedObject: ObjectReference{
			Kind: "Pod", APIVersion: "v1", Namespace: p.Namespace, Name: p.Name, UID: string(p.UID), ResourceVersion: p.ResourceVersion,
		},
		Reason: reason, Message: msg, Type: typ,
		Source:         EventSource{Component: "nsredirect", Host: c.cfg.Node},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
	}
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	log := c.cfg.Log.WithFields(logrus.Fields{"pod": key(p), "reason": reason})
	if err := c.cfg.API.CreateEvent(pctx, ev); err != nil {
		log.WithError(err).Warn("cannot post event")
		return
	}
	log.Debug("event posted")
}

// Successor reports whether another pod of this daemon's DaemonSet runs on
// this node (a rollout with maxSurge: this one must hand over), and whether
// this daemon knows its own pod well enough to tell (known false: no
// --pod-name/--pod-namespace, or its pod is not found or has no controller).
func (c *Controller) Successor() (successor, known bool) {
	self, pods, _ := c.self()
	if self == nil {
		return false, false
	}
	return successorOf(self, pods), true
}

// self finds this daemon's own pod in the cache; why says, when it is not
// usable, what is missing.
func (c *Controller) self() (self *Pod, pods []*Pod, why string) {
	if c.cfg.PodName == "" || c.cfg.PodNamespace == "" {
		return nil, nil, "--pod-name/--pod-namespace not given"
	}
	pods = c.pods()
	for _, p := range pods {
		if p.Namespace == c.cfg.PodNamespace && p.Name == c.cfg.PodName {
			self = p
		}
	}
	name := c.cfg.PodNamespace + "/" + c.cfg.PodName
	switch {
	case self == nil:
		return nil, nil, fmt.Sprintf("pod %s (--pod-name/--pod-namespace) is not on node %s", name, c.cfg.Node)
	case metav1.GetControllerOf(self) == nil:
		return nil, nil, fmt.Sprintf("pod %s (--pod-name/--pod-namespace) has no controller (not a DaemonSet pod)", name)
	}
	return self, pods, ""
}

// OwnPodUnknown returns why this daemon cannot tell a rollout from an
// uninstall ("" when it can): then it hands over on shutdown while
// annotated pods run, so an uninstall needs `nsredirect cleanup --all`.
func (c *Controller) OwnPodUnknown() string {
	_, _, why := c.self()
	return why
}

// Handover: in a rollout (a successor runs on this node) the rules stay
// for it; in an uninstall they go. When this daemon cannot tell, it keeps
// the rules of the pods it serves.
func (c *Controller) Handover(_ context.Context, serving []string) bool {
	if successor, known := c.Successor(); known {
		c.cfg.Log.WithField("successor", successor).Info("shutting down")
		return successor
	}
	c.cfg.Log.WithField("reason", c.OwnPodUnknown()).Warn("own pod unknown: handing the rules over; after an uninstall run `nsredirect cleanup --all` on this node")
	return len(serving) > 0
}

// successorOf reports whether pods holds a running, not deleting pod other
// than self with self's namespace and controller (the same DaemonSet).
func successorOf(self *Pod, pods []*Pod) bool {
	owner := metav1.GetControllerOf(self)
	if owner == nil {
		return false
	}
	for _, p := range pods {
		if p.UID == self.UID || p.Namespace != self.Namespace || p.DeletionTimestamp != nil || p.Status.Phase != PodRunning {
			continue
		}
		if o := metav1.GetControllerOf(p); o != nil && o.UID == owner.UID {
			return true
		}
	}
	return false
}
