//! The real upstream control plane on loopback: etcd and kube-apiserver, and when asked
//! kube-controller-manager and kube-scheduler, built by `make controlplane` from e2e/controlplane.
//!
//! [`ControlPlane::start`] generates a PKI, starts the programs on free loopback ports, writes a kubeconfig
//! and waits until the API server is ready. Dropping the value stops everything and removes its state,
//! unless it was started detached (the lab's `controlplane up --detach`), in which case
//! [`stop_detached`] stops it later from its state directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::{Deserialize, Serialize};

use crate::pki::{self, Pki};
use crate::process::{Lifetime, ProcessError, Supervised, terminate_pid};

/// How long the API server gets to become ready on a loaded 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What to start.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Also start kube-controller-manager and kube-scheduler.
    pub controllers: bool,
    /// Keep state here instead of a fresh temporary directory (the directory is emptied first).
    pub state_dir: Option<PathBuf>,
    /// Leave the programs running when this value is dropped.
    pub detached: bool,
    /// Advertise [`ADVERTISED_ADDRESS`] and run the API server's endpoint reconciler, so the `kubernetes`
    /// Service has an endpoint: for a lab whose nodes carry that address to the API server (see
    /// [`ADVERTISED_ADDRESS`]). Off, the API server advertises 127.0.0.1, which an Endpoints object cannot
    /// hold, so the reconciler is off and the `kubernetes` Service has no endpoints.
    pub advertise: bool,
}

/// The address the API server advertises with [`Options::advertise`] (the `kubernetes` Service's endpoint and
/// a SAN of its certificate). It is no address of this machine: a lab node holds it on its loopback and
/// carries connections to it to the API server on the machine's 127.0.0.1, so a ClusterIP connection that
/// kube-proxy or Caracal translates to it reaches the API server from a node or a pod, as on a real cluster.
pub const ADVERTISED_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 99, 255, 1);

impl Options {
    /// etcd and the API server only.
    pub fn api_only() -> Self {
        Self::default()
    }
    /// The whole control plane: also the controller manager and the scheduler.
    pub fn with_controllers() -> Self {
        Self {
            controllers: true,
            ..Self::default()
        }
    }
    /// The whole control plane advertising [`ADVERTISED_ADDRESS`] (the lab's).
    pub fn lab() -> Self {
        Self {
            controllers: true,
            advertise: true,
            ..Self::default()
        }
    }
}

/// Errors starting or reaching the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// A program could not be started.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The PKI could not be generated.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// A file in the state directory could not be written or read.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A program exited or the API server did not become ready in time.
    #[error("control plane did not start: {0}")]
    NotReady(String),
    /// The kubeconfig could not be turned into a client.
    #[error("building a client from {path}: {message}")]
    Client {
        /// The kubeconfig.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

/// What a detached control plane leaves in its state directory so `down` can find it.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    pids: Vec<u32>,
    server: String,
}

const STATE_FILE: &str = "controlplane.json";

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    procs: Vec<Supervised>,
    kubeconfig: PathBuf,
    server: String,
    pki: Pki,
    detached: bool,
}

/// The workspace root (where `target/` lives): `CARACAL_ROOT`, or this crate's parent.
pub fn workspace_root() -> PathBuf {
    let root = std::env::var_os("CARACAL_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    // Canonical: paths under it are compared with the kernel's (mount points in /proc/self/mounts), which
    // never hold `..`.
    root.canonicalize().unwrap_or(root)
}

/// A binary of another workspace package (`caracal-cni`, `caracal-typha`, `caracalctl`), as `cargo build
/// --workspace --bins` leaves it in `target/debug` (`make test` builds them before the tests run; a test's
/// own package's binaries come from `CARGO_BIN_EXE_*` instead).
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("debug")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// Where `make controlplane` puts the upstream binaries: `CARACAL_CONTROLPLANE_BIN`, or
/// `target/controlplane/bin` under the workspace root.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CARACAL_CONTROLPLANE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/controlplane/bin"))
}

