package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// client runs a foreign client inside ns and returns its trimmed output.
func client(t *testing.T, ns testenv.Netns, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	out, err := ns.Command(ctx, name, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func mustClient(t *testing.T, ns testenv.Netns, name string, args ...string) string {
	t.Helper()
	out, err := client(t, ns, name, args...)
	if err != nil {
		t.Fatalf("%s %s in netns %s: %v\n%s", name, strings.Join(args, " "), ns.Name, err, out)
	}
	return out
}

func curl(t *testing.T, ns testenv.Netns, url string) string {
	t.Helper()
	return mustClient(t, ns, testenv.Tool(t, "curl"), "-sS", "--max-time", "5", url)
}

type statusRow struct {
	Netns     string `json:"netns"`
	Cookie    uint64 `json:"cookie"`
	Rule      string `json:"rule"`
	OwnerPID  int    `json:"owner_pid"`
	Alive     bool   `json:"owner_alive"`
	Redirects uint64 `json:"redirects"`
}

func status(t *testing.T, pinDir string) []statusRow {
	t.Helper()
	code, out, errOut := testenv.Run(t, nil, "status", "--json", "--pin-dir", pinDir)
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	var rows []statusRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return rows
}

func redirects(t *testing.T, pinDir, netnsName string) uint64 {
	t.Helper()
	var n uint64
	for _, r := range status(t, pinDir) {
		if r.Netns == netnsName {
			n += r.Redirects
		}
	}
	return n
}

type pinnedLink struct {
	ID     int `json:"id"`
	ProgID int `json:"prog_id"`
}

// ourLinks returns the links pinned in pinDir (and the programs behind
// them) as bpftool, an outside witness, sees them.
func ourLinks(t *testing.T, pinDir string) []pinnedLink {
	t.Helper()
	bpftool := testenv.Tool(t, "bpftool")
	var links []pinnedLink
	for _, h := range []string{"connect4", "connect6", "getpeername4", "getpeername6"} {
		out, err := exec.Command(bpftool, "link", "show", "pinned", filepath.Join(pinDir, "link_"+h), "--json").CombinedOutput()
		if err != nil {
			t.Fatalf("bpftool link show %s: %v\n%s", h, err, out)
		}
		var l pinnedLink
		if err := json.Unmarshal(out, &l); err != nil {
			t.Fatalf("bpftool link json: %v\n%s", err, out)
		}
		links = append(links, l)
	}
	return links
}

func ourProgIDs(t *testing.T, pinDir string) []int {
	t.Helper()
	var ids []int
	for _, l := range ourLinks(t, pinDir) {
		ids = append(ids, l.ProgID)
	}
	return ids
}

func ourLinkIDs(t *testing.T, pinDir string) []int {
	t.Helper()
	var ids []int
	for _, l := range ourLinks(t, pinDir) {
		ids = append(ids, l.ID)
	}
	return ids
}

// attachedAtRoot returns the IDs of all programs attached at the cgroup2 root.
func attachedAtRoot(t *testing.T) map[int]string {
	t.Helper()
	bpftool := testenv.Tool(t, "bpftool")
	out, err := exec.Command(bpftool, "cgroup", "show", testenv.RootCgroup(t), "--json").CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool cgroup show: %v\n%s", err, out)
	}
	var progs []struct {
		ID         int    `json:"id"`
		AttachType string `json:"attach_type"`
		Name       string `json:"name"`
	}
	if len(strings.TrimSpace(string(out))) > 0 {
		if err := json.Unmarshal(out, &progs); err != nil {
			t.Fatalf("bpftool cgroup json: %v\n%s", err, out)
		}
	}
	m := map[int]string{}
	for _, p := range progs {
		m[p.ID] = p.Name
	}
	return m
}

// assertGone checks that nothing of ours is left: no pin dir, none of ids
// attached at the cgroup2 root.
func assertGone(t *testing.T, pinDir string, ids []int) {
	t.Helper()
	if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(pinDir)
		t.Errorf("pin dir %s still exists (%v), holding %d entries", pinDir, err, len(entries))
	}
	attached := attachedAtRoot(t)
	for _, id := range ids {
		if name, ok := attached[id]; ok {
			t.Errorf("program %d (%s) is still attached at the cgroup2 root", id, name)
		}
	}
}

var addrRe = regexp.MustCompile(`addr"?[=:]"?([0-9.:\[\]]+)`)

// metricsURL finds the address a daemon started with --metrics-addr
// 127.0.0.1:0 listens on, from its log.
func metricsURL(t *testing.T, p *testenv.Proc) string {
	t.Helper()
	p.WaitOutput(t, "serving /metrics", 10*time.Second)
	for _, line := range strings.Split(p.Output(), "\n") {
		if strings.Contains(line, "serving /metrics") {
			if m := addrRe.FindStringSubmatch(line); m != nil {
				return "http://" + m[1]
			}
		}
	}
	t.Fatalf("no metrics address in log:\n%s", p.Output())
	return ""
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metricValue returns the value of the sample whose line starts with prefix.
func metricValue(t *testing.T, body, prefix string) float64 {
	t.Helper()
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, prefix) {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return v
		}
	}
	t.Fatalf("no metric %s in:\n%s", prefix, body)
	return 0
}

func hostPeer(ns testenv.Netns, addr string) string {
	peer, err := ns.Dial("tcp", addr)
	if err != nil {
		return "error: " + err.Error()
	}
	return peer
}

func waitFor(t *testing.T, what string, timeout time.Duration, ok func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !ok() {
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func fmtIDs(ids []int) string { return fmt.Sprint(ids) }

func testenvIP(args ...string) (string, error) {
	out, err := exec.Command("ip", args...).CombinedOutput()
	return string(out), err
}
