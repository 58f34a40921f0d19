//go:build runtimes && guest

package runtimes_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// The tests in this file need a machine of their own: systemd as PID 1 and
// the unit installed where docs/docker.md says. `make test-runtimes-guest`
// (scripts/test-kernels.sh --runtimes) builds them with the guest tag and
// runs them in a qemu guest that boots systemd on a pure cgroup2 hierarchy;
// nothing the guest writes reaches the host.

const (
	unitPath   = "/etc/systemd/system/nsredirect.service"
	unitBin    = "/usr/local/bin/nsredirect"
	unitDflt   = "/etc/default/nsredirect"
	unitPinDir = "/sys/fs/bpf/nsredirect" // the daemon's default, the unit's ReadWritePaths
)

// The unit's CapabilityBoundingSet: CAP_NET_ADMIN (12), CAP_SYS_PTRACE
// (19), CAP_SYS_ADMIN (21), CAP_BPF (39).
const unitCaps = 1<<12 | 1<<19 | 1<<21 | 1<<39

func systemctl(t *testing.T, args ...string) string {
	t.Helper()
	return mustSh(t, 2*time.Minute, nil, "systemctl", args...)
}

// mainPID is the unit's MainPID, 0 when it is not running.
func mainPID(t *testing.T) int {
	t.Helper()
	v := strings.TrimSpace(systemctl(t, "show", "-P", "MainPID", "nsredirect"))
	pid, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("MainPID %q: %v", v, err)
	}
	return pid
}

// procStatus reads one field of /proc/PID/status.
func procStatus(t *testing.T, pid int, field string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("/proc/%d/status has no %s", pid, field)
	return ""
}

