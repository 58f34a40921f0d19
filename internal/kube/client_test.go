package kube

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/klog/v2"
)

// apiServer is an HTTP/2 TLS server answering pod lists, watches and event
// posts the way kube-apiserver does, with the Authorization headers seen.
type apiServer struct {
	*httptest.Server
	mu     sync.Mutex
	auth   []string
	events []map[string]any
	proto  []string
}

func newAPIServer(t *testing.T) *apiServer {
	t.Helper()
	a := &apiServer{}
	a.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.auth = append(a.auth, r.Header.Get("Authorization"))
		a.proto = append(a.proto, r.Proto)
		a.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.Method == http.MethodPost && r.URL.Path == "/api/v1/namespaces/ns/events":
			var ev map[string]any
			if err := json.NewDecoder(r.Body).Decode(&ev); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			a.mu.Lock()
			a.events = append(a.events, ev)
			a.mu.Unlock()
			w.WriteHeader(http.StatusCreated)
			_ = json.NewEncoder(w).Encode(ev)
		case r.Method == http.MethodGet && r.URL.Path == "/api/v1/namespaces/ns/events":
			if r.URL.Query().Get("fieldSelector") != "involvedObject.uid=u1" {
				http.Error(w, "field selector "+r.URL.Query().Get("fieldSelector"), http.StatusBadRequest)
				return
			}
			// One of another object too: a server that ignored the selector.
			fmt.Fprintln(w, `{"kind":"EventList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[`+
				`{"metadata":{"name":"a.1","namespace":"ns"},"involvedObject":{"kind":"Pod","namespace":"ns","name":"a","uid":"u1"},"reason":"InvalidRedirect","message":"bad","type":"Warning"},`+
				`{"metadata":{"name":"b.1","namespace":"ns"},"involvedObject":{"kind":"Pod","namespace":"ns","name":"b","uid":"u2"},"reason":"InvalidRedirect","message":"bad","type":"Warning"}]}`)
		case r.URL.Path != "/api/v1/pods":
			http.Error(w, "path "+r.URL.Path, http.StatusNotFound)
		case r.URL.Query().Get("fieldSelector") != "spec.nodeName=n1":
			http.Error(w, "field selector "+r.URL.Query().Get("fieldSelector"), http.StatusBadRequest)
		case r.URL.Query().Get("watch") == "true":
			fmt.Fprintln(w, `{"type":"ADDED","object":{"kind":"Pod","apiVersion":"v1","metadata":{"name":"a","namespace":"ns","uid":"u1","annotations":{"k":"80=3210"}},"spec":{"nodeName":"n1","hostNetwork":true},"status":{"phase":"Running"}}}`)
			if r.URL.Query().Get("resourceVersion") == "expired" {
				fmt.Fprintln(w, `{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Expired","code":410,"message":"too old resource version"}}`)
				return
			}
			w.(http.Flusher).Flush()
			<-r.Context().Done() // a watch stays open until the client leaves
		default:
			fmt.Fprintln(w, `{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"42"},"items":[{"metadata":{"name":"a","namespace":"ns"},"spec":{"nodeName":"n1"},"status":{"phase":"Pending"}}]}`)
		}
	}))
	a.EnableHTTP2 = true
	a.StartTLS()
	t.Cleanup(a.Close)
	return a
}

