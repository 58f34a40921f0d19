// Command demo-backend stands in for a self-hosted Convex backend: it serves
// HTTP on :3210 and, like a Convex Node action, has an endpoint that calls
// http://127.0.0.1 (port 80) from inside its own network namespace.
//
//	GET /          "hello from demo-backend on <listen addr>"
//	GET /action    fetches ACTION_URL (default http://127.0.0.1/) and reports
//	               the status and the first line of the body, or the error.
//	GET /healthz   200 "ok"
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	listen := flag.String("listen", envOr("LISTEN", ":3210"), "address to serve HTTP on")
	actionURL := flag.String("action-url", envOr("ACTION_URL", "http://127.0.0.1/"), "URL that /action fetches, as a Convex action fetches http://127.0.0.1")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo-backend: listen on %s: %v (is another server using the port?)\n", *listen, err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: handler(ln.Addr().String(), *actionURL), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	fmt.Printf("demo-backend: serving on %s\n", ln.Addr())
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintf(os.Stderr, "demo-backend: %v\n", err)
		os.Exit(1)
	}
}

func handler(addr, actionURL string) http.Handler {
	client := &http.Client{Timeout: 5 * time.Second}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/action", func(w http.ResponseWriter, r *http.Request) {
		resp, err := client.Get(actionURL)
		if err != nil {
			w.WriteHeader(http.StatusBadGateway)
			fmt.Fprintf(w, "action: GET %s failed: %v\n", actionURL, err)
			return
		}
		defer resp.Body.Close()
		line, _ := bufio.NewReader(io.LimitReader(resp.Body, 4096)).ReadString('\n')
		fmt.Fprintf(w, "action: GET %s -> %d %s\n", actionURL, resp.StatusCode, strings.TrimSpace(line))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// Connection: close clients (wrk in the benchmark) get a short body.
		fmt.Fprintf(w, "hello from demo-backend on %s\n", addr)
	})
	return mux
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
