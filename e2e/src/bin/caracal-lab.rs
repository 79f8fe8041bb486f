//! `caracal-lab`: runs Caracal on this machine.
//!
//! - `caracal-lab up [--nodes N] [--installation FILE]`: the whole lab in the foreground (see
//!   `caracal_e2e::lab`): control plane, operator, nodes with lab kubelets, the Installation, the demo
//!   (`e2e/lab/demo.yaml`), and the connectivity table measured with real connections; Ctrl-C tears it all
//!   down.
//! - `caracal-lab up --detach`: the same in a background process (log in `target/lab/lab.log`, pid in
//!   `target/lab/lab.pid`), returning once the table is printed; `caracal-lab down` stops it and waits until
//!   it has removed everything; `caracal-lab status` shows the Installation's conditions, nodes and pods.
//! - `caracal-lab probe [--port 80/TCP ...] [--output json|table]`: measures the table again for the pods of a
//!   running lab (every declared port, or only those given).
//! - `caracal-lab apply -f PATH`: `kubectl apply` against the lab.
//! - `caracal-lab controlplane up [--controllers] [--detach]`: starts etcd and kube-apiserver (and the
//!   controller manager and scheduler with `--controllers`) on loopback, writes `target/lab/kubeconfig`,
//!   and runs until Ctrl-C (or returns at once with `--detach`).
//! - `caracal-lab controlplane down`: stops a detached control plane and removes its state.

use std::path::PathBuf;

use anyhow::Context as _;
use caracal_e2e::controlplane::{self, ControlPlane, Options};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "caracal-lab", about = "Run Caracal end to end on this machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole lab in the foreground until Ctrl-C.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// The Installation to apply.
        #[arg(long, default_value = "examples/installation-vxlan.yaml")]
        installation: PathBuf,
        /// Run in the background (log in target/lab/lab.log) and return once the table is printed.
        #[arg(long)]
        detach: bool,
        /// The kube-proxy each node runs: `iptables`, `nftables` or `none` (default: iptables, none when the
        /// Installation's linuxDataplane is BPF, where Caracal handles Services).
        #[arg(long)]
        kube_proxy: Option<String>,
        /// What runs the pods: `lab` (the lab kubelet: processes, no containers) or `containerd` (the real
        /// kubelet, containerd and runc, Caracal from its images; needs `make runtime images`).
        #[arg(long, default_value = "lab")]
        runtime: String,
        /// How the operator is installed on real nodes: `manifest` (manifests/operator), `olm` (the real OLM
        /// with a catalog of this version's bundle; needs `make olm`) or `helm` (the chart; needs `make helm`).
        #[arg(long, default_value = "manifest")]
        operator_install: String,
    },
    /// Stop a detached lab (everything it started goes with it).
    Down,
    /// The state of a running lab: Installation conditions, components, nodes, pods.
    Status,
    /// Measure connectivity between the running lab's pods.
    Probe {
        /// Only these ports (`80/TCP`, `53/UDP`; repeatable); every port a pod declares when none is given.
        #[arg(long = "port")]
        ports: Vec<String>,
        /// `table` or `json` (the shape of `caracalctl policy matrix`).
        #[arg(long, default_value = "table")]
        output: String,
    },
    /// `kubectl apply -f PATH` against the running lab.
    Apply {
        /// File or directory.
        #[arg(short = 'f')]
        file: PathBuf,
    },
    /// The upstream Kubernetes control plane on loopback.
    Controlplane {
        #[command(subcommand)]
        action: CpAction,
    },
}

#[derive(Subcommand)]
enum CpAction {
    /// Start it and print the kubeconfig path.
    Up {
        /// Also run kube-controller-manager and kube-scheduler.
        #[arg(long)]
        controllers: bool,
        /// Leave it running in the background and return.
        #[arg(long)]
        detach: bool,
    },
    /// Stop a detached control plane.
    Down,
}

fn lab_dir() -> PathBuf {
    controlplane::workspace_root().join("target/lab")
}

