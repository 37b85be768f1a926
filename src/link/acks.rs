//! The acknowledgements a link owes its broker for the QoS 1/2 messages the broker sent it: pure
//! state, no I/O (the link task calls it and moves the bytes).
//!
//! Invariants:
//! - An acknowledgement becomes due only when every target is done with its message *and*
//!   every message received before it is acknowledged: MQTT requires PUBACK/PUBREC in order of
//!   receipt (MQTT-4.6.0-2/3), and mosquitto reorders its later deliveries otherwise.
//! - A packet id is held from receipt until its acknowledgement is handed to the client: a
//!   redelivery of it (after a reconnect, DUP set) is not forwarded a second time; the first
//!   copy's acknowledgement covers it.
//! - Every acknowledgement carries the broker-session epoch it was received in. A CONNACK
//!   without a session starts a new epoch: acknowledgements of the old one are dropped, never
//!   sent (their packet ids mean nothing to the new session).

use std::collections::{HashSet, VecDeque};

use crate::message::AckRequest;

/// Packet ids, hashed with ahash: every QoS 1/2 message goes in and out of two of these.
type Ids = HashSet<u16, ahash::RandomState>;

/// What the link owes its broker.
#[derive(Debug, Default)]
pub(crate) struct InboundAcks {
    /// Received and not yet acknowledged, in order of receipt.
    received: VecDeque<AckRequest>,
    /// Packet ids of `received` whose targets are all done.
    completed: Ids,
    /// Due, in order, not yet handed to the client.
    due: VecDeque<AckRequest>,
    /// Received and not yet handed to the client.
    held: Ids,
    /// Broker-session counter.
    epoch: u32,
}

impl InboundAcks {
    /// A QoS 1/2 message arrived: its acknowledgement request stamped with the current epoch,
    /// to forward with the message; `None` for a redelivery of a message already on its way
    /// (forward nothing: the first copy's acknowledgement covers it).
    pub(crate) fn receive(&mut self, ack: AckRequest) -> Option<AckRequest> {
        let ack = AckRequest {
            epoch: self.epoch,
            ..ack
        };
        if !self.held.insert(ack.pkid) {
            return None;
        }
        self.received.push_back(ack);
        Some(ack)
    }

    /// Every target is done with a received message. Its acknowledgement becomes due once all
    /// received before it are done too; one of an old epoch is ignored.
    pub(crate) fn complete(&mut self, ack: AckRequest) {
        if ack.epoch != self.epoch {
            return;
        }
        self.completed.insert(ack.pkid);
        while let Some(front) = self.received.front() {
            if !self.completed.remove(&front.pkid) {
                break;
            }
            self.due.extend(self.received.pop_front());
        }
    }

    /// The next acknowledgement to hand to the client (stale ones are dropped on the way).
    /// Call [`InboundAcks::handed`] once the client took it.
    pub(crate) fn next_due(&mut self) -> Option<AckRequest> {
        while let Some(ack) = self.due.front().copied() {
            if ack.epoch == self.epoch {
                return Some(ack);
            }
            self.due.pop_front();
        }
        None
    }

    /// The client took the acknowledgement [`InboundAcks::next_due`] returned.
    pub(crate) fn handed(&mut self) {
        if let Some(ack) = self.due.pop_front() {
            self.held.remove(&ack.pkid);
        }
    }

    /// The broker has no session for us (CONNACK without one): forget everything owed.
    pub(crate) fn new_session(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.held.clear();
        self.received.clear();
        self.completed.clear();
        self.due.clear();
    }

    /// Received and not yet due.
    pub(crate) fn unacknowledged(&self) -> usize {
        self.received.len()
    }

    /// Due and not yet handed to the client.
    pub(crate) fn due(&self) -> usize {
        self.due.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(pkid: u16) -> AckRequest {
        AckRequest {
            pkid,
            qos: 1,
            epoch: 0,
        }
    }

    fn drain(acks: &mut InboundAcks) -> Vec<u16> {
        let mut out = Vec::new();
        while let Some(a) = acks.next_due() {
            out.push(a.pkid);
            acks.handed();
        }
        out
    }

    #[test]
    fn acknowledgements_become_due_in_order_of_receipt() {
        let mut acks = InboundAcks::default();
        let [a, b, c] = [1, 2, 3].map(|p| acks.receive(ack(p)).unwrap());
        acks.complete(c);
        acks.complete(b);
        assert_eq!(drain(&mut acks), Vec::<u16>::new(), "1 is not done yet");
        assert_eq!(acks.unacknowledged(), 3);
        acks.complete(a);
        assert_eq!(acks.due(), 3);
        assert_eq!(drain(&mut acks), vec![1, 2, 3]);
        assert_eq!((acks.unacknowledged(), acks.due()), (0, 0));
    }

    #[test]
    fn a_redelivery_is_not_forwarded_twice_until_acknowledged() {
        let mut acks = InboundAcks::default();
        let first = acks.receive(ack(7)).unwrap();
        assert_eq!(acks.receive(ack(7)), None, "already on its way");
        acks.complete(first);
        assert_eq!(acks.receive(ack(7)), None, "due, not yet handed");
        assert_eq!(drain(&mut acks), vec![7]);
        assert!(
            acks.receive(ack(7)).is_some(),
            "a new message reusing the id"
        );
    }

    #[test]
    fn a_new_session_drops_what_the_old_one_owed() {
        let mut acks = InboundAcks::default();
        let old = acks.receive(ack(1)).unwrap();
        let done = acks.receive(ack(2)).unwrap();
        acks.complete(AckRequest { pkid: 9, ..old }); // unknown id: nothing
        acks.new_session();
        acks.complete(old);
        acks.complete(done);
        assert_eq!(drain(&mut acks), Vec::<u16>::new(), "old epoch ignored");
        let new = acks.receive(ack(1)).unwrap();
        assert_eq!(new.epoch, old.epoch + 1);
        acks.complete(new);
        assert_eq!(drain(&mut acks), vec![1]);
    }

    #[test]
    fn due_acknowledgements_of_an_old_epoch_are_never_handed_out() {
        let mut acks = InboundAcks::default();
        let a = acks.receive(ack(1)).unwrap();
        acks.complete(a);
        assert_eq!(acks.due(), 1);
        acks.new_session();
        assert_eq!(acks.next_due(), None);
    }
}
