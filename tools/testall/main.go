// Command testall runs the cells of the full test matrix (`make test-all`),
// each with its own bound, and writes their record to test/results/: per
// cell the commit, date, machine, result, duration, test counts, headline
// figures and failures. A run of some cells (CELLS="kernel-6.1 soak")
// replaces their rows and keeps the others'. It exits 1 if any cell
// failed, 2 on a usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func numCPU() int { return runtime.NumCPU() }

func main() {
	os.Exit(run())
}

func run() int {
	fs := flag.NewFlagSet("testall", flag.ContinueOnError)
	names := fs.String("cells", "", "cells to run, space- or comma-separated (default: every default cell; see -list)")
	recordDir := fs.String("record", "test/results", "directory of the record (record.json, README.md)")
	list := fs.Bool("list", false, "list the cells and exit")
	makeCmd := fs.String("make", "make", "the make command")
	since := fs.String("since", "", "run the cells the changes since this git revision need (docs/development.md's table)")
	render := fs.Bool("render", false, "write the record's README.md again from its record.json and exit")
	rules := fs.Bool("rules", false, "print the table of which cells a change must run, by path, and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	if *list {
		for _, c := range cells {
			d := ""
			if !c.Default {
				d = " (not in the default set)"
			}
			fmt.Printf("%-18s bound %-6s make %s: %s%s\n", c.Name, c.Bound, strings.Join(c.Args, " "), c.About, d)
		}
		return 0
	}
	if *rules {
		printRules(os.Stdout)
		return 0
	}
	if *render {
		if _, err := updateRecord(*recordDir); err != nil {
			fmt.Fprintf(os.Stderr, "testall: %v\n", err)
			return 1
		}
		return 0
	}
	if *since != "" {
		if *names != "" {
			fmt.Fprintln(os.Stderr, "testall: give -cells or -since, not both")
			return 2
		}
		out, err := exec.Command("git", "diff", "--name-only", *since+"...HEAD").Output()
		if err != nil {
			fmt.Fprintf(os.Stderr, "testall: git diff %s...HEAD: %v (give a revision this checkout has, e.g. SINCE=origin/main)\n", *since, err)
			return 2
		}
		need := cellsFor(strings.Fields(string(out)))
		if len(need) == 0 {
			fmt.Println("testall: the changes since " + *since + " need the gate alone (.ci/run)")
			return 0
		}
		fmt.Printf("testall: the changes since %s need: %s\n", *since, strings.Join(need, " "))
		*names = strings.Join(need, " ")
	}
	var sel []cell
	if strings.TrimSpace(*names) == "" {
		for _, c := range cells {
			if c.Default {
				sel = append(sel, c)
			}
		}
	} else {
		for _, n := range strings.FieldsFunc(*names, func(r rune) bool { return r == ' ' || r == ',' }) {
			c, ok := cellByName(n)
			if !ok {
				fmt.Fprintf(os.Stderr, "testall: unknown cell %q; `make test-all-list` lists them\n", n)
				return 2
			}
			sel = append(sel, c)
		}
	}
	cache := os.Getenv("NSREDIRECT_TEST_CACHE")
	if cache == "" {
		cache = "/var/cache/nsredirect-test"
	}
	logs := filepath.Join(cache, "test-all", "logs")
	if err := os.MkdirAll(logs, 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "testall: %v (set NSREDIRECT_TEST_CACHE to a writable directory)\n", err)
		return 2
	}
	rec, err := loadRecord(*recordDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testall: %v\n", err)
		return 2
	}
	commit := gitCommit()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	failed := 0
	for _, c := range sel {
		if ctx.Err() != nil {
			break
		}
		x := runCell(ctx, c, *makeCmd, cache, logs, commit)
		if ctx.Err() != nil {
			// Interrupted: the row would say nothing about the cell.
			fmt.Fprintf(os.Stderr, "testall: interrupted during %s; its row is not recorded\n", c.Name)
			break
		}
		// Another run may have written rows meanwhile: read the record
		// again and replace only this cell's row, under the record's lock.
		rec, err = updateRecord(*recordDir, x)
		if err != nil {
			fmt.Fprintf(os.Stderr, "testall: write the record: %v\n", err)
			return 1
		}
		if x.Result != "passed" {
			failed++
		}
	}
	fmt.Println()
	fmt.Printf("%-18s %-10s %8s  %s\n", "cell", "result", "time", "log")
	for _, c := range sel {
		x, ok := rec.get(c.Name)
		if !ok || x.Commit != commit {
			fmt.Printf("%-18s %-10s\n", c.Name, "not run")
			continue
		}
		fmt.Printf("%-18s %-10s %8s  %s\n", c.Name, x.Result, fmtDuration(x.Seconds), filepath.Join(logs, c.Name+".log"))
	}
	fmt.Printf("record: %s\n", filepath.Join(*recordDir, "README.md"))
	if ctx.Err() != nil {
		return 130
	}
	if failed > 0 {
		return 1
	}
	return 0
}

