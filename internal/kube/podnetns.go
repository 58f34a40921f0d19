// Package kube finds Kubernetes pods' network namespaces on a node without
// linking any container runtime: kubelet names every pod's cgroup after the
// pod UID, with containerd, CRI-O and dockershim alike, so a process whose
// /proc/PID/cgroup names the UID is in the pod, and its /proc/PID/ns/net is
// the pod's netns (all containers of a pod, pause included, share it).
package kube

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

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
// through: the lowest pid of the pod, its oldest process (the sandbox).
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

// Pods maps the pods seen in one scan of a proc root to their lowest pid.
type Pods struct {
	procRoot string
	pids     map[string]int
}

// ScanPods reads every process's cgroup under procRoot once, so a resync of
// many pods costs one walk of /proc, not one per pod.
func ScanPods(procRoot string) (Pods, error) {
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return Pods{}, fmt.Errorf("read %s: %w; mount the host /proc (hostPath) and pass it with --proc", procRoot, err)
	}
	var pids []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	p := Pods{procRoot: procRoot, pids: map[string]int{}}
	for _, pid := range pids {
		if uid := podOf(filepath.Join(procRoot, strconv.Itoa(pid), "cgroup")); uid != "" {
			if _, seen := p.pids[uid]; !seen {
				p.pids[uid] = pid
			}
		}
	}
	return p, nil
}

// Netns returns the netns of pod uid through its lowest pid, and that pid.
func (p Pods) Netns(uid string) (netnsx.Target, int, error) {
	pid, ok := p.pids[uid]
	if !ok {
		return netnsx.Target{}, 0, fmt.Errorf("%w: pod %s has no process under %s", ErrNoPodProcess, uid, p.procRoot)
	}
	t, err := netnsx.ParseTarget(filepath.Join(p.procRoot, strconv.Itoa(pid), "ns", "net"))
	return t, pid, err
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
