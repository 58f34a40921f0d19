//go:build tools

// Package kubernetes pins the Kubernetes components the single-node cluster
// test builds (make test-runtimes-kube): their sources come from the module
// proxy and their binaries are cached under .cache/, never committed.
package kubernetes

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
