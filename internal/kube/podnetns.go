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

// cgroupNamesPod reports whether a cgroup path is inside the cgroup of pod
// uid, in either of kubelet's layouts:
//
//	cgroupfs: /kubepods/burstable/pod<uid>/<container-id>
//	systemd:  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope
func cgroupNamesPod(path, uid string) bool {
	plain := "pod" + uid
	systemd := "pod" + strings.ReplaceAll(uid, "-", "_") + ".slice"
	for _, seg := range strings.Split(path, "/") {
		if seg == plain || strings.HasPrefix(seg, "kubepods") && strings.HasSuffix(seg, "-"+systemd) || seg == "kubepods-"+systemd {
			return true
		}
	}
	return false
}

// PodNetns returns the netns of pod uid as seen under procRoot (/proc, or
// the host's /proc mounted into a DaemonSet pod), and the pid it was found
// through: the lowest pid of the pod, its oldest process (the sandbox).
func PodNetns(procRoot, uid string) (netnsx.Target, int, error) {
	if !uidRe.MatchString(uid) {
		return netnsx.Target{}, 0, fmt.Errorf("pod UID %q is not a UID", uid)
	}
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return netnsx.Target{}, 0, fmt.Errorf("read %s: %w; mount the host /proc (hostPath) and pass it with --proc", procRoot, err)
	}
	var pids []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	for _, pid := range pids {
		if inPod(filepath.Join(procRoot, strconv.Itoa(pid), "cgroup"), uid) {
			t, err := netnsx.ParseTarget(filepath.Join(procRoot, strconv.Itoa(pid), "ns", "net"))
			return t, pid, err
		}
	}
	return netnsx.Target{}, 0, fmt.Errorf("%w: pod %s has no process under %s", ErrNoPodProcess, uid, procRoot)
}

// inPod reads one /proc/PID/cgroup ("ID:CONTROLLERS:PATH" lines, v1 and v2)
// and reports whether any line's path is in the pod. A process that exited
// meanwhile is simply not in it.
func inPod(file, uid string) bool {
	f, err := os.Open(file)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) == 3 && cgroupNamesPod(parts[2], uid) {
			return true
		}
	}
	return false
}
