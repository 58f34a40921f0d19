package loader

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// ErrEnvironment marks a host that cannot run nsredirect as configured:
// missing privileges, kernel features, cgroup2 or bpffs. The message says
// what to change.
var ErrEnvironment = errors.New("environment")

func envErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrEnvironment, fmt.Sprintf(format, args...))
}

// Capabilities the daemon needs. CAP_SYS_ADMIN covers entering other
// network namespaces and mounting bpffs; CAP_BPF may be replaced by it on
// kernels older than 5.8.
var neededCaps = []struct {
	bit  uint
	name string
	why  string
}{
	{unix.CAP_BPF, "CAP_BPF", "load eBPF programs and maps"},
	{unix.CAP_NET_ADMIN, "CAP_NET_ADMIN", "attach cgroup socket programs"},
	{unix.CAP_SYS_ADMIN, "CAP_SYS_ADMIN", "enter the target network namespace and mount bpffs"},
}

// CheckPrivileges names the first missing capability.
func CheckPrivileges() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return envErr("read capabilities: %v", err)
	}
	has := func(bit uint) bool { return data[bit/32].Effective&(1<<(bit%32)) != 0 }
	for _, c := range neededCaps {
		// The kernel's bpf_capable(): CAP_SYS_ADMIN stands in for CAP_BPF.
		// Docker 20.10 (Debian 12's) cannot grant CAP_BPF at all.
		if c.bit == unix.CAP_BPF && has(unix.CAP_SYS_ADMIN) {
			continue
		}
		if !has(c.bit) {
			return envErr("missing %s (needed to %s); run as root, or grant it (docker: cap_add: [%s], kubernetes: securityContext.capabilities.add)",
				c.name, c.why, strings.TrimPrefix(c.name, "CAP_"))
		}
	}
	return nil
}

// kernelProbe checks one kernel feature; what names it with the first Linux
// version that has it.
type kernelProbe struct {
	what string
	err  func() error
}

// kernelQueries are the questions the probes ask the kernel; the host's
// are hostQueries, tests ask a kernel that lacks a feature.
type kernelQueries struct {
	progType func(ebpf.ProgramType) error
	mapType  func(ebpf.MapType) error
	helper   func(ebpf.ProgramType, asm.BuiltinFunc) error
	hook     func(ebpf.AttachType) error
}

func hostQueries() kernelQueries {
	return kernelQueries{
		progType: features.HaveProgramType,
		mapType:  features.HaveMapType,
		helper:   features.HaveProgramHelper,
		hook:     probeHook,
	}
}

// kernelProbes are the kernel features nsredirect needs.
// getsockopt(SO_NETNS_COOKIE) (5.14) is not one: without it the netns cookie
// is learnt through a BPF probe (NewCookieSource), which needs
// bpf_get_socket_cookie in connect4.
func kernelProbes(q kernelQueries) []kernelProbe {
	hooks := func(ats ...ebpf.AttachType) func() error {
		return func() error {
			for _, at := range ats {
				if err := q.hook(at); err != nil {
					return err
				}
			}
			return nil
		}
	}
	return []kernelProbe{
		{"cgroup sock_addr programs (Linux >= 4.17)", func() error { return q.progType(ebpf.CGroupSockAddr) }},
		{"BPF_MAP_TYPE_SK_STORAGE (Linux >= 5.2)", func() error { return q.mapType(ebpf.SkStorage) }},
		{"bpf_sk_storage_get in cgroup/connect programs (Linux >= 5.3)", func() error {
			return q.helper(ebpf.CGroupSockAddr, asm.FnSkStorageGet)
		}},
		{"bpf_get_socket_cookie in cgroup/connect programs (Linux >= 4.19)", func() error {
			return q.helper(ebpf.CGroupSockAddr, asm.FnGetSocketCookie)
		}},
		{"bpf_get_netns_cookie in cgroup/connect programs (Linux >= 5.7)", func() error {
			return q.helper(ebpf.CGroupSockAddr, asm.FnGetNetnsCookie)
		}},
		// UDP: sendmsg (4.18) and recvmsg (5.2), attached only while a UDP
		// rule is live, but probed up front like the rest.
		{"cgroup/recvmsg4 and recvmsg6 hooks for UDP (Linux >= 5.2)", hooks(ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCGroupUDP6Recvmsg)},
		// cgroup bpf_links and link.Update (5.7) come with it.
		{"cgroup/getpeername4 and getpeername6 hooks (Linux >= 5.8)", hooks(ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername)},
		{"bpf_get_socket_cookie and bpf_get_netns_cookie in cgroup/sock programs (Linux >= 5.8)", func() error {
			if err := q.helper(ebpf.CGroupSock, asm.FnGetSocketCookie); err != nil {
				return err
			}
			return q.helper(ebpf.CGroupSock, asm.FnGetNetnsCookie)
		}},
		// The last feature to arrive: what deletes the record of a
		// redirected socket when it is closed.
		{"cgroup/sock_release hook (Linux >= 5.9)", hooks(ebpf.AttachCgroupInetSockRelease)},
	}
}

