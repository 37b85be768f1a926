//! The driver task of a connection: it alone polls rumqttc's event loop (not cancel-safe) and
//! turns its events into [`LinkEvent`]s for the link, counting the QoS 1/2 publishes it wrote
//! (see [`Session::written`](super::Session::written)).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5b;
use tokio::sync::mpsc;

use super::{LinkEvent, Refused};
use crate::doorbell::Doorbell;
use crate::message::{AckRequest, Message};

/// The driver's end of a session's events: each event sent rings the session's doorbell, and
/// so does the end of the driver, however it ends (a link waiting on the doorbell then finds
/// the channel closed; see [`Session::next_event`](super::Session::next_event)).
pub(super) struct EventSender {
    /// `None` only while dropping.
    tx: Option<mpsc::Sender<LinkEvent>>,
    bell: Arc<Doorbell>,
}

impl EventSender {
    pub(super) fn new(tx: mpsc::Sender<LinkEvent>, bell: Arc<Doorbell>) -> Self {
        Self { tx: Some(tx), bell }
    }

    /// Sends `event` (waiting for room); false when the session is gone.
    pub(super) async fn send(&self, event: LinkEvent) -> bool {
        let Some(tx) = &self.tx else { return false };
        let sent = tx.send(event).await.is_ok();
        self.bell.ring();
        sent
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        // Closed first, then rung: a link woken before the close would find the channel empty
        // and wait again, with nothing left to wake it.
        drop(self.tx.take());
        self.bell.ring();
    }
}

fn qos_u8_v4(q: rumqttc::QoS) -> u8 {
    q as u8
}

fn qos_u8_v5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

pub(super) async fn drive_v4(mut el: rumqttc::EventLoop, tx: EventSender, written: Arc<AtomicU64>) {
    use rumqttc::{Event, Outgoing, Packet};
    loop {
        let event = match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(c))) => LinkEvent::Connected {
                session_present: c.session_present,
                max_packet_size: None,
                receive_max: None,
            },
            Ok(Event::Incoming(Packet::Publish(p))) => incoming(
                Message {
                    topic: Bytes::from(p.topic),
                    payload: p.payload,
                    qos: qos_u8_v4(p.qos),
                    retain: p.retain,
                    properties: None,
                },
                p.pkid,
            ),
            Ok(Event::Incoming(Packet::PubAck(a))) => LinkEvent::PubAck(a.pkid, Ok(())),
            Ok(Event::Incoming(Packet::PubRec(a))) => LinkEvent::PubRec(a.pkid, Ok(())),
            Ok(Event::Incoming(Packet::PubComp(a))) => LinkEvent::PubComp(a.pkid),
            Ok(Event::Incoming(Packet::SubAck(s))) => LinkEvent::SubAck(
                s.return_codes
                    .iter()
                    .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .map(|c| format!("{c:?}"))
                    .collect(),
            ),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => match wrote(pkid, &written) {
                Some(event) => event,
                None => continue,
            },
            Ok(_) => continue,
            Err(e) => {
                let aborted = matches!(
                    e,
                    rumqttc::ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted)
                );
                return close(&tx, aborted, e.to_string()).await;
            }
        };
        if !tx.send(event).await {
            return;
        }
    }
}

/// A message from the broker, with the acknowledgement it is owed (QoS 1 and 2).
fn incoming(msg: Message, pkid: u16) -> LinkEvent {
    LinkEvent::Publish {
        ack: (msg.qos > 0).then_some(AckRequest {
            pkid,
            qos: msg.qos,
            epoch: 0,
        }),
        msg,
    }
}

/// One of our publishes was written: a QoS 0 one (id 0) is reported, a QoS 1/2 one counted in
/// `written` (see [`Session::written`](super::Session::written)).
fn wrote(pkid: u16, written: &AtomicU64) -> Option<LinkEvent> {
    if pkid == 0 {
        return Some(LinkEvent::Written);
    }
    written.fetch_add(1, Ordering::Relaxed);
    None
}

/// The connection ended: `PeerClosed` first when the broker closed it (`aborted`), then
/// `Closed` with the error.
async fn close(tx: &EventSender, aborted: bool, error: String) {
    if aborted {
        tx.send(LinkEvent::PeerClosed).await;
    }
    tx.send(LinkEvent::Closed(error)).await;
}

/// `Ok` for a success reason code, the code's name otherwise (formatted only then: this runs
/// for every acknowledgement).
fn reason_v5<R: std::fmt::Debug>(reason: R, success: bool) -> Result<(), Refused> {
    if success {
        Ok(())
    } else {
        Err(Refused(format!("{reason:?}")))
    }
}

pub(super) async fn drive_v5(
    mut el: rumqttc::v5::EventLoop,
    tx: EventSender,
    written: Arc<AtomicU64>,
) {
    loop {
        let event = match el.poll().await {
            Ok(event) => match event_v5(event, &written) {
                Some(event) => event,
                None => continue,
            },
            Err(e) => return close(&tx, aborted_v5(&e), e.to_string()).await,
        };
        if !tx.send(event).await {
            return;
        }
    }
}

/// What the link hears of an MQTT 5 event loop's event, if anything (see [`drive_v5`]; the
/// link's own connection polls its event loop itself: `super::inline`).
pub(super) fn event_v5(event: rumqttc::v5::Event, written: &AtomicU64) -> Option<LinkEvent> {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event;
    use v5b::Packet;
    Some(match event {
        Event::Incoming(Packet::ConnAck(c)) => LinkEvent::Connected {
            session_present: c.session_present,
            max_packet_size: c.properties.as_ref().and_then(|p| p.max_packet_size),
            receive_max: c.properties.as_ref().and_then(|p| p.receive_max),
        },
        Event::Incoming(Packet::Publish(p)) => incoming(
            Message {
                topic: p.topic,
                payload: p.payload,
                qos: qos_u8_v5(p.qos),
                retain: p.retain,
                properties: p.properties,
            },
            p.pkid,
        ),
        Event::Incoming(Packet::PubAck(a)) => {
            use v5b::PubAckReason as R;
            let ok = matches!(a.reason, R::Success | R::NoMatchingSubscribers);
            LinkEvent::PubAck(a.pkid, reason_v5(a.reason, ok))
        }
        Event::Incoming(Packet::PubRec(a)) => {
            use v5b::PubRecReason as R;
            let ok = matches!(a.reason, R::Success | R::NoMatchingSubscribers);
            LinkEvent::PubRec(a.pkid, reason_v5(a.reason, ok))
        }
        Event::Incoming(Packet::PubComp(a)) => LinkEvent::PubComp(a.pkid),
        Event::Incoming(Packet::SubAck(s)) => LinkEvent::SubAck(
            s.return_codes
                .iter()
                .filter(|c| !matches!(c, v5b::SubscribeReasonCode::Success(_)))
                .map(|c| format!("{c:?}"))
                .collect(),
        ),
        Event::Outgoing(Outgoing::Publish(pkid)) => return wrote(pkid, written),
        Event::Incoming(Packet::Disconnect(d))
            if d.reason_code == v5b::DisconnectReasonCode::SessionTakenOver =>
        {
            LinkEvent::PeerClosed
        }
        _ => return None,
    })
}

/// The broker closed the connection (see [`LinkEvent::PeerClosed`]).
pub(super) fn aborted_v5(e: &rumqttc::v5::ConnectionError) -> bool {
    matches!(
        e,
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ConnectionAborted)
    )
}
