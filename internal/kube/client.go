package kube

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/yaml"
)

// ErrConfig marks a client configuration that cannot work: no in-cluster
// service account and no kubeconfig, or a kubeconfig nsredirect cannot use.
var ErrConfig = errors.New("no usable Kubernetes API configuration")

// ServiceAccountDir is where kubelet mounts a pod's service account.
const ServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

var schemaPods = schema.GroupResource{Resource: "pods"}

// Client talks to the API server over HTTPS with the three calls nsredirect
// needs. client-go's rest client and typed clientset would link every API
// group (6 MB) for them.
type Client struct {
	server    *url.URL
	http      *http.Client
	token     func() (string, error)
	userAgent string
}

// InCluster configures a client from the pod's service account, as
// rest.InClusterConfig does: KUBERNETES_SERVICE_HOST/PORT, the token (read
// on every request, since kubelet rotates it) and the cluster CA.
func InCluster(getenv func(string) string, saDir string) (*Client, error) {
	host, port := getenv("KUBERNETES_SERVICE_HOST"), getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, fmt.Errorf("%w: not in a pod (KUBERNETES_SERVICE_HOST/PORT unset)", ErrConfig)
	}
	tokenFile := filepath.Join(saDir, "token")
	if _, err := os.Stat(tokenFile); err != nil {
		return nil, fmt.Errorf("%w: service account token: %v", ErrConfig, err)
	}
	ca, err := os.ReadFile(filepath.Join(saDir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("%w: cluster CA: %v", ErrConfig, err)
	}
	tlsConf, err := tlsConfig(ca, false, nil)
	if err != nil {
		return nil, err
	}
	server := &url.URL{Scheme: "https", Host: net.JoinHostPort(host, port)}
	return newClient(server, tlsConf, func() (string, error) {
		b, err := os.ReadFile(tokenFile)
		return strings.TrimSpace(string(b)), err
	}), nil
}

// kubeconfig is the part of a kubeconfig file nsredirect understands.
type kubeconfig struct {
	CurrentContext string `json:"current-context"`
	Contexts       []struct {
		Name    string `json:"name"`
		Context struct {
			Cluster string `json:"cluster"`
			User    string `json:"user"`
		} `json:"context"`
	} `json:"contexts"`
	Clusters []struct {
		Name    string `json:"name"`
		Cluster struct {
			Server     string `json:"server"`
			CA         string `json:"certificate-authority"`
			CAData     string `json:"certificate-authority-data"`
			Insecure   bool   `json:"insecure-skip-tls-verify"`
			ServerName string `json:"tls-server-name"`
		} `json:"cluster"`
	} `json:"clusters"`
	Users []struct {
		Name string `json:"name"`
		User struct {
			Token        string          `json:"token"`
			TokenFile    string          `json:"tokenFile"`
			Cert         string          `json:"client-certificate"`
			CertData     string          `json:"client-certificate-data"`
			Key          string          `json:"client-key"`
			KeyData      string          `json:"client-key-data"`
			Exec         json.RawMessage `json:"exec"`
			AuthProvider json.RawMessage `json:"auth-provider"`
		} `json:"user"`
	} `json:"users"`
}

