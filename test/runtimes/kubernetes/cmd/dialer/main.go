// Command dialer runs inside the test pods of the single-node cluster test
// (images FROM scratch have no shell or curl).
//
//	dialer get URL               GET URL, print the status line and body, exit 1 on failure
//	dialer loop ADDR STOPFILE    GET http://ADDR/ in a loop until STOPFILE exists (at most
//	                             5 minutes, 2,000,000 connects), then print "ok=N refused=N other=N"
//	dialer touch FILE            create FILE
//	dialer first DIRECT REDIRECT GET http://DIRECT/ and http://REDIRECT/ every 2 ms from the
//	                             container's start until both answered (at most 30 s), print
//	                             "direct_ms=N redirect_ms=N", then wait like "wait"
//	dialer wait                  block until SIGTERM or SIGINT
package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) == 2 && os.Args[1] == "wait" {
		wait()
	}
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: dialer get URL | loop ADDR STOPFILE | touch FILE")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "get":
		c := &http.Client{Timeout: 5 * time.Second}
		resp, err := c.Get(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		fmt.Printf("%s %s", resp.Status, b)
	case "loop":
		loop(os.Args[2], os.Args[3])
	case "first":
		first(os.Args[2], os.Args[3])
		wait()
	case "touch":
		if err := os.WriteFile(os.Args[2], nil, 0o600); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	default:
		os.Exit(2)
	}
}

func wait() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	os.Exit(0)
}

func first(direct, redirect string) {
	start := time.Now()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: time.Second}
	got := func(addr string) bool {
		resp, err := c.Get("http://" + addr + "/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	var d, r time.Duration
	for (d == 0 || r == 0) && time.Since(start) < 30*time.Second {
		if d == 0 && got(direct) {
			d = time.Since(start)
		}
		if r == 0 && got(redirect) {
			r = time.Since(start)
		}
		time.Sleep(2 * time.Millisecond) // the polling interval, bounded by the 30 s above
	}
	ms := func(d time.Duration) int64 {
		if d == 0 {
			return -1 // never answered
		}
		return d.Milliseconds()
	}
	fmt.Printf("direct_ms=%d redirect_ms=%d\n", ms(d), ms(r))
}

func loop(addr, stop string) {
	tr := &http.Transport{DisableKeepAlives: true} // one connect() per request
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	var ok, refused, other int
	var lastErr error
	deadline := time.Now().Add(5 * time.Minute)
	fmt.Println("looping")
	for n := 0; n < 2_000_000 && time.Now().Before(deadline); n++ {
		if n%64 == 0 {
			if _, err := os.Stat(stop); err == nil {
				break
			}
		}
		resp, err := c.Get("http://" + addr + "/")
		switch {
		case err == nil:
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				ok++
			} else {
				other++
			}
		case errors.Is(err, syscall.ECONNREFUSED):
			refused++
			lastErr = err
		default:
			other++
			lastErr = err
		}
	}
	fmt.Printf("ok=%d refused=%d other=%d", ok, refused, other)
	if lastErr != nil {
		fmt.Printf(" last error: %v", lastErr)
	}
	fmt.Println()
}
