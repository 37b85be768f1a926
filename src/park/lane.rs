//! The copy lanes: park records on their way to each origin broker, the [`Parker`] that fills
//! them, and [`Copies`], which origins hold copies of what a target's spool holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::ParkItem;

/// The park records for one origin broker, in order: its copy publisher sends them on a
/// connection of their own (see [`super::io::publish_copies`]). Open while the broker's link
/// is connected; a record offered to a closed lane is refused (its share completes at once:
/// the message is in the local spool only).
#[derive(Debug)]
pub(crate) struct CopyLane {
    items: Mutex<VecDeque<ParkItem>>,
    /// Records queued or in flight.
    waiting: AtomicUsize,
    open: AtomicBool,
    notify: Notify,
    /// The intake of the origin waits from this many records on (see [`CopyLane::full`]).
    capacity: usize,
}

impl CopyLane {
    /// A closed lane whose origin's intake waits from `capacity` records on.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            waiting: AtomicUsize::new(0),
            open: AtomicBool::new(false),
            notify: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ParkItem>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens (the origin's link connected) or closes the lane.
    pub(crate) fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::Release);
    }

    /// Appends a record; given back when the lane is closed.
    pub(crate) fn push(&self, item: ParkItem) -> Result<(), ParkItem> {
        if !self.open.load(Ordering::Acquire) {
            return Err(item);
        }
        self.lock().push_back(item);
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
        Ok(())
    }

    /// Up to `max` records, oldest first.
    pub(crate) fn take(&self, max: usize, out: &mut Vec<ParkItem>) {
        let mut items = self.lock();
        let n = max.min(items.len());
        out.extend(items.drain(..n));
    }

    /// Records a lost connection did not get acknowledged: back in front, in order.
    pub(crate) fn requeue(&self, items: Vec<ParkItem>) {
        let mut lane = self.lock();
        for item in items.into_iter().rev() {
            lane.push_front(item);
        }
    }

    /// The broker acknowledged (or refused) a record: its share completes.
    pub(crate) fn finish(&self, mut item: ParkItem) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        item.complete();
    }

    /// Waits until a record is pushed.
    pub(crate) async fn notified(&self) {
        self.notify.notified().await
    }

    /// Whether this broker takes another copy: a safety net far above [`CopyLane::full`],
    /// where the intake already waits. When not (its copy connection down for long), a spooled
    /// message is acknowledged once on disk, as with one process (counted,
    /// `meshbridge_park_skipped_total`): memory stays bounded.
    pub(crate) fn takes(&self) -> bool {
        self.waiting.load(Ordering::Acquire) < 4 * self.capacity
    }

    /// Records waiting for this broker fill its capacity: its link stops taking messages from
    /// it (each may make more copies) until they are acknowledged.
    pub(crate) fn full(&self) -> bool {
        self.waiting.load(Ordering::Acquire) >= self.capacity
    }
}

/// Hands copies and markers to the origins' lanes. One per process.
#[derive(Debug)]
pub(crate) struct Parker {
    lanes: Mutex<HashMap<Arc<str>, Arc<CopyLane>>>,
    /// Identifies this process's spool file across restarts (`data_dir/spool.id`): a copy of a
    /// row this spool still holds is not delivered a second time from the park.
    pub(crate) spool_id: u64,
    /// Capacity of each lane (see [`CopyLane::full`]).
    capacity: usize,
}

