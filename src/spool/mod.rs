//! The durable per-target spool: where a target's messages wait while it is down or too slow,
//! so that its share of the origin's acknowledgement can be released without losing them.
//!
//! One [redb] file (`data_dir/spool.redb`), one table per target broker (`queue/<name>`), keyed
//! by a `u64` that orders the target's messages. Keys start in the middle of the range so that
//! messages older than everything spooled (those in memory or in flight when the target went
//! down) can be put in front of them.
//!
//! All writes go through one writer thread that commits in batches with
//! [`redb::Durability::Immediate`] (fsync), then completes the acknowledgement shares of what it
//! wrote: a message counts as "in the spool" only once it is on disk, and one fsync covers
//! every message that arrived meanwhile. Reads (by the target's link) see committed rows only.
//!
//! When the disk refuses a write (full, I/O error), the rows of the failed transaction are held
//! in memory by their target ([`Target`]'s held rows, at most [`MAX_HELD_BYTES`] in all), readable
//! like committed rows, and their shares complete: a live target never waits for a broken disk
//! and nothing is dropped while memory lasts. redb refuses every write after an I/O error until
//! the database is opened again, so the writer reopens it (at most every [`REOPEN_EVERY`]) and
//! writes the held rows first once it works; [`Spool::health`] says meanwhile that it fails.
//!
//! Bounds: `spool_max_messages` and `spool_max_bytes` per target. On overflow either the oldest
//! spooled messages are dropped ([`Overflow::DropOldest`], counted as `dropped_overflow`) or new
//! messages wait in memory holding their origin's acknowledgement ([`Overflow::Block`]): the
//! origin broker then stops sending once its in-flight window is full.

pub mod dead;
mod record;
mod store;
mod target;
mod writer;

use record::now_ms;
pub(crate) use record::{Decoded, decode, encode};
pub(crate) use store::SpoolHealth;
use store::{Health, Store, open_db, without_panic_message};
pub(crate) use target::Target;
use writer::{Budget, writer};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::Duration;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::doorbell::Doorbell;
use crate::message::AckShare;
use crate::metrics::LinkStats;

/// File name of the spool under `data_dir`.
pub(crate) const FILE_NAME: &str = "spool.redb";

/// Prefix of a target's table name.
const TABLE_PREFIX: &str = "queue/";

/// First key of an empty table: half the key space is left for messages put in front.
pub(crate) const MIDDLE: u64 = 1 << 62;

/// redb page cache.
const CACHE_BYTES: usize = 8 << 20;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 4096;

/// Most message bytes committed in one transaction (its dirty pages are held in memory).
const MAX_BATCH_BYTES: u64 = 2 << 20;

/// Bytes of messages handed to the writer and not yet committed, beyond which `append`
/// waits: when the disk is slower than the traffic, the backlog stays here and not in memory.
const MAX_UNWRITTEN: u64 = 4 << 20;

/// Most bytes of rows held in memory, all targets together, while the disk refuses writes;
/// beyond it a target's oldest held rows are dropped (`meshbridge_dropped_spool_failed_total`).
pub(crate) const MAX_HELD_BYTES: u64 = 64 << 20;

/// How often a failing spool is opened again and its held rows retried.
pub(crate) const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// What happens when a target's spool is full. Written (config, status, metrics) as
/// [`Overflow::as_str`] says, and read back only in that spelling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum Overflow {
    /// Drop the oldest spooled messages (counted and logged); the mesh keeps flowing.
    #[default]
    DropOldest,
    /// Keep new messages in memory and stop acknowledging them upstream until there is room:
    /// nothing is dropped by the bridge, but the origin broker stalls (and may drop by its own
    /// limits, e.g. mosquitto's `max_queued_messages`).
    Block,
}

impl Overflow {
    /// Every policy.
    pub(crate) const ALL: [Overflow; 2] = [Overflow::DropOldest, Overflow::Block];

    /// Its one spelling.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Overflow::DropOldest => "drop_oldest",
            Overflow::Block => "block",
        }
    }
}

/// An overflow policy spelled otherwise than [`Overflow::as_str`].
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: expected \"drop_oldest\" or \"block\"")]
pub struct UnknownOverflow(pub String);

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Overflow {
    type Err = UnknownOverflow;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownOverflow(s.to_string()))
    }
}

impl From<Overflow> for &'static str {
    fn from(o: Overflow) -> Self {
        o.as_str()
    }
}

impl TryFrom<String> for Overflow {
    type Error = UnknownOverflow;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Bounds of each target's spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Most bytes (encoded messages) per target.
    pub(crate) max_bytes: u64,
    /// Most messages per target.
    pub(crate) max_messages: u64,
    /// What to do when a bound is reached.
    pub(crate) overflow: Overflow,
}

