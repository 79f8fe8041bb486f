//! The policy engine: one thread that owns the calculation graph and the policy data plane.
//!
//! Datastore updates of the kinds policy reads arrive here raw; each object is decoded and converted once
//! (`caracal_policy::decode`) and fed to the graph, which records what changed in the model. A change that
//! finds the engine idle is programmed at once (with whatever else is already queued); changes arriving
//! within `debounce` of the last program are gathered until `debounce` after it, so a burst costs one program
//! per `debounce` and not one per change. The backend applies exactly what changed; work that can wait (the
//! iptables backend's read-back of what it wrote) runs once nothing is pending for [`IDLE`]. Every
//! `refresh` (and at the first program, to adopt what a previous agent left) it converges in full with a
//! read-back, which repairs drift.
//!
//! An object that fails to decode or convert never stops the others: it keeps its last good version in the
//! graph; one that never had a good version is enforced as its fail-closed form when it is a policy
//! (`caracal_policy::decode::fail_closed_input`) and contributes nothing otherwise. Each failure is counted by
//! kind, logged, and reported to the caller (which records a Warning Event on the object).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use caracal_datastore::Update;
use caracal_policy::calc::graph::Changes;
use tracing::{debug, info, warn};

pub use super::pipeline::{Failure, Pipeline};
use super::{Config, Status};
use crate::dataplane::{self, DataplaneError, PolicyDataplane};

/// How long the engine waits, with nothing pending, after a program before the backend's deferred work.
pub const IDLE: Duration = Duration::from_millis(200);

/// What the engine is sent.
#[derive(Debug)]
pub enum Msg {
    /// A datastore update of a policy kind.
    Update(Update),
    /// The addresses IPAM holds for local pods (`namespace/pod` -> addresses): a pod's addresses before the
    /// kubelet reports them in its status, so policy is in place from its first packet.
    Held(BTreeMap<String, Vec<IpAddr>>),
    /// The CNI server wired this host-side interface: the endpoint on it is programmed again (the BPF
    /// data plane attaches to the interface, which did not exist when the pod's address first arrived).
    Wired(String),
    /// Converge in full now (the periodic refresh).
    Refresh,
    /// FelixConfiguration's settings for the policy data plane's model.
    Felix {
        /// `natOutgoingAddress`.
        nat_outgoing_address: Option<IpAddr>,
        /// `defaultEndpointToHostAction`.
        endpoint_to_host: caracal_policy::model::EndpointToHost,
    },
}

/// The engine's state: the update path and the backend. [`run`] drives it from a channel on a thread of
/// its own; tests drive it directly, so they exercise exactly what the agent runs.
pub struct Engine {
    cfg: Config,
    pipeline: Pipeline,
    backend: Box<dyn PolicyDataplane>,
    status: Arc<Status>,
    failures: Option<tokio::sync::mpsc::UnboundedSender<Failure>>,
    /// Changes taken from the graph and not yet applied.
    pending: Changes,
    /// The first change not yet programmed arrived then.
    dirty_since: Option<Instant>,
    programmed_once: bool,
    /// After a failed program: try again no sooner than this.
    retry_at: Option<Instant>,
    /// When the last program ended.
    last_program: Option<Instant>,
    /// The backend has deferred work (see [`PolicyDataplane::idle`]).
    idle_work: bool,
    /// A full converge ran since the deferred work last did: give the memory both freed back after it.
    trim_after_idle: bool,
}

