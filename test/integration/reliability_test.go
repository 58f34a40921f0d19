package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/testenv"
)

// dumpMaps renders every pinned map under pinDir as sorted hex lines, the
// exact kernel state to compare.
func dumpMaps(t *testing.T, pinDir string) string {
	t.Helper()
	var b strings.Builder
	for _, name := range []string{"nsr_rules", "nsr_counters", "nsr_records"} {
		m, err := ebpf.LoadPinnedMap(loader.MapPin(pinDir, name), nil)
		if err != nil {
			t.Fatalf("open %s: %v", name, err)
		}
		var lines []string
		var k, v []byte
		var perCPU []uint64
		it := m.Iterate()
		if m.Type() == ebpf.PerCPUHash {
			for it.Next(&k, &perCPU) {
				lines = append(lines, fmt.Sprintf("%s %x=%v", name, k, perCPU))
			}
		} else {
			for it.Next(&k, &v) {
				lines = append(lines, fmt.Sprintf("%s %x=%x", name, k, v))
			}
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
		m.Close()
		sort.Strings(lines)
		b.WriteString(strings.Join(lines, "\n"))
		b.WriteString("\n")
	}
	entries, _ := os.ReadDir(loader.OwnersDir(pinDir))
	for _, e := range entries {
		fmt.Fprintf(&b, "owner %s\n", e.Name())
	}
	return b.String()
}

func quietLogger() logrus.FieldLogger {
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	return l
}

// TestChurnLeavesMapsAsTheyStarted: 1,000 enroll/unenroll cycles through the
// loader leave the maps byte for byte as they were, with a rule of another
// netns live throughout.
func TestChurnLeavesMapsAsTheyStarted(t *testing.T) {
	pin := testenv.BPFFS(t)
	stay, churn := testenv.NewNetns(t), testenv.NewNetns(t)
	testenv.Server(t, stay, ":3210")
	l, err := loader.Attach(pin, testenv.RootCgroup(t), quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = l.Unenroll(stay.Cookie(t))
		_, _ = l.RemoveAllIfUnused()
		l.Close()
	})
	r1 := mustRules(t, "80=3210")
	r2 := mustRules(t, "80=3210,127.0.0.2:443=127.0.0.1:3211,[::1]:8080=[::1]:3212")
	if err := l.Enroll(loader.Enrollment{Cookie: stay.Cookie(t), Name: "stay", Owner: "test", Rules: r1}); err != nil {
		t.Fatal(err)
	}
	before := dumpMaps(t, pin)
	cookie := churn.Cookie(t)
	start := time.Now()
	for i := 0; i < 1000; i++ {
		rules := r1
		if i%2 == 1 {
			rules = r2
		}
		if err := l.Enroll(loader.Enrollment{Cookie: cookie, Name: "churn", Owner: "test", Rules: rules}); err != nil {
			t.Fatalf("cycle %d enroll: %v", i, err)
		}
		if i%3 == 0 { // also re-enroll in place with other rules
			if err := l.Enroll(loader.Enrollment{Cookie: cookie, Name: "churn", Owner: "test", Rules: r2}); err != nil {
				t.Fatalf("cycle %d update: %v", i, err)
			}
		}
		if err := l.Unenroll(cookie); err != nil {
			t.Fatalf("cycle %d unenroll: %v", i, err)
		}
	}
	t.Logf("1000 enroll/unenroll cycles in %s", time.Since(start))
	if after := dumpMaps(t, pin); after != before {
		t.Errorf("maps differ after churn:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if peer := hostPeer(stay, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Errorf("the netns that stayed enrolled lost its redirect: %s", peer)
	}
}

// TestConcurrentStarts: daemons started at the same instant for different
// netns all end active (the lock serialises them); for the same netns
// exactly one wins and the other says so and exits 1.
func TestConcurrentStarts(t *testing.T) {
	pin := testenv.BPFFS(t)
	const n = 4
	var nss []testenv.Netns
	for i := 0; i < n; i++ {
		ns := testenv.NewNetns(t)
		testenv.Server(t, ns, ":3210")
		nss = append(nss, ns)
	}
	procs := make([]*testenv.Proc, n)
	var wg sync.WaitGroup
	for i := range nss {
		wg.Add(1)
		go func() {
			defer wg.Done()
			procs[i] = testenv.StartNsredirect(t, pin, "run", "--netns", nss[i].Path, "--redirect", "80=3210")
		}()
	}
	wg.Wait()
	for i, p := range procs {
		p.WaitOutput(t, "nsredirect running", 20*time.Second)
		if peer := hostPeer(nss[i], "127.0.0.1:80"); peer != "127.0.0.1:80" {
			t.Errorf("netns %d: %s", i, peer)
		}
	}
	if got := len(testenv.Status(t, pin)); got != n {
		t.Errorf("status shows %d rules, want %d", got, n)
	}

	same := testenv.NewNetns(t)
	testenv.Server(t, same, ":3210")
	a := testenv.StartNsredirect(t, pin, "run", "--netns", same.Path, "--redirect", "80=3210")
	b := testenv.StartNsredirect(t, pin, "run", "--netns", same.Path, "--redirect", "80=3210")
	deadline := time.Now().Add(20 * time.Second)
	for !a.Exited() && !b.Exited() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	winner, loser := a, b
	if a.Exited() {
		winner, loser = b, a
	}
	code, err := loser.Wait(20 * time.Second)
	if err != nil || code != 1 || !strings.Contains(loser.Output(), "already served") {
		t.Errorf("loser: exit %d %v\n%s", code, err, loser.Output())
	}
	winner.WaitOutput(t, "nsredirect running", 20*time.Second)
	if winner.Exited() {
		t.Fatalf("both daemons for one netns exited:\n%s\n%s", a.Output(), b.Output())
	}
	if peer := hostPeer(same, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Errorf("the winner's redirect does not work: %s", peer)
	}
}

// socketsOf lists the sockets a process holds: "tcp LOCALADDR STATE" for
// TCP ones, "socket" for others.
func socketsOf(t *testing.T, pid int) []string {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.HasPrefix(target, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")] = true
		}
	}
	var out []string
	// Every thread's view: /proc/PID/net follows the main thread alone, and
	// a goroutine that entered a target netns (netnsx.Do, never unlocked)
	// may have run there, leaving it in that netns (seen on arm64 guests).
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/net", pid))
	for _, file := range []string{"tcp", "tcp6"} {
		var data []byte
		for _, task := range tasks {
			b, _ := os.ReadFile(filepath.Join(task, file))
			data = append(data, b...)
		}
		for _, line := range strings.Split(string(data), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) > 9 && inodes[f[9]] {
				out = append(out, fmt.Sprintf("%s %s state=%s", file, f[1], f[3]))
				delete(inodes, f[9])
			}
		}
	}
	for range inodes {
		out = append(out, "socket")
	}
	sort.Strings(out)
	return out
}

