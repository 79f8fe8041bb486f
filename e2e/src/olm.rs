//! The real Operator Lifecycle Manager (OLM v0, built by `make olm` into `target/olm/bin`) against the lab's
//! API server, and a catalog of Caracal's bundles served by the real `opm`.
//!
//! OLM's `olm` and `catalog` operators run as processes with the admin kubeconfig (as they would with their
//! ServiceAccount in a cluster); they need their CRDs (`target/olm/crds`, copied from the Operator
//! Framework's API module by `make olm`) and nothing else: no webhook, no packageserver. The catalog is a
//! file-based catalog (FBC) of `opm render`ed bundle directories, whose objects are inline (`image: ""`), so
//! OLM installs them without a bundle image or unpack Job; a grpc CatalogSource points at `opm serve` by
//! address. Publishing a new version is a new catalog served on a new port and the CatalogSource's address
//! patched to it (OLM re-reads a catalog when its connection changes).
//!
//! `CI` is removed from the operators' environment: with it set, OLM checks that every object it creates
//! carries its `olm.managed` label and panics otherwise (a check for OLM's own test suite).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};

use crate::controlplane::{ControlPlane, free_port, workspace_root};
use crate::process::{Lifetime, Supervised};

/// Where `make olm` puts OLM's binaries and CRDs.
pub fn olm_dir() -> PathBuf {
    workspace_root().join("target/olm")
}

/// The namespace of OLM's global catalogs (the catalog operator's `--namespace`).
pub const CATALOG_NAMESPACE: &str = "olm";
/// The CatalogSource Caracal's catalog is published as.
pub const CATALOG: &str = "caracal";

/// One bundle in a catalog: its version and directory, and what it upgrades from.
#[derive(Clone, Debug)]
pub struct CatalogBundle {
    /// `0.2.0`.
    pub version: String,
    /// The bundle directory (`manifests/olm/<version>` or a release's `bundle/`).
    pub dir: PathBuf,
    /// The CSV it replaces (`caracal-operator.v0.1.0`), if any.
    pub replaces: Option<String>,
}

impl CatalogBundle {
    /// This workspace's bundle (`manifests/olm/<version>`), replacing `replaces`.
    pub fn this_release(replaces: Option<String>) -> Self {
        let version = env!("CARGO_PKG_VERSION");
        Self {
            version: version.to_owned(),
            dir: crate::controlplane::workspace_root()
                .join("manifests/olm")
                .join(version),
            replaces,
        }
    }
}

/// OLM running against a control plane, and the catalog it reads.
pub struct Olm {
    operators: Vec<Supervised>,
    opm: Option<Supervised>,
    dir: PathBuf,
}

fn apiresource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// OLM's kinds the lab writes or reads.
pub fn resource(kind: &str) -> ApiResource {
    let (version, plural) = match kind {
        "OperatorGroup" => ("v1", "operatorgroups"),
        "CatalogSource" => ("v1alpha1", "catalogsources"),
        "Subscription" => ("v1alpha1", "subscriptions"),
        "ClusterServiceVersion" => ("v1alpha1", "clusterserviceversions"),
        "InstallPlan" => ("v1alpha1", "installplans"),
        _ => ("v1alpha1", "unknown"),
    };
    apiresource("operators.coreos.com", version, kind, plural)
}

async fn apply(client: &Client, ns: Option<&str>, obj: Value) -> anyhow::Result<()> {
    let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let ar = resource(&kind);
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.patch(
        &name,
        &PatchParams::apply("caracal-lab").force(),
        &Patch::Apply(&obj),
    )
    .await
    .with_context(|| format!("applying {kind} {name}"))?;
    Ok(())
}

/// Creates namespace `name` unless it exists.
async fn ensure_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    match crate::objects::namespace(client, name, json!({})).await {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        other => Ok(other?),
    }
}

