//! The spool's writer thread: every write goes through it, committed in batches with one
//! fsync each, and the shares of what a batch wrote complete after its commit. A failed
//! transaction's rows are held in memory (see the module above) and written first once the
//! database works again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use redb::{Database, Durability, ReadableTableMetadata, TableDefinition};
use tracing::{error, info, warn};

use super::{
    Health, Limits, MAX_BATCH, MAX_BATCH_BYTES, MAX_HELD_BYTES, MAX_UNWRITTEN, Op, Overflow,
    REOPEN_EVERY, Store, StoreError, TABLE_PREFIX, Target,
};

/// What one committed batch changed for one target.
#[derive(Default)]
struct Delta {
    added_rows: u64,
    added_bytes: u64,
    removed_rows: u64,
    removed_bytes: u64,
    dropped: u64,
    discarded: bool,
}

/// Bytes handed to the writer and not yet committed; `take` waits above [`MAX_UNWRITTEN`].
#[derive(Default)]
pub(super) struct Budget {
    bytes: Mutex<u64>,
    freed: std::sync::Condvar,
}

impl Budget {
    pub(super) fn take(&self, n: u64) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        while *bytes > 0 && *bytes + n > MAX_UNWRITTEN {
            bytes = self.freed.wait(bytes).unwrap_or_else(|p| p.into_inner());
        }
        *bytes += n;
    }

    fn give(&self, n: u64) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        *bytes = bytes.saturating_sub(n);
        self.freed.notify_all();
    }
}

pub(super) fn writer(store: &Store, rx: mpsc::Receiver<Op>, limits: Limits, unwritten: &Budget) {
    let mut w = Writer {
        store,
        limits,
        batch: Vec::new(),
        retry: Vec::new(),
        holding: HashMap::new(),
        next_attempt: Instant::now(),
    };
    loop {
        let failing = store.health.error().is_some();
        let Some(batch_bytes) = w.gather(&rx, failing) else {
            break;
        };
        w.skip_held();
        let result = w.write(failing);
        w.report(&result, failing);
        w.settle(&result);
        unwritten.give(batch_bytes);
    }
    let held = store.health.held_rows.load(Ordering::Acquire);
    if held > 0 {
        error!(
            messages = held,
            "spool closed while the disk refused writes: messages held in memory are lost"
        );
    }
}

/// The writer thread's state between batches.
struct Writer<'a> {
    store: &'a Store,
    limits: Limits,
    batch: Vec<Op>,
    /// While the disk refuses writes: deletions and discards to do again.
    retry: Vec<Op>,
    /// The targets that hold rows in memory.
    holding: HashMap<String, Arc<Target>>,
    /// When to open the database again.
    next_attempt: Instant,
}

