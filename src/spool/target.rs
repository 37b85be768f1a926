//! One target's spool: the name of its table, its counters (committed, on their way to disk,
//! deletions pending) and the rows held in memory while the disk refuses writes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::TableDefinition;

use super::{Found, Health, MIDDLE};
use crate::doorbell::Doorbell;
use crate::metrics::LinkStats;

/// One target's spool: its table and counters.
#[derive(Debug)]
pub(crate) struct Target {
    pub(super) table: String,
    /// Rows committed.
    pub(super) stored_rows: AtomicU64,
    pub(super) stored_bytes: AtomicU64,
    /// Rows sent to the writer and not yet committed.
    pub(super) pending_rows: AtomicU64,
    pub(super) pending_bytes: AtomicU64,
    /// Deletions sent to the writer and not yet committed.
    pub(super) pending_deletes: AtomicU64,
    /// Lowest and highest key found at start.
    pub(super) first_key: u64,
    pub(super) last_key: u64,
    pub(super) notify: Arc<Doorbell>,
    pub(super) stats: Arc<LinkStats>,
    /// Rows a failed write could not put on disk, by key: readable like committed rows and
    /// counted in `pending_rows` until the writer gets them onto disk.
    pub(super) held: Mutex<BTreeMap<u64, Vec<u8>>>,
    pub(super) held_rows: AtomicU64,
}

impl Target {
    /// The counters of `table` as found when the spool was opened, nothing pending.
    pub(super) fn new(
        table: String,
        found: Found,
        notify: Arc<Doorbell>,
        stats: Arc<LinkStats>,
    ) -> Arc<Self> {
        Arc::new(Target {
            table,
            stored_rows: AtomicU64::new(found.rows),
            stored_bytes: AtomicU64::new(found.bytes),
            pending_rows: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            pending_deletes: AtomicU64::new(0),
            first_key: found.first,
            last_key: found.last,
            notify,
            stats,
            held: Mutex::new(BTreeMap::new()),
            held_rows: AtomicU64::new(0),
        })
    }

    /// Messages spooled, committed or on their way to disk.
    pub(crate) fn len(&self) -> u64 {
        // Writer order: stored is raised before pending is lowered, so the sum never dips.
        self.pending_rows.load(Ordering::Acquire) + self.stored_rows.load(Ordering::Acquire)
    }

    /// True when nothing is spooled.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes spooled, committed or on their way to disk.
    pub(crate) fn bytes(&self) -> u64 {
        self.pending_bytes.load(Ordering::Acquire) + self.stored_bytes.load(Ordering::Acquire)
    }

    /// Rows readable now: committed, or held in memory while the disk refuses writes.
    pub(crate) fn committed(&self) -> u64 {
        self.stored_rows.load(Ordering::Acquire) + self.held_rows.load(Ordering::Acquire)
    }

    pub(super) fn lock_held(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Vec<u8>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `value` under `key` in memory (its write failed); false if `key` was held already.
    pub(super) fn hold(&self, key: u64, value: Vec<u8>, health: &Health) -> bool {
        let len = value.len() as u64;
        if self.lock_held().insert(key, value).is_some() {
            return false;
        }
        self.held_rows.fetch_add(1, Ordering::AcqRel);
        health.held_rows.fetch_add(1, Ordering::AcqRel);
        health.held_bytes.fetch_add(len, Ordering::AcqRel);
        true
    }

    /// Forgets the held row `key` (written, delivered or dropped); its length if it was held.
    /// `pending` also lowers the pending counters (the row is gone, not on disk).
    pub(super) fn unhold(&self, key: u64, health: &Health, pending: bool) -> Option<u64> {
        let value = self.lock_held().remove(&key)?;
        let len = value.len() as u64;
        self.held_rows.fetch_sub(1, Ordering::AcqRel);
        health.held_rows.fetch_sub(1, Ordering::AcqRel);
        health.held_bytes.fetch_sub(len, Ordering::AcqRel);
        if pending {
            self.pending_rows.fetch_sub(1, Ordering::AcqRel);
            self.pending_bytes.fetch_sub(len, Ordering::AcqRel);
        }
        Some(len)
    }

    /// Deletions on their way to disk: rows already delivered that are still readable.
    pub(crate) fn deletes_pending(&self) -> u64 {
        self.pending_deletes.load(Ordering::Acquire)
    }

    /// Key range found when the spool was opened: `(first, next)`.
    pub(crate) fn key_range(&self) -> (u64, u64) {
        if self.first_key > self.last_key {
            (MIDDLE, MIDDLE)
        } else {
            (self.first_key, self.last_key + 1)
        }
    }

    pub(super) fn def(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.table)
    }
}
