//! What one connection has sent its broker and not yet seen acknowledged: pure state, no I/O,
//! generic over the message so that it is tested without a broker.
//!
//! The link numbers its QoS 1/2 publishes itself ([`OutFlight::free_id`]): a message is in
//! flight, under its packet id, from the moment it is handed to the client, and the client
//! reports nothing back until the broker acknowledges it. A QoS 1 message waits for PUBACK and
//! a QoS 2 one for PUBREC (`inflight`), and a QoS 2 one after PUBREC for PUBCOMP (`released`);
//! an id is free again only after the exchange completes (MQTT 5 §4.2.3: PUBACK, PUBCOMP).
//! QoS 0 messages and control records carry no id: they wait, in order, for the client's
//! report that it wrote them (`awaiting_write`).
//!
//! Every message carries the sequence number it was handed over with, so that what a lost
//! connection leaves unconfirmed goes back in the order it was first sent, and its packet ids
//! are released again in that order on the next connection. A numbered message also carries
//! its rank among the connection's numbered publishes: the client writes them in order and
//! counts what it wrote, which tells which of them a lost connection may have delivered
//! ([`OutFlight::written`]).

use std::collections::{HashMap, VecDeque};

/// What [`OutFlight::written_unnumbered`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written<T> {
    /// QoS 0: written, nothing more to wait for.
    Done(T),
    /// A control record (see [`OutFlight::handed_control`]) was written.
    Control,
    /// The client reported a write with no QoS 0 publish waiting for it.
    Unexpected,
}

/// A numbered message in flight.
#[derive(Debug)]
struct Numbered<T> {
    /// When it was handed over, among everything this connection handed over.
    seq: u64,
    /// Its rank among the connection's numbered publishes (0 for the first).
    rank: u64,
    item: T,
}

type ById<T> = HashMap<u16, Numbered<T>, ahash::RandomState>;

/// One connection's unacknowledged messages.
#[derive(Debug)]
pub(crate) struct OutFlight<T> {
    next_seq: u64,
    /// Numbered publishes handed over so far.
    numbered: u64,
    /// The packet id [`OutFlight::free_id`] tries first.
    next_id: u16,
    /// `None`: a control record, written at QoS 0 between the messages.
    awaiting_write: VecDeque<(u64, Option<T>)>,
    inflight: ById<T>,
    released: ById<T>,
}

impl<T> Default for OutFlight<T> {
    fn default() -> Self {
        Self {
            next_seq: 0,
            numbered: 0,
            next_id: 1,
            awaiting_write: VecDeque::new(),
            inflight: HashMap::default(),
            released: HashMap::default(),
        }
    }
}

impl<T> OutFlight<T> {
    /// A packet id in `1..=max` that no message of this connection holds, trying them in
    /// turn from after the last one given (as rumqttc numbers them: a broker sees an id
    /// again only after all the others); `None` when every one is held. An id given but not
    /// used (the client refused the publish) is simply given again later.
    pub(crate) fn free_id(&mut self, max: u16) -> Option<u16> {
        let max = max.max(1);
        for _ in 0..max {
            let id = if self.next_id == 0 || self.next_id > max {
                1
            } else {
                self.next_id
            };
            self.next_id = id.wrapping_add(1);
            if !self.inflight.contains_key(&id) && !self.released.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// `item` was handed to the client as a QoS 1/2 publish with packet id `pkid` (from
    /// [`OutFlight::free_id`]). Returns a message that held that id (never expected: the id
    /// was free), to be sent again rather than held forever.
    pub(crate) fn handed_numbered(&mut self, pkid: u16, item: T) -> Option<T> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let rank = self.numbered;
        self.numbered += 1;
        self.inflight
            .insert(pkid, Numbered { seq, rank, item })
            .map(|old| old.item)
    }

    /// `item` was handed to the client as a QoS 0 publish: done once the client wrote it.
    pub(crate) fn handed_unnumbered(&mut self, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.awaiting_write.push_back((seq, Some(item)));
    }

    /// A control record (QoS 0, not a message of the mesh) was handed to the client: its
    /// write report comes in order with the QoS 0 messages' and is matched to nothing.
    pub(crate) fn handed_control(&mut self) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.awaiting_write.push_back((seq, None));
    }

    /// The client wrote the oldest QoS 0 publish handed to it.
    pub(crate) fn written_unnumbered(&mut self) -> Written<T> {
        match self.awaiting_write.pop_front() {
            None => Written::Unexpected,
            Some((_, None)) => Written::Control,
            Some((_, Some(item))) => Written::Done(item),
        }
    }

