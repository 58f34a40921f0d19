package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

const testVersion = "v0.0.0-test.1"

func repoRoot(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("NSREDIRECT_REPO"); p != "" {
		return p
	}
	p, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// manualPages are the pages of the checkout's docs/ ("docs/NAME.md"), which
// the tarball and the .deb ship beside README.md.
func manualPages(t *testing.T) []string {
	t.Helper()
	pages, err := filepath.Glob(filepath.Join(repoRoot(t), "docs", "*.md"))
	if err != nil || len(pages) == 0 {
		t.Fatalf("no pages in %s/docs: %v", repoRoot(t), err)
	}
	for i, p := range pages {
		pages[i] = "docs/" + filepath.Base(p)
	}
	for _, want := range []string{"docs/convex.md", "docs/cli.md", "docs/metrics.md"} {
		if !slices.Contains(pages, want) {
			t.Fatalf("%s is not among the pages of docs/: %v", want, pages)
		}
	}
	return pages
}

func buildInto(t *testing.T, out string) {
	t.Helper()
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	start := time.Now()
	if err := run([]string{"-repo", repoRoot(t), "-version", testVersion, "-out", out}); err != nil {
		t.Fatalf("release: %v", err)
	}
	t.Logf("release into %s: %s", out, time.Since(start).Round(time.Second))
}

// readDir returns every file under dir by relative name.
func readDir(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	m := map[string][]byte{}
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(dir, p)
		m[rel] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestRelease builds the release twice with the same VERSION and
// SOURCE_DATE_EPOCH into different directories, requires byte-identical
// files, then checks what each artifact holds.
func TestRelease(t *testing.T) {
	tmp := t.TempDir()
	a, b := filepath.Join(tmp, "a"), filepath.Join(tmp, "b")
	buildInto(t, a)
	buildInto(t, b)
	fa, fb := readDir(t, a), readDir(t, b)
	var names []string
	for n := range fa {
		names = append(names, n)
	}
	sort.Strings(names)
	want := []string{
		"SHA256SUMS",
		"nsredirect_0.0.0~test.1_amd64.deb",
		"nsredirect_0.0.0~test.1_arm64.deb",
		"nsredirect_" + testVersion + ".spdx.json",
		"nsredirect_" + testVersion + "_image_linux_amd64.tar",
		"nsredirect_" + testVersion + "_image_linux_arm64.tar",
		"nsredirect_" + testVersion + "_image_oci_index.tar",
		"nsredirect_" + testVersion + "_linux_amd64.tar.gz",
		"nsredirect_" + testVersion + "_linux_arm64.tar.gz",
	}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("dist holds\n  %s\nwant\n  %s", strings.Join(names, "\n  "), strings.Join(want, "\n  "))
	}

	t.Run("Reproducible", func(t *testing.T) {
		for _, n := range names {
			if !bytes.Equal(fa[n], fb[n]) {
				t.Errorf("%s differs between two builds of the same version (%d vs %d bytes)", n, len(fa[n]), len(fb[n]))
			}
		}
	})
	t.Run("SHA256SUMS", func(t *testing.T) {
		cmd := exec.Command("sha256sum", "-c", "--strict", "SHA256SUMS")
		cmd.Dir = a
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("sha256sum -c: %v\n%s", err, out)
		}
		if got := strings.Count(string(out), ": OK"); got != len(names)-1 {
			t.Errorf("sha256sum -c checked %d files, want %d:\n%s", got, len(names)-1, out)
		}
	})
	for _, arch := range Arches {
		t.Run("Tarball_"+arch, func(t *testing.T) { checkTarball(t, a, arch) })
		t.Run("Deb_"+arch, func(t *testing.T) { checkDeb(t, a, arch) })
		t.Run("Image_"+arch, func(t *testing.T) { checkImage(t, a, arch) })
	}
	t.Run("OCIIndex", func(t *testing.T) { checkIndex(t, a) })
	t.Run("SBOM", func(t *testing.T) { checkSBOM(t, fa["nsredirect_"+testVersion+".spdx.json"]) })
	t.Run("CtrImport", func(t *testing.T) { checkCtrImport(t, a) })
	t.Run("DockerLoad", func(t *testing.T) { checkDockerLoad(t, a) })
}

