//! The operator installs Caracal's CRDs at start: server-side apply of what `caracal-crds` generates, but only
//! for a CRD whose stored definition differs, so restarts write nothing. Installed by OLM, it may only read
//! them (OLM installs and upgrades the bundle's CRDs): a difference it may not write is logged, not fatal.

use caracal_crds::crdgen;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::apply::{FIELD_MANAGER, is_subset};

/// `crd` as it is applied and written to the bundle: with its `apiVersion` and `kind`.
pub fn manifest(crd: &CustomResourceDefinition) -> serde_json::Value {
    let mut v = serde_json::to_value(crd).unwrap_or_default();
    v["apiVersion"] = "apiextensions.k8s.io/v1".into();
    v["kind"] = "CustomResourceDefinition".into();
    v
}

/// Applies every CRD that is missing or differs; returns the names of all of them.
pub async fn ensure(client: &Client) -> Result<Vec<String>, kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in crdgen::all() {
        let name = crd.name_any();
        let want = manifest(&crd);
        let live = api
            .get_opt(&name)
            .await?
            .map(|l| serde_json::to_value(l).unwrap_or_default());
        let exists = live.is_some();
        if !live.is_some_and(|l| is_subset(&want, &l)) {
            match api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&want),
                )
                .await
            {
                Ok(_) => {}
                // Installed by OLM, which manages the CRDs (the bundle's role only reads them): the operator
                // works with what OLM installed.
                Err(kube::Error::Api(e)) if e.code == 403 && exists => {
                    tracing::warn!(crd = %name, "the CRD differs from this operator's and it may not write CRDs (installed by OLM?): using it as it is");
                }
                Err(e) => return Err(e),
            }
        }
        names.push(name);
    }
    Ok(names)
}
