package loader

import (
	"encoding/binary"
	"fmt"

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
