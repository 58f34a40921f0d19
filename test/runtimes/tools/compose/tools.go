//go:build tools

// Package tools pins the Docker Compose command built by `make test-runtimes`.
package tools

import _ "github.com/docker/compose/v5/cmd"
