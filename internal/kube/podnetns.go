// Package kube finds Kubernetes pods' network namespaces on a node without
// linking any container runtime: kubelet names every pod's cgroup after the
// pod UID, with containerd, CRI-O and dockershim alike, so a process whose
// /proc/PID/cgroup names the UID is in the pod, and its /proc/PID/ns/net is
// the pod's netns (all containers of a pod, pause included, share it).
package kube

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// ErrNoPodProcess means no process of the pod is visible under the proc
// root: the sandbox is not running (yet), or the host /proc is not mounted.
var ErrNoPodProcess = errors.New("no process of the pod found")

var uidRe = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// podOfCgroup returns the UID of the pod whose cgroup path is in, or "",
// in either of kubelet's layouts:
//
//	cgroupfs: /kubepods/burstable/pod<uid>/<container-id>
//	systemd:  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope
func podOfCgroup(path string) string {
	for _, seg := range strings.Split(path, "/") {
		if uid, ok := strings.CutPrefix(seg, "pod"); ok && uidRe.MatchString(uid) {
			return uid
		}
		if strings.HasPrefix(seg, "kubepods") && strings.HasSuffix(seg, ".slice") {
			if i := strings.LastIndex(seg, "-pod"); i >= 0 {
				uid := strings.ReplaceAll(strings.TrimSuffix(seg[i+len("-pod"):], ".slice"), "_", "-")
				if uidRe.MatchString(uid) {
					return uid
				}
			}
		}
	}
	return ""
}

// PodNetns returns the netns of pod uid as seen under procRoot (/proc, or
// the host's /proc mounted into a DaemonSet pod), and the pid it was found
// through: see Pods.Netns.
func PodNetns(procRoot, uid string) (netnsx.Target, int, error) {
	if !uidRe.MatchString(uid) {
		return netnsx.Target{}, 0, fmt.Errorf("pod UID %q is not a UID", uid)
	}
	pods, err := ScanPods(procRoot)
	if err != nil {
		return netnsx.Target{}, 0, err
	}
	return pods.Netns(uid)
}

// Pods is the pods of a proc root at one resync: Netns finds a pod's
// processes in the root's process cache (see scanner).
type Pods struct {
	procRoot string
	s        *scanner
	// walked is shared by the copies of one ScanPods result: a resync
	// walks the proc root at most once, however many pods it misses.
	walked *bool
}

// unknownStart is the start time of a process whose stat cannot be read
// (it exited meanwhile, or a proc tree without stat): it sorts last.
const unknownStart = ^uint64(0)

// The process cache of a proc root. A resync used to read /proc/PID/cgroup
// of every process on the node once a second (~15-25 µs each: 5,000
// processes took a tenth of a core). A process's pod does not change, so it
// is read once per process: a process is known by its pid and the inode
// number of its /proc/PID directory, which the kernel gives a new process
// even when it reuses a pid. A resync then costs one stat of each annotated
// pod's chosen process (still this process? its netns still there?); the
// proc root is listed again only when a pod has no such process left (a
// new pod, a re-created sandbox), at most once per resync, and every
// walkEvery to forget the processes that exited.
const (
	walkEvery = 30 * time.Second
	// youngFor: a process seen outside any pod is read again while it is
	// this young: runtimes move a container's first process into its
	// cgroup just after creating it.
	youngFor = 10 * time.Second
)

type scanner struct {
	root string

	mu       sync.Mutex // guards the fields below
	procs    map[int]*procEntry
	byUID    map[string][]*procEntry // oldest first
	lastWalk time.Time
	walkErr  error
}

type procEntry struct {
	pid   int
	ino   uint64 // of /proc/PID: a new process has a new one
	start uint64 // clock ticks after boot, or unknownStart
	uid   string // "" when in no pod
	seen  time.Time
}

var (
	scannersMu sync.Mutex
	scanners   = map[string]*scanner{}
)

func scannerOf(procRoot string) *scanner {
	scannersMu.Lock()
	defer scannersMu.Unlock()
	s := scanners[procRoot]
	if s == nil {
		s = &scanner{root: procRoot, procs: map[int]*procEntry{}, byUID: map[string][]*procEntry{}}
		scanners[procRoot] = s
	}
	return s
}

// ScanPods returns the pods of procRoot for one resync. The proc root is
// walked when it has not been for walkEvery (the first call walks it);
// otherwise Netns looks at the cached processes and walks only for a pod
// it cannot find.
func ScanPods(procRoot string) (Pods, error) {
	s := scannerOf(procRoot)
	walked := false
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastWalk.IsZero() || time.Since(s.lastWalk) >= walkEvery {
		walked = true
		if err := s.walk(); err != nil {
			return Pods{}, err
		}
	}
	return Pods{procRoot: procRoot, s: s, walked: &walked}, nil
}

