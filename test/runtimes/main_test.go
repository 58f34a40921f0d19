//go:build runtimes

// Package runtimes_test runs nsredirect against real container engines the
// way docs/docker.md tells a user to, on this host: Docker Engine 29 with Docker
// Compose v5, and Podman's Docker-compatible API, rootful and rootless.
//
// Every engine runs on its own socket, data root, exec root and pid file
// (the machine's own /var/run/docker.sock, if any, is never used), is
// stopped by its pid, and its directories are removed, also when a test
// fails. The Docker Engine and Compose binaries come from the Go modules
// pinned in tools/ (`make test-runtimes` builds them with tools/build.sh into
// the test cache and passes the directory as NSREDIRECT_RUNTIMES_BIN);
// Podman is Debian's.
//
// The build tag keeps these tests out of `go test ./...` and `make test`:
// they need the engines, and minutes. Each test adds rows to one table
// (NSREDIRECT_RUNTIMES_RESULTS, a Markdown file) that `make test-runtimes`
// prints at the end. Under CI=true anything missing fails instead of
// skipping.
package runtimes_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// stops undo what the tests started once for all of them (engines), last
// started first.
var (
	stopsMu sync.Mutex
	stops   []func()
)

func atExit(f func()) {
	stopsMu.Lock()
	defer stopsMu.Unlock()
	stops = append(stops, f)
}

func TestMain(m *testing.M) {
	code := m.Run()
	stopsMu.Lock()
	for i := len(stops) - 1; i >= 0; i-- {
		stops[i]()
	}
	stopsMu.Unlock()
	if err := writeResults(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// need skips, or under CI=true fails, when what a test needs is missing.
func need(t *testing.T, ok bool, why string) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal(why)
	}
	t.Skip(why)
}

// runtimesBin is the directory holding dockerd, docker-proxy and
// docker-compose as `make test-runtimes` built them:
// NSREDIRECT_RUNTIMES_BIN (tools/build.sh prints it).
func runtimesBin(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("NSREDIRECT_RUNTIMES_BIN")
	need(t, dir != "", "NSREDIRECT_RUNTIMES_BIN is not set: run `sudo make test-runtimes`, which builds the engines and sets it")
	for _, b := range []string{"dockerd", "docker-proxy", "docker-compose"} {
		_, err := os.Stat(filepath.Join(dir, b))
		need(t, err == nil, fmt.Sprintf("%s/%s is missing: run `sudo make test-runtimes`, which builds it", dir, b))
	}
	return dir
}

// A row of the results table: one cell of the matrix, what it proved and
// what it measured.
type row struct {
	runtime, cell, outcome, measured string
}

var (
	rowsMu sync.Mutex
	rows   []row
)

// cell records one row for the test when it ends: pass or FAIL (or skip),
// with whatever measure() added meanwhile.
type cell struct {
	t        *testing.T
	runtime  string
	name     string
	mu       sync.Mutex
	measured []string
}

func newCell(t *testing.T, runtime, name string) *cell {
	c := &cell{t: t, runtime: runtime, name: name}
	t.Cleanup(func() {
		outcome := "pass"
		switch {
		case t.Failed():
			outcome = "**FAIL**"
		case t.Skipped():
			outcome = "skipped"
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		rowsMu.Lock()
		defer rowsMu.Unlock()
		rows = append(rows, row{runtime: runtime, cell: name, outcome: outcome, measured: strings.Join(c.measured, "; ")})
	})
	return c
}

// measure logs a measurement and keeps it for the table.
func (c *cell) measure(format string, args ...any) {
	c.t.Helper()
	s := fmt.Sprintf(format, args...)
	c.t.Log(s)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.measured = append(c.measured, s)
}

func writeResults() error {
	path := os.Getenv("NSREDIRECT_RUNTIMES_RESULTS")
	rowsMu.Lock()
	defer rowsMu.Unlock()
	if path == "" || len(rows) == 0 {
		return nil
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Runtimes on this host (%s), %s\n\n", hostKind(), time.Now().UTC().Format("2006-01-02 15:04 MST"))
	b.WriteString("| runtime | cell | result | measured |\n|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", r.runtime, r.cell, r.outcome, r.measured)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// hostKind says which cgroup layout the results were taken on.
func hostKind() string {
	kernel := "?"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return "pure cgroup2, kernel " + kernel
	}
	return "hybrid cgroup v1+v2, kernel " + kernel
}
