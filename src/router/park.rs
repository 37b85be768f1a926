//! Copies of spooled messages kept on the brokers, so that nothing acknowledged to an origin
//! lives on one bridge host only (docs/HA.md, "Parking").
//!
//! When a message for target T is spooled (T down, or too slow), its spool record is also
//! published to its *origin* broker X under `$meshbridge/<id>/park/<T>`, where a persistent
//! park session `<id>-X~park-T` (created by X's owner before it consumes X) queues it; the
//! origin is acknowledged once X acknowledged the copy, not when the local disk has it. The
//! local spool still delivers the message; the copy is for whoever owns X after this host is
//! gone: it drains the park session into T ([`crate::link::park`]). Once T's spool is empty
//! again, a marker published behind the copies lets X's owner discard them; while it is not,
//! markers every few seconds let X's owner discard those already delivered from the spool.
//!
//! A copy travels through a lane of X's queue, in order behind what was copied before, and is
//! published by X's copy publisher on a connection of its own
//! ([`crate::link::park::publish_copies`]); never into X's spool: it is meant for the broker X,
//! not for the target X.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use bytes::{Buf, BufMut};

use super::{Outbound, Router};
use crate::message::{AckShare, Message};

/// What an [`Outbound`] is when it is a park record rather than a message for its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Park {
    /// A copy of the spool record `record` stored under `key` in target `target`'s spool of the
    /// spool `spool_id`.
    Copy {
        /// The target the message waits for.
        target: Arc<str>,
        /// The spool that holds it (see [`Parker::spool_id`]).
        spool_id: u64,
        /// Its key there.
        key: u64,
        /// The spool record, byte for byte.
        record: Arc<Vec<u8>>,
    },
    /// Everything parked for `target` before this marker is delivered: the copies may go.
    Marker {
        /// The target.
        target: Arc<str>,
        /// Tells this marker from others.
        nonce: u64,
    },
}

const COPY: u8 = b'C';
const MARKER: u8 = b'M';

impl Park {
    /// The target the record is about.
    pub(crate) fn target(&self) -> &Arc<str> {
        match self {
            Park::Copy { target, .. } | Park::Marker { target, .. } => target,
        }
    }

    /// The payload of the park publish.
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Park::Copy {
                spool_id,
                key,
                record,
                ..
            } => {
                let mut b = Vec::with_capacity(17 + record.len());
                b.put_u8(COPY);
                b.put_u64(*spool_id);
                b.put_u64(*key);
                b.extend_from_slice(record);
                b
            }
            Park::Marker { nonce, .. } => {
                let mut b = Vec::with_capacity(9);
                b.put_u8(MARKER);
                b.put_u64(*nonce);
                b
            }
        }
    }

    /// Reads a park payload for `target`; `None` when it is not one.
    pub(crate) fn decode(target: &Arc<str>, mut b: &[u8]) -> Option<Park> {
        if b.is_empty() {
            return None;
        }
        match b.get_u8() {
            COPY if b.len() >= 16 => {
                let spool_id = b.get_u64();
                let key = b.get_u64();
                Some(Park::Copy {
                    target: target.clone(),
                    spool_id,
                    key,
                    record: Arc::new(b.to_vec()),
                })
            }
            MARKER if b.len() == 8 => Some(Park::Marker {
                target: target.clone(),
                nonce: b.get_u64(),
            }),
            _ => None,
        }
    }
}

/// The message a park record travels as: empty, shared (the record carries everything; a copy
/// does not keep its message's payload alive).
pub(crate) fn carrier() -> Arc<Message> {
    static CARRIER: std::sync::OnceLock<Arc<Message>> = std::sync::OnceLock::new();
    CARRIER
        .get_or_init(|| {
            Arc::new(Message {
                topic: bytes::Bytes::from_static(b"$meshbridge park record"),
                payload: bytes::Bytes::new(),
                qos: 1,
                retain: false,
                properties: None,
            })
        })
        .clone()
}

/// Hands copies and markers to the origin's queue. One per process.
#[derive(Debug)]
pub(crate) struct Parker {
    router: Weak<Router>,
    /// Identifies this process's spool file across restarts (`data_dir/spool.id`): a copy of a
    /// row this spool still holds is not delivered a second time from the park.
    pub(crate) spool_id: u64,
}

