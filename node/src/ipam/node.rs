//! The node agent's IPAM server: a CNI ADD is answered from memory, with no API round trip, yet no address
//! is ever handed out twice.
//!
//! How:
//! - **A reserve.** The agent keeps a few addresses *reserved* in the API: allocated in its blocks (by
//!   compare-and-swap, like any allocation) to the handle `caracal-reserve.<node>`. Nobody else can take
//!   them, so handing one to a pod needs only memory. A background task refills the reserve from the
//!   node's affine blocks, claims a new block when they are full, and borrows from other nodes' blocks when
//!   the pools are exhausted (unless `IPAMConfiguration.strictAffinity`).
//! - **A journal.** Before ADD answers, the assignment is appended to a per-node journal file; DEL appends a
//!   release. An agent killed with SIGKILL loses nothing the kernel already has (the write is complete
//!   when `write` returns; the page cache survives the process), and on restart the journal replays onto
//!   what the API holds. (A node that loses power loses its pods too, so the journal is not fsynced.)
//! - **A committer.** In the background, assignments become real holders in the `IPAMBlock` (the reserve
//!   record is handed to the pod's handle) with an `IPAMHandle` per pod, and releases free their
//!   addresses, batched per block with compare-and-swap. It writes once changes have paused for 50 ms (at
//!   most 2 s after the first), so a burst of pods is not slowed by its own API writes.
//! - **Both families.** A pod gets one address of each family that has an enabled pool selecting its node
//!   (IPv4, IPv6, or both); the reserve holds addresses of each family, refilled per family.
//! - **Few reads.** The last version of each block this node read or wrote is kept: the committer and the
//!   refiller write on it directly (compare-and-swap still guards every write; a conflict re-reads), so a
//!   steady stream of pods costs one block write per batch plus one IPAMHandle per pod, and no list.
//! - **Garbage collection.** An address whose pod has been gone for longer than a grace period is released,
//!   as is anything CNI GC says is no longer attached.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use caracal_crds::ipam::{IPAMBlock, IPAMConfiguration, IPAMHandle, IPAMHandleSpec};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

use super::allocator::{AllocError, Allocator, Prefill};
use super::block::Block;

/// Attribute keys recorded with each allocation.
pub mod attr {
    /// The pod's namespace.
    pub const NAMESPACE: &str = "namespace";
    /// The pod's name.
    pub const POD: &str = "pod";
    /// The node holding the address.
    pub const NODE: &str = "node";
    /// What the address is for when it is not a pod (`reserve`, `vxlanTunnelAddress`).
    pub const TYPE: &str = "type";
}

/// Tuning of the server.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node.
    pub node: String,
    /// Where the journal lives (`/var/lib/caracal`); one file per node.
    pub state_dir: PathBuf,
    /// How many addresses to keep reserved.
    pub reserve: usize,
    /// How long an address whose pod is gone is kept before GC releases it.
    pub gc_grace: Duration,
}

impl Config {
    /// Defaults for `node`: a reserve of 32 (half a default block: a burst of pods is served from memory
    /// while the reserve refills in the background) and Calico's 15-minute leak grace period.
    pub fn new(node: &str, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            node: node.to_owned(),
            state_dir: state_dir.into(),
            reserve: 32,
            gc_grace: Duration::from_secs(15 * 60),
        }
    }
}

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Record {
    /// `handle` was given `ips`.
    Assign {
        handle: String,
        ips: Vec<IpAddr>,
        attrs: BTreeMap<String, String>,
    },
    /// `handle` gave `ips` back.
    Release { handle: String, ips: Vec<IpAddr> },
}

/// Per block: assignments to commit (address, handle, attributes) and releases (address, handle).
type BlockWork = (
    Vec<(IpAddr, String, BTreeMap<String, String>)>,
    Vec<(IpAddr, String)>,
);

/// What a handle holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its attributes (namespace, pod, node).
    pub attrs: BTreeMap<String, String>,
    /// Already recorded in the IPAMBlocks under its handle.
    pub committed: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Reserved addresses of both families, in the order they were reserved.
    reserve: VecDeque<IpAddr>,
    /// The families this node serves (an enabled pool of that family selects it): IPv4, IPv6. Learned by
    /// each refill; None until the first has looked at the pools.
    families: Option<[bool; 2]>,
    held: BTreeMap<String, Held>,
    /// Released but not yet freed in the API: address -> the handle that held it.
    releasing: BTreeMap<IpAddr, String>,
    /// When GC first saw a handle's pod missing.
    missing_since: BTreeMap<String, Instant>,
    /// The last refill found nothing anywhere for a family the node serves.
    exhausted: bool,
    /// When the assignments of the last second were made (the reserve's target follows the rate).
    recent: VecDeque<Instant>,
    /// The highest target a refill aimed for within [`PEAK_MEMORY`], and when: empty blocks are released
    /// only down to what it needs, so the next burst like it finds its blocks instead of claiming them.
    peak: Option<(Instant, usize)>,
    /// When a handle was last assigned or released (the committer waits for a quiet moment).
    last_change: Option<Instant>,
    /// Per family: whether the node's pools still had a block nobody had claimed at the last look (None:
    /// not looked yet). The reserve grows beyond its configured size only while they do: in a full pool
    /// the free addresses of this node's blocks are what other nodes borrow, and a reserve never lends.
    room: [Option<bool>; 2],
}

/// The least time the assignment rate is measured over: short enough that the reserve's target rises within
/// the first few pods of a burst, long enough that two pods started together are not a burst.
const RATE_SPAN_MIN: Duration = Duration::from_millis(100);

/// How long the reserve's peak target is remembered after a burst.
const PEAK_MEMORY: Duration = Duration::from_secs(600);

/// The committer writes once no assignment or release has come for this long...
const COMMIT_QUIET: Duration = Duration::from_millis(50);
/// ...or this long after the first change it waits for, whichever is first.
const COMMIT_GATHER_MAX: Duration = Duration::from_secs(2);

fn family_index(ip: &IpAddr) -> usize {
    usize::from(ip.is_ipv6())
}

impl State {
    /// Reserved addresses of family `f` (0 IPv4, 1 IPv6).
    fn reserved_in(&self, f: usize) -> usize {
        self.reserve.iter().filter(|ip| family_index(ip) == f).count()
    }

    /// Takes the oldest reserved address of family `f`.
    fn take(&mut self, f: usize) -> Option<IpAddr> {
        let i = self.reserve.iter().position(|ip| family_index(ip) == f)?;
        self.reserve.remove(i)
    }

    /// The families to hand out: those served (IPv4 alone until the first refill has looked at the pools).
    fn wanted(&self) -> Vec<usize> {
        let families = self.families.unwrap_or_default();
        let served: Vec<usize> = (0..2).filter(|f| families[*f]).collect();
        if served.is_empty() { vec![0] } else { served }
    }

