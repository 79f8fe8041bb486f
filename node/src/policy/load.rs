//! Reading YAML manifests (files or directories, multi-document, `List`s) into a [`World`]: Namespaces,
//! Pods (labels, service account, container ports, `status.podIP`), ServiceAccounts, Kubernetes
//! NetworkPolicies and every caracal.dev policy kind. Other kinds are ignored with a warning.

use std::path::{Path, PathBuf};

use caracal_crds::networkset::{GlobalNetworkSetSpec, NetworkSetSpec};
use caracal_crds::policy::{GlobalNetworkPolicySpec, NetworkPolicySpec, TierDefaultAction, TierSpec};
use serde_json::Value;

use super::convert::{self, ConvertError};
use super::ir::{Policy, TierDefault};
use super::model::{Endpoint, Labels, NamedPort, NetworkSet, World};

/// Errors reading manifests.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A document is not valid YAML, or an object does not fit its kind.
    #[error("{source_name}: {message}")]
    Parse {
        /// File (and document number).
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// A policy could not be converted.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

/// A world and the warnings met while reading it.
#[derive(Debug, Default)]
pub struct Loaded {
    /// What was read.
    pub world: World,
    /// Ignored kinds and skipped objects, for stderr.
    pub warnings: Vec<String>,
}

fn files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| LoadError::Read {
            path: path.into(),
            source,
        })?;
        let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        children.sort();
        for c in children {
            if c.is_dir()
                || c.extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            {
                files(&c, out)?;
            }
        }
    } else {
        out.push(path.into());
    }
    Ok(())
}

fn labels(v: &Value) -> Labels {
    v["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn name(v: &Value) -> String {
    v["metadata"]["name"].as_str().unwrap_or_default().to_owned()
}

fn namespace(v: &Value) -> String {
    v["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned()
}

fn typed<T: serde::de::DeserializeOwned>(source: &str, v: &Value) -> Result<T, LoadError> {
    serde_json::from_value(v.clone()).map_err(|e| LoadError::Parse {
        source_name: source.into(),
        message: format!("{} {}: {e}", v["kind"], name(v)),
    })
}

/// A pod as an endpoint, with the labels Calico adds.
fn endpoint(v: &Value) -> Option<Endpoint> {
    let mut ips: Vec<std::net::IpAddr> = v["status"]["podIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["ip"].as_str()?.parse().ok())
        .collect();
    if let Some(ip) = v["status"]["podIP"].as_str().and_then(|s| s.parse().ok())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    if ips.is_empty() {
        return None;
    }
    let ns = namespace(v);
    let sa = v["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let mut l = labels(v);
    l.insert("projectcalico.org/namespace".into(), ns.clone());
    l.insert("projectcalico.org/orchestrator".into(), "k8s".into());
    l.insert("projectcalico.org/serviceaccount".into(), sa.clone());
    let ports = v["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| {
            Some(NamedPort {
                name: p["name"].as_str()?.to_owned(),
                protocol: match p["protocol"].as_str().unwrap_or("TCP") {
                    "UDP" => 17,
                    "SCTP" => 132,
                    _ => 6,
                },
                port: u16::try_from(p["containerPort"].as_u64()?).ok()?,
            })
        })
        .collect();
    let node = v["spec"]["nodeName"].as_str().map(str::to_owned);
    Some(Endpoint {
        namespace: ns,
        name: name(v),
        ips,
        labels: l,
        service_account: sa,
        ports,
        node,
    })
}

/// Reads `paths` (files or directories) into a world.
pub fn load_paths(paths: &[PathBuf]) -> Result<Loaded, LoadError> {
    let mut all = Vec::new();
    for p in paths {
        files(p, &mut all)?;
    }
    let mut docs = Vec::new();
    for f in all {
        let text = std::fs::read_to_string(&f).map_err(|source| LoadError::Read {
            path: f.clone(),
            source,
        })?;
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let source_name = format!("{} (document {})", f.display(), i + 1);
            let v: Value = serde::Deserialize::deserialize(de).map_err(|e| LoadError::Parse {
                source_name: source_name.clone(),
                message: e.to_string(),
            })?;
            if !v.is_null() {
                docs.push((source_name, v));
            }
        }
    }
    load_documents(docs)
}

/// Builds a world from parsed documents (source name, object).
pub fn load_documents(docs: Vec<(String, Value)>) -> Result<Loaded, LoadError> {
    let mut out = Loaded::default();
    let mut tiers = Vec::new();
    let mut policies: Vec<(String, Policy)> = Vec::new();
    let mut queue = docs;
    while let Some((source, v)) = queue.pop() {
        let api = v["apiVersion"].as_str().unwrap_or_default();
        let kind = v["kind"].as_str().unwrap_or_default();
        match (api, kind) {
            ("v1", "List") => queue.extend(
                v["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| (source.clone(), i.clone())),
            ),
            ("v1", "Namespace") => {
                out.world.namespaces.insert(name(&v), labels(&v));
            }
            ("v1", "Pod") => match endpoint(&v) {
                Some(ep) => out.world.endpoints.push(ep),
                None => out.warnings.push(format!(
                    "{source}: pod {}/{} has no status.podIP; skipped",
                    namespace(&v),
                    name(&v)
                )),
            },
            ("v1", "ServiceAccount") => {
                out.world
                    .service_accounts
                    .insert((namespace(&v), name(&v)), labels(&v));
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                let np: k8s_openapi::api::networking::v1::NetworkPolicy = typed(&source, &v)?;
                policies.push((convert::DEFAULT_TIER.into(), convert::k8s_policy(&np)));
            }
            ("caracal.dev/v1", "NetworkPolicy") => {
                let spec: NetworkPolicySpec = typed(&source, &v["spec"])?;
                policies.push(convert::caracal_policy(&namespace(&v), &name(&v), &spec)?);
            }
            ("caracal.dev/v1", "GlobalNetworkPolicy") => {
                let spec: GlobalNetworkPolicySpec = typed(&source, &v["spec"])?;
                policies.push(convert::global_policy(&name(&v), &spec)?);
            }
            ("caracal.dev/v1", "Tier") => {
                let spec: TierSpec = typed(&source, &v["spec"])?;
                let def = match spec.default_action {
                    Some(TierDefaultAction::Pass) => TierDefault::Pass,
                    _ => TierDefault::Deny,
                };
                tiers.push((name(&v), spec.order, def));
            }
            ("caracal.dev/v1", "NetworkSet") => {
                let spec: NetworkSetSpec = typed(&source, &v["spec"])?;
                out.world.network_sets.push(NetworkSet {
                    namespace: Some(namespace(&v)),
                    name: name(&v),
                    labels: labels(&v),
                    nets: spec.nets.iter().map(|n| n.net()).collect(),
                });
            }
            ("caracal.dev/v1", "GlobalNetworkSet") => {
                let spec: GlobalNetworkSetSpec = typed(&source, &v["spec"])?;
                out.world.network_sets.push(NetworkSet {
                    namespace: None,
                    name: name(&v),
                    labels: labels(&v),
                    nets: spec.nets.iter().map(|n| n.net()).collect(),
                });
            }
            _ => out
                .warnings
                .push(format!("{source}: ignoring {api} {kind} {}", name(&v))),
        }
    }
    out.world.endpoints.sort_by_key(Endpoint::key);
    out.world.tiers = convert::build_tiers(&tiers, policies)?;
    Ok(out)
}
