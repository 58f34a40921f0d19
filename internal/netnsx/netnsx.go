// Package netnsx resolves a network-namespace target (self, a path, pid:N)
// and reads its netns cookie from inside it.
//
// Namespaces are entered only on a goroutine that locked its OS thread and
// never unlocks it: when the goroutine returns, the Go runtime throws the
// thread away, so no other goroutine can ever run in the wrong namespace.
// No namespace file descriptor is kept after a call returns, so nsredirect
// never keeps a dead namespace alive.
package netnsx

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrTarget marks a target that is malformed, missing or not a network
// namespace: bad input the user must fix.
var ErrTarget = errors.New("bad netns target")

// Target names a network namespace as the user gave it.
type Target struct {
	// Spec is the text given: "self", "pid:N" or a path.
	Spec string
	// Path is what is opened: /proc/thread-self/ns/net, /proc/N/ns/net or
	// Spec. Not /proc/self: that is the main thread's, and the Go runtime
	// parks rather than ends the main thread when a goroutine locked to it
	// exits inside a Do, leaving it in the target namespace for good.
	Path string
}

// ID identifies a namespace by its nsfs inode, cheap to compare without
// entering the namespace. Inode numbers of dead namespaces are reused at
// once, so the inode number alone cannot tell a recreated namespace from
// the old one; a second field does:
//   - for /proc/PID/ns/net (pid:N, and a host /proc's pid paths) the start
//     time of that process: a process keeps its namespace, and a reused pid
//     is a new process with a new start time;
//   - for any other path (a bind mount such as /run/netns/NAME) the inode's
//     change time: the mount keeps the inode object, and a new namespace
//     always gets a new one.
//
// The change time is no use for /proc paths: while nothing holds the
// namespace open or bind-mounted, the kernel drops its inode object and
// makes a new one, with a new change time, on the next look. Comparing it
// would re-enter such a namespace on every resync.
type ID struct {
	Dev, Ino uint64
	Ctime    unix.Timespec
	// Start is the start time (clock ticks after boot) of the process the
	// path belongs to, for /proc/PID/ns/net paths; Ctime is zero then.
	Start uint64
	// ProcIno is the inode number of PROC/PID for /proc/PID/ns/net paths:
	// the kernel gives a new process a new one even when it reuses a pid,
	// so one stat of PROC/PID tells that the process is still the one
	// Start was read from (see Target.Changed). The converse does not hold:
	// the kernel may drop and re-create a live process's inode, and then
	// the ID differs for one look, which costs a re-resolve, nothing more.
	ProcIno uint64
}

// Live identifies the namespace among those alive at one moment: live
// namespaces never share an inode number. Key by it, not by ID, to find
// targets that are one namespace through different paths.
func (a ID) Live() LiveID { return LiveID{Dev: a.Dev, Ino: a.Ino} }

// LiveID is ID without the change or start time; see ID.Live.
type LiveID struct{ Dev, Ino uint64 }

// procDir returns PROC/PID when path is PROC/PID/ns/net under any proc
// mount (a host /proc mounted elsewhere included), else "". It runs on
// every look at a target, so it is plain string work.
func procDir(path string) string {
	dir, ok := strings.CutSuffix(path, "/ns/net")
	if !ok {
		return ""
	}
	i := strings.LastIndexByte(dir, '/')
	if i < 0 || i == len(dir)-1 {
		return ""
	}
	for _, c := range dir[i+1:] {
		if c < '0' || c > '9' {
			return ""
		}
	}
	return dir
}

func (t Target) idOf(st *unix.Stat_t) ID {
	id := ID{Dev: st.Dev, Ino: st.Ino, Ctime: st.Ctim}
	switch dir := procDir(t.Path); {
	case t.Path == selfPath:
		// Our own namespace: it cannot change under us.
		id.Ctime = unix.Timespec{}
	case dir != "":
		if ino, start, err := starts.of(dir); err == nil {
			id.Ctime, id.Start, id.ProcIno = unix.Timespec{}, start, ino
		}
	}
	return id
}

