package kube

import (
	"context"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
)

// TestInClusterClient: the service account's CA verifies the server, the
// token is read on every request (kubelet rotates it), list and watch
// decode into our types, and a watch ERROR 410 is the error the informer
// relists on.
func TestInClusterClient(t *testing.T) {
	var mu sync.Mutex
	var tokens []string
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		tokens = append(tokens, r.Header.Get("Authorization"))
		mu.Unlock()
		if got := r.URL.Query().Get("fieldSelector"); got != "spec.nodeName=n1" {
			http.Error(w, "field selector "+got, http.StatusBadRequest)
			return
		}
		if r.URL.Query().Get("watch") == "true" {
			fmt.Fprintln(w, `{"type":"ADDED","object":{"metadata":{"name":"a","namespace":"ns","uid":"u1","annotations":{"k":"80=3210"}},"spec":{"nodeName":"n1","hostNetwork":true},"status":{"phase":"Running"}}}`)
			fmt.Fprintln(w, `{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Expired","code":410,"message":"too old resource version"}}`)
			return
		}
		fmt.Fprintln(w, `{"kind":"PodList","metadata":{"resourceVersion":"42"},"items":[{"metadata":{"name":"a","namespace":"ns"},"spec":{"nodeName":"n1"},"status":{"phase":"Pending"}}]}`)
	}))
	defer srv.Close()
	sa := t.TempDir()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(filepath.Join(sa, "ca.crt"), ca, 0o600); err != nil {
		t.Fatal(err)
	}
	writeToken := func(s string) {
		if err := os.WriteFile(filepath.Join(sa, "token"), []byte(s+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeToken("one")
	host, port, _ := net.SplitHostPort(strings.TrimPrefix(srv.URL, "https://"))
	env := map[string]string{"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
	c, err := InCluster(func(k string) string { return env[k] }, sa)
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
	writeToken("two")
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
	mu.Lock()
	defer mu.Unlock()
	if len(tokens) != 2 || tokens[0] != "Bearer one" || tokens[1] != "Bearer two" {
		t.Errorf("tokens sent %v; want the file's token at each request", tokens)
	}

	if _, err := InCluster(func(string) string { return "" }, sa); err == nil || !strings.Contains(err.Error(), "KUBERNETES_SERVICE_HOST") {
		t.Errorf("outside a pod: %v", err)
	}
}

func TestKubeconfigErrors(t *testing.T) {
	dir := t.TempDir()
	for body, mention := range map[string]string{
		"current-context: x\n": `"x"`,
		"current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n":                                                                                 `cluster "k"`,
		"current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\nclusters: [{name: k, cluster: {server: 'not a url'}}]\n":                                   "not a URL",
		"current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\nclusters: [{name: k, cluster: {server: 'https://h', certificate-authority-data: '!!'}}]\n": "base64",
		"current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\nclusters: [{name: k, cluster: {server: 'https://h', certificate-authority: ca.pem}}]\n":    "ca.pem",
		"{{": "kubeconfig",
	} {
		p := filepath.Join(dir, "kc")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := FromKubeconfig(p)
		if err == nil || !strings.Contains(err.Error(), mention) {
			t.Errorf("kubeconfig %q: %v; want an error mentioning %s", body, err, mention)
		}
	}
}
