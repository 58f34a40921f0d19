package kube

import (
	"context"
	"errors"
	"fmt"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ErrConfig marks a client configuration that cannot work: no in-cluster
// service account and no kubeconfig, or a kubeconfig that cannot be used.
var ErrConfig = errors.New("no usable Kubernetes API configuration")

// Client talks to the API server through client-go's REST client and
// transport: its TLS and credential handling (service account token
// rotation, client certificates, exec credential plugins) and its HTTP/2
// health pings, which end a watch whose connection went dead (after
// HTTP2_READ_IDLE_TIMEOUT_SECONDS, default 30, plus
// HTTP2_PING_TIMEOUT_SECONDS, default 15) so the informer re-lists. The
// objects decode into this package's small Pod and Event types: the typed
// clientset would link every API group for the three calls made here.
type Client struct {
	rest   rest.Interface
	server string
}

// InCluster configures a client from the pod's service account
// (rest.InClusterConfig: KUBERNETES_SERVICE_HOST/PORT, the token kubelet
// rotates, the cluster CA).
func InCluster() (*Client, error) {
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	return NewClient(cfg)
}

// FromKubeconfig configures a client from the current context of a
// kubeconfig file, as kubectl reads it (clientcmd): tokens, token files,
// client certificates, exec credential plugins (EKS, GKE, AKS) and
// auth-provider plugins client-go still knows.
func FromKubeconfig(path string) (*Client, error) {
	bad := func(err error) error {
		return fmt.Errorf("%w: kubeconfig %s: %s", ErrConfig, path, strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	raw, err := clientcmd.LoadFromFile(path)
	if err != nil {
		return nil, bad(err)
	}
	// Paths in the file (certificates, token files, exec commands) are
	// relative to it, as kubectl reads them.
	if err := clientcmd.ResolveLocalPaths(raw); err != nil {
		return nil, bad(err)
	}
	// clientcmd reports a context naming a missing cluster as "no
	// configuration has been provided": name it instead.
	if c, ok := raw.Contexts[raw.CurrentContext]; ok && raw.Clusters[c.Cluster] == nil {
		return nil, bad(fmt.Errorf("cluster %q of context %q is not defined", c.Cluster, raw.CurrentContext))
	}
	cfg, err := clientcmd.NewNonInteractiveClientConfig(*raw, "", &clientcmd.ConfigOverrides{}, nil).ClientConfig()
	if err != nil {
		return nil, bad(err)
	}
	return NewClient(cfg)
}

// scheme knows the v1 kinds the client decodes, in this package's types,
// and the meta kinds (Status, WatchEvent) every reply can carry.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	gv := schema.GroupVersion{Version: "v1"}
	s.AddKnownTypes(gv, &Pod{}, &PodList{}, &Event{})
	metav1.AddToGroupVersion(s, gv)
	return s
}()

// NewClient builds a client for the core v1 API of cfg's server, in JSON.
func NewClient(cfg *rest.Config) (*Client, error) {
	cfg = rest.CopyConfig(cfg)
	cfg.APIPath = "/api"
	cfg.GroupVersion = &schema.GroupVersion{Version: "v1"}
	cfg.ContentType = runtime.ContentTypeJSON
	cfg.AcceptContentTypes = runtime.ContentTypeJSON
	cfg.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if cfg.UserAgent == "" {
		cfg.UserAgent = "nsredirect"
	}
	if cfg.QPS == 0 {
		cfg.QPS, cfg.Burst = 20, 40 // events come in bursts on a busy node
	}
	rc, err := rest.RESTClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	return &Client{rest: rc, server: cfg.Host}, nil
}

// Server is the API server's URL, for logs.
func (c *Client) Server() string { return c.server }

// ListPods lists pods in all namespaces.
func (c *Client) ListPods(ctx context.Context, opts metav1.ListOptions) (*PodList, error) {
	var l PodList
	if err := c.rest.Get().Resource("pods").VersionedParams(&opts, metav1.ParameterCodec).Do(ctx).Into(&l); err != nil {
		return nil, fmt.Errorf("list pods: %w", err)
	}
	return &l, nil
}

// WatchPods streams pod changes in all namespaces.
func (c *Client) WatchPods(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	w, err := c.rest.Get().Resource("pods").VersionedParams(&opts, metav1.ParameterCodec).Watch(ctx)
	if err != nil {
		return nil, fmt.Errorf("watch pods: %w", err)
	}
	return w, nil
}

// ListEvents returns the Events in namespace about the object with uid (the
// controller's EventLister: a restarted daemon does not post a Warning
// again). The field selector does the work on a real API server; the
// result is filtered here too, for servers that ignore it.
func (c *Client) ListEvents(ctx context.Context, namespace, uid string) ([]Event, error) {
	var l EventList
	opts := metav1.ListOptions{FieldSelector: "involvedObject.uid=" + uid}
	if err := c.rest.Get().Namespace(namespace).Resource("events").VersionedParams(&opts, metav1.ParameterCodec).Do(ctx).Into(&l); err != nil {
		return nil, fmt.Errorf("list events of %s in %s: %w", uid, namespace, err)
	}
	out := l.Items[:0]
	for _, ev := range l.Items {
		if ev.InvolvedObject.UID == uid {
			out = append(out, ev)
		}
	}
	return out, nil
}

// CreateEvent posts ev in its namespace.
func (c *Client) CreateEvent(ctx context.Context, ev *Event) error {
	if err := c.rest.Post().Namespace(ev.Namespace).Resource("events").Body(ev).Do(ctx).Error(); err != nil {
		return fmt.Errorf("post event: %w", err)
	}
	return nil
}

// The controller finds Warnings posted before a restart through it.
var _ EventLister = (*Client)(nil)
