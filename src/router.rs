//! Fan-out: a message received on one link goes to the queue of every other link.
//!
//! Each link owns a [`TargetQueue`]. While the target is connected, a queued message keeps its
//! [`AckShare`] until the target's broker acknowledges it, so the origin is acknowledged only
//! when every connected target has the message. While a target is down, its share is completed
//! on entry: the message waits in memory for that target and does not hold back the origin (a
//! down target never blocks the others). Queues are bounded; on overflow the oldest message is
//! dropped and counted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::{Notify, mpsc};

use crate::message::{AckGroup, AckRequest, AckShare, Message};
use crate::metrics::{self, LinkStats};

/// A message on its way to one target.
#[derive(Debug)]
pub struct Outbound {
    /// The message, shared by all targets.
    pub msg: Arc<Message>,
    /// This target's share of the origin's acknowledgement (QoS ≥ 1 only).
    pub share: Option<AckShare>,
    /// Origin broker name, for the origin tag.
    pub origin: Arc<str>,
    /// Set when this message was handed to a broker before and is sent again.
    pub resent: bool,
}

impl Outbound {
    /// Completes this target's share, if any.
    pub fn complete(&mut self) {
        if let Some(share) = self.share.take() {
            share.complete();
        }
    }
}

#[derive(Debug, Default)]
struct QueueInner {
    items: VecDeque<Outbound>,
    connected: bool,
}

/// The bounded queue of messages waiting for one target.
#[derive(Debug)]
pub struct TargetQueue {
    inner: Mutex<QueueInner>,
    notify: Notify,
    capacity: usize,
    stats: Arc<LinkStats>,
}

impl TargetQueue {
    /// An empty queue holding at most `capacity` messages.
    pub fn new(capacity: usize, stats: Arc<LinkStats>) -> Self {
        Self {
            inner: Mutex::new(QueueInner::default()),
            notify: Notify::new(),
            capacity,
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        // A poisoned lock only means another thread panicked mid-push; the deque is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a message; returns false when the oldest message had to be dropped.
    pub fn push(&self, mut item: Outbound) -> bool {
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

    /// Puts messages back at the front, in the order given (used after a lost connection).
    pub fn requeue_front(&self, items: Vec<Outbound>) {
        let mut inner = self.lock();
        for mut item in items.into_iter().rev() {
            if !inner.connected {
                item.complete();
            }
            item.resent = true;
            inner.items.push_front(item);
        }
    }

    /// Takes up to `max` messages from the front.
    pub fn take(&self, max: usize, out: &mut Vec<Outbound>) {
        let mut inner = self.lock();
        let n = max.min(inner.items.len());
        out.extend(inner.items.drain(..n));
    }

    /// Number of queued messages (not counting those in flight).
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks the target connected (shares are held until its broker acknowledges) or down
    /// (shares of everything queued are completed now).
    pub fn set_connected(&self, connected: bool) {
        let mut inner = self.lock();
        inner.connected = connected;
        if !connected {
            for item in inner.items.iter_mut() {
                item.complete();
            }
        }
    }

    /// Waits until something is pushed.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// A retained message with the name of the broker it came from.
type Retained = (Arc<str>, Arc<Message>);

/// The set of targets, by link name, and the mesh's retained messages.
#[derive(Debug, Default)]
pub struct Router {
    targets: DashMap<Arc<str>, Arc<TargetQueue>, ahash::RandomState>,
    /// Last retained message per topic (with its origin), handed to brokers added at run time.
    retained: Mutex<HashMap<Bytes, Retained, ahash::RandomState>>,
    retained_max: usize,
}

impl Router {
    /// A router keeping at most `retained_max` retained messages.
    pub fn new(retained_max: usize) -> Self {
        Self {
            retained_max,
            ..Self::default()
        }
    }

    fn note_retained(&self, origin: &Arc<str>, msg: &Arc<Message>) {
        let mut table = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        if msg.payload.is_empty() {
            table.remove(&msg.topic);
        } else if table.len() < self.retained_max || table.contains_key(&msg.topic) {
            table.insert(msg.topic.clone(), (origin.clone(), msg.clone()));
        }
    }

    /// The retained messages known to the mesh, with their origins.
    pub fn retained_snapshot(&self) -> Vec<Retained> {
        let table = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        table.values().cloned().collect()
    }

    /// Number of retained messages known.
    pub fn retained_len(&self) -> usize {
        self.retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Adds (or replaces) a target.
    pub fn insert(&self, name: Arc<str>, queue: Arc<TargetQueue>) {
        self.targets.insert(name, queue);
    }

    /// Removes a target; what was queued for it is returned to the caller to dispose of.
    pub fn remove(&self, name: &str) -> Option<Arc<TargetQueue>> {
        self.targets.remove(name).map(|(_, q)| q)
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
        let targets: Vec<Arc<TargetQueue>> = self
            .targets
            .iter()
            .filter(|e| e.key().as_ref() != origin.as_ref())
            .map(|e| e.value().clone())
            .collect();
        let n = targets.len();
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
        for target in targets {
            target.push(Outbound {
                msg: msg.clone(),
                share: shares.pop().flatten(),
                origin: origin.clone(),
                resent: false,
            });
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

    #[test]
    fn retained_table_keeps_last_per_topic_and_clears_on_empty() {
        let router = Router::new(2);
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