/// Why the spool cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The file cannot be opened (in use, no permission, no directory…).
    #[error("spool {path}: {reason}")]
    Open {
        /// The spool file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file is damaged: redb cannot read it.
    #[error(
        "spool {path} is damaged ({reason}): move it aside (the messages in it are lost), or start once with `bridge run --spool-recover`, which does that"
    )]
    Damaged {
        /// The spool file.
        path: String,
        /// What redb said.
        reason: String,
    },
}

/// Why a read or write of the spool failed (its text is what status and the logs show).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// redb refused: I/O error (a full disk), or an earlier one it has not recovered from.
    #[error(transparent)]
    Db(Box<redb::Error>),
    /// The database is being opened again after a failed write.
    #[error("the spool is being opened again")]
    Reopening,
    /// Opening it again failed.
    #[error("cannot open the spool again: {0}")]
    Reopen(#[source] redb::DatabaseError),
    /// Opening it again must wait for a reader to finish.
    #[error("cannot open the spool again: the database is still in use by a reader")]
    ReaderActive,
    /// Writes fail, and the next attempt is not due yet; the last error.
    #[error("{0}")]
    StillFailing(String),
}

/// Each of redb's error types into [`StoreError::Db`], so that `?` works on all of them.
macro_rules! from_redb {
    ($($error:ty),*) => {
        $(impl From<$error> for StoreError {
            fn from(e: $error) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        })*
    };
}
from_redb!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);

enum Op {
    Append {
        target: Arc<Target>,
        key: u64,
        value: Vec<u8>,
        share: Option<AckShare>,
    },
    Delete {
        target: Arc<Target>,
        key: u64,
    },
    Discard {
        target: Arc<Target>,
    },
    /// A message set aside for a target (see [`dead`]): `share` completes once it is on disk.
    DeadLetter {
        key: u64,
        value: Vec<u8>,
        share: Option<AckShare>,
    },
    /// A held row (see [`Target::hold`]) on its way to disk.
    Unhold {
        target: Arc<Target>,
        key: u64,
        value: Vec<u8>,
    },
    Barrier(oneshot::Sender<()>),
}

impl Op {
    /// Message bytes this operation writes.
    fn bytes(&self) -> u64 {
        match self {
            Op::Append { value, .. } | Op::DeadLetter { value, .. } => value.len() as u64,
            _ => 0,
        }
    }
}

/// Counters found for a table when the spool was opened.
#[derive(Debug, Clone, Copy)]
struct Found {
    rows: u64,
    bytes: u64,
    first: u64,
    last: u64,
}

