//! The validating admission webhook: served by every operator replica over TLS, registered by the operator
//! with the CA that signed its serving certificate. It rejects what CEL cannot check: selector syntax (the
//! message gives the field, the character and a caret), IPPools overlapping another pool, and policies in a
//! tier that does not exist.
//!
//! Its registration and TLS Secret belong to the operator's install (owner references, [`binding_owners`]): every
//! ClusterRoleBinding that binds the operator's ServiceAccount owns the registration, the ServiceAccount owns
//! the Secret. Uninstalling the operator through any path (the plain manifest, `helm uninstall`, OLM deleting
//! the CSV) deletes those, and the garbage collector then deletes the registration, which would otherwise stay
//! behind with `failurePolicy: Fail` and refuse every write of the kinds it validates. Through an OLM upgrade
//! the new CSV's binding exists before its operator starts, so the registration keeps an owner while the old
//! CSV's binding goes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use caracal_crds::ippool::IPPool;
use caracal_crds::policy::Tier;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::{Client, ResourceExt};
use serde_json::json;
use time::OffsetDateTime;

use crate::apply::{FIELD_MANAGER, is_subset};
use crate::certs;
use crate::validate;

/// Name of the ValidatingWebhookConfiguration and of the Secret with the webhook's TLS material.
pub const NAME: &str = "caracal-operator-webhook";
/// The path the API server posts AdmissionReviews to.
pub const PATH: &str = "/validate";

/// Errors setting the webhook up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A request to the API server failed.
    #[error("{0}: {1}")]
    Api(&'static str, kube::Error),
    /// Certificates could not be made.
    #[error("webhook certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The TLS listener failed.
    #[error("serving the webhook: {0}")]
    Serve(#[from] std::io::Error),
}

/// Where the API server reaches the webhook.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// In the cluster: a Service in the operator's namespace (port 443).
    Service {
        /// The namespace.
        namespace: String,
        /// The Service name.
        name: String,
    },
    /// Out of the cluster (the lab, tests): an HTTPS URL ending in [`PATH`].
    Url(String),
}

/// The text under `key` in a Secret's data.
fn secret_field(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// TLS material: (CA, serving certificate, key), kept in the Secret [`NAME`] so every replica serves with a
/// certificate the registered CA signed. Made when missing or near expiry; a race between replicas is
/// settled by create-or-reread.
pub async fn material(
    client: &Client,
    namespace: &str,
    hosts: &[String],
) -> Result<(String, String, String), WebhookError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let now = OffsetDateTime::now_utc();
    for _ in 0..3 {
        let current = api
            .get_opt(NAME)
            .await
            .map_err(|e| WebhookError::Api("reading the webhook Secret", e))?;
        if let Some(s) = &current
            && let (Some(ca), Some(crt), Some(key)) = (
                secret_field(s, "ca.crt"),
                secret_field(s, "tls.crt"),
                secret_field(s, "tls.key"),
            )
            && certs::is_fresh(&crt, now)
            && certs::is_fresh(&ca, now)
        {
            return Ok((ca, crt, key));
        }
        let (ca, ca_key) = certs::new_ca(now)?;
        let (crt, key) = certs::signed(&ca, &ca_key, NAME, hosts.to_vec(), true, now)?;
        let data: BTreeMap<String, ByteString> = [("ca.crt", &ca), ("tls.crt", &crt), ("tls.key", &key)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
            .collect();
        let result = match current {
            None => {
                let s = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(NAME.into()),
                        namespace: Some(namespace.into()),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &s).await.map(|_| ())
            }
            Some(mut s) => {
                s.data = Some(data);
                api.replace(NAME, &PostParams::default(), &s).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => return Ok((ca, crt, key)),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(WebhookError::Api("writing the webhook Secret", e)),
        }
    }
    Err(WebhookError::Api(
        "settling the webhook Secret",
        kube::Error::LinesCodecMaxLineLengthExceeded,
    ))
}

/// The ServiceAccount the operator runs as (every install path names it so).
pub const SERVICE_ACCOUNT: &str = "caracal-operator";

/// How often a running operator checks its registration (a deleted or changed one is registered again).
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// What the registration belongs to: owner references to every ClusterRoleBinding that binds the
/// ServiceAccount [`SERVICE_ACCOUNT`] of `namespace` (the manifest's and the chart's `caracal-operator`, OLM's
/// generated one per CSV). None found: no owners (an operator run outside its install, as in some tests; its
/// registration then stays until deleted).
pub async fn binding_owners(
    client: &Client,
    namespace: &str,
) -> Result<Vec<serde_json::Value>, WebhookError> {
    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(client.clone());
    let list = bindings
        .list(&ListParams::default())
        .await
        .map_err(|e| WebhookError::Api("listing ClusterRoleBindings", e))?;
    let mut owners: Vec<serde_json::Value> = list
        .items
        .iter()
        .filter(|b| {
            b.subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == SERVICE_ACCOUNT
                    && s.namespace.as_deref() == Some(namespace)
            })
        })
        .filter_map(|b| {
            Some(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                        "name": b.metadata.name.clone()?, "uid": b.metadata.uid.clone()?}),
            )
        })
        .collect();
    owners.sort_by_key(|o| o["name"].as_str().unwrap_or_default().to_owned());
    Ok(owners)
}

