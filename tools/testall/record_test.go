package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestUpdateKeepsOtherRows(t *testing.T) {
	dir := t.TempDir()
	var r record
	r.update(row{Cell: "soak", Commit: "aaaaaaa", Result: "passed"}, row{Cell: "kernel-6.1", Commit: "aaaaaaa", Result: "failed"})
	if err := r.save(dir); err != nil {
		t.Fatal(err)
	}
	r2, err := loadRecord(dir)
	if err != nil {
		t.Fatal(err)
	}
	r2.update(row{Cell: "kernel-6.1", Commit: "bbbbbbb", Result: "passed"})
	if err := r2.save(dir); err != nil {
		t.Fatal(err)
	}
	r3, err := loadRecord(dir)
	if err != nil {
		t.Fatal(err)
	}
	if k, _ := r3.get("kernel-6.1"); k.Commit != "bbbbbbb" || k.Result != "passed" {
		t.Errorf("kernel-6.1 row = %+v, want the new run's", k)
	}
	if s, _ := r3.get("soak"); s.Commit != "aaaaaaa" {
		t.Errorf("soak row = %+v, want it kept with its own commit", s)
	}
	if len(r3.Rows) != 2 {
		t.Errorf("%d rows, want 2", len(r3.Rows))
	}
	// Matrix order, whatever the order of the runs.
	if r3.Rows[0].Cell != "kernel-6.1" {
		t.Errorf("first row %s, want kernel-6.1 (matrix order)", r3.Rows[0].Cell)
	}
	md, err := os.ReadFile(filepath.Join(dir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(md), "| kube-guest | not run |") {
		t.Errorf("README.md does not list a cell never run:\n%s", md)
	}
}

func TestCorruptRecordRefused(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, recordJSON), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadRecord(dir); err == nil || !strings.Contains(err.Error(), "delete it") {
		t.Errorf("loadRecord of a corrupt record = %v, want an error that says what to do", err)
	}
}

func TestScan(t *testing.T) {
	log := strings.Join([]string{
		"=== RUN   TestA",
		"--- PASS: TestA (0.01s)",
		"    --- PASS: TestA/sub (0.00s)",
		"--- FAIL: TestB (1.00s)",
		"--- SKIP: TestC (0.00s)",
		"panic: test timed out after 5m0s",
		"\trunning tests:",
		"\t\tTestD (4m59s)",
		"goroutine 1 [running]:",
		"| 6.1 (6.1.0-41-amd64) | 6.1.158-1 | 120 | 2 | 1 | 9m3s | FAIL |",
		"- 6.1 TestE: redirect_test.go:40: connect refused",
		"soak 5m0s: 1000 connects ok, 0 failed; 10 kill -9 + restarts",
	}, "\n")
	c, _ := cellByName("kernel-6.1")
	c.Headline = kernelRow
	var x row
	if err := scan(strings.NewReader(log), c, &x); err != nil {
		t.Fatal(err)
	}
	if x.Passed != 121 || x.Failed != 3 || x.Skipped != 2 {
		t.Errorf("counts %d/%d/%d, want 121/3/2 (Go's top-level lines and the kernel table's row)", x.Passed, x.Failed, x.Skipped)
	}
	want := []string{"TestB", "TestD (still running when its test binary timed out)", "6.1 TestE: redirect_test.go:40: connect refused"}
	if strings.Join(x.Failures, "\n") != strings.Join(want, "\n") {
		t.Errorf("failures %q, want %q", x.Failures, want)
	}
	if len(x.Headline) != 1 || !strings.HasPrefix(x.Headline[0], "| 6.1") {
		t.Errorf("headline %q, want the kernel row", x.Headline)
	}
	soak, _ := cellByName("soak")
	var y row
	if err := scan(strings.NewReader(log), soak, &y); err != nil {
		t.Fatal(err)
	}
	if len(y.Headline) != 1 || !strings.Contains(y.Headline[0], "connects ok") {
		t.Errorf("soak headline %q", y.Headline)
	}
}