impl Olm {
    /// Installs OLM's CRDs and starts its two operators; logs under `dir`.
    pub async fn start(cp: &ControlPlane, client: &Client, dir: &Path) -> anyhow::Result<Self> {
        let bin = olm_dir().join("bin");
        let crds = olm_dir().join("crds");
        if !bin.join("olm").exists() || !crds.exists() {
            bail!("{} is missing OLM: run `make olm`", olm_dir().display());
        }
        std::fs::create_dir_all(dir)?;
        // The CSV CRD is larger than client-side apply's annotation allows.
        let out = cp
            .kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(&crds)
            .output()?;
        if !out.status.success() {
            bail!("applying OLM's CRDs: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Established, polled (`kubectl wait` right after the apply fails on a status not written yet).
        let names: Vec<String> = std::fs::read_dir(&crds)?
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("operators.coreos.com_")
                    .and_then(|p| p.strip_suffix(".yaml"))
                    .map(|p| format!("{p}.operators.coreos.com"))
            })
            .collect();
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        let start = Instant::now();
        for name in &names {
            loop {
                let established = api.get_opt(name).await?.is_some_and(|c| {
                    c.status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
                if established {
                    break;
                }
                if start.elapsed() > Duration::from_secs(60) {
                    bail!("OLM's CRD {name} never became Established");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        ensure_namespace(client, CATALOG_NAMESPACE).await?;
        let kubeconfig = cp.kubeconfig().to_string_lossy().into_owned();
        let env = [("KUBECONFIG".to_owned(), kubeconfig.clone())];
        let olm_bin = bin.join("olm").to_string_lossy().into_owned();
        let catalog_bin = bin.join("catalog").to_string_lossy().into_owned();
        let unset_ci = |program: String, args: &[&str]| {
            let mut a = vec!["-u".to_owned(), "CI".to_owned(), program];
            a.extend(args.iter().map(|s| (*s).to_owned()));
            a
        };
        let olm = Supervised::spawn_env(
            "olm",
            Path::new("/usr/bin/env"),
            &unset_ci(olm_bin, &[]),
            &env,
            &dir.join("olm.log"),
            Lifetime::Attached,
        )?;
        let catalog = Supervised::spawn_env(
            "olm-catalog",
            Path::new("/usr/bin/env"),
            &unset_ci(
                catalog_bin,
                &["--kubeconfig", &kubeconfig, "--namespace", CATALOG_NAMESPACE],
            ),
            &env,
            &dir.join("catalog.log"),
            Lifetime::Attached,
        )?;
        Ok(Self {
            operators: vec![olm, catalog],
            opm: None,
            dir: dir.to_owned(),
        })
    }

    /// Restarts an OLM operator that exited (they exit on purpose after some migrations); Err with its log
    /// when it cannot.
    pub fn keep_running(&mut self) -> anyhow::Result<()> {
        for p in &mut self.operators {
            if p.exited() {
                p.respawn()?;
            }
        }
        Ok(())
    }

    /// Writes the file-based catalog of `bundles` (one package `caracal`, channel `stable`) under
    /// `<dir>/catalog-<n>` and checks it with `opm validate`. Returns the directory.
    pub fn write_catalog(&self, bundles: &[CatalogBundle]) -> anyhow::Result<PathBuf> {
        let opm = olm_dir().join("bin/opm");
        let n = std::fs::read_dir(&self.dir)?.count();
        let dir = self.dir.join(format!("catalog-{n}/caracal"));
        std::fs::create_dir_all(&dir)?;
        let mut entries = Vec::new();
        for b in bundles {
            let out = std::process::Command::new(&opm)
                .args(["render", "-o", "yaml"])
                .arg(&b.dir)
                .output()?;
            if !out.status.success() {
                bail!(
                    "opm render {}: {}",
                    b.dir.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::fs::write(dir.join(format!("v{}.yaml", b.version)), &out.stdout)?;
            let mut entry = json!({"name": format!("caracal-operator.v{}", b.version)});
            if let Some(r) = &b.replaces {
                entry["replaces"] = r.clone().into();
                entry["skipRange"] = format!("<{}", b.version).into();
            }
            entries.push(entry);
        }
        let package = json!({"schema": "olm.package", "name": "caracal", "defaultChannel": "stable"});
        let channel =
            json!({"schema": "olm.channel", "package": "caracal", "name": "stable", "entries": entries});
        std::fs::write(
            dir.join("package.yaml"),
            format!(
                "---\n{}---\n{}",
                serde_yaml::to_string(&package)?,
                serde_yaml::to_string(&channel)?
            ),
        )?;
        let root = dir.parent().context("catalog root")?.to_owned();
        let out = std::process::Command::new(&opm)
            .arg("validate")
            .arg(&root)
            .output()?;
        if !out.status.success() {
            bail!(
                "opm validate {}: {}",
                root.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(root)
    }

    /// Serves `catalog` with `opm serve` on a free port (stopping the one served before) and waits until it
    /// answers. Returns its address.
    pub async fn serve(&mut self, catalog: &Path) -> anyhow::Result<SocketAddr> {
        if let Some(mut old) = self.opm.take() {
            old.stop(Duration::from_secs(5));
        }
        let port = free_port()?;
        let opm = olm_dir().join("bin/opm");
        let args: Vec<String> = vec![
            "serve".into(),
            catalog.to_string_lossy().into_owned(),
            "-p".into(),
            port.to_string(),
            "--pprof-addr=".into(),
            "-t".into(),
            self.dir
                .join("opm-termination.log")
                .to_string_lossy()
                .into_owned(),
        ];
        let mut p = Supervised::spawn("opm", &opm, &args, &self.dir.join("opm.log"), Lifetime::Attached)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Err(e) = p.check_running() {
                bail!("opm serve exited: {e}");
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("opm serve never listened on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.opm = Some(p);
        Ok(addr)
    }

    /// Points the CatalogSource `caracal` at `addr` (creating it) and waits until OLM reports it READY.
    pub async fn publish(&mut self, client: &Client, addr: SocketAddr) -> anyhow::Result<()> {
        apply(
            client,
            Some(CATALOG_NAMESPACE),
            json!({
                "apiVersion": "operators.coreos.com/v1alpha1", "kind": "CatalogSource",
                "metadata": {"name": CATALOG, "namespace": CATALOG_NAMESPACE},
                "spec": {"sourceType": "grpc", "address": addr.to_string(), "displayName": "Caracal"},
            }),
        )
        .await?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), CATALOG_NAMESPACE, &resource("CatalogSource"));
        let start = Instant::now();
        loop {
            self.keep_running()?;
            let cs = api.get(CATALOG).await?;
            let state = &cs.data["status"]["connectionState"];
            if state["lastObservedState"] == "READY" && state["address"] == addr.to_string() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(120) {
                bail!("the CatalogSource never became READY at {addr}: {state}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Subscribes `namespace` (created, with its OperatorGroup for all namespaces) to Caracal's package,
    /// channel `stable`, upgrades approved automatically.
    pub async fn subscribe(&self, client: &Client, namespace: &str) -> anyhow::Result<()> {
        ensure_namespace(client, namespace).await?;
        apply(
            client,
            Some(namespace),
            json!({"apiVersion": "operators.coreos.com/v1", "kind": "OperatorGroup",
                   "metadata": {"name": "caracal", "namespace": namespace}, "spec": {}}),
        )
        .await?;
        apply(
            client,
            Some(namespace),
            json!({"apiVersion": "operators.coreos.com/v1alpha1", "kind": "Subscription",
                   "metadata": {"name": "caracal", "namespace": namespace},
                   "spec": {"name": "caracal", "channel": "stable", "source": CATALOG,
                            "sourceNamespace": CATALOG_NAMESPACE, "installPlanApproval": "Automatic"}}),
        )
        .await
    }

    /// Waits until the Subscription in `namespace` has installed `csv` and the CSV has Succeeded (its
    /// Deployment available), keeping OLM's operators running; Err with the CSV's phase and message.
    pub async fn wait_installed(
        &mut self,
        client: &Client,
        namespace: &str,
        csv: &str,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let subs: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &resource("Subscription"));
        let csvs: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &resource("ClusterServiceVersion"));
        let start = Instant::now();
        loop {
            self.keep_running()?;
            let sub = subs.get("caracal").await?;
            let installed = sub.data["status"]["installedCSV"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let last = if let Some(c) = csvs.get_opt(csv).await? {
                let phase = c.data["status"]["phase"].as_str().unwrap_or_default().to_owned();
                let message = c.data["status"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if installed == csv && phase == "Succeeded" {
                    return Ok(());
                }
                format!("CSV {csv}: {phase}: {message}; Subscription installedCSV {installed:?}")
            } else {
                format!(
                    "no CSV {csv} yet; Subscription state {:?}, conditions {}",
                    sub.data["status"]["state"], sub.data["status"]["conditions"]
                )
            };
            if start.elapsed() > deadline {
                bail!("{csv} not installed after {deadline:?}: {last}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl Drop for Olm {
    fn drop(&mut self) {
        if let Some(mut p) = self.opm.take() {
            p.stop(Duration::from_secs(5));
        }
        for p in &mut self.operators {
            p.stop(Duration::from_secs(5));
        }
    }
}
