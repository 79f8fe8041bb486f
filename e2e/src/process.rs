//! Child processes of a test or the lab: logged to files, stopped on drop, and (unless detached) killed by
//! the kernel if the process that started them dies first, so a killed test run leaves nothing behind.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A started program and where its output goes.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// How it was started, for [`Supervised::respawn`].
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    lifetime: Lifetime,
}

/// Errors starting a program.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program file does not exist.
    #[error("{program} not found: run `make controlplane` (or set CARACAL_CONTROLPLANE_BIN)")]
    Missing {
        /// The program path.
        program: PathBuf,
    },
    /// The program could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The program path.
        program: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// How a child is tied to this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Dies with the thread that started it (tests, the foreground lab).
    Attached,
    /// Own session; outlives this process (`--detach`), stopped later by pid.
    Detached,
}

impl Supervised {
    /// Starts `program` with `args`, stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        lifetime: Lifetime,
    ) -> Result<Self, ProcessError> {
        Self::spawn_env(name, program, args, &[], log, lifetime)
    }

    /// [`Supervised::spawn`] with extra environment variables.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
        lifetime: Lifetime,
    ) -> Result<Self, ProcessError> {
        if !program.exists() {
            return Err(ProcessError::Missing {
                program: program.to_owned(),
            });
        }
        let spawn_err = |source| ProcessError::Spawn {
            program: program.to_owned(),
            source,
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        match lifetime {
            Lifetime::Attached => set_parent_death_signal(&mut cmd),
            Lifetime::Detached => {
                cmd.process_group(0);
            }
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
            program: program.to_owned(),
            args: args.to_vec(),
            env: env.to_vec(),
            lifetime,
        })
    }

    /// Whether it ran and exited by itself (not stopped): what a restart policy restarts.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_some()))
    }

    /// Starts it again as it was started (its log goes on in the same file).
    pub fn respawn(&mut self) -> Result<(), ProcessError> {
        self.stop(Duration::from_secs(5));
        let mut again = Self::spawn_env(
            &self.name,
            &self.program,
            &self.args,
            &self.env,
            &self.log,
            self.lifetime,
        )?;
        self.child = again.child.take();
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The program's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the program is still running; `Err` carries the last lines of its log when it exited.
    pub fn check_running(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{} was stopped", self.name));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                self.log_tail(30)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    /// The last `n` lines of the program's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops the program: SIGTERM, then SIGKILL after `grace`. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            terminate_pid(child.id(), grace);
            let _ = child.wait();
        }
    }

    /// Kills the program with SIGKILL at once (a crash, for tests) and reaps it.
    pub fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Forgets the child without stopping it (it was detached and is now owned by its pid file).
    pub fn release(mut self) {
        self.child = None;
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Sends SIGTERM to `pid`, waits up to `grace` for it to go away, then SIGKILLs it.
pub fn terminate_pid(pid: u32, grace: Duration) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let pid = Pid::from_raw(raw);
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        // A zombie still answers signal 0; reaping is the parent's job (std's Child::wait).
        if kill(pid, None).is_err() || is_zombie(raw) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

#[expect(
    unsafe_code,
    reason = "pre_exec is the only way to set PR_SET_PDEATHSIG in the child"
)]
fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and calls only prctl(2), which is async-signal-safe;
    // it allocates nothing and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
}
