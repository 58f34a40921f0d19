package testenv

import (
	"os/exec"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/nsredirect/nsredirect/internal/loader"
)

// UDPServerPy is a DNS-like server: it answers every DNS query with one A
// record, 192.0.2.53, and a datagram starting "nsr:" with TAG:payload. It
// binds a dual-stack socket on [ADDR]:PORT (port 0: any free one) and prints
// the port it serves on. Arguments: ADDR PORT TAG.
const UDPServerPy = `
import socket, struct, sys
addr, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((addr, port))
print("serving on %d." % s.getsockname()[1], flush=True)
while True:
    q, peer = s.recvfrom(4096)
    if q.startswith(b"nsr:"):
        s.sendto(tag + b":" + q[4:], peer)
        continue
    if len(q) < 12:
        continue
    end = 12
    while end < len(q) and q[end] != 0:
        end += q[end] + 1
    question = q[12:end + 5]
    answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 53])
    s.sendto(q[:2] + b"\x81\x80" + struct.pack(">HHHH", 1, 1, 0, 0) + question + answer, peer)
`

// UDPClientPy sends "nsr:MSG" to HOST PORT in each of the ways applications
// do and prints what came back and from where, one line each: "unconnected
// TAG:unconnected SRC PORT", "connected ...", "peer ADDR PORT" (getpeername
// of the connected socket), and for an IPv4 HOST the same through a
// dual-stack socket to its v4-mapped form ("mapped", "mapped-connected",
// "mapped-peer").
const UDPClientPy = `
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
def show(kind, data, src):
    print(kind, data.decode(), src[0], src[1], flush=True)
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(b"nsr:unconnected", (host, port))
show("unconnected", *s.recvfrom(512))
c = socket.socket(fam, socket.SOCK_DGRAM); c.settimeout(3)
c.connect((host, port))
c.send(b"nsr:connected")
show("connected", *c.recvfrom(512))
p = c.getpeername()
print("peer", p[0], p[1], flush=True)
if fam == socket.AF_INET:
    d = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); d.settimeout(3)
    d.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    d.sendto(b"nsr:mapped", ("::ffff:" + host, port))
    show("mapped", *d.recvfrom(512))
    d.connect(("::ffff:" + host, port))
    d.send(b"nsr:mapped-connected")
    show("mapped-connected", *d.recvfrom(512))
    p = d.getpeername()
    print("mapped-peer", p[0], p[1], flush=True)
`

var servingOn = regexp.MustCompile(`serving on (\d+)\.`)

// StartUDPServer runs UDPServerPy through prefix (nil: on the host;
// `ip netns exec NAME`, `nsenter -t PID -n`: in a netns) on [addr]:port
// with tag, waits until it serves and returns its port. It is stopped at
// cleanup.
func StartUDPServer(t testing.TB, prefix []string, addr string, port int, tag string) int {
	t.Helper()
	args := append(append([]string(nil), prefix...), Tool(t, "python3"), "-c", UDPServerPy, addr, strconv.Itoa(port), tag)
	p := Start(t, exec.Command(args[0], args[1:]...))
	var m []string
	WaitFor(t, "the UDP server to serve", 30*time.Second, func() bool {
		m = servingOn.FindStringSubmatch(p.Output())
		return m != nil || p.Exited()
	})
	if m == nil {
		t.Fatalf("UDP server exited: %s", p.Output())
	}
	got, _ := strconv.Atoi(m[1])
	return got
}

// UDPProgIDs are the IDs of the UDP programs pinned in pinDir
// (prog_<hook>), which every start pins whether or not it attaches them.
func UDPProgIDs(t testing.TB, pinDir string) []int {
	t.Helper()
	var ids []int
	for _, h := range loader.UDPHookNames() {
		p, err := ebpf.LoadPinnedProgram(loader.ProgPin(pinDir, h), nil)
		if err != nil {
			t.Fatalf("pinned UDP program %s: %v", h, err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ids = append(ids, int(id))
	}
	return ids
}

// AttachedOf lists which of ids the kernel reports attached at the cgroup2
// root (BPF_PROG_QUERY), by name.
func AttachedOf(t testing.TB, ids []int) []string {
	t.Helper()
	at := AttachedAtRoot(t)
	var out []string
	for _, id := range ids {
		if name, ok := at[id]; ok {
			out = append(out, name)
		}
	}
	return out
}

// WaitUnattached waits until none of ids is attached at the cgroup2 root:
// the kernel detaches a link whose last reference went from a deferred work
// item. within caps a hang.
func WaitUnattached(t testing.TB, ids []int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for left := AttachedOf(t, ids); len(left) > 0; left = AttachedOf(t, ids) {
		if time.Now().After(deadline) {
			t.Errorf("programs still attached at the cgroup2 root %s after their links went: %v", within, left)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