// waitRunning waits for the unit's daemon to be up: MainPID set and the
// daemon's own readiness line in the journal since cursorless boot of pid.
func waitRunning(t *testing.T, notPID int) int {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute) // a hang cap: TCG is slow
	for {
		if pid := mainPID(t); pid != 0 && pid != notPID {
			out, _ := sh(30*time.Second, nil, "journalctl", "-u", "nsredirect", "_PID="+strconv.Itoa(pid), "-o", "cat", "--no-pager")
			if strings.Contains(out, "nsredirect running") {
				return pid
			}
		}
		if time.Now().After(deadline) {
			st, _ := sh(30*time.Second, nil, "systemctl", "status", "--no-pager", "-l", "nsredirect")
			t.Fatalf("nsredirect.service not running within 2m:\n%s", st)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestSystemdUnit installs the shipped unit as docs/docker.md says, under a
// real systemd (PID 1) on a pure cgroup2 host with Docker Engine 29, and
// checks what the unit promises: a labelled container is redirected,
// `systemctl restart` under a connect loop refuses nothing, `systemctl
// stop` with the container running hands over and keeps the redirect, the
// journal holds the daemon's JSON logs, and LimitMEMLOCK, the capability
// bounding set and the sandboxing directives are in force.
func TestSystemdUnit(t *testing.T) {
	comm, _ := os.ReadFile("/proc/1/comm")
	need(t, strings.TrimSpace(string(comm)) == "systemd", fmt.Sprintf("PID 1 is %q, not systemd: run `make test-runtimes-guest`", strings.TrimSpace(string(comm))))
	for _, p := range []string{unitPath, unitBin, unitDflt, unitPinDir} {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("%s exists already; this test installs its own and would overwrite it", p)
		}
	}
	e := docker29(t)
	c := newCell(t, e.name+" (`docker run`)", "systemd 252 unit: `systemctl enable --now`, restart, stop")
	img, _ := e.makeImage(t)
	bin := testenv.Binary(t, "NSREDIRECT_BIN", "github.com/nsredirect/nsredirect/cmd/nsredirect")
	repo := repoDir(t)
	run := testenv.Name("nsrt")
	label := run + ".redirect"
	ctr := run + "-a"

	// As docs/docker.md says, plus the overrides the unit documents pointing it
	// at this engine's socket and a label of this run.
	mustSh(t, time.Minute, nil, "install", "-m", "0755", bin, unitBin)
	mustSh(t, time.Minute, nil, "install", "-m", "0644", filepath.Join(repo, "deploy", "systemd", "nsredirect.service"), "/etc/systemd/system/")
	dflt := fmt.Sprintf("NSREDIRECT_DOCKER_HOST=%s\nNSREDIRECT_LABEL=%s\n", e.host(), label)
	if err := os.WriteFile(unitDflt, []byte(dflt), 0o644); err != nil {
		t.Fatal(err)
	}
	var progs []int
	t.Cleanup(func() {
		_, _ = sh(time.Minute, e.env, cliPath, "rm", "-f", "-v", ctr)
		_, _ = sh(2*time.Minute, nil, "systemctl", "disable", "--now", "nsredirect")
		_, _ = sh(time.Minute, nil, unitBin, "cleanup", "--all", "--pin-dir", unitPinDir)
		for _, p := range []string{unitPath, unitBin, unitDflt} {
			_ = os.Remove(p)
		}
		_, _ = sh(time.Minute, nil, "systemctl", "daemon-reload")
		_, _ = sh(time.Minute, nil, "systemctl", "reset-failed", "nsredirect")
		testenv.AssertGone(t, unitPinDir, progs)
	})
	if out, err := sh(time.Minute, nil, "systemd-analyze", "verify", unitPath); err != nil {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	systemctl(t, "daemon-reload")
	systemctl(t, "enable", "--now", "nsredirect")
	pid := waitRunning(t, 0)
	c.measure("`systemctl enable --now`: running, pid %d", pid)

	e.docker(t, "run", "-d", "--name", ctr, "--label", label+"=80=3210", img.backend)
	pa := e.pidOf(t, ctr)
	start := time.Now()
	waitRedirect(t, pa, "127.0.0.1:80", followCap)
	c.measure("labelled container redirected %s after `docker run` returned", ms(time.Since(start)))
	clients(t, pa, "labelled container")
	progs = testenv.ProgIDs(t, unitPinDir)

	// What the unit asks for, as systemd reports it and as the kernel
	// enforces it on the running daemon.
	show := systemctl(t, "show", "nsredirect", "-p", "LimitMEMLOCK,CapabilityBoundingSet,AmbientCapabilities,NoNewPrivileges,ProtectSystem,ProtectHome,PrivateTmp,ReadWritePaths") + "\n"
	for _, want := range []string{"LimitMEMLOCK=infinity", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "ReadWritePaths=/sys/fs/bpf"} {
		if !strings.Contains(show, want+"\n") {
			t.Errorf("systemctl show: no %s in\n%s", want, show)
		}
	}
	checkConfined(t, c, pid)

	// systemctl restart under a connect loop: nothing refused; the next
	// daemon adopts the container.
	stop := make(chan struct{})
	loop := connectLoop(pa, "127.0.0.1:80", 3*time.Minute, stop)
	time.Sleep(300 * time.Millisecond) // some connects before the restart
	t0 := time.Now()
	systemctl(t, "restart", "nsredirect")
	pid2 := waitRunning(t, pid)
	testenv.WaitStatus(t, unitPinDir, "the container adopted after `systemctl restart`", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, ctr)
		return len(r) == 1 && r[0].Alive && r[0].OwnerPID == pid2
	})
	took := time.Since(t0)
	time.Sleep(300 * time.Millisecond) // and some after
	close(stop)
	res := <-loop
	c.measure("`systemctl restart` under a connect loop: %d/%d refused (adopted after %s)", res.failed, res.ok+res.failed, ms(took))
	if res.failed != 0 || res.ok < 20 {
		t.Errorf("across systemctl restart: %d ok, %d failed (first: %v); want zero failures", res.ok, res.failed, res.firstErr)
	}
	checkConfined(t, nil, pid2)

	// systemctl stop with the container running: handed over, the redirect
	// kept.
	systemctl(t, "stop", "nsredirect")
	if p := mainPID(t); p != 0 {
		t.Fatalf("MainPID %d after systemctl stop", p)
	}
	if _, err := dial(pa, "127.0.0.1:80", 5*time.Second); err != nil {
		t.Errorf("redirect lost after systemctl stop: %v", err)
	}
	journal := mustSh(t, time.Minute, nil, "journalctl", "-u", "nsredirect", "-o", "cat", "--no-pager")
	handovers := 0
	records := 0
	for _, l := range strings.Split(strings.TrimSpace(journal), "\n") {
		if !strings.HasPrefix(l, "{") {
			continue // systemd's own lines (Started, Stopping, ...)
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Errorf("journal line is not JSON: %v: %q", err, l)
			continue
		}
		if rec["level"] == nil || rec["msg"] == nil || rec["time"] == nil {
			t.Errorf("journal record without time/level/msg: %q", l)
		}
		records++
		if rec["handover"] == true {
			handovers++
		}
	}
	if handovers < 2 {
		t.Errorf("journal shows %d handovers (want one at the restart, one at the stop):\n%s", handovers, lastLines(journal, 30))
	}
	c.measure("`systemctl stop` with the container running: handed over, redirect kept; journal: %d JSON records, %d handovers", records, handovers)

	// The next start adopts it; once the container stops the daemon
	// removes the rule, and a stop with nothing running leaves nothing.
	systemctl(t, "start", "nsredirect")
	pid3 := waitRunning(t, pid2)
	testenv.WaitStatus(t, unitPinDir, "the container adopted after `systemctl start`", func(rows []testenv.StatusRow) bool {
		r := testenv.RowsOf(rows, ctr)
		return len(r) == 1 && r[0].Alive && r[0].OwnerPID == pid3
	})
	e.docker(t, "stop", "-t", "1", ctr)
	testenv.WaitStatus(t, unitPinDir, "no rule once the container stopped", func(rows []testenv.StatusRow) bool { return len(rows) == 0 })
	systemctl(t, "stop", "nsredirect")
	testenv.AssertGone(t, unitPinDir, progs)
	c.measure("stopped with no container: nothing attached or pinned")
}

