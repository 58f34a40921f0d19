//go:build runtimes && guest

package runtimes_test

func init() { dpkgQueryShim = true }