impl Writer<'_> {
    /// Waits for the next operations (while failing, at most until the next attempt) and
    /// takes what else is ready, up to a batch; their bytes, or `None` once every sender is
    /// gone.
    fn gather(&mut self, rx: &mpsc::Receiver<Op>, failing: bool) -> Option<u64> {
        let first = if failing {
            match rx.recv_timeout(REOPEN_EVERY) {
                Ok(op) => Some(op),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        } else {
            Some(rx.recv().ok()?)
        };
        let mut batch_bytes = 0;
        if let Some(op) = first {
            batch_bytes += op.bytes();
            self.batch.push(op);
        }
        while self.batch.len() < MAX_BATCH && batch_bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(op) => {
                    batch_bytes += op.bytes();
                    self.batch.push(op);
                }
                Err(_) => break,
            }
        }
        Some(batch_bytes)
    }

    /// A deletion or discard of rows held in memory needs no disk: done here.
    fn skip_held(&mut self) {
        let health = &self.store.health;
        self.batch.retain(|op| match op {
            Op::Delete { target, key } => {
                if target.unhold(*key, health, true).is_some() {
                    target.pending_deletes.fetch_sub(1, Ordering::AcqRel);
                    return false;
                }
                true
            }
            Op::Discard { target } => {
                let keys: Vec<u64> = target.lock_held().keys().copied().collect();
                for key in keys {
                    target.unhold(key, health, true);
                }
                true
            }
            _ => true,
        });
    }

    /// Writes the batch (while failing, once the database opens again, behind the rows held
    /// and the deletions left over: a target's order is kept).
    fn write(&mut self, failing: bool) -> Result<Deltas, StoreError> {
        let store = self.store;
        if failing && Instant::now() < self.next_attempt {
            return Err(StoreError::StillFailing(
                store.health.error().unwrap_or_default(),
            ));
        }
        let reopened = if failing {
            self.next_attempt = Instant::now() + REOPEN_EVERY;
            store.reopen()
        } else {
            Ok(())
        };
        let mut ops: Vec<Op> = Vec::new();
        if failing && reopened.is_ok() {
            for target in self.holding.values() {
                for (key, value) in target.lock_held().iter() {
                    ops.push(Op::Unhold {
                        target: target.clone(),
                        key: *key,
                        value: value.clone(),
                    });
                }
            }
            ops.append(&mut self.retry);
        }
        ops.append(&mut self.batch);
        self.batch = ops;
        match (reopened, store.db()) {
            (Ok(()), Some(db)) => apply(&db, &self.batch, self.limits),
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(StoreError::Reopening),
        }
    }

    /// Reports the batch's outcome: the disk back, rows dropped by the limits, a failure.
    fn report(&mut self, result: &Result<Deltas, StoreError>, failing: bool) {
        let store = self.store;
        let limits = self.limits;
        match result {
            Ok(deltas) => {
                if failing {
                    let held = store.health.held_rows.load(Ordering::Acquire);
                    info!(
                        held_written = self
                            .batch
                            .iter()
                            .filter(|op| matches!(op, Op::Unhold { .. }))
                            .count(),
                        still_held = held,
                        "spool writable again"
                    );
                    store.health.set_error(None);
                    self.holding.clear();
                }
                // Counters first: a barrier waiter (`sync`) then sees them up to date.
                for (target, d) in deltas.values() {
                    if d.dropped > 0 {
                        let total = target
                            .stats
                            .dropped_overflow
                            .fetch_add(d.dropped, Ordering::Relaxed)
                            + d.dropped;
                        warn!(
                            target_broker = target.table.trim_start_matches(TABLE_PREFIX),
                            dropped = d.dropped,
                            dropped_total = total,
                            max_messages = limits.max_messages,
                            max_bytes = limits.max_bytes,
                            "spool full: oldest messages dropped (spool_overflow = \"drop_oldest\")"
                        );
                    }
                    target.notify.ring();
                }
            }
            Err(e) => {
                store.health.write_failures.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    error!(
                        error = %e,
                        held_up_to_bytes = MAX_HELD_BYTES,
                        "spool write failed: messages are held in memory and written once the disk takes them (the spool is opened again every second)"
                    );
                    self.next_attempt = Instant::now() + REOPEN_EVERY;
                }
                store.health.set_error(Some(e.to_string()));
            }
        }
    }

    /// Settles every operation of the batch by the outcome: shares complete, counters move,
    /// what the disk refused is held or kept to do again.
    fn settle(&mut self, result: &Result<Deltas, StoreError>) {
        let health = &self.store.health;
        // (The batch's allocation is kept for the next one.)
        let mut batch = std::mem::take(&mut self.batch);
        for op in batch.drain(..) {
            match op {
                Op::Append {
                    target,
                    key,
                    value,
                    share,
                } => {
                    let len = value.len() as u64;
                    match result {
                        Ok(_) => {
                            target.pending_rows.fetch_sub(1, Ordering::AcqRel);
                            target.pending_bytes.fetch_sub(len, Ordering::AcqRel);
                        }
                        Err(e) => {
                            // Held in memory, readable: the origin need not wait for the disk.
                            target.hold(key, value, health);
                            target.stats.set_error(format!("spool write failed: {e}"));
                            target.notify.ring();
                            self.holding.insert(target.table.clone(), target.clone());
                            drop_held_beyond_bound(&target, health);
                        }
                    }
                    if let Some(share) = share {
                        share.complete();
                    }
                }
                Op::DeadLetter { share, .. } => {
                    if let Err(e) = result {
                        error!(error = %e, "spool write failed: a dead letter was not kept");
                    }
                    if let Some(share) = share {
                        share.complete();
                    }
                }
                Op::Unhold { target, key, .. } => {
                    if result.is_ok() {
                        // On disk now (a deletion since would have removed it from memory).
                        if let Some(len) = target.unhold(key, health, false) {
                            target.pending_rows.fetch_sub(1, Ordering::AcqRel);
                            target.pending_bytes.fetch_sub(len, Ordering::AcqRel);
                        }
                    } else {
                        self.holding.insert(target.table.clone(), target);
                    }
                }
                Op::Barrier(tx) => {
                    let _ = tx.send(());
                }
                Op::Delete { target, key } => match result {
                    Ok(_) => {
                        target.pending_deletes.fetch_sub(1, Ordering::AcqRel);
                    }
                    Err(_) => self.retry.push(Op::Delete { target, key }),
                },
                Op::Discard { target } => {
                    if result.is_err() {
                        self.retry.push(Op::Discard { target });
                    }
                }
            }
        }
        self.batch = batch;
    }
}

