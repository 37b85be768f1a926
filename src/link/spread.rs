//! More publishing connections for a link whose MQTT 5 broker's Receive Maximum holds a long
//! path back (issue 28, docs/FLOW.md).
//!
//! A broker announces how many QoS 1/2 publishes it takes unacknowledged (mosquitto: its
//! `max_inflight_messages`, default 20), and a client must keep to it: over a 100 ms round trip
//! 20 messages in flight carry 200 msg/s, whatever the link's window would take. The limit is
//! per connection, so a link that finds itself held back this way (its window capped by the
//! Receive Maximum on a long path: [`super::window::Window::starved`]) opens
//! `publish_connections - 1` more clean-start connections to the broker, *lanes*, and spreads
//! its QoS 1 publishes over them and its own:
//!
//! - **Order.** A topic with QoS 1 messages in flight stays on the connection they went out
//!   on; only a topic with none in flight goes to another one (the one with the most room), so
//!   every topic's QoS 1 messages reach the broker in order. QoS 0 and QoS 2 messages stay on
//!   the link's own connection (QoS 2 needs the persistent session's PUBREL bookkeeping), so
//!   they keep their order among themselves, not with a topic's QoS 1 messages (MQTT orders
//!   each QoS level on its own).
//! - **Nothing lost.** The link keeps every message it handed to a lane until the lane reports
//!   its acknowledgement. A lane whose connection ends is not used again during the link's
//!   connection, and what it had not had acknowledged goes back to the front of the queue, in
//!   order (published again: counted as redelivered). When the link's own connection ends, the
//!   lanes end with it and what they held goes back with the rest.
//! - **The cost.** A message published on a lane comes back on the link's own subscription
//!   (No Local holds for the publishing session only) and is dropped there by its origin tag:
//!   lanes open only on a long path held back by the broker, never on loopback.
//! - **The 3.1.1 lane** (`v311_lane`). The Receive Maximum is an MQTT 5 limit: the first lane
//!   speaks MQTT 3.1.1, which sets none, and takes up to `inflight_max` in flight. It carries
//!   only messages that need nothing of MQTT 5 ([`Message::plain`]); what it publishes has no
//!   origin tag, so where this process consumes the broker the link records each publish's
//!   fingerprint and drops the echo by it, as on a 3.1.1 link, and where another one does the
//!   lane publishes an echo note ahead of each message on its own connection. A topic on it
//!   waits there for room rather than moving: it is full only with many times what another
//!   connection takes.
//!
//! [`Spread`] is the link's side and pure state; [`lane`] is a lane's task.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

use super::outflight::OutFlight;
use super::session::{self, ConnectAs, LinkEvent, Refused, SessionSettings};
use crate::message::{Message, Protocol};

/// What a lane's task tells its link.
#[derive(Debug)]
pub(crate) enum LaneEvent {
    /// Connected: publishes go through `tx`, at most `cap` of them unacknowledged.
    Up {
        tx: mpsc::UnboundedSender<LanePublish>,
        cap: usize,
    },
    /// The broker acknowledged (or refused) the lane's publish `seq`.
    Acked(u64, Result<(), Refused>),
    /// The lane's connection ended (and its task with it): why.
    Down(String),
}

/// One QoS 1 publish for a lane.
#[derive(Debug)]
pub(crate) struct LanePublish {
    seq: u64,
    msg: Arc<Message>,
    topic: String,
    properties: Option<Arc<PublishProperties>>,
    /// An echo note (topic, sealed body) the lane publishes first, at QoS 0, on the same
    /// connection: the 3.1.1 lane of a process that does not consume the broker tells the one
    /// that does what its echo will be (see `Link::hand_to_lane`).
    note: Option<(String, Vec<u8>)>,
}

/// Where a QoS 1 message goes (see [`Spread::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The link's own connection.
    Own,
    /// Lane `i`.
    Lane(usize),
    /// Nowhere yet: the connection its topic is in flight on is full, or every one is.
    Wait,
}