/// Runs the engine until `rx` closes. `failures` receives every object that failed to convert.
pub fn run(
    cfg: Config,
    backend: Box<dyn PolicyDataplane>,
    status: Arc<Status>,
    rx: Receiver<Msg>,
    failures: Option<tokio::sync::mpsc::UnboundedSender<Failure>>,
) {
    let mut e = Engine::new(cfg, backend, status, failures);
    loop {
        let msg = match e.deadline() {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match msg {
            Ok(m) => e.handle(m),
            Err(RecvTimeoutError::Timeout) => {
                // Take what queued up meanwhile, then program once (or, with nothing pending, do the
                // backend's deferred work).
                while let Ok(m) = rx.try_recv() {
                    e.handle(m);
                }
                e.tick(Instant::now());
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Engine {
    /// An engine for `cfg` programming `backend`.
    pub fn new(
        cfg: Config,
        backend: Box<dyn PolicyDataplane>,
        status: Arc<Status>,
        failures: Option<tokio::sync::mpsc::UnboundedSender<Failure>>,
    ) -> Self {
        Engine {
            pipeline: Pipeline::new(&cfg.node_name),
            cfg,
            backend,
            status,
            failures,
            pending: Changes::default(),
            dirty_since: None,
            programmed_once: false,
            retry_at: None,
            last_program: None,
            idle_work: false,
            trim_after_idle: false,
        }
    }

    /// The update path (its model, for tests and debugging).
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Programs what is pending now: in full the first time, else the changes; then does the backend's
    /// deferred work, as the engine does once idle.
    pub fn flush(&mut self) -> Result<dataplane::ApplyStats, DataplaneError> {
        let stats = self.program(false)?;
        self.idle();
        Ok(stats)
    }

    /// Converges in full with a read-back now, as the periodic refresh does, then does the deferred work.
    pub fn converge(&mut self) -> Result<dataplane::ApplyStats, DataplaneError> {
        let stats = self.program(true)?;
        self.idle();
        Ok(stats)
    }

    /// Removes everything the backend created, natOutgoing's objects too.
    pub fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>> {
        let mut errors = self.backend.remove_all().err().unwrap_or_default();
        errors.extend(self.backend.remove_nat());
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// When to program next, once every kind is listed: at once when the last program is `debounce` past,
    /// else `debounce` after it; after a failure, no sooner than the retry.
    fn program_due(&self) -> Option<Instant> {
        let dirty = self.dirty_since?;
        let at = self
            .last_program
            .map_or(dirty, |last| dirty.max(last + self.cfg.debounce));
        self.pipeline
            .in_sync()
            .then(|| self.retry_at.map_or(at, |r| r.max(at)))
    }

    /// When the engine must wake next: to program, or for the backend's deferred work.
    fn deadline(&self) -> Option<Instant> {
        self.program_due().or_else(|| {
            (self.idle_work && self.dirty_since.is_none())
                .then(|| self.last_program.map_or_else(Instant::now, |l| l + IDLE))
        })
    }

    /// Does what is due at `now`: a program, or else the backend's deferred work.
    fn tick(&mut self, now: Instant) {
        match self.program_due() {
            Some(at) if at <= now => {
                let _ = self.program(false);
            }
            Some(_) => {}
            None => {
                if self.deadline().is_some_and(|at| at <= now) {
                    self.idle();
                }
            }
        }
    }

    /// The backend's deferred work; a failure is logged and retried after the next program.
    fn idle(&mut self) {
        self.idle_work = false;
        if let Err(err) = self.backend.idle() {
            warn!(error = %err, "the data plane's deferred work failed; retrying after the next program");
        }
        if std::mem::take(&mut self.trim_after_idle) {
            // The read-back after a full converge parses a whole table listing.
            crate::memory::release_free_memory();
        }
    }

    /// Handles one message (a full converge, for [`Msg::Refresh`], happens at once).
    pub fn handle(&mut self, m: Msg) {
        match m {
            Msg::Update(u) => {
                if let Some(f) = self.pipeline.update(u) {
                    self.status.conversion_failed(&f.kind);
                    if let Some(tx) = &self.failures {
                        let _ = tx.send(f);
                    }
                }
            }
            Msg::Held(h) => self.pipeline.set_held(h),
            Msg::Wired(iface) => {
                self.pending.endpoints.insert(iface);
            }
            Msg::Refresh => {
                if self.programmed_once {
                    let _ = self.program(true);
                }
            }
            Msg::Felix {
                nat_outgoing_address,
                endpoint_to_host,
            } => self.pipeline.set_felix(nat_outgoing_address, endpoint_to_host),
        }
        self.pending.merge(self.pipeline.take_changes());
        if !self.pending.is_empty() || !self.programmed_once {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
    }

    /// Programs the data plane: in full (with a read-back) the first time and when `full`, else what
    /// changed.
    fn program(&mut self, full: bool) -> Result<dataplane::ApplyStats, DataplaneError> {
        let full = full || !self.programmed_once;
        let started = Instant::now();
        let changed_at = self.dirty_since;
        let result: Result<dataplane::ApplyStats, DataplaneError> = if full {
            self.backend.converge(self.pipeline.model())
        } else {
            self.backend.update(self.pipeline.model(), &self.pending)
        };
        match result {
            Ok(stats) => {
                if full {
                    // A full converge follows the initial list, a relist or a refresh: the JSON they
                    // decoded is garbage now.
                    crate::memory::release_free_memory();
                    self.trim_after_idle = true;
                }
                if full && self.programmed_once && !stats.is_noop() {
                    self.status.repairs.fetch_add(1, Ordering::Relaxed);
                    info!(?stats, "converged with a full read-back and repaired drift");
                }
                self.pending = Changes::default();
                self.dirty_since = None;
                self.retry_at = None;
                self.last_program = Some(Instant::now());
                self.idle_work = true;
                self.programmed_once = true;
                self.status.programs.fetch_add(1, Ordering::Relaxed);
                self.status.record_program(started.elapsed());
                if let (false, Some(at)) = (full, changed_at) {
                    self.status.last_change_us.store(
                        u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                }
                debug!(full, ?stats, elapsed = ?started.elapsed(), "programmed");
                // Ready once the first program from a complete view applied every valid object.
                if self.pipeline.in_sync() {
                    self.status.ready.store(true, Ordering::Relaxed);
                }
                Ok(stats)
            }
            Err(err) => {
                self.status.failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %err, full, "programming the data plane failed; retrying in full");
                // The backend converges in full on its next call; keep the changes for the count only.
                self.dirty_since.get_or_insert_with(Instant::now);
                self.last_program = Some(Instant::now());
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                Err(err)
            }
        }
    }
}
