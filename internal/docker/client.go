// Package docker is the Docker discovery mode: it finds the running
// containers that carry the redirect label, turns each into a desired
// daemon.Target (the container's netns, the label's rules) and follows the
// Engine's event stream so a started, restarted or recreated container is
// enrolled again at once. It only produces desired targets; the daemon's
// Reconcile is the one path into the kernel.
//
// The Engine API is spoken directly with net/http over the unix socket: we
// need four GET endpoints (version, list, inspect, events), and the official
// client module would pull the whole moby API tree (and its dependencies)
// into a binary that is otherwise a few eBPF maps and a metrics endpoint.
package docker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ErrHost marks a --docker-host that cannot be used as given: bad input.
var ErrHost = errors.New("bad docker host")

// ErrNotFound is an Engine 404: the container is gone.
var ErrNotFound = errors.New("no such container")

// API versions: we speak MaxAPIVersion, or the server's when it is older;
// a server older than MinAPIVersion lacks the event filters we rely on.
const (
	MinAPIVersion = "1.24"
	MaxAPIVersion = "1.45"
)

// DefaultHost is the Engine's default socket.
const DefaultHost = "unix:///var/run/docker.sock"

// Client talks to one Docker Engine over its unix socket.
type Client struct {
	socket  string
	http    *http.Client
	version string // negotiated, e.g. "1.41"; empty until Negotiate
}

// New checks host (unix:///path) and returns a client for it; nothing is
// dialled yet.
func New(host string) (*Client, error) {
	path, ok := strings.CutPrefix(host, "unix://")
	if !ok || !strings.HasPrefix(path, "/") {
		return nil, fmt.Errorf("%w %q: use unix:///PATH, e.g. %s (only the local Engine's unix socket is supported)", ErrHost, host, DefaultHost)
	}
	d := net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConns:    4,
		IdleConnTimeout: 30 * time.Second,
	}
	// No client timeout: the event stream lasts for hours. Every other
	// request carries a context deadline.
	return &Client{socket: path, http: &http.Client{Transport: tr}}, nil
}

// Socket is the path of the Engine's socket.
func (c *Client) Socket() string { return c.socket }

// Version is the negotiated API version.
func (c *Client) Version() string { return c.version }

// Negotiate asks the Engine its API version (GET /version, unversioned) and
// settles on min(server, MaxAPIVersion).
func (c *Client) Negotiate(ctx context.Context) error {
	if _, err := os.Stat(c.socket); err != nil {
		return fmt.Errorf("%w: Docker socket %s: %v; is dockerd running? point --docker-host (NSREDIRECT_DOCKER_HOST) at its socket", ErrHost, c.socket, err)
	}
	var v struct {
		Version       string
		APIVersion    string `json:"ApiVersion"`
		MinAPIVersion string `json:"MinAPIVersion"`
	}
	if err := c.get(ctx, "/version", nil, &v); err != nil {
		return fmt.Errorf("ask Docker at %s its version: %w", c.socket, err)
	}
	if v.APIVersion == "" {
		return fmt.Errorf("docker at %s did not report an API version", c.socket)
	}
	if versionLess(v.APIVersion, MinAPIVersion) {
		return fmt.Errorf("docker %s at %s speaks API %s; nsredirect needs >= %s: upgrade Docker", v.Version, c.socket, v.APIVersion, MinAPIVersion)
	}
	c.version = MaxAPIVersion
	if versionLess(v.APIVersion, MaxAPIVersion) {
		c.version = v.APIVersion
	}
	return nil
}

// Container is what a listing tells of one container.
type Container struct {
	ID     string `json:"Id"`
	Names  []string
	Labels map[string]string
	State  string
}

// Running lists the running containers that carry label (any value).
func (c *Client) Running(ctx context.Context, label string) ([]Container, error) {
	q := url.Values{"filters": {filterJSON(map[string][]string{"label": {label}, "status": {"running"}})}}
	var out []Container
	if err := c.get(ctx, "/containers/json", q, &out); err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	return out, nil
}

