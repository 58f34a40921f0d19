package main

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// image is the image of one architecture: FROM scratch, the static binary
// and the licences, as the Dockerfile's prebuilt stage.
func (r *release) image(arch string, docs map[string][]byte) (v1.Image, error) {
	bin, err := os.ReadFile(r.bins[arch])
	if err != nil {
		return nil, err
	}
	files := []file{
		{Name: "usr/", Mode: 0o755}, {Name: "usr/local/", Mode: 0o755}, {Name: "usr/local/bin/", Mode: 0o755},
		{Name: "usr/local/bin/nsredirect", Mode: 0o755, Data: bin},
		{Name: "usr/share/", Mode: 0o755}, {Name: "usr/share/doc/", Mode: 0o755},
		{Name: "usr/share/doc/nsredirect/", Mode: 0o755}, {Name: "usr/share/doc/nsredirect/LICENSES/", Mode: 0o755},
	}
	for _, p := range licenceFiles {
		files = append(files, file{Name: "usr/share/doc/nsredirect/" + p, Mode: 0o644, Data: docs[p]})
	}
	var layerTar bytes.Buffer
	if err := r.writeTar(&layerTar, files); err != nil {
		return nil, err
	}
	raw := layerTar.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(raw)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: r.Epoch},
			CreatedBy: "nsredirect tools/release " + r.Version,
		},
	})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	cf.Created = v1.Time{Time: r.Epoch}
	cf.Config.Env = []string{"PATH=/usr/local/bin"}
	cf.Config.Entrypoint = []string{"nsredirect"}
	cf.Config.Cmd = []string{"docker"}
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.title":    "nsredirect",
		"org.opencontainers.image.version":  r.Version,
		"org.opencontainers.image.source":   "https://github.com/nsredirect/nsredirect",
		"org.opencontainers.image.licenses": "Apache-2.0 AND (GPL-2.0-only OR BSD-2-Clause)",
	}
	return mutate.ConfigFile(img, cf)
}

// images writes one docker-archive tarball per architecture (`docker load`,
// `ctr images import`), checks each against ImageCap, and the multi-arch
// OCI index as an OCI image layout in a tar.
func (r *release) images(docs map[string][]byte) error {
	tag, err := name.NewTag(r.Image + ":" + r.Version)
	if err != nil {
		return fmt.Errorf("%w: -image %s: %v", errUsage, r.Image, err)
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, arch := range Arches {
		img, err := r.image(arch, docs)
		if err != nil {
			return fmt.Errorf("image %s: %w", arch, err)
		}
		out := filepath.Join(r.Out, r.base()+"_image_linux_"+arch+".tar")
		if err := tarball.WriteToFile(out, tag, img); err != nil {
			return fmt.Errorf("image %s: %w", arch, err)
		}
		if err := checkImageSize(out, img); err != nil {
			return err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add: img,
			Descriptor: v1.Descriptor{
				Platform: &v1.Platform{OS: "linux", Architecture: arch},
			},
		})
	}
	dir := filepath.Join(r.work, "oci")
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": r.Version,
		"io.containerd.image.name":          tag.String(),
	})); err != nil {
		return err
	}
	var files []file
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		if d.IsDir() {
			files = append(files, file{Name: filepath.ToSlash(rel) + "/", Mode: 0o755})
			return nil
		}
		b, err := os.ReadFile(path)
		files = append(files, file{Name: filepath.ToSlash(rel), Mode: 0o644, Data: b})
		return err
	})
	if err != nil {
		return err
	}
	sort.Slice(files, func(i, j int) bool { return files[i].Name < files[j].Name })
	f, err := os.Create(filepath.Join(r.Out, r.base()+"_image_oci_index.tar"))
	if err != nil {
		return err
	}
	if err := r.writeTar(f, files); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// checkImageSize fails unless what a user loads (the tarball) and pulls
// (the compressed layers) stay under ImageCap.
func checkImageSize(tarPath string, img v1.Image) error {
	st, err := os.Stat(tarPath)
	if err != nil {
		return err
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	var pulled int64
	for _, l := range layers {
		n, err := l.Size()
		if err != nil {
			return err
		}
		pulled += n
	}
	fmt.Fprintf(os.Stderr, "release: %s: %.1f MB to load, %.1f MB of compressed layers to pull (cap %d MB)\n",
		filepath.Base(tarPath), float64(st.Size())/1e6, float64(pulled)/1e6, ImageCap/1_000_000)
	if st.Size() >= ImageCap || pulled >= ImageCap {
		return fmt.Errorf("%s: %d bytes to load, %d to pull: an image must stay under %d bytes (%d MB) per architecture",
			filepath.Base(tarPath), st.Size(), pulled, ImageCap, ImageCap/1_000_000)
	}
	return nil
}

// pushIndex pushes the OCI index that a build left in out to repo, tagged
// with the version it was built for, using the local registry credentials
// (docker login); it prints the index digest for signing.
func pushIndex(out, repo string) error {
	matches, err := filepath.Glob(filepath.Join(out, "nsredirect_*_image_oci_index.tar"))
	if err != nil || len(matches) != 1 {
		return fmt.Errorf("%w: -out %s: expected one nsredirect_*_image_oci_index.tar from a build, found %d", errUsage, out, len(matches))
	}
	dir, err := os.MkdirTemp("", "nsr-push-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := untar(matches[0], dir); err != nil {
		return err
	}
	p, err := layout.FromPath(dir)
	if err != nil {
		return err
	}
	top, err := p.ImageIndex()
	if err != nil {
		return err
	}
	im, err := top.IndexManifest()
	if err != nil {
		return err
	}
	if len(im.Manifests) != 1 {
		return fmt.Errorf("%s: expected one index in the layout, found %d", matches[0], len(im.Manifests))
	}
	version := im.Manifests[0].Annotations["org.opencontainers.image.ref.name"]
	idx, err := top.ImageIndex(im.Manifests[0].Digest)
	if err != nil {
		return err
	}
	tag, err := name.NewTag(repo + ":" + version)
	if err != nil {
		return fmt.Errorf("%w: -push %s: %v", errUsage, repo, err)
	}
	if err := remote.WriteIndex(tag, idx, remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
		return fmt.Errorf("push %s: %w", tag, err)
	}
	d, err := idx.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("%s@%s\n", tag.Context(), d)
	return nil
}