/// `up --detach`: the same lab in a background process of its own session; returns once it printed its
/// table (or failed), showing its progress meanwhile.
fn detach_up(
    nodes: usize,
    installation: &std::path::Path,
    kube_proxy: Option<&str>,
    runtime: &str,
    operator_install: &str,
) -> anyhow::Result<()> {
    use std::io::{BufRead as _, Seek as _};
    use std::os::unix::process::CommandExt as _;
    let pid_file = lab_dir().join("lab.pid");
    if let Ok(pid) = std::fs::read_to_string(&pid_file)
        && std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
    {
        anyhow::bail!(
            "a lab is already running (pid {}): `caracal-lab down` first",
            pid.trim()
        );
    }
    std::fs::create_dir_all(lab_dir())?;
    let log_path = lab_dir().join("lab.log");
    let log = std::fs::File::create(&log_path)?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["up", "--nodes", &nodes.to_string(), "--installation"])
        .arg(installation)
        .args(kube_proxy.map(|k| format!("--kube-proxy={k}")))
        .arg(format!("--runtime={runtime}"))
        .arg(format!("--operator-install={operator_install}"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the lab in the background")?;
    std::fs::write(&pid_file, child.id().to_string())?;
    let mut reader = std::io::BufReader::new(std::fs::File::open(&log_path)?);
    let mut pos = 0;
    loop {
        reader.seek(std::io::SeekFrom::Start(pos))?;
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            pos += line.len() as u64;
            print!("{line}");
            if line.contains("first connectivity table") {
                println!(
                    "the lab runs in the background (pid {}); `caracal-lab down` stops it",
                    child.id()
                );
                return Ok(());
            }
            line.clear();
        }
        if !std::path::Path::new(&format!("/proc/{}", child.id())).exists() {
            let _ = std::fs::remove_file(&pid_file);
            anyhow::bail!("the lab stopped; its log is {}", log_path.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// `down`: SIGTERM to the detached lab, and wait for it to have cleaned up.
fn down() -> anyhow::Result<()> {
    let pid_file = lab_dir().join("lab.pid");
    let Ok(text) = std::fs::read_to_string(&pid_file) else {
        println!("no detached lab is running");
        return Ok(());
    };
    let pid: i32 = text.trim().parse().context("target/lab/lab.pid")?;
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    let start = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        // A zombie (not reaped yet) is gone for our purpose.
        if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")) {
            break;
        }
        if start.elapsed() > std::time::Duration::from_secs(120) {
            anyhow::bail!("the lab (pid {pid}) did not stop within 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(&pid_file);
    println!("stopped");
    Ok(())
}

/// `status`: what the API server says about the running lab.
async fn status(kubeconfig: &std::path::Path) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{Node, Pod};
    use kube::ResourceExt as _;
    let client = controlplane::client_from_kubeconfig(kubeconfig)
        .await
        .context("no running lab (target/lab/kubeconfig)")?;
    let inst: kube::api::Api<caracal_crds::installation::Installation> = kube::api::Api::all(client.clone());
    match inst.get_opt("default").await? {
        Some(i) => {
            for c in i.status.iter().flat_map(|s| s.conditions.iter()) {
                println!("Installation {:<12} {:<6} {}", c.type_, c.status, c.message);
            }
        }
        None => println!("no Installation"),
    }
    println!();
    for n in kube::api::Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await?
    {
        let ready = n
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .any(|c| c.type_ == "Ready" && c.status == "True");
        println!(
            "node {:<14} {}",
            n.name_any(),
            if ready { "Ready" } else { "NotReady" }
        );
    }
    println!();
    println!("{:<44} {:<14} {:<16} READY", "POD", "NODE", "IP");
    for p in kube::api::Api::<Pod>::all(client)
        .list(&Default::default())
        .await?
    {
        let st = p.status.clone().unwrap_or_default();
        let ready = st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        println!(
            "{:<44} {:<14} {:<16} {}",
            format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()),
            p.spec.and_then(|s| s.node_name).unwrap_or_default(),
            st.pod_ip.unwrap_or_default(),
            ready
        );
    }
    Ok(())
}

fn print_table(cells: &[serde_json::Value]) {
    println!("{:<20} {:<26} {:<10} RESULT", "FROM", "TO", "PORT");
    for c in cells {
        let backends = c["backends"]
            .as_array()
            .map(|b| {
                let list: Vec<&str> = b.iter().filter_map(|x| x.as_str()).collect();
                format!("  backends: {}", list.join(" "))
            })
            .unwrap_or_default();
        println!(
            "{:<20} {:<26} {:<10} {}{backends}",
            c["from"].as_str().unwrap_or(""),
            c["to"].as_str().unwrap_or(""),
            format!("{}/{}", c["port"], c["protocol"].as_str().unwrap_or("")),
            if c["allowed"] == true { "allowed" } else { "denied" }
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let state_dir = lab_dir().join("controlplane");
    let kubeconfig = lab_dir().join("kubeconfig");
    match cli.command {
        Command::Up {
            nodes,
            installation,
            detach: true,
            kube_proxy,
            runtime,
            operator_install,
        } => {
            return detach_up(
                nodes,
                &installation,
                kube_proxy.as_deref(),
                &runtime,
                &operator_install,
            );
        }
        Command::Down => return down(),
        Command::Status => return status(&kubeconfig).await,
        Command::Up {
            nodes,
            installation,
            detach: false,
            kube_proxy,
            runtime,
            operator_install,
        } => {
            let installation = if installation.is_absolute() {
                installation
            } else {
                controlplane::workspace_root().join(installation)
            };
            let started = std::time::Instant::now();
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            // Ctrl-C (or SIGTERM from `caracal-lab down`) at any point drops what was built so far: every guard (namespaces, processes, the
            // control plane) cleans up on drop.
            let run = async {
                let mut opts = caracal_e2e::lab::LabOptions::new(nodes, installation);
                opts.runtime = runtime.parse().map_err(anyhow::Error::msg)?;
                opts.operator = caracal_e2e::lab::OperatorInstall::from_flag(&operator_install)?;
                match kube_proxy.as_deref() {
                    None => {}
                    Some("none") => opts.kube_proxy = None,
                    Some(mode) => opts.kube_proxy = Some(mode.parse().map_err(anyhow::Error::msg)?),
                }
                let lab = caracal_e2e::lab::Lab::up(&opts).await?;
                println!("==> demo: e2e/lab/demo.yaml");
                lab.apply(&controlplane::workspace_root().join("e2e/lab/demo.yaml"))?;
                lab.wait_pods(&["frontend", "backend", "data"]).await?;
                let pods = lab.record_pods().await?;
                let demo = ["frontend", "backend", "data"];
                lab.wait_services(&demo).await?;
                let services = lab.record_services(&demo).await?;
                // Policy takes a moment after the pods start (they are fail-closed until then).
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                let mut table = caracal_e2e::lab::probe(&pods, std::time::Duration::from_millis(800));
                table.extend(caracal_e2e::lab::probe_services(
                    &pods,
                    &services,
                    std::time::Duration::from_millis(800),
                ));
                println!("==> components");
                status(&kubeconfig).await?;
                println!("==> connectivity (real connections between the pods)");
                print_table(&table);
                println!(
                    "first connectivity table {:.1} s after start; kubeconfig: {}; Ctrl-C stops the lab",
                    started.elapsed().as_secs_f64(),
                    kubeconfig.display()
                );
                std::future::pending::<()>().await;
                anyhow::Ok(lab)
            };
            let result = tokio::select! {
                r = run => r.map(caracal_e2e::lab::Lab::down),
                _ = tokio::signal::ctrl_c() => {
                    println!("stopping ...");
                    Ok(())
                }
                _ = term.recv() => {
                    println!("stopping (SIGTERM) ...");
                    Ok(())
                }
            };
            // The lab's state goes with it (pods' secrets and tokens included); the logs stay.
            for stale in ["nodes", "pods"] {
                let _ = std::fs::remove_dir_all(lab_dir().join(stale));
            }
            for stale in [
                "pods.json",
                "services.json",
                "kubeconfig",
                "operator.kubeconfig",
                "operator-manifest.yaml",
            ] {
                let _ = std::fs::remove_file(lab_dir().join(stale));
            }
            result?;
        }
        Command::Probe { ports, output } => {
            // The pods that exist now (not those of `up`): read from the API server.
            let client = controlplane::client_from_kubeconfig(&kubeconfig)
                .await
                .context("no running lab (target/lab/kubeconfig)")?;
            let pods = caracal_e2e::lab::list_pods(&client).await?;
            let wanted: Vec<(u64, String)> = ports
                .iter()
                .map(|p| {
                    let (n, proto) = p.split_once('/').unwrap_or((p, "TCP"));
                    n.parse::<u64>()
                        .map(|n| (n, proto.to_ascii_uppercase()))
                        .map_err(|_| anyhow::anyhow!("--port {p:?}: write it as 80/TCP or 53/UDP"))
                })
                .collect::<anyhow::Result<_>>()?;
            let mut table = caracal_e2e::lab::probe(&pods, std::time::Duration::from_millis(800));
            if let Ok(text) = std::fs::read(lab_dir().join("services.json")) {
                let services: serde_json::Value = serde_json::from_slice(&text)?;
                table.extend(caracal_e2e::lab::probe_services(
                    &pods,
                    &services,
                    std::time::Duration::from_millis(800),
                ));
            }
            if !wanted.is_empty() {
                table.retain(|c| {
                    wanted.iter().any(|(n, proto)| {
                        c["port"].as_u64() == Some(*n) && c["protocol"].as_str() == Some(proto)
                    })
                });
            }
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&table)?);
            } else {
                print_table(&table);
            }
        }
        Command::Apply { file } => {
            let out = std::process::Command::new(controlplane::bin_dir().join("kubectl"))
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["apply", "-f"])
                .arg(&file)
                .status()?;
            if !out.success() {
                anyhow::bail!("kubectl apply failed");
            }
        }
        Command::Controlplane {
            action: CpAction::Up { controllers, detach },
        } => {
            if state_dir.join("controlplane.json").exists() {
                anyhow::bail!(
                    "a detached control plane is already running (state in {}): run `caracal-lab controlplane down` first",
                    state_dir.display()
                );
            }
            eprintln!(
                "starting etcd and kube-apiserver{} ...",
                if controllers {
                    ", controller manager and scheduler"
                } else {
                    ""
                }
            );
            let cp = ControlPlane::start(Options {
                controllers,
                state_dir: Some(state_dir.clone()),
                detached: detach,
                advertise: false,
            })
            .await
            .context("starting the control plane")?;
            std::fs::copy(cp.kubeconfig(), &kubeconfig).context("writing target/lab/kubeconfig")?;
            println!("API server: {}", cp.server());
            println!("kubeconfig: {}", kubeconfig.display());
            println!(
                "try: {} --kubeconfig {} get --raw /readyz",
                controlplane::bin_dir().join("kubectl").display(),
                kubeconfig.display()
            );
            if detach {
                println!("running in the background; stop it with `caracal-lab controlplane down`");
                return Ok(());
            }
            println!("running; Ctrl-C stops it");
            tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
            eprintln!("stopping ...");
            cp.stop();
            let _ = std::fs::remove_file(&kubeconfig);
        }
        Command::Controlplane {
            action: CpAction::Down,
        } => {
            if controlplane::stop_detached(&state_dir)? {
                let _ = std::fs::remove_file(&kubeconfig);
                println!("stopped");
            } else {
                println!("no detached control plane is running");
            }
        }
    }
    Ok(())
}
