//! Calling a CNI plugin exactly as a container runtime does: the command and identity in `CNI_*`
//! environment variables, the network configuration on stdin, the result or error as JSON on stdout.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// One invocation.
#[derive(Clone, Debug)]
pub struct Invocation<'a> {
    /// `ADD`, `DEL`, `CHECK`, `STATUS`, `GC` or `VERSION`.
    pub command: &'a str,
    /// `CNI_CONTAINERID`.
    pub container_id: &'a str,
    /// `CNI_NETNS` (a path; empty when gone).
    pub netns: &'a str,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// The pod, sent in `CNI_ARGS` as `K8S_POD_NAMESPACE` / `K8S_POD_NAME`.
    pub pod: Option<(&'a str, &'a str)>,
}

/// The plugin's exit code and its JSON output (Null when it printed nothing).
pub fn invoke(
    plugin: &Path,
    exec_prefix: &[String],
    inv: &Invocation<'_>,
    conf: &Value,
) -> std::io::Result<(i32, Value)> {
    let mut argv: Vec<String> = exec_prefix.to_vec();
    argv.push(plugin.display().to_string());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("CNI_COMMAND", inv.command)
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", inv.netns)
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((ns, pod)) = inv.pod {
        cmd.env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}"),
        );
    }
    let mut child = cmd.spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin may answer without reading stdin (VERSION); a broken pipe is not an error then.
        let _ = stdin.write_all(conf.to_string().as_bytes());
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text.into_owned()))
    };
    Ok((out.status.code().unwrap_or(-1), v))
}

/// The one plugin configuration a conflist hands Caracal's plugin (name and version from the list).
pub fn caracal_conf(socket: &Path) -> Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "caracal",
        "mtu": 0,
        "agent_socket": socket.display().to_string(),
        "ipam": {"type": "caracal"}
    })
}
