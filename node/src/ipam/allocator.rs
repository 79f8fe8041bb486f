//! Allocating pod addresses against the API server, safely under concurrency:
//!
//! - an address exists only once the `IPAMBlock` recording it has been written with the resourceVersion it
//!   was read at (compare-and-swap); a conflict re-reads and retries, so concurrent allocations on one node
//!   or across nodes never hand out an address twice;
//! - a node claims a new block by *creating* its `IPAMBlock` (named after its CIDR): creation is atomic, so
//!   when two nodes race for the last block exactly one wins, and the loser moves on;
//! - a `BlockAffinity` records the claim (pending, then confirmed) for people and for garbage collection.
//!
//! Handles (`IPAMHandle`), borrowing from other nodes' blocks, strict affinity and garbage collection arrive
//! with the CNI issue.

use std::collections::BTreeMap;
use std::net::IpAddr;

use caracal_crds::ipam::{AffinityState, BlockAffinity, BlockAffinitySpec, IPAMBlock};
use caracal_crds::ippool::IPPool;
use ipnet::IpNet;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};

use super::block::{Block, BlockError, block_name, blocks_of};

/// How many times a conflicting write is retried before giving up.
const MAX_CONFLICTS: usize = 50;

/// Errors allocating.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// The API server refused or failed a request.
    #[error("{0}: {1}")]
    Api(&'static str, kube::Error),
    /// Every pool this node may use is out of blocks and addresses.
    #[error("no free address for node {node} in any IPPool it may use")]
    Exhausted {
        /// The node.
        node: String,
    },
    /// Too many concurrent writers kept winning.
    #[error("gave up after {0} conflicting writes")]
    Contended(usize),
    /// A stored block is inconsistent.
    #[error(transparent)]
    Block(#[from] BlockError),
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Allocates for one node. Clones share one lock: a node's own allocations are serialized (the agent serves
/// them one at a time), so compare-and-swap conflicts come only from other nodes.
#[derive(Clone)]
pub struct Allocator {
    client: Client,
    node: String,
    serial: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// Addresses a claim assigns in the new blocks as it creates them.
#[derive(Debug)]
pub(crate) struct Prefill {
    /// How many.
    pub count: usize,
    /// To this handle.
    pub handle: String,
    /// With these attributes.
    pub attrs: BTreeMap<String, String>,
}

/// The most blocks one claim takes at once.
pub(crate) const MAX_BLOCKS_PER_CLAIM: usize = 4;

/// Blocks claimed for this node.
#[derive(Debug)]
pub(crate) struct Claim {
    /// The blocks as created (or as read, when another task of this node created one first), at least one.
    pub blocks: Vec<IPAMBlock>,
    /// The addresses assigned to the prefill's handle in the blocks' creation.
    pub prefilled: Vec<IpAddr>,
    /// Whether the node's pools of the family still had an unclaimed block beside these.
    pub room_left: bool,
}

/// Whether `pools` hold a block that is not in `existing`.
fn unclaimed(pools: &[(IpNet, u8)], existing: &std::collections::BTreeSet<String>) -> bool {
    pools.iter().any(|&(pool, prefix)| {
        blocks_of(pool, prefix)
            .map(block_name)
            .any(|n| !existing.contains(&n))
    })
}

impl Allocator {
    /// An allocator for `node`.
    pub fn new(client: Client, node: &str) -> Self {
        Self {
            client,
            node: node.to_owned(),
            serial: std::sync::Arc::default(),
        }
    }

    fn affinity(&self) -> String {
        format!("host:{}", self.node)
    }

    /// The pools this node may allocate from (enabled, node selector matching `node_labels`), per family.
    async fn pools(
        &self,
        v4: bool,
        node_labels: &BTreeMap<String, String>,
    ) -> Result<Vec<(IpNet, u8)>, AllocError> {
        Ok(self
            .usable_pools(node_labels)
            .await?
            .into_iter()
            .filter(|(net, _)| net.addr().is_ipv4() == v4)
            .collect())
    }

    /// The pools of both families this node may allocate from, with their block sizes.
    async fn usable_pools(
        &self,
        node_labels: &BTreeMap<String, String>,
    ) -> Result<Vec<(IpNet, u8)>, AllocError> {
        let pools = Api::<IPPool>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| AllocError::Api("listing IPPools", e))?;
        Ok(pools
            .into_iter()
            .filter(|p| p.spec.disabled != Some(true))
            .filter(|p| {
                p.spec
                    .node_selector
                    .as_ref()
                    .is_none_or(|s| s.parse().is_ok_and(|e| e.matches(node_labels)))
            })
            .map(|p| {
                let default = if p.spec.cidr.is_ipv4() { 26 } else { 122 };
                (
                    p.spec.cidr.0,
                    u8::try_from(p.spec.block_size.unwrap_or(default)).unwrap_or(default as u8),
                )
            })
            .collect())
    }

    /// Whether an enabled pool of each family (IPv4, IPv6) selects this node; one read.
    pub(crate) async fn served_families(
        &self,
        node_labels: &BTreeMap<String, String>,
    ) -> Result<[bool; 2], AllocError> {
        let pools = self.usable_pools(node_labels).await?;
        Ok([
            pools.iter().any(|(net, _)| net.addr().is_ipv4()),
            pools.iter().any(|(net, _)| net.addr().is_ipv6()),
        ])
    }

    /// One address for `handle`, from this node's blocks, claiming a new block when they are full.
    pub async fn assign(
        &self,
        handle: &str,
        attrs: BTreeMap<String, String>,
        v4: bool,
        node_labels: &BTreeMap<String, String>,
    ) -> Result<IpAddr, AllocError> {
        let _serial = self.serial.lock().await;
        let blocks: Api<IPAMBlock> = Api::all(self.client.clone());
        for _ in 0..MAX_CONFLICTS {
            // 1. A block of ours with room.
            let mine = blocks
                .list(&ListParams::default())
                .await
                .map_err(|e| AllocError::Api("listing IPAMBlocks", e))?;
            let mut conflicted = false;
            for obj in mine.into_iter().filter(|b| {
                b.spec.affinity.as_deref() == Some(&self.affinity()) && b.spec.cidr.is_ipv4() == v4
            }) {
                let mut block = Block::from_spec(&obj.spec)?;
                if block.free() == 0 {
                    continue;
                }
                let ip = block.assign(1, handle, attrs.clone())?[0];
                let mut updated = obj.clone();
                updated.spec = block.to_spec();
                match blocks
                    .replace(&obj.name_any(), &PostParams::default(), &updated)
                    .await
                {
                    Ok(_) => return Ok(ip),
                    Err(e) if conflict(&e) => {
                        conflicted = true;
                        break;
                    }
                    Err(e) => return Err(AllocError::Api("writing an IPAMBlock", e)),
                }
            }
            if conflicted {
                continue;
            }
            // 2. Claim a new block: whoever creates its IPAMBlock first owns it.
            match self.claim(v4, node_labels, 1, None).await? {
                Some(c) => self.confirm_affinities(&c.blocks).await?,
                None => {
                    return Err(AllocError::Exhausted {
                        node: self.node.clone(),
                    });
                }
            }
        }
        Err(AllocError::Contended(MAX_CONFLICTS))
    }

    /// Whether a usable pool of the family still has a block nobody has claimed (one list of blocks, one
    /// of pools).
    pub(crate) async fn has_room(
        &self,
        v4: bool,
        node_labels: &BTreeMap<String, String>,
    ) -> Result<bool, AllocError> {
        let existing = self.block_names().await?;
        let pools = self.pools(v4, node_labels).await?;
        Ok(unclaimed(&pools, &existing))
    }

    async fn block_names(&self) -> Result<std::collections::BTreeSet<String>, AllocError> {
        Ok(Api::<IPAMBlock>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| AllocError::Api("listing IPAMBlocks", e))?
            .iter()
            .map(ResourceExt::name_any)
            .collect())
    }

    /// Claims the first unclaimed blocks of the usable pools, as many as hold `addresses` (at least one,
    /// at most [`MAX_BLOCKS_PER_CLAIM`]), all at once: one list of blocks and one of pools together, then each
    /// block's creation and affinity side by side, so claiming three blocks during a burst costs the pods
    /// about what one costs. Returns the blocks as created (or as read, when another task of this node
    /// created one first) and whether another unclaimed block is left after them; None when no block
    /// could be claimed. With `prefill`, up to its count of the new blocks' addresses are assigned to its
    /// handle in the blocks' creation itself (no write after it), in block order.
    ///
    /// The creation decides the owner; the caller then records the claims with
    /// [`Allocator::confirm_affinities`], and may use the blocks before that: a crash between the two leaves
    /// blocks whose affinity field names this node, which it finds and uses as its own.
    pub(crate) async fn claim(
        &self,
        v4: bool,
        node_labels: &BTreeMap<String, String>,
        addresses: usize,
        prefill: Option<&Prefill>,
    ) -> Result<Option<Claim>, AllocError> {
        // The two reads side by side: a claim is on the path of waiting pods.
        let (mut taken, pools) =
            futures::future::try_join(self.block_names(), self.pools(v4, node_labels)).await?;
        let mut won = Vec::new();
        let mut reserved = Vec::new();
        loop {
            // The next unclaimed blocks, in pool order, until they hold enough addresses.
            let mut picked = Vec::new();
            let mut holds = 0usize;
            'pools: for &(pool, prefix) in &pools {
                for cidr in blocks_of(pool, prefix) {
                    if picked.len() + won.len() >= MAX_BLOCKS_PER_CLAIM
                        || (holds >= addresses && !picked.is_empty())
                    {
                        break 'pools;
                    }
                    let name = block_name(cidr);
                    if taken.contains(&name) {
                        continue;
                    }
                    holds += 1usize
                        .checked_shl(u32::from(cidr.max_prefix_len() - cidr.prefix_len()))
                        .unwrap_or(usize::MAX);
                    taken.insert(name.clone());
                    picked.push((cidr, name));
                }
            }
            if picked.is_empty() {
                break;
            }
            // What each new block is created holding.
            let mut left = prefill.map_or(0, |p| p.count);
            let mut filled = Vec::new();
            for (cidr, _) in &picked {
                let mut block = Block::new(*cidr, Some(self.affinity()));
                let mut ips = Vec::new();
                if let Some(p) = prefill.filter(|_| left > 0) {
                    let n = left.min(block.free());
                    ips = block.assign(n, &p.handle, p.attrs.clone())?;
                    left -= ips.len();
                }
                filled.push((block, ips));
            }
            let results = futures::future::join_all(
                picked
                    .iter()
                    .zip(filled)
                    .map(|((_, name), (block, ips))| self.claim_one(name, block, ips)),
            )
            .await;
            for r in results {
                if let Some((block, ips)) = r? {
                    won.push(block);
                    reserved.extend(ips);
                }
            }
            // Blocks lost to other nodes are passed over; try further ones only when every one was lost.
            if !won.is_empty() {
                break;
            }
        }
        if won.is_empty() {
            return Ok(None);
        }
        Ok(Some(Claim {
            blocks: won,
            prefilled: reserved,
            room_left: unclaimed(&pools, &taken),
        }))
    }

    /// Claims the block named `name` for this node by creating it as `block` (which may already hold
    /// `ips`). The block's creation decides who owns it (the API server lets one create win); the
    /// BlockAffinity, Calico's record of the claim, follows it already confirmed
    /// ([`Allocator::confirm_affinities`]): two writes, where a pending affinity first would take three while
    /// pods may be waiting. Returns the block and the
    /// addresses it was created holding (none when another task of this node created it first); None when
    /// another node owns it.
    async fn claim_one(
        &self,
        name: &str,
        block: Block,
        ips: Vec<IpAddr>,
    ) -> Result<Option<(IPAMBlock, Vec<IpAddr>)>, AllocError> {
        let blocks: Api<IPAMBlock> = Api::all(self.client.clone());
        let owned = match blocks
            .create(&PostParams::default(), &IPAMBlock::new(name, block.to_spec()))
            .await
        {
            Ok(created) => (created, ips),
            Err(e) if conflict(&e) => {
                // Someone created the block first. If it was this node (another task), it is ours.
                let current = blocks
                    .get_opt(name)
                    .await
                    .map_err(|e| AllocError::Api("reading an IPAMBlock", e))?;
                match current {
                    Some(b) if b.spec.affinity.as_deref() == Some(&self.affinity()) => (b, Vec::new()),
                    _ => return Ok(None),
                }
            }
            Err(e) => return Err(AllocError::Api("creating an IPAMBlock", e)),
        };
        Ok(Some(owned))
    }

    /// Records the claims of `blocks` as confirmed BlockAffinities, side by side (see [`Allocator::claim`]).
    pub(crate) async fn confirm_affinities(&self, blocks: &[IPAMBlock]) -> Result<(), AllocError> {
        futures::future::try_join_all(
            blocks.iter().map(|b| {
                self.confirm_affinity(b.spec.cidr.0, b.metadata.name.as_deref().unwrap_or_default())
            }),
        )
        .await
        .map(drop)
    }

    /// Records this node's claim of block `name` as a confirmed BlockAffinity (one left pending or absent
    /// by an earlier attempt is confirmed now).
    async fn confirm_affinity(&self, cidr: IpNet, name: &str) -> Result<(), AllocError> {
        let affinities: Api<BlockAffinity> = Api::all(self.client.clone());
        let aff_name = format!("{}-{name}", self.node);
        let mut aff = BlockAffinity::new(
            &aff_name,
            BlockAffinitySpec {
                state: AffinityState::Confirmed,
                node: self.node.clone(),
                cidr: caracal_crds::schema::Cidr(cidr),
                deleted: false,
            },
        );
        aff.metadata.labels = Some(BTreeMap::from([(
            "caracal.dev/node".to_owned(),
            self.node.clone(),
        )]));
        match affinities.create(&PostParams::default(), &aff).await {
            Ok(_) => Ok(()),
            Err(e) if conflict(&e) => {
                let Some(mut current) = affinities
                    .get_opt(&aff_name)
                    .await
                    .map_err(|e| AllocError::Api("reading a BlockAffinity", e))?
                else {
                    return Ok(());
                };
                if current.spec.state == AffinityState::Confirmed {
                    return Ok(());
                }
                current.spec.state = AffinityState::Confirmed;
                match affinities
                    .replace(&aff_name, &PostParams::default(), &current)
                    .await
                {
                    // A sibling task confirmed it first, or it is being recreated: either way the block is ours.
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
                    Err(e) => Err(AllocError::Api("confirming a BlockAffinity", e)),
                }
            }
            Err(e) => Err(AllocError::Api("creating a BlockAffinity", e)),
        }
    }

    /// Releases `ip` wherever it is held (idempotent).
    pub async fn release(&self, ip: IpAddr) -> Result<bool, AllocError> {
        let _serial = self.serial.lock().await;
        let blocks: Api<IPAMBlock> = Api::all(self.client.clone());
        for _ in 0..MAX_CONFLICTS {
            let all = blocks
                .list(&ListParams::default())
                .await
                .map_err(|e| AllocError::Api("listing IPAMBlocks", e))?;
            let Some(obj) = all.into_iter().find(|b| b.spec.cidr.0.contains(&ip)) else {
                return Ok(false);
            };
            let mut block = Block::from_spec(&obj.spec)?;
            if !block.release(ip)? {
                return Ok(false);
            }
            let mut updated = obj.clone();
            updated.spec = block.to_spec();
            match blocks
                .replace(&obj.name_any(), &PostParams::default(), &updated)
                .await
            {
                Ok(_) => return Ok(true),
                Err(e) if conflict(&e) => continue,
                Err(e) => return Err(AllocError::Api("writing an IPAMBlock", e)),
            }
        }
        Err(AllocError::Contended(MAX_CONFLICTS))
    }
}