// Changed reports, for the cost of one stat, whether the path may no
// longer lead to the namespace it led to when id was read: for
// /proc/PID/ns/net, PROC/PID is gone or another process (the namespace of
// a live process changes only by setns, which the next full look, Stat,
// sees); for any other path, its nsfs inode or change time differ. A
// false alarm (see ID.ProcIno) only costs a full look.
func (t Target) Changed(id ID) bool {
	var st unix.Stat_t
	if dir := procDir(t.Path); dir != "" && id.ProcIno != 0 {
		return unix.Stat(dir, &st) != nil || st.Ino != id.ProcIno
	}
	now, err := t.Stat()
	return err != nil || now != id
}

// LiveID returns the identity of the namespace the path leads to now, for
// one stat: enough to tell two paths to one namespace apart from two
// namespaces (see ID.Live), not to tell a namespace from its successor.
func (t Target) LiveID() (LiveID, error) {
	var st unix.Stat_t
	if err := unix.Stat(t.Path, &st); err != nil {
		return LiveID{}, t.openErr(err)
	}
	return LiveID{Dev: st.Dev, Ino: st.Ino}, nil
}

// startCache keeps the start time of the processes whose namespaces are
// looked at, keyed by PROC/PID and valid while the inode number of PROC/PID
// is the same (see ID.ProcIno): a look at a target costs a stat instead of
// reading and parsing PROC/PID/stat, once a second per target.
type startCache struct {
	mu sync.Mutex
	m  map[string]startEntry
}

type startEntry struct{ ino, start uint64 }

// maxStarts bounds the cache; it is emptied when full (the entries of
// exited processes are never looked up again).
const maxStarts = 8192

var starts = startCache{m: map[string]startEntry{}}

// of returns the inode number of dir (PROC/PID) and that process's start
// time, read from PROC/PID/stat only for a process not seen before.
func (c *startCache) of(dir string) (ino, start uint64, err error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return 0, 0, err
	}
	c.mu.Lock()
	e, ok := c.m[dir]
	c.mu.Unlock()
	if ok && e.ino == st.Ino {
		return e.ino, e.start, nil
	}
	start, err = ProcStart(dir)
	if err != nil {
		return 0, 0, err
	}
	// Still the same process after the read: else the start time may be
	// another's, and is not cached.
	var after unix.Stat_t
	if err := unix.Stat(dir, &after); err != nil || after.Ino != st.Ino {
		return 0, 0, fmt.Errorf("%s: the process changed while it was read", dir)
	}
	c.mu.Lock()
	if len(c.m) >= maxStarts {
		c.m = map[string]startEntry{}
	}
	c.m[dir] = startEntry{ino: st.Ino, start: start}
	c.mu.Unlock()
	return st.Ino, start, nil
}

// ProcStart reads field 22 (starttime, clock ticks after boot) of
// PROC/PID/stat. The command name, field 2, may hold spaces and
// parentheses: count from the last ')'.
func ProcStart(procPid string) (uint64, error) {
	b, err := os.ReadFile(procPid + "/stat")
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("%s/stat: no command name", procPid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("%s/stat: %d fields after the command name", procPid, len(f))
	}
	return strconv.ParseUint(f[19], 10, 64)
}

const selfPath = "/proc/thread-self/ns/net"

// ParseTarget checks the syntax of a target; it does not open it.
func ParseTarget(s string) (Target, error) {
	switch {
	case s == "":
		return Target{}, fmt.Errorf("%w: empty; use self, a path like /run/netns/NAME or /proc/PID/ns/net, or pid:N", ErrTarget)
	case s == "self":
		return Target{Spec: s, Path: selfPath}, nil
	case strings.HasPrefix(s, "pid:"):
		n, err := strconv.ParseUint(strings.TrimPrefix(s, "pid:"), 10, 31)
		if err != nil || n == 0 {
			return Target{}, fmt.Errorf("%w %q: pid:N needs a process id, e.g. pid:1234", ErrTarget, s)
		}
		return Target{Spec: s, Path: fmt.Sprintf("/proc/%d/ns/net", n)}, nil
	case strings.HasPrefix(s, "/"):
		return Target{Spec: s, Path: s}, nil
	default:
		return Target{}, fmt.Errorf("%w %q: use self, an absolute path like /run/netns/NAME or /proc/PID/ns/net, or pid:N", ErrTarget, s)
	}
}

