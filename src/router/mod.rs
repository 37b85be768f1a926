//! Fan-out: a message received on one link goes to the [`TargetQueue`] of every other link,
//! with a share of its origin's acknowledgement each. Retained messages forwarded while a
//! snapshot runs are noted for it ([`RetainedWatch`]): a repair must not overwrite a newer value.

mod hold;
mod outbound;
mod queue;
mod spooled;

pub(crate) use outbound::Outbound;
pub(crate) use queue::TargetQueue;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use crate::message::{AckGroup, AckRequest, AckSender, Message};

/// Every target with its link name, as the fan-out reads them.
type TargetList = Arc<[(Arc<str>, Arc<TargetQueue>)]>;

/// Topics of the retained messages forwarded since a watch began.
type Watched = Arc<Mutex<HashSet<Bytes, ahash::RandomState>>>;

/// The set of targets, by link name.
#[derive(Debug, Default)]
pub(crate) struct Router {
    /// Replaced as a whole on every insert and remove (links come and go rarely); every
    /// message reads it with one `Arc` clone, no allocation.
    targets: RwLock<TargetList>,
    /// Running retained watches; `watching` is their number, read without the lock.
    watches: Mutex<Vec<Watched>>,
    watching: AtomicUsize,
    /// Queues over their capacity, holding their origins (see [`hold`]).
    holding: Arc<AtomicUsize>,
}

/// The retained topics forwarded (by this process) while it lives.
#[derive(Debug)]
pub(crate) struct RetainedWatch<'a> {
    router: &'a Router,
    seen: Watched,
}

impl RetainedWatch<'_> {
    /// Whether a retained message on mesh topic `topic` was forwarded since the watch began.
    pub(crate) fn changed(&self, topic: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(topic.as_bytes())
    }
}

impl Drop for RetainedWatch<'_> {
    fn drop(&mut self) {
        let mut watches = self
            .router
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        watches.retain(|w| !Arc::ptr_eq(w, &self.seen));
        self.router.watching.store(watches.len(), Ordering::Release);
    }
}

impl Router {
    /// Notes the topic of every retained message forwarded from now on, until the watch is
    /// dropped.
    pub(crate) fn watch_retained(&self) -> RetainedWatch<'_> {
        let seen = Watched::default();
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.push(seen.clone());
        self.watching.store(watches.len(), Ordering::Release);
        RetainedWatch { router: self, seen }
    }

    fn note_retained(&self, msg: &Message) {
        if self.watching.load(Ordering::Acquire) == 0 {
            return;
        }
        for w in self
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            w.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(msg.topic.clone());
        }
    }

    /// Whether a target's queue is over its capacity, holding its origins (see [`hold`]): the
    /// links whose brokers may be held stop reading them meanwhile.
    pub(crate) fn holds(&self) -> bool {
        self.holding.load(Ordering::Acquire) > 0
    }

    /// Adds (or replaces) a target.
    pub(crate) fn insert(&self, name: Arc<str>, queue: Arc<TargetQueue>) {
        queue.count_holding_in(self.holding.clone());
        let mut targets = self.targets.write().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<_> = targets
            .iter()
            .filter(|(n, _)| *n != name)
            .cloned()
            .collect();
        list.push((name, queue));
        *targets = list.into();
    }

    /// The queue of `name`.
    pub(crate) fn queue(&self, name: &str) -> Option<Arc<TargetQueue>> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(n, _)| n.as_ref() == name)
            .map(|(_, q)| q.clone())
    }

    /// Every target's name.
    pub(crate) fn names(&self) -> Vec<Arc<str>> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Removes a target; what was queued for it is returned to the caller to dispose of.
    pub(crate) fn remove(&self, name: &str) -> Option<Arc<TargetQueue>> {
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
        if let Some(queue) = &removed {
            queue.release_hold();
        }
        removed
    }

    /// Sends a probe from `origin` to every other target, whatever their rules (see
    /// [`crate::probe`]). It holds no acknowledgement: its link acknowledges it at once (see
    /// `Link::on_probe`).
    pub(crate) fn forward_probe(&self, origin: &Arc<str>, msg: Message) {
        let list = self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let targets: Vec<&Arc<TargetQueue>> = list
            .iter()
            .filter(|(name, _)| name.as_ref() != origin.as_ref())
            .map(|(_, queue)| queue)
            .collect();
        self.fan_out(origin, Arc::new(msg), &targets, None, true);
    }

    fn fan_out(
        &self,
        origin: &Arc<str>,
        msg: Arc<Message>,
        targets: &[&Arc<TargetQueue>],
        ack: Option<(AckRequest, &AckSender)>,
        probe: bool,
    ) {
        let n = targets.len();
        let mut shares = match ack {
            Some((req, tx)) if n > 0 => Some(AckGroup::shares(req, tx.clone(), n)),
            Some((req, tx)) => {
                tx.send(req);
                None
            }
            None => None,
        };
        for target in targets {
            let share = shares.as_mut().and_then(Iterator::next);
            let (msg, origin) = (msg.clone(), origin.clone());
            target.push(if probe {
                Outbound::probe(msg, share, origin)
            } else {
                Outbound::new(msg, share, origin)
            });
        }
    }

    /// Sends `msg` from `origin` to every other target. With `ack`, the origin is acknowledged
    /// once every target has completed its share (at once when there is no target).
    /// Returns the number of targets.
    pub(crate) fn forward(
        &self,
        origin: &Arc<str>,
        msg: Message,
        ack: Option<(AckRequest, &AckSender)>,
    ) -> usize {
        let list = self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Each target's rules are asked once (the count and the pushes use the same answer).
        let topic = msg.topic_str();
        let targets: Vec<&Arc<TargetQueue>> = list
            .iter()
            .filter(|(name, queue)| name.as_ref() != origin.as_ref() && queue.accepts(topic))
            .map(|(_, queue)| queue)
            .collect();
        let n = targets.len();
        if msg.retain {
            self.note_retained(&msg);
        }
        let msg = Arc::new(msg);
        self.fan_out(origin, msg, &targets, ack, false);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::LinkStats;
    use bytes::Bytes;

    /// A QoS 1 message on `t` with payload `p`.
    pub(super) fn msg() -> Message {
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
        let (tx, mut rx) = crate::message::ack_channel();
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
        assert!(rx.try_recv().is_none());
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
        let (tx, mut rx) = crate::message::ack_channel();
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
            rx.try_recv().is_some(),
            "b is down: the origin is acked at once"
        );
        assert_eq!(b.len(), 1, "and b keeps the message");
    }

    #[test]
    fn a_watch_sees_the_retained_topics_forwarded_while_it_lives() {
        let router = Router::default();
        let retained = |topic: &'static [u8]| Message {
            topic: Bytes::from_static(topic),
            retain: true,
            ..msg()
        };
        router.forward(&"a".into(), retained(b"before"), None);
        {
            let w = router.watch_retained();
            router.forward(&"a".into(), retained(b"during"), None);
            router.forward(&"a".into(), msg(), None);
            assert!(w.changed("during"));
            assert!(
                !w.changed("before") && !w.changed("t"),
                "live messages are not noted"
            );
        }
        assert_eq!(router.watching.load(Ordering::Relaxed), 0, "dropped");
    }

    #[test]
    fn overflow_drops_oldest_and_releases_it() {
        let q = queue(2);
        q.set_connected(true);
        let router = Router::default();
        router.insert("q".into(), q.clone());
        let (tx, mut rx) = crate::message::ack_channel();
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