// kubeconfig writes a kubeconfig for server (a URL) trusting a's CA, with
// the given user stanza. Tests that need a transport of their own (client-go
// caches them by TLS settings, and every httptest server has the same
// certificate) give a server name of their own: the certificate holds
// example.com, 127.0.0.1 and ::1.
func (a *apiServer) kubeconfig(t *testing.T, server, serverName, user string) string {
	t.Helper()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.Certificate().Raw})
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
current-context: c
contexts: [{name: c, context: {cluster: k, user: u}}]
clusters: [{name: k, cluster: {server: %q, certificate-authority-data: %s, tls-server-name: %s}}]
users: [{name: u, user: %s}]
`, server, base64.StdEncoding.EncodeToString(ca), serverName, user)
	p := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(p, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestKubeconfigClient: the kubeconfig's CA verifies the server over
// HTTP/2, its token is sent, list and watch decode into our types, a watch
// ERROR 410 is the error the informer relists on, and an event is posted
// as a v1 Event.
func TestKubeconfigClient(t *testing.T) {
	a := newAPIServer(t)
	c, err := FromKubeconfig(a.kubeconfig(t, a.URL, "example.com", "{token: tok}"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	opts := metav1.ListOptions{FieldSelector: "spec.nodeName=n1"}
	l, err := c.ListPods(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if l.ResourceVersion != "42" || len(l.Items) != 1 || l.Items[0].Name != "a" || l.Items[0].Status.Phase != "Pending" {
		t.Fatalf("list decoded as %+v", l)
	}
	opts.ResourceVersion = "expired"
	w, err := c.WatchPods(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	ev := <-w.ResultChan()
	p, ok := ev.Object.(*Pod)
	if ev.Type != watch.Added || !ok || p.UID != "u1" || !p.Spec.HostNetwork || p.Annotations["k"] != "80=3210" {
		t.Fatalf("watch event %+v", ev)
	}
	ev = <-w.ResultChan()
	st, ok := ev.Object.(*metav1.Status)
	if ev.Type != watch.Error || !ok || !apierrors.IsResourceExpired(apierrors.FromObject(st)) {
		t.Fatalf("watch error event %+v; want a 410 Expired status", ev)
	}
	err = c.CreateEvent(ctx, &Event{
		ObjectMeta:     metav1.ObjectMeta{Namespace: "ns", GenerateName: "a."},
		InvolvedObject: ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: "ns", Name: "a"},
		Reason:         "Redirected", Type: EventNormal, Count: 1,
	})
	if err != nil {
		t.Fatal(err)
	}
	evs, err := c.ListEvents(ctx, "ns", "u1")
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 1 || evs[0].Reason != "InvalidRedirect" || evs[0].Message != "bad" || evs[0].Type != EventWarning || evs[0].InvolvedObject.UID != "u1" {
		t.Errorf("events listed %+v; want the one Warning on u1", evs)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.events) != 1 || a.events[0]["kind"] != "Event" || a.events[0]["apiVersion"] != "v1" || a.events[0]["reason"] != "Redirected" {
		t.Errorf("events posted %v; want one v1 Event", a.events)
	}
	for i, h := range a.auth {
		if h != "Bearer tok" || a.proto[i] != "HTTP/2.0" {
			t.Errorf("request %d: %s with Authorization %q; want HTTP/2.0 and the kubeconfig's token", i, a.proto[i], h)
		}
	}
}

// TestKubeconfigExecPlugin: a user authenticating through an exec
// credential plugin (as EKS, GKE and AKS kubeconfigs do) gets the token the
// plugin prints.
func TestKubeconfigExecPlugin(t *testing.T) {
	a := newAPIServer(t)
	plugin := filepath.Join(t.TempDir(), "plugin")
	script := "#!/bin/sh\necho '{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{\"token\":\"from-plugin\"}}'\n"
	if err := os.WriteFile(plugin, []byte(script), 0o700); err != nil {
		t.Fatal(err)
	}
	user := fmt.Sprintf("{exec: {apiVersion: client.authentication.k8s.io/v1, command: %q, interactiveMode: Never}}", plugin)
	c, err := FromKubeconfig(a.kubeconfig(t, a.URL, "example.com", user))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.ListPods(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=n1"}); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.auth) != 1 || a.auth[0] != "Bearer from-plugin" {
		t.Errorf("Authorization sent %q; want the plugin's token", a.auth)
	}
}

// freezer forwards TCP to target until frozen, then holds every connection
// open while passing nothing: a dead network path or a hung API server.
type freezer struct {
	ln     net.Listener
	frozen atomic.Bool
	gate   chan struct{} // closed on cleanup
}

func newFreezer(t *testing.T, target string) *freezer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{ln: ln, gate: make(chan struct{})}
	var conns sync.WaitGroup
	t.Cleanup(func() { ln.Close(); close(f.gate); conns.Wait() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			conns.Add(2)
			pipe := func(dst, src net.Conn) {
				defer conns.Done()
				defer dst.Close()
				defer src.Close()
				buf := make([]byte, 32<<10)
				for {
					n, err := src.Read(buf)
					if f.frozen.Load() {
						<-f.gate
						return
					}
					if n > 0 {
						if _, werr := dst.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}
			go pipe(u, c)
			go pipe(c, u)
		}
	}()
	return f
}

// TestWatchEndsOnDeadConnection: when the API connection goes silent, the
// HTTP/2 health ping closes it and the watch ends (the informer then
// re-lists), instead of the watch stalling until TCP gives up.
func TestWatchEndsOnDeadConnection(t *testing.T) {
	t.Setenv("HTTP2_READ_IDLE_TIMEOUT_SECONDS", "1")
	t.Setenv("HTTP2_PING_TIMEOUT_SECONDS", "1")
	a := newAPIServer(t)
	f := newFreezer(t, a.Listener.Addr().String())
	c, err := FromKubeconfig(a.kubeconfig(t, "https://"+f.ln.Addr().String(), "127.0.0.1", "{token: tok}"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w, err := c.WatchPods(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=n1"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	if ev := <-w.ResultChan(); ev.Type != watch.Added {
		t.Fatalf("first watch event %+v", ev)
	}
	f.frozen.Store(true)
	start := time.Now()
	deadline := time.After(15 * time.Second)
	for {
		select {
		case _, open := <-w.ResultChan():
			if !open {
				t.Logf("watch ended %s after the connection went silent", time.Since(start).Round(time.Millisecond))
				return
			}
		case <-deadline:
			t.Fatal("the watch still waits 15 s after its connection went silent; want the HTTP/2 health ping to end it")
		}
	}
}

func TestKubeconfigErrors(t *testing.T) {
	dir := t.TempDir()
	for body, mention := range map[string]string{
		"current-context: x\n": "context: x",
		"current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n":                                                                                 `"k"`,
		"current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\nclusters: [{name: k, cluster: {server: 'https://h', certificate-authority-data: '!!'}}]\n": "base64",
		"current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\nclusters: [{name: k, cluster: {server: 'https://h', certificate-authority: ca.pem}}]\n":    "ca.pem",
		"{{": "kubeconfig",
	} {
		p := filepath.Join(dir, "kc")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := FromKubeconfig(p)
		if err == nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), mention) || strings.Contains(err.Error(), "\n") {
			t.Errorf("kubeconfig %q: %v; want one line mentioning %s", body, err, mention)
		}
	}
	if _, err := FromKubeconfig(filepath.Join(dir, "missing")); err == nil || !errors.Is(err, ErrConfig) {
		t.Errorf("missing kubeconfig: %v; want ErrConfig", err)
	}
}

// TestClientLogsRouted: client-go's global klog output (API warnings,
// exec plugins) goes through our logger, in its format.
func TestClientLogsRouted(t *testing.T) {
	var buf bytes.Buffer
	l := logrus.New()
	l.SetOutput(&buf)
	l.SetFormatter(&logrus.JSONFormatter{})
	RouteClientLogs(l)
	t.Cleanup(klog.ClearLogger)
	klog.Warning("from client-go")
	klog.Flush()
	if !strings.Contains(buf.String(), `"msg":"from client-go"`) {
		t.Errorf("logged %q; want the klog line as JSON", buf.String())
	}
}

// TestInClusterOutsidePod: outside a pod the in-cluster configuration is a
// configuration error naming the variables.
func TestInClusterOutsidePod(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	if _, err := InCluster(); err == nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "KUBERNETES_SERVICE_HOST") {
		t.Errorf("outside a pod: %v", err)
	}
}
