package loader

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

const (
	lockEx = unix.LOCK_EX
	lockSh = unix.LOCK_SH
)

func htons(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func nativeWord(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }

func ebpfCPUs() int {
	n, err := ebpf.PossibleCPU()
	if err != nil || n < 1 {
		return 1
	}
	return n
}

// inodeOf returns the inode number of a cgroup2 directory, which is the
// cgroup id the kernel reports for links attached to it.
func inodeOf(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return 0, fmt.Errorf("not a directory")
	}
	return st.Ino, nil
}

// The two bpf(2) commands the per-second link check makes, and the part of
// their attributes and of struct bpf_link_info it reads
// (include/uapi/linux/bpf.h). cilium/ebpf's LoadPinnedLink and Info would
// cost five system calls per link (a readlink of /proc/self/fd among them)
// where these need two and a close.
type objGetAttr struct {
	pathname  uint64
	bpfFD     uint32
	fileFlags uint32
}

type objInfoAttr struct {
	bpfFD   uint32
	infoLen uint32
	info    uint64
}

// cgroupLinkInfo is struct bpf_link_info up to its cgroup member.
type cgroupLinkInfo struct {
	typ, id, progID, _ uint32
	cgroupID           uint64
	attachType         uint32
	_                  uint32
}

// bpfLinkTypeCgroup is BPF_LINK_TYPE_CGROUP.
const bpfLinkTypeCgroup = 3

// pinnedCgroupLinkAttached reports whether path is a pinned cgroup link of
// attach type at that is still attached (its cgroup id is not 0), and the
// program it runs (foreign.go: Heal checks it is ours). false means "not proven": missing, detached, or anything unexpected; the caller
// then looks closer (linkAttached) under the pin dir's lock.
func pinnedCgroupLinkAttached(path string, at ebpf.AttachType) (ebpf.ProgramID, bool) {
	p, err := unix.BytePtrFromString(path)
	if err != nil {
		return 0, false
	}
	get := objGetAttr{pathname: uint64(uintptr(unsafe.Pointer(p)))}
	fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET, uintptr(unsafe.Pointer(&get)), unsafe.Sizeof(get))
	runtime.KeepAlive(p)
	if errno != 0 {
		return 0, false
	}
	defer unix.Close(int(fd))
	var info cgroupLinkInfo
	attr := objInfoAttr{bpfFD: uint32(fd), infoLen: uint32(unsafe.Sizeof(info)), info: uint64(uintptr(unsafe.Pointer(&info)))}
	_, _, errno = unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET_INFO_BY_FD, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(&info)
	if errno != 0 || info.typ != bpfLinkTypeCgroup || info.cgroupID == 0 || info.attachType != uint32(at) {
		return 0, false
	}
	return ebpf.ProgramID(info.progID), true
}
