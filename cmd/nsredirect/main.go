// Command nsredirect redirects a loopback address:port inside a network
// namespace to another port, with eBPF at connect() time.
package main

import (
	"context"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/nsredirect/nsredirect/internal/cli"
)

// The main goroutine keeps the main thread for itself. The runtime cannot end
// the main thread, so a goroutine locked to it that exits inside another
// network namespace (netnsx.Do) would leave it parked there for the
// process's life, holding a container's netns alive; locked here, no other
// goroutine ever runs on it.
func init() { runtime.LockOSThread() }

// main only waits: the command runs on a goroutine of its own. A goroutine
// locked to a thread costs a hand-over between two threads every time it
// wakes, and a daemon's loop wakes every second for its whole life.
func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	done := make(chan int)
	go func() { done <- cli.Main(ctx, os.Args[1:], cli.IO{Stdout: os.Stdout, Stderr: os.Stderr}) }()
	code := <-done
	stop()
	os.Exit(code)
}
