//! Fan-out: a message received on one link goes to the queue of every other link.
//!
//! Each link owns a [`TargetQueue`]: a bounded queue in memory in front of the target's durable
//! [`spool`](crate::spool). While the target is connected and keeps up, a message stays in
//! memory and keeps its [`AckShare`] until the target's broker acknowledges it, so the origin
//! is acknowledged only when every connected target has it. When the target is down, or its
//! memory queue is full, the message goes to the spool instead and its share completes once it
//! is on disk: a down or slow target never holds back the others, and a bridge crash loses
//! nothing. Once anything is spooled, later messages follow it into the spool until the target
//! has caught up, so the target receives them in order.
//!
//! A stalled target ([`TargetQueue::evacuate`]) gets what its link holds written to the front
//! of its spool; the link keeps those messages and sends them first. The spool is read with one
//! forward cursor while connected (everything behind it is held by the link or delivered) and
//! from its first row after a reconnect. That is what keeps the order, and no row is left
//! behind the cursor.
//!
//! Without a spool (unit tests) a down target's share is completed on entry and messages wait
//! in memory only, the oldest dropped on overflow.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tracing::warn;

use crate::message::{AckGroup, AckRequest, AckShare, Message};
use crate::metrics::{self, LinkStats, inc};
use crate::spool::{self, Decoded, Overflow, Spool};

/// A message on its way to one target.
#[derive(Debug)]
pub struct Outbound {
    /// The message, shared by all targets.
    pub msg: Arc<Message>,
    /// This target's share of the origin's acknowledgement (QoS ≥ 1 only).
    pub share: Option<AckShare>,
    /// Origin broker name, for the origin tag.
    pub origin: Arc<str>,
    /// Its key in the target's spool, when it was read from there (removed once delivered).
    pub key: Option<u64>,
}

impl Outbound {
    /// A message for a target, not (yet) spooled.
    pub fn new(msg: Arc<Message>, share: Option<AckShare>, origin: Arc<str>) -> Self {
        Self {
            msg,
            share,
            origin,
            key: None,
        }
    }

    /// Completes this target's share, if any.
    pub fn complete(&mut self) {
        if let Some(share) = self.share.take() {
            share.complete();
        }
    }
}

#[derive(Debug)]
struct QueueInner {
    /// In memory, in order; older than anything spooled.
    items: VecDeque<Outbound>,
    /// Waiting for room in a full spool (overflow policy `block`), holding their shares.
    blocked: VecDeque<Outbound>,
    connected: bool,
    /// Next spool key at the front (exclusive) and at the back.
    front_key: u64,
    next_key: u64,
    /// Next spool key to read; `None`: from the first.
    cursor: Option<u64>,
}

/// The durable part of a target queue.
#[derive(Debug)]
struct Spooled {
    spool: Arc<Spool>,
    target: Arc<spool::Target>,
}

impl Spooled {
    /// Writes `item` under `key`; `share` completes once it is on disk.
    fn write(&self, key: u64, item: &Outbound, share: Option<AckShare>) {
        self.spool.append(
            &self.target,
            key,
            spool::encode(&item.origin, &item.msg),
            share,
        );
    }

    /// Spools `item` behind everything spooled so far (call under the queue's lock, so keys
    /// reach the writer in order).
    fn append_back(&self, inner: &mut QueueInner, mut item: Outbound) {
        let key = inner.next_key;
        inner.next_key += 1;
        let share = item.share.take();
        self.write(key, &item, share);
    }

    /// Spools `items` (oldest first) in front of everything spooled so far.
    fn prepend(&self, inner: &mut QueueInner, items: Vec<Outbound>) {
        inner.front_key -= items.len() as u64;
        let start = inner.front_key;
        for (key, mut item) in (start..).zip(items) {
            let share = item.share.take();
            self.write(key, &item, share);
        }
    }
}

