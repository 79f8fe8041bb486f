//! The validating admission webhook: served by every operator replica over TLS, registered by the operator
//! with the CA that signed its serving certificate. It rejects what CEL cannot check: selector syntax (the
//! message gives the field, the character and a caret), IPPools overlapping another pool, and policies in a
//! tier that does not exist.

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
    let read = |s: &Secret, k: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    for _ in 0..3 {
        let current = api
            .get_opt(NAME)
            .await
            .map_err(|e| WebhookError::Api("reading the webhook Secret", e))?;
        if let Some(s) = &current
            && let (Some(ca), Some(crt), Some(key)) =
                (read(s, "ca.crt"), read(s, "tls.crt"), read(s, "tls.key"))
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

/// Registers (or updates) the ValidatingWebhookConfiguration; writes only when it differs.
pub async fn register(client: &Client, ca: &str, endpoint: &Endpoint) -> Result<(), WebhookError> {
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
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/part-of": "caracal"}},
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
/// listener task.
pub async fn start(
    client: &Client,
    namespace: &str,
    addr: SocketAddr,
    endpoint: &Endpoint,
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
    register(client, &ca, endpoint).await?;
    Ok(task)
}
