//! The queue of one target.
//!
//! Each link owns a [`TargetQueue`]: a bounded queue in memory in front of the target's durable
//! [`spool`](crate::spool). While the target is connected and keeps up, a message stays in
//! memory and keeps its [`crate::message::AckShare`] until the target's broker acknowledges it, so the origin
//! is acknowledged only when every connected target has it. When the target is down, or its
//! memory queue is full, the message goes to the spool instead and its share completes once it
//! is on disk (with parking, once its origin broker holds a copy: [`crate::park`]): a down or
//! slow target never holds back the others, and a bridge crash (or, with parking, the loss of
//! the bridge host) loses nothing. Once anything is spooled, later messages follow it into the spool until the target
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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use tracing::warn;

use super::Outbound;
use super::hold::Hold;
use super::spooled::{ParkSend, Spooled, record_size};
use crate::doorbell::Doorbell;
use crate::metrics::{self, LinkStats};
use crate::park::{Copies, Park, ParkItem, Parker};
use crate::spool::{self, Overflow, Spool};

#[derive(Debug)]
pub(super) struct QueueInner {
    /// In memory, in order; older than anything spooled.
    pub(super) items: VecDeque<Outbound>,
    /// Waiting for room in a full spool (overflow policy `block`), holding their shares.
    pub(super) blocked: VecDeque<Outbound>,
    pub(super) connected: bool,
    /// Next spool key at the front (exclusive) and at the back.
    pub(super) front_key: u64,
    pub(super) next_key: u64,
    /// Next spool key to read; `None`: from the first.
    pub(super) cursor: Option<u64>,
    /// Park records to hand to the origins' queues once this lock is released (see
    /// [`TargetQueue::send_parked`]), in the order they were made.
    pub(super) outbox: Vec<ParkSend>,
    /// Over capacity, holding its origins instead of spilling (see [`super::hold`]).
    pub(super) hold: Hold,
}

/// The queue of messages waiting for one target.
#[derive(Debug)]
pub(crate) struct TargetQueue {
    inner: Mutex<QueueInner>,
    notify: Arc<Doorbell>,
    capacity: usize,
    stats: Arc<LinkStats>,
    spooled: Option<Spooled>,
    blocked_len: AtomicUsize,
    /// Set when the memory queue overflowed: the link should move what holds origin
    /// acknowledgements to the spool ([`TargetQueue::evacuate`]).
    evacuate_requested: AtomicBool,
    /// The target's topic rules (the fan-out queues only what an `out` rule takes; the link
    /// maps through them), replaced as a whole when they change at run time.
    rules: std::sync::RwLock<Arc<crate::rules::Rules>>,
    /// Set when the rules changed: the link subscribes and unsubscribes the difference.
    rules_changed: AtomicBool,
    /// `hold.on()`, read without the lock.
    holding: AtomicBool,
    /// The router's count of queues holding their origins (see [`super::Router::holds`]).
    holding_count: OnceLock<Arc<AtomicUsize>>,
}

impl TargetQueue {
    /// An in-memory queue holding at most `capacity` messages (no spool).
    #[cfg(test)]
    pub(crate) fn new(capacity: usize, stats: Arc<LinkStats>) -> Self {
        Self::build(capacity, stats, Arc::new(Doorbell::new()), None)
    }

    /// A queue holding at most `capacity` messages in memory in front of `name`'s spool.
    pub(crate) fn with_spool(
        capacity: usize,
        stats: Arc<LinkStats>,
        spool: Arc<Spool>,
        name: &str,
    ) -> Self {
        let notify = Arc::new(Doorbell::new());
        let target = spool.target(name, notify.clone(), stats.clone());
        let spooled = Spooled {
            spool,
            target,
            park: None,
            copies: Copies::default(),
            sending: Mutex::new(()),
            stats: stats.clone(),
        };
        Self::build(capacity, stats, notify, Some(spooled))
    }

