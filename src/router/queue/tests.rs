//! The queue's own logic: what goes to the spool and when, in which order it comes back.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::message::{AckGroup, AckRequest, Message};
use crate::spool::{self, Overflow, Spool};

use crate::router::tests::msg;

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

/// The target was down while `1..=n` were pushed (all on disk now), and is connected again.
async fn spooled_while_down(q: &TargetQueue, n: u8) {
    for i in 1..=n {
        q.push(Outbound::new(numbered(i), None, "o".into()));
    }
    q.sync().await;
    q.set_connected(true);
}

/// A probe measures the live path: it never goes to the spool (a down or lagging target,
/// a dropped connection) and never holds its origin's acknowledgement there.
#[tokio::test]
async fn probes_are_never_spooled() {
    let (_dir, sp, q) = spooled_queue(2);
    let (tx, mut rx) = crate::message::ack_channel();
    let probe = |n: u8| {
        let req = AckRequest {
            pkid: u16::from(n),
            qos: 1,
            epoch: 0,
        };
        let share = AckGroup::shares(req, tx.clone(), 1).next();
        Outbound::probe(numbered(n), share, "o".into())
    };
    q.push(probe(1));
    q.sync().await;
    assert_eq!(q.spool_depth().0, 0, "down: dropped");
    assert_eq!(
        rx.try_recv().unwrap().pkid,
        1,
        "and its origin acknowledged"
    );
    q.set_connected(true);
    q.push(probe(2));
    q.push(Outbound::new(numbered(3), None, "o".into()));
    let mut flying = Vec::new();
    q.take(1, &mut flying);
    assert_eq!(payloads(&flying), [2]);
    let mut refs: Vec<&mut Outbound> = flying.iter_mut().collect();
    assert_eq!(q.evacuate(&mut refs), 1, "the message only");
    q.disconnected(flying, false);
    q.sync().await;
    assert_eq!(q.spool_depth().0, 1, "the message, not the probe");
    assert_eq!(rx.try_recv().unwrap().pkid, 2);
    sp.close();
}

#[tokio::test]
async fn evacuated_messages_stay_held_and_are_read_once_in_order() {
    let (_dir, sp, q) = spooled_queue(2);
    q.set_connected(true);
    let (tx, mut rx) = crate::message::ack_channel();
    let push = |n: u8| {
        let req = AckRequest {
            pkid: u16::from(n),
            qos: 1,
            epoch: 0,
        };
        let share = AckGroup::shares(req, tx.clone(), 1).next();
        q.push(Outbound::new(numbered(n), share, "o".into()));
    };
    push(1);
    push(2);
    let mut flying = Vec::new();
    q.take(1, &mut flying);
    assert_eq!(payloads(&flying), [1]);
    assert!(
        rx.try_recv().is_none(),
        "held by the target while it keeps up"
    );

    // The target stalls: 1 (in flight) and 2 (queued) go to disk and release their origin,
    // but stay where they are.
    let mut refs: Vec<&mut Outbound> = flying.iter_mut().collect();
    assert_eq!(q.evacuate(&mut refs), 2);
    q.sync().await;
    let acked: Vec<u16> = std::iter::from_fn(|| rx.try_recv())
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
    spooled_while_down(&q, 4).await;
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

/// A connection that changes role (see `link::end_of_connection`): the next one reads the
/// spool from its first row, so nothing read from it is kept in memory as well, and what was
/// delivered is gone once the deletions are on disk. Each row goes out once more at most.
#[tokio::test]
async fn a_role_switch_leaves_what_was_read_from_the_spool_to_the_next_read() {
    let (_dir, sp, q) = spooled_queue(10);
    spooled_while_down(&q, 4).await;
    let mut read = Vec::new();
    q.take(4, &mut read);
    assert_eq!(payloads(&read), [1, 2, 3, 4]);
    // 1 is delivered; 2 was in flight; 3 and 4 were held back and went back to the queue.
    let mut read = read.into_iter();
    q.finish(read.next().unwrap());
    let in_flight = vec![read.next().unwrap()];
    q.requeue_front(read.collect());
    q.push(Outbound::new(numbered(5), None, "o".into()));
    q.switched(in_flight);
    q.sync().await;
    q.set_connected(true);
    let mut again = Vec::new();
    q.take(10, &mut again);
    assert_eq!(payloads(&again), [2, 3, 4, 5], "once each, in order");
    sp.close();
}

/// A connected queue of `capacity` (see [`spooled_queue`]), target `t` of a router.
fn routed_queue(capacity: usize) -> (tempfile::TempDir, Arc<TargetQueue>, crate::router::Router) {
    let (dir, _sp, q) = spooled_queue(capacity);
    let q = Arc::new(q);
    let router = crate::router::Router::default();
    router.insert("t".into(), q.clone());
    q.set_connected(true);
    (dir, q, router)
}

/// A full queue holds its origins (see `crate::router::hold`) for a quarter of its capacity
/// more, counted by the router, until it is back under its capacity; past that it spills.
#[tokio::test]
async fn a_full_queue_holds_its_origins_then_spills_past_its_slack() {
    let (_dir, q, router) = routed_queue(4);
    let push = |n: u8| q.push(Outbound::new(numbered(n), None, "o".into()));
    for n in 1..=4 {
        push(n);
    }
    assert!(!router.holds(), "at its capacity, not over it");
    push(5);
    assert!(router.holds() && q.holding(), "over: its origins are held");
    assert!(!q.evacuate_requested(), "not spilled");
    let mut out = Vec::new();
    q.take(2, &mut out);
    assert!(!router.holds(), "back under its capacity");
    push(6);
    push(7);
    assert!(router.holds(), "over again");
    push(8);
    assert!(
        !router.holds() && q.evacuate_requested(),
        "past a quarter more: it spills"
    );
    assert_eq!(
        q.len(),
        5,
        "what it held is the link's to move to the spool"
    );
}

/// A target that leaves the mesh while its queue holds no longer holds the origins.
#[tokio::test]
async fn a_removed_target_releases_its_hold() {
    let (_dir, q, router) = routed_queue(1);
    q.push(Outbound::new(numbered(1), None, "o".into()));
    q.push(Outbound::new(numbered(2), None, "o".into()));
    assert!(router.holds());
    router.remove("t");
    assert!(!router.holds() && !q.holding());
}