// CheckKernel probes for every kernel feature the programs use and names the
// first one missing, with the Linux version that added it.
func CheckKernel() error {
	if err := removeMemlock(); err != nil {
		return err
	}
	return checkProbes(kernelProbes(hostQueries()))
}

func checkProbes(probes []kernelProbe) error {
	for _, p := range probes {
		if err := p.err(); err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				return envErr("this kernel (%s) lacks %s; nsredirect needs Linux >= %s, upgrade the kernel", kernelRelease(), p.what, MinLinux)
			}
			if errors.Is(err, unix.EPERM) {
				return envErr("probing %s: permission denied; run as root with CAP_BPF and CAP_NET_ADMIN", p.what)
			}
			return envErr("probing %s: %v", p.what, err)
		}
	}
	return nil
}

// removeMemlock lifts RLIMIT_MEMLOCK where the kernel charges eBPF maps to
// it (before 5.11; later kernels use memcg and it does nothing).
func removeMemlock() error {
	if err := rlimit.RemoveMemlock(); err != nil {
		return envErr("this kernel (%s, before 5.11) charges eBPF maps to RLIMIT_MEMLOCK and raising it failed (%v); raise the limit (ulimit -l unlimited, systemd LimitMEMLOCK=infinity, docker --ulimit memlock=-1) or grant CAP_SYS_RESOURCE", kernelRelease(), err)
	}
	return nil
}

// MinLinux is the oldest Linux with every feature the probes ask for.
const MinLinux = "5.9"

// probeHook loads a do-nothing cgroup program for attach type at (a
// cgroup/sock one for sock_release, sock_addr for the rest): a kernel that
// lacks the hook refuses the expected attach type at load.
func probeHook(at ebpf.AttachType) error {
	typ := ebpf.CGroupSockAddr
	if at == ebpf.AttachCgroupInetSockRelease {
		typ = ebpf.CGroupSock
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       typ,
		AttachType: at,
		License:    "Dual BSD/GPL",
		Instructions: asm.Instructions{
			asm.LoadImm(asm.R0, 1, asm.DWord),
			asm.Return(),
		},
	})
	if errors.Is(err, unix.EINVAL) {
		return ebpf.ErrNotSupported
	}
	if err != nil {
		return err
	}
	return prog.Close()
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown release"
	}
	return "Linux " + unix.ByteSliceToString(u.Release[:])
}

