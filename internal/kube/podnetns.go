// Package kube finds Kubernetes pods' network namespaces on a node without
// linking any container runtime: kubelet names every pod's cgroup after the
// pod UID, with containerd, CRI-O and dockershim alike, so a process whose
// /proc/PID/cgroup names the UID is in the pod, and its /proc/PID/ns/net is
// the pod's netns (all containers of a pod, pause included, share it).
package kube

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

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

// Pods maps the pods seen in one scan of a proc root to their processes,
// oldest first.
type Pods struct {
	procRoot string
	procs    map[string][]podProc
}

type podProc struct {
	pid int
	// start is the start time in clock ticks after boot; unknown (the
	// process exited meanwhile, or a proc tree without stat) sorts last.
	start uint64
}

const unknownStart = ^uint64(0)

// ScanPods reads every process's cgroup under procRoot once, so a resync of
// many pods costs one walk of /proc, not one per pod.
func ScanPods(procRoot string) (Pods, error) {
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return Pods{}, fmt.Errorf("read %s: %w; mount the host /proc (hostPath) and pass it with --proc", procRoot, err)
	}
	p := Pods{procRoot: procRoot, procs: map[string][]podProc{}}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		dir := filepath.Join(procRoot, e.Name())
		if uid := podOf(filepath.Join(dir, "cgroup")); uid != "" {
			p.procs[uid] = append(p.procs[uid], podProc{pid: pid, start: startTime(dir)})
		}
	}
	for _, ps := range p.procs {
		sort.Slice(ps, func(i, j int) bool {
			if ps[i].start != ps[j].start {
				return ps[i].start < ps[j].start
			}
			return ps[i].pid < ps[j].pid
		})
	}
	return p, nil
}

// Netns returns the netns of pod uid through its oldest process by start
// time (the sandbox, normally; after a pid wrap not the lowest pid), or,
// when that one's netns cannot be looked at any more (it exited: with
// CRI-O's drop_infra_ctr the oldest is an ordinary process), through the
// next oldest; and that pid.
func (p Pods) Netns(uid string) (netnsx.Target, int, error) {
	ps := p.procs[uid]
	if len(ps) == 0 {
		return netnsx.Target{}, 0, fmt.Errorf("%w: pod %s has no process under %s", ErrNoPodProcess, uid, p.procRoot)
	}
	pick := ps[0]
	for _, c := range ps {
		var st unix.Stat_t
		if unix.Stat(filepath.Join(p.procRoot, strconv.Itoa(c.pid), "ns", "net"), &st) == nil {
			pick = c
			break
		}
	}
	t, err := netnsx.ParseTarget(filepath.Join(p.procRoot, strconv.Itoa(pick.pid), "ns", "net"))
	return t, pick.pid, err
}

// startTime reads field 22 (starttime) of DIR/stat. The command name,
// field 2, may hold spaces and parentheses: count from the last ')'.
func startTime(dir string) uint64 {
	b, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return unknownStart
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return unknownStart
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return unknownStart
	}
	n, err := strconv.ParseUint(f[19], 10, 64)
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
