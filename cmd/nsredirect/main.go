// Command nsredirect redirects a loopback address:port inside a network
// namespace to another port, with eBPF at connect() time.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/nsredirect/nsredirect/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], cli.IO{Stdout: os.Stdout, Stderr: os.Stderr})
	stop()
	os.Exit(code)
}
