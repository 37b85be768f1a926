//! One connection to one broker: rumqttc client + event loop for MQTT 5 or 3.1.1, behind one
//! protocol-neutral interface.
//!
//! Every connection attempt gets a fresh rumqttc `EventLoop`. The link (not rumqttc) keeps the
//! messages that were not acknowledged and publishes them again on the next connection; that
//! avoids two rumqttc behaviours that lose or wedge messages across reconnects: its pending
//! queue is silently dropped when the broker answers `session_present = false`, and a PUBREL for
//! a QoS 2 message received before the reconnect is answered with a disconnect
//! (bytebeamio/rumqtt#664). For the latter, [`seed_v4`] and [`seed_v5`] mark every packet id as
//! a known incoming QoS 2 exchange, so a resent PUBREL is answered with PUBCOMP as the MQTT 5
//! spec asks.
//!
//! The same holds in the other direction: a QoS 2 message we published may sit in the broker's
//! session waiting for our PUBREL when the connection (or the process) died. The link numbers its
//! publishes 1..=`inflight_max` (as rumqttc would), so on a resumed session the bridge first sends
//! PUBREL for each of those ids (through the vendored rumqttc's `release` queue, two bytes an id,
//! which it drops by itself when the session is new). The broker completes what it holds and
//! answers PUBCOMP for the rest; without this, a new publish reusing such an id would be taken by
//! the broker for the old one and lost. The broker delivers a stored QoS 2 message when it gets the
//! PUBREL, so the ids the previous connection left unacknowledged go first, in the order it sent
//! them ([`resume_order`]); the ids wrap around, and id order would deliver newer messages before
//! older ones.
//! After a restart of the process that order is unknown: up to `inflight_max` QoS 2 messages held
//! by a broker at the crash may be delivered out of order.
//!
//! `EventLoop::poll` is not cancel-safe (a cancelled flush can resend half a packet), so it runs
//! alone in a driver task that turns rumqttc events into [`LinkEvent`]s; the link task talks to
//! the client only through non-blocking calls. The driver rings a doorbell after each event
//! (see [`Session::next_event`]). A link's own MQTT 5 connection has no driver: the link polls
//! the event loop's cancel-safe parts itself ([`open_polled`], [`inline`]).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as v5b;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::BrokerConfig;
use crate::doorbell::Doorbell;
use crate::message::Protocol;
use crate::message::{AckRequest, Message};

mod client;
mod driver;
mod inline;
pub(crate) use client::{Client, SendError};
use driver::{EventSender, drive_v4, drive_v5};
use inline::Inline;

/// Largest packet MQTT allows; the bridge never refuses what a broker accepted.
pub(crate) const MQTT_MAX_PACKET: u32 = 268_435_455;

/// What a connection reports to its link.
// `Publish` is by far the most frequent variant; boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// CONNACK accepted.
    Connected {
        /// The broker kept our session.
        session_present: bool,
        /// The broker's maximum packet size (MQTT 5), if it announced one.
        max_packet_size: Option<u32>,
        /// The broker's Receive Maximum (MQTT 5), if it announced one.
        receive_max: Option<u16>,
    },
    /// A message from the broker.
    Publish {
        /// The message.
        msg: Message,
        /// What to acknowledge (QoS ≥ 1).
        ack: Option<AckRequest>,
    },
    /// One of our QoS 0 publishes (a message or a control record) was written. QoS 1/2
    /// publishes are not reported one by one: their packet ids are chosen by the caller, and
    /// [`Session::written`] counts them.
    Written,
    /// PUBACK for one of our QoS 1 publishes; `Err` carries the broker's reason.
    PubAck(u16, Result<(), Refused>),
    /// PUBREC for one of our QoS 2 publishes.
    PubRec(u16, Result<(), Refused>),
    /// PUBCOMP for one of our QoS 2 publishes.
    PubComp(u16),
    /// SUBACK; the failures, if any.
    SubAck(Vec<String>),
    /// The broker ended the connection itself (it closed the socket, or an MQTT 5 DISCONNECT
    /// said the session was taken over): sent just before [`LinkEvent::Closed`]. Another
    /// client with this client id takes the session over that way.
    PeerClosed,
    /// The connection failed or closed; the driver has stopped.
    Closed(String),
}

/// Who a connection is (see [`crate::ha`]): the mesh's persistent consumer session of this
/// broker, or this instance's own clean session that only publishes.
#[derive(Debug, Clone)]
pub(crate) struct ConnectAs {
    /// Client id.
    pub(crate) client_id: String,
    /// Clean session (3.1.1) / clean start with no session expiry (MQTT 5).
    pub(crate) clean: bool,
    /// Retained Will: topic, payload, and (MQTT 5) Will Delay.
    pub(crate) will: Option<(String, Vec<u8>, Duration)>,
}

