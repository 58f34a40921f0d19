package docker

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestEventsPodmanFilters: Podman 4.3's Docker API matches a label filter
// given without a value against nothing (Docker matches any value), so a
// subscription that asked the Engine to filter by label saw no event there
// and a `podman restart` was only noticed at the next relisting. The
// stand-in below filters as Podman 4.3 does; the client must still see the
// labelled container's restart, and not an unlabelled one's exec.
func TestEventsPodmanFilters(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "podman.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var f map[string][]string
		_ = json.Unmarshal([]byte(r.URL.Query().Get("filters")), &f)
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		for _, l := range f["label"] {
			if !strings.Contains(l, "=") {
				<-r.Context().Done() // Podman 4.3: nothing matches
				return
			}
		}
		enc := json.NewEncoder(w)
		for _, ev := range []string{
			`{"Type":"container","Action":"exec_create","Actor":{"ID":"b","Attributes":{"name":"other"}}}`,
			`{"Type":"container","Action":"restart","Actor":{"ID":"a","Attributes":{"name":"backend","nsredirect.redirect":"80=3210"}}}`,
		} {
			_ = enc.Encode(json.RawMessage(ev))
		}
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })

	c, err := New("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got := make(chan Event, 2)
	go func() {
		_ = c.Events(ctx, DefaultLabel, func() {}, func(ev Event) { got <- ev })
	}()
	select {
	case ev := <-got:
		if ev.Action != "restart" || ev.Actor.Attributes["name"] != "backend" {
			t.Errorf("first event seen: %+v; want the labelled container's restart", ev)
		}
	case <-ctx.Done():
		t.Fatal("no event seen within 5s through a Podman-like event filter")
	}
}
