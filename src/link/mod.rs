//! One task per broker: connect with backoff, subscribe, receive and hand messages to the
//! router, publish what the router queued for this broker, track acknowledgements.
//!
//! Life of a link: `Connecting` → `Connected` → (connection lost) → `Backoff` → `Connecting` …
//! until shutdown, which has two steps driven by the supervisor: `stop` (take no new messages
//! from the broker, keep delivering what is queued) and `disconnect` (send the remaining
//! acknowledgements, DISCONNECT, exit).
//!
//! The task's code is in four rooms: [`intake`] (what the broker sends, into the fan-out),
//! [`deliver`] (what the queue holds, out to the broker), [`events`] (the connection's events
//! and subscriptions) and [`role`] (the control records and what [`crate::ha::role`] decides).
//!
//! The MQTT bookkeeping is pure state beside the task: [`acks`] holds what the link owes its
//! broker (acknowledgements in order of receipt, per broker session), [`outflight`] what one
//! connection has sent and not seen acknowledged. The task only moves bytes and calls them.
//! When a connection is lost, everything not yet acknowledged goes back to the front of the
//! queue, in order, and is published again on the next connection (counted as redelivered: the
//! broker may have it twice).

pub(crate) mod acks;
pub(crate) mod backoff;
mod checks;
mod deliver;
mod drain;
mod events;
mod intake;
pub(crate) mod outflight;
mod poison;
mod role;
pub mod session;
pub(crate) mod spread;
pub(crate) mod threads;
pub(crate) mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::dedup::{EchoWindow, StormGuard};
use crate::doorbell::Doorbell;
use crate::ha::role::{End, Now, Role};
use crate::ha::{self, Consumption, Identity};
use crate::message::{AckInbox, AckSender, Protocol};
use crate::metrics::{self, LinkState, LinkStats, inc};
use crate::park::drains::Drains;
use crate::park::{self, CopyLane};
use crate::policy::Policy;
use crate::router::{Outbound, Router, TargetQueue};
use crate::topics::{self, Control};
use acks::InboundAcks;
use backoff::Backoff;
use outflight::OutFlight;
use poison::{PoisonPolicy, PoisonWatch};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use session::{Client, ConnectAs, Progress, Session, SessionSettings};

/// What every link of this process shares about the mesh's instances (see [`crate::ha`]).
#[derive(Debug)]
pub(crate) struct HaContext {
    /// This process.
    pub(crate) identity: Identity,
    /// The mesh's control topics.
    pub(crate) control: Control,
    /// MQTT 5 Will Delay of the instance records' Wills.
    pub(crate) will_delay: Duration,
    /// Coordinate with other instances (`[bridge] ha`); off: this process is the mesh's only
    /// one and consumes every broker, writing no control records.
    pub(crate) enabled: bool,
    /// The brokers' per-client queue limit (0: none), for park sessions.
    pub(crate) queue_limit: u64,
    /// The mesh key: control payloads are sealed with it and refused without a valid seal
    /// (see [`crate::seal`]); `None`: unauthenticated.
    pub(crate) key: Option<crate::seal::MeshKey>,
}

impl HaContext {
    /// `body` as published on the control topic `topic`: sealed when there is a key.
    pub(crate) fn seal(&self, topic: &str, body: Vec<u8>) -> Vec<u8> {
        crate::seal::seal_if(self.key.as_ref(), topic, body, ha::unix_ms())
    }

    /// The body of a control payload that arrived on `topic`, and when it was sealed; without
    /// a key the payload as it is (no time).
    pub(crate) fn open<'a>(
        &self,
        topic: &[u8],
        payload: &'a [u8],
    ) -> Result<(&'a [u8], Option<u64>), crate::seal::Rejected> {
        match &self.key {
            Some(k) => k.open(topic, payload).map(|(body, t)| (body, Some(t))),
            None => Ok((payload, None)),
        }
    }
}