/// Keeps the rows held in memory within [`MAX_HELD_BYTES`]: `target`'s oldest go first.
fn drop_held_beyond_bound(target: &Target, health: &Health) {
    while health.held_bytes.load(Ordering::Acquire) > MAX_HELD_BYTES {
        let Some(first) = target.lock_held().keys().next().copied() else {
            return;
        };
        target.unhold(first, health, true);
        let total = target
            .stats
            .dropped_spool_failed
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if crate::metrics::sampled(total, 1) {
            warn!(
                target_broker = target.table.trim_start_matches(TABLE_PREFIX),
                dropped_total = total,
                max_held_bytes = MAX_HELD_BYTES,
                "spool failing and memory for held messages full: oldest dropped"
            );
        }
    }
}

/// What one committed batch changed, per target table.
type Deltas = HashMap<String, (Arc<Target>, Delta)>;

/// Applies a batch in one transaction; on success applies what changed to the targets'
/// counters (stored counters are raised before the caller lowers the pending ones) and
/// returns it.
fn apply(db: &Database, batch: &[Op], limits: Limits) -> Result<Deltas, StoreError> {
    let mut deltas = Deltas::new();
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate);
    {
        let mut tables = HashMap::new();
        for op in batch {
            let target = match op {
                Op::Append { target, .. }
                | Op::Unhold { target, .. }
                | Op::Delete { target, .. }
                | Op::Discard { target } => target,
                Op::Barrier(_) => continue,
                Op::DeadLetter { key, value, .. } => {
                    let def: TableDefinition<'_, u64, &[u8]> =
                        TableDefinition::new(super::dead::TABLE);
                    let mut table = txn.open_table(def)?;
                    table.insert(*key, value.as_slice())?;
                    while table.len()? > super::dead::MAX_ROWS {
                        table.pop_first()?;
                    }
                    continue;
                }
            };
            let (_, delta) = deltas
                .entry(target.table.clone())
                .or_insert_with(|| (target.clone(), Delta::default()));
            if let Op::Discard { .. } = op {
                tables.remove(&target.table);
                txn.delete_table(target.def())?;
                *delta = Delta {
                    discarded: true,
                    ..Delta::default()
                };
                continue;
            }
            if !tables.contains_key(&target.table) {
                let t = txn.open_table(target.def())?;
                tables.insert(target.table.clone(), t);
            }
            let Some(table) = tables.get_mut(&target.table) else {
                continue;
            };
            match op {
                Op::Append { key, value, .. } | Op::Unhold { key, value, .. } => {
                    if let Some(old) = table.insert(*key, value.as_slice())? {
                        delta.removed_rows += 1;
                        delta.removed_bytes += old.value().len() as u64;
                    }
                    delta.added_rows += 1;
                    delta.added_bytes += value.len() as u64;
                    if limits.overflow == Overflow::DropOldest {
                        drop_oldest(table, target, delta, limits)?;
                    }
                }
                Op::Delete { key, .. } => {
                    if let Some(old) = table.remove(*key)? {
                        delta.removed_rows += 1;
                        delta.removed_bytes += old.value().len() as u64;
                    }
                }
                Op::Discard { .. } | Op::Barrier(_) | Op::DeadLetter { .. } => {}
            }
        }
    }
    txn.commit()?;
    count_stored(&deltas);
    Ok(deltas)
}

/// Drops `target`'s oldest rows from `table` while it holds more than the limits allow, with
/// what this transaction did so far (`delta`).
fn drop_oldest(
    table: &mut redb::Table<'_, u64, &[u8]>,
    target: &Target,
    delta: &mut Delta,
    limits: Limits,
) -> Result<(), StoreError> {
    let mut rows = (target.stored_rows.load(Ordering::Acquire) + delta.added_rows)
        .saturating_sub(delta.removed_rows);
    let mut bytes = (target.stored_bytes.load(Ordering::Acquire) + delta.added_bytes)
        .saturating_sub(delta.removed_bytes);
    while rows > limits.max_messages || (rows > 1 && bytes > limits.max_bytes) {
        let Some((_, v)) = table.pop_first()? else {
            break;
        };
        let len = v.value().len() as u64;
        delta.removed_rows += 1;
        delta.removed_bytes += len;
        delta.dropped += 1;
        rows -= 1;
        bytes = bytes.saturating_sub(len);
    }
    Ok(())
}

/// Moves the targets' stored counts by what a committed transaction did.
fn count_stored(deltas: &Deltas) {
    for (target, d) in deltas.values() {
        if d.discarded {
            target.stored_rows.store(d.added_rows, Ordering::Release);
            target.stored_bytes.store(d.added_bytes, Ordering::Release);
            continue;
        }
        target.stored_rows.fetch_add(d.added_rows, Ordering::AcqRel);
        target
            .stored_bytes
            .fetch_add(d.added_bytes, Ordering::AcqRel);
        target
            .stored_rows
            .fetch_sub(d.removed_rows, Ordering::AcqRel);
        target
            .stored_bytes
            .fetch_sub(d.removed_bytes, Ordering::AcqRel);
    }
}
