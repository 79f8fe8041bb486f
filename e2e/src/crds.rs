//! Installing Caracal's CRDs into a control plane and addressing Caracal objects dynamically.

use std::time::Duration;

use caracal_crds::crdgen;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};

/// Field manager for everything the test harness and the lab write.
pub const FIELD_MANAGER: &str = "caracal-e2e";

/// Errors installing CRDs.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The API server refused a CRD.
    #[error("applying CRD {name}: {source}")]
    Apply {
        /// The CRD.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// A CRD did not become Established in time.
    #[error("CRD {0} did not become Established within {1:?}")]
    NotEstablished(String, Duration),
}

/// Applies every Caracal CRD (server-side apply) and waits until each is Established.
pub async fn install(client: &Client, timeout: Duration) -> Result<Vec<String>, CrdError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for crd in crdgen::all() {
        let name = crd.name_any();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .map_err(|source| CrdError::Apply {
                name: name.clone(),
                source,
            })?;
        names.push(name);
    }
    for name in &names {
        let established = await_condition(api.clone(), name, conditions::is_crd_established());
        match tokio::time::timeout(timeout, established).await {
            Ok(Ok(_)) => {}
            _ => return Err(CrdError::NotEstablished(name.clone(), timeout)),
        }
    }
    Ok(names)
}

/// The API resource of a Caracal kind (`IPPool`, `Installation`, ...), and whether it is namespaced.
pub fn resource_for(api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
    crdgen::all().into_iter().find_map(|crd| {
        let version = crd.spec.versions.first()?;
        let matches =
            crd.spec.names.kind == kind && api_version == format!("{}/{}", crd.spec.group, version.name);
        matches.then(|| {
            let gvk = GroupVersionKind::gvk(&crd.spec.group, &version.name, kind);
            (
                ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural),
                crd.spec.scope == "Namespaced",
            )
        })
    })
}

/// A dynamic API for `obj` (a Caracal object), in its namespace when the kind is namespaced.
pub fn api_for(client: &Client, obj: &DynamicObject) -> Option<Api<DynamicObject>> {
    let types = obj.types.as_ref()?;
    let (ar, namespaced) = resource_for(&types.api_version, &types.kind)?;
    Some(if namespaced {
        let ns = obj.namespace().unwrap_or_else(|| "default".to_owned());
        Api::namespaced_with(client.clone(), &ns, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

/// Errors of [`control_plane`].
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The control plane did not start or cannot be reached.
    #[error(transparent)]
    ControlPlane(#[from] crate::controlplane::ControlPlaneError),
    /// The CRDs could not be installed.
    #[error(transparent)]
    Crds(#[from] CrdError),
}

/// An API-only control plane with every Caracal CRD Established, and an admin client: what most
/// cluster-tier tests start from.
pub async fn control_plane() -> Result<(crate::controlplane::ControlPlane, Client), SetupError> {
    let cp = crate::controlplane::ControlPlane::start(crate::controlplane::Options::api_only()).await?;
    let client = cp.client().await?;
    install(&client, Duration::from_secs(60)).await?;
    Ok((cp, client))
}