// FromKubeconfig configures a client from the current context of a
// kubeconfig file: server, CA, and a token or client certificate. Exec and
// auth-provider plugins are not supported (nsredirect runs in-cluster; the
// kubeconfig is for trying it from a node).
func FromKubeconfig(path string) (*Client, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: read kubeconfig: %v", ErrConfig, err)
	}
	var kc kubeconfig
	if err := yaml.Unmarshal(raw, &kc); err != nil {
		return nil, fmt.Errorf("%w: kubeconfig %s: %v", ErrConfig, path, err)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: kubeconfig %s: %s", ErrConfig, path, fmt.Sprintf(format, args...))
	}
	var clusterName, userName string
	found := false
	for _, c := range kc.Contexts {
		if c.Name == kc.CurrentContext {
			clusterName, userName, found = c.Context.Cluster, c.Context.User, true
		}
	}
	if !found {
		return nil, bad("current-context %q is not among its contexts", kc.CurrentContext)
	}
	dir := filepath.Dir(path)
	rel := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	load := func(data, file, what string) ([]byte, error) {
		if data != "" {
			b, err := base64.StdEncoding.DecodeString(data)
			if err != nil {
				return nil, bad("%s-data is not base64: %v", what, err)
			}
			return b, nil
		}
		if file == "" {
			return nil, nil
		}
		b, err := os.ReadFile(rel(file))
		if err != nil {
			return nil, bad("%s: %v", what, err)
		}
		return b, nil
	}
	var server *url.URL
	var ca []byte
	var insecure bool
	var serverName string
	for _, c := range kc.Clusters {
		if c.Name != clusterName {
			continue
		}
		if server, err = url.Parse(c.Cluster.Server); err != nil || server.Host == "" {
			return nil, bad("cluster %q server %q is not a URL", clusterName, c.Cluster.Server)
		}
		if ca, err = load(c.Cluster.CAData, c.Cluster.CA, "certificate-authority"); err != nil {
			return nil, err
		}
		insecure, serverName = c.Cluster.Insecure, c.Cluster.ServerName
	}
	if server == nil {
		return nil, bad("cluster %q of context %q is not defined", clusterName, kc.CurrentContext)
	}
	var cert *tls.Certificate
	token := func() (string, error) { return "", nil }
	for _, u := range kc.Users {
		if u.Name != userName {
			continue
		}
		if len(u.User.Exec) > 0 && string(u.User.Exec) != "null" || len(u.User.AuthProvider) > 0 && string(u.User.AuthProvider) != "null" {
			return nil, bad("user %q authenticates through an exec or auth-provider plugin, which nsredirect does not run; use a token or client certificate, or run it in-cluster", userName)
		}
		certPEM, err := load(u.User.CertData, u.User.Cert, "client-certificate")
		if err != nil {
			return nil, err
		}
		keyPEM, err := load(u.User.KeyData, u.User.Key, "client-key")
		if err != nil {
			return nil, err
		}
		if certPEM != nil || keyPEM != nil {
			c, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				return nil, bad("user %q client certificate: %v", userName, err)
			}
			cert = &c
		}
		switch {
		case u.User.Token != "":
			tok := u.User.Token
			token = func() (string, error) { return tok, nil }
		case u.User.TokenFile != "":
			f := rel(u.User.TokenFile)
			token = func() (string, error) {
				b, err := os.ReadFile(f)
				return strings.TrimSpace(string(b)), err
			}
		}
	}
	tlsConf, err := tlsConfig(ca, insecure, cert)
	if err != nil {
		return nil, bad("%v", err)
	}
	tlsConf.ServerName = serverName
	return newClient(server, tlsConf, token), nil
}

func tlsConfig(ca []byte, insecure bool, cert *tls.Certificate) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: insecure}
	if len(ca) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			return nil, fmt.Errorf("%w: the cluster CA holds no PEM certificate", ErrConfig)
		}
		conf.RootCAs = pool
	}
	if cert != nil {
		conf.Certificates = []tls.Certificate{*cert}
	}
	return conf, nil
}

func newClient(server *url.URL, tlsConf *tls.Config, token func() (string, error)) *Client {
	tr := &http.Transport{
		TLSClientConfig:     tlsConf,
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: 10 * time.Second,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		IdleConnTimeout:     90 * time.Second,
	}
	return &Client{server: server, http: &http.Client{Transport: tr}, token: token, userAgent: "nsredirect"}
}

// NewClientForTest talks to server with the given HTTP client (an
// httptest server's) and bearer token.
func NewClientForTest(server string, hc *http.Client, token string) (*Client, error) {
	u, err := url.Parse(server)
	if err != nil {
		return nil, err
	}
	return &Client{server: u, http: hc, token: func() (string, error) { return token, nil }, userAgent: "nsredirect"}, nil
}

// Server is the API server's URL, for logs.
func (c *Client) Server() string { return c.server.String() }