    /// PUBACK (QoS 1), or a PUBREC with an error (QoS 2 refused): the message, if `pkid` was
    /// in flight.
    pub(crate) fn acknowledged(&mut self, pkid: u16) -> Option<T> {
        self.inflight.remove(&pkid).map(|n| n.item)
    }

    /// A successful PUBREC: the message now waits for PUBCOMP. Returns a message that was
    /// still waiting for PUBCOMP under the same packet id (never expected: an id is not given
    /// again before its PUBCOMP), to be sent again.
    pub(crate) fn received(&mut self, pkid: u16) -> Option<(u64, T)> {
        let entry = self.inflight.remove(&pkid)?;
        self.released.insert(pkid, entry).map(|n| (n.seq, n.item))
    }

    /// PUBCOMP: the message, if `pkid` was waiting for it (PUBCOMPs answering the PUBRELs of a
    /// resumed session match nothing).
    pub(crate) fn completed(&mut self, pkid: u16) -> Option<T> {
        self.released.remove(&pkid).map(|n| n.item)
    }

    /// Messages handed over and not yet acknowledged.
    pub(crate) fn outstanding(&self) -> usize {
        self.awaiting_write.len() + self.inflight.len() + self.released.len()
    }

    /// QoS 0 publishes and control records handed over and not written yet.
    pub(crate) fn awaiting_write(&self) -> usize {
        self.awaiting_write.len()
    }

    /// Messages waiting for PUBACK/PUBREC.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// The numbered messages the client wrote (the first `written` it was handed: it writes
    /// in order) and the broker did not acknowledge yet, in the order they were handed over.
    pub(crate) fn written(&self, written: u64) -> Vec<&T> {
        let mut out: Vec<(u64, &T)> = self
            .inflight
            .values()
            .chain(self.released.values())
            .filter(|n| n.rank < written)
            .map(|n| (n.seq, &n.item))
            .collect();
        out.sort_by_key(|(seq, _)| *seq);
        out.into_iter().map(|(_, item)| item).collect()
    }

