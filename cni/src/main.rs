//! `caracal-cni`: the CNI plugin (spec 1.1.0), and `caracal-cni install`, which the caracal-node DaemonSet's
//! init container runs to put the plugin and the network configuration on the host.
//!
//! As a plugin it answers VERSION, validates the environment and the configuration with the spec's error
//! codes, and forwards ADD / DEL / CHECK / STATUS / GC to the node agent over its unix socket (one JSON
//! line each way; `cni::server` does the work). When the agent cannot be reached the answer is code 11
//! ("try again later"), which container runtimes retry.

use std::io::Read as _;
use std::path::Path;

use caracal_cni::{self as spec, CniError, Code, Command};

/// Copies `from` to `to` through a temporary file and a rename, so a reader never sees half a file.
fn install_file(from: &Path, to: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = to.with_extension("caracal-tmp");
    std::fs::copy(from, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, to)
}

/// `caracal-cni install`: the plugin into `CNI_BIN_DIR` as `caracal`, the conflist into `CNI_NET_DIR`.
fn install() -> Result<(), String> {
    let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} must be set (the DaemonSet sets it)"));
    let (bin_dir, net_dir, source, name) = (
        var("CNI_BIN_DIR")?,
        var("CNI_NET_DIR")?,
        var("CNI_CONF_SOURCE")?,
        var("CNI_CONF_NAME")?,
    );
    let conf = std::fs::read(&source).map_err(|e| format!("reading CNI_CONF_SOURCE {source}: {e}"))?;
    let parsed: serde_json::Value =
        serde_json::from_slice(&conf).map_err(|e| format!("CNI_CONF_SOURCE {source} is not JSON: {e}"))?;
    if parsed["plugins"].as_array().is_none_or(|p| p.is_empty()) {
        return Err(format!(
            "CNI_CONF_SOURCE {source} is not a conflist: it needs a non-empty \"plugins\" list"
        ));
    }
    let me = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    std::fs::create_dir_all(&bin_dir).map_err(|e| format!("creating {bin_dir}: {e}"))?;
    std::fs::create_dir_all(&net_dir).map_err(|e| format!("creating {net_dir}: {e}"))?;
    install_file(&me, &Path::new(&bin_dir).join("caracal"), 0o755)
        .map_err(|e| format!("installing the plugin into {bin_dir}: {e}"))?;
    install_file(Path::new(&source), &Path::new(&net_dir).join(&name), 0o644)
        .map_err(|e| format!("installing {name} into {net_dir}: {e}"))?;
    eprintln!("installed {bin_dir}/caracal and {net_dir}/{name}");
    Ok(())
}

fn plugin() -> Result<serde_json::Value, (CniError, String)> {
    let latest = spec::LATEST.to_owned();
    let inv = spec::invocation(|k| std::env::var(k).ok()).map_err(|e| (e, latest.clone()))?;
    if inv.command == Command::Version {
        return Ok(spec::version_json());
    }
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
        (
            CniError::new(Code::IoFailure, "reading stdin", e.to_string()),
            latest.clone(),
        )
    })?;
    let conf = spec::net_conf(&stdin).map_err(|e| (e, latest.clone()))?;
    let version = conf.cni_version.clone();
    // Every other command is the node agent's.
    let stream = std::os::unix::net::UnixStream::connect(&conf.agent_socket).map_err(|e| {
        (
            CniError::new(
                Code::TryAgainLater,
                "node agent not ready",
                format!(
                    "cannot reach caracal-node at {} ({e}): the agent may be starting; the runtime will retry",
                    conf.agent_socket
                ),
            ),
            version.clone(),
        )
    })?;
    let raw: serde_json::Value = serde_json::from_slice(&stdin).unwrap_or_default();
    // The namespace is opened here, where the runtime's path exists, and the open file goes to the agent.
    let netns = if matches!(inv.command, spec::Command::Add | spec::Command::Check) {
        Some(std::fs::File::open(&inv.netns).map_err(|e| {
            (
                CniError::new(
                    Code::InvalidEnvironment,
                    "CNI_NETNS cannot be opened",
                    format!("CNI_NETNS {}: {e}", inv.netns),
                ),
                version.clone(),
            )
        })?)
    } else {
        None
    };
    let answer = ask(stream, &spec::AgentRequest::new(&inv, raw), netns.as_ref()).map_err(|e| {
        (
            CniError::new(
                Code::TryAgainLater,
                "node agent did not answer",
                format!(
                    "talking to caracal-node at {}: {e}; the runtime will retry",
                    conf.agent_socket
                ),
            ),
            version.clone(),
        )
    })?;
    match answer {
        spec::AgentResponse::Ok(v) => Ok(v),
        spec::AgentResponse::Error { code, msg, details } => Err((
            CniError {
                code: spec::Code::from_u32(code),
                msg,
                details,
            },
            version,
        )),
    }
}

/// One request line out (with `netns` beside its first byte, `SCM_RIGHTS`), one answer line back.
fn ask(
    mut stream: std::os::unix::net::UnixStream,
    req: &spec::AgentRequest,
    netns: Option<&std::fs::File>,
) -> std::io::Result<spec::AgentResponse> {
    use std::io::{BufRead as _, Write as _};
    use std::os::fd::AsRawFd as _;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    let mut sent = 0;
    if let Some(ns) = netns {
        let fds = [ns.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        sent = nix::sys::socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[std::io::IoSlice::new(&line)],
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from)?;
    }
    stream.write_all(&line[sent..])?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("caracal-cni v{}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("install") {
        if let Err(e) = install() {
            eprintln!("caracal-cni install: {e}");
            std::process::exit(1);
        }
        return;
    }
    match plugin() {
        Ok(serde_json::Value::Null) => {}
        Ok(v) => println!("{v}"),
        Err((e, version)) => {
            println!("{}", e.to_json(&version));
            std::process::exit(1);
        }
    }
}