func gitCommit() string {
	out, err := exec.Command("git", "rev-parse", "--short=7", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	c := strings.TrimSpace(string(out))
	if err := exec.Command("git", "diff", "--quiet", "HEAD").Run(); err != nil {
		c += "+dirty"
	}
	return c
}

// runCell runs one cell under its bound, its output both to the terminal
// (prefixed with the cell's name) and to its log, and reads the row back
// from the log.
func runCell(ctx context.Context, c cell, makeCmd, cache, logs, commit string) row {
	logPath := filepath.Join(logs, c.Name+".log")
	start := time.Now()
	startLoad := loadAvg()
	x := row{Cell: c.Name, Commit: commit, Date: utc(start), Machine: machine(startLoad)}
	fmt.Printf("\n== test-all: %s (bound %s): make %s\n", c.Name, c.Bound, strings.Join(c.Args, " "))
	f, err := os.Create(logPath)
	if err != nil {
		x.Result, x.Failures = "failed", []string{err.Error()}
		return x
	}
	defer f.Close()
	if c.Table != "" {
		// A table left by an earlier run must not pass for this one's.
		_ = os.Remove(filepath.Join(cache, c.Table))
	}
	cmd := exec.Command(makeCmd, append([]string{"--no-print-directory"}, c.Args...)...)
	// Its own process group: the bound ends the whole cell (qemu, dockerd,
	// test binaries), and only it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	w := io.MultiWriter(f, &prefixWriter{w: os.Stdout, prefix: "[" + c.Name + "] "})
	cmd.Stdout, cmd.Stderr = w, w
	cmd.WaitDelay = 30 * time.Second
	if err := cmd.Start(); err != nil {
		x.Result, x.Failures = "failed", []string{err.Error()}
		return x
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	timer := time.NewTimer(c.Bound)
	defer timer.Stop()
	select {
	case err = <-done:
	case <-timer.C:
		x.Running = processTree(cmd.Process.Pid)
		endGroup(cmd.Process.Pid, done)
		err = errors.New("bound")
		x.Result = "timed out after " + c.Bound.String()
	case <-ctx.Done():
		endGroup(cmd.Process.Pid, done)
		return x
	}
	x.Seconds = int(time.Since(start).Seconds())
	x.Machine = machine(startLoad + " → " + loadAvg())
	if x.Result == "" {
		x.Result = "passed"
		if err != nil {
			x.Result = "failed"
		}
	}
	if _, err := f.Seek(0, io.SeekStart); err == nil {
		if err := scan(f, c, &x); err != nil {
			x.Failures = append(x.Failures, "reading the log: "+err.Error())
		}
	}
	if c.Table != "" {
		if b, err := os.ReadFile(filepath.Join(cache, c.Table)); err == nil {
			x.Table = string(b)
		}
	}
	if x.Result != "passed" && len(x.Failures) == 0 && len(x.Running) == 0 {
		x.Failures = []string{"no test failed: see the last lines of " + logPath}
	}
	return x
}

// endGroup ends the cell: its process group and every descendant in a
// group of its own (timeout(1) puts qemu in one): SIGTERM, then SIGKILL
// after 30 s.
func endGroup(pgid int, done <-chan error) {
	signalTree(pgid, syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		signalTree(pgid, syscall.SIGKILL)
		<-done
	}
	// What outlived make (its parent gone) is still ours: end it too.
	signalTree(pgid, syscall.SIGKILL)
}

// signalTree signals the process group pgid and every process that
// descends from its leader, whatever group it is in.
func signalTree(pgid int, sig syscall.Signal) {
	_ = syscall.Kill(-pgid, sig)
	for _, pid := range descendants(pgid) {
		_ = syscall.Kill(pid, sig)
	}
}

// descendants lists the processes below pid, and those of its process
// group, read from /proc: pid, ppid and pgrp of each.
func descendants(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	parent := map[int]int{}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...: comm may hold spaces and parens.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 3 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		pgrp, _ := strconv.Atoi(f[2])
		if pgrp == pid && p != pid {
			ppid = pid // a member of the cell's group whose parent already exited
		}
		parent[p] = ppid
	}
	var out []int
	var walk func(int)
	walk = func(p int) {
		for c, pp := range parent {
			if pp == p {
				out = append(out, c)
				walk(c)
			}
		}
	}
	walk(pid)
	return out
}

// processTree names what was running in the cell's process group: pid,
// elapsed time and command line, as ps shows them.
func processTree(pgid int) []string {
	out, err := exec.Command("ps", "-e", "-o", "pgid=,pid=,etime=,args=").Output()
	if err != nil {
		return []string{"ps: " + err.Error()}
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		f := strings.Fields(l)
		if len(f) < 4 || f[0] != strconv.Itoa(pgid) {
			continue
		}
		l = strings.Join(f[1:], " ")
		if len(l) > 200 {
			l = l[:200] + "…"
		}
		lines = append(lines, strings.TrimSpace(l))
	}
	return lines
}

// prefixWriter prefixes every line it writes.
type prefixWriter struct {
	w      io.Writer
	prefix string
	mid    bool
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		if !p.mid {
			if _, err := io.WriteString(p.w, p.prefix); err != nil {
				return 0, err
			}
		}
		i := strings.IndexByte(string(b), '\n')
		if i < 0 {
			p.mid = true
			_, err := p.w.Write(b)
			return n, err
		}
		if _, err := p.w.Write(b[:i+1]); err != nil {
			return 0, err
		}
		p.mid = false
		b = b[i+1:]
	}
	return n, nil
}

// printRules prints pathRules as the Markdown table docs/development.md
// carries between its rules markers.
func printRules(w io.Writer) {
	fmt.Fprintln(w, "| a change under | runs before it lands, beside the gate | why |")
	fmt.Fprintln(w, "|---|---|---|")
	for _, r := range pathRules {
		paths := make([]string, len(r.Paths))
		for i, p := range r.Paths {
			paths[i] = "`" + p + "`"
		}
		c := "the gate alone"
		if len(r.Cells) > 0 {
			c = strings.Join(r.Cells, ", ")
		}
		fmt.Fprintf(w, "| %s | %s | %s |\n", strings.Join(paths, " "), c, r.Why)
	}
	fmt.Fprintln(w, "| a release | every cell (`make test-all`) | |")
}
