// Command validate checks an OLM bundle directory with the Operator Framework's validation library: the
// default bundle validators and the optional suite (OperatorHub, capabilities, categories, objects,
// deprecated APIs for the given Kubernetes version, good practices, architectures). It prints every
// result and exits 1 when any is an error (warnings are printed and do not fail).
//
//	validate [-k8s-version 1.34] BUNDLE_DIR
package main

import (
	"flag"
	"fmt"
	"os"

	apimanifests "github.com/operator-framework/api/pkg/manifests"
	"github.com/operator-framework/api/pkg/validation"
	interfaces "github.com/operator-framework/api/pkg/validation/interfaces"
)

func main() {
	k8s := flag.String("k8s-version", "1.34", "Kubernetes version the deprecated-API check looks at")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: validate [-k8s-version V] BUNDLE_DIR")
		os.Exit(2)
	}
	bundle, err := apimanifests.GetBundleFromDir(flag.Arg(0))
	if err != nil {
		fmt.Fprintf(os.Stderr, "loading the bundle: %v\n", err)
		os.Exit(1)
	}
	suites := []struct {
		name       string
		validators interfaces.Validators
	}{
		{"default", validation.DefaultBundleValidators},
		{"optional", interfaces.Validators{
			validation.OperatorHubV2Validator,
			validation.StandardCapabilitiesValidator,
			validation.StandardCategoriesValidator,
			validation.ObjectValidator,
			validation.AlphaDeprecatedAPIsValidator,
			validation.GoodPracticesValidator,
			validation.MultipleArchitecturesValidator,
		}},
	}
	objs := append(bundle.ObjectsToValidate(), map[string]string{"k8s-version": *k8s})
	failed, warned, checked := 0, 0, 0
	for _, s := range suites {
		for _, result := range s.validators.Validate(objs...) {
			checked++
			for _, e := range result.Errors {
				failed++
				fmt.Printf("ERROR   %s %s: %s\n", s.name, result.Name, e.Error())
			}
			for _, w := range result.Warnings {
				warned++
				fmt.Printf("WARNING %s %s: %s\n", s.name, result.Name, w.Error())
			}
		}
	}
	fmt.Printf("%s: %d results checked, %d errors, %d warnings\n", bundle.Name, checked, failed, warned)
	if failed > 0 {
		os.Exit(1)
	}
}
