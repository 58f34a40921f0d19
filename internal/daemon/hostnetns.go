package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// ErrHostNetnsUnknown: the identity of the host's netns could not be
// found, so no target can be proven not to be it. Every mode refuses to
// redirect then (fails closed); `run --allow-host-netns` is the way past.
var ErrHostNetnsUnknown = errors.New("cannot identify the host network namespace")

// Inode numbers of the initial namespaces (include/linux/proc_ns.h,
// include/uapi/linux/nsfs.h). The pid one is fixed since Linux 3.8. The net
// one only since commit 9b0240b3ccc3 ("netns: use stable inode number for
// initial mount ns", queued for 6.17): before it, init_net's inode is
// allocated like every other namespace's, by proc_alloc_inum from
// 0xF0000000 up, so on any kernel a netns with this inode is init_net, but
// on older ones init_net does not have it.
const (
	initNetIno = 0xEFFFFFF9
	initPidIno = 0xEFFFFFFC
)

// fixedInitNetSince is the first release relied on to number init_net
// initNetIno without a witness (see FindHostNetns): 6.18 is the first seen
// to (the commit went in for 6.17; one release of margin is cheap, as a
// witness still proves it there).
var fixedInitNetSince = [2]int{6, 18}

// HostNetnsOptions change how FindHostNetns looks.
type HostNetnsOptions struct {
	// IgnoreFixedInode makes it look as on a kernel whose init_net has no
	// fixed inode: only the host's processes can tell then. A test knob
	// (NSREDIRECT_HOST_NETNS=processes); it can only make the answer
	// "unknown" more often, never call a netns not the host's.
	IgnoreFixedInode bool
	// Release is the kernel release (uname -r); "" reads it.
	Release string
}

// FindHostNetns returns the identity of the host's network namespace, from
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
// Otherwise the error, wrapping ErrHostNetnsUnknown, says why: the caller
// refuses to redirect (fail closed) and tells the user what to grant.
func FindHostNetns(proc string, o HostNetnsOptions) (netnsx.LiveID, error) {
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
		return netnsx.LiveID{Dev: st.Dev, Ino: st.Ino}, nil
	}
	if !o.IgnoreFixedInode {
		var dev uint64
		for _, p := range []string{"/proc/thread-self/ns/net", filepath.Join(proc, "2", "ns", "net")} {
			var st unix.Stat_t
			if unix.Stat(p, &st) != nil {
				continue
			}
			if st.Ino == initNetIno {
				return netnsx.LiveID{Dev: st.Dev, Ino: st.Ino}, nil
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
			return netnsx.LiveID{Dev: dev, Ino: initNetIno}, nil
		}
		why = append(why, fmt.Sprintf("Linux %s gives the host network namespace no fixed inode (that needs %d.%d)", release, fixedInitNetSince[0], fixedInitNetSince[1]))
	}
	if len(why) == 0 {
		why = append(why, "no process of the host is visible under "+proc)
	}
	return netnsx.LiveID{}, fmt.Errorf("%w: %s", ErrHostNetnsUnknown, strings.Join(why, "; "))
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
