//go:build tools

// Package runtime only records which upstream programs this module builds;
// `make runtime` runs `go build` on exactly these import paths: containerd, its shim for runc, ctr, and runc.
// They live apart from e2e/controlplane because containerd's Kubernetes libraries are newer than the pinned
// release's.
package runtime

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
	_ "github.com/opencontainers/runc"
)