func tarEntries(t *testing.T, r io.Reader) map[string]*tar.Header {
	t.Helper()
	m := map[string]*tar.Header{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return m
		}
		if err != nil {
			t.Fatal(err)
		}
		m[h.Name] = h
	}
}

func checkTarball(t *testing.T, dist, arch string) {
	top := "nsredirect_" + testVersion + "_linux_" + arch
	f, err := os.Open(filepath.Join(dist, top+".tar.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	ents := tarEntries(t, zr)
	for _, n := range append([]string{"nsredirect", "LICENSE", "LICENSES/GPL-2.0-only.txt", "LICENSES/BSD-2-Clause.txt", "README.md", "nsredirect.service"}, manualPages(t)...) {
		h, ok := ents[top+"/"+n]
		if !ok {
			t.Errorf("%s.tar.gz has no %s", top, n)
			continue
		}
		if h.Uid != 0 || h.Gid != 0 || h.Uname != "root" || !h.ModTime.Equal(time.Unix(1700000000, 0)) {
			t.Errorf("%s: owner %d:%d %s, mtime %s: want root and SOURCE_DATE_EPOCH", n, h.Uid, h.Gid, h.Uname, h.ModTime)
		}
	}
	if arch != "amd64" {
		return
	}
	// The host runs amd64: the binary is static and prints the VERSION.
	dir := t.TempDir()
	cmd := exec.Command("tar", "-xzf", filepath.Join(dist, top+".tar.gz"), "-C", dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tar -x: %v\n%s", err, out)
	}
	bin := filepath.Join(dir, top, "nsredirect")
	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "nsredirect "+testVersion+" ") {
		t.Errorf("nsredirect version = %q, %v; want it to start with %q", out, err, "nsredirect "+testVersion)
	}
	if out, _ := exec.Command("file", bin).CombinedOutput(); len(out) > 0 && !strings.Contains(string(out), "statically linked") {
		t.Errorf("the binary is not static: %s", out)
	}
}

func checkDeb(t *testing.T, dist, arch string) {
	deb := filepath.Join(dist, "nsredirect_0.0.0~test.1_"+arch+".deb")
	dpkg, err := exec.LookPath("dpkg-deb")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("dpkg-deb is not installed (Debian's dpkg)")
		}
		t.Skip("dpkg-deb is not installed")
	}
	field := func(f string) string {
		out, err := exec.Command(dpkg, "-f", deb, f).Output()
		if err != nil {
			t.Fatalf("dpkg-deb -f %s: %v", f, err)
		}
		return strings.TrimSpace(string(out))
	}
	if got := field("Architecture"); got != arch {
		t.Errorf("Architecture = %q, want %q", got, arch)
	}
	if got := field("Version"); got != "0.0.0~test.1" {
		t.Errorf("Version = %q", got)
	}
	out, err := exec.Command(dpkg, "-c", deb).Output()
	if err != nil {
		t.Fatal(err)
	}
	installed := []string{"./usr/bin/nsredirect", "./lib/systemd/system/nsredirect.service", "./etc/default/nsredirect", "./usr/share/doc/nsredirect/LICENSES/GPL-2.0-only.txt", "./usr/share/doc/nsredirect/copyright", "./usr/share/doc/nsredirect/README.md"}
	for _, p := range manualPages(t) {
		installed = append(installed, "./usr/share/doc/nsredirect/"+p)
	}
	for _, p := range installed {
		if !strings.Contains(string(out), " "+p+"\n") {
			t.Errorf("%s does not install %s:\n%s", filepath.Base(deb), p, out)
		}
	}
	ctl := t.TempDir()
	if out, err := exec.Command(dpkg, "-e", deb, ctl).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -e: %v\n%s", err, out)
	}
	// No maintainer script: nothing enables or starts the unit.
	for _, s := range []string{"preinst", "postinst", "prerm", "postrm"} {
		if _, err := os.Stat(filepath.Join(ctl, s)); err == nil {
			t.Errorf("the package has a %s; the unit must not be started by the package", s)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(ctl, "conffiles")); strings.TrimSpace(string(b)) != "/etc/default/nsredirect" {
		t.Errorf("conffiles = %q, want /etc/default/nsredirect", b)
	}
	x := t.TempDir()
	if out, err := exec.Command(dpkg, "-x", deb, x).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -x: %v\n%s", err, out)
	}
	copyright, err := os.ReadFile(filepath.Join(x, "usr/share/doc/nsredirect/copyright"))
	if err != nil {
		t.Errorf("%s has no /usr/share/doc/nsredirect/copyright: %v", filepath.Base(deb), err)
	} else {
		checkDEP5(t, string(copyright))
	}
	unit, _ := os.ReadFile(filepath.Join(x, "lib/systemd/system/nsredirect.service"))
	if !strings.Contains(string(unit), "\nExecStart=/usr/bin/nsredirect docker\n") || !strings.Contains(string(unit), "EnvironmentFile=-/etc/default/nsredirect") {
		t.Errorf("the packaged unit does not run /usr/bin/nsredirect with /etc/default/nsredirect:\n%s", unit)
	}
}