// walk lists the proc root and reads the cgroup and start time of the
// processes it has not seen (and of young ones seen in no pod).
func (s *scanner) walk() error {
	s.lastWalk = time.Now()
	ents, err := readDirInos(s.root)
	if err != nil {
		s.walkErr = fmt.Errorf("read %s: %w; mount the host /proc (hostPath) and pass it with --proc", s.root, err)
		return s.walkErr
	}
	s.walkErr = nil
	now := time.Now()
	procs := make(map[int]*procEntry, len(ents))
	for _, e := range ents {
		pid, err := strconv.Atoi(e.name)
		if err != nil || pid <= 0 {
			continue
		}
		old := s.procs[pid]
		if old != nil && old.ino == e.ino && (old.uid != "" || now.Sub(old.seen) >= youngFor) {
			procs[pid] = old
			continue
		}
		seen := now
		if old != nil && old.ino == e.ino {
			seen = old.seen
		}
		procs[pid] = s.read(pid, e.ino, seen)
	}
	s.procs = procs
	s.index()
	return nil
}

func (s *scanner) read(pid int, ino uint64, seen time.Time) *procEntry {
	dir := filepath.Join(s.root, strconv.Itoa(pid))
	e := &procEntry{pid: pid, ino: ino, seen: seen}
	if e.uid = podOf(filepath.Join(dir, "cgroup")); e.uid != "" {
		e.start = startTime(dir)
	}
	return e
}

func (s *scanner) index() {
	s.byUID = map[string][]*procEntry{}
	for _, e := range s.procs {
		if e.uid != "" {
			s.byUID[e.uid] = append(s.byUID[e.uid], e)
		}
	}
	for _, ps := range s.byUID {
		sort.Slice(ps, func(i, j int) bool {
			if ps[i].start != ps[j].start {
				return ps[i].start < ps[j].start
			}
			return ps[i].pid < ps[j].pid
		})
	}
}

// current reports whether e is still the process it was read as: its
// /proc/PID is there with the same inode number.
func (s *scanner) current(e *procEntry) bool {
	var st unix.Stat_t
	return unix.Stat(filepath.Join(s.root, strconv.Itoa(e.pid)), &st) == nil && st.Ino == e.ino
}

// Netns returns the netns of pod uid through its oldest process by start
// time (the sandbox, normally; after a pid wrap not the lowest pid), or,
// when that one's netns cannot be looked at any more (it exited: with
// CRI-O's drop_infra_ctr the oldest is an ordinary process), through the
// next oldest; and that pid.
func (p Pods) Netns(uid string) (netnsx.Target, int, error) {
	s := p.s
	s.mu.Lock()
	defer s.mu.Unlock()
	pick, ok := s.pick(uid)
	if !ok && !*p.walked {
		*p.walked = true
		if err := s.walk(); err != nil {
			return netnsx.Target{}, 0, err
		}
		pick, _ = s.pick(uid)
	}
	if pick == nil {
		return netnsx.Target{}, 0, fmt.Errorf("%w: pod %s has no process under %s", ErrNoPodProcess, uid, p.procRoot)
	}
	t, err := netnsx.ParseTarget(filepath.Join(p.procRoot, strconv.Itoa(pick.pid), "ns", "net"))
	return t, pick.pid, err
}

// pick returns the oldest cached process of uid that is still current and
// whose netns can be looked at (ok); else the oldest current one, whose
// netns is then reported as it is (as before the cache). Processes found
// gone leave the cache.
func (s *scanner) pick(uid string) (*procEntry, bool) {
	ps := s.byUID[uid]
	var first *procEntry
	gone := false
	defer func() {
		if gone {
			live := ps[:0]
			for _, e := range ps {
				if e != nil {
					live = append(live, e)
				}
			}
			if len(live) == 0 {
				delete(s.byUID, uid)
			} else {
				s.byUID[uid] = live
			}
		}
	}()
	for i, e := range ps {
		if !s.current(e) {
			delete(s.procs, e.pid)
			ps[i], gone = nil, true
			continue
		}
		if first == nil {
			first = e
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join(s.root, strconv.Itoa(e.pid), "ns", "net"), &st) == nil {
			return e, true
		}
	}
	return first, false
}

// readDirInos lists dir with each entry's inode number (getdents64).
func readDirInos(dir string) ([]dirEnt, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var out []dirEnt
	buf := make([]byte, 32<<10)
	for {
		n, err := unix.Getdents(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			return out, nil
		}
		for b := buf[:n]; len(b) >= 19; {
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen < 19 || reclen > len(b) {
				break
			}
			name := b[19:reclen]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			if len(name) > 0 && name[0] >= '0' && name[0] <= '9' {
				out = append(out, dirEnt{name: string(name), ino: binary.NativeEndian.Uint64(b[0:8])})
			}
			b = b[reclen:]
		}
	}
}

type dirEnt struct {
	name string
	ino  uint64
}

// startTime is the start time of the process of DIR (PROC/PID), or
// unknownStart when its stat cannot be read.
func startTime(dir string) uint64 {
	n, err := netnsx.ProcStart(dir)
	if err != nil {
		return unknownStart
	}
	return n
}

// podOf reads one /proc/PID/cgroup ("ID:CONTROLLERS:PATH" lines, v1 and v2)
// and returns the pod UID any line's path names. A process that exited
// meanwhile is in no pod.
func podOf(file string) string {
	f, err := os.Open(file)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) == 3 {
			if uid := podOfCgroup(parts[2]); uid != "" {
				return uid
			}
		}
	}
	return ""
}
