//! What one connection has sent its broker and not yet seen acknowledged: pure state, no I/O,
//! generic over the message so that it is tested without a broker.
//!
//! A message handed to the client waits for the client to say which packet id it was written
//! with (`awaiting_sent`, in order: the client writes in order); then a QoS 1 message waits
//! for PUBACK and a QoS 2 one for PUBREC (`inflight`), and a QoS 2 one after PUBREC for PUBCOMP
//! (`released`). `released` is kept apart from `inflight` because the client may give a new
//! publish the packet id of a message that had its PUBREC.
//!
//! Every message carries the sequence number it was handed over with, so that what a lost
//! connection leaves unconfirmed goes back in the order it was first sent, and its packet ids
//! are released again in that order on the next connection.

use std::collections::{HashMap, VecDeque};

/// What [`OutFlight::sent`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent<T> {
    /// QoS 0: written, nothing more to wait for.
    Done(T),
    /// Now waiting for its acknowledgement.
    InFlight,
    /// Its packet id was still in flight for an older message (never expected): that one is
    /// returned, to be sent again rather than held forever.
    Evicted {
        /// The older message.
        old: T,
        /// Its sequence number, and the new one's.
        seqs: (u64, u64),
    },
    /// A control record (see [`OutFlight::handed_control`]) was written.
    Control,
    /// The client reported a write with no message waiting for it.
    Unexpected,
}

/// One connection's unacknowledged messages.
#[derive(Debug)]
pub(crate) struct OutFlight<T> {
    next_seq: u64,
    /// `None`: a control record, written at QoS 0 between the messages.
    awaiting_sent: VecDeque<(u64, Option<T>)>,
    inflight: HashMap<u16, (u64, T)>,
    released: HashMap<u16, (u64, T)>,
}

impl<T> Default for OutFlight<T> {
    fn default() -> Self {
        Self {
            next_seq: 0,
            awaiting_sent: VecDeque::new(),
            inflight: HashMap::new(),
            released: HashMap::new(),
        }
    }
}

impl<T> OutFlight<T> {
    /// `item` was handed to the client.
    pub(crate) fn handed(&mut self, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.awaiting_sent.push_back((seq, Some(item)));
    }

