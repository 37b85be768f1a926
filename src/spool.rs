//! The durable per-target spool: where a target's messages wait while it is down or too slow,
//! so that its share of the origin's acknowledgement can be released without losing them.
//!
//! One [redb] file (`data_dir/spool.redb`), one table per target broker (`queue/<name>`), keyed
//! by a `u64` that orders the target's messages. Keys start in the middle of the range so that
//! messages older than everything spooled (those in memory or in flight when the target went
//! down) can be put in front of them.
//!
//! All writes go through one writer thread that commits in batches with
//! [`Durability::Immediate`] (fsync), then completes the acknowledgement shares of what it
//! wrote: a message counts as "in the spool" only once it is on disk, and one fsync covers
//! every message that arrived meanwhile. Reads (by the target's link) see committed rows only.
//!
//! Bounds: `spool_max_messages` and `spool_max_bytes` per target. On overflow either the oldest
//! spooled messages are dropped ([`Overflow::DropOldest`], counted as `dropped_overflow`) or new
//! messages wait in memory holding their origin's acknowledgement ([`Overflow::Block`]): the
//! origin broker then stops sending once its in-flight window is full.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use redb::{
    Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::{Notify, oneshot};
use tracing::{error, info, warn};

use crate::message::{AckShare, Message};
use crate::metrics::LinkStats;

/// File name of the spool under `data_dir`.
pub const FILE_NAME: &str = "spool.redb";

/// Prefix of a target's table name.
const TABLE_PREFIX: &str = "queue/";

/// First key of an empty table: half the key space is left for messages put in front.
pub const MIDDLE: u64 = 1 << 62;

/// redb page cache.
const CACHE_BYTES: usize = 8 << 20;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 4096;

/// Most message bytes committed in one transaction (its dirty pages are held in memory).
const MAX_BATCH_BYTES: u64 = 2 << 20;

/// Bytes of messages handed to the writer and not yet committed, beyond which `append`
/// waits: when the disk is slower than the traffic, the backlog stays here and not in memory.
const MAX_UNWRITTEN: u64 = 4 << 20;

/// What happens when a target's spool is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Drop the oldest spooled messages (counted and logged); the mesh keeps flowing.
    #[default]
    DropOldest,
    /// Keep new messages in memory and stop acknowledging them upstream until there is room:
    /// nothing is dropped by the bridge, but the origin broker stalls (and may drop by its own
    /// limits, e.g. mosquitto's `max_queued_messages`).
    Block,
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Overflow::DropOldest => "drop_oldest",
            Overflow::Block => "block",
        })
    }
}

/// Bounds of each target's spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes (encoded messages) per target.
    pub max_bytes: u64,
    /// Most messages per target.
    pub max_messages: u64,
    /// What to do when a bound is reached.
    pub overflow: Overflow,
}

/// Why the spool cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("spool {path}: {reason}")]
pub struct SpoolError {
    path: String,
    reason: String,
}

/// One target's spool: its table and counters.
#[derive(Debug)]
pub struct Target {
    table: String,
    /// Rows committed.
    stored_rows: AtomicU64,
    stored_bytes: AtomicU64,
    /// Rows sent to the writer and not yet committed.
    pending_rows: AtomicU64,
    pending_bytes: AtomicU64,
    /// Deletions sent to the writer and not yet committed.
    pending_deletes: AtomicU64,
    /// Lowest and highest key found at start.
    first_key: u64,
    last_key: u64,
    notify: Arc<Notify>,
    stats: Arc<LinkStats>,
}

