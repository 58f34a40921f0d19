// Package cli implements nsredirect's subcommands: flag and environment
// parsing, validation before anything touches the kernel, and the mapping of
// errors to exit codes (0 ok, 1 runtime failure, 2 bad input).
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/nsredirect/nsredirect/internal/loader"
	"github.com/nsredirect/nsredirect/internal/netnsx"
	"github.com/nsredirect/nsredirect/internal/rule"
)

// Version is set at link time (-X); "dev" when it was not.
var Version = "dev"

// buildVersion is the version this binary reports: the link-time Version
// when one was set (make build, make release, the Dockerfile), else the main
// module's version as the go command recorded it (`go install
// .../cmd/nsredirect@v1.2.3` records v1.2.3 and sets no -X). A plain `go
// build` in a checkout records "(devel)": that stays dev. bi is nil when the
// binary carries no build information.
func buildVersion(linked string, bi *debug.BuildInfo) string {
	if linked != "" && linked != "dev" {
		return linked
	}
	if bi != nil && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// version is buildVersion for this binary.
func version() string {
	bi, _ := debug.ReadBuildInfo()
	return buildVersion(Version, bi)
}

// Exit codes.
const (
	ExitOK      = 0
	ExitFailure = 1
	ExitUsage   = 2
)

// UsageError is bad input: a flag, a spec, a path, an environment variable.
type UsageError struct{ Err error }

func (e UsageError) Error() string { return e.Err.Error() }
func (e UsageError) Unwrap() error { return e.Err }

func usagef(format string, args ...any) error {
	return UsageError{fmt.Errorf(format, args...)}
}

// Env gives the environment; tests pass their own.
type Env func(string) string

// IO bundles the process's outputs.
type IO struct {
	Stdout, Stderr io.Writer
	Getenv         Env
}

type command struct {
	name, args, help string
	run              func(ctx context.Context, io IO, args []string) error
	// flags puts the command's flags on a FlagSet, as run does: the
	// generated reference (Reference, docs/cli.md) reads them from there.
	flags func(fs *flag.FlagSet)
}

func commands() []command {
	return []command{
		{"run", "--netns TARGET --redirect SPEC [--redirect SPEC...] [--remove-on-exit] [--allow-host-netns]", "redirect loopback connects in one netns, in the foreground (rules outlive a stop for the next run to adopt, unless --remove-on-exit)", runCmd, func(fs *flag.FlagSet) { new(runFlags).register(fs) }},
		{"docker", "[--docker-host unix:///var/run/docker.sock] [--label nsredirect.redirect]", "redirect in every running container labelled nsredirect.redirect=SPEC[,SPEC...]", dockerCmd, func(fs *flag.FlagSet) { new(dockerFlags).register(fs) }},
		{"kube", "--node-name NODE [--annotation nsredirect.io/redirect] [--kubeconfig PATH] [--proc /proc]", "redirect in every running pod of this node annotated nsredirect.io/redirect: SPEC[,SPEC...] (a DaemonSet)", kubeCmd, func(fs *flag.FlagSet) { new(kubeFlags).register(fs) }},
		{"check", "--netns TARGET [--dial ADDR:PORT]", "exit 0 when a rule for TARGET is live (healthcheck)", checkCmd, func(fs *flag.FlagSet) { new(checkFlags).register(fs) }},
		{"status", "[--json]", "list live rules from the pinned state", statusCmd, func(fs *flag.FlagSet) { new(statusFlags).register(fs) }},
		{"trace", "[--netns TARGET | --container NAME | --pod NS/NAME] [--port N] [--verdict V] [--peer] [--json]", "show each redirect decision the kernel makes in enrolled netns, live, until Ctrl-C", traceCmd, func(fs *flag.FlagSet) { new(traceFlags).register(fs) }},
		{"explain", "--netns TARGET | --container NAME | --pod NS/NAME [--dial] [--json] ADDR:PORT[/udp]", "walk the decision for one destination in one target, step by step, with the fix for a step that fails; exit 0 when the redirect would happen, 1 when not", explainCmd, func(fs *flag.FlagSet) { new(explainFlags).register(fs) }},
		{"cleanup", "[--all | --gone]", "remove rules left by dead daemons (--gone: only those of netns that no longer exist; --all: everything of ours)", cleanupCmd, func(fs *flag.FlagSet) { new(cleanupFlags).register(fs) }},
		{"version", "", "print the version", versionCmd, func(*flag.FlagSet) {}},
	}
}

// Main runs one command line and returns the exit code. It never panics
// out: errors are one line on stderr.
func Main(ctx context.Context, args []string, io IO) int {
	if io.Getenv == nil {
		io.Getenv = os.Getenv
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		printUsage(io.Stderr)
		if len(args) == 0 {
			return ExitUsage
		}
		return ExitOK
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, io, args[1:])
		if err == nil {
			return ExitOK
		}
		if errors.Is(err, flag.ErrHelp) {
			return ExitOK
		}
		fmt.Fprintf(io.Stderr, "nsredirect %s: %s\n", c.name, oneLine(withAdvice(c.name, err)))
		return exitCode(err)
	}
	fmt.Fprintf(io.Stderr, "nsredirect: unknown command %q; run `nsredirect help` for the list\n", args[0])
	return ExitUsage
}