/// What the Secret belongs to: an owner reference to the ServiceAccount [`SERVICE_ACCOUNT`] of `namespace`,
/// if it exists.
async fn account_owner(client: &Client, namespace: &str) -> Result<Option<serde_json::Value>, WebhookError> {
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), namespace);
    Ok(accounts
        .get_opt(SERVICE_ACCOUNT)
        .await
        .map_err(|e| WebhookError::Api("reading the operator's ServiceAccount", e))?
        .and_then(|a| {
            Some(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                        "name": a.metadata.name?, "uid": a.metadata.uid?}))
        }))
}

/// Gives the Secret [`NAME`] in `namespace` the owner `owner` when it lacks it.
async fn own_secret(
    client: &Client,
    namespace: &str,
    owner: Option<serde_json::Value>,
) -> Result<(), WebhookError> {
    let Some(owner) = owner else {
        return Ok(());
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = api
        .get_opt(NAME)
        .await
        .map_err(|e| WebhookError::Api("reading the webhook Secret", e))?
    else {
        return Ok(());
    };
    let owned = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(o.uid.as_str()) == owner["uid"].as_str());
    if owned {
        return Ok(());
    }
    api.patch(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"ownerReferences": [owner]}})),
    )
    .await
    .map_err(|e| WebhookError::Api("owning the webhook Secret", e))?;
    Ok(())
}

/// Registers (or updates) the ValidatingWebhookConfiguration with owner references `owners` (see
/// [`binding_owners`]; none: it stays until deleted); writes only when it differs.
pub async fn register_owned(
    client: &Client,
    ca: &str,
    endpoint: &Endpoint,
    owners: &[serde_json::Value],
) -> Result<(), WebhookError> {
    let bundle = ByteString(ca.as_bytes().to_vec());
    let client_config = match endpoint {
        Endpoint::Service { namespace, name } => {
            json!({"service": {"namespace": namespace, "name": name, "path": PATH, "port": 443}, "caBundle": bundle})
        }
        Endpoint::Url(url) => json!({"url": url, "caBundle": bundle}),
    };
    let rule = |group: &str, resources: &[&str]| json!({"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": resources, "scope": "*"});
    let want = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/part-of": "caracal"}, "ownerReferences": owners},
        "webhooks": [{
            "name": "validate.caracal.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": client_config,
            "rules": [
                rule("caracal.dev", &["globalnetworkpolicies", "networkpolicies", "ippools", "bgppeers"]),
                rule("operator.caracal.dev", &["installations"]),
            ],
        }]
    });
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let live = api
        .get_opt(NAME)
        .await
        .map_err(|e| WebhookError::Api("reading the webhook registration", e))?;
    if live.is_some_and(|l| is_subset(&want, &serde_json::to_value(l).unwrap_or_default())) {
        return Ok(());
    }
    api.patch(
        NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&want),
    )
    .await
    .map_err(|e| WebhookError::Api("registering the webhook", e))?;
    Ok(())
}

/// Everything wrong with `obj` (a `kind`), given the cluster.
async fn problems(client: &Client, kind: &str, name: &str, obj: &serde_json::Value) -> Vec<String> {
    let mut out = validate::check_selectors(kind, obj);
    if matches!(kind, "GlobalNetworkPolicy" | "NetworkPolicy")
        && let Some(tier) = validate::tier_of(obj)
    {
        match Api::<Tier>::all(client.clone()).get_opt(tier).await {
            Ok(Some(_)) => {}
            Ok(None) => out.push(format!(
                "spec.tier: tier {tier:?} does not exist: create the Tier first, or remove spec.tier to use the default tier"
            )),
            Err(e) => out.push(format!("spec.tier: could not check that tier {tier:?} exists ({e}); try again")),
        }
    }
    if kind == "IPPool"
        && let Some(cidr) = obj["spec"]["cidr"]
            .as_str()
            .and_then(|c| c.parse::<ipnet::IpNet>().ok())
    {
        match Api::<IPPool>::all(client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(pools) => {
                let others: Vec<(String, ipnet::IpNet)> = pools
                    .into_iter()
                    .filter(|p| p.name_any() != name)
                    .map(|p| (p.name_any(), p.spec.cidr.0))
                    .collect();
                for (other, net) in validate::overlapping(cidr, &others) {
                    out.push(format!(
                        "spec.cidr: {cidr} overlaps IPPool {other:?} ({net}): choose a range no other pool uses"
                    ));
                }
            }
            Err(e) => out.push(format!(
                "spec.cidr: could not check for overlapping pools ({e}); try again"
            )),
        }
    }
    out
}