func (t Target) String() string { return t.Spec }

// Stat returns the namespace's identity without entering it.
func (t Target) Stat() (ID, error) {
	var st unix.Stat_t
	if err := unix.Stat(t.Path, &st); err != nil {
		return ID{}, t.openErr(err)
	}
	return t.idOf(&st), nil
}

// CookieReader reads the netns cookie of the namespace the calling thread
// is in. SockoptCookie is one; on kernels before 5.14 the loader's BPF probe
// is another.
type CookieReader func() (uint64, error)

// Resolve is ResolveWith(SockoptCookie).
func (t Target) Resolve() (uint64, ID, error) {
	return t.ResolveWith(SockoptCookie)
}

// ResolveWith opens the target, checks it is a network namespace and returns
// its cookie, read by read from inside it, and its identity.
func (t Target) ResolveWith(read CookieReader) (uint64, ID, error) {
	var cookie uint64
	var id ID
	err := t.Do(func() error {
		var err error
		if cookie, err = read(); err != nil {
			return fmt.Errorf("read the cookie of netns %s: %w", t, err)
		}
		return nil
	}, func(f *os.File) error {
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err != nil {
			return err
		}
		id = t.idOf(&st)
		return nil
	})
	return cookie, id, err
}

// Do runs fn on a fresh OS thread inside the target namespace. The thread is
// discarded afterwards. opened, if given, sees the namespace file first.
func (t Target) Do(fn func() error, opened ...func(*os.File) error) error {
	f, err := os.Open(t.Path)
	if err != nil {
		return t.openErr(err)
	}
	defer f.Close()
	kind, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil || kind != unix.CLONE_NEWNET {
		return fmt.Errorf("%w %q: %s is not a network namespace; give /proc/PID/ns/net, a bind mount of one (/run/netns/NAME) or pid:N", ErrTarget, t.Spec, t.Path)
	}
	for _, o := range opened {
		if err := o(f); err != nil {
			return fmt.Errorf("netns %s: %w", t, err)
		}
	}
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the runtime ends this thread when we return.
		runtime.LockOSThread()
		if err := netns.Set(netns.NsHandle(int(f.Fd()))); err != nil {
			if errors.Is(err, unix.EPERM) {
				err = fmt.Errorf("%w (entering a netns needs CAP_SYS_ADMIN)", err)
			}
			errc <- fmt.Errorf("enter netns %s: %w", t, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func (t Target) openErr(err error) error {
	switch {
	case errors.Is(err, os.ErrNotExist):
		if strings.HasPrefix(t.Spec, "pid:") {
			return fmt.Errorf("%w %q: no process %s is visible here; check the pid, or run with the host pid namespace", ErrTarget, t.Spec, strings.TrimPrefix(t.Spec, "pid:"))
		}
		return fmt.Errorf("%w %q: %s does not exist; create it (ip netns add NAME) or give /proc/PID/ns/net of a process in it", ErrTarget, t.Spec, t.Path)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("%w %q: permission denied opening %s; run as root (or with CAP_SYS_PTRACE for other users' processes)", ErrTarget, t.Spec, t.Path)
	default:
		return fmt.Errorf("%w %q: %v", ErrTarget, t.Spec, err)
	}
}

// SockoptCookie reads the cookie of the calling thread's network namespace
// with getsockopt(SO_NETNS_COOKIE). Kernels before 5.14 answer ENOPROTOOPT.
func SockoptCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("getsockopt(SO_NETNS_COOKIE), Linux >= 5.14: %w", err)
	}
	return c, nil
}