/// The program named by the environment variable `var` when it is set and not empty, `default` otherwise
/// (benchmarks measure another build, or a wrapper, this way).
pub fn binary_from_env(var: &str, default: PathBuf) -> PathBuf {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .map_or(default, PathBuf::from)
}

/// Where [`free_port`] looks: below the kernel's ephemeral range (32768-60999 by default), so neither an
/// outgoing connection nor another `bind(0)` is given the port between our check and the program's bind.
const TEST_PORTS: std::ops::Range<u16> = 20000..32000;

/// A free TCP port on 127.0.0.1 (free when asked; the program that gets it binds it moments later), from
/// [`TEST_PORTS`]: each process walks the range from its own offset (its pid), so concurrent tests and lab
/// processes rarely try the same port, and one process never hands out a port twice in a row.
pub fn free_port() -> Result<u16, ControlPlaneError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let offset = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = TEST_PORTS.start + u16::try_from(offset.wrapping_add(step) % span).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free loopback port"))?;
    Ok(l.local_addr().map_err(io("finding a free loopback port"))?.port())
}

fn kubeconfig_yaml(server: &str, pki: &Pki) -> Result<String, ControlPlaneError> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(io(format!("reading {}", p.display())));
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: caracal\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    \
         client-key-data: {}\ncontexts:\n- name: caracal\n  context:\n    cluster: caracal\n    user: admin\n\
         current-context: caracal\n",
        b64(read(&pki.ca_cert)?),
        b64(read(&pki.admin_cert)?),
        b64(read(&pki.admin_key)?),
    ))
}

impl ControlPlane {
    /// Starts a control plane and waits until the API server answers `/readyz`. A program that lost its
    /// port to another process between [`free_port`] and its bind is started again on new ports (twice).
    pub async fn start(opts: Options) -> Result<Self, ControlPlaneError> {
        let mut tries = 0;
        loop {
            match Self::start_once(opts.clone()).await {
                Err(ControlPlaneError::NotReady(why))
                    if why.contains("address already in use") && tries < 2 =>
                {
                    tries += 1;
                    tracing::warn!(%why, "a control plane port was taken meanwhile; starting again on new ports");
                }
                other => return other,
            }
        }
    }

