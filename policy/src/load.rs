//! Reading YAML manifests (files or directories, multi-document, `List`s) into a [`World`]: Namespaces,
//! Pods (labels, service account, container ports, `status.podIP`), ServiceAccounts, Kubernetes
//! NetworkPolicies, every caracal.dev policy kind and EndpointSlices (for `services` rules). Other kinds are
//! ignored with a warning.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::convert::{self, ConvertError, TierInfo};
use crate::decode::{Input, decode};
use crate::ir::Policy;
use crate::world::{Endpoint, World};

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

/// Builds a world from decoded inputs, as the agent's calculation graph would hold them: pods without an
/// address are left out (nothing can match them yet), Services are the union of their slices, and tiers are
/// built by [`convert::build_tiers`].
#[derive(Debug, Default)]
pub struct WorldBuilder {
    world: World,
    tiers: Vec<TierInfo>,
    policies: Vec<(String, Policy)>,
}

impl WorldBuilder {
    /// Adds one input.
    pub fn add(&mut self, input: Input) {
        let w = &mut self.world;
        match input {
            Input::Namespace { name, labels } => {
                w.namespaces.insert(name, labels);
            }
            Input::Pod(ep) => {
                if !ep.ips.is_empty() {
                    w.endpoints.push(ep);
                }
            }
            Input::NotAnEndpoint | Input::Pool(_) => {}
            Input::ServiceAccount {
                namespace,
                name,
                labels,
            } => {
                w.service_accounts.insert((namespace, name), labels);
            }
            Input::NetworkSet(set) => {
                w.network_sets
                    .insert((set.namespace.clone(), set.name.clone()), set);
            }
            Input::Tier(t) => self.tiers.push(t),
            Input::Policy { tier, policy } => self.policies.push((tier, policy)),
            Input::Slice(s) => {
                let b = w.services.entry((s.namespace, s.service)).or_default();
                b.addrs.extend(s.backends.addrs);
                b.ports.extend(s.backends.ports);
            }
        }
    }

    /// The world.
    pub fn finish(mut self) -> World {
        self.world.endpoints.sort_by_key(Endpoint::key);
        self.world.tiers = convert::build_tiers(
            &self.tiers,
            self.policies
                .into_iter()
                .map(|(t, p)| (t, std::sync::Arc::new(p))),
        );
        self.world
    }
}

/// Builds a world from parsed documents (source name, object): every object goes through [`decode`], as in
/// the agent. An object that does not decode or convert is an error naming it and its field.
pub fn load_documents(docs: Vec<(String, Value)>) -> Result<Loaded, LoadError> {
    let mut out = Loaded::default();
    let mut builder = WorldBuilder::default();
    let mut queue = docs;
    queue.reverse();
    while let Some((source, v)) = queue.pop() {
        let api = v["apiVersion"].as_str().unwrap_or_default();
        let kind = v["kind"].as_str().unwrap_or_default();
        if (api, kind) == ("v1", "List") {
            let items: Vec<(String, Value)> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| (source.clone(), i.clone()))
                .collect();
            queue.extend(items.into_iter().rev());
            continue;
        }
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        let key = match v["metadata"]["namespace"].as_str() {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_owned(),
        };
        match decode(&format!("{api}/{kind}"), &key, &v) {
            Ok(Some(Input::Pod(ep))) if ep.ips.is_empty() => out
                .warnings
                .push(format!("{source}: pod {} has no status.podIP; skipped", ep.key())),
            Ok(Some(input)) => builder.add(input),
            Ok(None) => out
                .warnings
                .push(format!("{source}: ignoring {api} {kind} {name}")),
            Err(e) => {
                return Err(LoadError::Parse {
                    source_name: source,
                    message: e.to_string(),
                });
            }
        }
    }
    out.world = builder.finish();
    Ok(out)
}
