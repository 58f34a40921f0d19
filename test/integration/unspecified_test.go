package integration

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

const pyUnspecifiedMapped = `
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.connect(("::ffff:0.0.0.0", 80))
print("peer", s.getpeername()[0], s.getpeername()[1])
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
print(s.recv(4096).decode(errors="replace"))
s.close()
`

// TestUnspecifiedDestRedirected: Linux delivers connect(0.0.0.0:PORT) and
// connect([::]:PORT) to loopback, so a spec without FROM_ADDR covers them
// (and ::ffff:0.0.0.0 on dual-stack sockets), with getpeername reporting
// what was dialled.
func TestUnspecifiedDestRedirected(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	testenv.Server(t, ns, ":3210")
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210")

	for _, url := range []string{"http://0.0.0.0:80/", "http://[::]:80/"} {
		if got := curl(t, ns, url); !strings.Contains(got, "demo-backend") {
			t.Errorf("curl %s = %q, want the backend on :3210", url, got)
		}
	}
	// Go dials: getpeername (net.Conn.RemoteAddr) reports the dialled
	// address and port, not where the connect went. "tcp" to [::] is a
	// dual-stack (IPV6_V6ONLY=0) socket; the dial stays on this goroutine
	// (no fallback race to 0.0.0.0 on another thread, outside the netns).
	for _, tc := range []struct{ network, addr string }{
		{"tcp", "0.0.0.0:80"}, {"tcp", "[::]:80"}, {"tcp4", "0.0.0.0:80"}, {"tcp6", "[::]:80"},
	} {
		var peer string
		err := ns.Target().Do(func() error {
			d := net.Dialer{Timeout: 2 * time.Second, FallbackDelay: -1}
			c, err := d.Dial(tc.network, tc.addr)
			if err != nil {
				return err
			}
			defer c.Close()
			peer = c.RemoteAddr().String()
			return nil
		})
		if err != nil || peer != tc.addr {
			t.Errorf("%s dial %s: peer %s, %v; want %s", tc.network, tc.addr, peer, err, tc.addr)
		}
	}
	got := mustClient(t, ns, testenv.Tool(t, "python3"), "-c", pyUnspecifiedMapped)
	if !strings.Contains(got, "peer ::ffff:0.0.0.0 80") || !strings.Contains(got, "demo-backend") {
		t.Errorf("v4-mapped ::ffff:0.0.0.0 on a dual-stack socket: %q; want the backend, peer ::ffff:0.0.0.0 port 80", got)
	}
	if n := redirects(t, pin, ns.Path); n < 7 {
		t.Errorf("status counts %d redirects, want at least the 7 connects made", n)
	}
}
