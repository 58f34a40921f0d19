package netnsx

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrHostUnknown: the identity of the host's netns could not be found, so
// no target can be proven not to be it. Every mode refuses to redirect then
// (fails closed); `run --allow-host-netns` is the way past.
var ErrHostUnknown = errors.New("cannot identify the host network namespace")

// Inode numbers of the initial namespaces (include/linux/proc_ns.h,
// include/uapi/linux/nsfs.h). The pid one is fixed since Linux 3.8. The net
// one only since commit 9b0240b3ccc3 ("netns: use stable inode number for
// initial mount ns", queued for 6.17): before it, init_net's inode is
// allocated like every other namespace's, by proc_alloc_inum from
// 0xF0000000 up, so on any kernel a netns with this inode is init_net, but
// on older ones init_net does not have it.
const (
	// InitNetIno: a netns with this inode is the host's (init_net).
	InitNetIno = 0xEFFFFFF9
	initPidIno = 0xEFFFFFFC
)

// fixedInitNetSince is the first release relied on to number init_net
// InitNetIno without a witness (see FindHost): 6.18 is the first seen
// to (the commit went in for 6.17; one release of margin is cheap, as a
// witness still proves it there).
var fixedInitNetSince = [2]int{6, 18}

// HostOptions change how FindHost looks.
type HostOptions struct {
	// IgnoreFixedInode makes it look as on a kernel whose init_net has no
	// fixed inode: only the host's processes can tell then. A test knob
	// (NSREDIRECT_HOST_NETNS=processes); it can only make the answer
	// "unknown" more often, never call a netns not the host's.
	IgnoreFixedInode bool
	// Release is the kernel release (uname -r); "" reads it.
	Release string
}

// FindHost returns the identity of the host's network namespace, from
// the first of:
//   - the netns of the host's init (<proc>/1) or of kthreadd (<proc>/2,
//     always in init_net), each only while its pid namespace is the initial
//     one (a container's pid 1 is not the host's). Looking at them needs
//     CAP_SYS_PTRACE: the kernel checks ptrace read access, and they hold
//     capabilities the daemon lacks;
//   - a netns seen with init_net's fixed inode (kthreadd's, or our own when
//     we run in the host netns): that proves the kernel numbers init_net so;
//   - a kernel release of fixedInitNetSince or later: init_net has the
//     fixed inode.
//
// Otherwise the error, wrapping ErrHostUnknown, says why: the caller
// refuses to redirect (fail closed) and tells the user what to grant.
func FindHost(proc string, o HostOptions) (LiveID, error) {
	var why []string
	for _, pid := range []string{"1", "2"} {
		dir := filepath.Join(proc, pid)
		if pid == "2" {
			if comm, err := os.ReadFile(filepath.Join(dir, "comm")); err != nil || strings.TrimSpace(string(comm)) != "kthreadd" {
				continue
			}
		}
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(dir, "ns", "pid"), &st); err != nil {
			if !errors.Is(err, unix.ENOENT) {
				why = append(why, lookErr(dir+"/ns/pid", err))
			}
			continue
		}
		if st.Ino != initPidIno {
			why = append(why, dir+" is not in the initial pid namespace (the host's processes are not visible here)")
			continue
		}
		if err := unix.Stat(filepath.Join(dir, "ns", "net"), &st); err != nil {
			why = append(why, lookErr(dir+"/ns/net", err))
			continue
		}
		return LiveID{Dev: st.Dev, Ino: st.Ino}, nil
	}
	if !o.IgnoreFixedInode {
		var dev uint64
		for _, p := range []string{"/proc/thread-self/ns/net", filepath.Join(proc, "2", "ns", "net")} {
			var st unix.Stat_t
			if unix.Stat(p, &st) != nil {
				continue
			}
			if st.Ino == InitNetIno {
				return LiveID{Dev: st.Dev, Ino: st.Ino}, nil
			}
			if dev == 0 {
				dev = st.Dev // nsfs is one filesystem: every netns has this dev
			}
		}
		release := o.Release
		if release == "" {
			var u unix.Utsname
			if unix.Uname(&u) == nil {
				release = unix.ByteSliceToString(u.Release[:])
			}
		}
		if dev != 0 && releaseAtLeast(release, fixedInitNetSince) {
			return LiveID{Dev: dev, Ino: InitNetIno}, nil
		}
		why = append(why, fmt.Sprintf("Linux %s gives the host network namespace no fixed inode (that needs %d.%d)", release, fixedInitNetSince[0], fixedInitNetSince[1]))
	}
	if len(why) == 0 {
		why = append(why, "no process of the host is visible under "+proc)
	}
	return LiveID{}, fmt.Errorf("%w: %s", ErrHostUnknown, strings.Join(why, "; "))
}

