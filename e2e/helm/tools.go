//go:build tools

// Package tools pins the helm command Caracal's chart is linted, rendered, installed, upgraded and
// uninstalled with.
package tools

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
