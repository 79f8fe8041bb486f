//! Typha's state: a snapshot of every object plus a bounded log of recent deltas, each delta encoded once.
//! A client joining gets the snapshot (as frames) and then the deltas after it; a client that falls further
//! behind than the log reaches is told to resync from a fresh snapshot.

use std::collections::{BTreeMap, VecDeque};

use caracal_datastore::Update;
use caracal_datastore::typha::protocol::{Frame, ServerMsg};

/// Where a client must restart from.
#[derive(Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// These frames bring it up to date.
    Frames(Vec<Frame>),
    /// It is too far behind: drop it; it reconnects and takes a snapshot.
    Resync,
}

/// The snapshot plus delta log.
#[derive(Debug)]
pub struct UpdateLog {
    objects: BTreeMap<(String, String), serde_json::Value>,
    deltas: VecDeque<(u64, Frame)>,
    retain: usize,
    seq: u64,
}

impl UpdateLog {
    /// A log keeping the last `retain` deltas.
    pub fn new(retain: usize) -> Self {
        Self {
            objects: BTreeMap::new(),
            deltas: VecDeque::new(),
            retain,
            seq: 0,
        }
    }

    /// The position of the newest update.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Objects in the snapshot.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// True when the snapshot is empty.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Records an upsert or delete; returns its frame (encoded once, for every connected client).
    pub fn push(&mut self, update: Update) -> Option<Frame> {
        match &update {
            Update::Upsert { kind, key, object } => {
                self.objects.insert((kind.clone(), key.clone()), object.clone());
            }
            Update::Delete { kind, key } => {
                self.objects.remove(&(kind.clone(), key.clone()));
            }
            // Resync bookkeeping belongs to the upstream watch, not to clients.
            Update::Resync { .. } | Update::InSync { .. } => return None,
        }
        self.seq += 1;
        let frame = Frame::encode(&ServerMsg::Update {
            seq: self.seq,
            update,
        });
        self.deltas.push_back((self.seq, frame.clone()));
        while self.deltas.len() > self.retain {
            self.deltas.pop_front();
        }
        Some(frame)
    }

    /// The snapshot as frames, then `InSync`.
    pub fn snapshot(&self) -> Vec<Frame> {
        let mut out: Vec<Frame> = self
            .objects
            .iter()
            .map(|((kind, key), object)| {
                Frame::encode(&ServerMsg::Update {
                    seq: self.seq,
                    update: Update::Upsert {
                        kind: kind.clone(),
                        key: key.clone(),
                        object: object.clone(),
                    },
                })
            })
            .collect();
        out.push(Frame::encode(&ServerMsg::InSync { seq: self.seq }));
        out
    }

    /// The deltas after `seq`, or Resync when the log no longer reaches back that far.
    pub fn since(&self, seq: u64) -> CatchUp {
        if seq == self.seq {
            return CatchUp::Frames(Vec::new());
        }
        match self.deltas.front() {
            Some((first, _)) if *first <= seq + 1 => CatchUp::Frames(
                self.deltas
                    .iter()
                    .filter(|(s, _)| *s > seq)
                    .map(|(_, f)| f.clone())
                    .collect(),
            ),
            _ => CatchUp::Resync,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use caracal_datastore::Cache;

    fn up(key: &str, v: i64) -> Update {
        Update::Upsert {
            kind: "v1/Namespace".into(),
            key: key.into(),
            object: json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": key, "labels": {"v": v.to_string()}}}),
        }
    }

    /// Feeds frames into a client cache the way the client does.
    fn apply(cache: &mut Cache, frames: &[Frame]) {
        for f in frames {
            let msg: ServerMsg = serde_json::from_slice(&f.0[4..]).unwrap();
            if let ServerMsg::Update { update, .. } = msg {
                cache.apply(update);
            }
        }
    }

    #[test]
    fn a_late_client_gets_the_snapshot_then_exactly_the_missing_deltas() {
        let mut log = UpdateLog::new(100);
        log.push(up("a", 1));
        log.push(up("b", 1));
        let mut client = Cache::default();
        apply(&mut client, &log.snapshot());
        let at = log.seq();
        log.push(up("a", 2));
        log.push(Update::Delete {
            kind: "v1/Namespace".into(),
            key: "b".into(),
        });
        let CatchUp::Frames(frames) = log.since(at) else {
            panic!("within the log")
        };
        assert_eq!(frames.len(), 2);
        apply(&mut client, &frames);
        let mut fresh = Cache::default();
        apply(&mut fresh, &log.snapshot());
        assert_eq!(
            client.documents(),
            fresh.documents(),
            "catching up equals a fresh snapshot"
        );
        assert_eq!(log.since(log.seq()), CatchUp::Frames(vec![]));
    }

    #[test]
    fn a_client_behind_the_retained_log_must_resync() {
        let mut log = UpdateLog::new(3);
        for i in 0..10 {
            log.push(up("a", i));
        }
        assert_eq!(log.since(2), CatchUp::Resync);
        assert!(matches!(log.since(7), CatchUp::Frames(f) if f.len() == 3));
    }

    #[test]
    fn each_update_is_encoded_once_and_shared() {
        let mut log = UpdateLog::new(10);
        let frame = log.push(up("a", 1)).unwrap();
        let CatchUp::Frames(again) = log.since(0) else {
            panic!()
        };
        assert!(
            Arc::ptr_eq(&frame.0, &again[0].0),
            "the same bytes go to every client"
        );
    }
}