/// Settings of the connection shared by every attempt.
#[derive(Debug, Clone)]
pub(crate) struct SessionSettings {
    /// The broker.
    pub(crate) broker: BrokerConfig,
    /// The consumer session's client id (`<bridge id>-<broker name>`).
    pub(crate) client_id: String,
    /// MQTT keep-alive.
    pub(crate) keep_alive: Duration,
    /// Session expiry asked of MQTT 5 brokers.
    pub(crate) session_expiry: Duration,
    /// Outgoing QoS ≥ 1 messages in flight on a short path: the floor of the window (see
    /// [`super::window`]).
    pub(crate) inflight: u16,
    /// The most outgoing QoS ≥ 1 messages in flight: the cap of the window (with the broker's
    /// Receive Maximum), and the packet ids the link numbers its publishes with. Also the
    /// Receive Maximum announced to the broker: an origin's window is held for its own round
    /// trip and its farthest target's (docs/FLOW.md), so it must fit the longest path, as
    /// the links' windows do.
    pub(crate) inflight_max: u16,
    /// Connections a link publishes on while the broker's Receive Maximum holds a long path
    /// back (see [`super::spread`]); 1: its own only.
    pub(crate) publish_connections: u8,
    /// The first extra connection speaks MQTT 3.1.1 (see [`super::spread`]).
    pub(crate) v311_lane: bool,
}

impl SessionSettings {
    /// Capacity of rumqttc's request channel: the link never has more than `inflight_max`
    /// publishes plus this many acknowledgements waiting in it (the channel grows to what it
    /// holds; the capacity only bounds it).
    pub(crate) fn request_capacity(&self) -> usize {
        usize::from(self.inflight_max) + 1024
    }
}

/// A live connection attempt: the client, and the events of its connection.
#[derive(Debug)]
pub(crate) struct Session {
    /// Request side.
    pub(crate) client: Client,
    /// QoS 1/2 publishes the client wrote, in the order they were handed to it (it writes in
    /// order): what a lost connection may have delivered (see [`super::poison`]).
    pub(crate) written: Arc<AtomicU64>,
    source: Source,
}

/// What [`Session::progress`] saw.
#[derive(Debug)]
pub(crate) enum Progress {
    /// The next event; `None` once the connection's events ended.
    Event(Option<LinkEvent>),
    /// Everything waiting was written (not reading).
    Flushed,
}

/// Who polls the connection's event loop.
#[derive(Debug)]
enum Source {
    /// A driver task, which sends the events.
    Driver {
        /// Events, ending with `Closed`.
        events: mpsc::Receiver<LinkEvent>,
        /// Rung by the driver after each event it sent, and when it ends (see
        /// [`Session::next_event`]).
        bell: Arc<Doorbell>,
        /// The driver task (aborted when the session is dropped).
        driver: JoinHandle<()>,
    },
    /// The task that waits for the events: a link's own MQTT 5 connection (see [`inline`]).
    Inline(Box<Inline>),
}

impl Session {
    /// The next event, `None` once the driver ended (cancel-safe). Waits on the driver's
    /// doorbell rather than on the channel: a link polls this at every pass of its `select!`,
    /// and the channel's wait costs about 230 instructions a pass (callgrind), a doorbell's
    /// about 50 (see [`crate::doorbell`]). Whatever a ring was for is in the channel by then.
    pub(crate) async fn next_event(&mut self) -> Option<LinkEvent> {
        loop {
            // While reading, progress is only ever an event.
            if let Progress::Event(event) = self.progress(true).await {
                return event;
            }
        }
    }

    /// An event waiting already, if any: what a batch takes after its first (see
    /// `link::events`).
    pub(crate) fn try_event(&mut self) -> Option<LinkEvent> {
        match &mut self.source {
            Source::Driver { events, .. } => events.try_recv().ok(),
            Source::Inline(inline) => inline.try_event(),
        }
    }

    /// Hands what the client queued to the connection (a polled connection: before each
    /// wait; a driver takes requests itself).
    pub(crate) fn pump(&mut self) {
        if let Source::Inline(inline) = &mut self.source {
            inline.pump();
        }
    }

    /// Bytes wait to be written (a polled connection: [`Session::progress`] writes them).
    pub(crate) fn unflushed(&self) -> bool {
        match &self.source {
            Source::Driver { .. } => false,
            Source::Inline(inline) => inline.unflushed(),
        }
    }

