// Package loader is the mechanics of nsredirect's kernel state: it loads the
// eBPF programs, pins them with their maps and bpf_links under one bpffs
// directory, attaches once at the cgroup2 root, adopts what an earlier
// instance pinned (migrating an older layout in place), and writes per-netns
// rules. It decides nothing: which netns get which rules is the daemon's
// business.
package loader

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/bpfobj"
	"github.com/nsredirect/nsredirect/internal/entry"
)

// DefaultPinDir is where state is pinned unless told otherwise.
const DefaultPinDir = "/sys/fs/bpf/nsredirect"

// Enrollment is what a netns is enrolled with.
type Enrollment struct {
	Cookie   uint64
	NetnsIno uint64
	// Name labels the netns in status and metrics: the target as given, a
	// container name, a pod.
	Name string
	// Owner is the mode that enrolled it (run, docker, kube); an instance
	// adopts only what its own mode left.
	Owner string
	// ID identifies the target stably across restarts, whatever its name:
	// a container ID, a pod UID, the path `run` was given.
	ID string
	// Holder names the serving daemon so that a person can find it (a pid
	// is 1 in every daemon pod): "pod kube-system/nsredirect-x7k2p",
	// "pid 1234 on host web1".
	Holder string
	// Rules are what each rule writes into the kernel, labelled for
	// display; Records leaves them empty (Labels names them, and Live
	// reads the kernel).
	Rules []entry.Rule
}

// Record is an enrollment as read back from the pinned state.
type Record struct {
	Enrollment
	OwnerPID   uint32
	OwnerAlive bool
	Enrolled   time.Time
	// Labels are the labels of the rules, in order.
	Labels []string
	// Redirects counts connects redirected per rule, summed over CPUs.
	Redirects []uint64
	// entries counts the kernel entries each rule had at enrollment (none
	// in a record of an older version).
	entries []int
}

// Loader holds the pinned maps open; the programs stay alive through their
// pinned links.
type Loader struct {
	dir     string
	cgroup  string // where the programs are attached; "" when only opened
	pins    pins
	log     logrus.FieldLogger
	maps    bpfobj.RedirectMaps
	records *ebpf.Map

	mu    sync.Mutex
	owned map[uint64]*os.File // owner locks of the netns this process serves

	// repaired names the hooks whose pinned link Attach found detached or
	// defunct and replaced.
	repaired []string
	// heals counts the Heal calls (see udpScanEvery).
	heals atomic.Uint64
	// ours is, per hook, the program last found ours on its link (see
	// foreign.go); written with the pin dir locked, read by Heal's cheap
	// check without it: oursMu guards it.
	oursMu sync.Mutex
	ours   map[string]ebpf.ProgramID
}

func newLoader(dir string, log logrus.FieldLogger) *Loader {
	return &Loader{dir: dir, pins: pins{dir}, log: log, owned: map[uint64]*os.File{}}
}

// StartupRepairs names the hooks whose pinned link Attach found detached or
// defunct and replaced with a new one, for the daemon to log and count as it
// counts the repairs of Heal.
func (l *Loader) StartupRepairs() []string { return append([]string(nil), l.repaired...) }

// Dir is the pin directory.
func (l *Loader) Dir() string { return l.dir }

// Close releases this process's handles and owner locks. Pinned state stays:
// enrolled rules keep working and a later instance adopts them.
func (l *Loader) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for c, f := range l.owned {
		f.Close()
		delete(l.owned, c)
	}
	err := l.maps.Close()
	if l.records != nil {
		err = errors.Join(err, l.records.Close())
	}
	return err
}