    /// True when some served family's reserve is below three quarters of its target.
    fn low(&self, configured: usize, now: Instant) -> bool {
        self.wanted().into_iter().any(|f| self.low_in(f, configured, now))
    }

    /// True when family `f`'s reserve is below three quarters of its target (or empty).
    fn low_in(&self, f: usize, configured: usize, now: Instant) -> bool {
        self.reserved_in(f) * 4 < self.target_for(f, configured, now) * 3
    }

    /// How many addresses family `f` should get now, and the target they make up, when its reserve is low;
    /// the target is remembered as the peak when it is one.
    fn shortfall(&mut self, f: usize, configured: usize, now: Instant) -> Option<(usize, usize)> {
        if !self.low_in(f, configured, now) {
            return None;
        }
        let target = self.target_for(f, configured, now);
        self.note_target(target, now);
        Some((target.saturating_sub(self.reserved_in(f)).max(1), target))
    }

    /// Records an assignment now, forgetting those older than a second.
    fn note_assignment(&mut self, now: Instant) {
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1))
        {
            self.recent.pop_front();
        }
    }

    /// Remembers `target` as the peak when it is the highest within [`PEAK_MEMORY`].
    fn note_target(&mut self, target: usize, now: Instant) {
        if self.peak_target(now) <= target {
            self.peak = Some((now, target));
        }
    }

    /// The peak target remembered at `now` (0 when none, or older than [`PEAK_MEMORY`]).
    fn peak_target(&self, now: Instant) -> usize {
        self.peak
            .filter(|(at, _)| now.duration_since(*at) <= PEAK_MEMORY)
            .map_or(0, |(_, t)| t)
    }

    /// The reserve's target for family `f` at `now`: [`State::burst_target`] while the family's pools have
    /// room for another block, the configured size otherwise (or when that is not known yet).
    fn target_for(&self, f: usize, configured: usize, now: Instant) -> usize {
        if self.room[f] == Some(true) {
            self.burst_target(configured, now)
        } else {
            configured.max(1)
        }
    }

    /// The reserve's target at `now` when the pools have room: the configured size, or twice the current
    /// rate of assignments per second when pods arrive faster (a burst is served from memory while the
    /// reserve refills), at most four times the configured size. The rate is the last second's assignments
    /// over the time since the oldest of them, at least [`RATE_SPAN_MIN`], so the target rises within the
    /// first few dozen pods of a burst instead of a second later.
    fn burst_target(&self, configured: usize, now: Instant) -> usize {
        let configured = configured.max(1);
        let span = self
            .recent
            .front()
            .map_or(Duration::ZERO, |t| now.duration_since(*t))
            .max(RATE_SPAN_MIN);
        let rate = self.recent.len() as f64 / span.as_secs_f64();
        configured.max((2.0 * rate).ceil() as usize).min(4 * configured)
    }
}

