package main

import (
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// fakeAPI serves the calls `nsredirect kube` makes (list and watch pods,
// post events) over TLS, from a pod store of its own: client-go's fake
// clientset, which the integration tests use, panics once a watcher falls
// 100 events behind, which 110 pods do at once.
type fakeAPI struct {
	kubeconfig string
	mu         sync.Mutex
	pods       map[string]*corev1.Pod
	rv         int64
	watchers   map[chan podEvent]struct{}
	posted     atomic.Int64 // Events the daemon posted
}

type podEvent struct {
	Type   string      `json:"type"`
	Object *corev1.Pod `json:"object"`
}

const benchToken = "bench-token"

func (e *env) fakeAPI() (*fakeAPI, error) {
	a := &fakeAPI{pods: map[string]*corev1.Pod{}, watchers: map[chan podEvent]struct{}{}}
	srv := httptest.NewTLSServer(http.HandlerFunc(a.serve))
	e.onClose(srv.Close)
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	dir, err := os.MkdirTemp("", "nsr-bench-kube-")
	if err != nil {
		return nil, err
	}
	e.onClose(func() { os.RemoveAll(dir) })
	a.kubeconfig = filepath.Join(dir, "kubeconfig")
	kc := fmt.Sprintf("apiVersion: v1\nkind: Config\ncurrent-context: b\ncontexts:\n- name: b\n  context: {cluster: b, user: b}\nclusters:\n- name: b\n  cluster:\n    server: %s\n    certificate-authority-data: %s\nusers:\n- name: b\n  user: {token: %s}\n",
		srv.URL, base64.StdEncoding.EncodeToString(ca), benchToken)
	return a, os.WriteFile(a.kubeconfig, []byte(kc), 0o600)
}

func (a *fakeAPI) serve(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+benchToken {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/pods" && r.URL.Query().Get("watch") == "true":
		ch := make(chan podEvent, 4096)
		a.mu.Lock()
		a.watchers[ch] = struct{}{}
		a.mu.Unlock()
		defer func() { a.mu.Lock(); delete(a.watchers, ch); a.mu.Unlock() }()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		enc := json.NewEncoder(w)
		for {
			select {
			case <-r.Context().Done():
				return
			case ev := <-ch:
				_ = enc.Encode(ev)
				w.(http.Flusher).Flush()
			}
		}
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/pods":
		a.mu.Lock()
		l := corev1.PodList{TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: strconv.FormatInt(a.rv, 10)}}
		for _, p := range a.pods {
			l.Items = append(l.Items, *p)
		}
		a.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(l)
	case r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/events"):
		// The daemon looks for a Warning it posted before posting it again.
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(corev1.EventList{TypeMeta: metav1.TypeMeta{Kind: "EventList", APIVersion: "v1"}})
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/events"):
		var ev corev1.Event
		_ = json.NewDecoder(r.Body).Decode(&ev)
		a.posted.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(ev)
	default:
		http.NotFound(w, r)
	}
}

func (a *fakeAPI) publish(typ string, p *corev1.Pod) {
	a.rv++
	c := p.DeepCopy()
	c.ResourceVersion = strconv.FormatInt(a.rv, 10)
	// A watch event's object names its kind, as an API server's does
	// (client-go cannot decode it otherwise and the watch ends).
	c.TypeMeta = metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"}
	if typ != "DELETED" {
		a.pods[p.Name] = c
	} else {
		delete(a.pods, p.Name)
	}
	for ch := range a.watchers {
		select {
		case ch <- podEvent{Type: typ, Object: c}:
		default: // a watcher this far behind relists on its own
		}
	}
}

func (a *fakeAPI) add(p *corev1.Pod) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.publish("ADDED", p)
	return nil
}

func (a *fakeAPI) remove(p *corev1.Pod) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.publish("DELETED", p)
	return nil
}

var podSeq atomic.Int64

func benchPod(name string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: name,
			UID:         types.UID(fmt.Sprintf("%08x-2222-4333-8444-%012x", time.Now().UnixNano()&0xffffffff, podSeq.Add(1))),
			Annotations: map[string]string{"nsredirect.io/redirect": "80=3210"}},
		Spec:   corev1.PodSpec{NodeName: "node-a"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning},
	}
}

type benchPodSandbox struct {
	pod *corev1.Pod
	sb  *sandbox
}

// podSandbox makes a pod: its process in a kubelet-shaped cgroup under top.
func (e *env) podSandbox(top, name string) (*benchPodSandbox, error) {
	p := benchPod(name)
	sb, err := e.sandbox(name, filepath.Join(top, "burstable", "pod"+string(p.UID), "ctr0"))
	if err != nil {
		return nil, err
	}
	return &benchPodSandbox{pod: p, sb: sb}, nil
}

// kubeTop creates the kubepods cgroup and removes it, children first, at
// the end (after the processes in it are stopped).
func (e *env) kubeTop(root string) (string, error) {
	top := filepath.Join(root, fmt.Sprintf("kubepods-bench-%d", time.Now().UnixNano()%100000))
	if err := os.Mkdir(top, 0o755); err != nil {
		return "", err
	}
	e.onClose(func() {
		var dirs []string
		_ = filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			for j := 0; j < 100 && os.Remove(dirs[i]) != nil; j++ {
				time.Sleep(20 * time.Millisecond)
			}
		}
	})
	return top, nil
}