impl Target {
    /// The counters of `table` as found when the spool was opened, nothing pending.
    fn new(table: String, found: Found, notify: Arc<Notify>, stats: Arc<LinkStats>) -> Arc<Self> {
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
        })
    }

    /// Messages spooled, committed or on their way to disk.
    pub fn len(&self) -> u64 {
        // Writer order: stored is raised before pending is lowered, so the sum never dips.
        self.pending_rows.load(Ordering::Acquire) + self.stored_rows.load(Ordering::Acquire)
    }

    /// True when nothing is spooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes spooled, committed or on their way to disk.
    pub fn bytes(&self) -> u64 {
        self.pending_bytes.load(Ordering::Acquire) + self.stored_bytes.load(Ordering::Acquire)
    }

    /// Rows readable now.
    pub fn committed(&self) -> u64 {
        self.stored_rows.load(Ordering::Acquire)
    }

    /// Deletions on their way to disk: rows already delivered that are still readable.
    pub fn deletes_pending(&self) -> u64 {
        self.pending_deletes.load(Ordering::Acquire)
    }

    /// Key range found when the spool was opened: `(first, next)`.
    pub fn key_range(&self) -> (u64, u64) {
        if self.first_key > self.last_key {
            (MIDDLE, MIDDLE)
        } else {
            (self.first_key, self.last_key + 1)
        }
    }

    fn def(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.table)
    }
}

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
    Barrier(oneshot::Sender<()>),
}

impl Op {
    /// Message bytes this operation writes.
    fn bytes(&self) -> u64 {
        match self {
            Op::Append { value, .. } => value.len() as u64,
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
pub struct Spool {
    db: Arc<Database>,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    unwritten: Arc<Budget>,
    limits: Limits,
    found: Mutex<HashMap<String, Found>>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Spool {
    /// Opens (or creates) `dir/spool.redb` and starts the writer thread.
    pub fn open(dir: &Path, limits: Limits) -> Result<Arc<Spool>, SpoolError> {
        let path = dir.join(FILE_NAME);
        let fail = |reason: String| SpoolError {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create the directory: {e}")))?;
        // A small page cache: the spool is written once and read once, sequentially; redb's
        // default (1 GiB) would show up as resident memory under a long outage.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => fail(
                    "in use by another process (is another bridge running with this data_dir?)"
                        .into(),
                ),
                other => fail(other.to_string()),
            })?;
        let found = scan(&db).map_err(fail)?;
        for (table, f) in &found {
            info!(
                target_broker = table.trim_start_matches(TABLE_PREFIX),
                messages = f.rows,
                bytes = f.bytes,
                "spooled messages found"
            );
        }
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let unwritten = Arc::new(Budget::default());
        let writer_budget = unwritten.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer(&writer_db, rx, limits, &writer_budget))
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        Ok(Arc::new(Spool {
            db,
            ops: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(thread)),
            unwritten,
            limits,
            found: Mutex::new(found),
        }))
    }

