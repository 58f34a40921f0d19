package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/kube"
	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
)

// apiTimeout bounds the wait for the API server at start: past it the
// daemon exits 1 with nothing attached.
const apiTimeout = 30 * time.Second

// kubeCmd enrolls the annotated running pods of one node (a DaemonSet).
//
// Lifecycle (daemon.Run, kube.Controller.Handover). A rollout (maxSurge: 1,
// maxUnavailable: 0) starts the new daemon pod beside the old: the new one
// is ready while the old still owns every pod's netns
// (daemon.WaitForOwners), and adopts each on the resync tick after the old
// one lets go. On SIGTERM a daemon hands over (rules
// stay, owner locks released) if another running pod of its DaemonSet is on
// the node; otherwise (uninstall) it removes its rules, and the last one out
// unpins and detaches everything.
// kubeFlags are the flags of `kube`.
type kubeFlags struct {
	node, podName, podNamespace, annotation, kubeconfig, proc string
	kf                                                        kernelFlags
}

func (f *kubeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.node, "node-name", "", "this node's name (downward API spec.nodeName); only its pods are watched")
	fs.StringVar(&f.podName, "pod-name", "", "this daemon's pod (downward API metadata.name), to tell a rollout from an uninstall")
	fs.StringVar(&f.podNamespace, "pod-namespace", "", "this daemon's namespace (downward API metadata.namespace)")
	fs.StringVar(&f.annotation, "annotation", kube.DefaultAnnotation, "pod annotation whose value is SPEC[,SPEC...]")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default: the in-cluster service account)")
	fs.StringVar(&f.proc, "proc", "/proc", "the host's /proc (hostPath), where pods' processes and netns are found")
	f.kf.register(fs)
}

func kubeCmd(ctx context.Context, io IO, args []string) error {
	fs := flagSet("kube", io)
	var f kubeFlags
	f.register(fs)
	kf := &f.kf
	log, err := kf.parse(fs, args, io)
	node, podName, podNamespace, annotation, kubeconfig, proc := f.node, f.podName, f.podNamespace, f.annotation, f.kubeconfig, f.proc
	if err != nil {
		return err
	}
	if node == "" {
		return usagef("--node-name is required (or NSREDIRECT_NODE_NAME, from the downward API: fieldRef spec.nodeName)")
	}
	if errs := validation.IsQualifiedName(annotation); len(errs) > 0 {
		return usagef("--annotation %q is not a Kubernetes annotation key (%s); use e.g. %s", annotation, strings.Join(errs, "; "), kube.DefaultAnnotation)
	}
	if !netnsx.IsProcfs(proc) {
		return usagef("--proc %q is not a procfs; mount the host's /proc (hostPath /proc) and pass its path", proc)
	}
	kube.RouteClientLogs(log)
	var client *kube.Client
	if kubeconfig != "" {
		client, err = kube.FromKubeconfig(kubeconfig)
	} else {
		client, err = kube.InCluster()
	}
	if err != nil {
		if kubeconfig == "" {
			return usagef("%v; run in a pod with a service account, or pass --kubeconfig PATH (or NSREDIRECT_KUBECONFIG)", err)
		}
		return UsageError{err}
	}
	// The pins must outlive this pod for a successor to adopt them: a
	// private bpffs would vanish with the pod's mount namespace.
	if err := loader.CheckBPFFS(kf.pinDir); err != nil {
		return fmt.Errorf("%w; mount bpffs on the node (mount -t bpf bpf /sys/fs/bpf) and into the pod (hostPath /sys/fs/bpf)", err)
	}
	// A DaemonSet mounts the host's /sys/fs/cgroup whatever the node; on a
	// hybrid (v1 + v2) node preflight attaches at its unified/.
	if err := kf.preflight(log); err != nil {
		return err
	}
	defer kf.cookies.Close()
	host, err := kf.hostNetns(proc, "grant CAP_SYS_PTRACE (securityContext.capabilities.add: [SYS_PTRACE]) and mount the host's /proc at --proc")
	if err != nil {
		return err
	}

	ctl := kube.NewController(kube.Config{
		API: client, Node: node, Annotation: annotation, Proc: proc,
		PodName: podName, PodNamespace: podNamespace, Log: log,
	})
	// The API server must answer before anything is attached.
	ictx, stopInformer := context.WithCancel(ctx)
	defer stopInformer()
	if err := ctl.Start(ictx, apiTimeout); err != nil {
		return err
	}
	log.WithFields(logrus.Fields{"server": client.Server(), "node": node, "annotation": annotation}).Info("watching this node's pods")
	holder := ""
	if why := ctl.OwnPodUnknown(); why != "" {
		log.WithField("reason", why).Warn("own pod unknown: handing over on shutdown while annotated pods run, so an uninstall then needs `nsredirect cleanup --all`")
	} else {
		holder = "pod " + podNamespace + "/" + podName
	}
	err = serve(ctx, kf, log, ctl, daemon.Config{Owner: "kube", Holder: holder, Proc: proc, HostNetns: &host})
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}
