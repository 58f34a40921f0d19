package main

import (
	"archive/tar"
	"crypto/sha256"
	"debug/buildinfo"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// SPDX 2.3 JSON, the fields this SBOM fills.
type spdxDoc struct {
	SPDXVersion       string         `json:"spdxVersion"`
	DataLicense       string         `json:"dataLicense"`
	SPDXID            string         `json:"SPDXID"`
	Name              string         `json:"name"`
	DocumentNamespace string         `json:"documentNamespace"`
	CreationInfo      spdxCreation   `json:"creationInfo"`
	Packages          []spdxPackage  `json:"packages"`
	Relationships     []spdxRelation `json:"relationships"`
}

type spdxCreation struct {
	Created  string   `json:"created"`
	Creators []string `json:"creators"`
	Comment  string   `json:"comment,omitempty"`
}

type spdxPackage struct {
	SPDXID           string       `json:"SPDXID"`
	Name             string       `json:"name"`
	VersionInfo      string       `json:"versionInfo"`
	DownloadLocation string       `json:"downloadLocation"`
	FilesAnalyzed    bool         `json:"filesAnalyzed"`
	LicenseConcluded string       `json:"licenseConcluded"`
	LicenseDeclared  string       `json:"licenseDeclared"`
	CopyrightText    string       `json:"copyrightText"`
	Checksums        []spdxSum    `json:"checksums,omitempty"`
	ExternalRefs     []spdxExtRef `json:"externalRefs,omitempty"`
	Comment          string       `json:"comment,omitempty"`
}

type spdxSum struct {
	Algorithm     string `json:"algorithm"`
	ChecksumValue string `json:"checksumValue"`
}

type spdxExtRef struct {
	Category string `json:"referenceCategory"`
	Type     string `json:"referenceType"`
	Locator  string `json:"referenceLocator"`
}

type spdxRelation struct {
	Element string `json:"spdxElementId"`
	Type    string `json:"relationshipType"`
	Related string `json:"relatedSpdxElement"`
}

func spdxID(s string) string {
	var b strings.Builder
	for _, c := range s {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' {
			b.WriteRune(c)
		} else {
			b.WriteByte('-')
		}
	}
	return "SPDXRef-" + b.String()
}

// sbom writes nsredirect_VERSION.spdx.json: the binaries' Go module graph as
// the linker recorded it (debug/buildinfo: exactly the modules linked in,
// with their go.sum hashes), the Go toolchain, and a checksum per binary.
func (r *release) sbom() error {
	bi, err := buildinfo.ReadFile(r.bins[Arches[0]])
	if err != nil {
		return fmt.Errorf("sbom: %w", err)
	}
	root := spdxPackage{
		SPDXID: "SPDXRef-nsredirect", Name: "github.com/nsredirect/nsredirect", VersionInfo: r.Version,
		DownloadLocation: "https://github.com/nsredirect/nsredirect", LicenseConcluded: "NOASSERTION",
		LicenseDeclared: "Apache-2.0 AND (GPL-2.0-only OR BSD-2-Clause)", CopyrightText: "NOASSERTION",
		ExternalRefs: []spdxExtRef{{"PACKAGE-MANAGER", "purl", "pkg:golang/github.com/nsredirect/nsredirect@" + r.Version}},
	}
	for _, arch := range Arches {
		sum, err := fileSHA256(r.bins[arch])
		if err != nil {
			return err
		}
		root.Comment += fmt.Sprintf("linux/%s binary sha256 %s. ", arch, sum)
	}
	root.Comment = strings.TrimSpace(root.Comment)
	doc := spdxDoc{
		SPDXVersion: "SPDX-2.3", DataLicense: "CC0-1.0", SPDXID: "SPDXRef-DOCUMENT",
		Name:              "nsredirect-" + r.Version,
		DocumentNamespace: "https://github.com/nsredirect/nsredirect/releases/" + r.Version + "/sbom",
		CreationInfo: spdxCreation{
			Created:  r.Epoch.Format("2006-01-02T15:04:05Z"),
			Creators: []string{"Tool: nsredirect-tools-release"},
			Comment: fmt.Sprintf("Built with %s, the toolchain the checkout's go.mod pins (tools/release refuses any other): "+
				"the same VERSION and SOURCE_DATE_EPOCH give the same bytes only with that Go version.", r.goVersion),
		},
		Packages: []spdxPackage{root, {
			SPDXID: "SPDXRef-go-stdlib", Name: "stdlib", VersionInfo: strings.TrimPrefix(bi.GoVersion, "go"),
			DownloadLocation: "https://go.dev/dl/", LicenseConcluded: "NOASSERTION", LicenseDeclared: "BSD-3-Clause",
			CopyrightText: "NOASSERTION",
			ExternalRefs:  []spdxExtRef{{"PACKAGE-MANAGER", "purl", "pkg:golang/stdlib@" + strings.TrimPrefix(bi.GoVersion, "go")}},
		}},
		Relationships: []spdxRelation{
			{"SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-nsredirect"},
			{"SPDXRef-nsredirect", "DEPENDS_ON", "SPDXRef-go-stdlib"},
		},
	}
	// bi.Deps is sorted by module path.
	for _, m := range bi.Deps {
		if m.Replace != nil {
			m = m.Replace
		}
		p := spdxPackage{
			SPDXID: spdxID(m.Path + "-" + m.Version), Name: m.Path, VersionInfo: m.Version,
			DownloadLocation: "https://proxy.golang.org/" + m.Path + "/@v/" + m.Version + ".zip",
			LicenseConcluded: "NOASSERTION", LicenseDeclared: "NOASSERTION", CopyrightText: "NOASSERTION",
			ExternalRefs: []spdxExtRef{{"PACKAGE-MANAGER", "purl", "pkg:golang/" + m.Path + "@" + m.Version}},
		}
		if m.Sum != "" {
			p.Comment = "go.sum " + m.Sum
		}
		doc.Packages = append(doc.Packages, p)
		doc.Relationships = append(doc.Relationships, spdxRelation{"SPDXRef-nsredirect", "DEPENDS_ON", p.SPDXID})
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(r.Out, r.base()+".spdx.json"), append(b, '\n'), 0o644)
}

func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// untar extracts a tar this tool wrote (regular files and directories only).
func untar(src, dst string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dst, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(p, filepath.Clean(dst)+string(os.PathSeparator)) {
			return fmt.Errorf("%s: entry %q leaves the directory", src, h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			b, err := io.ReadAll(tr)
			if err != nil {
				return err
			}
			if err := os.WriteFile(p, b, 0o644); err != nil {
				return err
			}
		}
	}
}