/// The link's side of one lane.
#[derive(Debug)]
struct Lane<T> {
    /// It speaks MQTT 3.1.1: no Receive Maximum, no properties, no origin tag (see
    /// [`Spread::v311`]).
    v311: bool,
    /// Where its publishes go, once connected.
    tx: Option<mpsc::UnboundedSender<LanePublish>>,
    /// The broker's Receive Maximum for it.
    cap: usize,
    /// Its connection ended: not used again.
    down: bool,
    /// What it was handed and has not reported acknowledged, oldest first, up to `next`
    /// (`None`: acknowledged, waiting for the older ones to be). Over a long path it holds
    /// thousands: nothing is kept per message but the message.
    flight: VecDeque<Option<T>>,
    outstanding: usize,
    /// The `seq` of the next publish handed over.
    next: u64,
}

impl<T> Lane<T> {
    fn new(v311: bool) -> Self {
        Self {
            v311,
            tx: None,
            cap: 0,
            down: false,
            flight: VecDeque::new(),
            outstanding: 0,
            next: 0,
        }
    }

    /// The `seq` of the oldest publish in `flight` (publishes are numbered in turn, and
    /// `flight` loses them only from the front).
    fn first(&self) -> u64 {
        self.next - self.flight.len() as u64
    }

    /// Connected and not ended.
    fn usable(&self) -> bool {
        self.tx.is_some() && !self.down
    }

    /// Room for more publishes; for a message that needs MQTT 5 (`plain` false), none on a
    /// 3.1.1 lane.
    fn free(&self, plain: bool) -> usize {
        if self.usable() && (plain || !self.v311) {
            self.cap.saturating_sub(self.outstanding)
        } else {
            0
        }
    }
}

/// The route to connection `c` (0: the link's own, `i + 1`: lane `i`).
fn to(c: usize) -> Route {
    match c {
        0 => Route::Own,
        c => Route::Lane(c - 1),
    }
}

/// What the lanes hold: something with the (origin) topic its message is counted under.
pub(crate) trait OnTopic {
    fn topic(&self) -> &Bytes;
}

impl OnTopic for crate::router::Outbound {
    fn topic(&self) -> &Bytes {
        &self.msg.topic
    }
}

/// A link's lanes: which topics go where, and what each holds. Generic over the message, so
/// that it is tested without a broker. Dropping it ends the lanes' tasks.
#[derive(Debug)]
pub(crate) struct Spread<T> {
    lanes: Vec<Lane<T>>,
    /// Topics with QoS 1 messages in flight: on which connection (0: the link's own, `i + 1`:
    /// lane `i`), how many, and whether the topic waits to move (see [`Spread::route`]). At
    /// most the link's window of entries.
    topics: HashMap<Bytes, (usize, u32, bool), ahash::RandomState>,
    /// The own connection's packet ids that carry a QoS 1 message counted in `topics`.
    own_counted: Vec<bool>,
    /// The lanes' reports.
    pub(crate) events: mpsc::UnboundedReceiver<(usize, LaneEvent)>,
    stop: CancellationToken,
}

