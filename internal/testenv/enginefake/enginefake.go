// Package enginefake is a fake container engine that speaks the Docker
// Engine API on a unix socket: enough of /version, /containers/json,
// /containers/{id}/json and /events to drive a docker.Watcher and
// `nsredirect docker`. The docker package's tests and the bench share it.
// It speaks JSON only and imports nothing of ours, so the docker package's
// own tests can use it.
package enginefake

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"
)

// Container is one container the engine knows; it runs while Pid > 0.
type Container struct {
	ID   string
	Name string // without the API's leading slash
	Pid  int
	// StartedAt is RFC 3339, as the API gives it; "" for none.
	StartedAt   string
	Labels      map[string]string
	NetworkMode string
}

// Engine is the fake engine.
type Engine struct {
	socket     string
	apiVersion string
	srv        *http.Server

	mu         sync.Mutex
	containers map[string]Container
	paths      []string      // request paths seen, e.g. /v1.41/containers/json
	filters    []string      // filters of the requests seen
	events     chan any      // delivered to the current /events subscriber
	dropStream chan struct{} // closes the current /events stream
}

// Start serves the engine at dir/docker.sock, answering /version with
// apiVersion, until Close.
func Start(dir, apiVersion string) (*Engine, error) {
	e := &Engine{
		socket: filepath.Join(dir, "docker.sock"), apiVersion: apiVersion,
		containers: map[string]Container{}, events: make(chan any, 1024), dropStream: make(chan struct{}, 1),
	}
	ln, err := net.Listen("unix", e.socket)
	if err != nil {
		return nil, err
	}
	e.srv = &http.Server{Handler: http.HandlerFunc(e.serve), ReadHeaderTimeout: time.Second}
	go func() { _ = e.srv.Serve(ln) }()
	return e, nil
}

// Socket is the path of the engine's unix socket.
func (e *Engine) Socket() string { return e.socket }

// Close stops serving.
func (e *Engine) Close() error { return e.srv.Close() }

// Put adds or replaces a container.
func (e *Engine) Put(c Container) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.containers[c.ID] = c
}

// Update changes the container id, if the engine knows it.
func (e *Engine) Update(id string, change func(*Container)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if c, ok := e.containers[id]; ok {
		change(&c)
		e.containers[id] = c
	}
}

// Remove forgets a container.
func (e *Engine) Remove(id string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.containers, id)
}

// Len is how many containers the engine knows.
func (e *Engine) Len() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.containers)
}

// Send delivers ev, encoded as JSON, to the current /events stream, or the
// next one while none is open. It reports false when too many are queued.
func (e *Engine) Send(ev any) bool {
	select {
	case e.events <- ev:
		return true
	default:
		return false
	}
}

// DropStream closes the current /events stream, as an engine restart does.
func (e *Engine) DropStream() {
	select {
	case e.dropStream <- struct{}{}:
	default:
	}
}

// Seen returns the request paths and the filters of the requests seen.
func (e *Engine) Seen() (paths, filters []string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.paths...), append([]string(nil), e.filters...)
}

// versioned is the /vX.Y prefix a client puts before every path but
// /version.
var versioned = regexp.MustCompile(`^/v[0-9]+\.[0-9]+/`)

func (e *Engine) serve(w http.ResponseWriter, r *http.Request) {
	e.mu.Lock()
	e.paths = append(e.paths, r.URL.Path)
	if f := r.URL.Query().Get("filters"); f != "" {
		e.filters = append(e.filters, f)
	}
	e.mu.Unlock()
	path := r.URL.Path
	if path == "/version" {
		fmt.Fprintf(w, `{"Version":"fake","ApiVersion":%q,"MinAPIVersion":"1.12"}`, e.apiVersion)
		return
	}
	if loc := versioned.FindStringIndex(path); loc != nil {
		path = path[loc[1]-1:]
	}
	switch {
	case path == "/containers/json":
		var f map[string][]string
		_ = json.Unmarshal([]byte(r.URL.Query().Get("filters")), &f)
		label := ""
		if len(f["label"]) > 0 {
			label = f["label"][0]
		}
		e.mu.Lock()
		var out []map[string]any
		for id, c := range e.containers {
			if _, ok := c.Labels[label]; ok && c.Pid > 0 {
				out = append(out, map[string]any{"Id": id, "Names": []string{"/" + c.Name}, "Labels": c.Labels, "State": "running"})
			}
		}
		e.mu.Unlock()
		_ = json.NewEncoder(w).Encode(out)
	case strings.HasPrefix(path, "/containers/") && strings.HasSuffix(path, "/json"):
		id := strings.TrimSuffix(strings.TrimPrefix(path, "/containers/"), "/json")
		e.mu.Lock()
		c, ok := e.containers[id]
		e.mu.Unlock()
		if !ok {
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprintf(w, `{"message":"No such container: %s"}`, id)
			return
		}
		_ = json.NewEncoder(w).Encode(inspected(c))
	case path == "/events":
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		enc := json.NewEncoder(w)
		for {
			select {
			case <-r.Context().Done():
				return
			case <-e.dropStream:
				return
			case ev := <-e.events:
				_ = enc.Encode(ev)
				w.(http.Flusher).Flush()
			}
		}
	default:
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, `{"message":"page not found: %s"}`, r.URL.Path)
	}
}

// inspected is c as GET /containers/{id}/json gives it.
func inspected(c Container) any {
	return map[string]any{
		"Id":         c.ID,
		"Name":       "/" + c.Name,
		"State":      map[string]any{"Running": c.Pid > 0, "Pid": c.Pid, "StartedAt": c.StartedAt},
		"Config":     map[string]any{"Labels": c.Labels},
		"HostConfig": map[string]any{"NetworkMode": c.NetworkMode},
	}
}
