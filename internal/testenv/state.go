package testenv

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/loader"
)

// StatusRow is one line of `nsredirect status --json`.
type StatusRow struct {
	Netns    string `json:"netns"`
	Cookie   uint64 `json:"cookie"`
	Mode     string `json:"mode"`
	Rule     string `json:"rule"`
	OwnerPID int    `json:"owner_pid"`
	Alive    bool   `json:"owner_alive"`
	// NetnsAlive, State and Fix: see statusRow in internal/cli.
	NetnsAlive bool   `json:"netns_alive"`
	State      string `json:"state"`
	Fix        string `json:"fix"`
	Redirects  uint64 `json:"redirects"`
}

// Status reads the pinned state through the binary, as a user would.
func Status(t testing.TB, pinDir string) []StatusRow {
	t.Helper()
	code, out, errOut := Run(t, nil, "status", "--json", "--pin-dir", pinDir)
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	var st struct {
		Rules []StatusRow `json:"rules"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st.Rules
}

// RowsOf keeps the rows of one netns name.
func RowsOf(rows []StatusRow, netns string) []StatusRow {
	var out []StatusRow
	for _, r := range rows {
		if r.Netns == netns {
			out = append(out, r)
		}
	}
	return out
}

// WaitStatus polls Status until ok accepts it, for at most 15 s.
func WaitStatus(t testing.TB, pinDir, what string, ok func([]StatusRow) bool) []StatusRow {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		rows := Status(t, pinDir)
		if ok(rows) {
			return rows
		}
		if time.Now().After(deadline) {
			t.Fatalf("status never showed %s: %+v", what, rows)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// PinnedLink is a link pinned under a pin dir, as bpftool reports it.
type PinnedLink struct {
	ID     int `json:"id"`
	ProgID int `json:"prog_id"`
}

// Hooks are the hooks whose links are pinned whatever the rules, in the
// order the loader attaches them: the one that drops a closed socket's
// record, then the TCP programs.
var Hooks = loader.HookNames()

// Links returns the links of Hooks pinned in pinDir, in that order, read by
// bpftool, an outside witness. A hook an older layout did not have
// (sock_release, before layout 3) is left out when its link is not pinned.
func Links(t testing.TB, pinDir string) []PinnedLink {
	t.Helper()
	bpftool := Tool(t, "bpftool")
	var links []PinnedLink
	for _, h := range Hooks {
		if _, err := os.Lstat(loader.LinkPin(pinDir, h)); h == loader.HookSockRelease && os.IsNotExist(err) {
			continue
		}
		out, err := exec.Command(bpftool, "link", "show", "pinned", loader.LinkPin(pinDir, h), "--json").CombinedOutput()
		if err != nil {
			t.Fatalf("bpftool link show %s: %v\n%s", h, err, out)
		}
		var l PinnedLink
		if err := json.Unmarshal(out, &l); err != nil || l.ProgID == 0 {
			t.Fatalf("bpftool link show %s: %v\n%s", h, err, out)
		}
		links = append(links, l)
	}
	return links
}

// LinkOf returns the pinned link of hook.
func LinkOf(t testing.TB, pinDir, hook string) PinnedLink {
	t.Helper()
	for i, l := range Links(t, pinDir) {
		if Hooks[i] == hook {
			return l
		}
	}
	t.Fatalf("no link of %s pinned in %s", hook, pinDir)
	return PinnedLink{}
}

// ProgIDs returns the program IDs behind the pinned links.
func ProgIDs(t testing.TB, pinDir string) []int {
	t.Helper()
	var ids []int
	for _, l := range Links(t, pinDir) {
		ids = append(ids, l.ProgID)
	}
	return ids
}

// LinkIDs returns the IDs of the pinned links.
func LinkIDs(t testing.TB, pinDir string) []int {
	t.Helper()
	var ids []int
	for _, l := range Links(t, pinDir) {
		ids = append(ids, l.ID)
	}
	return ids
}

var ourHooks = map[ebpf.AttachType]bool{
	ebpf.AttachCGroupInet4Connect: true, ebpf.AttachCGroupInet6Connect: true,
	ebpf.AttachCgroupInet4GetPeername: true, ebpf.AttachCgroupInet6GetPeername: true,
	ebpf.AttachCgroupInetSockRelease: true,
}

// AttachedAtRoot returns every program attached at the cgroup2 root, by ID,
// with its name. It asks BPF_PROG_QUERY directly, with the attribute layout
// of Linux 4.15, for every attach type: bpftool 7 sends a newer layout that
// Linux 5.10 refuses (E2BIG) as soon as a program is attached.
func AttachedAtRoot(t testing.TB) map[int]string {
	t.Helper()
	return queryCgroup(t, RootCgroup(t), 0)
}

// EffectiveForSelf returns every program the kernel runs for this
// process's own cgroup (BPF_F_QUERY_EFFECTIVE: attached there or at any
// ancestor), by ID, with its name: what a connect of this process runs.
func EffectiveForSelf(t testing.TB) map[int]string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	path := ""
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			path = p
		}
	}
	return queryCgroup(t, filepath.Join(RootCgroup(t), path), unix.BPF_F_QUERY_EFFECTIVE)
}

func queryCgroup(t testing.TB, path string, flags uint32) map[int]string {
	t.Helper()
	m := map[int]string{}
	for typ := uint32(0); typ < 64; typ++ {
		ids, errno := queryOne(t, path, typ, flags)
		if errno != 0 {
			// Not a cgroup attach type, or one this kernel does not know;
			// but ours must answer.
			if ourHooks[ebpf.AttachType(typ)] {
				t.Fatalf("BPF_PROG_QUERY attach type %d at %s: %v", typ, path, errno)
			}
			continue
		}
		for _, id := range ids {
			m[int(id)] = progName(id)
		}
	}
	return m
}

// EffectiveOrder names the programs the kernel runs at the cgroup2 root
// for attach type at, in the order it runs them.
func EffectiveOrder(t testing.TB, at ebpf.AttachType) []string {
	t.Helper()
	ids, errno := queryOne(t, RootCgroup(t), uint32(at), unix.BPF_F_QUERY_EFFECTIVE)
	if errno != 0 {
		t.Fatalf("BPF_PROG_QUERY attach type %d at the root: %v", at, errno)
	}
	var names []string
	for _, id := range ids {
		names = append(names, progName(id))
	}
	return names
}

func progName(id uint32) string {
	p, err := ebpf.NewProgramFromID(ebpf.ProgramID(id))
	if err != nil {
		return "?"
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return "?"
	}
	return info.Name
}

// queryOne is BPF_PROG_QUERY of one attach type at the cgroup at path,
// with the attribute layout of Linux 4.15 (see AttachedAtRoot).
func queryOne(t testing.TB, path string, typ, flags uint32) ([]uint32, unix.Errno) {
	t.Helper()
	cg, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	ids := make([]uint32, 256)
	attr := struct {
		targetFd, attachType, queryFlags, attachFlags uint32
		progIDs                                       uint64
		progCnt                                       uint32
		_                                             uint32
	}{targetFd: uint32(cg.Fd()), attachType: typ, queryFlags: flags, progIDs: uint64(uintptr(unsafe.Pointer(&ids[0]))), progCnt: uint32(len(ids))}
	_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_QUERY, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(ids)
	if errno != 0 {
		return nil, errno
	}
	return ids[:attr.progCnt], 0
}

// AssertGone checks nothing of ours is left: no pin dir, none of ids
// attached at the cgroup2 root.
func AssertGone(t testing.TB, pinDir string, ids []int) {
	t.Helper()
	if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(pinDir)
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("pin dir %s still exists (%v), holding %v", pinDir, err, names)
	}
	// The kernel detaches a link whose last reference went away from a
	// deferred work item, so give it a moment; there is no event to wait on.
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []string
		attached := AttachedAtRoot(t)
		for _, id := range ids {
			if name, ok := attached[id]; ok {
				left = append(left, fmt.Sprintf("program %d (%s)", id, name))
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("still attached at the cgroup2 root 5s after removal: %s", strings.Join(left, ", "))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// AssertAttached checks every one of ids is attached at the cgroup2 root.
func AssertAttached(t testing.TB, ids []int) {
	t.Helper()
	attached := AttachedAtRoot(t)
	for _, id := range ids {
		if _, ok := attached[id]; !ok {
			t.Errorf("program %d is not attached at the cgroup2 root; attached: %v", id, attached)
		}
	}
}

// HTTPGet fetches url and returns the status code and body.
func HTTPGet(t testing.TB, url string) (int, string) {
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

// MetricValue returns the value of the sample whose line starts with
// prefix, or -1 when there is none.
func MetricValue(body, prefix string) float64 {
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, prefix) {
			f := strings.Fields(line)
			if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
				return v
			}
		}
	}
	return -1
}

var addrRe = regexp.MustCompile(`addr"?[=:]"?([0-9.:\[\]]+)`)

// MetricsURL finds where a daemon started with --metrics-addr 127.0.0.1:0
// listens, from its log (text or JSON).
func MetricsURL(t testing.TB, p *Proc) string {
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