/// The queue of messages waiting for one target.
#[derive(Debug)]
pub struct TargetQueue {
    inner: Mutex<QueueInner>,
    notify: Arc<Notify>,
    capacity: usize,
    stats: Arc<LinkStats>,
    spooled: Option<Spooled>,
    blocked_len: AtomicUsize,
    /// Set when the memory queue overflowed: the link should move what holds origin
    /// acknowledgements to the spool ([`TargetQueue::evacuate`]).
    evacuate_requested: AtomicBool,
}

impl TargetQueue {
    /// An in-memory queue holding at most `capacity` messages (no spool).
    pub fn new(capacity: usize, stats: Arc<LinkStats>) -> Self {
        Self::build(capacity, stats, Arc::new(Notify::new()), None)
    }

    /// A queue holding at most `capacity` messages in memory in front of `name`'s spool.
    pub fn with_spool(
        capacity: usize,
        stats: Arc<LinkStats>,
        spool: Arc<Spool>,
        name: &str,
    ) -> Self {
        let notify = Arc::new(Notify::new());
        let target = spool.target(name, notify.clone(), stats.clone());
        Self::build(capacity, stats, notify, Some(Spooled { spool, target }))
    }

    fn build(
        capacity: usize,
        stats: Arc<LinkStats>,
        notify: Arc<Notify>,
        spooled: Option<Spooled>,
    ) -> Self {
        let (front_key, next_key) = spooled
            .as_ref()
            .map_or((spool::MIDDLE, spool::MIDDLE), |s| s.target.key_range());
        Self {
            inner: Mutex::new(QueueInner {
                items: VecDeque::new(),
                blocked: VecDeque::new(),
                connected: false,
                front_key,
                next_key,
                cursor: None,
            }),
            notify,
            capacity,
            stats,
            spooled,
            blocked_len: AtomicUsize::new(0),
            evacuate_requested: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        // A poisoned lock only means another thread panicked mid-push; the deque is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a message; returns false when a message had to be dropped to make room
    /// (memory-only queues; a spool reports its own drops).
    pub fn push(&self, item: Outbound) -> bool {
        let Some(sp) = &self.spooled else {
            return self.push_memory_only(item);
        };
        let mut inner = self.lock();
        let spooling = !sp.target.is_empty() || !inner.blocked.is_empty();
        if inner.connected && !spooling {
            if inner.items.len() < self.capacity {
                inner.items.push_back(item);
                drop(inner);
                self.notify.notify_one();
                return true;
            }
            // The target does not keep up: what waits in memory (and in flight) must stop
            // holding its origins; the link moves it to the spool.
            self.evacuate_requested.store(true, Ordering::Release);
            self.notify.notify_one();
        }
        if !inner.blocked.is_empty()
            || (sp.spool.limits().overflow == Overflow::Block
                && sp.spool.is_full(&sp.target, record_size(&item)))
        {
            if item.msg.qos == 0 {
                // QoS 0 has no acknowledgement to hold its origin back with: holding it would
                // only grow memory without bound. Dropped and counted.
                drop(inner);
                metrics::spool_full_qos0_dropped(&self.stats);
                return false;
            }
            if inner.blocked.is_empty() {
                warn!(
                    messages = sp.target.len(),
                    bytes = sp.target.bytes(),
                    "spool full: holding new messages unacknowledged upstream (spool_overflow = \"block\")"
                );
            }
            inner.blocked.push_back(item);
            self.blocked_len
                .store(inner.blocked.len(), Ordering::Relaxed);
            return true;
        }
        sp.append_back(&mut inner, item);
        true
    }

    fn push_memory_only(&self, mut item: Outbound) -> bool {
        let mut inner = self.lock();
        if !inner.connected {
            item.complete();
        }
        let mut dropped = 0;
        while inner.items.len() >= self.capacity {
            match inner.items.pop_front() {
                Some(mut old) => {
                    old.complete();
                    dropped += 1;
                }
                None => break,
            }
        }
        inner.items.push_back(item);
        drop(inner);
        if dropped > 0 {
            metrics::queue_overflow(&self.stats, dropped);
        }
        self.notify.notify_one();
        dropped == 0
    }

    /// Whether the memory queue overflowed since the last [`TargetQueue::evacuate`].
    pub fn evacuate_requested(&self) -> bool {
        self.evacuate_requested.load(Ordering::Acquire)
    }

    /// The target is slow or stalled: what the link holds for it (the `inflight` messages,
    /// then the memory queue, oldest first) is written to the front of the spool, so the
    /// origins are acknowledged once it is on disk. The messages stay where they are (in flight
    /// or queued) with their spool key, and a later acknowledgement removes them from the
    /// spool; the spool's read position does not move back, so nothing is read twice while
    /// connected. Returns how many messages were spooled.
    pub fn evacuate(&self, inflight: &mut [&mut Outbound]) -> usize {
        self.evacuate_requested.store(false, Ordering::Release);
        let Some(sp) = &self.spooled else { return 0 };
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut held: Vec<&mut Outbound> = inflight
            .iter_mut()
            .map(|o| &mut **o)
            .chain(inner.items.iter_mut())
            .filter(|o| o.key.is_none())
            .collect();
        if held.is_empty() {
            return 0;
        }
        // Everything spooled is newer than what the link holds unkeyed (a message goes to
        // memory only while the spool is empty): it all goes in front, in order.
        let old_front = inner.front_key;
        inner.front_key -= held.len() as u64;
        let start = inner.front_key;
        if inner.cursor.is_none() {
            inner.cursor = Some(old_front);
        }
        for (key, item) in (start..).zip(held.iter_mut()) {
            let share = item.share.take();
            sp.write(key, item, share);
            item.key = Some(key);
        }
        held.len()
    }

    /// The first spool row behind the read position, when the link holds nothing from this
    /// queue and no deletion is on its way to disk: a row nobody will read. Never expected
    /// (the link keeps every row it read until it deletes it); `None` when there is none, or
    /// when the answer is not certain yet.
    pub fn orphaned_row(&self) -> Option<u64> {
        let sp = self.spooled.as_ref()?;
        let inner = self.lock();
        let cursor = inner.cursor?;
        if sp.target.committed() == 0 || sp.target.deletes_pending() > 0 {
            return None;
        }
        let first = sp.spool.read(&sp.target, None, 1).ok()?.first()?.0;
        (first < cursor).then_some(first)
    }

    /// Reads the spool from its first row again. Only safe while the link holds nothing
    /// taken from this queue: rows it holds would be read twice.
    pub fn rewind(&self) {
        self.lock().cursor = None;
    }

    /// Moves messages held by a full spool (policy `block`) into it as room appears.
    pub fn unblock(&self) {
        let Some(sp) = &self.spooled else { return };
        if self.blocked_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut inner = self.lock();
        while let Some(front) = inner.blocked.front() {
            if sp.spool.is_full(&sp.target, record_size(front)) {
                break;
            }
            let Some(item) = inner.blocked.pop_front() else {
                break;
            };
            sp.append_back(&mut inner, item);
        }
        self.blocked_len
            .store(inner.blocked.len(), Ordering::Relaxed);
    }

    /// Puts messages back at the front, in the order given (the connection could not take them).
    pub fn requeue_front(&self, items: Vec<Outbound>) {
        let mut inner = self.lock();
        for mut item in items.into_iter().rev() {
            if !inner.connected && self.spooled.is_none() {
                item.complete();
            }
            inner.items.push_front(item);
        }
    }

    /// Takes up to `max` messages: from memory first, then from the spool.
    pub fn take(&self, max: usize, out: &mut Vec<Outbound>) {
        let before = out.len();
        let (sp, cursor) = {
            let mut inner = self.lock();
            let n = max.min(inner.items.len());
            out.extend(inner.items.drain(..n));
            match &self.spooled {
                Some(sp) if out.len() - before < max && sp.target.committed() > 0 => {
                    (sp, inner.cursor)
                }
                _ => return,
            }
        };
        let want = max - (out.len() - before);
        let rows = match sp.spool.read(&sp.target, cursor, want) {
            Ok(rows) => rows,
            Err(e) => {
                // A failing spool is reported once by its writer, not on every read.
                if !sp.spool.is_failing() {
                    warn!(error = %e, "spool read failed; retrying later");
                }
                return;
            }
        };
        let Some(last) = rows.last().map(|r| r.0) else {
            return;
        };
        for (key, value) in rows {
            match spool::decode(&value) {
                Ok(Decoded::Message(origin, msg)) => out.push(Outbound {
                    msg: Arc::new(msg),
                    share: None,
                    origin,
                    key: Some(key),
                }),
                Ok(Decoded::Expired(msg)) => {
                    metrics::message_rejected(
                        &self.stats,
                        &msg.topic,
                        "message expiry interval ran out in the spool",
                    );
                    sp.spool.delete(&sp.target, key);
                }
                Err(e) => {
                    inc(&self.stats.rejected);
                    warn!(key, error = %e, "unreadable spool record skipped");
                    sp.spool.delete(&sp.target, key);
                }
            }
        }
        self.lock().cursor = Some(last + 1);
    }

    /// The target is done with a message (acknowledged, or skipped): its share completes and
    /// its spool row is removed.
    pub fn finish(&self, mut item: Outbound) {
        item.complete();
        if let (Some(sp), Some(key)) = (&self.spooled, item.key) {
            sp.spool.delete(&sp.target, key);
        }
    }

    /// The connection to the target ended. `unconfirmed` are the messages it had not
    /// acknowledged, oldest first. With a spool, they and the memory queue go to the front of
    /// the spool (messages read from the spool are still there); on `shutdown` only those
    /// without an origin acknowledgement waiting on them are spooled: the others are left
    /// unacknowledged, so their origin brokers deliver them again after the restart.
    pub fn disconnected(&self, unconfirmed: Vec<Outbound>, shutdown: bool) {
        let Some(sp) = &self.spooled else {
            self.requeue_front(unconfirmed);
            self.set_connected(false);
            return;
        };
        let mut inner = self.lock();
        inner.connected = false;
        inner.cursor = None;
        let items: Vec<Outbound> = unconfirmed
            .into_iter()
            .chain(inner.items.drain(..))
            .filter(|o| o.key.is_none() && !(shutdown && o.share.is_some()))
            .collect();
        sp.prepend(&mut inner, items);
    }

    /// Waits until what was spooled for this target is on disk.
    pub async fn sync(&self) {
        if let Some(sp) = &self.spooled {
            sp.spool.sync().await;
        }
    }

    /// Deletes this target's spool (its broker left the mesh).
    pub fn discard_spool(&self) {
        if let Some(sp) = &self.spooled {
            sp.spool.discard(&sp.target);
        }
    }

    /// Number of messages in memory (not counting those in flight or spooled).
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// True when nothing is queued in memory.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spooled messages readable now (committed to disk).
    pub fn spool_readable(&self) -> u64 {
        self.spooled.as_ref().map_or(0, |sp| sp.target.committed())
    }

    /// Spooled messages, their bytes, and messages waiting for room in the spool.
    pub fn spool_depth(&self) -> (u64, u64, u64) {
        self.spooled.as_ref().map_or((0, 0, 0), |sp| {
            (
                sp.target.len(),
                sp.target.bytes(),
                self.blocked_len.load(Ordering::Relaxed) as u64,
            )
        })
    }

    /// The overflow policy of the spool (`drop_oldest` without one).
    pub fn spool_overflow(&self) -> Overflow {
        self.spooled
            .as_ref()
            .map_or(Overflow::default(), |sp| sp.spool.limits().overflow)
    }

    /// Marks the target connected (shares are held until its broker acknowledges) or down.
    /// Without a spool, going down completes the shares of everything queued.
    pub fn set_connected(&self, connected: bool) {
        let mut inner = self.lock();
        inner.connected = connected;
        inner.cursor = None;
        if !connected && self.spooled.is_none() {
            for item in inner.items.iter_mut() {
                item.complete();
            }
        }
    }

    /// Waits until something is pushed, or the spool changed.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// Bytes a message takes in the spool, close enough for the byte bound.
fn record_size(item: &Outbound) -> u64 {
    (32 + item.origin.len() + item.msg.topic.len() + item.msg.payload.len()) as u64
}

/// A retained message with the name of the broker it came from.
type Retained = (Arc<str>, Arc<Message>);

/// Every target with its link name, as the fan-out reads them.
type TargetList = Arc<[(Arc<str>, Arc<TargetQueue>)]>;

/// The set of targets, by link name, and the mesh's retained messages.
#[derive(Debug, Default)]
pub struct Router {
    /// Replaced as a whole on every insert and remove (links come and go rarely); every
    /// message reads it with one `Arc` clone, no allocation.
    targets: RwLock<TargetList>,
    /// Last retained message per topic (with its origin), handed to brokers added at run time.
    retained: Mutex<RetainedTable>,
    retained_max: usize,
    retained_max_bytes: u64,
}

/// The retained messages and their size.
#[derive(Debug, Default)]
struct RetainedTable {
    by_topic: HashMap<Bytes, Retained, ahash::RandomState>,
    /// Sum of [`Message::approx_packet_size`] over `by_topic`.
    bytes: u64,
    /// Retained messages not remembered because a bound was reached.
    skipped: u64,
}

impl RetainedTable {
    fn remove(&mut self, topic: &[u8]) {
        if let Some((_, old)) = self.by_topic.remove(topic) {
            self.bytes -= old.approx_packet_size() as u64;
        }
    }
}

/// What [`Router::retained_stats`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetainedStats {
    /// Retained messages remembered.
    pub messages: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Retained messages not remembered because a bound was reached.
    pub skipped: u64,
}

impl Router {
    /// A router keeping at most `retained_max` retained messages of `retained_max_bytes` in all.
    pub fn new(retained_max: usize, retained_max_bytes: u64) -> Self {
        Self {
            retained_max,
            retained_max_bytes,
            ..Self::default()
        }
    }

    fn note_retained(&self, origin: &Arc<str>, msg: &Arc<Message>) {
        let mut table = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        // The older value goes in any case: kept, it would be handed out stale.
        table.remove(&msg.topic);
        if msg.payload.is_empty() {
            return;
        }
        let size = msg.approx_packet_size() as u64;
        if table.by_topic.len() >= self.retained_max || table.bytes + size > self.retained_max_bytes
        {
            table.skipped += 1;
            if table.skipped == 1 || table.skipped.is_multiple_of(1000) {
                warn!(
                    topic = %metrics::loggable_topic(&msg.topic),
                    bytes = size,
                    skipped_total = table.skipped,
                    retained_max = self.retained_max,
                    retained_max_bytes = self.retained_max_bytes,
                    "retained table full: message not remembered for brokers added later"
                );
            }
            return;
        }
        table.bytes += size;
        table
            .by_topic
            .insert(msg.topic.clone(), (origin.clone(), msg.clone()));
    }

    /// The retained messages known to the mesh, with their origins.
    pub fn retained_snapshot(&self) -> Vec<Retained> {
        let table = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        table.by_topic.values().cloned().collect()
    }

    /// Number of retained messages known.
    pub fn retained_len(&self) -> usize {
        self.retained_stats().messages
    }

    /// Size of the retained table.
    pub fn retained_stats(&self) -> RetainedStats {
        let table = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        RetainedStats {
            messages: table.by_topic.len(),
            bytes: table.bytes,
            skipped: table.skipped,
        }
    }

    /// Adds (or replaces) a target.
    pub fn insert(&self, name: Arc<str>, queue: Arc<TargetQueue>) {
        let mut targets = self.targets.write().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<_> = targets
            .iter()
            .filter(|(n, _)| *n != name)
            .cloned()
            .collect();
        list.push((name, queue));
        *targets = list.into();
    }

    /// Removes a target; what was queued for it is returned to the caller to dispose of.
    pub fn remove(&self, name: &str) -> Option<Arc<TargetQueue>> {
        let mut targets = self.targets.write().unwrap_or_else(|p| p.into_inner());
        let removed = targets
            .iter()
            .find(|(n, _)| n.as_ref() == name)
            .map(|(_, q)| q.clone());
        *targets = targets
            .iter()
            .filter(|(n, _)| n.as_ref() != name)
            .cloned()
            .collect();
        removed
    }

    /// Sends `msg` from `origin` to every other target. With `ack`, the origin is acknowledged
    /// once every target has completed its share (at once when there is no target).
    /// Returns the number of targets.
    pub fn forward(
        &self,
        origin: &Arc<str>,
        msg: Message,
        ack: Option<(AckRequest, &mpsc::UnboundedSender<AckRequest>)>,
    ) -> usize {
        let list = self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let targets = || {
            list.iter()
                .filter(|(name, _)| name.as_ref() != origin.as_ref())
                .map(|(_, queue)| queue)
        };
        let n = targets().count();
        let mut shares: Vec<Option<AckShare>> = match ack {
            Some((req, tx)) if n > 0 => AckGroup::split(req, tx.clone(), n)
                .into_iter()
                .map(Some)
                .collect(),
            Some((req, tx)) => {
                let _ = tx.send(req);
                Vec::new()
            }
            None => Vec::new(),
        };
        let msg = Arc::new(msg);
        if msg.retain {
            self.note_retained(origin, &msg);
        }
        for target in targets() {
            target.push(Outbound::new(
                msg.clone(),
                shares.pop().flatten(),
                origin.clone(),
            ));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Message {
        Message {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from_static(b"p"),
            qos: 1,
            retain: false,
            properties: None,
        }
    }

    fn queue(cap: usize) -> Arc<TargetQueue> {
        Arc::new(TargetQueue::new(cap, Arc::new(LinkStats::default())))
    }

    #[test]
    fn forward_skips_origin_and_acks_after_all_connected_targets() {
        let router = Router::default();
        let (a, b, c) = (queue(10), queue(10), queue(10));
        b.set_connected(true);
        c.set_connected(true);
        router.insert("a".into(), a.clone());
        router.insert("b".into(), b.clone());
        router.insert("c".into(), c.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let req = AckRequest {
            pkid: 5,
            qos: 1,
            epoch: 0,
        };
        assert_eq!(router.forward(&"a".into(), msg(), Some((req, &tx))), 2);
        assert_eq!((a.len(), b.len(), c.len()), (0, 1, 1));
        let mut got = Vec::new();
        b.take(10, &mut got);
        got.pop().unwrap().complete();
        assert!(rx.try_recv().is_err());
        c.take(10, &mut got);
        got.pop().unwrap().complete();
        assert_eq!(rx.try_recv().unwrap(), req);
    }

    #[test]
    fn removed_or_replaced_targets_leave_the_fan_out() {
        let router = Router::default();
        let (a, b, c, c2) = (queue(10), queue(10), queue(10), queue(10));
        router.insert("a".into(), a.clone());
        router.insert("b".into(), b.clone());
        router.insert("c".into(), c.clone());
        assert!(router.remove("b").is_some_and(|q| Arc::ptr_eq(&q, &b)));
        assert!(router.remove("b").is_none(), "removed once");
        router.insert("c".into(), c2.clone());
        assert_eq!(router.forward(&"a".into(), msg(), None), 1, "only c, once");
        assert_eq!((b.len(), c.len(), c2.len()), (0, 0, 1));
    }

    #[test]
    fn down_target_does_not_hold_the_ack() {
        let router = Router::default();
        let (a, b) = (queue(10), queue(10));
        router.insert("a".into(), a);
        router.insert("b".into(), b.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();
        router.forward(
            &"a".into(),
            msg(),
            Some((
                AckRequest {
                    pkid: 1,
                    qos: 1,
                    epoch: 0,
                },
                &tx,
            )),
        );
        assert!(
            rx.try_recv().is_ok(),
            "b is down: the origin is acked at once"
        );
        assert_eq!(b.len(), 1, "and b keeps the message");
    }

    /// 31 retained messages of 10 MB took the bridge from 62 to 359 MB: the table is bounded
    /// in bytes too. What does not fit is not remembered, and never handed out stale.
    #[test]
    fn retained_table_is_bounded_in_bytes_and_never_keeps_a_stale_value() {
        let router = Router::new(1000, 10_000);
        let retained = |topic: &'static [u8], size: usize| Message {
            topic: Bytes::from_static(topic),
            payload: Bytes::from(vec![b'x'; size]),
            qos: 0,
            retain: true,
            properties: None,
        };
        for topic in [&b"t/1"[..], b"t/2", b"t/3", b"t/4"] {
            router.forward(&"a".into(), retained(topic, 3_000), None);
        }
        let stats = router.retained_stats();
        assert_eq!(
            (stats.messages, stats.skipped),
            (3, 1),
            "the fourth does not fit"
        );
        assert!(stats.bytes <= 10_000, "{stats:?}");
        // t/1 grows beyond what is left: its old value is forgotten, not kept stale.
        router.forward(&"a".into(), retained(b"t/1", 8_000), None);
        let stats = router.retained_stats();
        assert_eq!((stats.messages, stats.skipped), (2, 2));
        assert!(
            router
                .retained_snapshot()
                .iter()
                .all(|(_, m)| m.topic.as_ref() != b"t/1")
        );
        // Deleting frees room.
        router.forward(&"a".into(), retained(b"t/2", 0), None);
        router.forward(&"a".into(), retained(b"t/5", 3_000), None);
        let stats = router.retained_stats();
        assert_eq!(stats.messages, 2);
        assert_eq!(
            stats.bytes,
            router
                .retained_snapshot()
                .iter()
                .map(|(_, m)| m.approx_packet_size() as u64)
                .sum::<u64>()
        );
    }

    #[test]
    fn retained_table_keeps_last_per_topic_and_clears_on_empty() {
        let router = Router::new(2, 1 << 20);
        let retained = |topic: &'static [u8], payload: &'static [u8]| Message {
            topic: Bytes::from_static(topic),
            payload: Bytes::from_static(payload),
            qos: 0,
            retain: true,
            properties: None,
        };
        router.forward(&"a".into(), retained(b"t/1", b"one"), None);
        router.forward(&"a".into(), retained(b"t/1", b"uno"), None);
        router.forward(&"b".into(), retained(b"t/2", b"two"), None);
        router.forward(&"b".into(), retained(b"t/3", b"three"), None);
        assert_eq!(router.retained_len(), 2, "bounded");
        let mut snap: Vec<_> = router
            .retained_snapshot()
            .into_iter()
            .map(|(o, m)| (o.to_string(), m.payload.clone()))
            .collect();
        snap.sort();
        assert_eq!(
            snap,
            vec![
                ("a".into(), Bytes::from_static(b"uno")),
                ("b".into(), Bytes::from_static(b"two"))
            ]
        );
        router.forward(&"a".into(), retained(b"t/1", b""), None);
        assert_eq!(
            router.retained_len(),
            1,
            "an empty retained payload clears the topic"
        );
        router.forward(&"a".into(), msg(), None);
        assert_eq!(router.retained_len(), 1, "live messages are not retained");
    }

    fn payloads(items: &[Outbound]) -> Vec<u8> {
        items.iter().map(|o| o.msg.payload[0]).collect()
    }

    /// A message whose one-byte payload is `n` (see [`payloads`]).
    fn numbered(n: u8) -> Arc<Message> {
        Arc::new(Message {
            payload: Bytes::from(vec![n]),
            ..msg()
        })
    }

    /// A queue of `capacity` messages in front of target `t`'s spool, in a fresh directory
    /// (keep it alive as long as the spool).
    fn spooled_queue(capacity: usize) -> (tempfile::TempDir, Arc<Spool>, TargetQueue) {
        let dir = tempfile::tempdir().unwrap();
        let limits = spool::Limits {
            max_bytes: 1 << 30,
            max_messages: 1_000_000,
            overflow: Overflow::DropOldest,
        };
        let sp = Spool::open(dir.path(), limits).unwrap();
        let q = TargetQueue::with_spool(capacity, Arc::new(LinkStats::default()), sp.clone(), "t");
        (dir, sp, q)
    }

    #[tokio::test]
    async fn evacuated_messages_stay_held_and_are_read_once_in_order() {
        let (_dir, sp, q) = spooled_queue(2);
        q.set_connected(true);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let push = |n: u8| {
            let req = AckRequest {
                pkid: u16::from(n),
                qos: 1,
                epoch: 0,
            };
            let share = AckGroup::split(req, tx.clone(), 1).pop();
            q.push(Outbound::new(numbered(n), share, "o".into()));
        };
        push(1);
        push(2);
        let mut flying = Vec::new();
        q.take(1, &mut flying);
        assert_eq!(payloads(&flying), [1]);
        assert!(
            rx.try_recv().is_err(),
            "held by the target while it keeps up"
        );

        // The target stalls: 1 (in flight) and 2 (queued) go to disk and release their origin,
        // but stay where they are.
        let mut refs: Vec<&mut Outbound> = flying.iter_mut().collect();
        assert_eq!(q.evacuate(&mut refs), 2);
        q.sync().await;
        let acked: Vec<u16> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| r.pkid)
            .collect();
        assert_eq!(acked, [1, 2]);
        push(3);
        push(4);
        q.sync().await;
        let mut rest = Vec::new();
        q.take(10, &mut rest);
        assert_eq!(
            payloads(&rest),
            [2, 3, 4],
            "nothing read twice while connected"
        );

        // The connection drops with nothing acknowledged: all four wait, in order.
        flying.append(&mut rest);
        q.disconnected(flying, false);
        q.sync().await;
        q.set_connected(true);
        let mut again = Vec::new();
        q.take(10, &mut again);
        assert_eq!(payloads(&again), [1, 2, 3, 4]);
        for item in again {
            q.finish(item);
        }
        q.sync().await;
        assert_eq!(q.spool_depth().0, 0, "delivered messages leave the spool");
        sp.close();
    }

    #[tokio::test]
    async fn only_rows_nobody_holds_or_deletes_count_as_orphaned() {
        let (_dir, sp, q) = spooled_queue(1);
        // Down: everything goes to the spool.
        for n in 1..=4 {
            q.push(Outbound::new(numbered(n), None, "o".into()));
        }
        q.sync().await;
        q.set_connected(true);
        assert_eq!(q.orphaned_row(), None, "nothing read yet");
        let mut read = Vec::new();
        q.take(2, &mut read);
        assert_eq!(payloads(&read), [1, 2]);
        // Delivered: whether their deletions are still on their way (the rows still readable)
        // or already on disk, those rows are not orphans.
        for item in read.drain(..) {
            q.finish(item);
        }
        assert_eq!(q.orphaned_row(), None, "deletions on their way");
        q.sync().await;
        assert_eq!(q.orphaned_row(), None, "deleted rows are gone");
        q.take(1, &mut read);
        assert_eq!(payloads(&read), [3]);
        // A message read and then forgotten (never finished) is the one case counted.
        let first = read.pop().unwrap().key;
        assert_eq!(q.orphaned_row(), first);
        q.rewind();
        q.take(10, &mut read);
        assert_eq!(payloads(&read), [3, 4], "read again from the first row");
        sp.close();
    }

    #[test]
    fn overflow_drops_oldest_and_releases_it() {
        let q = queue(2);
        q.set_connected(true);
        let router = Router::default();
        router.insert("q".into(), q.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();
        for pkid in 1..=3 {
            router.forward(
                &"o".into(),
                msg(),
                Some((
                    AckRequest {
                        pkid,
                        qos: 1,
                        epoch: 0,
                    },
                    &tx,
                )),
            );
        }
        assert_eq!(q.len(), 2);
        assert_eq!(
            rx.try_recv().unwrap().pkid,
            1,
            "the dropped message no longer holds its origin"
        );
    }
}