// checkDEP5 checks a debian/copyright in the machine-readable format
// (DEP-5): the Format header, the Go code under Apache-2.0 and the BPF C
// under GPL-2.0-only or BSD-2-Clause, and a License paragraph with text for
// every licence a Files paragraph names.
func checkDEP5(t *testing.T, text string) {
	t.Helper()
	var paras []map[string]string
	for _, p := range strings.Split(strings.TrimSpace(text), "\n\n") {
		fields := map[string]string{}
		var last string
		for _, line := range strings.Split(p, "\n") {
			if strings.HasPrefix(line, " ") && last != "" {
				fields[last] += "\n" + strings.TrimSpace(line)
				continue
			}
			k, v, ok := strings.Cut(line, ":")
			if !ok || strings.ContainsAny(k, " \t") {
				t.Fatalf("copyright: not a DEP-5 field line: %q", line)
			}
			last, fields[k] = k, strings.TrimSpace(v)
		}
		paras = append(paras, fields)
	}
	if paras[0]["Format"] != "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/" {
		t.Errorf("copyright: first paragraph has Format %q, want the DEP-5 1.0 URL", paras[0]["Format"])
	}
	licenceOf := map[string]string{} // a Files pattern -> its licence
	defined := map[string]bool{}
	for _, p := range paras[1:] {
		name, body, _ := strings.Cut(p["License"], "\n")
		if files, ok := p["Files"]; ok {
			if p["Copyright"] == "" || name == "" {
				t.Errorf("copyright: Files %q lacks Copyright or License", files)
			}
			for _, f := range strings.Fields(files) {
				licenceOf[f] = name
			}
			continue
		}
		if strings.TrimSpace(body) == "" {
			t.Errorf("copyright: License paragraph %q has no text", name)
		}
		defined[name] = true
	}
	for pattern, want := range map[string]string{"*": "Apache-2.0", "bpf/*.c": "GPL-2.0-only or BSD-2-Clause"} {
		if got := licenceOf[pattern]; got != want {
			t.Errorf("copyright: Files %s is under %q, want %q", pattern, got, want)
		}
	}
	for pattern, l := range licenceOf {
		l = strings.TrimSuffix(l, " with Linux-syscall-note exception")
		for _, name := range strings.Split(l, " or ") {
			if !defined[name] && !defined[licenceOf[pattern]] {
				t.Errorf("copyright: Files %s names licence %q, which no License paragraph gives", pattern, name)
			}
		}
	}
}