async fn review(
    State(client): State<Client>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let mut resp = AdmissionResponse::from(&req);
    if let Some(obj) = &req.object {
        let value = serde_json::to_value(obj).unwrap_or_default();
        let found = problems(&client, &req.kind.kind, &req.name, &value).await;
        if !found.is_empty() {
            resp = resp.deny(found.join("\n"));
        }
    }
    Json(resp.into_review())
}

/// Serves the webhook on `addr` with the given certificate until the process ends.
pub async fn serve(addr: SocketAddr, client: Client, cert: String, key: String) -> Result<(), WebhookError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(cert.into_bytes(), key.into_bytes()).await?;
    let app = Router::new().route(PATH, post(review)).with_state(client);
    axum_server::bind_rustls(addr, tls)
        .serve(app.into_make_service())
        .await?;
    Ok(())
}

/// Sets the webhook up and serves it: material, registration, then the TLS listener (spawned). Returns the
/// listener task. The registration is checked again every [`RECHECK`].
pub async fn start(
    client: &Client,
    namespace: &str,
    addr: SocketAddr,
    endpoint: &Endpoint,
) -> Result<tokio::task::JoinHandle<Result<(), WebhookError>>, WebhookError> {
    start_checking_every(client, namespace, addr, endpoint, RECHECK).await
}

/// [`start`], checking the registration every `recheck`.
pub async fn start_checking_every(
    client: &Client,
    namespace: &str,
    addr: SocketAddr,
    endpoint: &Endpoint,
    recheck: std::time::Duration,
) -> Result<tokio::task::JoinHandle<Result<(), WebhookError>>, WebhookError> {
    let mut hosts = vec![
        NAME.to_owned(),
        format!("{NAME}.{namespace}"),
        format!("{NAME}.{namespace}.svc"),
        "localhost".into(),
    ];
    hosts.push(addr.ip().to_string());
    if let Endpoint::Url(url) = endpoint
        && let Some(host) = url
            .strip_prefix("https://")
            .and_then(|r| r.split([':', '/']).next())
    {
        hosts.push(host.to_owned());
    }
    hosts.sort();
    hosts.dedup();
    let (ca, cert, key) = material(client, namespace, &hosts).await?;
    let task = tokio::spawn(serve(addr, client.clone(), cert, key));
    own_secret(client, namespace, account_owner(client, namespace).await?).await?;
    register_owned(client, &ca, endpoint, &binding_owners(client, namespace).await?).await?;
    tokio::spawn(keep_registered(
        client.clone(),
        namespace.to_owned(),
        ca,
        endpoint.clone(),
        recheck,
    ));
    Ok(task)
}

/// Every `recheck`, registers again when the registration differs or is gone, but only while a binding
/// owns it: once the install's bindings are gone the operator is being uninstalled, and a registration
/// written then would have no owner left to remove it.
///
/// The CA registered is the one in the Secret, which every replica reads, not the one this replica started
/// with: replicas that started on either side of a renewal would otherwise register their own CAs in turn.
async fn keep_registered(
    client: Client,
    namespace: String,
    ca: String,
    endpoint: Endpoint,
    recheck: std::time::Duration,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    loop {
        tokio::time::sleep(recheck).await;
        let current = match secrets.get_opt(NAME).await {
            Ok(Some(s)) => secret_field(&s, "ca.crt"),
            _ => None,
        };
        if current.as_ref().is_some_and(|c| *c != ca) {
            tracing::warn!(
                "the webhook's CA in its Secret is newer than this replica's serving certificate: restart this replica to serve with it"
            );
        }
        let ca = current.unwrap_or_else(|| ca.clone());
        match binding_owners(&client, &namespace).await {
            Ok(bindings) if bindings.is_empty() => {}
            Ok(bindings) => {
                if let Err(e) = register_owned(&client, &ca, &endpoint, &bindings).await {
                    tracing::warn!(error = %e, "re-registering the admission webhook");
                }
            }
            Err(e) => tracing::warn!(error = %e, "checking the admission webhook's owners"),
        }
    }
}