// FindCgroup2 returns the first cgroup2 mount point in mountinfo. On hybrid
// hosts that is /sys/fs/cgroup/unified, not /sys/fs/cgroup.
func FindCgroup2(mountinfo string) (string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return "", envErr("read %s: %v", mountinfo, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		fields := strings.Fields(sc.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return unescapeMount(fields[4]), nil
			}
		}
	}
	return "", envErr("no cgroup2 filesystem is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or pass --cgroup")
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// Cgroup2Root is the one rule every mode follows to pick where the programs
// attach. An empty path means the first cgroup2 mount in mountinfo. A path
// that is not cgroup2 but whose unified/ is (a hybrid host's /sys/fs/cgroup,
// bound whole into a container or a pod) is used through unified/, and said
// so in the log. The result must be the root of the cgroup2 hierarchy
// (CheckCgroup2).
func Cgroup2Root(path, mountinfo string, log logrus.FieldLogger) (string, error) {
	if path == "" {
		found, err := FindCgroup2(mountinfo)
		if err != nil {
			return "", err
		}
		path = found
	}
	if !isCgroup2(path) && isCgroup2(filepath.Join(path, "unified")) {
		unified := filepath.Join(path, "unified")
		log.WithFields(logrus.Fields{"cgroup": path, "attach_at": unified}).Info("cgroup is a hybrid (v1 + v2) hierarchy; attaching at its cgroup2 part")
		path = unified
	}
	if err := CheckCgroup2(path); err != nil {
		return "", err
	}
	return path, nil
}

func isCgroup2(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// CheckCgroup2 checks that path is the root of the cgroup2 hierarchy:
// programs attached at a sub-cgroup miss every connect outside it. The
// kernel marks the root itself, whatever the path or mount it is seen
// through (a bind mount, a private cgroup namespace): every cgroup but the
// root has a cgroup.type file.
func CheckCgroup2(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return envErr("cgroup %q: %v; pass the cgroup2 mount point, e.g. --cgroup /sys/fs/cgroup/unified", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return envErr("cgroup %q is not a cgroup2 filesystem; pass the cgroup2 mount point (see `grep cgroup2 /proc/mounts`)", path)
	}
	if _, err := os.Stat(filepath.Join(path, "cgroup.procs")); err != nil {
		return envErr("cgroup %q is not a cgroup directory (%v); pass the cgroup2 mount point (see `grep cgroup2 /proc/mounts`)", path, err)
	}
	switch _, err := os.Stat(filepath.Join(path, "cgroup.type")); {
	case err == nil:
		return envErr("cgroup %q is a sub-cgroup, not the root of the cgroup2 hierarchy, so connects outside it would not be redirected; pass the cgroup2 mount point (see `grep cgroup2 /proc/mounts`) or mount the host's whole cgroup2 (docker: -v /sys/fs/cgroup:/host/cgroup2:ro)", path)
	case !errors.Is(err, fs.ErrNotExist):
		return envErr("cgroup %q: %v", path, err)
	}
	return nil
}

// CheckBPFFS makes sure dir's parent is a bpffs already, mounting none: a
// daemon in a pod needs the node's, which outlives the pod for a successor
// to adopt the pins (one it mounted would vanish with its mount namespace).
func CheckBPFFS(dir string) error {
	parent := filepath.Dir(filepath.Clean(dir))
	var st unix.Statfs_t
	if !filepath.IsAbs(dir) || unix.Statfs(parent, &st) != nil || st.Type != unix.BPF_FS_MAGIC {
		return envErr("pin dir %q: %s is not a bpffs", dir, parent)
	}
	return nil
}

// EnsureBPFFS makes sure dir's parent is a bpffs. At the standard
// /sys/fs/bpf it mounts one, as Cilium's agent does; anywhere else it says
// how to.
func EnsureBPFFS(dir string) error {
	if !filepath.IsAbs(dir) {
		return envErr("pin dir %q is not an absolute path; use e.g. %s", dir, DefaultPinDir)
	}
	parent := filepath.Dir(filepath.Clean(dir))
	var st unix.Statfs_t
	if err := unix.Statfs(parent, &st); err != nil {
		return envErr("pin dir %q: parent %s: %v; mount a bpffs there (mount -t bpf bpf %s)", dir, parent, err, parent)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if parent != "/sys/fs/bpf" {
		return envErr("pin dir %q is not on a bpffs; mount one first (mount -t bpf bpf %s) or use --pin-dir %s", dir, parent, DefaultPinDir)
	}
	if err := unix.Mount("bpf", parent, "bpf", 0, "mode=0700"); err != nil {
		return envErr("no bpffs at %s and mounting one failed (%v); mount it on the host (mount -t bpf bpf /sys/fs/bpf) and bind it in", parent, err)
	}
	return nil
}
