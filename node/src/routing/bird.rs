//! Running BIRD for the node: its configuration file, control socket and process. What the configuration
//! says is [`super::bgp`]'s (pure); this only starts BIRD, reconfigures it when the text changes, restarts it
//! when it died, and asks it what its sessions are doing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

/// Errors running BIRD.
#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    /// Files or the process.
    #[error("BIRD ({what}): {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// `birdc configure` refused the configuration.
    #[error("BIRD refused its configuration: {0}")]
    Refused(String),
}

/// The node's BIRD: configuration file, control socket, process.
pub struct Bird {
    dir: PathBuf,
    exec_prefix: Vec<String>,
    child: Option<tokio::process::Child>,
    last: Option<String>,
}

impl Bird {
    /// BIRD for a node whose files live in `dir`, run behind `exec_prefix` (a namespace in tests).
    pub fn new(dir: &Path, exec_prefix: Vec<String>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            exec_prefix,
            child: None,
            last: None,
        }
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("bird.conf")
    }

    fn io(what: &str) -> impl FnOnce(std::io::Error) -> BirdError + '_ {
        move |source| BirdError::Io {
            what: what.to_owned(),
            source,
        }
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let mut argv: Vec<String> = self.exec_prefix.clone();
        argv.push(program.to_owned());
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    }

    /// Makes BIRD run `config`: starts it (stopping a stale one from an earlier agent), or reconfigures it
    /// when the text changed; restarts it if it died.
    pub async fn ensure(&mut self, config: &str) -> Result<(), BirdError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io("creating its directory"))?;
        let running = match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        };
        if running && self.last.as_deref() == Some(config) {
            return Ok(());
        }
        // Owner-only: the configuration holds the BGP sessions' MD5 passwords.
        {
            use std::io::Write as _;
            use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
            let mut f = std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(self.conf())
                .map_err(Self::io("writing bird.conf"))?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .and_then(|()| f.write_all(config.as_bytes()))
                .map_err(Self::io("writing bird.conf"))?;
        }
        if running {
            let out = self
                .command("birdc")
                .arg("-s")
                .arg(self.socket())
                .arg("configure")
                .output()
                .await
                .map_err(Self::io("running birdc configure"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if !text.contains("Reconfigured") && !text.contains("Reconfiguration in progress") {
                return Err(BirdError::Refused(text));
            }
            info!("BIRD reconfigured");
        } else {
            self.stop_stale();
            let log = std::fs::File::options()
                .create(true)
                .append(true)
                .open(self.dir.join("bird.log"))
                .map_err(Self::io("opening bird.log"))?;
            let err = log.try_clone().map_err(Self::io("opening bird.log"))?;
            let child = self
                .command("bird")
                .arg("-f")
                .arg("-c")
                .arg(self.conf())
                .arg("-s")
                .arg(self.socket())
                .arg("-P")
                .arg(self.dir.join("bird.pid"))
                .stdin(std::process::Stdio::null())
                .stdout(log)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .map_err(Self::io(
                    "starting bird (Debian package bird2; `make deps` installs it)",
                ))?;
            info!(pid = ?child.id(), "BIRD started");
            self.child = Some(child);
        }
        self.last = Some(config.to_owned());
        Ok(())
    }

    /// Stops a BIRD an earlier agent left running (its pid file names it).
    fn stop_stale(&self) {
        let Ok(pid) = std::fs::read_to_string(self.dir.join("bird.pid")) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            return;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "bird" {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            for _ in 0..50 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            warn!(pid, "stopped a BIRD left by an earlier agent");
        }
    }

    /// `birdc show protocols` (for status and tests).
    pub async fn protocols(&self) -> Result<String, BirdError> {
        let out = self
            .command("birdc")
            .arg("-s")
            .arg(self.socket())
            .arg("show")
            .arg("protocols")
            .output()
            .await
            .map_err(Self::io("running birdc"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
