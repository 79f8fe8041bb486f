//! `caracal-operator`: reconciles the Installation named `default`.
//!
//! Installs Caracal's CRDs at start, serves `/metrics`, `/healthz` and `/readyz`, and reconciles while it holds
//! the leader Lease (so several replicas are safe). Logs go to stderr, as JSON with `--log-format json`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use caracal_operator::controller::{self, Context, Outcome};
use caracal_operator::http::{self, Health};
use caracal_operator::leader::{Elector, Timings};
use caracal_operator::metrics::Metrics;
use caracal_operator::webhook::{self, Endpoint};
use clap::Parser;
use tracing::info;

#[derive(Parser)]
#[command(name = "caracal-operator", version = concat!("v", env!("CARGO_PKG_VERSION")), about = "Reconciles the Caracal Installation")]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "CARACAL_OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:9094")]
    http_addr: SocketAddr,
    /// `text` or `json`.
    #[arg(long, env = "CARACAL_OPERATOR_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "caracal-operator")]
    lease_namespace: String,
    /// This replica's identity in the election.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Do not apply the CRDs at start (when something else manages them).
    #[arg(long)]
    skip_crds: bool,
    /// Address the admission webhook listens on (TLS).
    #[arg(long, env = "CARACAL_OPERATOR_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    webhook_addr: SocketAddr,
    /// Register the webhook at this https URL instead of the in-cluster Service (for an operator that runs
    /// outside the cluster, as in the lab).
    #[arg(long, env = "CARACAL_OPERATOR_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// Run without the admission webhook.
    #[arg(long)]
    no_webhook: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Delete the Installation and wait until the running operator has removed what it rendered (its
    /// finalizer gone): what the Helm chart's pre-delete hook runs, so that uninstalling never leaves an
    /// Installation whose finalizer nobody removes.
    Uninstall {
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Apply the Installation in FILE once the operator's CRD and admission webhook are there (what the Helm
    /// chart's post-install and post-upgrade hook runs: the Installation is patched in place).
    ApplyInstallation {
        /// A YAML file holding the Installation named default.
        #[arg(long)]
        file: std::path::PathBuf,
        /// How long to wait for the operator, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs(&args.log_format);
    let client = kube::Client::try_default()
        .await
        .context("connecting to the API server (in-cluster or KUBECONFIG)")?;
    match args.command {
        Some(Command::Uninstall { timeout }) => {
            return caracal_operator::install::uninstall(&client, std::time::Duration::from_secs(timeout))
                .await;
        }
        Some(Command::ApplyInstallation { file, timeout }) => {
            return caracal_operator::install::apply_installation(
                &client,
                &file,
                std::time::Duration::from_secs(timeout),
            )
            .await;
        }
        None => {}
    }
    let metrics = Arc::new(Metrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let health = Arc::new(Health {
        ready: Default::default(),
        registry,
    });
    let server = tokio::spawn(http::serve(args.http_addr, health.clone()));

    if !args.skip_crds {
        let names = caracal_operator::crds::ensure(&client)
            .await
            .context("installing CRDs")?;
        info!(count = names.len(), "CRDs in place");
    }
    let _webhook = if args.no_webhook {
        None
    } else {
        let endpoint = match args.webhook_url {
            Some(url) => Endpoint::Url(url),
            None => Endpoint::Service {
                namespace: args.lease_namespace.clone(),
                name: webhook::NAME.into(),
            },
        };
        Some(
            webhook::start(&client, &args.lease_namespace, args.webhook_addr, &endpoint)
                .await
                .context("starting the admission webhook")?,
        )
    };
    health.ready.store(true, Ordering::Relaxed);
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let elector = Elector::new(
        client.clone(),
        &args.lease_namespace,
        "caracal-operator",
        &identity,
        Timings::default(),
    );
    let ctx = Arc::new(Context::new(client, metrics));
    // Kubernetes stops a pod with SIGTERM; a person at a terminal with Ctrl-C (SIGINT).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("shutting down");
    };
    let outcome = controller::run_elected(ctx, elector, shutdown).await;
    server.abort();
    match outcome {
        Outcome::Shutdown => Ok(()),
        Outcome::LostLease => {
            anyhow::bail!("lost the leader lease; exiting so a fresh start rejoins the election")
        }
    }
}
