package cli

import (
	"context"
	"errors"
	"flag"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/docker"
)

// dockerCmd enrolls every running container labelled with redirect specs
// and follows Docker's events.
//
// Lifecycle (daemon.Run, docker.Watcher.Handover). On SIGTERM the daemon
// lists the labelled containers one last time: if any it serves is still
// running, it hands their rules over (they stay in the kernel, a successor
// adopts them), so recreating the nsredirect container refuses no
// connection; if none is, it removes everything, so `compose down` (which
// stops backend first, as it depends on nsredirect) leaves nothing attached
// or pinned. A successor removes what a predecessor handed over for
// containers that are gone by then.
// dockerFlags are the flags of `docker`.
type dockerFlags struct {
	host, label string
	kf          kernelFlags
}

func (f *dockerFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.host, "docker-host", docker.DefaultHost, "Docker Engine socket, unix:///PATH")
	fs.StringVar(&f.label, "label", docker.DefaultLabel, "container label whose value is SPEC[,SPEC...]")
	f.kf.register(fs)
}

func dockerCmd(ctx context.Context, io IO, args []string) error {
	fs := flagSet("docker", io)
	var f dockerFlags
	f.register(fs)
	host, label, kf := &f.host, &f.label, &f.kf
	log, err := kf.parse(fs, args, io)
	if err != nil {
		return err
	}
	if *label == "" || strings.ContainsAny(*label, "=, \t\n") {
		return usagef("--label %q: give a label key such as %s, with no '=', ',' or spaces", *label, docker.DefaultLabel)
	}
	client, err := docker.New(*host)
	if err != nil {
		return UsageError{err}
	}
	if err := kf.preflight(log); err != nil {
		return err
	}
	defer kf.cookies.Close()
	hostNS, err := kf.hostNetns("/proc", "grant CAP_SYS_PTRACE and the host pid namespace (compose: cap_add: [SYS_PTRACE], pid: host; systemd: CapabilityBoundingSet)")
	if err != nil {
		return err
	}
	// Docker must answer before anything is attached.
	nctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = client.Negotiate(nctx)
	cancel()
	if errors.Is(err, docker.ErrHost) {
		return UsageError{err}
	}
	if err != nil {
		return err
	}
	log.WithFields(logrus.Fields{"socket": client.Socket(), "api_version": client.Version()}).Info("connected to Docker")
	w := docker.NewWatcher(client, *label, log)
	return serve(ctx, kf, log, w, daemon.Config{Owner: "docker", HostNetns: &hostNS})
}