// Inspected is what we read from GET /containers/{id}/json.
type Inspected struct {
	ID    string `json:"Id"`
	Name  string
	State struct {
		Running   bool
		Pid       int
		StartedAt string
	}
	Config struct {
		Labels map[string]string
	}
	HostConfig struct {
		NetworkMode string
	}
}

// Inspect returns one container; ErrNotFound when it is gone.
func (c *Client) Inspect(ctx context.Context, id string) (Inspected, error) {
	var out Inspected
	if err := c.get(ctx, "/containers/"+url.PathEscape(id)+"/json", nil, &out); err != nil {
		return out, fmt.Errorf("inspect container %s: %w", id, err)
	}
	out.Name = strings.TrimPrefix(out.Name, "/")
	return out, nil
}

// Event is one message of the event stream.
type Event struct {
	Type   string
	Action string
	Actor  struct {
		ID         string
		Attributes map[string]string
	}
	TimeNano int64 `json:"timeNano"`
}

// Events that change which netns a labelled container has.
var watchedActions = []string{"start", "restart", "die", "stop", "destroy"}

// Events streams the lifecycle events of containers carrying label until
// ctx ends or the connection breaks; fn sees each one. The returned error
// is nil only when ctx ended. connected is called once the Engine has
// accepted the subscription, so a caller can list knowing no later event
// will be missed.
func (c *Client) Events(ctx context.Context, label string, connected func(), fn func(Event)) error {
	// Only the type is filtered by the Engine: Podman 4.3's Docker API
	// matches a label filter without a value against nothing, and with
	// several event filters drops die, so a restart went unseen there.
	// Label and action are checked here instead (events carry the
	// container's labels as attributes, in both).
	q := url.Values{"filters": {filterJSON(map[string][]string{"type": {"container"}})}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url("/events", q), nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("subscribe to Docker events: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("subscribe to Docker events: %w", apiError(resp))
	}
	connected()
	dec := json.NewDecoder(resp.Body)
	for {
		var ev Event
		if err := dec.Decode(&ev); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, io.EOF) {
				return errors.New("docker closed the event stream")
			}
			return fmt.Errorf("read Docker events: %w", err)
		}
		if _, ok := ev.Actor.Attributes[label]; ok && slices.Contains(watchedActions, ev.Action) {
			fn(ev)
		}
	}
}

func (c *Client) url(path string, q url.Values) string {
	u := "http://docker"
	if c.version != "" {
		u += "/v" + c.version
	}
	u += path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	return u
}

func (c *Client) get(ctx context.Context, path string, q url.Values, out any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	u := c.url(path, q)
	if path == "/version" {
		u = "http://docker/version" // unversioned: it is how we learn the version
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return apiError(resp)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(out); err != nil {
		return fmt.Errorf("decode %s: %w", path, err)
	}
	return nil
}

func apiError(resp *http.Response) error {
	var m struct{ Message string }
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &m) != nil || m.Message == "" {
		m.Message = strings.TrimSpace(string(b))
	}
	if resp.StatusCode == http.StatusNotFound {
		return fmt.Errorf("%w: %s", ErrNotFound, m.Message)
	}
	return fmt.Errorf("docker answered %s: %s", resp.Status, m.Message)
}

func filterJSON(f map[string][]string) string {
	b, _ := json.Marshal(f)
	return string(b)
}

// versionLess compares API versions like "1.41" < "1.45".
func versionLess(a, b string) bool {
	pa, pb := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(pa) || i < len(pb); i++ {
		var x, y int
		if i < len(pa) {
			x, _ = strconv.Atoi(pa[i])
		}
		if i < len(pb) {
			y, _ = strconv.Atoi(pb[i])
		}
		if x != y {
			return x < y
		}
	}
	return false
}