func lookErr(path string, err error) string {
	if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
		return fmt.Sprintf("%s: permission denied (looking at the host's processes needs CAP_SYS_PTRACE)", path)
	}
	return fmt.Sprintf("%s: %v", path, err)
}

// releaseAtLeast reports whether a kernel release ("6.18.44-fc", "6.1.0-30-amd64")
// is at least major.minor.
func releaseAtLeast(release string, want [2]int) bool {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return false
	}
	major, err1 := strconv.Atoi(parts[0])
	minorDigits := parts[1]
	if i := strings.IndexFunc(minorDigits, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		minorDigits = minorDigits[:i]
	}
	minor, err2 := strconv.Atoi(minorDigits)
	if err1 != nil || err2 != nil {
		return false
	}
	return major > want[0] || major == want[0] && minor >= want[1]
}

// IsProcfs reports whether path is a procfs mount, where processes and
// their netns are found.
func IsProcfs(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.PROC_SUPER_MAGIC
}

// IsHost reports whether the netns of identity a is the host's, known as
// host (FindHost): init_net's fixed inode is the host's on any kernel.
func (a ID) IsHost(host LiveID) bool { return a.Ino == InitNetIno || a.Live() == host }

// Alive reports whether some path still reaches the netns id: one of
// paths, or /proc/PID/ns/net of any process under proc, or a bind mount in
// /run/netns. Live namespaces never share an inode, so a match is that
// namespace (or, at worst, a new one that took a dead one's inode: then
// the rules are kept for a cookie nothing uses, until the next look).
func Alive(proc string, id LiveID, paths ...string) bool {
	same := func(p string) bool {
		var st unix.Stat_t
		return unix.Stat(p, &st) == nil && st.Dev == id.Dev && st.Ino == id.Ino
	}
	for _, p := range paths {
		if p != "" && same(p) {
			return true
		}
	}
	if entries, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range entries {
			if same(filepath.Join("/run/netns", e.Name())) {
				return true
			}
		}
	}
	entries, err := os.ReadDir(proc)
	if err != nil {
		return true // cannot look: not proven gone
	}
	// Not ourselves: the Go runtime may have parked our main thread in a
	// target's netns (see Target), which would keep it "alive" for good.
	// <proc>/self names us in that procfs's pid namespace.
	self, _ := os.Readlink(filepath.Join(proc, "self"))
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err == nil && e.Name() != self && same(filepath.Join(proc, e.Name(), "ns", "net")) {
			return true
		}
	}
	return false
}

// InoAlive is Alive for a netns known by its inode only (an enrollment
// record keeps no more): every netns is on the one nsfs, whose device is
// our own netns's.
func InoAlive(proc string, ino uint64) bool {
	dev, err := nsfsDev()
	if err != nil {
		return true
	}
	return Alive(proc, LiveID{Dev: dev, Ino: ino})
}

func nsfsDev() (uint64, error) {
	id, err := (Target{Spec: "self", Path: "/proc/thread-self/ns/net"}).Stat()
	if err != nil {
		return 0, err
	}
	return id.Dev, nil
}

// PIDsIn lists the processes under proc whose netns is id, ourselves
// excepted (see Alive): the processes a redirect in that netns is for.
func PIDsIn(proc string, id LiveID) []int {
	entries, err := os.ReadDir(proc)
	if err != nil {
		return nil
	}
	self, _ := os.Readlink(filepath.Join(proc, "self"))
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || e.Name() == self {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join(proc, e.Name(), "ns", "net"), &st) == nil && st.Dev == id.Dev && st.Ino == id.Ino {
			out = append(out, pid)
		}
	}
	return out
}

// InoLiveID is the LiveID of the netns of inode ino: every netns is on the
// one nsfs, whose device is our own netns's.
func InoLiveID(ino uint64) (LiveID, error) {
	dev, err := nsfsDev()
	return LiveID{Dev: dev, Ino: ino}, err
}
