//! The lab: Caracal end to end on this machine, with nothing faked but the container runtime.
//!
//! `up` starts the real control plane (with the controller manager and scheduler), installs the CRDs,
//! applies `manifests/operator` (all but its Deployment) and runs `caracal-operator` as a process with its
//! ServiceAccount's token, registers N nodes (network namespaces on an underlay bridge, each with a lab
//! kubelet and a heartbeat), and applies an Installation. The kubelets then run what the operator rendered:
//! the caracal-node DaemonSet and the Typha Deployment as processes, the CNI install step into each node's
//! directories, and workload pods through the CNI plugin that step installed.
//!
//! Everything lives under `target/lab`; the pods' namespaces are recorded in `target/lab/pods.json` for
//! `caracal-lab probe`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::controlplane::{ControlPlane, Options, workspace_root};
use crate::kubelet::host::HostConfig;
use crate::kubelet::{self, HostPods, KubeletConfig, Pods};
use crate::netns::{NetNs, Underlay};
use crate::process::{Lifetime, Supervised};

/// How to run the lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// The Installation to apply.
    pub installation: PathBuf,
    /// The kube-proxy every node runs (None: none, as for Caracal's BPF data plane, which handles Services
    /// itself). [`LabOptions::new`] picks by the Installation's `linuxDataplane`.
    pub kube_proxy: Option<crate::kubeproxy::Mode>,
    /// What runs each node's pods.
    pub runtime: Runtime,
    /// How the operator is installed on real nodes.
    pub operator: OperatorInstall,
    /// More image directories (each with `images.json` and the archives, as `make images` writes them) whose
    /// images every real node imports besides `target/images`: the previous release's, for upgrades.
    pub extra_images: Vec<PathBuf>,
}

/// The previous release (N-1) as `make previous` builds it from its commit into `target/previous/<version>`:
/// its images, its OLM bundle and its Helm chart, as that release committed them.
#[derive(Clone, Debug)]
pub struct PreviousRelease {
    /// `0.1.0`.
    pub version: String,
    /// `target/previous/<version>`.
    pub dir: PathBuf,
}

impl PreviousRelease {
    /// The release `version` built by `make previous`; an error names the command when it is missing.
    pub fn open(version: &str) -> anyhow::Result<Self> {
        let dir = workspace_root().join("target/previous").join(version);
        for part in [
            "images/images.json",
            "bundle/metadata/annotations.yaml",
            "chart/Chart.yaml",
        ] {
            if !dir.join(part).exists() {
                bail!(
                    "{} is missing: run `make previous` (it builds v{version} from its commit)",
                    dir.join(part).display()
                );
            }
        }
        Ok(Self {
            version: version.to_owned(),
            dir,
        })
    }

    /// Its images (`images.json` and the archives).
    pub fn images(&self) -> PathBuf {
        self.dir.join("images")
    }

    /// Its OLM bundle (`manifests/olm/<version>` of its commit).
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }

    /// Its Helm chart (`manifests/helm/caracal` of its commit).
    pub fn chart(&self) -> PathBuf {
        self.dir.join("chart")
    }
}

/// How the lab installs the operator on real nodes (the namespace lab runs it as a process).
#[derive(Clone, Debug, Default)]
pub enum OperatorInstall {
    /// `kubectl apply -f manifests/operator`.
    #[default]
    Manifest,
    /// Through the real OLM ([`crate::olm`]): a catalog of these bundles, a Subscription to it in
    /// `caracal-operator`. OLM installs the CRDs.
    Olm(Vec<crate::olm::CatalogBundle>),
    /// `helm install caracal CHART -n caracal-operator --create-namespace` with these `--set` values and
    /// `installation.enabled=false` (the lab applies its Installation itself).
    Helm {
        /// The chart directory or archive.
        chart: PathBuf,
        /// Extra `--set` values.
        values: Vec<String>,
    },
}

/// What runs a lab node's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// The lab kubelet (`crate::kubelet`): processes and namespaces, no containers.
    Lab,
    /// The real kubelet with containerd and runc ([`crate::realnode`]), Caracal running from its images.
    Containerd,
}

impl std::str::FromStr for Runtime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lab" => Ok(Runtime::Lab),
            "containerd" => Ok(Runtime::Containerd),
            o => Err(format!(
                "--runtime {o:?}: `lab` (the lab kubelet) or `containerd` (real kubelet, containerd, runc)"
            )),
        }
    }
}

impl LabOptions {
    /// `nodes` nodes running `installation`, with kube-proxy (iptables mode) unless its `linuxDataplane` is BPF.
    pub fn new(nodes: usize, installation: PathBuf) -> Self {
        let bpf = std::fs::read_to_string(&installation)
            .ok()
            .and_then(|t| serde_yaml::from_str::<Value>(&t).ok())
            .is_some_and(|v| v["spec"]["calicoNetwork"]["linuxDataplane"] == "BPF");
        LabOptions {
            nodes,
            installation,
            kube_proxy: (!bpf).then_some(crate::kubeproxy::Mode::Iptables),
            runtime: Runtime::Lab,
            operator: OperatorInstall::Manifest,
            extra_images: Vec::new(),
        }
    }
}