/// Everything a link task needs.
#[derive(Debug)]
pub(crate) struct LinkContext {
    /// Connection settings.
    pub(crate) settings: SessionSettings,
    /// Broker name.
    pub(crate) name: Arc<str>,
    /// Bridge id, for origin tags.
    pub(crate) bridge_id: Arc<str>,
    /// Instances and ownership.
    pub(crate) ha: Arc<HaContext>,
    /// Copies of spooled messages on the origin brokers (`None`: `[bridge] ha = false`).
    pub(crate) parker: Option<Arc<crate::park::Parker>>,
    /// Fan-out to the other links.
    pub(crate) router: Arc<Router>,
    /// This link's own queue (registered in the router under `name`).
    pub(crate) queue: Arc<TargetQueue>,
    /// Counters and state.
    pub(crate) stats: Arc<LinkStats>,
    /// TTL of the echo window (3.1.1 links).
    pub(crate) dedup_window: Duration,
    /// Bound of the echo window.
    pub(crate) dedup_max_entries: usize,
    /// Storm guard threshold (0: off).
    pub(crate) storm_threshold: u32,
    /// Subscribe and forward the mesh's probes (`probe_interval` > 0).
    pub(crate) probes: bool,
    /// First shutdown step: take no new messages.
    pub(crate) stop: CancellationToken,
    /// Second shutdown step: acknowledge, disconnect, exit.
    pub(crate) disconnect: CancellationToken,
    /// Set to true while stopping once nothing is queued or in flight.
    pub(crate) drained: watch::Sender<bool>,
    /// Who consumes the broker with its subscriptions in place (readiness, status).
    pub(crate) consumption: watch::Sender<Consumption>,
    /// Set before `disconnect` when the link stops to be started again with new settings (a
    /// reload): what it holds goes to the spool as on a lost connection, for the next link,
    /// instead of being left to the origins as at the end of the process.
    pub(crate) restarting: Arc<std::sync::atomic::AtomicBool>,
}

/// Runs the link until `disconnect` is cancelled.
pub(crate) async fn run(ctx: LinkContext) {
    let span = tracing::info_span!("link", broker = %ctx.name);
    Link::new(ctx).run().instrument(span).await
}

enum Outcome {
    Lost {
        error: String,
        uptime: Option<Duration>,
        /// The broker ended the connection itself (see [`session::LinkEvent::PeerClosed`]).
        peer_closed: bool,
    },
    Shutdown,
    /// The connection ended to come back in the other role (see [`crate::ha`]).
    Switch,
}