func exitCode(err error) int {
	var u UsageError
	switch {
	case errors.As(err, &u),
		errors.Is(err, rule.ErrSpec),
		errors.Is(err, loader.ErrRecordTooLarge),
		errors.Is(err, netnsx.ErrTarget),
		errors.Is(err, loader.ErrEnvironment):
		return ExitUsage
	default:
		return ExitFailure
	}
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "nsredirect: redirect a loopback address:port inside a network namespace to another port, with eBPF at connect() time.")
	fmt.Fprintln(w, "\nUsage:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  nsredirect %s %s\n      %s\n", c.name, c.args, c.help)
	}
	fmt.Fprintln(w, "\nSPEC: [FROM_ADDR:]FROM_PORT=[TO_ADDR:]TO_PORT[/udp], e.g. 80=3210, [::1]:80=3210 or 53=5353/udp")
	fmt.Fprintln(w, "TARGET: self, a path (/run/netns/NAME, /proc/PID/ns/net) or pid:N")
	fmt.Fprintln(w, "Every flag also reads NSREDIRECT_<FLAG> from the environment (NSREDIRECT_PIN_DIR, ...).")
}

// flagSet builds a FlagSet whose errors are returned, not printed with a
// usage dump.
func flagSet(name string, io IO) *flag.FlagSet {
	fs := flag.NewFlagSet("nsredirect "+name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(io.Stderr, "Usage: nsredirect %s [flags]\n", name)
		fs.SetOutput(io.Stderr)
		fs.PrintDefaults()
	}
	return fs
}

// parse parses args, then fills every flag not given from NSREDIRECT_<NAME>.
func parse(fs *flag.FlagSet, args []string, getenv Env) error {
	usage := fs.Usage
	fs.Usage = func() {} // errors are reported once, by Main, on one line
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage()
			return err
		}
		return usagef("%v; see `nsredirect %s --help`", err, strings.TrimPrefix(fs.Name(), "nsredirect "))
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q; flags take the form --name value", fs.Arg(0))
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		key := envName(f.Name)
		v := getenv(key)
		if v == "" {
			return
		}
		if list, ok := f.Value.(*listFlag); ok {
			*list = nil
			for _, s := range strings.Split(v, ",") {
				if s = strings.TrimSpace(s); s != "" {
					*list = append(*list, s)
				}
			}
			return
		}
		if e := f.Value.Set(v); e != nil {
			err = usagef("environment %s=%q: %v", key, v, e)
		}
	})
	return err
}

func envName(flagName string) string {
	return "NSREDIRECT_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// listFlag collects a repeated flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}

// logFlags are the logging flags every long-running command has.
type logFlags struct {
	format, level string
}

func (f *logFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.format, "log-format", "text", "log format: text or json")
	fs.StringVar(&f.level, "log-level", "info", "log level: debug, info, warn, error")
}

func (f *logFlags) logger(w io.Writer) (*logrus.Logger, error) {
	log := logrus.New()
	log.SetOutput(w)
	switch f.format {
	case "text":
		log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, DisableColors: true})
	case "json":
		log.SetFormatter(&logrus.JSONFormatter{})
	default:
		return nil, usagef("--log-format %q: use text or json", f.format)
	}
	lvl, err := logrus.ParseLevel(f.level)
	if err != nil {
		return nil, usagef("--log-level %q: use debug, info, warn or error", f.level)
	}
	log.SetLevel(lvl)
	return log, nil
}

func versionCmd(_ context.Context, io IO, args []string) error {
	fs := flagSet("version", io)
	if err := parse(fs, args, io.Getenv); err != nil {
		return err
	}
	goVersion := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		goVersion = bi.GoVersion
	}
	fmt.Fprintf(io.Stdout, "nsredirect %s (%s)\n", version(), goVersion)
	return nil
}
