#!/usr/bin/env bash
# Builds the Kubernetes v1.37.2 components the single-node cluster test runs
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl)
# from this directory's module, and helm from test/deploy's module (the
# version whose chart rendering `make test-deploy` checks), into OUT (default
# .cache/kubernetes/bin), and unpacks Debian's etcd-server there. Skipped
# when OUT/.stamp is newer than both go.mod files. The test's pause, dialer
# and ociimage go to OUT/images. Sources come through the
# Go module proxy; nothing is committed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../../.cache/kubernetes/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)
deploy=$here/../../deploy
# The cluster test's own small programs (cluster.sh --tools OUT/images):
# rebuilt every time, which Go's cache makes cheap.
(cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$out/images/" ./cmd/pause ./cmd/dialer ./cmd/ociimage)
if [[ -f $out/.stamp && $out/.stamp -nt $here/go.mod && $out/.stamp -nt $deploy/go.mod && -x $out/etcd ]]; then
	exit 0
fi
v=v1.37.2
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=37 -X $p.gitTreeState=clean"
done
start=$(date +%s)
(cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$out/" \
	k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl)
echo "kubernetes $v components built in $(($(date +%s) - start)) s" >&2
start=$(date +%s)
(cd "$deploy" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/helm" helm.sh/helm/v3/cmd/helm)
echo "helm built in $(($(date +%s) - start)) s" >&2
if [[ ! -x $out/etcd ]]; then
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && apt-get download etcd-server >/dev/null && dpkg-deb -x etcd-server_*.deb root)
	cp "$tmp/root/usr/bin/etcd" "$out/etcd"
fi
touch "$out/.stamp"