struct Link {
    ctx: LinkContext,
    /// Rung when `ctx.stop` or `ctx.disconnect` is cancelled (see [`Doorbell::ring_on_cancel`]).
    halt: Arc<Doorbell>,
    acks_tx: AckSender,
    acks_rx: AckInbox,
    /// What this link owes its broker for what the broker sent (see [`acks`]).
    acks: InboundAcks,
    /// When the batch of connection events being handled was taken: one clock read per
    /// wake, not one per message (the events of a batch arrived together).
    now: Instant,
    echo: EchoWindow,
    /// 3.1.1: what other instances announced they publish here (see [`Control::echo_topic`]),
    /// by [`ha::portable_fingerprint`].
    peer_echo: EchoWindow,
    storm: StormGuard,
    /// Packet ids the last connection left unacknowledged, in the order it sent them: the next
    /// connection releases them in that order (see `session::open`).
    release_first: Vec<u16>,
    /// The highest packet id this process used on the broker's persistent session since it
    /// last took the session over; `None` before that: another process (or this one before a
    /// restart) may have used any id up to `inflight_max`, and a resumed session releases them
    /// all (see [`session::resume_order`]).
    pkid_high: Option<u16>,
    /// The properties of an origin's messages that carry none of their own: its origin tag
    /// (`<bridge id>/<origin broker>`) alone, by origin; built once, shared by every publish.
    tags: HashMap<Arc<str>, Arc<PublishProperties>, ahash::RandomState>,
    /// The filters this broker's session is subscribed to, as this link last set them; `None`
    /// before this process first connected (a kept session is then taken to hold the filters
    /// the rules want now, as the process that subscribed had the same configuration).
    subscribed: Option<Vec<String>>,
    /// Messages this target is done with (acknowledged, rejected, or QoS 0 written): the stall
    /// check's measure of progress. Acknowledgements alone are not: a target that rejects
    /// everything, or takes only QoS 0, would look frozen and be moved to the spool.
    finished: u64,
    /// [`Link::finished`] when markers last went behind the copies parked for this target,
    /// and when (see [`Link::stall_tick`]).
    marked: (u64, Instant),
    /// Owner or publisher, decided from the control records (see [`crate::ha::role`]).
    role: Role,
    /// The link's timing rules.
    policy: Policy,
    /// Subscribe and forward the mesh's probes: `probe_interval` > 0, until the broker refuses
    /// the probe subscription (or drops two connections in a row before answering it).
    probes: bool,
    /// Connections in a row lost with the probe subscription unanswered.
    probe_drops: u32,
    /// This broker's park sessions, as its owner reads them (see [`crate::park`]).
    drains: Drains,
    /// The lane of park records for this broker (with parking).
    lane: Option<Arc<CopyLane>>,
    /// The message this broker closes the connection on, if any (see [`poison`]).
    poison: PoisonWatch,
    /// This process has had the mesh's consumer session on this broker (a later connection
    /// that finds it gone reports it: [`metrics::session_lost`]).
    had_session: bool,
    /// `drain_rate`: the pace of a backlog (see [`drain`]).
    drain_pace: Option<drain::DrainPace>,
}

/// Counters of a link's storm guard (see [`StormGuard`]): 1024 take ~70 KiB, and a loop that
/// is most of a link's traffic is found within a few copies of the threshold.
const STORM_TRACKED: usize = 1024;

/// Per-connection delivery state.
struct Conn {
    client: Client,
    /// QoS 1/2 publishes the client wrote (see [`Session::written`]).
    written: Arc<std::sync::atomic::AtomicU64>,
    connected: Option<Instant>,
    max_packet: Option<u32>,
    /// What the broker has not acknowledged yet (see [`outflight`]).
    flight: OutFlight<Outbound>,
    /// How much of it the path takes (see [`window`]).
    pace: window::Window,
    /// The broker's Receive Maximum was said to hold this connection back (see
    /// `events::pace`).
    starved_said: bool,
    /// More connections to publish on, opened when the broker's Receive Maximum holds a long
    /// path back (see [`spread`]).
    spread: Option<spread::Spread<Outbound>>,
    /// Taken from the queue, on its way to the client (kept to reuse its allocation).
    batch: Vec<Outbound>,
    /// [`Link::finished`] at the last stall check, and how many checks in a row saw no change.
    last_finished: u64,
    stalled_checks: u32,
    /// The next SUBACK answers the control subscription (queued before any other).
    control_suback: bool,
    /// SUBACKs owed for rule subscriptions (queued after the control one, before the probe one).
    rule_subacks: u32,
    /// The probe subscription's SUBACK is owed (queued last).
    probe_suback: bool,
    /// The broker ended this connection itself (see [`session::LinkEvent::PeerClosed`]).
    peer_closed: bool,
    /// The broker refused a rule subscription on this connection.
    rule_refused: bool,
}