func TestEveryCellIsAMakeTarget(t *testing.T) {
	mk, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, c := range cells {
		if seen[c.Name] {
			t.Errorf("cell %s twice", c.Name)
		}
		seen[c.Name] = true
		if c.Bound <= 0 {
			t.Errorf("cell %s has no bound", c.Name)
		}
		if !strings.Contains(string(mk), "\n"+c.Args[0]+":") {
			t.Errorf("cell %s: make %s is not a target of the Makefile", c.Name, c.Args[0])
		}
	}
}

// The workflow's list of cells is the default set, in the same order.
func TestWorkflowRunsEveryCell(t *testing.T) {
	wf, err := os.ReadFile("../../.github/workflows/test-all.yml")
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, c := range cells {
		if c.Default {
			want = append(want, c.Name)
		}
	}
	line := `all="` + strings.Join(want, " ") + `"`
	if !strings.Contains(string(wf), line) {
		t.Errorf("test-all.yml does not list the default cells; want the line\n%s", line)
	}
}

func TestCellsFor(t *testing.T) {
	for _, tc := range []struct {
		changed []string
		want    string
	}{
		{[]string{"internal/loader/attach.go"}, "kernel-6.1 kernel-6.12 kernel-arm64-6.12"},
		{[]string{"internal/cli/run.go", "README.md"}, ""},
		{[]string{"deploy/helm/nsredirect/values.yaml", "Dockerfile"}, "release-check kube"},
		{[]string{"internal/docker/watch.go", "bpf/redirect.c"}, "kernel-6.1 kernel-6.12 kernel-arm64-6.12 runtimes runtimes-guest"},
		{[]string{"bpfx/x.go"}, ""},
	} {
		if got := strings.Join(cellsFor(tc.changed), " "); got != tc.want {
			t.Errorf("cellsFor(%q) = %q, want %q", tc.changed, got, tc.want)
		}
	}
	for _, r := range pathRules {
		for _, c := range r.Cells {
			if _, ok := cellByName(c); !ok {
				t.Errorf("path rule %v names an unknown cell %s", r.Paths, c)
			}
		}
	}
}

// docs/development.md carries the table testall -rules prints.
func TestDevelopmentDocsTableCurrent(t *testing.T) {
	doc, err := os.ReadFile("../../docs/development.md")
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	printRules(&b)
	if !strings.Contains(string(doc), b.String()) {
		t.Errorf("docs/development.md does not carry the current table of cells by path; put this, from `go run ./tools/testall -rules`, in it:\n%s", b.String())
	}
}

// Two runs side by side: each update keeps the other's rows.
func TestUpdateRecordKeepsConcurrentRows(t *testing.T) {
	dir := t.TempDir()
	done := make(chan error)
	for _, c := range []string{"soak", "kube-guest", "fuzz", "kernel-6.1"} {
		go func(c string) {
			_, err := updateRecord(dir, row{Cell: c, Result: "passed"})
			done <- err
		}(c)
	}
	for range 4 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	r, err := loadRecord(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Rows) != 4 {
		t.Errorf("%d rows after four concurrent updates, want 4: %+v", len(r.Rows), r.Rows)
	}
}

// The bound ends what the cell started in a process group of its own, as
// timeout(1) does with qemu.
func TestEndGroupReachesOtherGroups(t *testing.T) {
	cmd := exec.Command("bash", "-c", "setsid sleep 300 & echo $!; wait")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var child int
	if _, err := fmt.Fscan(out, &child); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	endGroup(cmd.Process.Pid, done)
	deadline := time.Now().Add(5 * time.Second)
	for syscall.Kill(child, 0) == nil {
		if time.Now().After(deadline) {
			_ = syscall.Kill(child, syscall.SIGKILL)
			t.Fatalf("pid %d (setsid sleep) outlived endGroup", child)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