// TestNoSocketUnlessMetricsAsked: the daemon opens no socket at all without
// --metrics-addr, and exactly one listener where asked with it.
func TestNoSocketUnlessMetricsAsked(t *testing.T) {
	pin := testenv.BPFFS(t)
	a, b := testenv.NewNetns(t), testenv.NewNetns(t)
	d := testenv.Daemon(t, pin, "run", "--netns", a.Path, "--redirect", "80=3210")
	if s := socketsOf(t, d.Cmd.Process.Pid); len(s) != 0 {
		t.Errorf("daemon without --metrics-addr holds sockets: %v", s)
	}
	dm := testenv.Daemon(t, pin, "run", "--netns", b.Path, "--redirect", "80=3210", "--metrics-addr", "127.0.0.1:0")
	s := socketsOf(t, dm.Cmd.Process.Pid)
	// 0100007F is 127.0.0.1; state 0A is LISTEN.
	if len(s) != 1 || !strings.HasPrefix(s[0], "tcp 0100007F:") || !strings.HasSuffix(s[0], "state=0A") {
		t.Errorf("daemon with --metrics-addr 127.0.0.1:0 holds %v; want one listener on 127.0.0.1", s)
	}
}

// TestPinDirPrivate: nothing under the pin dir is writable by other users.
func TestPinDirPrivate(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")
	err := filepath.Walk(pin, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o022 != 0 {
			t.Errorf("%s is writable by others: %s", p, fi.Mode())
		}
		if fi.IsDir() && fi.Mode().Perm()&0o007 != 0 {
			t.Errorf("directory %s is open to others: %s", p, fi.Mode())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestLeastPrivilege runs the daemon with only the capabilities docs/security.md
// lists, then with each of them missing.
func TestLeastPrivilege(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	setpriv := testenv.Tool(t, "setpriv")
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	// CAP_SYS_PTRACE: looking at the host's processes, to tell the host's
	// netns on kernels whose init_net has no fixed inode (before 6.18).
	caps := []string{"bpf", "net_admin", "sys_admin", "sys_ptrace"}
	run := func(keep []string) *exec.Cmd {
		set := "-all"
		for _, c := range keep {
			set += ",+" + c
		}
		// Bounded: a daemon that wrongly starts is killed, not waited on forever.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		t.Cleanup(cancel)
		return exec.CommandContext(ctx, setpriv, "--inh-caps=-all", "--bounding-set="+set, "--",
			bin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--remove-on-exit", "--pin-dir", pin)
	}
	p := testenv.Start(t, run(caps))
	p.WaitOutput(t, "nsredirect running", 20*time.Second)
	eff, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Cmd.Process.Pid))
	for _, line := range strings.Split(string(eff), "\n") {
		if strings.HasPrefix(line, "CapEff:") {
			t.Logf("daemon runs with %s (CAP_BPF|CAP_NET_ADMIN|CAP_SYS_ADMIN|CAP_SYS_PTRACE = 0x0000008000281000)", line)
			if !strings.HasSuffix(line, "0000008000281000") {
				t.Errorf("unexpected effective capabilities: %s", line)
			}
		}
	}
	if peer := hostPeer(ns, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Errorf("redirect with least privilege: %s", peer)
	}
	if err := p.Stop(15, 5*time.Second); err != nil {
		t.Fatalf("stop: %v\n%s", err, p.Output())
	}
	// Without CAP_SYS_PTRACE the daemon still starts where init_net has its
	// fixed inode; where it has none, it refuses to start:
	// TestHostNetnsUnknownRefusesToStart covers both.
	for _, missing := range caps[:3] {
		var keep []string
		for _, c := range caps {
			// CAP_SYS_ADMIN stands in for CAP_BPF, as in the kernel.
			if c != missing && !(missing == "bpf" && c == "sys_admin") {
				keep = append(keep, c)
			}
		}
		var out bytes.Buffer
		cmd := run(keep)
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		ee, ok := err.(*exec.ExitError)
		want := "CAP_" + strings.ToUpper(missing)
		if !ok || ee.ExitCode() != 2 || !strings.Contains(out.String(), "missing "+want) {
			t.Errorf("without %s: %v\n%s\nwant exit 2 naming %s", want, err, out.String(), want)
		}
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("pin dir left behind")
	}
}

// TestFullMapRefusedCleanly: when the enrollment map is full, Enroll says so
// and leaves no rule entry behind.
func TestFullMapRefusedCleanly(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	l := attachLoader(t, pin)
	enroll, err := ebpf.LoadPinnedMap(loader.MapPin(pin, loader.RecordsMap), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enroll.Close()
	// Fill it with records of fake netns cookies no real netns will have.
	value := make([]byte, enroll.ValueSize())
	for i := uint64(0); i < uint64(enroll.MaxEntries()); i++ {
		if err := enroll.Put(uint64(1<<62)+i, value); err != nil {
			t.Fatalf("fill entry %d: %v", i, err)
		}
	}
	before := dumpMaps(t, pin)
	err = l.Enroll(loader.Enrollment{Cookie: ns.Cookie(t), Name: "full", Owner: "test", Rules: mustRules(t, "80=3210")})
	if err == nil || !strings.Contains(err.Error(), "enrollment map is full") {
		t.Fatalf("Enroll into a full map: %v; want a clear 'full' error", err)
	}
	if after := dumpMaps(t, pin); after != before {
		t.Error("a refused enrollment left entries behind")
	}
	for i := uint64(0); i < uint64(enroll.MaxEntries()); i++ {
		_ = enroll.Delete(uint64(1<<62) + i)
	}
}

// TestHostNetnsUnknownRefusesToStart (fail closed): without CAP_SYS_PTRACE
// the daemon may not look at the host's init or kthreadd, and on a kernel
// whose init_net has no fixed inode (Linux before 6.17; forced here with
// NSREDIRECT_HOST_NETNS=processes) nothing else tells the host's netns.
// Then `run` exits 2 with one line naming CAP_SYS_PTRACE and
// --allow-host-netns, and docker and kube refuse to start naming
// CAP_SYS_PTRACE, nothing attached. With CAP_SYS_PTRACE the same start
// works and the host's own netns is still refused. Without the knob, the
// answer follows the kernel: this one's init_net inode decides.
func TestHostNetnsUnknownRefusesToStart(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	setpriv := testenv.Tool(t, "setpriv")
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	least := []string{"bpf", "net_admin", "sys_admin"}
	cmd := func(caps []string, knob bool, args ...string) *exec.Cmd {
		set := "-all"
		for _, c := range caps {
			set += ",+" + c
		}
		// Bounded: a daemon that wrongly starts is killed, not waited on forever.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		t.Cleanup(cancel)
		c := exec.CommandContext(ctx, setpriv, append([]string{"--inh-caps=-all", "--bounding-set=" + set, "--", bin}, args...)...)
		c.Env = os.Environ()
		if knob {
			c.Env = append(c.Env, "NSREDIRECT_HOST_NETNS=processes")
		}
		return c
	}
	refused := func(what string, c *exec.Cmd, want ...string) {
		t.Helper()
		out, err := c.CombinedOutput()
		line := strings.TrimSpace(string(out))
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 2 || strings.Contains(line, "\n") {
			t.Errorf("%s: %v, output %q; want exit 2 and one line", what, err, out)
		}
		for _, w := range want {
			if !strings.Contains(line, w) {
				t.Errorf("%s: %q does not name %q", what, line, w)
			}
		}
		if _, err := os.Stat(pin); !os.IsNotExist(err) {
			t.Errorf("%s: refused daemon left %s", what, pin)
		}
	}
	runArgs := []string{"run", "--netns", ns.Path, "--redirect", "80=3210", "--remove-on-exit", "--pin-dir", pin}
	refused("run without CAP_SYS_PTRACE", cmd(least, true, runArgs...), "host network namespace", "CAP_SYS_PTRACE", "--allow-host-netns")
	refused("docker without CAP_SYS_PTRACE", cmd(least, true, "docker", "--docker-host", "unix:///nonexistent/docker.sock", "--pin-dir", pin), "host network namespace", "CAP_SYS_PTRACE")
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\nusers: [{name: u, user: {token: x}}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	refused("kube without CAP_SYS_PTRACE", cmd(least, true, "kube", "--node-name", "n", "--kubeconfig", kubeconfig, "--pin-dir", pin), "host network namespace", "CAP_SYS_PTRACE")

	withPtrace := append(append([]string(nil), least...), "sys_ptrace")
	p := testenv.Start(t, cmd(withPtrace, true, runArgs...))
	p.WaitOutput(t, "nsredirect running", 20*time.Second)
	if peer := hostPeer(ns, "127.0.0.1:80"); peer != "127.0.0.1:80" {
		t.Errorf("redirect with CAP_SYS_PTRACE: %s", peer)
	}
	if err := p.Stop(15, 5*time.Second); err != nil {
		t.Fatalf("stop: %v\n%s", err, p.Output())
	}
	refused("run --netns self with CAP_SYS_PTRACE", cmd(withPtrace, true, "run", "--netns", "self", "--redirect", "80=3210", "--pin-dir", pin), "is the host network namespace", "--allow-host-netns")

	// Without the knob: known through init_net's fixed inode where the
	// kernel has it, else refused as above.
	var st unix.Stat_t
	if err := unix.Stat("/proc/2/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	if st.Ino != 0xEFFFFFF9 {
		t.Logf("init_net has inode %d, not the fixed one: this kernel needs CAP_SYS_PTRACE", st.Ino)
		refused("run without CAP_SYS_PTRACE on this kernel", cmd(least, false, runArgs...), "CAP_SYS_PTRACE", "--allow-host-netns")
		return
	}
	t.Log("init_net has its fixed inode on this kernel: the host netns is known without CAP_SYS_PTRACE")
	p = testenv.Start(t, cmd(least, false, runArgs...))
	p.WaitOutput(t, "nsredirect running", 20*time.Second)
	if err := p.Stop(15, 5*time.Second); err != nil {
		t.Fatalf("stop: %v\n%s", err, p.Output())
	}
}