impl Link {
    fn new(ctx: LinkContext) -> Self {
        let (acks_tx, acks_rx) = crate::message::ack_channel();
        let echo = EchoWindow::new(ctx.dedup_window, ctx.dedup_max_entries);
        let storm = StormGuard::new(ctx.storm_threshold, Duration::from_secs(10), STORM_TRACKED);
        let policy = Policy::default();
        let role = Role::new(
            ctx.ha.identity.clone(),
            &ctx.name,
            ctx.ha.enabled,
            ctx.parker.is_some(),
            policy.clone(),
        );
        Self {
            halt: Arc::new(Doorbell::new()),
            acks_tx,
            acks_rx,
            acks: InboundAcks::default(),
            now: Instant::now(),
            echo,
            peer_echo: EchoWindow::new(ctx.dedup_window, ctx.dedup_max_entries),
            storm,
            release_first: Vec::new(),
            pkid_high: None,
            tags: HashMap::default(),
            subscribed: None,
            finished: 0,
            marked: (0, Instant::now()),
            role,
            policy,
            probes: ctx.probes,
            probe_drops: 0,
            drains: Drains::default(),
            lane: ctx.parker.as_ref().map(|p| p.lane(&ctx.name)),
            poison: PoisonWatch::new(PoisonPolicy::default()),
            had_session: false,
            drain_pace: (ctx.settings.broker.drain_rate)
                .map(|rate| drain::DrainPace::new(rate, Instant::now())),
            ctx,
        }
    }