    /// A control record (QoS 0, not a message of the mesh) was handed to the client: its
    /// write report comes in order with the messages' and is matched to nothing.
    pub(crate) fn handed_control(&mut self) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.awaiting_sent.push_back((seq, None));
    }

    /// The client wrote the oldest handed message with `pkid` (0 for QoS 0).
    pub(crate) fn sent(&mut self, pkid: u16) -> Sent<T> {
        let Some((seq, item)) = self.awaiting_sent.pop_front() else {
            return Sent::Unexpected;
        };
        let Some(item) = item else {
            return Sent::Control;
        };
        if pkid == 0 {
            return Sent::Done(item);
        }
        match self.inflight.insert(pkid, (seq, item)) {
            None => Sent::InFlight,
            Some((old_seq, old)) => Sent::Evicted {
                old,
                seqs: (old_seq, seq),
            },
        }
    }

    /// PUBACK (QoS 1), or a PUBREC with an error (QoS 2 refused): the message, if `pkid` was
    /// in flight.
    pub(crate) fn acknowledged(&mut self, pkid: u16) -> Option<T> {
        self.inflight.remove(&pkid).map(|(_, item)| item)
    }

    /// A successful PUBREC: the message now waits for PUBCOMP. Returns a message that was
    /// still waiting for PUBCOMP under the same packet id (never expected), to be sent again.
    pub(crate) fn received(&mut self, pkid: u16) -> Option<(u64, T)> {
        let entry = self.inflight.remove(&pkid)?;
        self.released.insert(pkid, entry)
    }

    /// PUBCOMP: the message, if `pkid` was waiting for it (PUBCOMPs answering the PUBRELs of a
    /// resumed session match nothing).
    pub(crate) fn completed(&mut self, pkid: u16) -> Option<T> {
        self.released.remove(&pkid).map(|(_, item)| item)
    }

    /// Messages handed over and not yet acknowledged.
    pub(crate) fn outstanding(&self) -> usize {
        self.awaiting_sent.len() + self.inflight.len() + self.released.len()
    }

    /// Messages handed over whose packet id is not known yet.
    pub(crate) fn awaiting_sent(&self) -> usize {
        self.awaiting_sent.len()
    }

    /// Messages waiting for PUBACK/PUBREC.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// The messages the client wrote and the broker did not acknowledge yet, in the order
    /// they were handed over.
    pub(crate) fn written(&self) -> Vec<&T> {
        let mut written: Vec<(u64, &T)> = self
            .inflight
            .values()
            .chain(self.released.values())
            .map(|(seq, i)| (*seq, i))
            .collect();
        written.sort_by_key(|(seq, _)| *seq);
        written.into_iter().map(|(_, item)| item).collect()
    }

    /// Every unacknowledged message, in the order it was handed over.
    pub(crate) fn all_mut(&mut self) -> Vec<&mut T> {
        let mut all: Vec<(u64, &mut T)> = self
            .awaiting_sent
            .iter_mut()
            .filter_map(|(seq, item)| item.as_mut().map(|i| (*seq, i)))
            .chain(self.inflight.values_mut().map(|(seq, i)| (*seq, i)))
            .chain(self.released.values_mut().map(|(seq, i)| (*seq, i)))
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
            .map(|(pkid, (seq, _))| (*seq, *pkid))
            .collect();
        sent.sort_unstable();
        let mut all: Vec<(u64, T)> = self
            .awaiting_sent
            .drain(..)
            .filter_map(|(seq, item)| item.map(|i| (seq, i)))
            .collect();
        all.extend(self.inflight.drain().map(|(_, v)| v));
        all.extend(self.released.drain().map(|(_, v)| v));
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

    #[test]
    fn qos0_is_done_once_written_and_qos1_once_acknowledged() {
        let mut f = OutFlight::default();
        f.handed("q0");
        f.handed("q1");
        assert_eq!(f.outstanding(), 2);
        assert_eq!(f.sent(0), Sent::Done("q0"));
        assert_eq!(f.sent(5), Sent::InFlight);
        assert_eq!((f.awaiting_sent(), f.inflight()), (0, 1));
        assert_eq!(f.acknowledged(6), None, "not ours");
        assert_eq!(f.acknowledged(5), Some("q1"));
        assert_eq!(f.outstanding(), 0);
        assert_eq!(f.sent(1), Sent::Unexpected);
    }

    #[test]
    fn control_records_between_messages_match_nothing() {
        let mut f = OutFlight::default();
        f.handed("m1");
        f.handed_control();
        f.handed("m2");
        assert_eq!(f.sent(4), Sent::InFlight);
        assert_eq!(f.sent(0), Sent::Control);
        assert_eq!(f.sent(0), Sent::Done("m2"));
        f.handed_control();
        let (unconfirmed, _) = f.drain();
        assert_eq!(unconfirmed, vec!["m1"], "a record is not given back");
    }

    #[test]
    fn qos2_waits_for_pubcomp_and_its_id_may_be_reused_after_pubrec() {
        let mut f = OutFlight::default();
        f.handed("a");
        assert_eq!(f.sent(3), Sent::InFlight);
        assert_eq!(f.received(3), None);
        // The client gives the next publish the same id once PUBREC arrived.
        f.handed("b");
        assert_eq!(f.sent(3), Sent::InFlight);
        assert_eq!(f.outstanding(), 2);
        assert_eq!(f.completed(3), Some("a"));
        assert_eq!(f.acknowledged(3), Some("b"));
        assert_eq!(
            f.completed(3),
            None,
            "a resumed session's PUBCOMP matches nothing"
        );
    }

    #[test]
    fn a_reused_packet_id_gives_the_older_message_back() {
        let mut f = OutFlight::default();
        f.handed("old");
        f.handed("new");
        assert_eq!(f.sent(9), Sent::InFlight);
        assert_eq!(
            f.sent(9),
            Sent::Evicted {
                old: "old",
                seqs: (0, 1)
            }
        );
        f.handed("qos2");
        f.handed("again");
        assert_eq!(f.sent(4), Sent::InFlight);
        assert_eq!(f.received(4), None);
        assert_eq!(f.sent(4), Sent::InFlight);
        assert_eq!(
            f.received(4),
            Some((2, "qos2")),
            "still waiting for PUBCOMP"
        );
    }

    #[test]
    fn a_lost_connection_gives_everything_back_in_send_order() {
        let mut f = OutFlight::default();
        for item in ["a", "b", "c", "d", "e"] {
            f.handed(item);
        }
        assert_eq!(f.sent(20), Sent::InFlight); // a: QoS 1
        assert_eq!(f.sent(10), Sent::InFlight); // b: QoS 2 …
        assert_eq!(f.received(10), None); // … released
        assert_eq!(f.sent(0), Sent::Done("c"));
        assert_eq!(f.sent(15), Sent::InFlight); // d; e not written yet
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