impl OperatorInstall {
    /// `manifest`, `olm` (a catalog of this version's bundle, `manifests/olm/<version>`) or `helm` (the
    /// chart in `manifests/helm/caracal`).
    pub fn from_flag(flag: &str) -> anyhow::Result<Self> {
        Ok(match flag {
            "manifest" => OperatorInstall::Manifest,
            "olm" => OperatorInstall::Olm(vec![crate::olm::CatalogBundle::this_release(None)]),
            "helm" => OperatorInstall::Helm {
                chart: workspace_root().join("manifests/helm/caracal"),
                values: Vec::new(),
            },
            o => bail!("--operator-install {o:?}: `manifest`, `olm` or `helm`"),
        })
    }
}

/// The IPv4 pool CIDRs of the Installation in `file` (kube-proxy's `clusterCIDR`: what it treats as pods).
fn pool_cidrs(file: &Path) -> anyhow::Result<String> {
    let v: Value = serde_yaml::from_str(&std::fs::read_to_string(file)?)?;
    let cidrs: Vec<&str> = v["spec"]["calicoNetwork"]["ipPools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["cidr"].as_str())
        .filter(|c| !c.contains(':'))
        .collect();
    Ok(cidrs.join(","))
}

/// The `kubernetes-services-endpoint` ConfigMap in the operator's namespace (created if missing): the API
/// server's address for the operator and, through it, the agents and Typha, where no kube-proxy serves the
/// `kubernetes` ClusterIP (yet).
async fn api_server_address(cp: &ControlPlane, client: &Client) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    match crate::objects::namespace(client, OPERATOR_NAMESPACE, json!({})).await {
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        other => other?,
    }
    let port = cp.port().context("the API server's port")?.to_string();
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kubernetes-services-endpoint", "namespace": "caracal-operator"},
        "data": {
            "KUBERNETES_SERVICE_HOST": crate::controlplane::ADVERTISED_ADDRESS.to_string(),
            "KUBERNETES_SERVICE_PORT": port,
        }
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), "caracal-operator")
        .patch(
            "kubernetes-services-endpoint",
            &kube::api::PatchParams::apply("caracal-lab").force(),
            &kube::api::Patch::Apply(&cm),
        )
        .await?;
    Ok(())
}

/// The operator's namespace on every install path.
pub const OPERATOR_NAMESPACE: &str = "caracal-operator";

/// `helm` (built by `make helm`) with the lab's kubeconfig.
pub fn helm(cp: &ControlPlane) -> std::process::Command {
    let mut cmd = std::process::Command::new(workspace_root().join("target/helm/bin/helm"));
    cmd.env("KUBECONFIG", cp.kubeconfig())
        .env("HELM_CACHE_HOME", cp.dir().join("helm/cache"))
        .env("HELM_CONFIG_HOME", cp.dir().join("helm/config"))
        .env("HELM_DATA_HOME", cp.dir().join("helm/data"));
    cmd
}

/// A running lab (dropping it tears everything down).
pub struct Lab {
    /// The control plane.
    pub cp: ControlPlane,
    /// An admin client.
    pub client: Client,
    /// Real nodes (with `Runtime::Containerd`), dropped before the namespaces they run in.
    pub real_nodes: Vec<crate::realnode::RealNode>,
    /// The underlay.
    pub underlay: Underlay,
    /// Node namespaces, by Node name.
    pub nodes: Vec<(String, NetNs, Ipv4Addr)>,
    /// Workload pods each kubelet runs.
    pub pods: Vec<Pods>,
    /// Host-network pods each kubelet runs.
    pub host_pods: Vec<HostPods>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    operator: Option<Supervised>,
    /// OLM, when it installed the operator.
    pub olm: Option<crate::olm::Olm>,
    /// Each node's kube-proxy, when it runs one.
    kube_proxies: std::sync::Mutex<Vec<Supervised>>,
    /// The pools' CIDRs, for kube-proxy.
    cluster_cidr: String,
    /// The machine's kernel settings the kubelets change, put back when the lab goes.
    sysctls: Option<crate::realnode::Sysctls>,
    dir: PathBuf,
}

/// The workspace's binaries the lab runs: the debug build, or the one `CARACAL_LAB_BIN_DIR` names (a
/// benchmark measures the release build), relative to the workspace (cargo runs a bench or test in its
/// package's directory, so `target/release` means the workspace's).
fn lab_bin() -> PathBuf {
    std::env::var_os("CARACAL_LAB_BIN_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(
            || workspace_root().join("target/debug"),
            |d| workspace_root().join(d),
        )
}

/// The images every real node imports (`make images` builds them into `target/images`).
pub const IMAGES: &[&str] = &["operator", "node", "cni", "typha", "pause", "echo"];

/// One image a real node imports: its archive, reference and digest.
struct NodeImage {
    archive: PathBuf,
    reference: String,
    digest: String,
}