    /// Writes what waits, and with `reading` waits for the next event (cancel-safe): the
    /// event, or (not `reading`) that everything was written. A polled connection writes only
    /// while its task waits here.
    pub(crate) async fn progress(&mut self, reading: bool) -> Progress {
        let inline = match &mut self.source {
            Source::Driver { events, bell, .. } if reading => {
                return Progress::Event(next_event(events, bell).await);
            }
            Source::Driver { .. } => return std::future::pending().await,
            Source::Inline(inline) => inline,
        };
        std::future::poll_fn(|cx| inline.poll_progress(cx, reading)).await
    }

    /// A polled connection pings when its keep-alive interval is due; `reading`: its events
    /// are being taken (a driver pings by itself). Called at least every few seconds.
    pub(crate) fn keep_alive(&mut self, reading: bool) {
        if let Source::Inline(inline) = &mut self.source {
            inline.keep_alive(reading);
        }
    }

    /// Lets the driver write what was queued (acknowledgements, records, the DISCONNECT), for
    /// up to 2 s, or until the connection closed.
    pub(crate) async fn wait_closed(&mut self) {
        let deadline = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(deadline);
        self.pump();
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                progress = self.progress(true) => {
                    if matches!(progress, Progress::Event(None | Some(LinkEvent::Closed(_)))) {
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Source::Driver { driver, .. } = &self.source {
            driver.abort();
        }
    }
}

/// The next event of `events`, whose driver rings `bell` (see [`Session::next_event`]).
async fn next_event(events: &mut mpsc::Receiver<LinkEvent>, bell: &Doorbell) -> Option<LinkEvent> {
    std::future::poll_fn(|cx| {
        loop {
            match events.try_recv() {
                Ok(event) => return std::task::Poll::Ready(Some(event)),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return std::task::Poll::Ready(None);
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            std::task::ready!(bell.poll_rung(cx));
        }
    })
    .await
}

/// Packet ids to send PUBREL for on a resumed session: `first` in the order given (the order
/// in which the previous connection sent those publishes), then every other id up to
/// `inflight` (the highest this process may have used), whose order is unknown (after a
/// restart of the process).
pub(crate) fn resume_order(first: &[u16], inflight: u16) -> Vec<u16> {
    let mut seen = std::collections::HashSet::new();
    first
        .iter()
        .copied()
        .chain(1..=inflight)
        .filter(|p| (1..=inflight).contains(p) && seen.insert(*p))
        .collect()
}

/// Starts a connection attempt; the first event is `Connected` or `Closed`. On a resumed
/// session, PUBREL goes out first for the ids in `release`, in that order (see
/// [`resume_order`]): a QoS 2 message the broker stored is delivered when it gets its PUBREL,
/// so this order is the delivery order. Connections that publish no QoS 2 of their own pass
/// none.
pub(crate) fn open(s: &SessionSettings, who: &ConnectAs, release: &[u16]) -> Session {
    let (tx, rx) = mpsc::channel(1024);
    let bell = Arc::new(Doorbell::new());
    let tx = EventSender::new(tx, bell.clone());
    let written = Arc::new(AtomicU64::new(0));
    let (client, driver) = match s.broker.protocol {
        Protocol::V311 => {
            let (client, mut el) =
                rumqttc::AsyncClient::new(options_v4(s, who), s.request_capacity());
            el.set_network_options(network_options());
            // The link sends again what a connection left unacknowledged, on the next event
            // loop: rumqttc's copy of each publish in flight would be a clone per message.
            el.state.keep_publish_copies = false;
            seed_v4(&mut el);
            el.release.extend(releasable(who, release));
            (
                Client::V4(client),
                tokio::spawn(drive_v4(el, tx, written.clone())),
            )
        }
        Protocol::V5 => {
            let (client, el) = client_v5(s, who, release);
            (
                Client::V5(client),
                tokio::spawn(drive_v5(el, tx, written.clone())),
            )
        }
    };
    Session {
        client,
        written,
        source: Source::Driver {
            events: rx,
            bell,
            driver,
        },
    }
}

/// [`open`] for a link's own connection: on MQTT 5, polled by the link's task itself (see
/// [`inline`]): the caller waits on [`Session::progress`] (which writes while it waits), calls
/// [`Session::pump`] before each wait and [`Session::keep_alive`] at least every few seconds.
/// MQTT 3.1.1 connections keep a driver.
pub(crate) fn open_polled(s: &SessionSettings, who: &ConnectAs, release: &[u16]) -> Session {
    if s.broker.protocol != Protocol::V5 {
        return open(s, who, release);
    }
    let written = Arc::new(AtomicU64::new(0));
    let (client, el) = client_v5(s, who, release);
    Session {
        client: Client::V5(client),
        source: Source::Inline(Box::new(Inline::new(el, written.clone()))),
        written,
    }
}

/// The TLS transport of `b`'s connections: its files are read again for every connection, so
/// rotated ones are picked up.
fn transport(b: &BrokerConfig) -> Option<rumqttc::Transport> {
    b.tls
        .as_ref()
        .map(|tls| rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(tls.config())))
}

/// MQTT 3.1.1 options of a connection as `who`.
fn options_v4(s: &SessionSettings, who: &ConnectAs) -> rumqttc::MqttOptions {
    let b = &s.broker;
    let mut o = rumqttc::MqttOptions::new(who.client_id.clone(), b.host.clone(), b.port);
    if let Some((topic, payload, _)) = &who.will {
        o.set_last_will(rumqttc::LastWill::new(
            topic,
            payload.clone(),
            rumqttc::QoS::AtLeastOnce,
            true,
        ));
    }
    o.set_keep_alive(s.keep_alive)
        .set_clean_session(who.clean)
        .set_manual_acks(true)
        .set_inflight(s.inflight_max)
        .set_max_packet_size(MQTT_MAX_PACKET as usize, MQTT_MAX_PACKET as usize);
    if let Some(t) = transport(b) {
        o.set_transport(t);
    }
    if let Some((u, p)) = &b.credentials {
        o.set_credentials(u.clone(), p.expose().to_string());
    }
    o
}

/// An MQTT 5 client and its event loop, as every connection sets them up (see [`open`]).
fn client_v5(
    s: &SessionSettings,
    who: &ConnectAs,
    release: &[u16],
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let (client, mut el) = rumqttc::v5::AsyncClient::new(options_v5(s, who), s.request_capacity());
    // The link sends again what a connection left unacknowledged, on the next event loop:
    // rumqttc's copy of each publish in flight would be a clone per message.
    el.state.keep_publish_copies = false;
    seed_v5(&mut el);
    el.release.extend(releasable(who, release));
    (client, el)
}

/// The ids whose PUBREL a connection as `who` sends first: none on a clean session, which
/// holds nothing to release (rumqttc would drop these unsent anyway).
fn releasable<'a>(who: &ConnectAs, release: &'a [u16]) -> &'a [u16] {
    if who.clean { &[] } else { release }
}