    async fn start_once(opts: Options) -> Result<Self, ControlPlaneError> {
        let (dir, tmp) = match &opts.state_dir {
            Some(d) => {
                if d.exists() {
                    std::fs::remove_dir_all(d).map_err(io(format!("emptying {}", d.display())))?;
                }
                std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("caracal-cp-")
                    .tempdir()
                    .map_err(io("creating a temporary directory"))?;
                (t.path().to_owned(), Some(t))
            }
        };
        let pki = pki::generate(&dir)?;
        let lifetime = if opts.detached {
            Lifetime::Detached
        } else {
            Lifetime::Attached
        };
        let bin = bin_dir();
        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &pki)?).map_err(io("writing the kubeconfig"))?;

        let mut cp = ControlPlane {
            dir: dir.clone(),
            _tmp: tmp,
            procs: Vec::new(),
            kubeconfig: kubeconfig.clone(),
            server: server.clone(),
            pki: pki.clone(),
            detached: opts.detached,
        };
        let s = |p: &Path| p.display().to_string();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        cp.spawn(
            "etcd",
            &bin,
            lifetime,
            vec![
                "--name=caracal".into(),
                format!("--data-dir={}", s(&dir.join("etcd"))),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=caracal=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync".into(),
                "--quota-backend-bytes=4294967296".into(),
                "--log-level=warn".into(),
            ],
        )?;
        let (advertise, reconciler) = if opts.advertise {
            (ADVERTISED_ADDRESS.to_string(), "lease")
        } else {
            ("127.0.0.1".to_owned(), "none")
        };
        cp.spawn(
            "kube-apiserver",
            &bin,
            lifetime,
            vec![
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                format!("--advertise-address={advertise}"),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", s(&dir.join("apiserver-certs"))),
                format!("--tls-cert-file={}", s(&pki.server_cert)),
                format!("--tls-private-key-file={}", s(&pki.server_key)),
                format!("--client-ca-file={}", s(&pki.ca_cert)),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", s(&pki.sa_pub)),
                format!("--service-account-signing-key-file={}", s(&pki.sa_key)),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--allow-privileged=true".into(),
                format!("--endpoint-reconciler-type={reconciler}"),
                // A real node's kubelet registers its name and InternalIP; nothing resolves the name here.
                "--kubelet-preferred-address-types=InternalIP".into(),
                // As a kubelet client (logs, exec) the API server presents the admin certificate and verifies the
                // kubelet's serving certificate, which the same CA signs.
                format!("--kubelet-client-certificate={}", s(&pki.admin_cert)),
                format!("--kubelet-client-key={}", s(&pki.admin_key)),
                format!("--kubelet-certificate-authority={}", s(&pki.ca_cert)),
                // A webhook behind a Service (the operator's, when it runs as its Deployment on a real node)
                // is dialled at its endpoint: the API server on the machine has no ClusterIP routing.
                "--enable-aggregator-routing=true".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
        )?;
        if opts.controllers {
            cp.start_controllers(&bin, lifetime)?;
        }
        cp.wait_ready().await?;
        if opts.detached {
            let state = StateFile {
                pids: cp.procs.iter().filter_map(Supervised::pid).collect(),
                server,
            };
            let text = serde_json::to_string_pretty(&state).unwrap_or_default();
            std::fs::write(dir.join(STATE_FILE), text).map_err(io("writing the state file"))?;
        }
        Ok(cp)
    }

    fn spawn(
        &mut self,
        name: &str,
        bin: &Path,
        lifetime: Lifetime,
        args: Vec<String>,
    ) -> Result<(), ControlPlaneError> {
        let log = self.dir.join(format!("{name}.log"));
        self.procs
            .push(Supervised::spawn(name, &bin.join(name), &args, &log, lifetime)?);
        Ok(())
    }

    fn start_controllers(&mut self, bin: &Path, lifetime: Lifetime) -> Result<(), ControlPlaneError> {
        let kc = self.kubeconfig.display().to_string();
        let s = |p: &Path| p.display().to_string();
        let (kcm_port, sched_port) = (free_port()?, free_port()?);
        let pki = self.pki.clone();
        self.spawn(
            "kube-controller-manager",
            bin,
            lifetime,
            vec![
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={kcm_port}"),
                format!("--cert-dir={}", s(&self.dir.join("kcm-certs"))),
                format!("--root-ca-file={}", s(&pki.ca_cert)),
                format!("--service-account-private-key-file={}", s(&pki.sa_key)),
                format!("--cluster-signing-cert-file={}", s(&pki.ca_cert)),
                format!("--cluster-signing-key-file={}", s(&pki.ca_key)),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--use-service-account-credentials=false".into(),
                "--leader-elect=false".into(),
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller".into(),
                "--v=1".into(),
            ],
        )?;
        self.spawn(
            "kube-scheduler",
            bin,
            lifetime,
            vec![
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={sched_port}"),
                "--leader-elect=false".into(),
                "--v=1".into(),
            ],
        )
    }

    async fn wait_ready(&mut self) -> Result<(), ControlPlaneError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            for p in &mut self.procs {
                p.check_running().map_err(ControlPlaneError::NotReady)?;
            }
            match self.client().await {
                Ok(client) => {
                    let req = http::Request::get("/readyz").body(Vec::new());
                    match req {
                        Ok(req) => match client.request_text(req).await {
                            Ok(body) if body.trim() == "ok" => return Ok(()),
                            Ok(body) => last = body,
                            Err(e) => last = e.to_string(),
                        },
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                let tail = self
                    .procs
                    .iter()
                    .map(|p| format!("== {}\n{}", p.name(), p.log_tail(15)));
                return Err(ControlPlaneError::NotReady(format!(
                    "API server not ready after {READY_TIMEOUT:?}: {last}\n{}",
                    tail.collect::<Vec<_>>().join("\n")
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A client with cluster-admin rights.
    pub async fn client(&self) -> Result<Client, ControlPlaneError> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// A client that authenticates with a bearer `token` (a ServiceAccount's), trusting this control plane's
    /// CA: for testing what an identity's RBAC allows.
    pub async fn client_with_token(&self, token: &str) -> Result<Client, ControlPlaneError> {
        let ca = std::fs::read_to_string(&self.pki.ca_cert).map_err(io("reading the CA"))?;
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: caracal\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {}\nusers:\n- name: token\n  user:\n    token: {token}\ncontexts:\n\
             - name: caracal\n  context:\n    cluster: caracal\n    user: token\ncurrent-context: caracal\n",
            self.server,
            base64::engine::general_purpose::STANDARD.encode(ca),
        );
        let path = self.dir.join(format!("kubeconfig-token-{}", yaml.len()));
        std::fs::write(&path, yaml).map_err(io("writing a token kubeconfig"))?;
        client_from_kubeconfig(&path).await
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The API server's port (on 127.0.0.1, and behind the advertised address in a lab).
    pub fn port(&self) -> Option<u16> {
        self.server.rsplit(':').next()?.parse().ok()
    }

    /// The state directory (logs, PKI, etcd data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The generated PKI.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// A `kubectl` command pointed at this control plane.
    pub fn kubectl(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(bin_dir().join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// Stops every program (last started first) and, unless detached, removes the state directory.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.detached {
            for p in self.procs.drain(..) {
                p.release();
            }
            return;
        }
        while let Some(mut p) = self.procs.pop() {
            p.stop(Duration::from_secs(10));
        }
        if self._tmp.is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client, ControlPlaneError> {
    let err = |message: String| ControlPlaneError::Client {
        path: path.to_owned(),
        message,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// Stops a detached control plane recorded in `state_dir` and removes the directory.
/// Returns false when there was nothing to stop.
pub fn stop_detached(state_dir: &Path) -> Result<bool, ControlPlaneError> {
    let path = state_dir.join(STATE_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(false);
    };
    let state: StateFile = serde_json::from_str(&text)
        .map_err(|e| ControlPlaneError::NotReady(format!("{}: {e}", path.display())))?;
    for pid in state.pids.iter().rev() {
        terminate_pid(*pid, Duration::from_secs(10));
    }
    std::fs::remove_dir_all(state_dir).map_err(io(format!("removing {}", state_dir.display())))?;
    Ok(true)
}

/// Writes to `out` a kubeconfig whose credentials are a fresh token of ServiceAccount `ns/sa` (TokenRequest,
/// one day), with the server and CA of the admin kubeconfig at `admin`: a process run with it has exactly
/// that account's RBAC.
pub async fn service_account_kubeconfig(
    client: &Client,
    admin: &Path,
    ns: &str,
    sa: &str,
    server: Option<&str>,
    out: &Path,
) -> Result<(), String> {
    let req =
        serde_json::from_value(serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 86400}}))
            .map_err(|e| e.to_string())?;
    let token = kube::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &kube::api::PostParams::default(), &req)
        .await
        .map_err(|e| format!("a token for ServiceAccount {ns}/{sa}: {e}"))?
        .status
        .map(|s| s.token)
        .ok_or("TokenRequest without a token")?;
    let admin: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(admin).map_err(|e| format!("reading {}: {e}", admin.display()))?,
    )
    .map_err(|e| format!("{}: {e}", admin.display()))?;
    let cluster = &admin["clusters"][0]["cluster"];
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: caracal\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: caracal\n  context:\n    cluster: caracal\n    user: sa\ncurrent-context: caracal\n",
        server.unwrap_or_else(|| cluster["server"].as_str().unwrap_or_default()),
        cluster["certificate-authority-data"].as_str().unwrap_or_default()
    );
    std::fs::write(out, text).map_err(|e| format!("writing {}: {e}", out.display()))
}