/// Every image of `make images` ([`IMAGES`] in `target/images`) and every image listed in the `images.json`
/// of each directory of `extra`.
fn node_images(extra: &[PathBuf]) -> anyhow::Result<Vec<NodeImage>> {
    let read = |dir: &Path| -> anyhow::Result<Value> {
        let list = dir.join("images.json");
        Ok(serde_json::from_str(
            &std::fs::read_to_string(&list)
                .with_context(|| format!("{}: run `make images`", list.display()))?,
        )?)
    };
    let entry = |dir: &Path, list: &Value, image: &str| -> anyhow::Result<NodeImage> {
        let (Some(reference), Some(digest)) =
            (list[image]["reference"].as_str(), list[image]["digest"].as_str())
        else {
            bail!("{image} is not in {}/images.json", dir.display());
        };
        let archive = dir.join(format!("{image}.oci.tar"));
        if !archive.exists() {
            bail!("{} is missing: run `make images`", archive.display());
        }
        Ok(NodeImage {
            archive,
            reference: reference.to_owned(),
            digest: digest.to_owned(),
        })
    };
    let own = workspace_root().join("target/images");
    let list = read(&own)?;
    let mut images = IMAGES
        .iter()
        .map(|image| entry(&own, &list, image))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for dir in extra {
        let list = read(dir)?;
        for image in list.as_object().into_iter().flat_map(|o| o.keys()) {
            images.push(entry(dir, &list, image)?);
        }
    }
    Ok(images)
}

/// The lab's directory.
pub fn lab_dir() -> PathBuf {
    workspace_root().join("target/lab")
}

fn step(what: &str) {
    println!("==> {what}");
}

/// Makes the API server (on the machine's loopback) reachable inside the node namespace `ns` at `addr`:`port`
/// (127.0.0.1, as the kubeconfigs name it, and the address it advertises as the `kubernetes` Service's
/// endpoint, which the node holds on its loopback): a listener whose connections are carried to the machine's
/// 127.0.0.1:`port`. TLS is end to end (bytes are copied), so the certificate and the kubeconfigs stay as they
/// are.
fn api_forwarder(ns: &NetNs, addr: Ipv4Addr, port: u16) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = ns
        .enter(move || std::net::TcpListener::bind((addr, port)))
        .map_err(|e| anyhow::anyhow!("entering {}: {e}", ns.name()))??;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inside, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut host) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut host).await;
                }
            });
        }
    }))
}