    /// The configured bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The spool of target `broker`, with what an earlier run left in it. `notify` is woken
    /// whenever rows were committed or removed.
    pub fn target(&self, broker: &str, notify: Arc<Notify>, stats: Arc<LinkStats>) -> Arc<Target> {
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
    pub fn discard_others(&self, members: &HashSet<String>) {
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
                Arc::new(Notify::new()),
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
    pub fn is_full(&self, target: &Target, size: u64) -> bool {
        let rows = target.len();
        rows >= self.limits.max_messages
            || (rows > 0 && target.bytes() + size > self.limits.max_bytes)
    }

    /// Writes `value` (see [`encode`]) under `key`; `share` completes once it is on disk.
    /// Callers must send a target's appends in key order of commit visibility (under the
    /// target queue's lock).
    /// Waits (blocking the calling thread) while the writer is more than a few MiB behind.
    pub fn append(&self, target: &Arc<Target>, key: u64, value: Vec<u8>, share: Option<AckShare>) {
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

    /// Removes a delivered message.
    pub fn delete(&self, target: &Arc<Target>, key: u64) {
        target.pending_deletes.fetch_add(1, Ordering::AcqRel);
        self.send(Op::Delete {
            target: target.clone(),
            key,
        });
    }

    /// Deletes a target's whole spool (the broker left the mesh).
    pub fn discard(&self, target: &Arc<Target>) {
        self.send(Op::Discard {
            target: target.clone(),
        });
    }

    /// Waits until everything sent so far is committed.
    pub async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Barrier(tx));
        let _ = rx.await;
    }

    /// Commits what was sent and stops the writer (end of the process). Later writes are
    /// refused and leave their origins unacknowledged.
    pub fn close(&self) {
        drop(self.ops.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }

    /// Up to `max` committed rows of `target` from key `from` on (from the first when `None`).
    pub fn read(
        &self,
        target: &Target,
        from: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let table = match txn.open_table(target.def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.to_string()),
        };
        let range = table
            .range(from.unwrap_or(0)..)
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for row in range.take(max) {
            let (k, v) = row.map_err(|e| e.to_string())?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }
}

fn scan(db: &Database) -> Result<HashMap<String, Found>, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let mut found = HashMap::new();
    for handle in txn.list_tables().map_err(|e| e.to_string())? {
        let name = handle.name().to_string();
        if !name.starts_with(TABLE_PREFIX) {
            continue;
        }
        let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&name);
        let table = txn.open_table(def).map_err(|e| e.to_string())?;
        let rows = table.len().map_err(|e| e.to_string())?;
        if rows == 0 {
            continue;
        }
        let mut bytes = 0;
        for row in table.iter().map_err(|e| e.to_string())? {
            let (_, v) = row.map_err(|e| e.to_string())?;
            bytes += v.value().len() as u64;
        }
        let first = table
            .first()
            .map_err(|e| e.to_string())?
            .map_or(0, |(k, _)| k.value());
        let last = table
            .last()
            .map_err(|e| e.to_string())?
            .map_or(0, |(k, _)| k.value());
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
struct Budget {
    bytes: Mutex<u64>,
    freed: std::sync::Condvar,
}

impl Budget {
    fn take(&self, n: u64) {
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

fn writer(db: &Database, rx: mpsc::Receiver<Op>, limits: Limits, unwritten: &Budget) {
    let mut batch = Vec::new();
    while let Ok(op) = rx.recv() {
        let mut batch_bytes = op.bytes();
        batch.push(op);
        while batch.len() < MAX_BATCH && batch_bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(op) => {
                    batch_bytes += op.bytes();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        let mut deltas: HashMap<String, (Arc<Target>, Delta)> = HashMap::new();
        let result = apply(db, &batch, limits, &mut deltas);
        if let Err(e) = &result {
            error!(error = %e, ops = batch.len(), "spool write failed");
        }
        // Counters first: a barrier waiter (`sync`) then sees them up to date.
        for (target, d) in deltas.into_values() {
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
            target.notify.notify_one();
        }
        for op in batch.drain(..) {
            match op {
                Op::Append {
                    target,
                    value,
                    share,
                    ..
                } => {
                    if result.is_err() {
                        // Not on disk. Completing the share keeps the origin flowing; the
                        // message is lost for this target, counted and logged above.
                        target
                            .stats
                            .dropped_overflow
                            .fetch_add(1, Ordering::Relaxed);
                        target.stats.set_error(format!(
                            "spool write failed: {}",
                            result.as_ref().err().map_or("", String::as_str)
                        ));
                    }
                    target.pending_rows.fetch_sub(1, Ordering::AcqRel);
                    target
                        .pending_bytes
                        .fetch_sub(value.len() as u64, Ordering::AcqRel);
                    if let Some(share) = share {
                        share.complete();
                    }
                }
                Op::Barrier(tx) => {
                    let _ = tx.send(());
                }
                Op::Delete { target, .. } => {
                    target.pending_deletes.fetch_sub(1, Ordering::AcqRel);
                }
                Op::Discard { .. } => {}
            }
        }
        unwritten.give(batch_bytes);
    }
}

/// Applies a batch in one transaction; on success records what changed in `deltas` and
/// applies it to the targets' counters (stored counters are raised before the caller lowers
/// the pending ones).
fn apply(
    db: &Database,
    batch: &[Op],
    limits: Limits,
    deltas: &mut HashMap<String, (Arc<Target>, Delta)>,
) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(Durability::Immediate);
    {
        let mut tables = HashMap::new();
        for op in batch {
            let target = match op {
                Op::Append { target, .. } | Op::Delete { target, .. } | Op::Discard { target } => {
                    target
                }
                Op::Barrier(_) => continue,
            };
            let (_, delta) = deltas
                .entry(target.table.clone())
                .or_insert_with(|| (target.clone(), Delta::default()));
            if let Op::Discard { .. } = op {
                tables.remove(&target.table);
                txn.delete_table(target.def()).map_err(|e| e.to_string())?;
                *delta = Delta {
                    discarded: true,
                    ..Delta::default()
                };
                continue;
            }
            if !tables.contains_key(&target.table) {
                let t = txn.open_table(target.def()).map_err(|e| e.to_string())?;
                tables.insert(target.table.clone(), t);
            }
            let Some(table) = tables.get_mut(&target.table) else {
                continue;
            };
            match op {
                Op::Append { key, value, .. } => {
                    if let Some(old) = table
                        .insert(*key, value.as_slice())
                        .map_err(|e| e.to_string())?
                    {
                        delta.removed_rows += 1;
                        delta.removed_bytes += old.value().len() as u64;
                    }
                    delta.added_rows += 1;
                    delta.added_bytes += value.len() as u64;
                    if limits.overflow == Overflow::DropOldest {
                        let mut rows = (target.stored_rows.load(Ordering::Acquire)
                            + delta.added_rows)
                            .saturating_sub(delta.removed_rows);
                        let mut bytes = (target.stored_bytes.load(Ordering::Acquire)
                            + delta.added_bytes)
                            .saturating_sub(delta.removed_bytes);
                        while rows > limits.max_messages || (rows > 1 && bytes > limits.max_bytes) {
                            let Some((_, v)) = table.pop_first().map_err(|e| e.to_string())? else {
                                break;
                            };
                            let len = v.value().len() as u64;
                            delta.removed_rows += 1;
                            delta.removed_bytes += len;
                            delta.dropped += 1;
                            rows -= 1;
                            bytes = bytes.saturating_sub(len);
                        }
                    }
                }
                Op::Delete { key, .. } => {
                    if let Some(old) = table.remove(*key).map_err(|e| e.to_string())? {
                        delta.removed_rows += 1;
                        delta.removed_bytes += old.value().len() as u64;
                    }
                }
                Op::Discard { .. } | Op::Barrier(_) => {}
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
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
    Ok(())
}

const FORMAT: u8 = 1;
const HAS_PROPS: u8 = 0b1000;
const RETAIN: u8 = 0b0100;

/// Encodes a message and its origin for the spool. The time is kept so that an MQTT 5 message
/// expiry interval counts the time spent in the spool.
pub fn encode(origin: &str, msg: &Message) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + origin.len() + msg.topic.len() + msg.payload.len());
    b.put_u8(FORMAT);
    b.put_u64(now_ms());
    let mut flags = msg.qos & 0b11;
    if msg.retain {
        flags |= RETAIN;
    }
    if msg.properties.is_some() {
        flags |= HAS_PROPS;
    }
    b.put_u8(flags);
    put_bytes(&mut b, origin.as_bytes());
    put_bytes(&mut b, &msg.topic);
    put_bytes(&mut b, &msg.payload);
    if let Some(p) = &msg.properties {
        put_opt(&mut b, p.payload_format_indicator.map(|v| vec![v]));
        put_opt(
            &mut b,
            p.message_expiry_interval.map(|v| v.to_be_bytes().to_vec()),
        );
        put_opt(
            &mut b,
            p.response_topic.as_ref().map(|v| v.as_bytes().to_vec()),
        );
        put_opt(&mut b, p.correlation_data.as_ref().map(|v| v.to_vec()));
        put_opt(
            &mut b,
            p.content_type.as_ref().map(|v| v.as_bytes().to_vec()),
        );
        b.put_u32(p.user_properties.len() as u32);
        for (k, v) in &p.user_properties {
            put_bytes(&mut b, k.as_bytes());
            put_bytes(&mut b, v.as_bytes());
        }
    }
    b
}

/// A spooled message decoded, or why it was not.
#[derive(Debug)]
pub enum Decoded {
    /// The message and the name of its origin broker.
    Message(Arc<str>, Message),
    /// Its MQTT 5 message expiry interval ran out while it waited.
    Expired(Message),
}

/// Decodes what [`encode`] wrote.
pub fn decode(mut b: &[u8]) -> Result<Decoded, String> {
    let r = &mut b;
    let format = get_u8(r)?;
    if format != FORMAT {
        return Err(format!("unknown record format {format}"));
    }
    if r.remaining() < 8 {
        return Err("truncated record".into());
    }
    let spooled_at = r.get_u64();
    let flags = get_u8(r)?;
    let origin = String::from_utf8(get_bytes(r)?.to_vec()).map_err(|_| "origin is not UTF-8")?;
    let topic = Bytes::copy_from_slice(get_bytes(r)?);
    let payload = Bytes::copy_from_slice(get_bytes(r)?);
    let text = |v: Option<&[u8]>| -> Result<Option<String>, String> {
        v.map(|v| String::from_utf8(v.to_vec()).map_err(|_| "property is not UTF-8".to_string()))
            .transpose()
    };
    let properties = if flags & HAS_PROPS != 0 {
        let pfi = get_opt(r)?.map(|v| v.first().copied().unwrap_or(0));
        let expiry = match get_opt(r)? {
            Some(v) => Some(u32::from_be_bytes(
                v.try_into().map_err(|_| "bad expiry field")?,
            )),
            None => None,
        };
        let response_topic = text(get_opt(r)?)?;
        let correlation_data = get_opt(r)?.map(Bytes::copy_from_slice);
        let content_type = text(get_opt(r)?)?;
        if r.remaining() < 4 {
            return Err("truncated record".into());
        }
        let n = r.get_u32() as usize;
        let mut user_properties = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let k = text(Some(get_bytes(r)?))?.unwrap_or_default();
            let v = text(Some(get_bytes(r)?))?.unwrap_or_default();
            user_properties.push((k, v));
        }
        Some(PublishProperties {
            payload_format_indicator: pfi,
            message_expiry_interval: expiry,
            topic_alias: None,
            response_topic,
            correlation_data,
            user_properties,
            subscription_identifiers: Vec::new(),
            content_type,
        })
    } else {
        None
    };
    let mut msg = Message {
        topic,
        payload,
        qos: flags & 0b11,
        retain: flags & RETAIN != 0,
        properties,
    };
    if let Some(expiry) = msg
        .properties
        .as_mut()
        .and_then(|p| p.message_expiry_interval.as_mut())
    {
        let waited = now_ms().saturating_sub(spooled_at) / 1000;
        if waited >= u64::from(*expiry) {
            return Ok(Decoded::Expired(msg));
        }
        *expiry -= waited as u32;
    }
    Ok(Decoded::Message(origin.into(), msg))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    b.put_u32(v.len() as u32);
    b.put_slice(v);
}

fn put_opt(b: &mut Vec<u8>, v: Option<Vec<u8>>) {
    match v {
        Some(v) => {
            b.put_u8(1);
            put_bytes(b, &v);
        }
        None => b.put_u8(0),
    }
}

fn get_u8(r: &mut &[u8]) -> Result<u8, String> {
    if r.remaining() < 1 {
        return Err("truncated record".into());
    }
    Ok(r.get_u8())
}

fn get_bytes<'a>(r: &mut &'a [u8]) -> Result<&'a [u8], String> {
    if r.remaining() < 4 {
        return Err("truncated record".into());
    }
    let n = r.get_u32() as usize;
    if r.len() < n {
        return Err("truncated record".into());
    }
    let (v, rest) = r.split_at(n);
    *r = rest;
    Ok(v)
}

fn get_opt<'a>(r: &mut &'a [u8]) -> Result<Option<&'a [u8]>, String> {
    match get_u8(r)? {
        0 => Ok(None),
        1 => get_bytes(r).map(Some),
        t => Err(format!("bad optional field tag {t}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(props: Option<PublishProperties>) -> Message {
        Message {
            topic: Bytes::from_static(b"a/b"),
            payload: Bytes::from_static(b"\x00payload\xff"),
            qos: 2,
            retain: true,
            properties: props,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let props = PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(3600),
            topic_alias: None,
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            subscription_identifiers: Vec::new(),
            content_type: Some("text/plain".into()),
        };
        for m in [msg(None), msg(Some(props))] {
            let Decoded::Message(origin, back) = decode(&encode("b1", &m)).unwrap() else {
                panic!("expired")
            };
            assert_eq!(&*origin, "b1");
            assert_eq!(back.topic, m.topic);
            assert_eq!(back.payload, m.payload);
            assert_eq!((back.qos, back.retain), (2, true));
            assert_eq!(back.properties, m.properties);
        }
    }

    #[test]
    fn expired_while_spooled() {
        let props = PublishProperties {
            message_expiry_interval: Some(10),
            ..Default::default()
        };
        let mut rec = encode("b1", &msg(Some(props)));
        // Pretend it was spooled 11 s ago.
        let at = now_ms() - 11_000;
        rec[1..9].copy_from_slice(&at.to_be_bytes());
        assert!(matches!(decode(&rec).unwrap(), Decoded::Expired(_)));
        rec[1..9].copy_from_slice(&(now_ms() - 4_000).to_be_bytes());
        let Decoded::Message(_, m) = decode(&rec).unwrap() else {
            panic!("not expired yet")
        };
        assert_eq!(m.properties.unwrap().message_expiry_interval, Some(6));
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let rec = encode("b1", &msg(Some(PublishProperties::default())));
        for n in 0..rec.len() {
            assert!(decode(&rec[..n]).is_err(), "prefix of {n} bytes");
        }
    }

    fn target(spool: &Spool, name: &str) -> Arc<Target> {
        spool.target(
            name,
            Arc::new(Notify::new()),
            Arc::new(LinkStats::default()),
        )
    }

    #[tokio::test]
    async fn append_read_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_bytes: 1 << 30,
            max_messages: 1000,
            overflow: Overflow::DropOldest,
        };
        {
            let spool = Spool::open(dir.path(), limits).unwrap();
            let t = target(&spool, "b2");
            for k in 0..5 {
                spool.append(&t, MIDDLE + k, vec![k as u8; 10], None);
            }
            spool.append(&t, MIDDLE - 1, vec![9; 10], None);
            spool.sync().await;
            assert_eq!((t.len(), t.bytes()), (6, 60));
            let rows = spool.read(&t, None, 3).unwrap();
            let keys: Vec<u64> = rows.iter().map(|r| r.0).collect();
            assert_eq!(keys, vec![MIDDLE - 1, MIDDLE, MIDDLE + 1]);
            spool.delete(&t, MIDDLE - 1);
            spool.delete(&t, MIDDLE);
            spool.sync().await;
            assert_eq!(t.len(), 4);
            assert_eq!(spool.read(&t, Some(MIDDLE + 4), 10).unwrap().len(), 1);
            // A second bridge on the same data_dir is refused.
            let err = Spool::open(dir.path(), limits).unwrap_err().to_string();
            assert!(err.contains("in use by another process"), "{err}");
            spool.close();
        }
        let spool = Spool::open(dir.path(), limits).unwrap();
        let t = target(&spool, "b2");
        assert_eq!((t.len(), t.bytes()), (4, 40), "found again after a reopen");
        assert_eq!(t.key_range(), (MIDDLE + 1, MIDDLE + 5));
        let other = target(&spool, "b3");
        assert_eq!(other.key_range(), (MIDDLE, MIDDLE));
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(
            dir.path(),
            Limits {
                max_bytes: 1 << 30,
                max_messages: 3,
                overflow: Overflow::DropOldest,
            },
        )
        .unwrap();
        let t = target(&spool, "b1");
        for k in 0..5 {
            spool.append(&t, MIDDLE + k, vec![0; 4], None);
        }
        spool.sync().await;
        assert_eq!(t.len(), 3);
        assert_eq!(t.stats.dropped_overflow.load(Ordering::Relaxed), 2);
        let keys: Vec<u64> = spool
            .read(&t, None, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(keys, vec![MIDDLE + 2, MIDDLE + 3, MIDDLE + 4]);
        spool.discard(&t);
        spool.sync().await;
        assert!(t.is_empty());
        assert!(spool.read(&t, None, 10).unwrap().is_empty());
    }
}
