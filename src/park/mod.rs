//! Parking: copies of spooled messages kept on the brokers, so that nothing acknowledged to an origin
//! lives on one bridge host only (docs/HA.md, "Parking").
//!
//! When a message for target T is spooled (T down, or too slow), its spool record is also
//! published to its *origin* broker X under `$meshbridge/<id>/park/<T>`, where a persistent
//! park session `<id>-X~park-T` (created by X's owner before it consumes X) queues it; the
//! origin is acknowledged once X acknowledged the copy, not when the local disk has it. The
//! local spool still delivers the message; the copy is for whoever owns X after this host is
//! gone: it drains the park session into T ([`io`]). Once T's spool is empty
//! again, a marker published behind the copies lets X's owner discard them; while it is not,
//! markers every few seconds let X's owner discard those already delivered from the spool.
//!
//! A copy travels through X's [`CopyLane`] (not X's target queue: it is meant for the broker X,
//! not for the target X), in order behind what was copied before, and is published by X's copy
//! publisher on a connection of its own ([`io::publish_copies`]).
//!
//! Two halves, as [`crate::reconcile`] has: the data half below [`crate::router`] (this file:
//! the records; [`lane`]: the lanes, the parker that fills them and which origins hold copies;
//! [`drains`]: which park sessions an owner has read), and the I/O half beside
//! [`crate::link`] ([`io`]: the park sessions and the copy publisher).

pub(crate) mod drains;
pub(crate) mod io;
pub(crate) mod lane;

use std::sync::Arc;

use bytes::{Buf, BufMut};

use crate::message::AckShare;

pub(crate) use lane::{Copies, CopyLane, Parker};

/// A park record: what a park session holds.
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

/// A park record on its way to its origin broker, with the share of the origin's
/// acknowledgement that waits for the broker to hold it (a copy; a marker has none).
#[derive(Debug)]
pub(crate) struct ParkItem {
    /// The record.
    pub(crate) park: Park,
    /// Completed once the origin broker acknowledged the record (or refused it).
    pub(crate) share: Option<AckShare>,
}

impl ParkItem {
    /// Completes the share, if any.
    pub(crate) fn complete(&mut self) {
        if let Some(share) = self.share.take() {
            share.complete();
        }
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
