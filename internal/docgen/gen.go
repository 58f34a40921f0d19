package main

// docs/cli.md and docs/metrics.md are generated from the code; `make
// check-generate` fails when they are not what this writes. Built as `make
// build` builds bin/nsredirect (CGO_ENABLED=0, -trimpath), so the two share
// the build cache: in a cold gate, check-generate compiles the packages and
// the build after it reuses them.
//go:generate env CGO_ENABLED=0 go run -trimpath . -out ../../docs
