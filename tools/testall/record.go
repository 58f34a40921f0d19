package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A row of the record: one cell's last run.
type row struct {
	Cell     string   `json:"cell"`
	Commit   string   `json:"commit"`
	Date     string   `json:"date"` // UTC, RFC 3339, when the cell started
	Machine  string   `json:"machine"`
	Result   string   `json:"result"` // passed, failed, timed out
	Seconds  int      `json:"seconds"`
	Passed   int      `json:"tests_passed"`
	Failed   int      `json:"tests_failed"`
	Skipped  int      `json:"tests_skipped"`
	Headline []string `json:"headline,omitempty"`
	Failures []string `json:"failures,omitempty"`
	Running  []string `json:"running_at_bound,omitempty"` // what was running when the bound ended it
	Table    string   `json:"table,omitempty"`
}

type record struct {
	Rows []row `json:"rows"`
}

const recordJSON = "record.json"

func loadRecord(dir string) (record, error) {
	var r record
	b, err := os.ReadFile(filepath.Join(dir, recordJSON))
	if os.IsNotExist(err) {
		return r, nil
	}
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("%s: %w (delete it to start a new record)", filepath.Join(dir, recordJSON), err)
	}
	return r, nil
}

// update replaces the rows of the cells in rs and keeps every other row
// with its own commit and date.
func (r *record) update(rs ...row) {
	for _, n := range rs {
		replaced := false
		for i := range r.Rows {
			if r.Rows[i].Cell == n.Cell {
				r.Rows[i], replaced = n, true
			}
		}
		if !replaced {
			r.Rows = append(r.Rows, n)
		}
	}
	order := map[string]int{}
	for i, c := range cells {
		order[c.Name] = i
	}
	sort.SliceStable(r.Rows, func(i, j int) bool { return order[r.Rows[i].Cell] < order[r.Rows[j].Cell] })
}

// updateRecord reads the record in dir, replaces the rows of rs, and writes
// it back, holding dir/.lock so that runs side by side (a guest cell and a
// host cell) keep each other's rows.
func updateRecord(dir string, rs ...row) (record, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return record{}, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return record{}, err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return record{}, err
	}
	r, err := loadRecord(dir)
	if err != nil {
		return r, err
	}
	r.update(rs...)
	return r, r.save(dir)
}

func (r record) get(name string) (row, bool) {
	for _, x := range r.Rows {
		if x.Cell == name {
			return x, true
		}
	}
	return row{}, false
}

func (r record) save(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, recordJSON), append(b, '\n')); err != nil {
		return err
	}
	var md strings.Builder
	r.markdown(&md)
	return writeFile(filepath.Join(dir, "README.md"), []byte(md.String()))
}

func writeFile(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func fmtDuration(s int) string {
	return fmt.Sprintf("%dm%02ds", s/60, s%60)
}

// markdown renders the record: one table of every cell (never run ones
// too), then each cell's figures and failures.
func (r record) markdown(w io.Writer) {
	fmt.Fprintln(w, "# Results of `make test-all`")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Written by `make test-all` (tools/testall) from record.json; each row is the cell's last run, on the commit it names.")
	fmt.Fprintln(w, "Which cells a change must run before it lands: docs/development.md. Do not edit by hand.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| cell | result | commit | date (UTC) | time | tests passed / failed / skipped | machine |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	for _, c := range cells {
		x, ok := r.get(c.Name)
		if !ok {
			fmt.Fprintf(w, "| %s | not run | | | | | |\n", c.Name)
			continue
		}
		tests := ""
		if x.Passed+x.Failed+x.Skipped > 0 {
			tests = fmt.Sprintf("%d / %d / %d", x.Passed, x.Failed, x.Skipped)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n", x.Cell, x.Result, x.Commit, x.Date, fmtDuration(x.Seconds), tests, x.Machine)
	}
	for _, c := range cells {
		x, ok := r.get(c.Name)
		if !ok {
			continue
		}
		fmt.Fprintf(w, "\n## %s\n\n%s. `make %s`, bound %s.\n", x.Cell, c.About, strings.Join(c.Args, " "), c.Bound)
		if len(x.Running) > 0 {
			fmt.Fprintln(w, "\nStill running when the bound ended it:")
			fmt.Fprintln(w, "```")
			for _, l := range x.Running {
				fmt.Fprintln(w, l)
			}
			fmt.Fprintln(w, "```")
		}
		if len(x.Failures) > 0 {
			fmt.Fprintln(w, "\nFailed:")
			for _, f := range x.Failures {
				fmt.Fprintf(w, "- %s\n", f)
			}
		}
		if len(x.Headline) > 0 {
			fmt.Fprintln(w, "\n```")
			for _, l := range x.Headline {
				fmt.Fprintln(w, l)
			}
			fmt.Fprintln(w, "```")
		}
		if x.Table != "" {
			fmt.Fprintf(w, "\n%s\n", strings.TrimSpace(x.Table))
		}
	}
}

var (
	testLine = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+)`)
	// Go's "panic: test timed out" names the tests still running.
	timedOut = regexp.MustCompile(`^panic: test timed out`)
	running  = regexp.MustCompile(`^\t\t(\S+) \(`)
	// The kernel matrix's own failure lines ("- 6.1 TestX: ...").
	kernelFailure = regexp.MustCompile(`^- (5\.10|6\.1|6\.12|arm64-6\.1|arm64-6\.12)[ :]`)
)

// scan reads a cell's log: test counts (top-level tests only, as the
// kernel matrix counts them), failed test names, and the headline lines.
func scan(log io.Reader, c cell, x *row) error {
	sc := bufio.NewScanner(log)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	seenFail := map[string]bool{}
	inTimeout := false
	for sc.Scan() {
		l := sc.Text()
		if m := testLine.FindStringSubmatch(l); m != nil && !strings.Contains(m[2], "/") {
			switch m[1] {
			case "PASS":
				x.Passed++
			case "FAIL":
				x.Failed++
				if !seenFail[m[2]] {
					seenFail[m[2]] = true
					x.Failures = append(x.Failures, m[2])
				}
			case "SKIP":
				x.Skipped++
			}
		}
		if timedOut.MatchString(l) {
			inTimeout = true
			continue
		}
		if inTimeout {
			if m := running.FindStringSubmatch(l); m != nil {
				x.Failures = append(x.Failures, m[1]+" (still running when its test binary timed out)")
				continue
			}
			if !strings.HasPrefix(l, "\t") {
				inTimeout = false
			}
		}
		if kernelRow.MatchString(l) {
			// | 6.1 (kver) | version | passed | failed | skipped | time | result |
			if f := strings.Split(l, "|"); len(f) >= 8 {
				x.Passed += atoi(f[3])
				x.Failed += atoi(f[4])
				x.Skipped += atoi(f[5])
			}
		}
		if kernelFailure.MatchString(l) && len(x.Failures) < 50 {
			x.Failures = append(x.Failures, strings.TrimPrefix(l, "- "))
		}
		if c.Headline != nil && c.Headline.MatchString(l) && len(x.Headline) < 40 {
			x.Headline = append(x.Headline, strings.TrimRight(l, " "))
		}
	}
	return sc.Err()
}

func machine(load string) string {
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%d cores, %s, load %s", numCPU(), strings.TrimSpace(string(kernel)), load)
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func utc(t time.Time) string { return t.UTC().Format("2006-01-02 15:04") }

func atoi(s string) int {
	n, _ := strconv.Atoi(strings.TrimSpace(s))
	return n
}
