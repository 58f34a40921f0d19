package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/deb"
	"github.com/goreleaser/nfpm/v2/files"
)

// debUnit is the unit the package installs: the tarball's, with the
// binary where a package puts it.
func debUnit(unit []byte) []byte {
	return bytes.ReplaceAll(unit, []byte("/usr/local/bin/nsredirect"), []byte("/usr/bin/nsredirect"))
}

// deb builds nsredirect_VERSION_ARCH.deb with nfpm: the binary, the unit
// (installed, neither enabled nor started: the package has no maintainer
// scripts), /etc/default/nsredirect as a conffile, the licences (the
// texts and /usr/share/doc/nsredirect/copyright, packaging/copyright), and
// the README with the manual's pages in /usr/share/doc/nsredirect/ (docs/
// below it).
func (r *release) deb(arch string, docs map[string][]byte) error {
	stage := filepath.Join(r.work, "deb-"+arch)
	if err := os.MkdirAll(stage, 0o755); err != nil {
		return err
	}
	put := func(name string, b []byte) (string, error) {
		p := filepath.Join(stage, name)
		return p, os.WriteFile(p, b, 0o644)
	}
	unit, err := put("nsredirect.service", debUnit(docs["deploy/systemd/nsredirect.service"]))
	if err != nil {
		return err
	}
	def, err := put("default", docs["packaging/nsredirect.default"])
	if err != nil {
		return err
	}
	copyright, err := put("copyright", docs["packaging/copyright"])
	if err != nil {
		return err
	}
	fi := func(mode os.FileMode) *files.ContentFileInfo {
		return &files.ContentFileInfo{Owner: "root", Group: "root", Mode: mode, MTime: r.Epoch}
	}
	contents := files.Contents{
		{Source: r.bins[arch], Destination: "/usr/bin/nsredirect", FileInfo: fi(0o755)},
		{Source: unit, Destination: "/lib/systemd/system/nsredirect.service", FileInfo: fi(0o644)},
		{Source: def, Destination: "/etc/default/nsredirect", Type: files.TypeConfigNoReplace, FileInfo: fi(0o644)},
		// Debian policy 12.5: the licences, machine-readable (DEP-5).
		{Source: copyright, Destination: "/usr/share/doc/nsredirect/copyright", FileInfo: fi(0o644)},
	}
	// The README and the manual, so its relative links resolve here too.
	shipped := append([]string{}, licenceFiles...)
	shipped = append(shipped, "README.md")
	shipped = append(shipped, docPages(docs)...)
	for _, p := range shipped {
		src, err := put(strings.ReplaceAll(p, "/", "_"), docs[p])
		if err != nil {
			return err
		}
		contents = append(contents, &files.Content{Source: src, Destination: "/usr/share/doc/nsredirect/" + p, FileInfo: fi(0o644)})
	}
	info := nfpm.WithDefaults(&nfpm.Info{
		Name:        "nsredirect",
		Arch:        arch,
		Platform:    "linux",
		Version:     r.Version,
		Section:     "net",
		Priority:    "optional",
		Maintainer:  "nsredirect maintainers <maintainers@nsredirect.invalid>",
		Description: "Loopback port redirects inside network namespaces with cgroup eBPF\nRewrites connect() to 127.0.0.1:PORT inside chosen network namespaces (containers,\npods) to another port, in the kernel, with no proxy and no iptables.",
		Homepage:    "https://github.com/nsredirect/nsredirect",
		License:     "Apache-2.0 AND (GPL-2.0-only OR BSD-2-Clause)",
		MTime:       r.Epoch,
		Overridables: nfpm.Overridables{
			Contents: contents,
		},
	})
	if err := nfpm.PrepareForPackager(info, "deb"); err != nil {
		return fmt.Errorf("deb %s: %w", arch, err)
	}
	var buf bytes.Buffer
	if err := deb.Default.Package(info, &buf); err != nil {
		return fmt.Errorf("deb %s: %w", arch, err)
	}
	name := deb.Default.ConventionalFileName(info)
	return os.WriteFile(filepath.Join(r.Out, name), buf.Bytes(), 0o644)
}