/// Errors of the IPAM server.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Allocating in the API failed.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The journal cannot be written or read.
    #[error("IPAM journal {path}: {source}")]
    Journal {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The API server failed a request.
    #[error("{0}: {1}")]
    Api(&'static str, kube::Error),
}

/// The node's IPAM server (cheap to clone).
#[derive(Clone)]
pub struct NodeIpam {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Config,
    client: Client,
    alloc: Allocator,
    state: Mutex<State>,
    journal: std::sync::Mutex<std::fs::File>,
    journal_path: PathBuf,
    refill_lock: Mutex<()>,
    /// Held while writing this node's blocks: the committer and the refiller write the same objects, and
    /// taking turns spares both the compare-and-swap conflicts (each costs a re-read).
    block_writes: Mutex<()>,
    commit_kick: Notify,
    refill_kick: Notify,
    /// Woken (all waiters) when a refill adds addresses to the reserve, and when a refill ends.
    published: Notify,
    /// A block is being claimed ahead of a burst.
    claiming: std::sync::atomic::AtomicBool,
    /// Held while claiming a block: a refill that runs out of free addresses while a claim ahead is under
    /// way waits for that block instead of claiming another beside it.
    claim_lock: Mutex<()>,
    /// The node's labels as the last refill read them.
    labels: std::sync::Mutex<Option<BTreeMap<String, String>>>,
    /// The last version seen of the blocks this node works with (own, borrowed from, holding its
    /// addresses), by name: the first attempt of a write starts from it instead of a list.
    blocks: std::sync::Mutex<BTreeMap<String, IPAMBlock>>,
    /// Bumped whenever a handle is assigned or released (the agent reprograms on it).
    changes: tokio::sync::watch::Sender<u64>,
    /// Host-side interfaces the CNI server wired since the agent last took them (see [`NodeIpam::wired`]).
    wired: std::sync::Mutex<Vec<String>>,
}

/// What [`NodeIpam::claim`] did.
enum Claimed {
    /// Claimed these blocks (at least one).
    Blocks(Vec<IPAMBlock>),
    /// Claimed nothing: the node's blocks had enough free addresses.
    Enough,
    /// Claimed nothing: the pools have no block left for this node.
    Nothing,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The object name of a handle's `IPAMHandle` (lower-case, DNS-safe).
pub fn handle_object_name(handle: &str) -> String {
    handle
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(253)
        .collect()
}

impl NodeIpam {
    /// The handle under which this node's reserve is recorded.
    pub fn reserve_handle(node: &str) -> String {
        format!("caracal-reserve.{node}")
    }

    /// Loads the node's state (the API's blocks, then the journal replayed onto them), rewrites the
    /// journal compactly, and starts the committer and the refiller.
    pub async fn start(client: Client, cfg: Config) -> Result<Self, IpamError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| IpamError::Journal {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let journal_path = cfg.state_dir.join(format!("ipam-{}.journal", cfg.node));
        let records = read_journal(&journal_path)?;
        let state = load(&client, &cfg.node, records).await?;
        let journal = rewrite_journal(&journal_path, &state)?;
        let inner = Arc::new(Inner {
            alloc: Allocator::new(client.clone(), &cfg.node),
            cfg,
            client,
            state: Mutex::new(state),
            journal: std::sync::Mutex::new(journal),
            journal_path,
            refill_lock: Mutex::new(()),
            block_writes: Mutex::new(()),
            commit_kick: Notify::new(),
            refill_kick: Notify::new(),
            published: Notify::new(),
            claiming: std::sync::atomic::AtomicBool::new(false),
            claim_lock: Mutex::new(()),
            labels: std::sync::Mutex::new(None),
            blocks: std::sync::Mutex::new(BTreeMap::new()),
            changes: tokio::sync::watch::channel(0).0,
            wired: std::sync::Mutex::new(Vec::new()),
        });
        let me = NodeIpam { inner };
        tokio::spawn(me.clone().commit_loop());
        tokio::spawn(me.clone().refill_loop());
        me.inner.commit_kick.notify_one();
        me.inner.refill_kick.notify_one();
        Ok(me)
    }

    /// A receiver that changes whenever a handle is assigned or released.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Records that the CNI server wired `host_iface` for an address this IPAM holds, and wakes the
    /// subscribers: a data plane that attaches to interfaces (BPF) must program it now, since the address
    /// alone (known before the interface existed) gave it nothing to attach to.
    pub fn wired(&self, host_iface: &str) {
        if let Ok(mut w) = self.inner.wired.lock() {
            w.push(host_iface.to_owned());
        }
        self.changed();
    }

    /// The interfaces recorded by [`NodeIpam::wired`] since the last call.
    pub fn take_wired(&self) -> Vec<String> {
        self.inner
            .wired
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default()
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|n| *n += 1);
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, IPAMBlock>> {
        self.inner
            .blocks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `obj` as the last version seen of its block.
    fn remember(&self, obj: &IPAMBlock) {
        self.cache().insert(obj.name_any(), obj.clone());
    }

    /// Forgets a block (deleted, or its cached version conflicted).
    fn forget(&self, name: &str) {
        self.cache().remove(name);
    }

    /// The cached blocks.
    fn cached_blocks(&self) -> Vec<IPAMBlock> {
        self.cache().values().cloned().collect()
    }

    /// Every block, read from the API; the ones this node works with are remembered.
    async fn list_blocks(&self) -> Result<Vec<IPAMBlock>, IpamError> {
        let all = Api::<IPAMBlock>::all(self.inner.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| IpamError::Api("listing IPAMBlocks", e))?
            .items;
        let mine = format!("host:{}", self.inner.cfg.node);
        let held: BTreeSet<IpAddr> = {
            let st = self.inner.state.lock().await;
            st.held
                .values()
                .flat_map(|h| h.ips.iter().copied())
                .chain(st.reserve.iter().copied())
                .chain(st.releasing.keys().copied())
                .collect()
        };
        for b in &all {
            if b.spec.affinity.as_deref() == Some(mine.as_str())
                || held.iter().any(|ip| b.spec.cidr.0.contains(ip))
            {
                self.remember(b);
            }
        }
        Ok(all)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.cfg.node
    }

    fn append(&self, r: &Record) -> Result<(), IpamError> {
        let mut line = serde_json::to_vec(r).unwrap_or_default();
        line.push(b'\n');
        let mut f = self
            .inner
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.write_all(&line).map_err(|source| IpamError::Journal {
            path: self.inner.journal_path.clone(),
            source,
        })
    }

    /// One address of each family the node serves for `handle` (the same ones again when it already holds
    /// some).
    pub async fn assign(
        &self,
        handle: &str,
        attrs: BTreeMap<String, String>,
    ) -> Result<Vec<IpAddr>, IpamError> {
        self.assign_in(handle, attrs, None).await
    }

    /// One address of the IPv4 (`v6` false) or IPv6 family for `handle` (a tunnel device's address).
    pub async fn assign_family(
        &self,
        handle: &str,
        attrs: BTreeMap<String, String>,
        v6: bool,
    ) -> Result<Vec<IpAddr>, IpamError> {
        self.assign_in(handle, attrs, Some(usize::from(v6))).await
    }

    async fn assign_in(
        &self,
        handle: &str,
        attrs: BTreeMap<String, String>,
        family: Option<usize>,
    ) -> Result<Vec<IpAddr>, IpamError> {
        // Refills in the request's path (the reserve ran dry); other requests may take what one brought.
        let mut refills = 0;
        loop {
            // Registered before looking, so addresses published meanwhile are not missed.
            let published = self.inner.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            {
                let mut st = self.inner.state.lock().await;
                if let Some(h) = st.held.get(handle) {
                    return Ok(h.ips.clone());
                }
                let wanted = family.map_or_else(|| st.wanted(), |f| vec![f]);
                let missing: Vec<usize> = wanted
                    .iter()
                    .copied()
                    .filter(|f| st.reserved_in(*f) == 0)
                    .collect();
                // Right after start the families are unknown: learn them before the first pod is served.
                if missing.is_empty() && (st.families.is_some() || family.is_some()) {
                    let ips: Vec<IpAddr> = wanted.iter().filter_map(|f| st.take(*f)).collect();
                    let mut attrs = attrs;
                    attrs.insert(attr::NODE.into(), self.inner.cfg.node.clone());
                    // Journal first: once it is written, a restarted agent knows the addresses are taken.
                    if let Err(e) = self.append(&Record::Assign {
                        handle: handle.to_owned(),
                        ips: ips.clone(),
                        attrs: attrs.clone(),
                    }) {
                        for ip in ips.into_iter().rev() {
                            st.reserve.push_front(ip);
                        }
                        return Err(e);
                    }
                    st.held.insert(
                        handle.to_owned(),
                        Held {
                            ips: ips.clone(),
                            attrs,
                            committed: false,
                        },
                    );
                    let now = Instant::now();
                    st.note_assignment(now);
                    st.last_change = Some(now);
                    if st.low(self.inner.cfg.reserve, now) {
                        self.inner.refill_kick.notify_one();
                    }
                    self.inner.commit_kick.notify_one();
                    self.changed();
                    return Ok(ips);
                }
                if (refills > 0 && st.exhausted) || refills >= 20 {
                    let family = if missing.contains(&1) { "IPv6" } else { "IPv4" };
                    warn!(node = %self.inner.cfg.node, family, "no address left in any IPPool this node may use");
                    return Err(AllocError::Exhausted {
                        node: self.inner.cfg.node.clone(),
                    }
                    .into());
                }
            }
            // A refill under way publishes each block write's addresses as it lands: wait for those rather
            // than for the whole refill (which may claim several blocks). With none under way, refill.
            let refilling = self.inner.refill_lock.try_lock().is_err();
            if refilling {
                let _ = tokio::time::timeout(Duration::from_secs(1), published).await;
                continue;
            }
            self.refill_families(family.map(|f| vec![f])).await?;
            refills += 1;
        }
    }

    /// Adds freshly reserved addresses to the reserve and wakes the requests waiting for some.
    async fn publish(&self, ips: &[IpAddr]) {
        if ips.is_empty() {
            return;
        }
        let mut st = self.inner.state.lock().await;
        st.reserve.extend(ips.iter().copied());
        st.exhausted = false;
        drop(st);
        self.inner.published.notify_waiters();
    }

    /// Releases what `handle` holds (nothing held is fine: DEL is idempotent). Returns the addresses.
    pub async fn release(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        let mut st = self.inner.state.lock().await;
        let Some(h) = st.held.remove(handle) else {
            return Ok(Vec::new());
        };
        self.append(&Record::Release {
            handle: handle.to_owned(),
            ips: h.ips.clone(),
        })?;
        for ip in &h.ips {
            st.releasing.insert(*ip, handle.to_owned());
        }
        st.missing_since.remove(handle);
        st.last_change = Some(Instant::now());
        self.inner.commit_kick.notify_one();
        self.changed();
        Ok(h.ips)
    }

    /// What `handle` holds.
    pub async fn get(&self, handle: &str) -> Option<Held> {
        self.inner.state.lock().await.held.get(handle).cloned()
    }

    /// Every handle this node holds.
    pub async fn held(&self) -> BTreeMap<String, Held> {
        self.inner.state.lock().await.held.clone()
    }

    /// Addresses reserved and not handed out.
    pub async fn reserved(&self) -> usize {
        self.inner.state.lock().await.reserve.len()
    }

    /// True once the node has addresses to hand out (CNI STATUS).
    pub async fn ready(&self) -> bool {
        let st = self.inner.state.lock().await;
        st.wanted().iter().all(|f| st.reserved_in(*f) > 0) || !st.exhausted
    }

    /// Nothing waits to be written to the API.
    pub async fn settled(&self) -> bool {
        let st = self.inner.state.lock().await;
        st.releasing.is_empty() && st.held.values().all(|h| h.committed)
    }

    /// Releases pod handles whose pod `exists` says is gone, once it has been gone for the grace period.
    /// Handles that are not pods' (the reserve, tunnel addresses) are left alone. Returns the released.
    pub async fn gc(&self, exists: impl Fn(&str, &str) -> bool) -> Result<Vec<String>, IpamError> {
        let now = Instant::now();
        let grace = self.inner.cfg.gc_grace;
        let expired: Vec<String> = {
            let mut st = self.inner.state.lock().await;
            let mut gone = Vec::new();
            let mut expired = Vec::new();
            for (handle, h) in &st.held {
                let (Some(ns), Some(pod)) = (h.attrs.get(attr::NAMESPACE), h.attrs.get(attr::POD)) else {
                    continue;
                };
                if !exists(ns, pod) {
                    gone.push(handle.clone());
                }
            }
            st.missing_since.retain(|h, _| gone.contains(h));
            // Other nodes claim and release blocks too: whether the pools have room is looked at again.
            st.room = [None, None];
            for h in gone {
                let since = *st.missing_since.entry(h.clone()).or_insert(now);
                if now.duration_since(since) >= grace {
                    expired.push(h);
                }
            }
            expired
        };
        for h in &expired {
            info!(handle = %h, "releasing an address whose pod is gone (IPAM GC)");
            self.release(h).await?;
        }
        if self.settled().await {
            self.release_empty_blocks().await?;
        }
        Ok(expired)
    }

    /// Releases this node's blocks that hold nothing but its reserve, as long as the reserve left in its
    /// other blocks plus their free addresses still cover the reserve target, or the highest target of the
    /// last ten minutes after a burst (so releasing never forces a new claim: no churn). Deletes each with a resourceVersion precondition, then its BlockAffinity. Returns the
    /// released blocks.
    pub async fn release_empty_blocks(&self) -> Result<Vec<String>, IpamError> {
        let node = &self.inner.cfg.node;
        let mine = format!("host:{node}");
        let reserve = Self::reserve_handle(node);
        let blocks: Api<IPAMBlock> = Api::all(self.inner.client.clone());
        let _writes = self.inner.block_writes.lock().await;
        let own: Vec<IPAMBlock> = self
            .list_blocks()
            .await?
            .into_iter()
            .filter(|b| b.spec.affinity.as_deref() == Some(mine.as_str()))
            .collect();
        let mut released = Vec::new();
        let mut remaining: Vec<&IPAMBlock> = own.iter().collect();
        for obj in &own {
            // Per family: the last block of a family stays.
            let v4 = obj.spec.cidr.is_ipv4();
            if remaining.iter().filter(|b| b.spec.cidr.is_ipv4() == v4).count() <= 1 {
                continue;
            }
            let block = Block::from_spec(&obj.spec).map_err(AllocError::from)?;
            let held = block.allocated();
            if held.iter().any(|(_, h)| *h != reserve) {
                continue;
            }
            let ours: BTreeSet<IpAddr> = held.iter().map(|(ip, _)| *ip).collect();
            let mut st = self.inner.state.lock().await;
            // Every reserved address of the block must still be in the reserve (none handed out meanwhile).
            if ours.iter().any(|ip| !st.reserve.contains(ip)) {
                continue;
            }
            let others: Vec<&IPAMBlock> = remaining
                .iter()
                .copied()
                .filter(|b| b.name_any() != obj.name_any())
                .collect();
            let free_elsewhere: usize = others
                .iter()
                .filter(|b| b.spec.cidr.is_ipv4() == v4)
                .map(|b| b.spec.unallocated.len())
                .sum();
            let keep = self.inner.cfg.reserve.max(st.peak_target(Instant::now()));
            if st.reserved_in(usize::from(!v4)) - ours.len() + free_elsewhere < keep {
                continue;
            }
            let precondition = kube::api::Preconditions {
                resource_version: obj.metadata.resource_version.clone(),
                uid: obj.metadata.uid.clone(),
            };
            let dp = DeleteParams {
                preconditions: Some(precondition),
                ..DeleteParams::default()
            };
            match blocks.delete(&obj.name_any(), &dp).await {
                Ok(_) => {}
                Err(e) if conflict(&e) || not_found(&e) => continue,
                Err(e) => return Err(IpamError::Api("deleting an empty IPAMBlock", e)),
            }
            st.reserve.retain(|ip| !ours.contains(ip));
            // The pool has room again (for this node and the others).
            st.room[usize::from(!v4)] = Some(true);
            drop(st);
            self.forget(&obj.name_any());
            let aff = format!("{node}-{}", obj.name_any());
            match Api::<caracal_crds::ipam::BlockAffinity>::all(self.inner.client.clone())
                .delete(&aff, &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(IpamError::Api("deleting a BlockAffinity", e)),
            }
            info!(block = %obj.spec.cidr, "released an empty block");
            released.push(obj.name_any());
            remaining = others;
        }
        if !released.is_empty() {
            self.inner.refill_kick.notify_one();
        }
        Ok(released)
    }

    /// Refills the reserve of every family the node serves to its target (serialized; concurrent callers
    /// wait for one refill). Which families are served is looked up in the pools each time.
    pub async fn refill(&self) -> Result<(), IpamError> {
        self.refill_families(None).await
    }

    /// Refills `only` these families (0 IPv4, 1 IPv6), or every served one. Costs no API call when every
    /// reserve is still above three quarters of its target (a request that waited for another refill finds
    /// it done).
    async fn refill_families(&self, only: Option<Vec<usize>>) -> Result<(), IpamError> {
        let _one = self.inner.refill_lock.lock().await;
        let allowed = |f: usize| only.as_ref().is_none_or(|o| o.contains(&f));
        let configured = self.inner.cfg.reserve;
        let (needs, target) = {
            let st = self.inner.state.lock().await;
            let now = Instant::now();
            let wanted = st.wanted().into_iter().filter(|f| allowed(*f));
            (
                st.families.is_none() || wanted.clone().any(|f| st.low_in(f, configured, now)),
                wanted
                    .map(|f| st.target_for(f, configured, now))
                    .max()
                    .unwrap_or(0),
            )
        };
        if !needs {
            return Ok(());
        }
        // During a burst, the blocks it will need are claimed beside this refill from its start, so its own
        // reservations (and the next refills) find them instead of claiming on their path.
        self.start_claiming_ahead(target);
        let started = Instant::now();
        let mut got_total = 0;
        let mut max_target = 0;
        // With the families known, the reserve is first topped up from this node's cached blocks: one write
        // per block and no lookup before it, so pods waiting on this refill get addresses after one API call.
        let known = self.inner.state.lock().await.families;
        for f in (0..2).filter(|f| known.is_some_and(|k| k[*f]) && allowed(*f)) {
            if let Some((got, target)) = self.top_up(f, None).await? {
                max_target = max_target.max(target);
                got_total += got.len();
            }
        }
        let labels = self.node_labels().await;
        let served = self.inner.alloc.served_families(&labels).await?;
        let mut exhausted = false;
        for (f, serves) in served.into_iter().enumerate() {
            // A family with no pool for this node is not served; IPv4 is still tried, so a node whose
            // pools are all gone reports itself exhausted.
            if (!serves && f == 1) || !allowed(f) {
                continue;
            }
            // Whether the pools have room for another block decides whether a burst may grow the reserve:
            // learned once (claims and releases keep it current; GC forgets it).
            if self.inner.state.lock().await.room[f].is_none() {
                let room = self.inner.alloc.has_room(f == 0, &labels).await?;
                self.inner.state.lock().await.room[f] = Some(room);
            }
            let Some((got, target)) = self.top_up(f, Some(&labels)).await? else {
                continue;
            };
            max_target = max_target.max(target);
            got_total += got.len();
            let st = self.inner.state.lock().await;
            if got.is_empty() && st.reserved_in(f) == 0 && (serves || f == 0) {
                exhausted = true;
            }
        }
        let mut st = self.inner.state.lock().await;
        st.families = Some(served);
        st.exhausted = exhausted;
        drop(st);
        // Requests waiting on this refill look again: the families are known now, or nothing was found.
        self.inner.published.notify_waiters();
        // A first refill learns the families and whether the pools have room only now.
        self.start_claiming_ahead(max_target);
        tracing::debug!(
            got = got_total,
            target = max_target,
            ms = started.elapsed().as_millis() as u64,
            "IPAM reserve refilled"
        );
        Ok(())
    }

    /// Tops family `f`'s reserve up to its target when it is low, through [`NodeIpam::reserve_more`] (which
    /// `labels` decide how far it may go): the addresses it got and the target, None when it was not low.
    async fn top_up(
        &self,
        f: usize,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Result<Option<(Vec<IpAddr>, usize)>, IpamError> {
        let shortfall = self
            .inner
            .state
            .lock()
            .await
            .shortfall(f, self.inner.cfg.reserve, Instant::now());
        let Some((n, target)) = shortfall else {
            return Ok(None);
        };
        let _writes = self.inner.block_writes.lock().await;
        Ok(Some((self.reserve_more(n, f == 0, labels).await?, target)))
    }

    /// Starts claiming blocks ahead of a burst (see [`NodeIpam::claim_ahead`]) when `target` is above the
    /// configured reserve and no claim ahead is under way.
    fn start_claiming_ahead(&self, target: usize) {
        if target <= self.inner.cfg.reserve
            || self
                .inner
                .claiming
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            // The labels the last refill read (pools select nodes by label): a claim ahead must not wait
            // for a read of its own. The first one reads them.
            let cached = me.inner.labels.lock().ok().and_then(|l| l.clone());
            let labels = match cached {
                Some(l) => l,
                None => me.node_labels().await,
            };
            for f in 0..2 {
                if let Err(e) = me.claim_ahead(f, target, &labels).await {
                    warn!(error = %e, "claiming a block ahead of a burst failed");
                }
            }
            me.inner
                .claiming
                .store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// During a burst (the target above its configured size, which needs room in the pools), claims the
    /// next blocks before they are needed, until this node's blocks have as many free addresses as the
    /// target (the higher of `target` and the current one): the refills then write a block each instead of
    /// claiming one first (several API writes) while the pods of the burst wait. The blocks are claimed
    /// together (see [`Allocator::claim`]), beside the refills, not inside one. A block claimed ahead and
    /// never used is empty, and released like any other once the burst's peak is ten minutes old.
    async fn claim_ahead(
        &self,
        f: usize,
        target: usize,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), IpamError> {
        for _ in 0..2 {
            let enough = {
                let st = self.inner.state.lock().await;
                if !st.families.is_some_and(|k| k[f]) || st.room[f] != Some(true) {
                    return Ok(());
                }
                // The reserve serves the burst as well as the free addresses do: blocks are short only by
                // what the two together miss. (Free addresses alone would claim a block beside a block
                // full of reserve, which the release of empty blocks then gives back: churn.)
                let target = target.max(st.target_for(f, self.inner.cfg.reserve, Instant::now()));
                target.saturating_sub(st.reserved_in(f))
            };
            if enough == 0 {
                return Ok(());
            }
            match self.claim(f == 0, labels, enough, true).await? {
                Claimed::Blocks(blocks) => {
                    let cidrs: Vec<String> = blocks.iter().map(|b| b.spec.cidr.to_string()).collect();
                    tracing::debug!(blocks = ?cidrs, enough, "claimed blocks ahead of a burst");
                }
                Claimed::Enough | Claimed::Nothing => return Ok(()),
            }
        }
        Ok(())
    }

    /// Free addresses in this node's cached blocks of one family.
    fn own_free(&self, v4: bool) -> usize {
        let mine = format!("host:{}", self.inner.cfg.node);
        self.cached_blocks()
            .iter()
            .filter(|b| {
                b.spec.affinity.as_deref() == Some(mine.as_str())
                    && b.spec.cidr.is_ipv4() == v4
                    && !b.spec.deleted
            })
            .map(|b| b.spec.unallocated.len())
            .sum()
    }

    /// Claims blocks for this node (see [`Allocator::claim`]) until its cached blocks of the family have
    /// `enough` free addresses, unless they already have (looked at once no other claim is under way: one
    /// that was may have just made them enough). What the claim says about room in the pools is kept,
    /// and the blocks are remembered as created, so reserving in them needs no list.
    ///
    /// With `prefill`, the reserve's shortfall is assigned in the new blocks as they are created and
    /// published at once: pods waiting for addresses get them one write sooner.
    async fn claim(
        &self,
        v4: bool,
        labels: &BTreeMap<String, String>,
        enough: usize,
        prefill: bool,
    ) -> Result<Claimed, IpamError> {
        let _one = self.inner.claim_lock.lock().await;
        let free = self.own_free(v4);
        if free >= enough {
            return Ok(Claimed::Enough);
        }
        let f = usize::from(!v4);
        let prefill = if prefill {
            let st = self.inner.state.lock().await;
            let target = st.target_for(f, self.inner.cfg.reserve, Instant::now());
            Some(Prefill {
                count: target.saturating_sub(st.reserved_in(f)),
                handle: Self::reserve_handle(&self.inner.cfg.node),
                attrs: self.reserve_attrs(),
            })
        } else {
            None
        };
        // Blocks for what is missing, or for the prefill when that is more; a claim ahead that finds the
        // blocks still short after a prefill claims again, off the pods' path.
        let addresses = (enough - free).max(prefill.as_ref().map_or(0, |p| p.count));
        let claimed = self
            .inner
            .alloc
            .claim(v4, labels, addresses, prefill.as_ref())
            .await?;
        self.inner.state.lock().await.room[f] = Some(claimed.as_ref().is_some_and(|c| c.room_left));
        Ok(match claimed {
            Some(c) => {
                for block in &c.blocks {
                    self.remember(block);
                }
                // Owned once created: the waiting pods need not wait for the affinities too.
                self.publish(&c.prefilled).await;
                self.inner.alloc.confirm_affinities(&c.blocks).await?;
                Claimed::Blocks(c.blocks)
            }
            None => Claimed::Nothing,
        })
    }

    /// The attributes of the reserve's addresses in the blocks.
    fn reserve_attrs(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (attr::NODE.to_owned(), self.inner.cfg.node.clone()),
            (attr::TYPE.to_owned(), "reserve".to_owned()),
        ])
    }

    /// The node's labels, read from the API (and kept for the next claim ahead).
    async fn node_labels(&self) -> BTreeMap<String, String> {
        let labels = Api::<Node>::all(self.inner.client.clone())
            .get_opt(&self.inner.cfg.node)
            .await
            .ok()
            .flatten()
            .map(|n| n.labels().clone())
            .unwrap_or_default();
        if let Ok(mut kept) = self.inner.labels.lock() {
            *kept = Some(labels.clone());
        }
        labels
    }

    async fn strict_affinity(&self) -> bool {
        Api::<IPAMConfiguration>::all(self.inner.client.clone())
            .get_opt("default")
            .await
            .ok()
            .flatten()
            .is_some_and(|c| c.spec.strict_affinity == Some(true))
    }

    /// Reserves up to `n` addresses of one family in the API: own blocks first, then a newly claimed block,
    /// then (unless strict affinity) other nodes' blocks. Without `node_labels`, only the cached own blocks
    /// are tried (no list, no claim, no borrowing).
    async fn reserve_more(
        &self,
        n: usize,
        v4: bool,
        node_labels: Option<&BTreeMap<String, String>>,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let node = &self.inner.cfg.node;
        let mine = format!("host:{node}");
        let reserve = Self::reserve_handle(node);
        let attrs = self.reserve_attrs();
        let mut claims = 0;
        let mut borrow = false;
        let mut got = Vec::new();
        let blocks: Api<IPAMBlock> = Api::all(self.inner.client.clone());
        // Own blocks are tried from the cache first; a miss or a conflict lists.
        let mut cached = true;
        for _ in 0..50 {
            if got.len() >= n {
                return Ok(got);
            }
            let all = if cached && !borrow {
                self.cached_blocks()
            } else if node_labels.is_none() {
                // Cached blocks only: what they had is what this pass gets.
                return Ok(got);
            } else {
                self.list_blocks().await?
            };
            let candidate = all
                .into_iter()
                .filter(|b| b.spec.cidr.is_ipv4() == v4 && !b.spec.deleted && !b.spec.unallocated.is_empty())
                .find(|b| {
                    if borrow {
                        b.spec.affinity.as_deref() != Some(mine.as_str()) && !b.spec.strict_affinity
                    } else {
                        b.spec.affinity.as_deref() == Some(mine.as_str())
                    }
                });
            if let Some(obj) = candidate {
                let mut block = Block::from_spec(&obj.spec).map_err(AllocError::from)?;
                let want = n - got.len();
                // Borrowing takes a few at a time: the owner may need its block back.
                let take = if borrow {
                    want.min(4)
                } else {
                    want.min(block.free())
                };
                let ips = block
                    .assign(take, &reserve, attrs.clone())
                    .map_err(AllocError::from)?;
                let mut updated = obj.clone();
                updated.spec = block.to_spec();
                match blocks
                    .replace(&obj.name_any(), &PostParams::default(), &updated)
                    .await
                {
                    Ok(written) => {
                        self.remember(&written);
                        // Usable at once: requests waiting on this refill need not wait for the rest of it.
                        self.publish(&ips).await;
                        if borrow {
                            info!(block = %obj.spec.cidr, count = ips.len(), "borrowed addresses from another node's block: the pools are exhausted");
                            // One borrow per refill: the next refill looks again (the owner may free some).
                            got.extend(ips);
                            return Ok(got);
                        }
                        got.extend(ips);
                        continue;
                    }
                    Err(e) if conflict(&e) || not_found(&e) => {
                        self.forget(&obj.name_any());
                        cached = false;
                        continue;
                    }
                    Err(e) => return Err(IpamError::Api("reserving addresses in an IPAMBlock", e)),
                }
            }
            if cached && !borrow {
                // Nothing free in the cached blocks: look at the API's before claiming another.
                cached = false;
                continue;
            }
            // Own blocks are full: claim another (within one refill, as many as the reserve needs).
            if let Some(node_labels) = node_labels
                && !borrow
                && claims < 4
            {
                claims += 1;
                // A claim ahead may have just made the cached blocks enough; otherwise the new block is
                // known as created. Either way: reserve from the cache without listing again.
                if !matches!(self.claim(v4, node_labels, 1, false).await?, Claimed::Nothing) {
                    cached = true;
                    continue;
                }
            }
            if !got.is_empty() {
                return Ok(got);
            }
            if !borrow && !self.strict_affinity().await {
                borrow = true;
                continue;
            }
            return Ok(got);
        }
        if got.is_empty() {
            return Err(AllocError::Contended(50).into());
        }
        Ok(got)
    }

    async fn refill_loop(self) {
        loop {
            self.inner.refill_kick.notified().await;
            if let Err(e) = self.refill().await {
                warn!(error = %e, "refilling the IPAM reserve failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.inner.refill_kick.notify_one();
            }
        }
    }

    async fn commit_loop(self) {
        loop {
            self.inner.commit_kick.notified().await;
            // Concurrent requests gather into one write per block, and a burst of pods passes before its API
            // writes (an IPAMHandle per pod costs the API server more CPU than the rest of an ADD): the
            // journal holds them meanwhile, and the addresses are this node's reserve's in the API already.
            let first = Instant::now();
            loop {
                tokio::time::sleep(COMMIT_QUIET).await;
                let last = self.inner.state.lock().await.last_change;
                if last.is_none_or(|t| t.elapsed() >= COMMIT_QUIET) || first.elapsed() >= COMMIT_GATHER_MAX {
                    break;
                }
            }
            if let Err(e) = self.commit().await {
                warn!(error = %e, "writing IPAM changes to the API failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.inner.commit_kick.notify_one();
            }
        }
    }

    /// Writes pending assignments and releases to the API: per block, one compare-and-swap write.
    pub async fn commit(&self) -> Result<(), IpamError> {
        let (assigns, releases) = {
            let st = self.inner.state.lock().await;
            let assigns: Vec<(String, Held)> = st
                .held
                .iter()
                .filter(|(_, h)| !h.committed)
                .map(|(k, h)| (k.clone(), h.clone()))
                .collect();
            (assigns, st.releasing.clone())
        };
        if assigns.is_empty() && releases.is_empty() {
            return Ok(());
        }
        let reserve = Self::reserve_handle(&self.inner.cfg.node);
        let blocks: Api<IPAMBlock> = Api::all(self.inner.client.clone());
        let writes = self.inner.block_writes.lock().await;
        // The cached blocks, unless one of the addresses is in a block not cached: then a list.
        let mut all = self.cached_blocks();
        let covered = |all: &[IPAMBlock], ip: &IpAddr| all.iter().any(|b| b.spec.cidr.0.contains(ip));
        if assigns
            .iter()
            .flat_map(|(_, h)| h.ips.iter())
            .chain(releases.keys())
            .any(|ip| !covered(&all, ip))
        {
            all = self.list_blocks().await?;
        }
        let mut by_block: BTreeMap<String, BlockWork> = BTreeMap::new();
        let block_of = |ip: &IpAddr| {
            all.iter()
                .find(|b| b.spec.cidr.0.contains(ip))
                .map(ResourceExt::name_any)
        };
        for (handle, h) in &assigns {
            for ip in &h.ips {
                if let Some(b) = block_of(ip) {
                    by_block
                        .entry(b)
                        .or_default()
                        .0
                        .push((*ip, handle.clone(), h.attrs.clone()));
                }
            }
        }
        for (ip, handle) in &releases {
            if let Some(b) = block_of(ip) {
                by_block.entry(b).or_default().1.push((*ip, handle.clone()));
            }
        }
        let mut done_assign = BTreeSet::new();
        let mut done_release = BTreeSet::new();
        for (name, (adds, dels)) in by_block {
            // The first attempt works on the listed object; a conflict re-reads it.
            let mut listed = all.iter().find(|b| b.name_any() == name).cloned();
            for _ in 0..50 {
                let obj = match listed.take() {
                    Some(o) => o,
                    None => match blocks
                        .get_opt(&name)
                        .await
                        .map_err(|e| IpamError::Api("reading an IPAMBlock", e))?
                    {
                        Some(o) => {
                            self.remember(&o);
                            o
                        }
                        None => {
                            self.forget(&name);
                            break;
                        }
                    },
                };
                let mut block = Block::from_spec(&obj.spec).map_err(AllocError::from)?;
                for (ip, handle, attrs) in &adds {
                    match block.holder(*ip) {
                        Some(h) if h == reserve => {
                            block
                                .reassign(*ip, handle, attrs.clone())
                                .map_err(AllocError::from)?;
                        }
                        Some(h) if h == handle => {}
                        other => {
                            warn!(%ip, handle, holder = ?other, "a reserved address is held by someone else in the API")
                        }
                    }
                }
                for (ip, handle) in &dels {
                    if block.holder(*ip).is_some_and(|h| h == handle || h == reserve) {
                        block.release(*ip).map_err(AllocError::from)?;
                    }
                }
                let mut updated = obj.clone();
                updated.spec = block.to_spec();
                if updated.spec == obj.spec {
                    break;
                }
                match blocks.replace(&name, &PostParams::default(), &updated).await {
                    Ok(written) => {
                        self.remember(&written);
                        break;
                    }
                    // A stale cached version: read the block again.
                    Err(e) if conflict(&e) => continue,
                    Err(e) if not_found(&e) => {
                        self.forget(&name);
                        continue;
                    }
                    Err(e) => return Err(IpamError::Api("writing an IPAMBlock", e)),
                }
            }
            done_assign.extend(adds.iter().map(|(ip, h, _)| (*ip, h.clone())));
            done_release.extend(dels.iter().map(|(ip, h)| (*ip, h.clone())));
        }
        let mut handle_blocks: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        for (handle, h) in &assigns {
            let per = handle_blocks.entry(handle.clone()).or_default();
            for ip in &h.ips {
                if let Some(b) = block_of(ip) {
                    *per.entry(b).or_insert(0) += 1;
                }
            }
        }
        drop(writes);
        self.write_handles(&handle_blocks, &releases).await?;
        let mut st = self.inner.state.lock().await;
        for (handle, h) in &assigns {
            if h.ips
                .iter()
                .all(|ip| done_assign.contains(&(*ip, handle.clone())))
                && let Some(live) = st.held.get_mut(handle)
                && live.ips == h.ips
            {
                live.committed = true;
            }
        }
        st.releasing
            .retain(|ip, h| !done_release.contains(&(*ip, h.clone())));
        Ok(())
    }

    /// One `IPAMHandle` per committed handle (per block, how many addresses it holds there); released
    /// handles' objects are deleted.
    async fn write_handles(
        &self,
        assigns: &BTreeMap<String, BTreeMap<String, u32>>,
        releases: &BTreeMap<IpAddr, String>,
    ) -> Result<(), IpamError> {
        let api: Api<IPAMHandle> = Api::all(self.inner.client.clone());
        for (handle, block) in assigns {
            let block = block.clone();
            let obj = IPAMHandle::new(
                &handle_object_name(handle),
                IPAMHandleSpec {
                    handle_id: handle.clone(),
                    block,
                    deleted: false,
                },
            );
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => {}
                Err(e) if conflict(&e) => {}
                Err(e) => return Err(IpamError::Api("creating an IPAMHandle", e)),
            }
        }
        let released: BTreeSet<&String> = releases.values().collect();
        for handle in released {
            match api
                .delete(&handle_object_name(handle), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(IpamError::Api("deleting an IPAMHandle", e)),
            }
        }
        Ok(())
    }
}

fn read_journal(path: &Path) -> Result<Vec<Record>, IpamError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(IpamError::Journal {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    // A torn last line (killed mid-write) is skipped: its ADD never answered.
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn rewrite_journal(path: &Path, st: &State) -> Result<std::fs::File, IpamError> {
    let err = |source| IpamError::Journal {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("journal.tmp");
    let mut out = String::new();
    for (handle, h) in &st.held {
        let r = Record::Assign {
            handle: handle.clone(),
            ips: h.ips.clone(),
            attrs: h.attrs.clone(),
        };
        out.push_str(&serde_json::to_string(&r).unwrap_or_default());
        out.push('\n');
    }
    let mut releasing: BTreeMap<&String, Vec<IpAddr>> = BTreeMap::new();
    for (ip, h) in &st.releasing {
        releasing.entry(h).or_default().push(*ip);
    }
    for (handle, ips) in releasing {
        let assign = Record::Assign {
            handle: handle.clone(),
            ips: ips.clone(),
            attrs: BTreeMap::new(),
        };
        let release = Record::Release {
            handle: handle.clone(),
            ips,
        };
        for r in [assign, release] {
            out.push_str(&serde_json::to_string(&r).unwrap_or_default());
            out.push('\n');
        }
    }
    std::fs::write(&tmp, out).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::OpenOptions::new().append(true).open(path).map_err(err)
}

/// The node's state from the API's blocks with the journal replayed onto them.
async fn load(client: &Client, node: &str, records: Vec<Record>) -> Result<State, IpamError> {
    let reserve_handle = NodeIpam::reserve_handle(node);
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| IpamError::Api("listing IPAMBlocks", e))?;
    let mut st = State::default();
    let mut reserved = BTreeSet::new();
    // Who holds each address in the API, for the journal replay.
    let mut api_holder: BTreeMap<IpAddr, String> = BTreeMap::new();
    for obj in &blocks {
        let block = Block::from_spec(&obj.spec).map_err(AllocError::from)?;
        for (ip, handle) in block.allocated() {
            api_holder.insert(ip, handle.clone());
            if handle == reserve_handle {
                reserved.insert(ip);
                continue;
            }
            let attrs = block
                .attributes_of(ip)
                .map(|a| a.secondary.clone())
                .unwrap_or_default();
            if attrs.get(attr::NODE).map(String::as_str) == Some(node) {
                let h = st.held.entry(handle).or_insert_with(|| Held {
                    ips: Vec::new(),
                    attrs: attrs.clone(),
                    committed: true,
                });
                h.ips.push(ip);
            }
        }
    }
    for r in records {
        match r {
            Record::Assign { handle, ips, attrs } => {
                // Only addresses still ours in the API: reserved (not yet committed) or held by this handle.
                let ours: Vec<IpAddr> = ips
                    .into_iter()
                    .filter(|ip| reserved.contains(ip) || api_holder.get(ip).is_some_and(|h| *h == handle))
                    .collect();
                if ours.is_empty() {
                    continue;
                }
                for ip in &ours {
                    reserved.remove(ip);
                }
                let committed = ours
                    .iter()
                    .all(|ip| api_holder.get(ip).is_some_and(|h| *h == handle));
                let entry = st.held.entry(handle).or_insert_with(|| Held {
                    ips: Vec::new(),
                    attrs: attrs.clone(),
                    committed,
                });
                if entry.attrs.is_empty() {
                    entry.attrs = attrs;
                }
                for ip in ours {
                    if !entry.ips.contains(&ip) {
                        entry.ips.push(ip);
                    }
                }
            }
            Record::Release { handle, ips } => {
                if let Some(h) = st.held.remove(&handle) {
                    for ip in h.ips.iter().chain(&ips) {
                        if api_holder
                            .get(ip)
                            .is_some_and(|x| *x == handle || *x == reserve_handle)
                        {
                            st.releasing.insert(*ip, handle.clone());
                        }
                    }
                }
            }
        }
    }
    // Reserved addresses no journal record took are free to hand out.
    st.reserve = reserved.into_iter().collect();
    info!(
        held = st.held.len(),
        reserved = st.reserve.len(),
        releasing = st.releasing.len(),
        "IPAM state loaded"
    );
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_target_follows_the_rate_of_a_burst_within_its_first_pods() {
        let mut st = State::default();
        let t0 = Instant::now();
        assert_eq!(st.burst_target(32, t0), 32, "idle: the configured size");
        // A slow trickle (one pod a second) keeps the configured size.
        st.note_assignment(t0);
        assert_eq!(st.burst_target(32, t0 + Duration::from_millis(10)), 32);
        // 20 pods within 80 ms (a burst at 250 per second): the cap, at once.
        let mut st = State::default();
        for i in 0..20 {
            st.note_assignment(t0 + Duration::from_millis(4 * i));
        }
        assert_eq!(st.burst_target(32, t0 + Duration::from_millis(80)), 128);
        // 24 pods spread over a second: twice 24 per second.
        let mut st = State::default();
        for i in 0..24 {
            st.note_assignment(t0 + Duration::from_millis(40 * i));
        }
        assert_eq!(st.burst_target(32, t0 + Duration::from_millis(960)), 50);
    }

    #[test]
    fn a_burst_grows_the_reserve_only_while_the_pools_have_room_for_another_block() {
        let mut st = State::default();
        let t0 = Instant::now();
        for i in 0..20 {
            st.note_assignment(t0 + Duration::from_millis(4 * i));
        }
        let now = t0 + Duration::from_millis(80);
        // Not known yet, or a full pool (other nodes borrow this node's free addresses): the configured size.
        assert_eq!(st.target_for(0, 32, now), 32);
        st.room = [Some(false), Some(true)];
        assert_eq!(st.target_for(0, 32, now), 32);
        assert_eq!(st.target_for(1, 32, now), 128, "IPv6 has room");
        st.room[0] = Some(true);
        assert_eq!(st.target_for(0, 32, now), 128);
    }

    #[test]
    fn the_peak_target_is_remembered_for_ten_minutes() {
        let mut st = State::default();
        let t0 = Instant::now();
        assert_eq!(st.peak_target(t0), 0);
        st.note_target(128, t0);
        st.note_target(40, t0 + Duration::from_secs(1));
        assert_eq!(st.peak_target(t0 + Duration::from_secs(60)), 128);
        assert_eq!(st.peak_target(t0 + PEAK_MEMORY + Duration::from_secs(1)), 0);
    }
}
