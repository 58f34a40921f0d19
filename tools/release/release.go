package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Arches are the architectures released, in Go's and Debian's spelling
// (they agree for these two).
var Arches = []string{"amd64", "arm64"}

// ImageCap is what an image must stay under per architecture, measured as
// a user pulls or loads it: the compressed layers, and the tarball. 25 MB,
// in bytes, as `make image` and test/docker check the `docker save` archive.
const ImageCap = 25_000_000

type release struct {
	Repo    string
	Version string
	Out     string
	Image   string
	Epoch   time.Time

	goVersion string            // the pinned toolchain, checked to be the one running
	work      string            // scratch directory, removed at the end
	bins      map[string]string // arch -> built binary
}

// file is one entry of an archive this tool writes.
type file struct {
	Name string // path inside the archive, no leading slash
	Mode int64
	Data []byte // nil for a directory
}

func (r *release) build() error {
	repo, err := filepath.Abs(r.Repo)
	if err != nil {
		return err
	}
	r.Repo = repo
	if _, err := os.Stat(filepath.Join(repo, "cmd", "nsredirect")); err != nil {
		return fmt.Errorf("%w: -repo %s: not an nsredirect checkout (no cmd/nsredirect)", errUsage, repo)
	}
	if r.goVersion, err = r.toolchain(); err != nil {
		return err
	}
	if r.work, err = os.MkdirTemp("", "nsr-release-"); err != nil {
		return err
	}
	defer os.RemoveAll(r.work)
	if err := os.RemoveAll(r.Out); err != nil {
		return err
	}
	if err := os.MkdirAll(r.Out, 0o755); err != nil {
		return err
	}
	r.bins = map[string]string{}
	for _, arch := range Arches {
		if err := r.buildBinary(arch); err != nil {
			return err
		}
	}
	docs, err := r.docs()
	if err != nil {
		return err
	}
	for _, arch := range Arches {
		if err := r.tarball(arch, docs); err != nil {
			return err
		}
		if err := r.deb(arch, docs); err != nil {
			return err
		}
	}
	if err := r.images(docs); err != nil {
		return err
	}
	if err := r.sbom(); err != nil {
		return err
	}
	return r.sums()
}

func (r *release) base() string { return "nsredirect_" + r.Version }

func (r *release) buildBinary(arch string) error {
	out := filepath.Join(r.work, "nsredirect_linux_"+arch)
	// -buildvcs=false and -buildid= keep the bytes a function of the source
	// and VERSION alone, whatever the checkout's git state.
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false",
		"-ldflags", "-s -w -buildid= -X github.com/nsredirect/nsredirect/internal/cli.Version="+r.Version,
		"-o", out, "./cmd/nsredirect")
	cmd.Dir = r.Repo
	cmd.Env = goEnv("CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch, "GOFLAGS=-mod=readonly")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build linux/%s: %v\n%s", arch, err, b)
	}
	r.bins[arch] = out
	return nil
}

// docs are the files every artifact carries: the licences, README, the
// manual's pages (docs/*.md, see docPages) and the systemd unit as the
// tarball ships it.
func (r *release) docs() (map[string][]byte, error) {
	d := map[string][]byte{}
	pages, err := filepath.Glob(filepath.Join(r.Repo, "docs", "*.md"))
	if err != nil {
		return nil, err
	}
	if len(pages) == 0 {
		return nil, fmt.Errorf("release needs the pages of %s: none found", filepath.Join(r.Repo, "docs"))
	}
	paths := []string{"LICENSE", "LICENSES/Apache-2.0.txt", "LICENSES/GPL-2.0-only.txt", "LICENSES/BSD-2-Clause.txt", "LICENSES/README.md", "README.md", "deploy/systemd/nsredirect.service", "packaging/nsredirect.default", "packaging/copyright"}
	for _, p := range pages {
		paths = append(paths, "docs/"+filepath.Base(p))
	}
	for _, p := range paths {
		b, err := os.ReadFile(filepath.Join(r.Repo, p))
		if err != nil {
			return nil, fmt.Errorf("release needs %s: %w", p, err)
		}
		d[p] = b
	}
	return d, nil
}

// docPages are the manual's pages among docs, "docs/NAME.md", sorted. They
// ship beside README.md under docs/, so its relative links resolve in the
// tarball and in /usr/share/doc/nsredirect alike.
func docPages(docs map[string][]byte) []string {
	var pages []string
	for p := range docs {
		if strings.HasPrefix(p, "docs/") {
			pages = append(pages, p)
		}
	}
	sort.Strings(pages)
	return pages
}

var licenceFiles = []string{"LICENSE", "LICENSES/Apache-2.0.txt", "LICENSES/BSD-2-Clause.txt", "LICENSES/GPL-2.0-only.txt", "LICENSES/README.md"}

func (r *release) tarball(arch string, docs map[string][]byte) error {
	bin, err := os.ReadFile(r.bins[arch])
	if err != nil {
		return err
	}
	top := r.base() + "_linux_" + arch
	files := []file{{Name: top + "/", Mode: 0o755}, {Name: top + "/nsredirect", Mode: 0o755, Data: bin}}
	files = append(files, file{Name: top + "/LICENSES/", Mode: 0o755})
	for _, p := range licenceFiles {
		files = append(files, file{Name: top + "/" + p, Mode: 0o644, Data: docs[p]})
	}
	files = append(files,
		file{Name: top + "/README.md", Mode: 0o644, Data: docs["README.md"]},
		file{Name: top + "/docs/", Mode: 0o755})
	for _, p := range docPages(docs) {
		files = append(files, file{Name: top + "/" + p, Mode: 0o644, Data: docs[p]})
	}
	files = append(files,
		file{Name: top + "/nsredirect.service", Mode: 0o644, Data: docs["deploy/systemd/nsredirect.service"]})
	var buf bytes.Buffer
	if err := r.writeTarGz(&buf, files); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(r.Out, top+".tar.gz"), buf.Bytes(), 0o644)
}

// writeTar writes files in the order given, owned by root, at the epoch.
func (r *release) writeTar(w io.Writer, files []file) error {
	tw := tar.NewWriter(w)
	for _, f := range files {
		h := &tar.Header{
			Name: f.Name, Mode: f.Mode, ModTime: r.Epoch,
			Uid: 0, Gid: 0, Uname: "root", Gname: "root", Format: tar.FormatPAX,
		}
		if strings.HasSuffix(f.Name, "/") {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(f.Data))
		}
		// PAX without access/change times: only ModTime, which we fix.
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := tw.Write(f.Data); err != nil {
			return err
		}
	}
	return tw.Close()
}

func (r *release) writeTarGz(w io.Writer, files []file) error {
	zw, err := gzip.NewWriterLevel(w, gzip.BestCompression)
	if err != nil {
		return err
	}
	// No name and a zero mtime in the gzip header.
	if err := r.writeTar(zw, files); err != nil {
		return err
	}
	return zw.Close()
}

// sums writes SHA256SUMS over every file in Out, sorted by name, in the
// format `sha256sum -c` reads.
func (r *release) sums() error {
	entries, err := os.ReadDir(r.Out)
	if err != nil {
		return err
	}
	var names []string
	for _, e := range entries {
		if e.Type().IsRegular() && e.Name() != "SHA256SUMS" {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		f, err := os.Open(filepath.Join(r.Out, n))
		if err != nil {
			return err
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s  %s\n", hex.EncodeToString(h.Sum(nil)), n)
	}
	return os.WriteFile(filepath.Join(r.Out, "SHA256SUMS"), []byte(b.String()), 0o644)
}