fn kubectl_apply(cp: &ControlPlane, file: &Path) -> anyhow::Result<()> {
    let out = cp.kubectl().args(["apply", "-f"]).arg(file).output()?;
    if !out.status.success() {
        bail!(
            "kubectl apply -f {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// How [`until`] knows a wait is over without success: an error that starts with this stops it at once.
const DEGRADED: &str = "the operator reports the Installation Degraded";

async fn until<F, Fut>(what: &str, deadline: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if e.starts_with(DEGRADED) => bail!("{e}"),
            Err(e) => {
                if e != last {
                    println!("    {what}: {e}");
                    last = e;
                }
            }
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Lab {
    /// Brings the lab up (see the module docs), printing each step.
    pub async fn up(opts: &LabOptions) -> anyhow::Result<Self> {
        let dir = lab_dir();
        crate::netns::unmount_node_filesystems_under(&dir.join("nodes"));
        crate::netns::remove_orphans();
        // A new lab starts from empty node directories: a real node's containerd would otherwise find the
        // sandboxes of the last lab and tear them down (CNI DEL) under the new pods of the same names.
        for sub in ["nodes", "pods"] {
            match std::fs::remove_dir_all(dir.join(sub)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => bail!(
                    "removing {} (left by an earlier lab) failed: {e}; a mount left under it? (`grep {} /proc/self/mounts`)",
                    dir.join(sub).display(),
                    dir.display()
                ),
                _ => {}
            }
        }
        // What an earlier lab recorded describes namespaces that are gone.
        let _ = std::fs::remove_file(dir.join("pods.json"));
        let _ = std::fs::remove_file(dir.join("services.json"));
        std::fs::create_dir_all(&dir)?;
        step("control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)");
        let cp = ControlPlane::start(Options::lab()).await?;
        let client = cp.client().await?;
        std::fs::copy(cp.kubeconfig(), dir.join("kubeconfig"))?;
        let real = opts.runtime == Runtime::Containerd;
        if !real && !matches!(opts.operator, OperatorInstall::Manifest) {
            bail!("the operator is installed through OLM or Helm on real nodes only (--runtime containerd)");
        }
        // Through OLM or Helm, the CRDs come with the operator (OLM installs the bundle's; the operator
        // installs its own at start).
        if matches!(opts.operator, OperatorInstall::Manifest) {
            step("CRDs");
            crate::crds::install(&client, Duration::from_secs(60)).await?;
        }
        let mut olm = None;
        let operator = if real {
            // Before the operator's pod starts: its container reads the address once, at start (the
            // `kubernetes` ClusterIP works only once kube-proxy runs, after the nodes).
            api_server_address(&cp, &client).await?;
            match &opts.operator {
                OperatorInstall::Manifest => {
                    step(
                        "operator: manifests/operator as it is (its Deployment runs from the operator image)",
                    );
                    kubectl_apply(&cp, &workspace_root().join("manifests/operator"))?;
                }
                OperatorInstall::Olm(bundles) => {
                    step(
                        "operator: through OLM (olm and catalog operators, a catalog served by opm, a Subscription)",
                    );
                    let mut o = crate::olm::Olm::start(&cp, &client, &dir.join("olm")).await?;
                    let catalog = o.write_catalog(bundles)?;
                    let addr = o.serve(&catalog).await?;
                    o.publish(&client, addr).await?;
                    o.subscribe(&client, OPERATOR_NAMESPACE).await?;
                    olm = Some(o);
                }
                OperatorInstall::Helm { chart, values } => {
                    step(&format!("operator: helm install caracal {}", chart.display()));
                    let mut cmd = helm(&cp);
                    cmd.args(["install", "caracal"])
                        .arg(chart)
                        .args(["--namespace", OPERATOR_NAMESPACE, "--create-namespace"])
                        .args(["--set", "installation.enabled=false"]);
                    for v in values {
                        cmd.args(["--set", v]);
                    }
                    let out = cmd.output().context("running helm (make helm)")?;
                    if !out.status.success() {
                        bail!("helm install: {}", String::from_utf8_lossy(&out.stderr));
                    }
                }
            }
            None
        } else {
            Some(Self::operator_process(&cp, &client, &dir).await?)
        };
        let bin = lab_bin();

        step(&format!(
            "{} nodes: namespaces on an underlay bridge, each with {}",
            opts.nodes,
            if real {
                "the real kubelet, containerd and runc"
            } else {
                "a lab kubelet"
            }
        ));
        let net: ipnet::Ipv4Net = "10.99.0.0/24".parse()?;
        let underlay = Underlay::new(net)?;
        let api_port = cp.port().context("the API server's port")?;
        let mut nodes = Vec::new();
        let mut tasks = Vec::new();
        let mut pods = Vec::new();
        let mut host_pods = Vec::new();
        let mut real_nodes = Vec::new();
        let sysctls = real.then(crate::realnode::Sysctls::record);
        // The images every real node imports, as `make images` listed them (read once for all nodes).
        let images = if real {
            node_images(&opts.extra_images)?
        } else {
            Vec::new()
        };
        if real {
            // The API server dials kubelets (logs, exec) and the operator's webhook at node addresses.
            underlay.host_link("caracal-lab", Ipv4Addr::from(u32::from(net.broadcast()) - 1))?;
        }
        for i in 0..opts.nodes {
            let name = format!("lab-node-{i}");
            let ns = crate::netns::node(&format!("lab{i}"))?;
            let ip = Ipv4Addr::from(u32::from(net.network()) + 2 + u32::try_from(i)?);
            underlay.attach(&ns, "eth0", ip)?;
            let advertised = crate::controlplane::ADVERTISED_ADDRESS;
            ns.ip(&["addr", "add", &format!("{advertised}/32"), "dev", "lo"])?;
            tasks.push(api_forwarder(&ns, Ipv4Addr::LOCALHOST, api_port)?);
            tasks.push(api_forwarder(&ns, advertised, api_port)?);
            if real {
                real_nodes.push(Self::real_node(&cp, &name, &ns, ip, api_port, &dir, &images)?);
                nodes.push((name, ns, ip));
                continue;
            }
            crate::objects::node(&client, &name, &ip.to_string()).await?;
            tasks.push(tokio::spawn(kubelet::heartbeat(client.clone(), name.clone())));
            let cfg = KubeletConfig {
                node: name.clone(),
                node_ns: ns.name().to_owned(),
                host_ip: ip,
                plugin: PathBuf::new(),
                conf: Value::Null,
                host: Some(HostConfig {
                    lab_dir: dir.clone(),
                    bin_dir: bin.clone(),
                    extra_env: Vec::new(),
                    admin_kubeconfig: cp.kubeconfig().to_path_buf(),
                    node_ns: Some(ns.name().to_owned()),
                }),
            };
            let (p, h) = (Pods::default(), HostPods::default());
            tasks.push(tokio::spawn(cfg.run(client.clone(), p.clone(), h.clone())));
            pods.push(p);
            host_pods.push(h);
            nodes.push((name, ns, ip));
        }

        let cluster_cidr = pool_cidrs(&opts.installation)?;
        let lab = Lab {
            cp,
            client,
            underlay,
            nodes,
            pods,
            host_pods,
            tasks,
            operator,
            olm,
            kube_proxies: std::sync::Mutex::default(),
            cluster_cidr,
            real_nodes,
            sysctls,
            dir,
        };
        if let Some(mode) = opts.kube_proxy {
            step(&format!("kube-proxy ({}) on every node", mode.as_str()));
            lab.start_kube_proxy(mode)?;
            // As a cluster's kube-proxy DaemonSet is up before a CNI is installed: the agents reach the API
            // server through the `kubernetes` ClusterIP.
            lab.wait_kube_proxy(mode).await?;
        }
        // Without kube-proxy nothing serves the `kubernetes` ClusterIP to host-network pods. (Real nodes got the
        // address before the operator was installed: Caracal's own pods never wait for Services there.)
        if !real && opts.kube_proxy.is_none() {
            step("the operator gets the API server's address (kubernetes-services-endpoint)");
            lab.give_api_server_address().await?;
        }
        if real {
            // As a user waits for the operator before applying an Installation: until it serves, its
            // admission webhook refuses every Installation ("no endpoints available").
            step("waiting for the operator's Deployment");
            let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
                Api::namespaced(lab.client.clone(), "caracal-operator");
            until("the operator available", Duration::from_secs(180), || {
                let deployments = deployments.clone();
                async move {
                    let d = deployments
                        .get("caracal-operator")
                        .await
                        .map_err(|e| e.to_string())?;
                    let available = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
                    if available >= 1 {
                        Ok(true)
                    } else {
                        Err("no replica available yet".into())
                    }
                }
            })
            .await?;
        }
        step(&format!("Installation from {}", opts.installation.display()));
        kubectl_apply(&lab.cp, &opts.installation)?;
        step("waiting for caracal-node on every node");
        let ds: Api<DaemonSet> = Api::namespaced(lab.client.clone(), "caracal-system");
        let installations: Api<caracal_crds::installation::Installation> = Api::all(lab.client.clone());
        let want = i32::try_from(opts.nodes)?;
        until(
            "caracal-node ready on every node",
            Duration::from_secs(300),
            || {
                let (ds, installations) = (ds.clone(), installations.clone());
                async move {
                    // An Installation the operator refused is said at once, with its message: nothing will
                    // come of waiting.
                    if let Ok(Some(i)) = installations.get_opt("default").await
                        && let Some(c) = i
                            .status
                            .iter()
                            .flat_map(|s| s.conditions.iter())
                            .find(|c| c.type_ == "Degraded" && c.status == "True")
                    {
                        return Err(format!("{DEGRADED}: {} ({})", c.message, c.reason));
                    }
                    match ds.get_opt("caracal-node").await {
                        Ok(Some(d)) => {
                            let ready = d.status.map(|s| s.number_ready).unwrap_or(0);
                            if ready >= want {
                                Ok(true)
                            } else {
                                Err(format!("{ready}/{want} ready"))
                            }
                        }
                        Ok(None) => Err("the operator has not rendered the DaemonSet yet".into()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await?;
        Ok(lab)
    }

    /// A real node in `ns`: its containerd with every image of `make images` (listed in `images`) imported,
    /// then its kubelet, which registers the Node. Called on the lab's own thread, not a blocking-pool one:
    /// the processes die with the thread that started them (their parent death signal), and the pool ends
    /// idle threads.
    fn real_node(
        cp: &ControlPlane,
        name: &str,
        ns: &NetNs,
        ip: Ipv4Addr,
        api_port: u16,
        dir: &Path,
        images: &[NodeImage],
    ) -> anyhow::Result<crate::realnode::RealNode> {
        let mut node = crate::realnode::RealNode::start(crate::realnode::RealNodeConfig {
            name: name.to_owned(),
            netns: ns.name().to_owned(),
            ip,
            dir: dir.join("nodes").join(name),
            api_port,
            pki: cp.pki().clone(),
            bin: crate::realnode::runtime_bin(),
        })?;
        for image in images {
            node.import(&image.archive, &image.reference, &image.digest)?;
        }
        node.start_kubelet()?;
        println!(
            "    {name}: containerd up, {} images imported, kubelet started",
            images.len()
        );
        Ok(node)
    }

    /// `manifests/operator` but its Deployment, and the operator as a lab process with its ServiceAccount's
    /// token, its webhook registered at a loopback URL.
    async fn operator_process(cp: &ControlPlane, client: &Client, dir: &Path) -> anyhow::Result<Supervised> {
        step("operator: manifests/operator (its Deployment runs as a lab process instead)");
        let mut docs = Vec::new();
        let manifest_dir = workspace_root().join("manifests/operator");
        for entry in std::fs::read_dir(&manifest_dir)? {
            let text = std::fs::read_to_string(entry?.path())?;
            for d in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(d)?;
                if !v.is_null() && v["kind"] != "Deployment" {
                    docs.push(serde_yaml::to_string(&v)?);
                }
            }
        }
        let manifest = dir.join("operator-manifest.yaml");
        std::fs::write(&manifest, docs.join("---\n"))?;
        kubectl_apply(cp, &manifest)?;
        let op_kc = dir.join("operator.kubeconfig");
        crate::controlplane::service_account_kubeconfig(
            client,
            cp.kubeconfig(),
            "caracal-operator",
            "caracal-operator",
            None,
            &op_kc,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let bin = lab_bin();
        let hook = crate::controlplane::free_port()?;
        Ok(Supervised::spawn_env(
            "caracal-operator",
            &bin.join("caracal-operator"),
            &[
                "--webhook-addr".into(),
                format!("127.0.0.1:{hook}"),
                "--webhook-url".into(),
                format!("https://127.0.0.1:{hook}/validate"),
                "--http-addr".into(),
                format!("127.0.0.1:{}", crate::controlplane::free_port()?),
            ],
            &[
                ("KUBECONFIG".into(), op_kc.display().to_string()),
                ("POD_NAME".into(), "lab-operator".into()),
            ],
            &dir.join("operator.log"),
            Lifetime::Attached,
        )?)
    }

    /// Starts the real kube-proxy in `mode` on every node (as a cluster's kube-proxy DaemonSet would run).
    pub fn start_kube_proxy(&self, mode: crate::kubeproxy::Mode) -> anyhow::Result<()> {
        self.stop_kube_proxy();
        for (name, ns, _) in &self.nodes {
            let dir = self.dir.join("nodes").join(name).join("kube-proxy");
            let p = crate::kubeproxy::start(ns, name, self.cp.kubeconfig(), &self.cluster_cidr, mode, &dir)?;
            self.kube_proxies
                .lock()
                .map_err(|_| anyhow::anyhow!("kube-proxy list poisoned"))?
                .push(p);
        }
        Ok(())
    }

    /// Creates the `kubernetes-services-endpoint` ConfigMap in the operator's namespace with the address the
    /// API server advertises (what a cluster without kube-proxy needs, as Calico documents for its eBPF data
    /// plane): the operator passes it to the agents and Typha, which then reach the API server without the
    /// `kubernetes` ClusterIP.
    pub async fn give_api_server_address(&self) -> anyhow::Result<()> {
        api_server_address(&self.cp, &self.client).await
    }

    /// Waits until every node's kube-proxy has programmed the `kubernetes` Service.
    pub async fn wait_kube_proxy(&self, mode: crate::kubeproxy::Mode) -> anyhow::Result<()> {
        for (name, ns, _) in &self.nodes {
            let ns = NetNs::existing(ns.name());
            until(&format!("kube-proxy on {name}"), Duration::from_secs(90), || {
                let ns = NetNs::existing(ns.name());
                async move {
                    let rules = tokio::task::spawn_blocking(move || match mode {
                        crate::kubeproxy::Mode::Iptables => ns.exec(&["iptables-save", "-t", "nat"]),
                        crate::kubeproxy::Mode::Nftables => {
                            ns.exec(&["nft", "list", "table", "ip", "kube-proxy"])
                        }
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default();
                    // iptables mode comments its rules `default/kubernetes:https`; nftables mode names its chains
                    // `service-HASH-default/kubernetes/tcp/https`.
                    if rules.contains("default/kubernetes:https")
                        || rules.contains("default/kubernetes/tcp/https")
                    {
                        Ok(true)
                    } else {
                        Err("the kubernetes Service is not programmed yet".into())
                    }
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Stops every node's kube-proxy (its rules stay until someone removes them, as when a cluster's
    /// kube-proxy DaemonSet is scaled away before switching to Caracal's BPF data plane).
    pub fn stop_kube_proxy(&self) {
        let running = self
            .kube_proxies
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for mut p in running {
            p.stop(Duration::from_secs(5));
        }
    }

    /// The operator process's id.
    pub fn operator_pid(&self) -> Option<u32> {
        self.operator.as_ref().and_then(Supervised::pid)
    }

    /// Applies `file` with kubectl.
    pub fn apply(&self, file: &Path) -> anyhow::Result<()> {
        kubectl_apply(&self.cp, file)
    }

    /// Waits until every pod in `namespaces` is running with an address.
    pub async fn wait_pods(&self, namespaces: &[&str]) -> anyhow::Result<()> {
        for ns in namespaces {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            until(&format!("pods in {ns}"), Duration::from_secs(120), || {
                let api = api.clone();
                async move {
                    let list = api
                        .list(&ListParams::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    let pending: Vec<String> = list
                        .items
                        .iter()
                        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_none())
                        .map(ResourceExt::name_any)
                        .collect();
                    if pending.is_empty() {
                        Ok(true)
                    } else {
                        Err(format!("waiting for {pending:?}"))
                    }
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Records every workload pod the API server knows that runs with an address ([`list_pods`]) in
    /// `target/lab/pods.json`.
    pub async fn record_pods(&self) -> anyhow::Result<Value> {
        let v = list_pods(&self.client).await?;
        std::fs::write(self.dir.join("pods.json"), serde_json::to_string_pretty(&v)?)?;
        Ok(v)
    }

    /// Waits until every Service with a selector in `namespaces` has, in its EndpointSlices, a ready endpoint
    /// for each running pod its selector picks (what kube-proxy or Caracal then program).
    pub async fn wait_services(&self, namespaces: &[&str]) -> anyhow::Result<()> {
        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        for ns in namespaces {
            let (svcs, slices, pods) = (
                Api::<Service>::namespaced(self.client.clone(), ns),
                Api::<EndpointSlice>::namespaced(self.client.clone(), ns),
                Api::<Pod>::namespaced(self.client.clone(), ns),
            );
            until(
                &format!("Service endpoints in {ns}"),
                Duration::from_secs(120),
                || {
                    let (svcs, slices, pods) = (svcs.clone(), slices.clone(), pods.clone());
                    async move {
                        let e = |e: kube::Error| e.to_string();
                        for svc in svcs.list(&ListParams::default()).await.map_err(e)? {
                            let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.clone()) else {
                                continue;
                            };
                            let sel: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
                            let want = pods
                                .list(&ListParams::default().labels(&sel.join(",")))
                                .await
                                .map_err(e)?
                                .items
                                .iter()
                                .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
                                .count();
                            let name = svc.name_any();
                            let ready: std::collections::BTreeSet<String> = slices
                                .list(
                                    &ListParams::default()
                                        .labels(&format!("kubernetes.io/service-name={name}")),
                                )
                                .await
                                .map_err(e)?
                                .items
                                .iter()
                                .flat_map(|s| &s.endpoints)
                                .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                                .flat_map(|ep| ep.addresses.clone())
                                .collect();
                            if ready.len() < want {
                                return Err(format!(
                                    "{ns}/{name}: {} of {want} endpoints ready",
                                    ready.len()
                                ));
                            }
                        }
                        Ok(true)
                    }
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Records the Services of `namespaces` (address, type, affinity, ports with their node ports, and the
    /// addresses of the pods their selector picks) and the nodes (name, namespace, address) in
    /// `target/lab/services.json`, for [`probe_services`].
    pub async fn record_services(&self, namespaces: &[&str]) -> anyhow::Result<Value> {
        use k8s_openapi::api::core::v1::Service;
        let mut services = Vec::new();
        for ns in namespaces {
            let list = Api::<Service>::namespaced(self.client.clone(), ns)
                .list(&ListParams::default())
                .await?;
            for svc in list {
                let spec = svc.spec.clone().unwrap_or_default();
                let Some(selector) = spec.selector.clone() else {
                    continue;
                };
                let sel = selector
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
                    .list(&ListParams::default().labels(&sel))
                    .await?;
                let mut backends: Vec<String> = pods
                    .iter()
                    .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                    .collect();
                backends.sort();
                let ports: Vec<Value> = spec
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| {
                        let target = match &p.target_port {
                            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) => {
                                json!(t)
                            }
                            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n)) => {
                                json!(n)
                            }
                            None => json!(p.port),
                        };
                        json!({"port": p.port, "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                               "nodePort": p.node_port, "targetPort": target})
                    })
                    .collect();
                services.push(json!({
                    "service": format!("{ns}/{}", svc.name_any()),
                    "clusterIP": spec.cluster_ip,
                    "type": spec.type_.unwrap_or_else(|| "ClusterIP".into()),
                    "affinity": spec.session_affinity.unwrap_or_else(|| "None".into()),
                    "externalTrafficPolicy": spec.external_traffic_policy.unwrap_or_else(|| "Cluster".into()),
                    "ports": ports,
                    "backends": backends,
                }));
            }
        }
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|(name, ns, ip)| json!({"node": name, "netns": ns.name(), "ip": ip.to_string()}))
            .collect();
        let v = json!({"services": services, "nodes": nodes});
        std::fs::write(self.dir.join("services.json"), serde_json::to_string_pretty(&v)?)?;
        Ok(v)
    }

    /// Tears everything down: kubelets and their processes, pods' and nodes' namespaces, the operator and
    /// the control plane.
    pub fn down(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for h in &self.host_pods {
            if let Ok(mut m) = h.lock() {
                m.clear();
            }
        }
        for p in &self.pods {
            if let Ok(mut m) = p.lock() {
                m.clear();
            }
        }
        self.stop_kube_proxy();
        if let Some(mut op) = self.operator.take() {
            op.stop(Duration::from_secs(5));
        }
        self.olm.take();
        self.real_nodes.clear();
        self.sysctls.take();
        self.nodes.clear();
        crate::netns::unmount_node_filesystems_under(&self.dir.join("nodes"));
    }
}

/// Every workload pod the API server knows that runs with an address, on any node: namespace/name, address,
/// declared ports, node, and the network namespace to probe from: the lab kubelet's (its
/// [`kubelet::NETNS_ANNOTATION`]) or, on a real node, the pod's own ([`crate::realnode::pod_netns`]). What
/// `caracal-lab probe` measures, so a pod applied after `up` is measured too.
pub async fn list_pods(client: &Client) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for pod in Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let (Some(node), false) = (spec.node_name.clone(), spec.host_network.unwrap_or(false)) else {
            continue;
        };
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        let netns = pod
            .annotations()
            .get(kubelet::NETNS_ANNOTATION)
            .cloned()
            .or_else(|| crate::realnode::pod_netns(&node, &pod.uid().unwrap_or_default()));
        let Some(netns) = netns else {
            continue;
        };
        let ports: Vec<Value> = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .map(|p| json!({"port": p.container_port, "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into())}))
            .collect();
        let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        out.push(json!({"pod": key, "netns": netns, "ip": ip, "ports": ports, "node": node}));
    }
    out.sort_by_key(|p| p["pod"].as_str().map(str::to_owned));
    Ok(Value::Array(out))
}

/// Probes every ordered pair of recorded pods on every port the destination declares, with real
/// connections between the pods' namespaces, many cells at once (a denied cell waits out its timeout). The
/// cells have the shape `caracalctl policy matrix` prints (`from`, `to`, `port`, `protocol`, `allowed`),
/// sorted the same way.
pub fn probe(pods: &Value, timeout: Duration) -> Vec<Value> {
    let list = pods.as_array().cloned().unwrap_or_default();
    let mut todo = Vec::new();
    for src in &list {
        let Some(netns) = src["netns"].as_str() else {
            continue;
        };
        for dst in &list {
            if src["pod"] == dst["pod"] {
                continue;
            }
            let Some(ip) = dst["ip"].as_str().and_then(|i| i.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            for port in dst["ports"].as_array().into_iter().flatten() {
                let p = u16::try_from(port["port"].as_u64().unwrap_or(0)).unwrap_or(0);
                let proto = port["protocol"].as_str().unwrap_or("TCP").to_owned();
                todo.push((
                    netns.to_owned(),
                    ip,
                    p,
                    proto,
                    src["pod"].clone(),
                    dst["pod"].clone(),
                ));
            }
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Value> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..PROBE_THREADS)
            .map(|_| {
                scope.spawn(|| {
                    let mut cells = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((netns, ip, p, proto, from, to)) = todo.get(i) else {
                            return cells;
                        };
                        let ns = NetNs::existing(netns);
                        let ok = if proto == "UDP" {
                            crate::probe::udp_echo(&ns, *ip, *p, timeout)
                        } else {
                            crate::probe::tcp_echo(&ns, *ip, *p, timeout)
                        }
                        .is_ok_and(|o| o.connected());
                        cells.push(
                            json!({"from": from, "to": to, "port": p, "protocol": proto, "allowed": ok}),
                        );
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| w.join().ok())
            .flatten()
            .collect()
    });
    sort_cells(&mut out);
    out
}

/// How many cells [`probe`] measures at once.
const PROBE_THREADS: usize = 16;

/// Connections per Service cell: enough that a Service with two backends reaching only one by chance is
/// unlikely (2 x 2^-12).
pub const SERVICE_TRIES: usize = 12;

/// Probes every recorded Service ([`Lab::record_services`]) with real connections: from every recorded pod
/// to each ClusterIP port, and from every node to each other node's NodePorts, [`SERVICE_TRIES`] new
/// connections (or UDP sockets) per cell, each asking which backend answered. A cell has the shape of
/// [`probe`]'s (`from`, `to` = `svc:NAMESPACE/NAME` or `nodeport:NODE`, `port`, `protocol`) with `allowed`
/// (some connection was answered) and `backends` (the pod addresses that answered, sorted).
pub fn probe_services(pods: &Value, services: &Value, timeout: Duration) -> Vec<Value> {
    // (source namespace, address, protocol, the cell without its result).
    let mut todo: Vec<(String, std::net::SocketAddr, String, Value)> = Vec::new();
    let svcs = services["services"].as_array().cloned().unwrap_or_default();
    let nodes = services["nodes"].as_array().cloned().unwrap_or_default();
    for svc in &svcs {
        let Some(vip) = svc["clusterIP"].as_str().and_then(|i| i.parse::<Ipv4Addr>().ok()) else {
            continue;
        };
        let name = svc["service"].as_str().unwrap_or("");
        for port in svc["ports"].as_array().into_iter().flatten() {
            let p = u16::try_from(port["port"].as_u64().unwrap_or(0)).unwrap_or(0);
            let proto = port["protocol"].as_str().unwrap_or("TCP").to_owned();
            for src in pods.as_array().into_iter().flatten() {
                let Some(netns) = src["netns"].as_str() else {
                    continue;
                };
                todo.push((
                    netns.to_owned(),
                    (vip, p).into(),
                    proto.clone(),
                    json!({"from": src["pod"], "to": format!("svc:{name}"), "port": p, "protocol": proto}),
                ));
            }
            let Some(node_port) = port["nodePort"].as_u64().and_then(|n| u16::try_from(n).ok()) else {
                continue;
            };
            for src in &nodes {
                for dst in &nodes {
                    let (Some(netns), Some(ip)) = (
                        src["netns"].as_str(),
                        dst["ip"].as_str().and_then(|i| i.parse::<Ipv4Addr>().ok()),
                    ) else {
                        continue;
                    };
                    if src["node"] == dst["node"] {
                        continue;
                    }
                    todo.push((
                        netns.to_owned(),
                        (ip, node_port).into(),
                        proto.clone(),
                        json!({"from": src["node"], "to": format!("nodeport:{}", dst["node"].as_str().unwrap_or("")),
                               "port": node_port, "protocol": proto, "service": name}),
                    ));
                }
            }
        }
    }
    // Every cell at once (a denied one waits out its timeout SERVICE_TRIES times).
    let mut out: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = todo
            .into_iter()
            .map(|(netns, addr, proto, mut cell)| {
                scope.spawn(move || {
                    let ns = NetNs::existing(&netns);
                    let mut seen = std::collections::BTreeSet::new();
                    for _ in 0..SERVICE_TRIES {
                        if let Ok(ip) = crate::probe::whoami(&ns, addr, &proto, timeout) {
                            seen.insert(ip);
                        }
                    }
                    cell["allowed"] = json!(!seen.is_empty());
                    cell["backends"] = json!(seen);
                    cell
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    sort_cells(&mut out);
    out
}

/// Orders connectivity cells (port, protocol, from, to), as [`probe`] returns them: a measured table and one
/// computed elsewhere compare equal cell by cell.
pub fn sort_cells(cells: &mut [Value]) {
    cells.sort_by_key(|c| {
        (
            c["port"].as_u64(),
            c["protocol"].to_string(),
            c["from"].to_string(),
            c["to"].to_string(),
        )
    });
}
