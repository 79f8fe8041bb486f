//go:build tools

// Package cniplugins only records which upstream CNI plugins this module builds;
// `make cni-plugins` runs `go build` on exactly these import paths. The CNI bench
// runs them beside Caracal's plugin with the same driver (node/benches/cni.rs).
package cniplugins

import (
	_ "github.com/containernetworking/plugins/plugins/ipam/host-local"
	_ "github.com/containernetworking/plugins/plugins/main/bridge"
	_ "github.com/containernetworking/plugins/plugins/main/loopback"
)
