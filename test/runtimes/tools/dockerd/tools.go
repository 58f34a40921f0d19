//go:build tools

// Package tools pins the Docker Engine commands built by `make test-runtimes`.
package tools

import (
	_ "github.com/moby/moby/v2/cmd/docker-proxy"
	_ "github.com/moby/moby/v2/cmd/dockerd"
)
