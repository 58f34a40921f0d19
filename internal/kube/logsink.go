package kube

import (
	"fmt"

	"github.com/go-logr/logr"
	"github.com/sirupsen/logrus"
	"k8s.io/klog/v2"
)

// RouteClientLogs sends what client-go logs outside the informer's context
// (API warnings, exec credential plugins, transport retries: klog's global
// logger) to log as well, so nothing reaches stderr in klog's own format.
func RouteClientLogs(log logrus.FieldLogger) { klog.SetLogger(klogTo(log)) }

// klogTo routes client-go's logs (klog, through the context the informer
// runs with) to our logger, so --log-format json holds for them too:
// verbosity 0 as info, deeper levels as debug.
func klogTo(log logrus.FieldLogger) logr.Logger { return logr.New(logrusSink{log: log}) }

type logrusSink struct {
	log  logrus.FieldLogger
	name string
}

func (logrusSink) Init(logr.RuntimeInfo) {}

func (logrusSink) Enabled(level int) bool { return level <= 4 }

func (s logrusSink) entry(kv []any) *logrus.Entry {
	f := logrus.Fields{}
	if s.name != "" {
		f["logger"] = s.name
	}
	for i := 0; i+1 < len(kv); i += 2 {
		f[fmt.Sprint(kv[i])] = kv[i+1]
	}
	return s.log.WithFields(f)
}

func (s logrusSink) Info(level int, msg string, kv ...any) {
	if level == 0 {
		s.entry(kv).Info(msg)
		return
	}
	s.entry(kv).Debug(msg)
}

func (s logrusSink) Error(err error, msg string, kv ...any) {
	s.entry(kv).WithError(err).Warn(msg)
}

func (s logrusSink) WithValues(kv ...any) logr.LogSink {
	return logrusSink{log: s.entry(kv), name: s.name}
}

func (s logrusSink) WithName(name string) logr.LogSink {
	if s.name != "" {
		name = s.name + "." + name
	}
	return logrusSink{log: s.log, name: name}
}