impl Parker {
    /// Whether `origin` takes another copy (see [`super::TargetQueue::takes_park`]); when not
    /// (its copy connection down for long), a spooled message is acknowledged once on disk, as
    /// with one process (counted, `meshbridge_park_skipped_total`): memory stays bounded.
    pub(crate) fn takes_copy(&self, origin: &str) -> bool {
        self.router
            .upgrade()
            .and_then(|r| r.queue(origin))
            .is_some_and(|q| q.takes_park())
    }

    /// A parker for the queues of `router`.
    pub(crate) fn new(router: &Arc<Router>, spool_id: u64) -> Self {
        Self {
            router: Arc::downgrade(router),
            spool_id,
        }
    }

    /// Sends `park` for `msg` to `origin`'s broker with `share` (completed when the broker
    /// acknowledged it). When `origin` is not connected the share completes at once: the
    /// message is in the local spool only (the origin cannot be acknowledged before it is back
    /// anyway, and then delivers it again).
    pub(crate) fn send(
        &self,
        origin: &Arc<str>,
        park: Park,
        msg: Arc<Message>,
        share: Option<AckShare>,
    ) -> bool {
        let item = Outbound {
            msg,
            share,
            origin: origin.clone(),
            key: None,
            park: Some(Box::new(park)),
            probe: false,
        };
        let pushed = match self.router.upgrade().and_then(|r| r.queue(origin)) {
            Some(q) => q.push_park(item),
            None => Err(item),
        };
        pushed.map_err(|mut item| item.complete()).is_ok()
    }
}

/// Which origins hold copies of what a target's spool holds (since it was last empty).
#[derive(Debug, Default)]
pub(crate) struct Copies(Mutex<HashSet<Arc<str>>>);

impl Copies {
    /// A copy from `origin` was sent.
    pub(crate) fn note(&self, origin: &Arc<str>) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !set.contains(origin) {
            set.insert(origin.clone());
        }
    }

    /// The origins a marker goes to now: every origin with copies. With the spool empty they
    /// are all delivered and forgotten here. Otherwise the trim behind the marker discards
    /// those already delivered, up to the first still spooled: a spool that never quite
    /// empties (a target stalling again and again, a long backlog) does not leave every copy
    /// of what it delivered parked for the next owner to deliver again.
    pub(crate) fn due_markers(&self, spool_empty: bool) -> Vec<Arc<str>> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if spool_empty {
            set.drain().collect()
        } else {
            set.iter().cloned().collect()
        }
    }

    /// Whether any origin holds copies.
    pub(crate) fn any(&self) -> bool {
        !self.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// A spool's id, read from `dir/spool.id` or created there.
pub(crate) fn spool_id(dir: &std::path::Path) -> u64 {
    let path = dir.join("spool.id");
    if let Some(id) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| u64::from_str_radix(t.trim(), 16).ok())
    {
        return id;
    }
    let id: u64 = rand::random();
    if let Err(e) = crate::files::write(&path, format!("{id:016x}\n").as_bytes(), true) {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the spool id; a restart may deliver parked copies twice");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_go_to_every_origin_with_copies_until_the_spool_is_empty() {
        let copies = Copies::default();
        let (b1, b2): (Arc<str>, Arc<str>) = ("b1".into(), "b2".into());
        assert!(!copies.any());
        assert!(copies.due_markers(false).is_empty());
        copies.note(&b1);
        copies.note(&b2);
        copies.note(&b2);
        for _ in 0..2 {
            let mut due = copies.due_markers(false);
            due.sort();
            assert_eq!(due, vec![b1.clone(), b2.clone()], "still parked");
        }
        assert!(copies.any());
        let mut last = copies.due_markers(true);
        last.sort();
        assert_eq!(last, vec![b1, b2], "an empty spool: every origin, once");
        assert!(!copies.any());
        assert!(copies.due_markers(true).is_empty());
    }

    #[test]
    fn park_records_read_back() {
        let t: Arc<str> = "b3".into();
        let copy = Park::Copy {
            target: t.clone(),
            spool_id: 7,
            key: 42,
            record: Arc::new(b"record bytes".to_vec()),
        };
        assert_eq!(Park::decode(&t, &copy.encode()), Some(copy));
        let marker = Park::Marker {
            target: t.clone(),
            nonce: 9,
        };
        assert_eq!(Park::decode(&t, &marker.encode()), Some(marker));
        assert_eq!(Park::decode(&t, b""), None);
        assert_eq!(Park::decode(&t, b"C123"), None, "cut short");
        assert_eq!(Park::decode(&t, b"X12345678"), None);
    }
}
