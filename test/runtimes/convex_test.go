//go:build runtimes

package runtimes_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nsredirect/nsredirect/internal/testenv"
)

// convexFiles are the official file's stand-in (testdata) and our
// override, as a Convex user has them side by side.
func convexFiles(t *testing.T) (official, override string) {
	t.Helper()
	official, err := filepath.Abs(filepath.Join("testdata", "convex", "docker-compose.yml"))
	if err != nil {
		t.Fatal(err)
	}
	return official, filepath.Join(repoDir(t), "examples", "convex", "docker-compose.override.yml")
}

// TestConvexOverrideConfig: the official file plus our override is a valid
// project for compose v5 (plugin and standalone) and docker-compose 1.29,
// with nsredirect added, backend labelled and waiting for it, and the
// dashboard still waiting for backend. No engine needed.
func TestConvexOverrideConfig(t *testing.T) {
	official, override := convexFiles(t)
	before, err := os.ReadFile(official)
	if err != nil {
		t.Fatal(err)
	}
	bin := runtimesBin(t)
	cmds := map[string][]string{
		"docker compose v5":   {dockerCLI(t), "compose"},
		"docker-compose v5":   {filepath.Join(bin, "docker-compose")},
		"docker-compose 1.29": {testenv.Tool(t, "docker-compose")},
	}
	// The plugin is found through a DOCKER_CONFIG holding it.
	cfg := t.TempDir()
	if err := os.MkdirAll(filepath.Join(cfg, "cli-plugins"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(bin, "docker-compose"), filepath.Join(cfg, "cli-plugins", "docker-compose")); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), "DOCKER_CONFIG="+cfg, "DOCKER_HOST=unix:///nonexistent.sock")
	for name, cmd := range cmds {
		t.Run(strings.ReplaceAll(name, " ", "_"), func(t *testing.T) {
			c := newCell(t, name, "Convex: official file + examples/convex override, `config`")
			if name == "docker-compose 1.29" {
				// The 1.29 Debian ships refuses a binary it was not given.
				if v, _ := sh(time.Minute, env, cmd[0], "version", "--short"); !strings.HasPrefix(v, "1.") {
					t.Fatalf("%s is %q, not docker-compose 1.x", cmd[0], v)
				}
			}
			out := mustSh(t, time.Minute, env, cmd[0], append(cmd[1:], "-f", official, "-f", override, "config")...)
			checkConvexConfig(t, out)
			if strings.Contains(name, "v5") {
				js := mustSh(t, time.Minute, env, cmd[0], append(cmd[1:], "-f", official, "-f", override, "config", "--format", "json")...)
				var p struct {
					Services map[string]struct {
						Image     string
						Labels    map[string]string
						DependsOn map[string]struct{ Condition string } `json:"depends_on"`
						Pid       string
					}
				}
				if err := json.Unmarshal([]byte(js), &p); err != nil {
					t.Fatalf("config --format json: %v\n%s", err, js)
				}
				if len(p.Services) != 3 {
					t.Errorf("services %v; want backend, dashboard, nsredirect", p.Services)
				}
				b := p.Services["backend"]
				if b.Labels["nsredirect.redirect"] != "80=3210" || b.DependsOn["nsredirect"].Condition != "service_healthy" || !strings.HasPrefix(b.Image, "ghcr.io/get-convex/convex-backend:") {
					t.Errorf("backend after the override: %+v", b)
				}
				if p.Services["dashboard"].DependsOn["backend"].Condition != "service_healthy" || p.Services["nsredirect"].Pid != "host" {
					t.Errorf("dashboard or nsredirect after the override: %+v", p.Services)
				}
			}
			c.measure("valid; backend labelled `80=3210`, waits for nsredirect healthy")
		})
	}
	if after, _ := os.ReadFile(official); !bytes.Equal(before, after) {
		t.Error("the official file changed")
	}
}

// checkConvexConfig looks for what the override must have added in a
// `config` rendering (YAML, from either compose generation).
func checkConvexConfig(t *testing.T, out string) {
	t.Helper()
	for _, re := range []string{
		`(?m)^  nsredirect:$`,
		`(?m)^  backend:$`,
		`(?m)^  dashboard:$`,
		`nsredirect.redirect: 80=3210`,
		`(?s)backend:.*depends_on:\s+nsredirect:\s+condition: service_healthy`,
		`image: ghcr.io/get-convex/convex-backend:`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("config output lacks %s:\n%s", re, out)
		}
	}
}

// TestConvexOverrideUp brings the official file's backend up with the
// override on Docker Engine 29, our Convex-shaped stand-in (the demo
// backend, whose /action fetches http://127.0.0.1/ as a Convex action
// does) tagged as the official backend image: no registry. nsredirect is
// healthy before the backend starts, the action reaches :3210 through the
// redirect, and `down` leaves nothing. (The dashboard is not started: its
// image is not here, and it waits on the backend's curl healthcheck, which
// our FROM scratch stand-in cannot run.)
func TestConvexOverrideUp(t *testing.T) {
	e := docker29(t)
	c := newCell(t, e.name+" + `docker compose` v5", "Convex: official file + override, `up -d backend`, /action")
	img, _ := e.makeImage(t)
	official, override := convexFiles(t)
	b, err := os.ReadFile(official)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`image: (ghcr.io/get-convex/convex-backend:\S+)`).FindStringSubmatch(string(b))
	if m == nil {
		t.Fatal("no backend image in the official file")
	}
	e.docker(t, "tag", img.backend, m[1])
	t.Cleanup(func() { _, _ = sh(time.Minute, e.env, cliPath, "rmi", m[1]) })

	pin := testenv.BPFFS(t)
	cp := newCompose(t, e, []string{dockerCLI(t), "compose"}, []string{official, override},
		"NSREDIRECT_IMAGE="+img.nsredirect,
		"NSREDIRECT_HOST_BPFFS="+filepath.Dir(pin),
		"NSREDIRECT_HOST_DOCKER_SOCK="+e.sock,
		// Published on loopback, on ports the kernel picks: this host is shared.
		"PORT=127.0.0.1:0", "SITE_PROXY_PORT=127.0.0.1:0", "DASHBOARD_PORT=127.0.0.1:0",
	)
	cp.run("up", "-d", "backend")
	if h := e.docker(t, "inspect", "-f", "{{.State.Health.Status}}", cp.id("nsredirect")); h != "healthy" {
		t.Fatalf("nsredirect is %q once backend started; backend must wait for it", h)
	}
	pid := e.pidOf(t, cp.id("backend"))
	waitRedirect(t, pid, "127.0.0.1:80", 5*time.Second)
	if out := inNetns(t, pid, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:3210/action"); !strings.Contains(out, "-> 200 hello from demo-backend") {
		t.Errorf("backend /action: %q; want its fetch of http://127.0.0.1/ to reach :3210", out)
	}
	clients(t, pid, "Convex backend")
	d := restartLatency(t, "compose restart backend", func() { cp.run("restart", "backend") }, cp.service("backend"))
	c.measure("/action reaches http://127.0.0.1/; restart followed in %s", ms(d))
	progs := testenv.ProgIDs(t, pin)
	cp.run("down", "-t", "5", "-v")
	testenv.AssertGone(t, pin, progs)
}