func checkImage(t *testing.T, dist, arch string) {
	p := filepath.Join(dist, "nsredirect_"+testVersion+"_image_linux_"+arch+".tar")
	img, err := tarball.ImageFromPath(p, nil)
	if err != nil {
		t.Fatalf("%s is not a docker-archive image: %v", filepath.Base(p), err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.Architecture != arch || cf.OS != "linux" || strings.Join(cf.Config.Entrypoint, " ") != "nsredirect" {
		t.Errorf("config: %s/%s entrypoint %v", cf.OS, cf.Architecture, cf.Config.Entrypoint)
	}
	if err := checkImageSize(p, img); err != nil {
		t.Error(err)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	ents := tarEntries(t, rc)
	for _, n := range []string{"usr/local/bin/nsredirect", "usr/share/doc/nsredirect/LICENSES/GPL-2.0-only.txt"} {
		if _, ok := ents[n]; !ok {
			t.Errorf("image %s has no /%s", arch, n)
		}
	}
}

func checkIndex(t *testing.T, dist string) {
	dir := t.TempDir()
	if err := untar(filepath.Join(dist, "nsredirect_"+testVersion+"_image_oci_index.tar"), dir); err != nil {
		t.Fatal(err)
	}
	p, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	top, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	tm, err := top.IndexManifest()
	if err != nil || len(tm.Manifests) != 1 {
		t.Fatalf("index.json: %v, %v", tm, err)
	}
	idx, err := top.ImageIndex(tm.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range im.Manifests {
		got = append(got, m.Platform.OS+"/"+m.Platform.Architecture)
		img, err := idx.Image(m.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil || cf.Architecture != m.Platform.Architecture {
			t.Errorf("manifest for %s holds a %s image (%v)", m.Platform.Architecture, cf.Architecture, err)
		}
	}
	if strings.Join(got, " ") != "linux/amd64 linux/arm64" {
		t.Errorf("index platforms = %v, want linux/amd64 linux/arm64", got)
	}
}

func checkSBOM(t *testing.T, b []byte) {
	var doc spdxDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("SBOM is not JSON: %v", err)
	}
	if doc.SPDXVersion != "SPDX-2.3" || doc.Packages[0].VersionInfo != testVersion {
		t.Errorf("SBOM: %s, root version %q", doc.SPDXVersion, doc.Packages[0].VersionInfo)
	}
	// The toolchain the bytes depend on is recorded, and is the pinned one.
	gomod, err := os.ReadFile(filepath.Join(repoRoot(t), "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	pinned, err := pinnedGo(gomod)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(doc.CreationInfo.Comment, "Built with "+pinned+",") {
		t.Errorf("SBOM creationInfo.comment = %q; want it to name %s", doc.CreationInfo.Comment, pinned)
	}
	var found bool
	for _, p := range doc.Packages {
		if p.Name == "github.com/cilium/ebpf" && p.VersionInfo != "" {
			found = true
		}
		if p.Name == "stdlib" && "go"+p.VersionInfo != pinned {
			t.Errorf("SBOM stdlib %s; the binaries must be built with %s", p.VersionInfo, pinned)
		}
	}
	if !found {
		t.Error("SBOM does not list github.com/cilium/ebpf, which the binary links")
	}
}

// checkCtrImport imports each architecture's image tarball (into a
// namespace of its own: both carry the same tag) and the OCI index into a
// containerd of its own (own root, state and socket, stopped at cleanup by
// pid), as a user's `ctr images import` would, and checks the platforms ctr
// lists for each.
func checkCtrImport(t *testing.T, dist string) {
	tools := needRoot(t, "ctr", "containerd")
	ctr, containerd := tools[0], tools[1]
	// A short path: the socket path must fit in sun_path.
	dir, err := os.MkdirTemp("/var/tmp", "nsr-ctr-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "sock")
	cfg := filepath.Join(dir, "config.toml")
	// No CRI plugin, no snapshotter beyond the native one: import only.
	if err := os.WriteFile(cfg, []byte("version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(containerd, "--config", cfg, "--root", filepath.Join(dir, "root"), "--state", filepath.Join(dir, "state"), "--address", sock)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	waitSocket(t, sock, &logs)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ctrRun := func(ns string, args ...string) string {
		out, err := exec.CommandContext(ctx, ctr, append([]string{"--address", sock, "--namespace", ns}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ctr -n %s %s: %v\n%s\ncontainerd:\n%s", ns, strings.Join(args, " "), err, out, logs.String())
		}
		return string(out)
	}
	ref := "ghcr.io/nsredirect/nsredirect:" + testVersion
	imported := map[string]string{} // namespace -> the platforms its images must list
	for _, arch := range Arches {
		ns := "nsr-test-" + arch
		ctrRun(ns, "images", "import", "--platform", "linux/"+arch, filepath.Join(dist, "nsredirect_"+testVersion+"_image_linux_"+arch+".tar"))
		imported[ns] = "linux/" + arch
	}
	ctrRun("nsr-test-index", "images", "import", "--all-platforms", "--index-name", "nsr-index:"+testVersion, filepath.Join(dist, "nsredirect_"+testVersion+"_image_oci_index.tar"))
	imported["nsr-test-index"] = "linux/amd64,linux/arm64"
	for ns, want := range imported {
		ls := ctrRun(ns, "images", "ls")
		if got := ctrPlatforms(ls, ref); got != want {
			t.Errorf("ctr -n %s images ls: %s lists platforms %q, want %q:\n%s", ns, ref, got, want, ls)
		}
		// Every blob the imported images name is in the content store.
		if out := ctrRun(ns, "images", "check"); strings.Contains(out, "incomplete") || strings.Contains(out, "missing") {
			t.Errorf("ctr -n %s images check:\n%s", ns, out)
		}
	}
}

// ctrPlatforms returns the PLATFORMS column of ref in `ctr images ls`
// output (REF TYPE DIGEST SIZE PLATFORMS LABELS; SIZE is two words).
func ctrPlatforms(ls, ref string) string {
	for _, line := range strings.Split(ls, "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && f[0] == ref {
			return f[5]
		}
	}
	return ""
}

// needRoot returns the path of each tool, skipping (failing under CI=true)
// without them or without root.
func needRoot(t *testing.T, tools ...string) []string {
	t.Helper()
	var paths []string
	for _, name := range tools {
		p, err := exec.LookPath(name)
		if err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is not installed (make deps installs docker.io)", name)
			}
			t.Skipf("%s is not installed", name)
		}
		paths = append(paths, p)
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("this check needs root")
		}
		t.Skip("needs root")
	}
	return paths
}

// waitSocket waits until something accepts on sock; the daemons started
// here have no readiness signal but their socket.
func waitSocket(t *testing.T, sock string, logs *bytes.Buffer) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listened on %s within 60s:\n%s", sock, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkDockerLoad loads both architectures' tarballs into a dockerd of its
// own (own data root, exec root, socket and pidfile; no networking; stopped
// at cleanup by pid) and runs the host's: `nsredirect version` prints the
// VERSION.
func checkDockerLoad(t *testing.T, dist string) {
	tools := needRoot(t, "dockerd", "docker")
	dockerd, docker := tools[0], tools[1]
	dir, err := os.MkdirTemp("/var/tmp", "nsr-dockerd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "sock")
	cmd := exec.Command(dockerd, "--data-root", filepath.Join(dir, "data"), "--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "pid"), "-H", "unix://"+sock,
		"--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false")
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	waitSocket(t, sock, &logs)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dockerRun := func(args ...string) string {
		out, err := exec.CommandContext(ctx, docker, append([]string{"-H", "unix://" + sock}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("docker %s: %v\n%s\ndockerd:\n%s", strings.Join(args, " "), err, out, logs.String())
		}
		return string(out)
	}
	ref := "ghcr.io/nsredirect/nsredirect:" + testVersion
	for _, arch := range []string{"arm64", "amd64"} { // the host's last: it keeps the tag
		out := dockerRun("load", "-i", filepath.Join(dist, "nsredirect_"+testVersion+"_image_linux_"+arch+".tar"))
		if !strings.Contains(out, "Loaded image: "+ref) {
			t.Errorf("docker load %s: %s", arch, out)
		}
		if got := strings.TrimSpace(dockerRun("image", "inspect", "-f", "{{.Architecture}}", ref)); got != arch {
			t.Errorf("loaded %s image has architecture %q", arch, got)
		}
	}
	if out := dockerRun("run", "--rm", "--network", "none", ref, "version"); !strings.HasPrefix(out, "nsredirect "+testVersion+" ") {
		t.Errorf("docker run %s version = %q", ref, out)
	}
}

// TestBadInput: a usage error names the bad value and a fix, exit 2.
func TestBadInput(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	for _, tc := range []struct {
		args []string
		env  string
		want string
	}{
		{[]string{"-version", "1.2.3"}, "1700000000", `-version "1.2.3"`},
		{[]string{"-version", "v1.2"}, "1700000000", `-version "v1.2"`},
		{[]string{"-version", "v1.2.3"}, "yesterday", `SOURCE_DATE_EPOCH="yesterday"`},
		{[]string{"-version", "v1.2.3"}, "", "SOURCE_DATE_EPOCH is not set"},
		{[]string{"-version", "v1.2.3", "-repo", t.TempDir()}, "1700000000", "not an nsredirect checkout"},
	} {
		t.Setenv("SOURCE_DATE_EPOCH", tc.env)
		err := run(append(tc.args, "-out", filepath.Join(t.TempDir(), "dist")))
		if !errors.Is(err, errUsage) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("release %v (SOURCE_DATE_EPOCH=%q) = %v; want a usage error naming %s", tc.args, tc.env, err, tc.want)
		}
	}
}

func TestPinnedGo(t *testing.T) {
	for _, tc := range []struct{ gomod, want string }{
		{"module m\n\ngo 1.26.8\n", "go1.26.8"},
		{"module m\n\ngo 1.26.0\n\ntoolchain go1.26.8\n", "go1.26.8"},
		{"module m\n\ngo 1.26.8 // the release toolchain\n", "go1.26.8"},
		{"module m\n\ngo 1.26.8\ntoolchain default\n", "go1.26.8"},
	} {
		if got, err := pinnedGo([]byte(tc.gomod)); err != nil || got != tc.want {
			t.Errorf("pinnedGo(%q) = %q, %v; want %q", tc.gomod, got, err, tc.want)
		}
	}
	if got, err := pinnedGo([]byte("module m\n")); err == nil {
		t.Errorf("pinnedGo of a go.mod with no go line = %q, want an error", got)
	}
	// The checkout's own pin is a full release: a go line of "1.26" would
	// let any 1.26.x build the bytes.
	gomod, err := os.ReadFile(filepath.Join(repoRoot(t), "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := pinnedGo(gomod); err != nil || strings.Count(got, ".") != 2 {
		t.Errorf("the checkout's go.mod pins %q (%v); want a go1.X.Y release", got, err)
	}
}

// TestToolchainRefused: another Go than the pinned one refuses the release,
// exit 2, one line naming both versions and the fix, before anything is
// built (a fake go in PATH that reports go1.99.0).
func TestToolchainRefused(t *testing.T) {
	if err := checkToolchain("go1.26.8", "go1.26.8"); err != nil {
		t.Errorf("the pinned toolchain is refused: %v", err)
	}
	bin := t.TempDir()
	fake := "#!/bin/sh\n[ \"$GOTOOLCHAIN\" = local ] || { echo \"GOTOOLCHAIN=$GOTOOLCHAIN\" >&2; exit 1; }\n" +
		"[ \"$*\" = \"env GOVERSION\" ] && { echo go1.99.0; exit 0; }\necho \"unexpected: go $*\" >&2; exit 1\n"
	if err := os.WriteFile(filepath.Join(bin, "go"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	t.Setenv("GOTOOLCHAIN", "go1.26.8") // would be a download: the release forces local
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	gomod, err := os.ReadFile(filepath.Join(repoRoot(t), "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	pinned, err := pinnedGo(gomod)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "dist")
	err = run([]string{"-repo", repoRoot(t), "-version", "v1.2.3", "-out", out})
	if !errors.Is(err, errUsage) {
		t.Fatalf("release with go1.99.0 = %v; want a usage error (exit 2)", err)
	}
	msg := err.Error()
	for _, want := range []string{"go1.99.0", pinned, "PATH"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not name %s", msg, want)
		}
	}
	if strings.Contains(msg, "\n") {
		t.Errorf("error is not one line: %q", msg)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("the refused release created %s (%v)", out, err)
	}
}

// TestTagTrigger: the release workflow runs on exactly the tags
// tools/release accepts as a version. A tag that triggers it but is refused
// would fail the release half way; one it accepts but never triggers on
// would never be released.
func TestTagTrigger(t *testing.T) {
	wf, err := os.ReadFile(filepath.Join(repoRoot(t), ".github/workflows/release.yml"))
	if err != nil {
		t.Fatal(err)
	}
	globs := workflowTagFilters(t, string(wf))
	var filters []*regexp.Regexp
	for _, g := range globs {
		filters = append(filters, githubFilterRE(t, g))
	}
	for _, tag := range []string{
		"v1.2.3", "v0.0.0", "v10.20.30", "v1.2.3-rc1", "v1.2.3-rc.1", "v0.0.0-test.1", "v1.2.3-RC.10",
		"v1.2.3+x", "v1.2.3-rc.1+build.5", "v1.2.3-", "v1.2.3-rc.", "v1.2.3-.1", "v1.2.3-rc..1",
		"v1.2.3-a.b.c", "v1.2.3-rc_1", "v1.2.3-rc-1", "v1.2", "v1.2.3.4", "1.2.3", "v1.2.3x", "vX.Y.Z", "v1.2.3/x",
	} {
		triggers := false
		for _, f := range filters {
			triggers = triggers || f.MatchString(tag)
		}
		if accepted := versionRE.MatchString(tag); triggers != accepted {
			t.Errorf("tag %q: triggers the release workflow %v (%v), accepted by versionRE %v", tag, triggers, globs, accepted)
		}
	}
}

// workflowTagFilters returns the on.push.tags list of a workflow written as
// release.yml writes it: `tags:` then one `- "PATTERN"` per line.
func workflowTagFilters(t *testing.T, wf string) []string {
	t.Helper()
	var globs []string
	in := false
	for _, line := range strings.Split(wf, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case trimmed == "tags:":
			in = true
		case in && strings.HasPrefix(trimmed, "- "):
			g, err := strconv.Unquote(strings.TrimPrefix(trimmed, "- "))
			if err != nil {
				t.Fatalf("release.yml: tag filter %s: %v", trimmed, err)
			}
			globs = append(globs, g)
		case in && !strings.HasPrefix(trimmed, "#"):
			in = false
		}
	}
	if len(globs) == 0 {
		t.Fatal("release.yml: no on.push.tags list")
	}
	return globs
}

// githubFilterRE translates a GitHub Actions filter pattern (the subset the
// release workflow uses: *, +, ? and [ranges]; everything else literal) to
// an anchored regexp.
func githubFilterRE(t *testing.T, glob string) *regexp.Regexp {
	t.Helper()
	var b strings.Builder
	b.WriteString("^")
	for i := 0; i < len(glob); i++ {
		switch c := glob[i]; c {
		case '*':
			if strings.HasPrefix(glob[i:], "**") {
				b.WriteString(".*")
				i++
			} else {
				b.WriteString("[^/]*")
			}
		case '+', '?':
			b.WriteByte(c)
		case '[':
			j := strings.IndexByte(glob[i:], ']')
			if j < 0 {
				t.Fatalf("filter %q: unclosed [", glob)
			}
			b.WriteString(glob[i : i+j+1])
			i += j
		case '!', '\\':
			t.Fatalf("filter %q: %c is not handled here", glob, c)
		default:
			b.WriteString(regexp.QuoteMeta(string(c)))
		}
	}
	b.WriteString("$")
	return regexp.MustCompile(b.String())
}

// TestDebCopyright checks packaging/copyright, which the .debs install as
// /usr/share/doc/nsredirect/copyright, without building (checkDeb checks
// that they do).
func TestDebCopyright(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "packaging/copyright"))
	if err != nil {
		t.Fatal(err)
	}
	checkDEP5(t, string(b))
}