/// MQTT 5 options of a connection as `who`.
fn options_v5(s: &SessionSettings, who: &ConnectAs) -> rumqttc::v5::MqttOptions {
    let b = &s.broker;
    let mut o = rumqttc::v5::MqttOptions::new(who.client_id.clone(), b.host.clone(), b.port);
    if let Some((topic, payload, delay)) = &who.will {
        let properties = v5b::LastWillProperties {
            delay_interval: Some(u32::try_from(delay.as_secs()).unwrap_or(u32::MAX)),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        o.set_last_will(v5b::LastWill::new(
            topic,
            payload.clone(),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            Some(properties),
        ));
    }
    let expiry = if who.clean {
        0
    } else {
        u32::try_from(s.session_expiry.as_secs()).unwrap_or(u32::MAX)
    };
    o.set_keep_alive(s.keep_alive)
        .set_clean_start(who.clean)
        .set_manual_acks(true)
        .set_session_expiry_interval(Some(expiry))
        .set_receive_maximum(Some(s.inflight_max.max(20)))
        .set_max_packet_size(Some(MQTT_MAX_PACKET))
        .set_outgoing_inflight_upper_limit(s.inflight_max)
        .set_network_options(network_options());
    if let Some(t) = transport(b) {
        o.set_transport(t);
    }
    if let Some((u, p)) = &b.credentials {
        o.set_credentials(u.clone(), p.expose().to_string());
    }
    o
}

/// TCP options of every broker connection: Nagle's algorithm off. The event loop already
/// gathers what is ready into one write, and a relay must not hold a lone packet back for
/// the peer's delayed acknowledgement (up to 40 ms on Linux).
fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// Marks every packet id as an incoming QoS 2 exchange (the vendored
/// `MqttState::expect_pubrel_for_every_id`), so that a PUBREL the broker resends for an exchange
/// of an earlier connection (or an earlier process) is answered with PUBCOMP instead of killing
/// the connection (rumqtt#664). Done through `handle_incoming_packet` with 65 535 made-up
/// publishes it took 12 ms per connection: at 32 brokers, with a park session per pair of
/// brokers to open, most of the 12 s start-up.
fn seed_v4(el: &mut rumqttc::EventLoop) {
    el.state.expect_pubrel_for_every_id();
}

/// [`seed_v4`] for an MQTT 5 event loop. Public for other rumqttc clients that resume sessions
/// (the test subscribers need it too).
pub fn seed_v5(el: &mut rumqttc::v5::EventLoop) {
    el.state.expect_pubrel_for_every_id();
}

/// A broker refused one of our publishes (an MQTT 5 reason code of 0x80 or more): the code's
/// name, as the broker gave it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(pub(crate) String);

#[cfg(test)]
mod tests;
