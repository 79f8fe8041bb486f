//! `caracalctl`: see and reason about Caracal.
//!
//! - `caracalctl policy matrix -f PATH... --port 80/TCP [--port 53/UDP] [--output json|table]`: for every
//!   ordered pair of distinct pods and every port, whether a new connection is allowed.
//! - `caracalctl policy explain --from NS/POD --to NS/POD --port 80/TCP -f PATH...`: the decision path.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use caracal_policy::eval::evaluate;
use caracal_policy::load::load_paths;
use caracal_policy::matrix::{self, ProbePort};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "caracalctl", about = "See and reason about Caracal")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Evaluate policy offline, from manifests.
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
    /// Caracal IPAM, read from the cluster (KUBECONFIG or in-cluster).
    Ipam {
        #[command(subcommand)]
        command: IpamCmd,
    },
}

#[derive(Subcommand)]
enum IpamCmd {
    /// Pools, blocks and how full they are.
    Show,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Json,
    Table,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Allowed / denied for every ordered pair of pods and every port.
    Matrix {
        /// YAML files or directories (Namespaces, Pods, ServiceAccounts, policies, tiers, network sets,
        /// EndpointSlices).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Ports to probe, as PORT/PROTOCOL.
        #[arg(long = "port", required = true)]
        ports: Vec<ProbePort>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The path of the decision for one connection.
    Explain {
        /// Client pod, NS/POD.
        #[arg(long)]
        from: String,
        /// Server pod, NS/POD.
        #[arg(long)]
        to: String,
        /// PORT/PROTOCOL.
        #[arg(long)]
        port: ProbePort,
        /// YAML files or directories.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
}

fn ipam_show() -> anyhow::Result<()> {
    use caracal_crds::ipam::IPAMBlock;
    use caracal_crds::ippool::IPPool;
    use kube::api::{Api, ListParams};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the API server (KUBECONFIG or in-cluster)")?;
        let pools = Api::<IPPool>::all(client.clone())
            .list(&ListParams::default())
            .await
            .context("listing IPPools")?;
        let blocks = Api::<IPAMBlock>::all(client)
            .list(&ListParams::default())
            .await
            .context("listing IPAMBlocks")?;
        print!(
            "{}",
            caracal_node::ipam::report::report(&pools.items, &blocks.items)
        );
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Top::Ipam {
            command: IpamCmd::Show,
        } => ipam_show()?,
        Top::Policy {
            command: PolicyCmd::Matrix { files, ports, output },
        } => {
            let loaded = load_paths(&files)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            let cells = matrix::matrix(&loaded.world, &ports);
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "results": cells }))?
                ),
                Output::Table => print!("{}", matrix::table(&loaded.world, &cells, &ports)),
            }
        }
        Top::Policy {
            command:
                PolicyCmd::Explain {
                    from,
                    to,
                    port,
                    files,
                },
        } => {
            let loaded = load_paths(&files)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            let find = |key: &str| {
                loaded
                    .world
                    .endpoints
                    .iter()
                    .find(|e| e.key() == key)
                    .with_context(|| format!("no pod {key} (with status.podIP) in the manifests"))
            };
            let (a, b) = (find(&from)?, find(&to)?);
            let Some(pkt) = matrix::packet(a, b, port) else {
                bail!("{from} and {to} share no address family")
            };
            print!("{}", matrix::explain(&evaluate(&loaded.world, &pkt)));
        }
    }
    Ok(())
}
