//! Fan-out: a message received on one link goes to the [`TargetQueue`] of every other link,
//! with a share of its origin's acknowledgement each, and retained messages are remembered for
//! brokers added later ([`retained`]).

pub(crate) mod park;
mod queue;
mod retained;

pub(crate) use queue::{Outbound, TargetQueue};
pub(crate) use retained::RetainedStats;

use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc;

use crate::message::{AckGroup, AckRequest, AckShare, Message};
use retained::{Retained, RetainedTable};

/// Every target with its link name, as the fan-out reads them.
type TargetList = Arc<[(Arc<str>, Arc<TargetQueue>)]>;

/// The set of targets, by link name, and the mesh's retained messages.
#[derive(Debug, Default)]
pub(crate) struct Router {
    /// Replaced as a whole on every insert and remove (links come and go rarely); every
    /// message reads it with one `Arc` clone, no allocation.
    targets: RwLock<TargetList>,
    /// Last retained message per topic (with its origin), handed to brokers added at run time.
    retained: Mutex<RetainedTable>,
    retained_max: usize,
    retained_max_bytes: u64,
}

impl Router {
    /// A router keeping at most `retained_max` retained messages of `retained_max_bytes` in all.
    pub(crate) fn new(retained_max: usize, retained_max_bytes: u64) -> Self {
        Self {
            retained_max,
            retained_max_bytes,
            ..Self::default()
        }
    }

    fn note_retained(&self, origin: &Arc<str>, msg: &Arc<Message>) {
        self.retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(origin, msg, self.retained_max, self.retained_max_bytes);
    }

    /// The retained messages known to the mesh, with their origins.
    pub(crate) fn retained_snapshot(&self) -> Vec<Retained> {
        self.retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot()
    }

    /// Number of retained messages known.
    #[cfg(test)]
    pub(crate) fn retained_len(&self) -> usize {
        self.retained_stats().messages
    }

    /// Size of the retained table.
    pub(crate) fn retained_stats(&self) -> RetainedStats {
        self.retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stats()
    }

    /// Adds (or replaces) a target.
    pub(crate) fn insert(&self, name: Arc<str>, queue: Arc<TargetQueue>) {
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
        removed
    }

    /// Sends a probe from `origin` to every other target, whatever their rules (see
    /// [`crate::probe`]); acknowledged like [`Router::forward`].
    pub(crate) fn forward_probe(
        &self,
        origin: &Arc<str>,
        msg: Message,
        ack: Option<(AckRequest, &mpsc::UnboundedSender<AckRequest>)>,
    ) {
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
        self.fan_out(origin, Arc::new(msg), &targets, ack);
    }

    fn fan_out(
        &self,
        origin: &Arc<str>,
        msg: Arc<Message>,
        targets: &[&Arc<TargetQueue>],
        ack: Option<(AckRequest, &mpsc::UnboundedSender<AckRequest>)>,
    ) {
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
        for target in targets {
            target.push(Outbound::new(
                msg.clone(),
                shares.pop().flatten(),
                origin.clone(),
            ));
        }
    }

    /// Sends `msg` from `origin` to every other target. With `ack`, the origin is acknowledged
    /// once every target has completed its share (at once when there is no target).
    /// Returns the number of targets.
    pub(crate) fn forward(
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
        // Each target's rules are asked once (the count and the pushes use the same answer).
        let topic = msg.topic_str();
        let targets: Vec<&Arc<TargetQueue>> = list
            .iter()
            .filter(|(name, queue)| name.as_ref() != origin.as_ref() && queue.accepts(topic))
            .map(|(_, queue)| queue)
            .collect();
        let n = targets.len();
        let msg = Arc::new(msg);
        if msg.retain {
            self.note_retained(origin, &msg);
        }
        self.fan_out(origin, msg, &targets, ack);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::LinkStats;
    use crate::spool::{self, Overflow, Spool};
    use bytes::Bytes;

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
