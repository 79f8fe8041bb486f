//! `caracal-lab`: runs Caracal on this machine. This release has the control plane verbs:
//!
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let state_dir = lab_dir().join("controlplane");
    let kubeconfig = lab_dir().join("kubeconfig");
    match cli.command {
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
