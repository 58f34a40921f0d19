//go:build tools

// The helm command itself, built from this module by the single-node
// cluster test (make test-runtimes-kube) to `helm install` the chart as a
// user does; this file only keeps its dependencies in go.mod.
package deploy

import _ "helm.sh/helm/v3/cmd/helm"
