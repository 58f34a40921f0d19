package cli

import (
	"flag"
	"fmt"

	"github.com/nsredirect/nsredirect/internal/loader"
)

// CommandRef describes one command for the generated reference (docs/cli.md).
type CommandRef struct {
	Name, Args, Help string
	Flags            []FlagRef
}

// FlagRef describes one flag: its environment variable, default and usage
// text, read from the FlagSet the command itself parses.
type FlagRef struct {
	Name, Env, Default, Usage string
	// Repeatable flags also take a comma-separated list from Env.
	Repeatable bool
	Bool       bool
}

// ExitCodeRef is one exit code and when a command returns it.
type ExitCodeRef struct {
	Code    int
	Meaning string
}

// EnvKnobRef is an environment variable that is not a flag.
type EnvKnobRef struct {
	Name, Values, Meaning string
}

// Reference lists every command with its flags, in the order of `nsredirect
// help`. Flags come out sorted by name, as flag.VisitAll gives them.
func Reference() []CommandRef {
	var refs []CommandRef
	for _, c := range commands() {
		fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
		c.flags(fs)
		ref := CommandRef{Name: c.name, Args: c.args, Help: c.help}
		fs.VisitAll(func(f *flag.Flag) {
			_, list := f.Value.(*listFlag)
			b, isBool := f.Value.(interface{ IsBoolFlag() bool })
			ref.Flags = append(ref.Flags, FlagRef{
				Name: f.Name, Env: envName(f.Name), Default: f.DefValue, Usage: f.Usage,
				Repeatable: list, Bool: isBool && b.IsBoolFlag(),
			})
		})
		refs = append(refs, ref)
	}
	return refs
}

// ExitCodes are the exit codes of every command (see exitCode).
func ExitCodes() []ExitCodeRef {
	return []ExitCodeRef{
		{ExitOK, "ok: the command did what it was asked; a daemon stopped by SIGTERM or SIGINT"},
		{ExitFailure, "a runtime failure: another daemon already serves that netns, a check that failed, the Docker Engine or API server not answering"},
		{ExitUsage, "bad input or an environment to fix first: a flag, a spec, a path, an environment variable, a missing privilege, a kernel feature, cgroup2 or bpffs. Nothing was attached"},
	}
}

// EnvKnobs are the environment variables read besides NSREDIRECT_<FLAG>.
func EnvKnobs() []EnvKnobRef {
	return []EnvKnobRef{
		{cookieKnob, fmt.Sprintf("`%s` (default where the kernel has it), `%s`", loader.CookieSockopt, loader.CookieBPFProbe),
			"how netns cookies are read: `bpf-probe` forces the BPF probe that kernels before 5.14 need, even where getsockopt(SO_NETNS_COOKIE) exists. For tests: both give the same cookie"},
		{hostNetnsKnob, "`processes`",
			"find the host's netns only through the host's processes (pid 1, kthreadd), as on kernels whose initial netns has no fixed inode. For tests: it can only refuse more"},
	}
}