// checkConfined reads the running daemon's credentials and mounts: the
// capability set is the unit's bounding set, no new privileges, memlock
// unlimited, the root read-only but /sys/fs/bpf writable, /home hidden,
// a private /tmp.
func checkConfined(t *testing.T, c *cell, pid int) {
	t.Helper()
	for _, f := range []string{"CapBnd", "CapEff", "CapPrm"} {
		v, err := strconv.ParseUint(procStatus(t, pid, f), 16, 64)
		if err != nil || v != unitCaps {
			t.Errorf("/proc/%d/status %s = %x (%v); want %x (the unit's CapabilityBoundingSet)", pid, f, v, err, uint64(unitCaps))
		}
	}
	if v := procStatus(t, pid, "CapAmb"); strings.Trim(v, "0") != "" {
		t.Errorf("CapAmb = %s; want none", v)
	}
	if v := procStatus(t, pid, "NoNewPrivs"); v != "1" {
		t.Errorf("NoNewPrivs = %s; want 1", v)
	}
	limits, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	memlock := ""
	for _, l := range strings.Split(string(limits), "\n") {
		if strings.HasPrefix(l, "Max locked memory") {
			memlock = strings.Join(strings.Fields(l)[3:], " ")
		}
	}
	if !strings.HasPrefix(memlock, "unlimited unlimited") {
		t.Errorf("Max locked memory = %q; want unlimited (LimitMEMLOCK=infinity)", memlock)
	}
	// From inside the daemon's mount namespace, as it sees the system.
	probe := func(args ...string) error {
		_, err := sh(30*time.Second, nil, "nsenter", append([]string{"-t", strconv.Itoa(pid), "-m", "--"}, args...)...)
		return err
	}
	if probe("touch", "/usr/nsr-probe") == nil {
		_ = probe("rm", "-f", "/usr/nsr-probe")
		t.Errorf("the daemon can write /usr: ProtectSystem=strict not in force")
	}
	if probe("touch", "/etc/nsr-probe") == nil {
		_ = probe("rm", "-f", "/etc/nsr-probe")
		t.Errorf("the daemon can write /etc: ProtectSystem=strict not in force")
	}
	if err := probe("mkdir", "/sys/fs/bpf/nsr-probe"); err != nil {
		t.Errorf("the daemon cannot write /sys/fs/bpf (ReadWritePaths): %v", err)
	} else {
		_ = os.Remove("/sys/fs/bpf/nsr-probe")
	}
	if probe("ls", "/root") == nil {
		if out, _ := sh(30*time.Second, nil, "nsenter", "-t", strconv.Itoa(pid), "-m", "--", "ls", "-A", "/root"); strings.TrimSpace(out) != "" {
			t.Errorf("the daemon sees /root's contents (%q): ProtectHome=yes not in force", lastLines(out, 3))
		}
	}
	marker, err := os.CreateTemp("/tmp", "nsr-host-tmp-")
	if err != nil {
		t.Fatal(err)
	}
	marker.Close()
	defer os.Remove(marker.Name())
	if probe("test", "-e", marker.Name()) == nil {
		t.Errorf("the daemon sees the system's /tmp (%s): PrivateTmp=yes not in force", marker.Name())
	}
	if c != nil && !t.Failed() {
		c.measure("in force on the daemon: CapBnd=CapEff=%x, NoNewPrivs=1, memlock unlimited, / read-only, /sys/fs/bpf writable, /root hidden, private /tmp", uint64(unitCaps))
	}
}