// query encodes the list options the informer uses.
func query(o metav1.ListOptions) url.Values {
	q := url.Values{}
	set := func(k, v string) {
		if v != "" {
			q.Set(k, v)
		}
	}
	set("labelSelector", o.LabelSelector)
	set("fieldSelector", o.FieldSelector)
	set("resourceVersion", o.ResourceVersion)
	set("resourceVersionMatch", string(o.ResourceVersionMatch))
	set("continue", o.Continue)
	if o.Watch {
		q.Set("watch", "true")
	}
	if o.AllowWatchBookmarks {
		q.Set("allowWatchBookmarks", "true")
	}
	if o.TimeoutSeconds != nil {
		q.Set("timeoutSeconds", strconv.FormatInt(*o.TimeoutSeconds, 10))
	}
	if o.Limit > 0 {
		q.Set("limit", strconv.FormatInt(o.Limit, 10))
	}
	return q
}

func (c *Client) do(ctx context.Context, method, path string, q url.Values, body any) (*http.Response, error) {
	u := *c.server
	u.Path = strings.TrimSuffix(u.Path, "/") + path
	u.RawQuery = q.Encode()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", c.userAgent)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	tok, err := c.token()
	if err != nil {
		return nil, fmt.Errorf("read API token: %w", err)
	}
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err // a *url.Error: it names the method and URL
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, statusError(resp)
	}
	return resp, nil
}

// statusError turns an API server error reply into the apimachinery error
// the informer branches on (410 Gone: relist).
func statusError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var st metav1.Status
	if json.Unmarshal(b, &st) == nil && st.Kind == "Status" {
		return apierrors.FromObject(&st)
	}
	return apierrors.NewGenericServerResponse(resp.StatusCode, resp.Request.Method, schemaPods, "", strings.TrimSpace(string(b)), 0, false)
}

// ListPods lists pods in all namespaces.
func (c *Client) ListPods(ctx context.Context, opts metav1.ListOptions) (*PodList, error) {
	resp, err := c.do(ctx, http.MethodGet, "/api/v1/pods", query(opts), nil)
	if err != nil {
		return nil, fmt.Errorf("list pods: %w", err)
	}
	defer resp.Body.Close()
	var l PodList
	if err := json.NewDecoder(resp.Body).Decode(&l); err != nil {
		return nil, fmt.Errorf("list pods: decode: %w", err)
	}
	return &l, nil
}

// WatchPods streams pod changes in all namespaces.
func (c *Client) WatchPods(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	resp, err := c.do(ctx, http.MethodGet, "/api/v1/pods", query(opts), nil)
	if err != nil {
		return nil, fmt.Errorf("watch pods: %w", err)
	}
	return watch.NewStreamWatcher(&eventDecoder{body: resp.Body, dec: json.NewDecoder(resp.Body)}, statusReporter{}), nil
}

// CreateEvent posts ev in its namespace.
func (c *Client) CreateEvent(ctx context.Context, ev *Event) error {
	resp, err := c.do(ctx, http.MethodPost, "/api/v1/namespaces/"+url.PathEscape(ev.Namespace)+"/events", nil, ev)
	if err != nil {
		return fmt.Errorf("post event: %w", err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	return resp.Body.Close()
}

// eventDecoder reads the watch stream: one JSON {"type","object"} after
// another.
type eventDecoder struct {
	body io.ReadCloser
	dec  *json.Decoder
}

func (d *eventDecoder) Decode() (watch.EventType, runtime.Object, error) {
	var ev struct {
		Type   watch.EventType `json:"type"`
		Object json.RawMessage `json:"object"`
	}
	if err := d.dec.Decode(&ev); err != nil {
		return "", nil, err
	}
	switch ev.Type {
	case watch.Error:
		var st metav1.Status
		if err := json.Unmarshal(ev.Object, &st); err != nil {
			return "", nil, fmt.Errorf("decode watch error: %w", err)
		}
		return ev.Type, &st, nil
	case watch.Added, watch.Modified, watch.Deleted, watch.Bookmark:
		var p Pod
		if err := json.Unmarshal(ev.Object, &p); err != nil {
			return "", nil, fmt.Errorf("decode watched pod: %w", err)
		}
		return ev.Type, &p, nil
	default:
		return "", nil, fmt.Errorf("unknown watch event type %q", ev.Type)
	}
}

func (d *eventDecoder) Close() { d.body.Close() }

type statusReporter struct{}

func (statusReporter) AsObject(err error) runtime.Object {
	return &metav1.Status{Status: metav1.StatusFailure, Message: err.Error()}
}
