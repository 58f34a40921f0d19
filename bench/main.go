// Command bench measures, in one run on one machine, what each way of
// making 127.0.0.1:80 reach a server on 127.0.0.1:3210 inside a network
// namespace costs: direct to :3210 (the physical limit), nsredirect,
// a socat sidecar and iptables REDIRECT, then what the connect programs cost
// inside the kernel on every connect of the host. Everything runs in
// throwaway namespaces on loopback, each measurement is repeated and the
// median and spread reported, and everything is removed on exit, Ctrl-C
// included.
//
//	sudo make bench         # ~7 minutes on 2 cores
//	sudo make bench-quick   # < 1 minute
//	sudo make bench-scale   # the daemon at node scale, ~3 minutes
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

type config struct {
	quick      bool
	only       string
	reps       int
	wrkSecs    int
	iperfSecs  int
	dials      int
	outDir     string
	nsredirect string
	backend    string
	daemonLog  string
}

func main() {
	var c config
	flag.BoolVar(&c.quick, "quick", false, "short run (< 1 minute): fewer repeats, shorter loads")
	flag.StringVar(&c.daemonLog, "daemon-log", "", "append the node-scale daemons' logs (level info) to this file, to see what a slow row spent its time on")
	flag.StringVar(&c.outDir, "out", "bench/results", "directory for the markdown table and PNG chart")
	flag.StringVar(&c.nsredirect, "nsredirect", "bin/nsredirect", "nsredirect binary")
	flag.StringVar(&c.backend, "backend", "bin/demo-backend", "HTTP server binary listening on :3210")
	flag.StringVar(&c.only, "only", "", "run one part only: \"kernel\" (the in-kernel cost table, ~1 minute), \"udp\" (UDP rate and per-datagram cost, ~1 minute) or \"scale\" (the daemon at node scale, make bench-scale)")
	flag.Parse()
	c.reps, c.wrkSecs, c.iperfSecs, c.dials = 5, 5, 3, 3000
	if c.quick {
		c.reps, c.wrkSecs, c.iperfSecs, c.dials = 2, 2, 1, 500
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, c)
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

func run(ctx context.Context, c config) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: needs root for network namespaces and eBPF; run: sudo make bench", errUsage)
	}
	for _, tool := range []string{"ip", "wrk", "iperf3", "socat", "iptables"} {
		if _, err := lookPath(tool); err != nil {
			return fmt.Errorf("%w: %s is not installed; run: sudo make deps", errUsage, tool)
		}
	}
	for _, b := range []string{c.nsredirect, c.backend} {
		if _, err := os.Stat(b); err != nil {
			return fmt.Errorf("%w: %s not found; run: make build", errUsage, b)
		}
	}
	e := newEnv(ctx, c)
	defer e.close()
	if c.only == "kernel" {
		k, err := measureKernelCost(e)
		if err != nil {
			return err
		}
		fmt.Print("\n" + machine() + "\n" + renderKernelCost(k))
		return nil
	} else if c.only == "scale" {
		s, err := measureScale(e)
		if s != nil && len(s.rows) > 0 {
			// The rows measured before a mode failed are still worth seeing.
			fmt.Print("\n" + machine() + "\n" + renderScale(s))
		}
		return err
	} else if c.only == "udp" {
		u, err := measureUDP(e)
		if err != nil {
			return err
		}
		fmt.Print("\n" + machine() + "\n" + renderUDP(u))
		return nil
	} else if c.only != "" {
		return fmt.Errorf("%w: --only %q: want kernel, udp or scale", errUsage, c.only)
	}
	r, err := measure(e)
	if err != nil {
		return err
	}
	return report(c, r)
}

// machine describes where the numbers come from.
func machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "model name") {
				model = strings.TrimSpace(strings.SplitN(line, ":", 2)[1])
				break
			}
		}
	}
	var u syscall.Utsname
	_ = syscall.Uname(&u)
	rel := make([]byte, 0, len(u.Release))
	for _, ch := range u.Release {
		if ch == 0 {
			break
		}
		rel = append(rel, byte(ch))
	}
	return fmt.Sprintf("%s, %d cores, Linux %s, %s, %s", model, runtime.NumCPU(), rel, time.Now().UTC().Format("2006-01-02 15:04 UTC"), commit())
}

// commit names the checkout measured (`make bench` builds bin/ from it
// first), so a figure carries the code it came from.
func commit() string {
	out, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return "commit unknown (not a git checkout)"
	}
	c := "commit " + strings.TrimSpace(string(out))
	if exec.Command("git", "diff", "--quiet", "HEAD", "--", ".").Run() != nil {
		c += " with uncommitted changes"
	}
	return c
}

func resultPaths(dir string, stamp string) (md, png, latestMD, latestPNG string) {
	return filepath.Join(dir, "results-"+stamp+".md"), filepath.Join(dir, "results-"+stamp+".png"),
		filepath.Join(dir, "latest.md"), filepath.Join(dir, "latest.png")
}