impl<T> Drop for Spread<T> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl<T: OnTopic> Spread<T> {
    /// `extra` lanes, not connected yet, the first speaking MQTT 3.1.1 if `v311`, reporting on
    /// `events` until `stop`.
    fn new(
        extra: usize,
        v311: bool,
        events: mpsc::UnboundedReceiver<(usize, LaneEvent)>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            lanes: (0..extra).map(|i| Lane::new(v311 && i == 0)).collect(),
            topics: HashMap::default(),
            own_counted: vec![false; usize::from(u16::MAX) + 1],
            events,
            stop,
        }
    }

    /// Where a QoS 1 message on `topic` goes now, the link's own connection having room for
    /// `own_free` more: where its topic is in flight, or (none of it is) the connection with
    /// the most room. A topic in flight on a full connection while another one has room is
    /// moved there: its messages wait until none of it is in flight any more (a topic always
    /// in flight on the own connection would otherwise never leave it). A message that needs
    /// MQTT 5 (`plain` false: it has properties) never goes on a 3.1.1 lane; its topic, in
    /// flight there, moves the same way. A plain message's topic never moves off the 3.1.1
    /// lane: it has no Receive Maximum, so it is full only with many times what another
    /// connection takes, and a move waits for all of that to be acknowledged first.
    pub(crate) fn route(&mut self, topic: &Bytes, own_free: usize, plain: bool) -> Route {
        let placed = self.topics.get(topic).map(|&(c, _, moving)| (c, moving));
        match placed {
            Some((_, true)) => Route::Wait,
            Some((c, false)) if self.free(c, own_free, plain) > 0 => to(c),
            // The 3.1.1 lane is the widest: a topic on it waits there for room.
            Some((c, false)) if plain && c > 0 && self.v311(c - 1) => Route::Wait,
            Some(_) => {
                let moves = self.most_room(own_free, plain).1 > 0;
                if let Some(entry) = self.topics.get_mut(topic) {
                    entry.2 = moves;
                }
                Route::Wait
            }
            None => match self.most_room(own_free, plain) {
                (_, 0) => Route::Wait,
                (c, _) => to(c),
            },
        }
    }

    /// Room on connection `c` (0: the link's own, with `own_free`) for a message that is
    /// `plain` or not.
    fn free(&self, c: usize, own_free: usize, plain: bool) -> usize {
        match c {
            0 => own_free,
            c => self.lanes[c - 1].free(plain),
        }
    }

    /// The connection with the most room for a message that is `plain` or not (the link's own
    /// first among equals), and its room.
    fn most_room(&self, own_free: usize, plain: bool) -> (usize, usize) {
        self.lanes
            .iter()
            .enumerate()
            .map(|(i, l)| (i + 1, l.free(plain)))
            .fold(
                (0, own_free),
                |best, next| {
                    if next.1 > best.1 { next } else { best }
                },
            )
    }

    fn count(&mut self, topic: &Bytes, connection: usize) {
        self.topics
            .entry(topic.clone())
            .or_insert((connection, 0, false))
            .1 += 1;
    }

    fn uncount(&mut self, topic: &Bytes) {
        if let Some(entry) = self.topics.get_mut(topic) {
            entry.1 -= 1;
            if entry.1 == 0 {
                self.topics.remove(topic);
            }
        }
    }

    /// Hands `item` to lane `i` to be published as `msg` on `topic`, after `note` if any;
    /// given back when the lane has no room (its Receive Maximum) or its task is gone (its
    /// `Down` is on the way).
    pub(crate) fn hand(
        &mut self,
        i: usize,
        item: T,
        msg: Arc<Message>,
        topic: String,
        properties: Option<Arc<PublishProperties>>,
        note: Option<(String, Vec<u8>)>,
    ) -> Result<(), T> {
        let lane = &mut self.lanes[i];
        let Some(tx) = lane.tx.as_ref().filter(|_| lane.free(true) > 0) else {
            return Err(item);
        };
        let seq = lane.next;
        let publish = LanePublish {
            seq,
            msg,
            topic,
            properties,
            note,
        };
        if tx.send(publish).is_err() {
            return Err(item);
        }
        lane.next += 1;
        self.count(item.topic(), i + 1);
        let lane = &mut self.lanes[i];
        lane.flight.push_back(Some(item));
        lane.outstanding += 1;
        Ok(())
    }

    /// A QoS 1 message on `topic` went out on the link's own connection as `pkid`.
    pub(crate) fn own_sent(&mut self, topic: &Bytes, pkid: u16) {
        self.own_counted[usize::from(pkid)] = true;
        self.count(topic, 0);
    }

    /// The link's own connection had `pkid`, a message on `topic`, acknowledged.
    pub(crate) fn own_acked(&mut self, pkid: u16, topic: &Bytes) {
        if std::mem::take(&mut self.own_counted[usize::from(pkid)]) {
            self.uncount(topic);
        }
    }

    /// Lane `i` connected, taking `cap` unacknowledged publishes.
    pub(crate) fn up(&mut self, i: usize, tx: mpsc::UnboundedSender<LanePublish>, cap: usize) {
        if let Some(lane) = self.lanes.get_mut(i).filter(|l| !l.down) {
            lane.tx = Some(tx);
            lane.cap = cap.max(1);
        }
    }

    /// Lane `i` had its publish `seq` acknowledged: the message, if it still holds it.
    pub(crate) fn acked(&mut self, i: usize, seq: u64) -> Option<T> {
        let lane = self.lanes.get_mut(i)?;
        let index = usize::try_from(seq.checked_sub(lane.first())?).ok()?;
        let item = lane.flight.get_mut(index)?.take()?;
        lane.outstanding -= 1;
        while lane.flight.front().is_some_and(Option::is_none) {
            lane.flight.pop_front();
        }
        self.uncount(item.topic());
        Some(item)
    }

    /// Lane `i`'s connection ended: what it held, in the order it was handed over (its topics
    /// have nothing in flight any more).
    pub(crate) fn down(&mut self, i: usize) -> Vec<T> {
        let Some(lane) = self.lanes.get_mut(i) else {
            return Vec::new();
        };
        lane.down = true;
        lane.tx = None;
        lane.outstanding = 0;
        let held: Vec<T> = lane.flight.drain(..).flatten().collect();
        for item in &held {
            self.uncount(item.topic());
        }
        held
    }

    /// Everything the lanes hold, lane by lane, each in the order it was handed over (no topic
    /// is in flight on two connections): the link's connection ended.
    pub(crate) fn take_all(&mut self) -> Vec<T> {
        (0..self.lanes.len()).flat_map(|i| self.down(i)).collect()
    }

    /// Everything the lanes hold (to move it to the spool).
    pub(crate) fn all_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.lanes
            .iter_mut()
            .flat_map(|l| l.flight.iter_mut().flatten())
    }

    /// Messages the lanes hold.
    pub(crate) fn outstanding(&self) -> usize {
        self.lanes.iter().map(|l| l.outstanding).sum()
    }

    /// What the connected lanes take in flight together.
    pub(crate) fn window(&self) -> usize {
        self.lanes
            .iter()
            .filter(|l| l.usable())
            .map(|l| l.cap)
            .sum()
    }

    /// Lane `i` speaks MQTT 3.1.1: what goes out on it carries no properties (so no origin
    /// tag), and its echo is known by its fingerprint.
    pub(crate) fn v311(&self, i: usize) -> bool {
        self.lanes.get(i).is_some_and(|l| l.v311)
    }

    /// Connections the link publishes on now: its own and the connected lanes.
    pub(crate) fn connections(&self) -> usize {
        1 + self.lanes.iter().filter(|l| l.usable()).count()
    }
}

