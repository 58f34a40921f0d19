package cli

import (
	"errors"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/loader"
)

// daemonCommands attach the programs (loader.Attach); the others only open
// the pinned state.
var daemonCommands = map[string]bool{"run": true, "docker": true, "kube": true}

// advice is what a user of command cmd can do about err, an error of the
// kernel state; "" when there is nothing to add. The loader says what is
// wrong, this says what to do: it is written where the user is.
func advice(cmd string, err error) string {
	var full *loader.MapFullError
	switch {
	case errors.As(err, &full):
		return "remove unused enrollments with `nsredirect cleanup`"
	case errors.Is(err, loader.ErrIncompatible):
		if daemonCommands[cmd] {
			return "stop all instances and run `nsredirect cleanup --all`"
		}
		return "run that version's `nsredirect cleanup --all`"
	case errors.Is(err, loader.ErrOtherCgroup):
		return "use the same --cgroup for every instance, or run `nsredirect cleanup --all`"
	case errors.Is(err, loader.ErrOlderLayout):
		return "start a daemon of this version to migrate it in place, or use the older version's command"
	case errors.Is(err, loader.ErrStateRemoved):
		return "it was removed e.g. by `nsredirect cleanup --all`; restart the daemon to attach again"
	case errors.Is(err, loader.ErrBusy):
		return "stop it first, or give this instance another netns"
	case errors.Is(err, loader.ErrLockTimeout):
		return "is one stuck? see `nsredirect status`"
	case errors.Is(err, loader.ErrNotLive):
		return "restart its daemon"
	case errors.Is(err, loader.ErrRecordTooLarge):
		return "use a shorter name or fewer rules"
	}
	return ""
}

// withAdvice is err's text followed by the advice for it.
func withAdvice(cmd string, err error) string {
	if a := advice(cmd, err); a != "" {
		return err.Error() + "; " + a
	}
	return err.Error()
}

// adviceHook adds the advice for the error of a warning or error a daemon
// logs, as the field "advice".
type adviceHook struct{ cmd string }

func (adviceHook) Levels() []logrus.Level {
	return []logrus.Level{logrus.PanicLevel, logrus.FatalLevel, logrus.ErrorLevel, logrus.WarnLevel}
}

func (h adviceHook) Fire(e *logrus.Entry) error {
	if err, ok := e.Data[logrus.ErrorKey].(error); ok {
		if a := advice(h.cmd, err); a != "" {
			e.Data["advice"] = a
		}
	}
	return nil
}
