package cli

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/daemon"
	"github.com/nsredirect/nsredirect/internal/docker"
	"github.com/nsredirect/nsredirect/internal/loader"
)

// dockerCmd enrolls every running container labelled with redirect specs
// and follows Docker's events.
//
// Lifecycle. On SIGTERM the daemon lists the labelled containers one last
// time: if any it serves is still running, it hands their rules over
// (they stay in the kernel, a successor adopts them), so recreating the
// nsredirect container refuses no connection; if none is, it removes
// everything, so `compose down` (which stops backend first, as it depends
// on nsredirect) leaves nothing attached or pinned. A successor removes what
// a predecessor handed over for containers that are gone by then.
func dockerCmd(ctx context.Context, io IO, args []string) error {
	fs := flagSet("docker", io)
	var host, label string
	var kf kernelFlags
	fs.StringVar(&host, "docker-host", docker.DefaultHost, "Docker Engine socket, unix:///PATH")
	fs.StringVar(&label, "label", docker.DefaultLabel, "container label whose value is SPEC[,SPEC...]")
	log, err := kf.parse(fs, args, io)
	if err != nil {
		return err
	}
	if label == "" || strings.ContainsAny(label, "=, \t\n") {
		return usagef("--label %q: give a label key such as %s, with no '=', ',' or spaces", label, docker.DefaultLabel)
	}
	client, err := docker.New(host)
	if err != nil {
		return UsageError{err}
	}
	if err := kf.preflight(log); err != nil {
		return err
	}
	defer kf.cookies.Close()
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
	w := docker.NewWatcher(client, label, log)

	var d *daemon.Daemon
	start := func(dm *daemon.Daemon, kernel *loader.Loader) error {
		d = dm
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		desired, err := w.Sync(sctx, d)
		if err != nil {
			return err
		}
		// What a previous docker-mode daemon handed over is adopted by now
		// (its owner lock is ours): a record still ownerless belongs to a
		// container that is gone, or to the old netns of one recreated
		// under the same name.
		names := make([]string, len(desired))
		for i, t := range desired {
			names[i] = t.Name
		}
		return removeGone(kernel, d, "docker", names, log)
	}
	loop := func(ctx context.Context, d *daemon.Daemon) error { return w.Run(ctx, d) }
	handover := func() bool {
		if d == nil {
			return false
		}
		hctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if _, err := w.Sync(hctx, d); err != nil {
			log.WithError(err).Warn("cannot list containers at shutdown; keeping the rules of the containers last seen running")
		}
		return len(d.Serving()) > 0
	}
	return serve(ctx, &kf, "docker", log, start, loop, handover)
}

// removeGone removes the ownerless records of mode owner that no wanted
// target claims, after a discovery mode's first sync. A wanted target's
// record that failed to enroll this time is kept, so a passing error
// removes nothing.
func removeGone(kernel *loader.Loader, d *daemon.Daemon, owner string, wanted []string, log logrus.FieldLogger) error {
	want := map[string]bool{}
	for _, n := range wanted {
		want[n] = true
	}
	for _, n := range d.Serving() {
		delete(want, n)
	}
	removed, err := kernel.RemoveOrphans(owner, func(r loader.Record) bool { return want[r.Name] })
	for _, r := range removed {
		log.WithFields(logrus.Fields{"netns": r.Name, "cookie": r.Cookie}).Info("removed rules handed over for a target that is gone")
	}
	return err
}