/// Opens `extra` lanes to the broker of `settings`, client ids `<id>~lane<n>@<instance>`, the
/// first speaking MQTT 3.1.1 if `v311`.
pub(crate) fn open<T: OnTopic>(
    settings: &SessionSettings,
    instance: &str,
    extra: usize,
    v311: bool,
) -> Spread<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let spread = Spread::new(extra, v311, rx, stop.clone());
    for (i, l) in spread.lanes.iter().enumerate() {
        let client_id = crate::topics::lane_id(&settings.client_id, instance, i + 1);
        let span = tracing::info_span!("lane", n = i + 1);
        let mut settings = settings.clone();
        if l.v311 {
            settings.broker.protocol = Protocol::V311;
        }
        tokio::spawn(lane(settings, client_id, i, tx.clone(), stop.clone()).instrument(span));
    }
    spread
}

/// Lane `index`: one clean-start connection; publishes what the link hands it with its own
/// packet ids and reports each acknowledgement, until `stop` or the connection ends.
async fn lane(
    settings: SessionSettings,
    client_id: String,
    index: usize,
    events: mpsc::UnboundedSender<(usize, LaneEvent)>,
    stop: CancellationToken,
) {
    let who = ConnectAs {
        client_id,
        clean: true,
        will: None,
    };
    let mut s = session::open(&settings, &who, &[]);
    let mut flight: OutFlight<u64> = OutFlight::default();
    let (tx, mut rx) = mpsc::unbounded_channel::<LanePublish>();
    let mut tx = Some(tx);
    let why = loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = s.client.disconnect();
                s.wait_closed().await;
                return;
            }
            event = s.next_event() => match event {
                None => break "connection task ended".to_string(),
                Some(LinkEvent::Closed(e)) => break e,
                Some(LinkEvent::Connected { receive_max, .. }) => {
                    let most = usize::from(settings.inflight_max);
                    let cap = receive_max.map_or(most, |m| usize::from(m).min(most));
                    if let Some(tx) = tx.take() {
                        let _ = events.send((index, LaneEvent::Up { tx, cap }));
                    }
                }
                Some(LinkEvent::PubAck(pkid, result)) => {
                    if let Some(seq) = flight.acknowledged(pkid) {
                        let _ = events.send((index, LaneEvent::Acked(seq, result)));
                    }
                }
                Some(_) => {}
            },
            Some(p) = rx.recv() => {
                let Some(pkid) = flight.free_id(settings.inflight_max) else {
                    break "no free packet id".to_string();
                };
                if let Some((note, body)) = p.note
                    && s.client.publish_record(&note, body, 0, 0, false, None).is_err()
                {
                    break "the connection takes no more".to_string();
                }
                if s.client.publish(&p.msg, &p.topic, 1, pkid, p.properties).is_err() {
                    break "the connection takes no more".to_string();
                }
                flight.handed_numbered(pkid, p.seq);
            }
        }
    };
    debug!(error = %why, "lane ended");
    let _ = events.send((index, LaneEvent::Down(why)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message numbered `.0`, on topic `.1`.
    #[derive(Debug)]
    struct Item(u32, Bytes);

    impl OnTopic for Item {
        fn topic(&self) -> &Bytes {
            &self.1
        }
    }

    fn spread(extra: usize) -> Spread<Item> {
        let (_tx, rx) = mpsc::unbounded_channel();
        Spread::new(extra, false, rx, CancellationToken::new())
    }

    fn msg(topic: &'static str) -> Arc<Message> {
        Arc::new(Message {
            topic: Bytes::from_static(topic.as_bytes()),
            payload: Bytes::from_static(b"x"),
            qos: 1,
            retain: false,
            properties: None,
        })
    }

    /// Lane `i` connected with room for `cap`; the receiver of what it is handed.
    fn connect(s: &mut Spread<Item>, i: usize, cap: usize) -> mpsc::UnboundedReceiver<LanePublish> {
        let (tx, rx) = mpsc::unbounded_channel();
        s.up(i, tx, cap);
        rx
    }

    fn hand(s: &mut Spread<Item>, i: usize, n: u32, topic: &'static str) -> Result<(), u32> {
        let item = Item(n, Bytes::from_static(topic.as_bytes()));
        s.hand(i, item, msg(topic), topic.into(), None, None)
            .map_err(|item| item.0)
    }

    /// [`Spread::acked`], the message's number.
    fn acked(s: &mut Spread<Item>, i: usize, seq: u64) -> Option<u32> {
        s.acked(i, seq).map(|item| item.0)
    }

    #[test]
    fn a_topic_stays_on_its_connection_while_it_has_messages_in_flight() {
        let mut s = spread(2);
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        assert_eq!(s.route(&a, 5, true), Route::Own, "no lane connected yet");
        s.own_sent(&a, 7);
        let _rx = connect(&mut s, 0, 10);
        assert_eq!(
            s.route(&a, 5, true),
            Route::Own,
            "a is in flight on the own connection"
        );
        assert_eq!(
            s.route(&b, 5, true),
            Route::Lane(0),
            "b goes where there is most room"
        );
        assert_eq!(s.route(&b, 0, true), Route::Lane(0));
        assert_eq!(
            s.route(&a, 0, true),
            Route::Wait,
            "the own connection is full: a moves"
        );
        assert_eq!(
            s.route(&a, 5, true),
            Route::Wait,
            "once none of it is in flight"
        );
        s.own_acked(7, &a);
        assert_eq!(
            s.route(&a, 5, true),
            Route::Lane(0),
            "nothing of a in flight: where most room is"
        );
        s.own_acked(7, &a);
        assert!(s.topics.is_empty(), "an acknowledgement counted once");
        assert_eq!((s.connections(), s.window()), (2, 10));
    }

    #[test]
    fn a_lane_keeps_to_its_receive_maximum_and_gives_back_in_order_when_it_ends() {
        let mut s = spread(1);
        let mut rx = connect(&mut s, 0, 3);
        for n in 0..3 {
            assert!(hand(&mut s, 0, n, "t").is_ok());
        }
        assert_eq!(hand(&mut s, 0, 3, "t"), Err(3), "full");
        assert_eq!(
            s.route(&Bytes::from_static(b"t"), 0, true),
            Route::Wait,
            "t stays on the lane"
        );
        let seqs: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok().map(|p| p.seq)).collect();
        assert_eq!(seqs, [0, 1, 2]);
        assert_eq!(acked(&mut s, 0, 1), Some(1), "acknowledged out of order");
        assert_eq!(acked(&mut s, 0, 1), None, "once");
        assert_eq!(s.outstanding(), 2);
        assert!(hand(&mut s, 0, 3, "t").is_ok());
        assert_eq!(acked(&mut s, 0, 0), Some(0));
        assert_eq!(
            s.down(0).iter().map(|item| item.0).collect::<Vec<_>>(),
            [2, 3],
            "what it held, in order"
        );
        assert!(s.topics.is_empty(), "t has nothing in flight any more");
        assert_eq!(s.route(&Bytes::from_static(b"t"), 9, true), Route::Own);
        assert_eq!(
            hand(&mut s, 0, 4, "t"),
            Err(4),
            "an ended lane takes nothing"
        );
        assert_eq!((s.outstanding(), s.connections(), s.window()), (0, 1, 0));
    }

    #[test]
    fn the_311_lane_takes_plain_messages_only_and_keeps_its_topics() {
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut s: Spread<Item> = Spread::new(2, true, rx, CancellationToken::new());
        let _rx0 = connect(&mut s, 0, 8192);
        let _rx1 = connect(&mut s, 1, 100);
        assert!(s.v311(0) && !s.v311(1));
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        assert_eq!(s.route(&a, 100, true), Route::Lane(0), "most room");
        assert_eq!(
            s.route(&b, 100, false),
            Route::Own,
            "properties: never on 3.1.1 (the own first among equals)"
        );
        for n in 0..8192 {
            hand(&mut s, 0, n, "a").unwrap();
        }
        assert_eq!(
            s.route(&a, 100, true),
            Route::Wait,
            "full: a waits for room on its lane"
        );
        assert_eq!(
            acked(&mut s, 0, 0),
            Some(0),
            "one acknowledged: room again on the lane"
        );
        assert_eq!(s.route(&a, 100, true), Route::Lane(0), "a never moved");
        assert_eq!(
            s.route(&a, 100, false),
            Route::Wait,
            "with properties: a moves off the 3.1.1 lane"
        );
        assert_eq!(
            s.route(&a, 100, true),
            Route::Wait,
            "and what follows waits behind it, in order"
        );
        for seq in 1..8192 {
            acked(&mut s, 0, seq).unwrap();
        }
        assert_eq!(
            s.route(&a, 50, false),
            Route::Lane(1),
            "nothing of a in flight: the most room an MQTT 5 message can have"
        );
    }

    /// Why the link holds the later messages of a topic once one is held (`fill_window`):
    /// with the MQTT 5 connections full, a message with properties waits while one without
    /// finds room on the 3.1.1 lane, and would overtake it.
    #[test]
    fn with_the_311_lane_the_route_depends_on_the_message() {
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut s: Spread<Item> = Spread::new(1, true, rx, CancellationToken::new());
        let _rx0 = connect(&mut s, 0, 8192);
        let t = Bytes::from_static(b"t");
        assert_eq!(s.route(&t, 0, false), Route::Wait, "properties: no room");
        assert_eq!(s.route(&t, 0, true), Route::Lane(0), "plain: room");
    }

    #[test]
    fn new_topics_go_where_there_is_most_room() {
        let mut s = spread(2);
        let _rx0 = connect(&mut s, 0, 2);
        let _rx1 = connect(&mut s, 1, 3);
        let topics: [&'static str; 5] = ["a", "b", "c", "d", "e"];
        let mut own_free = 2;
        let mut placed = Vec::new();
        for (n, topic) in topics.into_iter().enumerate() {
            let route = s.route(&Bytes::from_static(topic.as_bytes()), own_free, true);
            placed.push(route);
            match route {
                Route::Own => {
                    s.own_sent(&Bytes::from_static(topic.as_bytes()), n as u16 + 1);
                    own_free -= 1;
                }
                Route::Lane(i) => hand(&mut s, i, n as u32, topic).unwrap(),
                Route::Wait => {}
            }
        }
        use Route::*;
        assert_eq!(placed, [Lane(1), Own, Lane(0), Lane(1), Own]);
        assert_eq!(
            s.route(&Bytes::from_static(b"f"), own_free, true),
            Route::Lane(0)
        );
    }
}