func scaleKube(e *env, s *scaleResults, root string, pods, procs, burst int) error {
	api, err := e.fakeAPI()
	if err != nil {
		return err
	}
	top, err := e.kubeTop(root)
	if err != nil {
		return err
	}
	fmt.Printf("kube: %d pods\n", pods)
	live := make([]*benchPodSandbox, 0, pods)
	for i := 0; i < pods; i++ {
		ps, err := e.podSandbox(top, fmt.Sprintf("nsr-bk-%d-%d", podSeq.Load(), i))
		if err != nil {
			return err
		}
		if err := api.add(ps.pod); err != nil {
			return err
		}
		live = append(live, ps)
	}
	fmt.Printf("kube: filling the machine to %d processes\n", procs)
	if s.procs, err = e.fillProcs(procs); err != nil {
		return err
	}
	// As the DaemonSet runs: the host's /proc mounted elsewhere (--proc),
	// so the pods' processes are looked at through paths that are not this
	// pid namespace's, as in a pod without hostPID (probed, never pidfds).
	hostProc, err := e.hostProc()
	if err != nil {
		return err
	}
	d, stop, err := e.daemon("kube", "--kubeconfig", api.kubeconfig, "--node-name", "node-a", "--cgroup", root, "--proc", hostProc)
	if err != nil {
		return err
	}
	defer stop()
	for _, ps := range live {
		if _, err := ps.sb.waitRedirected(60 * time.Second); err != nil {
			return fmt.Errorf("kube: %w; the daemon's warnings:\n%s", err, e.daemonLog)
		}
	}
	// Idle is after the start-up: the daemon posts a Redirected Event per
	// pod (client-go's rate limit makes that ~20 s for 110 pods) before its
	// loop begins; measured in the window, it is not what an idle node costs.
	for deadline := time.Now().Add(90 * time.Second); api.posted.Load() < int64(pods) && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
	}
	settle([]int{d.Process.Pid})
	row := scaleRow{mode: "kube", shape: fmt.Sprintf("%d annotated pods, %d processes", pods, s.procs), churnWhat: "a pod replaced every 200 ms"}
	err = measureIdleAndChurn(e, &row, d.Process.Pid, func(i int) error {
		old := live[i%len(live)]
		_ = api.remove(old.pod)
		old.sb.remove()
		ps, err := e.podSandbox(top, fmt.Sprintf("nsr-bk-%d-c", podSeq.Load()))
		if err != nil {
			return err
		}
		if err := api.add(ps.pod); err != nil {
			return err
		}
		live[i%len(live)] = ps
		return nil
	})
	if err != nil {
		return err
	}
	fmt.Printf("kube: %d pods starting at once\n", burst)
	var fresh []*benchPodSandbox
	for j := 0; j < burst; j++ {
		ps, err := e.podSandbox(top, fmt.Sprintf("nsr-bk-%d-b", podSeq.Load()))
		if err != nil {
			return err
		}
		fresh = append(fresh, ps)
	}
	// The processes run; kubelet then reports the pods Running: announce
	// them all at once and time each redirect from there.
	sbs := make([]*sandbox, len(fresh))
	for j, ps := range fresh {
		sbs[j] = ps.sb
	}
	done := make(chan error, 1)
	go func() {
		for _, ps := range fresh {
			if err := api.add(ps.pod); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	times, err := timeAll(sbs, 30*time.Second)
	if err := <-done; err != nil {
		return err
	}
	if err != nil {
		return err
	}
	row.p50, row.p99, row.max, row.starts = percentileDur(times, 50), percentileDur(times, 99), percentileDur(times, 100), burst
	s.rows = append(s.rows, row)
	return nil
}

// daemon starts nsredirect in a mode on a pin dir of its own; stopping it
// also removes what it handed over (cleanup --all), so no mode inherits
// another's state.
func (e *env) daemon(args ...string) (*exec.Cmd, func(), error) {
	if err := e.bpffs(); err != nil {
		return nil, nil, err
	}
	bin, _ := filepath.Abs(e.cfg.nsredirect)
	pin := e.pinDir
	e.daemonLog = &tailBuffer{}
	var w io.Writer = e.daemonLog
	level := "warn"
	if e.cfg.daemonLog != "" {
		f, err := os.OpenFile(e.cfg.daemonLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return nil, nil, fmt.Errorf("--daemon-log: %w", err)
		}
		e.onClose(func() { f.Close() })
		w, level = io.MultiWriter(w, f), "info"
	}
	cmd, err := e.startTo(w, bin, append(args, "--pin-dir", pin, "--log-level", level)...)
	if err != nil {
		return nil, nil, err
	}
	return cmd, func() {
		stopNow(cmd)
		_ = exec.Command(bin, "cleanup", "--all", "--pin-dir", pin).Run()
	}, nil
}

// hostProc bind-mounts /proc at a directory of its own, as a DaemonSet's
// hostPath mount of the host's /proc.
func (e *env) hostProc() (string, error) {
	dir, err := os.MkdirTemp("", "nsr-bench-hostproc-")
	if err != nil {
		return "", err
	}
	if err := unix.Mount("/proc", dir, "", unix.MS_BIND, ""); err != nil {
		os.Remove(dir)
		return "", fmt.Errorf("bind /proc at %s: %w", dir, err)
	}
	e.onClose(func() {
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		_ = os.Remove(dir)
	})
	return dir, nil
}
