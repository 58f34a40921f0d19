#!/usr/bin/env bash
# Builds the Kubernetes v1.37.2 components the single-node cluster test runs
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl)
# from this directory's module, and helm from test/deploy's module (the
# version whose chart rendering `make test-deploy` checks), and unpacks
# Debian's etcd-server beside them, into a directory of the test cache
# ($NSREDIRECT_TEST_CACHE, by default /var/cache/nsredirect-test) keyed by
# what they are built from: both modules' go.mod and go.sum, this script and
# the Go toolchain. Every clone on the machine shares it, and a second run
# builds nothing. The binaries' sha256 sums are recorded at build time and
# checked at every run: a truncated or altered build is rebuilt, not trusted.
# The test's own small programs (pause, dialer, ociimage) go to images/ and
# are rebuilt every time, which Go's cache makes cheap. Prints the directory.
# Sources come through the Go module proxy; nothing is committed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
deploy=$here/../../deploy
cache=${NSREDIRECT_TEST_CACHE:-/var/cache/nsredirect-test}
key=$(cat "$here/go.mod" "$here/go.sum" "$deploy/go.mod" "$deploy/go.sum" "$0" <(go env GOVERSION) | sha256sum | cut -c1-16)
out=${1:-$cache/kubernetes/bin-$key}
mkdir -p "$out"
out=$(cd "$out" && pwd)
bins="kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl helm etcd"
(cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$out/images/" ./cmd/pause ./cmd/dialer ./cmd/ociimage) >&2
if [[ -f $out/sha256 ]] && (cd "$out" && sha256sum --quiet -c sha256 >/dev/null 2>&1); then
	echo "$out"
	exit 0
fi
[[ ! -f $out/sha256 ]] || echo "build.sh: $out does not match its checksums; rebuilding" >&2
rm -f "$out/sha256"
v=v1.37.2
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=37 -X $p.gitTreeState=clean"
done
start=$(date +%s)
(cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$out/" \
	k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl) >&2
echo "kubernetes $v components built in $(($(date +%s) - start)) s" >&2
start=$(date +%s)
(cd "$deploy" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/helm" helm.sh/helm/v3/cmd/helm) >&2
echo "helm built in $(($(date +%s) - start)) s" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download etcd-server >/dev/null && dpkg-deb -x etcd-server_*.deb root)
cp "$tmp/root/usr/bin/etcd" "$out/etcd"
# shellcheck disable=SC2086 # bins is a list
(cd "$out" && sha256sum $bins >sha256.tmp && mv sha256.tmp sha256)
echo "$out"