/// The spool of every target.
pub(crate) struct Spool {
    store: Arc<Store>,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    unwritten: Arc<Budget>,
    limits: Limits,
    found: Mutex<HashMap<String, Found>>,
    /// Low bits of the next dead letter's key (see [`Spool::dead_letter`]).
    dead_seq: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Spool {
    /// Opens `dir/spool.redb` like [`Spool::open`]; a damaged file is first moved aside to
    /// `spool.redb.damaged-<unix seconds>` (logged as an error: what it held is lost) and an
    /// empty spool is created (`bridge run --spool-recover`).
    pub(crate) fn open_recovering(dir: &Path, limits: Limits) -> Result<Arc<Spool>, SpoolError> {
        match Spool::open(dir, limits) {
            Err(SpoolError::Damaged { path, reason }) => {
                let aside = format!("{path}.damaged-{}", now_ms() / 1000);
                std::fs::rename(&path, &aside).map_err(|e| SpoolError::Open {
                    path: path.clone(),
                    reason: format!("damaged ({reason}), and it cannot be moved aside: {e}"),
                })?;
                error!(
                    damaged = %path,
                    moved_to = %aside,
                    reason = %reason,
                    "spool damaged: moved aside, starting with an empty spool; the messages it held are lost"
                );
                Spool::open(dir, limits)
            }
            other => other,
        }
    }

    /// Opens (or creates) `dir/spool.redb` and starts the writer thread.
    pub(crate) fn open(dir: &Path, limits: Limits) -> Result<Arc<Spool>, SpoolError> {
        let path = dir.join(FILE_NAME);
        let shown = path.display().to_string();
        let fail = |reason: String| SpoolError::Open {
            path: shown.clone(),
            reason,
        };
        let damaged = |reason: String| SpoolError::Damaged {
            path: shown.clone(),
            reason,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create the directory: {e}")))?;
        // redb panics on some damage (a file cut short) instead of returning an error.
        let opened = without_panic_message(|| {
            let db = open_db(&path).map_err(|e| StoreError::from(redb::Error::from(e)))?;
            let found = scan(&db)?;
            Ok::<_, StoreError>((db, found))
        });
        let (db, found) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(StoreError::Db(e))) => match *e {
                redb::Error::DatabaseAlreadyOpen => {
                    return Err(fail(
                        "in use by another process (is another bridge running with this data_dir?)"
                            .into(),
                    ));
                }
                redb::Error::Io(e) => return Err(fail(e.to_string())),
                other => return Err(damaged(other.to_string())),
            },
            Ok(Err(other)) => return Err(damaged(other.to_string())),
            Err(panic) => return Err(damaged(panic.to_string())),
        };
        for (table, f) in &found {
            info!(
                target_broker = table.trim_start_matches(TABLE_PREFIX),
                messages = f.rows,
                bytes = f.bytes,
                "spooled messages found"
            );
        }
        let store = Arc::new(Store {
            path: path.clone(),
            db: RwLock::new(Some(Arc::new(db))),
            health: Health::default(),
        });
        let (tx, rx) = mpsc::channel();
        let writer_store = store.clone();
        let unwritten = Arc::new(Budget::default());
        let writer_budget = unwritten.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer(&writer_store, rx, limits, &writer_budget))
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        Ok(Arc::new(Spool {
            store,
            ops: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(thread)),
            unwritten,
            limits,
            found: Mutex::new(found),
            dead_seq: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// The configured bounds.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether the disk takes writes, and what is held in memory meanwhile.
    pub(crate) fn health(&self) -> SpoolHealth {
        let h = &self.store.health;
        SpoolHealth {
            error: h.error(),
            write_failures: h.write_failures.load(Ordering::Relaxed),
            held_messages: h.held_rows.load(Ordering::Relaxed),
            held_bytes: h.held_bytes.load(Ordering::Relaxed),
        }
    }

    /// True while the disk refuses writes.
    pub(crate) fn is_failing(&self) -> bool {
        self.store.health.error().is_some()
    }

    /// The spool of target `broker`, with what an earlier run left in it. `notify` is woken
    /// whenever rows were committed or removed.
    pub(crate) fn target(
        &self,
        broker: &str,
        notify: Arc<Doorbell>,
        stats: Arc<LinkStats>,
    ) -> Arc<Target> {
        let table = format!("{TABLE_PREFIX}{broker}");
        let found = self
            .found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&table)
            .unwrap_or(Found {
                rows: 0,
                bytes: 0,
                first: 1,
                last: 0,
            });
        Target::new(table, found, notify, stats)
    }

    /// Deletes the spools of brokers that are no longer members (left by an earlier run).
    pub(crate) fn discard_others(&self, members: &HashSet<String>) {
        let stale: Vec<(String, Found)> = self
            .found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .filter(|(t, _)| !members.contains(t.trim_start_matches(TABLE_PREFIX)))
            .collect();
        for (table, f) in stale {
            warn!(
                target_broker = table.trim_start_matches(TABLE_PREFIX),
                messages = f.rows,
                "spool of a broker that is no longer a member deleted"
            );
            let target = Target::new(
                table,
                f,
                Arc::new(Doorbell::new()),
                Arc::new(LinkStats::default()),
            );
            self.send(Op::Discard { target });
        }
    }

    fn send(&self, op: Op) {
        let tx = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let sent = match tx.as_ref() {
            Some(tx) => tx.send(op).map_err(|mpsc::SendError(op)| op),
            None => Err(op),
        };
        if let Err(op) = sent {
            // The writer is gone (it only stops when the process does): nothing can be made
            // durable, so leave the shares incomplete and the origins unacknowledged.
            error!("spool writer stopped; message not spooled");
            drop(op);
        }
    }

    /// True when one more message of `size` bytes does not fit in `target`'s spool.
    pub(crate) fn is_full(&self, target: &Target, size: u64) -> bool {
        let rows = target.len();
        rows >= self.limits.max_messages
            || (rows > 0 && target.bytes() + size > self.limits.max_bytes)
    }

    /// Writes `value` (see [`encode`]) under `key`; `share` completes once it is on disk.
    /// Callers must send a target's appends in key order of commit visibility (under the
    /// target queue's lock).
    /// Waits (blocking the calling thread) while the writer is more than a few MiB behind.
    pub(crate) fn append(
        &self,
        target: &Arc<Target>,
        key: u64,
        value: Vec<u8>,
        share: Option<AckShare>,
    ) {
        self.unwritten.take(value.len() as u64);
        crate::metrics::inc(&target.stats.spooled);
        target.pending_rows.fetch_add(1, Ordering::AcqRel);
        target
            .pending_bytes
            .fetch_add(value.len() as u64, Ordering::AcqRel);
        self.send(Op::Append {
            target: target.clone(),
            key,
            value,
            share,
        });
    }

    /// Sets `msg` (from `origin`) aside for `target` in the dead-letter table, because of
    /// `reason`; `share` completes once it is on disk (or once the disk refused it: the message
    /// cannot be delivered either way, and an origin held for it would wedge).
    pub(crate) fn dead_letter(
        &self,
        target: &str,
        origin: &str,
        msg: &crate::message::Message,
        reason: &str,
        share: Option<AckShare>,
    ) {
        let at = now_ms();
        // Time ordered, and apart within a millisecond.
        let key = (at << 16) | (self.dead_seq.fetch_add(1, Ordering::Relaxed) & 0xffff);
        let value = dead::row(target, origin, msg, reason, at);
        self.unwritten.take(value.len() as u64);
        self.send(Op::DeadLetter { key, value, share });
    }

    /// The newest `max` dead letters, newest first.
    pub(crate) fn dead_letters(&self, max: usize) -> Result<Vec<dead::DeadLetter>, StoreError> {
        let Some(db) = self.store.db() else {
            return Ok(Vec::new());
        };
        let txn = db.begin_read()?;
        let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(dead::TABLE);
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in table.iter()?.rev().take(max) {
            let (_, v) = row?;
            if let Some(d) = dead::read(v.value()) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Removes a delivered message.
    pub(crate) fn delete(&self, target: &Arc<Target>, key: u64) {
        target.pending_deletes.fetch_add(1, Ordering::AcqRel);
        self.send(Op::Delete {
            target: target.clone(),
            key,
        });
    }

    /// Deletes a target's whole spool (the broker left the mesh).
    pub(crate) fn discard(&self, target: &Arc<Target>) {
        self.send(Op::Discard {
            target: target.clone(),
        });
    }

    /// Waits until everything sent so far is committed.
    pub(crate) async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Barrier(tx));
        let _ = rx.await;
    }

    /// Commits what was sent and stops the writer (end of the process). Later writes are
    /// refused and leave their origins unacknowledged.
    pub(crate) fn close(&self) {
        drop(self.ops.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }

    /// Up to `max` readable rows of `target` (committed, or held in memory while the disk
    /// refuses writes) from key `from` on (from the first when `None`), in key order.
    pub(crate) fn read(
        &self,
        target: &Target,
        from: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let from = from.unwrap_or(0);
        let mut rows = BTreeMap::new();
        let on_disk = target.stored_rows.load(Ordering::Acquire) > 0;
        match self.store.db().map(|db| read_disk(&db, target, from, max)) {
            Some(Ok(disk)) => rows.extend(disk),
            // Rows on disk that cannot be read now must not be skipped: read again later.
            Some(Err(e)) if on_disk => return Err(e),
            None if on_disk => return Err(StoreError::Reopening),
            Some(Err(_)) | None => {}
        }
        // A held row may also be on disk already (written, not yet forgotten): same bytes.
        for (k, v) in target.lock_held().range(from..).take(max) {
            rows.entry(*k).or_insert_with(|| v.clone());
        }
        Ok(rows.into_iter().take(max).collect())
    }
}

fn read_disk(
    db: &Database,
    target: &Target,
    from: u64,
    max: usize,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(target.def()) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let range = table.range(from..)?;
    let mut out = Vec::new();
    for row in range.take(max) {
        let (k, v) = row?;
        out.push((k.value(), v.value().to_vec()));
    }
    Ok(out)
}

fn scan(db: &Database) -> Result<HashMap<String, Found>, StoreError> {
    let txn = db.begin_read()?;
    let mut found = HashMap::new();
    for handle in txn.list_tables()? {
        let name = handle.name().to_string();
        if !name.starts_with(TABLE_PREFIX) {
            continue;
        }
        let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&name);
        let table = txn.open_table(def)?;
        let rows = table.len()?;
        if rows == 0 {
            continue;
        }
        let mut bytes = 0;
        for row in table.iter()? {
            let (_, v) = row?;
            bytes += v.value().len() as u64;
        }
        let first = table.first()?.map_or(0, |(k, _)| k.value());
        let last = table.last()?.map_or(0, |(k, _)| k.value());
        found.insert(
            name,
            Found {
                rows,
                bytes,
                first,
                last,
            },
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests;