    /// This queue with copies of what it spools kept on the origin brokers (see
    /// [`crate::park`]); `name` is its target's.
    pub(crate) fn with_parker(mut self, parker: Arc<Parker>, name: &str) -> Self {
        if let Some(sp) = &mut self.spooled {
            sp.park = Some((parker, name.into()));
        }
        self
    }

    /// While the target is connected: a marker goes behind the copies on every origin that has
    /// some (see [`crate::park::Copies::due_markers`]), when its spool is empty or, with
    /// `delivered`, when it delivered from it since the last markers. Once the origin
    /// acknowledged it, the origin's owner discards the copies before it whose rows this spool
    /// no longer holds (all of them when it is empty). Under this queue's lock, so that no copy
    /// written in the meantime lands before its marker.
    pub(crate) fn mark_copies(&self, delivered: bool) {
        let Some(sp) = &self.spooled else { return };
        let Some((_, name)) = &sp.park else {
            return;
        };
        if !sp.copies.any() {
            return;
        }
        let mut inner = self.lock();
        if !inner.connected {
            return;
        }
        let empty = sp.is_empty(&inner);
        if !empty && !delivered {
            return;
        }
        for origin in sp.copies.due_markers(empty) {
            let marker = Park::Marker {
                target: name.clone(),
                nonce: rand::random(),
            };
            inner.outbox.push(ParkSend {
                origin,
                item: ParkItem {
                    park: marker,
                    share: None,
                },
            });
        }
        drop(inner);
        self.send_parked();
    }

    /// Waits until every spool write sent so far is on disk (or held in memory, readable).
    pub(crate) async fn sync_spool(&self) {
        if let Some(sp) = &self.spooled {
            sp.spool.sync().await;
        }
    }

    /// Whether this target's spool is empty (nothing on disk, on its way, or held back).
    pub(crate) fn spool_empty(&self) -> bool {
        self.spooled
            .as_ref()
            .is_none_or(|sp| sp.is_empty(&self.lock()))
    }

    /// Hands the park records made under the lock to their origins' queues, in order.
    fn send_parked(&self) {
        let Some(sp) = &self.spooled else { return };
        let Some((parker, _)) = &sp.park else { return };
        let _order = sp.sending.lock().unwrap_or_else(|p| p.into_inner());
        let sends = std::mem::take(&mut self.lock().outbox);
        for s in sends {
            let copy = matches!(s.item.park, Park::Copy { .. });
            if parker.send(&s.origin, s.item) && copy {
                sp.copies.note(&s.origin);
            }
        }
    }

    /// Whether this target's spool holds `record` under `key` (a park copy it need not deliver
    /// again); `None` when the spool cannot be read now. A row gone from it was delivered, or
    /// dropped by its limits.
    pub(crate) fn spool_holds(&self, key: u64, record: &[u8]) -> Option<bool> {
        let sp = self.spooled.as_ref()?;
        let rows = sp.spool.read(&sp.target, Some(key), 1).ok()?;
        Some(
            rows.into_iter()
                .next()
                .is_some_and(|(k, v)| k == key && v == record),
        )
    }

