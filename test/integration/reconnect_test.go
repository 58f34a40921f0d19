package integration

import (
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// TestGetpeernameAfterReconnect: a TCP socket whose redirected connect
// failed may connect again with the same fd, elsewhere. Its getpeername then
// reports where it really is, not what it dialled the first time: the
// connect programs no longer delete the record on a miss (issue 14), the
// getpeername programs check it against the peer.
func TestGetpeernameAfterReconnect(t *testing.T) {
	pin := testenv.BPFFS(t)
	ns := testenv.NewNetns(t)
	// A non-loopback address inside the netns, on lo: a destination no
	// rule can match.
	if out, err := exec.Command("ip", "-n", ns.Name, "addr", "add", "10.77.0.1/32", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("ip addr add: %v %s", err, out)
	}
	if out, err := exec.Command("ip", "-n", ns.Name, "addr", "add", "fd00:77::1/128", "dev", "lo", "nodad").CombinedOutput(); err != nil {
		t.Fatalf("ip addr add: %v %s", err, out)
	}
	testenv.Server(t, ns, ":3211") // all addresses, both families; nothing on :3210
	testenv.Daemon(t, pin, "run", "--netns", ns.Path, "--redirect", "80=3210", "--redirect", "81=3211")

	for _, c := range []struct{ first, then, want string }{
		{"127.0.0.1:80", "127.0.0.1:3211", "127.0.0.1:3211"},                            // loopback, no rule
		{"127.0.0.1:80", "10.77.0.1:3211", "10.77.0.1:3211"},                            // not loopback
		{"127.0.0.1:80", "127.0.0.1:81", "127.0.0.1:81"},                                // another rule: its record
		{"[::1]:80", "[::1]:3211", "[::1]:3211"},                                        // v6, loopback, no rule
		{"[::1]:80", "[fd00:77::1]:3211", "[fd00:77::1]:3211"},                          // v6, not loopback
		{"[::ffff:127.0.0.1]:80", "[::ffff:127.0.0.1]:3211", "[::ffff:127.0.0.1]:3211"}, // v4-mapped, no rule
		{"[::1]:80", "[::ffff:127.0.0.1]:81", "[::ffff:127.0.0.1]:81"},
	} {
		got, err := reconnect(ns, c.first, c.then)
		if err != nil {
			t.Errorf("%s then %s: %v", c.first, c.then, err)
		} else if got != c.want {
			t.Errorf("connect %s (refused), then %s: getpeername %s, want %s", c.first, c.then, got, c.want)
		}
	}
}

// reconnect connects one socket to first, which must be refused (redirected
// to a port nothing listens on), then to then, and returns its getpeername.
func reconnect(ns testenv.Netns, first, then string) (string, error) {
	a, b := netip.MustParseAddrPort(first), netip.MustParseAddrPort(then)
	sa := func(ap netip.AddrPort) unix.Sockaddr {
		if a.Addr().Is4() {
			return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
		}
		return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	}
	family := unix.AF_INET6
	if a.Addr().Is4() {
		family = unix.AF_INET
	}
	var peer string
	err := ns.Target().Do(func() error {
		fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Connect(fd, sa(a)); !errors.Is(err, unix.ECONNREFUSED) {
			return errors.New("first connect " + first + ": want refused, got " + errString(err))
		}
		if err := unix.Connect(fd, sa(b)); err != nil {
			return err
		}
		p, err := unix.Getpeername(fd)
		if err != nil {
			return err
		}
		switch p := p.(type) {
		case *unix.SockaddrInet4:
			peer = netip.AddrPortFrom(netip.AddrFrom4(p.Addr), uint16(p.Port)).String()
		case *unix.SockaddrInet6:
			peer = net.JoinHostPort(netip.AddrFrom16(p.Addr).String(), strconv.Itoa(p.Port))
		}
		return nil
	})
	return peer, err
}

func errString(err error) string {
	if err == nil {
		return "success"
	}
	return err.Error()
}