    async fn run(mut self) {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let stats = &self.ctx.stats;
        stats.parking.store(self.ctx.parker.is_some(), relaxed);
        stats.park_limit.store(self.ctx.ha.queue_limit, relaxed);
        if let (Some(ctx), Some(lane)) = (self.park_context(self.ctx.name.clone()), &self.lane) {
            tokio::spawn(park::io::publish_copies(park::io::CopyPublisher {
                park: ctx,
                client_id: topics::copies_id(
                    &self.ctx.settings.client_id,
                    &self.ctx.ha.identity.instance,
                ),
                lane: lane.clone(),
                stats: self.ctx.stats.clone(),
                consumption: self.ctx.consumption.subscribe(),
                stop: self.ctx.disconnect.clone(),
                trims: Default::default(),
            }));
        }
        // The connection's loop waits on one doorbell instead of polling both tokens at
        // every pass (see `crate::doorbell`).
        let _halt = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            self.halt
                .clone()
                .ring_on_cancel([self.ctx.stop.clone(), self.ctx.disconnect.clone()]),
        ));
        let mut backoff = Backoff::default();
        let mut reconnect = false;
        loop {
            if reconnect {
                inc(&self.ctx.stats.reconnects);
            }
            reconnect = true;
            self.ctx.stats.set_state(LinkState::Connecting);
            let who = self.connect_as();
            // Every id a previous connection may have used: up to the highest one this process
            // used, or (first connection) up to what any process may have.
            let used = self.pkid_high.unwrap_or(self.ctx.settings.inflight_max);
            let release =
                session::resume_order(&self.release_first, used.max(self.ctx.settings.inflight));
            let mut session = session::open_polled(&self.ctx.settings, &who, &release);
            let outcome = self.connection(&mut session).await;
            drop(session);
            let (error, uptime) = match outcome {
                Outcome::Shutdown => break,
                Outcome::Switch => {
                    reconnect = false;
                    continue;
                }
                Outcome::Lost { error, uptime, .. } => (error, uptime),
            };
            let delay = backoff.next_delay(uptime, rand::random::<f64>());
            // A target that is down is where copies pile up.
            self.park_depth_check();
            self.ctx.stats.set_state(LinkState::Backoff);
            metrics::link_error(&self.ctx.stats, &error, delay);
            if !self.back_off(delay).await {
                break;
            }
        }
        self.ctx.queue.set_connected(false);
        self.set_lane_open(false);
        self.ctx.stats.set_state(LinkState::Stopped);
        info!("link stopped");
    }

    /// Waits `delay` before the next connection; false when the link is to end instead.
    async fn back_off(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.ctx.disconnect.cancelled() => false,
            _ = self.ctx.stop.cancelled(), if !self.ctx.stop.is_cancelled() => {
                // Stopping while down: nothing can be delivered; report drained.
                let _ = self.ctx.drained.send(true);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => true,
                    _ = self.ctx.disconnect.cancelled() => false,
                }
            }
        }
    }

    /// The identity of the next connection: the mesh's consumer session, or this instance's
    /// own clean one; both with a retained Will saying this instance is gone.
    fn connect_as(&self) -> ConnectAs {
        let ha = &self.ctx.ha;
        let id = &ha.identity;
        let topic = ha.control.instance_topic(&id.instance);
        let gone = serde_json::to_vec(&id.record(false)).unwrap_or_default();
        let will = (topic.clone(), ha.seal(&topic, gone), ha.will_delay);
        let consumer = self.role.consumer();
        ConnectAs {
            client_id: if consumer {
                self.ctx.settings.client_id.clone()
            } else {
                topics::publisher_id(&self.ctx.settings.client_id, &id.instance)
            },
            clean: !consumer,
            will: self.role.coordinates().then_some(will),
        }
    }

    /// One connection, from dialling to its end: a short loop over the steps below.
    async fn connection(&mut self, session: &mut Session) -> Outcome {
        let mut conn = self.new_conn(session);
        self.role.connecting();
        self.report();
        let mut checks = checks::Checks::new(&self.policy, self.role.coordinates());
        let mut recheck = recheck();
        let outcome = loop {
            if self.housekeeping(&mut conn) {
                break self.leave(&mut conn, session).await;
            }
            let room = self.has_room(&conn);
            if room && self.fill_window(&mut conn) {
                continue;
            }
            // While the copies this broker's messages made wait for it, or a target's queue is
            // over its capacity (see `Link::intake_held`), take no more from it.
            let paused = self.copies_backlog() || self.intake_held();
            // What this pass queued goes to the connection; it is written while the loop waits.
            session.pump();
            let unflushed = session.unflushed();
            tokio::select! {
                biased;
                // Stopping or disconnecting. A stop only wakes the loop: `housekeeping` acts on it.
                _ = self.halt.rung() => {
                    if self.ctx.disconnect.is_cancelled() {
                        break self.close(&mut conn, session).await;
                    }
                }
                progress = session.progress(!paused), if !paused || unflushed => {
                    if let Progress::Event(event) = progress
                        && let Some(lost) = self.on_events(&mut conn, event, session)
                    {
                        break lost;
                    }
                }
                // Every completion the targets reported meanwhile: one wake for all.
                _ = self.acks_rx.rung() => self.take_completions(),
                Some((lane, event)) = lane_event(&mut conn.spread), if conn.spread.is_some() => {
                    self.on_lane_event(&mut conn, lane, event);
                }
                _ = recheck.tick(), if self.role.switching() || paused || self.paced() => {}
                _ = self.ctx.queue.notified(), if room => {}
                fired = checks.next() => {
                    session.keep_alive(!paused);
                    if fired.stall {
                        self.stall_tick(&mut conn);
                    }
                    if fired.ha && self.role.coordinates() {
                        self.ha_tick(&mut conn);
                    }
                    if fired.spool {
                        self.spool_tick(&conn);
                    }
                }
                // A takeover waits for its park sessions: go on as soon as they are read.
                _ = self.drains.first_read(), if self.drains.waiting() => self.on_parks_read(Some(&mut conn)),
            }
        };
        // Whatever the records said, this process sees nothing of the broker now.
        let end = match &outcome {
            Outcome::Switch => End::Switched,
            Outcome::Shutdown => End::Shutdown,
            Outcome::Lost {
                uptime,
                peer_closed,
                ..
            } => End::Lost {
                had_connack: uptime.is_some(),
                peer_closed: *peer_closed,
            },
        };
        let actions = self.role.ended(end, Now::read());
        self.carry_out(None, actions);
        self.end_of_connection(conn, outcome).await
    }

    /// The delivery state of a new connection of `session`.
    fn new_conn(&self, session: &Session) -> Conn {
        Conn {
            client: session.client.clone(),
            written: session.written.clone(),
            connected: None,
            max_packet: None,
            flight: OutFlight::default(),
            pace: window::Window::new(
                usize::from(self.ctx.settings.inflight),
                usize::from(self.ctx.settings.inflight_max),
            ),
            starved_said: false,
            spread: None,
            batch: Vec::new(),
            last_finished: self.finished,
            stalled_checks: 0,
            control_suback: false,
            rule_subacks: 0,
            probe_suback: false,
            peer_closed: false,
            rule_refused: false,
        }
    }

    /// Before each wait: report drained while stopping, hand due acknowledgements to the
    /// client, let a full spool take what waits for room, and evacuate a queue that overflowed.
    /// True when a connection changing role may end now.
    fn housekeeping(&mut self, conn: &mut Conn) -> bool {
        if self.ctx.stop.is_cancelled() {
            self.role.stop();
            let idle = conn.outstanding() == 0 && self.ctx.queue.is_empty();
            let _ = self.ctx.drained.send(idle || conn.connected.is_none());
        }
        if conn.connected.is_some() {
            self.flush_acks(&conn.client);
        }
        self.ctx.queue.unblock();
        let connected = conn.connected.is_some();
        if connected && self.role.consumer() && self.ctx.queue.take_rules_changed() {
            self.apply_rule_change(conn);
        }
        if connected && self.ctx.queue.evacuate_requested() {
            self.evacuate(conn, "its queue is full");
        }
        self.switch_ready(conn)
    }

    /// The connection ended: whatever was not acknowledged goes back, in its original order,
    /// to the front of the spool (or, without one, of the memory queue), and is on disk before
    /// the next connection reads the spool from its start.
    async fn end_of_connection(&mut self, mut conn: Conn, outcome: Outcome) -> Outcome {
        let lost = matches!(outcome, Outcome::Lost { .. });
        if conn.probe_suback && lost {
            self.probe_drops += 1;
            if self.probe_drops >= self.policy.probe_drops {
                self.probes = false;
                warn!(
                    filter = %self.ctx.ha.control.probe_filter(),
                    "the broker closed {} connections in a row before answering the probe \
                     subscription (it refuses `$` topics?): probes through this broker are off; \
                     set [bridge] probe_interval = \"0s\" on such brokers",
                    self.probe_drops
                );
            }
        }
        if conn.connected.is_some() && lost {
            let count = conn.written.load(std::sync::atomic::Ordering::Relaxed);
            let written: Vec<u64> = conn
                .flight
                .written(count)
                .into_iter()
                .map(deliver::poison_id)
                .collect();
            self.poison.lost(&written);
        }
        let (mut unconfirmed, release_first) = conn.flight.drain();
        if let Some(mut spread) = conn.spread.take() {
            // The lanes carry other topics' QoS 1 messages than the link's own connection
            // does: each list keeps its order.
            unconfirmed.extend(spread.take_all());
        }
        if conn.connected.is_some() {
            // (A connection that never got its CONNACK knows nothing newer.)
            self.release_first = release_first;
        }
        if !unconfirmed.is_empty() {
            let relaxed = std::sync::atomic::Ordering::Relaxed;
            let n = unconfirmed.len();
            self.ctx.stats.redelivered.fetch_add(n as u64, relaxed);
            debug!(count = n, "unacknowledged messages requeued");
        }
        match outcome {
            // Back in a moment in the other role: the queue stays in memory. The next
            // connection reads the spool from its first row again, so what was read from it
            // is left to that read (see `TargetQueue::switched`), and the deletions of what
            // this one delivered from it must be on disk first, as after a lost connection: a
            // row read back before its deletion is committed goes out twice. (A link back from
            // an outage drains on its publisher connection until it takes the owner's role
            // back; one `meshbench --outage` run counted 99 duplicates, about a window.)
            Outcome::Switch => {
                self.ctx.queue.switched(unconfirmed);
                self.ctx.queue.sync().await;
            }
            Outcome::Shutdown | Outcome::Lost { .. } => {
                let restarting = self
                    .ctx
                    .restarting
                    .load(std::sync::atomic::Ordering::Acquire);
                let shutdown = matches!(outcome, Outcome::Shutdown) && !restarting;
                self.ctx.queue.disconnected(unconfirmed, shutdown);
                self.set_lane_open(false);
                self.ctx.queue.sync().await;
            }
        }
        self.update_gauges(&conn);
        outcome
    }

    /// A target's queue is over its capacity and holds its origins (see
    /// [`crate::router::Router::holds`]), and this broker may be held: it has sent more than
    /// the Receive Maximum this link announced unacknowledged, so it keeps to no window and
    /// queues nothing it cannot send (mosquitto 2.0.11): reading it later loses nothing. Not
    /// while this link's own queue holds: it reads its broker's acknowledgements on the same
    /// connection, and two links holding each other would wait for each other.
    fn intake_held(&self) -> bool {
        self.ctx.router.holds()
            && self.ctx.settings.broker.protocol == Protocol::V5
            && self.acks.unacknowledged() > usize::from(self.ctx.settings.inflight_max)
            && !self.ctx.queue.holding()
    }

    /// The copies this broker's messages made wait for it beyond its lane's capacity: take no
    /// more from it until they are acknowledged.
    fn copies_backlog(&self) -> bool {
        self.lane.as_ref().is_some_and(|l| l.full())
    }

    /// Opens (connected) or closes this broker's copy lane.
    fn set_lane_open(&self, open: bool) {
        if let Some(lane) = &self.lane {
            lane.set_open(open);
        }
    }

    /// Ends the connection at shutdown: acknowledges what it can; as a planned handover, the
    /// consumer releases the broker (a peer may take the session at once).
    async fn close(&mut self, conn: &mut Conn, session: &mut Session) -> Outcome {
        self.take_completions();
        self.flush_acks(&conn.client);
        let actions = self.role.closing(Now::read());
        self.carry_out(Some(conn), actions);
        let _ = conn.client.disconnect();
        session.wait_closed().await;
        info!("disconnected");
        Outcome::Shutdown
    }

    /// A connection changing role leaves once nothing is in flight either way (or after
    /// [`Policy::switch_timeout`]): what it received is acknowledged, what it sent is
    /// acknowledged.
    fn switch_ready(&self, conn: &Conn) -> bool {
        if !self.role.switching() {
            return false;
        }
        let idle = conn.outstanding() == 0 && self.acks.unacknowledged() == 0;
        let ready = self.role.switch_ready(idle, Now::read());
        if ready && !idle && conn.connected.is_some() {
            warn!(
                in_flight = conn.outstanding(),
                unacknowledged = self.acks.unacknowledged(),
                "changing role with messages still in flight"
            );
        }
        ready
    }

    /// Ends a connection that changes role: acknowledges, releases when handing over, and
    /// disconnects cleanly (no Will).
    async fn leave(&mut self, conn: &mut Conn, session: &mut Session) -> Outcome {
        self.take_completions();
        self.flush_acks(&conn.client);
        let actions = self.role.leaving(Now::read());
        self.carry_out(Some(conn), actions);
        let _ = conn.client.disconnect();
        session.wait_closed().await;
        Outcome::Switch
    }
}

/// The 20 ms recheck while a role switch, the copies' backlog or a paced backlog waits, made once per
/// connection: a `sleep` in the `select!` would be built (and read the clock) at every pass,
/// enabled or not.
fn recheck() -> tokio::time::Interval {
    let mut recheck = tokio::time::interval(Duration::from_millis(20));
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    recheck
}

impl Conn {
    /// Messages in flight on the connection and its lanes.
    fn outstanding(&self) -> usize {
        self.flight.outstanding() + self.spread.as_ref().map_or(0, |s| s.outstanding())
    }
}

/// The next report of a lane (never, without lanes).
async fn lane_event(
    spread: &mut Option<spread::Spread<Outbound>>,
) -> Option<(usize, spread::LaneEvent)> {
    match spread {
        Some(s) => s.events.recv().await,
        None => std::future::pending().await,
    }
}

fn uptime(conn: &Conn) -> Option<Duration> {
    conn.connected.map(|t| t.elapsed())
}
