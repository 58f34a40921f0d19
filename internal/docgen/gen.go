package main

// docs/cli.md and docs/metrics.md are generated from the code; `make
// check-generate` fails when they are not what this writes.
//go:generate go run . -out ../../docs