impl Parker {
    /// A parker whose lanes hold `capacity` records before their origin's intake waits.
    pub(crate) fn new(spool_id: u64, capacity: usize) -> Self {
        Self {
            lanes: Mutex::new(HashMap::new()),
            spool_id,
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<CopyLane>>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lane of broker `name`, made on first use (kept across its link's restarts).
    pub(crate) fn lane(&self, name: &Arc<str>) -> Arc<CopyLane> {
        self.lock()
            .entry(name.clone())
            .or_insert_with(|| Arc::new(CopyLane::new(self.capacity)))
            .clone()
    }

    /// Broker `name` left the mesh: no more copies for it (its publisher sends what its lane
    /// holds until its link stops).
    pub(crate) fn forget(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Whether `origin` takes another copy (see [`CopyLane::takes`]).
    pub(crate) fn takes_copy(&self, origin: &str) -> bool {
        self.lock().get(origin).is_some_and(|l| l.takes())
    }

    /// Sends `item` to `origin`'s broker: its share completes when the broker acknowledged it,
    /// or at once when `origin`'s lane is closed or gone (the message is in the local spool
    /// only; the origin cannot be acknowledged before it is back anyway, and then delivers it
    /// again). True when it went into the lane.
    pub(crate) fn send(&self, origin: &str, item: ParkItem) -> bool {
        let lane = self.lock().get(origin).cloned();
        let pushed = match lane {
            Some(lane) => lane.push(item),
            None => Err(item),
        };
        pushed.map_err(|mut item| item.complete()).is_ok()
    }
}

/// Which origins hold copies of what a target's spool holds (since it was last empty).
#[derive(Debug, Default)]
pub(crate) struct Copies(Mutex<HashSet<Arc<str>>>);

impl Copies {
    /// A copy from `origin` was sent.
    pub(crate) fn note(&self, origin: &Arc<str>) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !set.contains(origin) {
            set.insert(origin.clone());
        }
    }

    /// The origins a marker goes to now: every origin with copies. With the spool empty they
    /// are all delivered and forgotten here. Otherwise the trim behind the marker discards
    /// those already delivered, up to the first still spooled: a spool that never quite
    /// empties (a target stalling again and again, a long backlog) does not leave every copy
    /// of what it delivered parked for the next owner to deliver again.
    pub(crate) fn due_markers(&self, spool_empty: bool) -> Vec<Arc<str>> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if spool_empty {
            set.drain().collect()
        } else {
            set.iter().cloned().collect()
        }
    }

    /// Whether any origin holds copies.
    pub(crate) fn any(&self) -> bool {
        !self.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::park::Park;

    fn marker(n: u64) -> ParkItem {
        ParkItem {
            park: Park::Marker {
                target: "t".into(),
                nonce: n,
            },
            share: None,
        }
    }

    fn nonces(items: &[ParkItem]) -> Vec<u64> {
        items
            .iter()
            .map(|i| match i.park {
                Park::Marker { nonce, .. } => nonce,
                Park::Copy { key, .. } => key,
            })
            .collect()
    }

    #[test]
    fn a_lane_keeps_order_across_a_lost_connection_and_bounds_its_origin() {
        let lane = CopyLane::new(2);
        assert!(
            lane.push(marker(0)).is_err(),
            "closed: the origin is not connected"
        );
        lane.set_open(true);
        for n in 1..=3 {
            lane.push(marker(n)).unwrap();
        }
        assert!(lane.full() && lane.takes());
        let mut out = Vec::new();
        lane.take(2, &mut out);
        assert_eq!(nonces(&out), [1, 2]);
        // Lost before the broker acknowledged them: back in front, in order.
        lane.requeue(std::mem::take(&mut out));
        lane.take(10, &mut out);
        assert_eq!(nonces(&out), [1, 2, 3]);
        for item in out.drain(..2) {
            lane.finish(item);
        }
        assert!(!lane.full());
        // One waits; 4x its capacity is 8.
        for n in 4..=10 {
            lane.push(marker(n)).unwrap();
        }
        assert!(!lane.takes(), "4x its capacity: no more copies");
    }

    #[test]
    fn the_parker_sends_only_to_open_lanes_it_knows() {
        let parker = Parker::new(7, 10);
        let b1: Arc<str> = "b1".into();
        assert!(!parker.send("b1", marker(1)), "no lane yet");
        let lane = parker.lane(&b1);
        assert!(!parker.send("b1", marker(1)), "closed");
        lane.set_open(true);
        assert!(parker.send("b1", marker(2)));
        assert!(parker.takes_copy("b1"));
        assert!(Arc::ptr_eq(&lane, &parker.lane(&b1)), "one lane per broker");
        parker.forget("b1");
        assert!(!parker.send("b1", marker(3)) && !parker.takes_copy("b1"));
    }

    #[test]
    fn markers_go_to_every_origin_with_copies_until_the_spool_is_empty() {
        let copies = Copies::default();
        let (b1, b2): (Arc<str>, Arc<str>) = ("b1".into(), "b2".into());
        assert!(!copies.any());
        assert!(copies.due_markers(false).is_empty());
        copies.note(&b1);
        copies.note(&b2);
        copies.note(&b2);
        for _ in 0..2 {
            let mut due = copies.due_markers(false);
            due.sort();
            assert_eq!(due, vec![b1.clone(), b2.clone()], "still parked");
        }
        assert!(copies.any());
        let mut last = copies.due_markers(true);
        last.sort();
        assert_eq!(last, vec![b1, b2], "an empty spool: every origin, once");
        assert!(!copies.any());
        assert!(copies.due_markers(true).is_empty());
    }
}