    /// Every unacknowledged message, in the order it was handed over.
    pub(crate) fn all_mut(&mut self) -> Vec<&mut T> {
        let mut all: Vec<(u64, &mut T)> = self
            .awaiting_write
            .iter_mut()
            .filter_map(|(seq, item)| item.as_mut().map(|i| (*seq, i)))
            .chain(self.inflight.values_mut().map(|n| (n.seq, &mut n.item)))
            .chain(self.released.values_mut().map(|n| (n.seq, &mut n.item)))
            .collect();
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, item)| item).collect()
    }

    /// The connection ended: every unacknowledged message in the order it was handed over,
    /// and the packet ids the broker may still hold, in the order they were sent (the next
    /// connection releases them in that order).
    pub(crate) fn drain(&mut self) -> (Vec<T>, Vec<u16>) {
        let mut sent: Vec<(u64, u16)> = self
            .inflight
            .iter()
            .chain(self.released.iter())
            .map(|(pkid, n)| (n.seq, *pkid))
            .collect();
        sent.sort_unstable();
        let mut all: Vec<(u64, T)> = self
            .awaiting_write
            .drain(..)
            .filter_map(|(seq, item)| item.map(|i| (seq, i)))
            .collect();
        all.extend(self.inflight.drain().map(|(_, n)| (n.seq, n.item)));
        all.extend(self.released.drain().map(|(_, n)| (n.seq, n.item)));
        all.sort_by_key(|(seq, _)| *seq);
        (
            all.into_iter().map(|(_, item)| item).collect(),
            sent.into_iter().map(|(_, pkid)| pkid).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands `item` over numbered, as the link does.
    fn numbered<'a>(f: &mut OutFlight<&'a str>, item: &'a str) -> u16 {
        let id = f.free_id(100).expect("an id is free");
        assert_eq!(f.handed_numbered(id, item), None);
        id
    }

    #[test]
    fn qos0_is_done_once_written_and_qos1_once_acknowledged() {
        let mut f = OutFlight::default();
        f.handed_unnumbered("q0");
        let id = numbered(&mut f, "q1");
        assert_eq!(f.outstanding(), 2);
        assert_eq!((f.awaiting_write(), f.inflight()), (1, 1));
        assert_eq!(f.written_unnumbered(), Written::Done("q0"));
        assert_eq!(f.acknowledged(id + 1), None, "not ours");
        assert_eq!(f.acknowledged(id), Some("q1"));
        assert_eq!(f.outstanding(), 0);
        assert_eq!(f.written_unnumbered(), Written::Unexpected);
    }

    #[test]
    fn control_records_between_messages_match_nothing() {
        let mut f = OutFlight::default();
        numbered(&mut f, "m1");
        f.handed_control();
        f.handed_unnumbered("m2");
        assert_eq!(f.written_unnumbered(), Written::Control);
        assert_eq!(f.written_unnumbered(), Written::Done("m2"));
        f.handed_control();
        let (unconfirmed, _) = f.drain();
        assert_eq!(unconfirmed, vec!["m1"], "a record is not given back");
    }

    #[test]
    fn ids_go_round_and_skip_what_is_held() {
        let mut f = OutFlight::default();
        let ids: Vec<u16> = ["a", "b", "c"].map(|m| numbered(&mut f, m)).to_vec();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(f.acknowledged(2), Some("b"));
        // Past the end, round to the start: 1 and 3 are held, 2 is free again.
        let f4 = |f: &mut OutFlight<&str>| f.free_id(4);
        assert_eq!(f4(&mut f), Some(4));
        assert_eq!(f4(&mut f), Some(2));
        assert_eq!(f.handed_numbered(2, "d"), None);
        assert_eq!(f.handed_numbered(4, "e"), None);
        assert_eq!(f4(&mut f), None, "all four held");
        // An id waiting for PUBCOMP is still held.
        assert_eq!(f.received(3), None);
        assert_eq!(f4(&mut f), None);
        assert_eq!(f.completed(3), Some("c"));
        assert_eq!(f4(&mut f), Some(3));
        assert_eq!(
            OutFlight::<&str>::default().free_id(0),
            Some(1),
            "0 means 1"
        );
    }

    #[test]
    fn qos2_holds_its_id_until_pubcomp() {
        let mut f = OutFlight::default();
        let id = numbered(&mut f, "a");
        assert_eq!(f.received(id), None);
        assert_eq!(f.outstanding(), 1);
        let next = numbered(&mut f, "b");
        assert_ne!(next, id, "not given again before PUBCOMP");
        assert_eq!(f.completed(id), Some("a"));
        assert_eq!(
            f.completed(id),
            None,
            "a resumed session's PUBCOMP matches nothing"
        );
        assert_eq!(f.acknowledged(next), Some("b"));
    }

    #[test]
    fn an_id_handed_twice_gives_the_older_message_back() {
        let mut f = OutFlight::default();
        assert_eq!(f.handed_numbered(9, "old"), None);
        assert_eq!(f.handed_numbered(9, "new"), Some("old"));
        assert_eq!(f.received(9), None);
        assert_eq!(f.handed_numbered(9, "again"), None);
        assert_eq!(f.received(9), Some((1, "new")), "still waiting for PUBCOMP");
    }

    #[test]
    fn what_was_written_is_the_first_numbered_publishes_handed_over() {
        let mut f = OutFlight::default();
        let a = numbered(&mut f, "a");
        f.handed_unnumbered("q0");
        let b = numbered(&mut f, "b");
        numbered(&mut f, "c");
        assert!(f.written(0).is_empty());
        assert_eq!(f.written(2), vec![&"a", &"b"]);
        assert_eq!(f.acknowledged(a), Some("a"));
        assert_eq!(f.received(b), None);
        assert_eq!(f.written(2), vec![&"b"], "acknowledged: not in flight");
        assert_eq!(f.written(3), vec![&"b", &"c"]);
    }

    #[test]
    fn a_lost_connection_gives_everything_back_in_send_order() {
        let mut f = OutFlight::default();
        assert_eq!(f.handed_numbered(20, "a"), None); // QoS 1
        assert_eq!(f.handed_numbered(10, "b"), None); // QoS 2 …
        assert_eq!(f.received(10), None); // … released
        f.handed_unnumbered("c");
        assert_eq!(f.handed_numbered(15, "d"), None);
        f.handed_unnumbered("e");
        assert_eq!(f.written_unnumbered(), Written::Done("c"));
        let order: Vec<&str> = f.all_mut().into_iter().map(|s| *s).collect();
        assert_eq!(order, vec!["a", "b", "d", "e"]);
        let (unconfirmed, release_first) = f.drain();
        assert_eq!(unconfirmed, vec!["a", "b", "d", "e"]);
        assert_eq!(
            release_first,
            vec![20, 10, 15],
            "ids in the order they were sent"
        );
        assert_eq!(f.outstanding(), 0);
    }
}
