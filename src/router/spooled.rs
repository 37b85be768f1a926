//! The durable part of a target queue: its spool, and the copies of what it spools that go to
//! the origin brokers (see [`crate::park`]).

use std::sync::{Arc, Mutex};

use tracing::warn;

use super::Outbound;
use super::queue::QueueInner;
use crate::message::AckShare;
use crate::metrics::{self, LinkStats, inc};
use crate::park::{Copies, Park, ParkItem, Parker};
use crate::spool::{self, Decoded, Spool};

/// A park record on its way to its origin's lane.
#[derive(Debug)]
pub(super) struct ParkSend {
    pub(super) origin: Arc<str>,
    pub(super) item: ParkItem,
}

/// The durable part of a target queue.
#[derive(Debug)]
pub(super) struct Spooled {
    pub(super) spool: Arc<Spool>,
    pub(super) target: Arc<spool::Target>,
    /// Copies on the origin brokers (see [`crate::park`]): the parker and this target's name.
    pub(super) park: Option<(Arc<Parker>, Arc<str>)>,
    /// Origins that have copies of what this spool holds.
    pub(super) copies: Copies,
    /// Held while park records are handed over, so that they reach each origin in order.
    pub(super) sending: Mutex<()>,
    /// The target's counters.
    pub(super) stats: Arc<LinkStats>,
}

impl Spooled {
    /// Writes `item` under `key`; `share` completes once it is on disk or, with parking, once
    /// its origin broker has the copy: then the copy to send is returned (the caller queues it
    /// in its outbox; it is sent once the queue's lock is released, as sending takes the
    /// origin queue's lock).
    pub(super) fn write(
        &self,
        key: u64,
        item: &Outbound,
        share: Option<AckShare>,
    ) -> Option<ParkSend> {
        let record = spool::encode(&item.origin, &item.msg);
        match (&self.park, share) {
            (Some((parker, name)), Some(share)) if parker.takes_copy(&item.origin) => {
                let park = Park::Copy {
                    target: name.clone(),
                    spool_id: parker.spool_id,
                    key,
                    record: Arc::new(record.clone()),
                };
                self.spool.append(&self.target, key, record, None);
                Some(ParkSend {
                    origin: item.origin.clone(),
                    item: ParkItem {
                        park,
                        share: Some(share),
                    },
                })
            }
            (park, share) => {
                if park.is_some() && share.is_some() {
                    metrics::park_skipped(&self.stats, &item.origin);
                }
                self.spool.append(&self.target, key, record, share);
                None
            }
        }
    }

    /// Whether nothing waits in the spool: nothing on disk, on its way, or held back for room
    /// (call under the queue's lock).
    pub(super) fn is_empty(&self, inner: &QueueInner) -> bool {
        self.target.is_empty() && inner.blocked.is_empty()
    }

    /// Spools `item` behind everything spooled so far (call under the queue's lock, so keys
    /// reach the writer in order).
    pub(super) fn append_back(&self, inner: &mut QueueInner, mut item: Outbound) {
        let key = inner.next_key;
        inner.next_key += 1;
        let share = item.share.take();
        if let Some(p) = self.write(key, &item, share) {
            inner.outbox.push(p);
        }
    }

    /// Spools `items` (oldest first) in front of everything spooled so far.
    pub(super) fn prepend(&self, inner: &mut QueueInner, items: Vec<Outbound>) {
        inner.front_key -= items.len() as u64;
        let start = inner.front_key;
        for (key, mut item) in (start..).zip(items) {
            let share = item.share.take();
            if let Some(p) = self.write(key, &item, share) {
                inner.outbox.push(p);
            }
        }
    }
    /// Reads up to `want` rows from `cursor` (`None`: from the first) into `out`, as messages
    /// for the target with their key; expired and unreadable rows are deleted (counted).
    /// Returns the last key read, if any.
    pub(super) fn read(
        &self,
        cursor: Option<u64>,
        want: usize,
        out: &mut Vec<Outbound>,
    ) -> Option<u64> {
        let rows = match self.spool.read(&self.target, cursor, want) {
            Ok(rows) => rows,
            Err(e) => {
                // A failing spool is reported once by its writer, not on every read.
                if !self.spool.is_failing() {
                    warn!(error = %e, "spool read failed; retrying later");
                }
                return None;
            }
        };
        let last = rows.last().map(|r| r.0)?;
        for (key, value) in rows {
            match spool::decode(&value) {
                Ok(Decoded::Message(origin, msg)) => out.push(Outbound {
                    msg: Arc::new(msg),
                    share: None,
                    origin,
                    key: Some(key),
                    probe: false,
                }),
                Ok(Decoded::Expired(msg)) => {
                    metrics::message_rejected(
                        &self.stats,
                        &msg.topic,
                        "message expiry interval ran out in the spool",
                    );
                    self.spool.delete(&self.target, key);
                }
                Err(e) => {
                    inc(&self.stats.rejected);
                    warn!(key, error = %e, "unreadable spool record skipped");
                    self.spool.delete(&self.target, key);
                }
            }
        }
        Some(last)
    }
}

/// Bytes a message takes in the spool, close enough for the byte bound.
pub(super) fn record_size(item: &Outbound) -> u64 {
    (32 + item.origin.len() + item.msg.topic.len() + item.msg.payload.len()) as u64
}