    fn build(
        capacity: usize,
        stats: Arc<LinkStats>,
        notify: Arc<Doorbell>,
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
                outbox: Vec::new(),
                hold: Hold::default(),
            }),
            notify,
            capacity,
            stats,
            spooled,
            blocked_len: AtomicUsize::new(0),
            evacuate_requested: AtomicBool::new(false),
            rules: std::sync::RwLock::new(Arc::new(crate::rules::Rules::everything(&[
                "#".to_string()
            ]))),
            rules_changed: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            holding_count: OnceLock::new(),
        }
    }

    /// Counts this queue in `count` while it holds its origins (see [`super::Router::holds`]).
    pub(super) fn count_holding_in(&self, count: Arc<AtomicUsize>) {
        let _ = self.holding_count.set(count);
    }

    /// Whether this queue is over its capacity, holding its origins (see [`super::hold`]).
    pub(crate) fn holding(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    /// The hold started (`true`) or ended: counted for the router. Called under the queue's
    /// lock, so that `holding` follows `hold.on()`.
    fn set_holding(&self, on: bool) {
        if self.holding.swap(on, Ordering::AcqRel) == on {
            return;
        }
        if on {
            metrics::inc(&self.stats.holds);
        }
        if let Some(count) = self.holding_count.get() {
            if on {
                count.fetch_add(1, Ordering::AcqRel);
            } else {
                count.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// The hold (if any) ended: the queue is back under its capacity, spilled, or went down.
    fn end_hold(&self, inner: &mut QueueInner, spilled: bool) {
        let was = if spilled {
            inner.hold.spilled(Instant::now())
        } else {
            inner.hold.end()
        };
        if was {
            self.set_holding(false);
        }
    }

    /// This queue with its target's topic rules (default: everything).
    pub(crate) fn with_rules(self, rules: Arc<crate::rules::Rules>) -> Self {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = rules;
        self
    }

    /// The target's rules now.
    pub(crate) fn rules(&self) -> Arc<crate::rules::Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `f` of the target's rules now, without a clone of their `Arc` (per message and target).
    pub(crate) fn in_rules<R>(&self, f: impl FnOnce(&crate::rules::Rules) -> R) -> R {
        f(&self.rules.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// New rules for the target (a reload): from the next message on; the link is told.
    pub(crate) fn set_rules(&self, rules: Arc<crate::rules::Rules>) {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = rules;
        self.rules_changed.store(true, Ordering::Release);
        self.notify.ring();
    }

    /// Whether the rules changed since the last call.
    pub(crate) fn take_rules_changed(&self) -> bool {
        self.rules_changed.swap(false, Ordering::AcqRel)
    }

    /// Whether the target takes a mesh message on `topic` ([`crate::message::Message::topic_str`]; a topic that
    /// is not UTF-8, `None`, is taken: the link reports it as rejected).
    pub(crate) fn accepts(&self, topic: Option<&str>) -> bool {
        topic.is_none_or(|t| self.in_rules(|r| r.outbound(t).is_some()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        // A poisoned lock only means another thread panicked mid-push; the deque is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a message; returns false when a message had to be dropped to make room
    /// (memory-only queues; a spool reports its own drops).
    pub(crate) fn push(&self, item: Outbound) -> bool {
        let Some(sp) = &self.spooled else {
            return self.push_memory_only(item);
        };
        let mut inner = self.lock();
        let spooling = !sp.is_empty(&inner);
        if item.probe && (!inner.connected || spooling || inner.items.len() >= self.capacity) {
            drop(inner);
            let mut item = item;
            item.complete();
            return true;
        }
        if inner.connected && !spooling {
            let len = inner.items.len();
            if len < self.capacity || inner.hold.admit(len, self.capacity, Instant::now()) {
                inner.items.push_back(item);
                if len >= self.capacity {
                    // The origins that may be held stop reading (see `super::hold`). Under
                    // the lock, as every end of a hold: a take on the link's thread in
                    // between would leave the count up with no hold to end it.
                    self.set_holding(true);
                }
                drop(inner);
                self.notify.ring();
                return true;
            }
            // The target does not keep up: what waits in memory (and in flight) must stop
            // holding its origins; the link moves it to the spool.
            self.end_hold(&mut inner, true);
            self.evacuate_requested.store(true, Ordering::Release);
            self.notify.ring();
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
        drop(inner);
        self.send_parked();
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
        self.notify.ring();
        dropped == 0
    }

    /// Whether the memory queue overflowed since the last [`TargetQueue::evacuate`], or has
    /// held its origins for as long as it may (see [`super::hold`]).
    pub(crate) fn evacuate_requested(&self) -> bool {
        if self.holding() && self.lock().hold.expired(Instant::now()) {
            self.evacuate_requested.store(true, Ordering::Release);
        }
        self.evacuate_requested.load(Ordering::Acquire)
    }

    /// The target left the mesh: its hold (if any) no longer holds the origins.
    pub(crate) fn release_hold(&self) {
        if self.holding() {
            let mut inner = self.lock();
            self.end_hold(&mut inner, false);
        }
    }

    /// The target is slow or stalled: what the link holds for it (the `inflight` messages,
    /// then the memory queue, oldest first) is written to the front of the spool, so the
    /// origins are acknowledged once it is on disk. The messages stay where they are (in flight
    /// or queued) with their spool key, and a later acknowledgement removes them from the
    /// spool; the spool's read position does not move back, so nothing is read twice while
    /// connected. Returns how many messages were spooled.
    pub(crate) fn evacuate(&self, inflight: &mut [&mut Outbound]) -> usize {
        self.evacuate_requested.store(false, Ordering::Release);
        let Some(sp) = &self.spooled else { return 0 };
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.end_hold(inner, true);
        let mut held: Vec<&mut Outbound> = inflight
            .iter_mut()
            .map(|o| &mut **o)
            .chain(inner.items.iter_mut())
            .filter(|o| o.key.is_none() && !o.probe)
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
        let mut sends = Vec::new();
        for (key, item) in (start..).zip(held.iter_mut()) {
            let share = item.share.take();
            sends.extend(sp.write(key, item, share));
            item.key = Some(key);
        }
        let moved = held.len();
        drop(held);
        inner.outbox.extend(sends);
        drop(guard);
        self.send_parked();
        moved
    }

    /// The first spool row behind the read position, when the link holds nothing from this
    /// queue and no deletion is on its way to disk: a row nobody will read. Never expected
    /// (the link keeps every row it read until it deletes it); `None` when there is none, or
    /// when the answer is not certain yet.
    pub(crate) fn orphaned_row(&self) -> Option<u64> {
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
    pub(crate) fn rewind(&self) {
        self.lock().cursor = None;
    }

    /// Moves messages held by a full spool (policy `block`) into it as room appears.
    pub(crate) fn unblock(&self) {
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
        drop(inner);
        self.send_parked();
    }

    /// Puts messages back at the front, in the order given (the connection could not take them).
    pub(crate) fn requeue_front(&self, items: Vec<Outbound>) {
        let mut inner = self.lock();
        for mut item in items.into_iter().rev() {
            if !inner.connected && self.spooled.is_none() {
                item.complete();
            }
            inner.items.push_front(item);
        }
    }

    /// The connection ended to come back in the other role (see [`crate::ha`]): `unconfirmed`
    /// (oldest first) goes back in front of the memory queue, but for what was read from the
    /// spool, there or in memory: the next connection reads the spool from its first row
    /// again, and those rows are still there (kept in memory too, they would go out twice).
    pub(crate) fn switched(&self, unconfirmed: Vec<Outbound>) {
        let spooled = self.spooled.is_some();
        let mut inner = self.lock();
        inner.items.retain(|o| !(spooled && o.key.is_some()));
        for item in unconfirmed.into_iter().rev() {
            if !(spooled && item.key.is_some()) {
                inner.items.push_front(item);
            }
        }
    }

    /// Takes up to `max` messages: from memory first, then from the spool.
    pub(crate) fn take(&self, max: usize, out: &mut Vec<Outbound>) {
        let before = out.len();
        let (sp, cursor) = {
            let mut inner = self.lock();
            let n = max.min(inner.items.len());
            out.extend(inner.items.drain(..n));
            if inner.items.len() < self.capacity && inner.hold.on() {
                self.end_hold(&mut inner, false);
            }
            match &self.spooled {
                Some(sp) if out.len() - before < max && sp.target.committed() > 0 => {
                    (sp, inner.cursor)
                }
                _ => return,
            }
        };
        let want = max - (out.len() - before);
        if let Some(last) = sp.read(cursor, want, out) {
            self.lock().cursor = Some(last + 1);
        }
    }

    /// `item` cannot be sent to this target (`target`) as mapped (see [`crate::spool::dead`]):
    /// it goes to the dead-letter table (counted and logged), this target's share of its
    /// origin's acknowledgement completes once it is there, and its spool row goes.
    pub(crate) fn set_aside(&self, target: &str, mut item: Outbound, reason: &str) {
        let msg = &item.msg;
        crate::metrics::dead_letter(
            &self.stats,
            &item.origin,
            &msg.topic,
            msg.approx_packet_size(),
            reason,
        );
        let share = item.share.take();
        match &self.spooled {
            Some(sp) => {
                sp.spool
                    .dead_letter(target, &item.origin, msg, reason, share);
                if let Some(key) = item.key {
                    sp.spool.delete(&sp.target, key);
                }
            }
            None => {
                if let Some(share) = share {
                    share.complete();
                }
            }
        }
    }

    /// The target is done with a message (acknowledged, or skipped): its share completes and
    /// its spool row is removed.
    pub(crate) fn finish(&self, mut item: Outbound) {
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
    pub(crate) fn disconnected(&self, unconfirmed: Vec<Outbound>, shutdown: bool) {
        let Some(sp) = &self.spooled else {
            self.requeue_front(unconfirmed);
            self.set_connected(false);
            return;
        };
        let mut inner = self.lock();
        inner.connected = false;
        inner.cursor = None;
        self.end_hold(&mut inner, false);
        let items: Vec<Outbound> = unconfirmed
            .into_iter()
            .chain(inner.items.drain(..))
            .filter_map(|mut o| {
                if o.probe {
                    o.complete();
                    return None;
                }
                (o.key.is_none() && !(shutdown && o.share.is_some())).then_some(o)
            })
            .collect();
        sp.prepend(&mut inner, items);
        drop(inner);
        self.send_parked();
    }

    /// Waits until what was spooled for this target is on disk.
    pub(crate) async fn sync(&self) {
        if let Some(sp) = &self.spooled {
            sp.spool.sync().await;
        }
    }

    /// Deletes this target's spool (its broker left the mesh).
    pub(crate) fn discard_spool(&self) {
        if let Some(sp) = &self.spooled {
            sp.spool.discard(&sp.target);
        }
    }

    /// Number of messages in memory (not counting those in flight or spooled).
    pub(crate) fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// True when nothing is queued in memory.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spooled messages readable now (committed to disk).
    pub(crate) fn spool_readable(&self) -> u64 {
        self.spooled.as_ref().map_or(0, |sp| sp.target.committed())
    }

    /// Spooled messages, their bytes, and messages waiting for room in the spool.
    pub(crate) fn spool_depth(&self) -> (u64, u64, u64) {
        self.spooled.as_ref().map_or((0, 0, 0), |sp| {
            (
                sp.target.len(),
                sp.target.bytes(),
                self.blocked_len.load(Ordering::Relaxed) as u64,
            )
        })
    }

    /// The overflow policy of the spool (`drop_oldest` without one).
    pub(crate) fn spool_overflow(&self) -> Overflow {
        self.spooled
            .as_ref()
            .map_or(Overflow::default(), |sp| sp.spool.limits().overflow)
    }

    /// Marks the target connected (shares are held until its broker acknowledges) or down.
    /// Without a spool, going down completes the shares of everything queued.
    pub(crate) fn set_connected(&self, connected: bool) {
        let mut inner = self.lock();
        inner.connected = connected;
        inner.cursor = None;
        self.end_hold(&mut inner, false);
        if !connected && self.spooled.is_none() {
            for item in inner.items.iter_mut() {
                item.complete();
            }
        }
    }

    /// Waits until something is pushed, or the spool changed (one waiter: the target's link;
    /// cancel-safe).
    pub(crate) async fn notified(&self) {
        self.notify.rung().await
    }
}

#[cfg(test)]
mod tests;
