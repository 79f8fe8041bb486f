//! The pod sandbox's process: holds the pod's namespaces until SIGINT or SIGTERM, reaping zombies.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, waitpid};

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("caracal-pause v{}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        set.add(s);
    }
    if let Err(e) = set.thread_block() {
        eprintln!("caracal-pause: blocking signals: {e}");
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if s == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => return,
            Err(e) => {
                eprintln!("caracal-pause: waiting for signals: {e}");
                std::process::exit(1);
            }
        }
    }
}
