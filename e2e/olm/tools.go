//go:build tools

// Package tools pins the Operator Framework's parts Caracal's tests run for real: OLM's olm and catalog
// operators, opm (which serves a catalog), and the bundle validation library (used by ./validate).
package tools

import (
	_ "github.com/operator-framework/operator-lifecycle-manager/cmd/catalog"
	_ "github.com/operator-framework/operator-lifecycle-manager/cmd/olm"
	_ "github.com/operator-framework/operator-registry/cmd/opm"
)
