//! One task per broker: connect with backoff, subscribe, receive and hand messages to the
//! router, publish what the router queued for this broker, track acknowledgements.
//!
//! Life of a link: `Connecting` → `Connected` → (connection lost) → `Backoff` → `Connecting` …
//! until shutdown, which has two steps driven by the supervisor: `stop` (take no new messages
//! from the broker, keep delivering what is queued) and `disconnect` (send the remaining
//! acknowledgements, DISCONNECT, exit).
//!
//! The MQTT bookkeeping is pure state beside the task: [`acks`] holds what the link owes its
//! broker (acknowledgements in order of receipt, per broker session), [`outflight`] what one
//! connection has sent and not seen acknowledged. The task only moves bytes and calls them.
//! When a connection is lost, everything not yet acknowledged goes back to the front of the
//! queue, in order, and is published again on the next connection (counted as redelivered: the
//! broker may have it twice).

mod acks;
pub(crate) mod backoff;
mod outflight;
pub(crate) mod park;
mod poison;
pub mod session;
pub(crate) mod threads;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::dedup::{EchoWindow, StormGuard, StormVerdict, fingerprint};
use crate::ha::{self, Consumption, Decision, Identity, InstanceRecord, OwnerRecord};
use crate::message::Protocol;
use crate::message::{AckRequest, Message};
use crate::metrics::{self, LinkState, LinkStats, inc};
use crate::router::{Outbound, Router, TargetQueue};
use crate::seal::ControlKind;
use crate::topics::{self, Control, ControlTopic};
use acks::InboundAcks;
use backoff::Backoff;
use outflight::{OutFlight, Sent};
use poison::{PoisonPolicy, PoisonWatch};
use session::{Client, ConnectAs, LinkEvent, SendError, Session, SessionSettings};

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

/// How long a connection that changes role (owner ↔ publisher) waits for what it has in flight
/// before it goes anyway.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub(crate) parker: Option<Arc<crate::router::park::Parker>>,
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
        /// The broker ended the connection itself (see [`LinkEvent::PeerClosed`]).
        peer_closed: bool,
    },
    Shutdown,
    /// The connection ended to come back in the other role (see [`crate::ha`]).
    Switch,
}

/// A connection changing role: it takes nothing new, finishes what it has, and reconnects.
#[derive(Debug, Clone, Copy)]
struct Switch {
    /// Since when.
    since: Instant,
    /// Write a released owner record before leaving (a handover).
    release: bool,
}

struct Link {
    ctx: LinkContext,
    acks_tx: mpsc::UnboundedSender<AckRequest>,
    acks_rx: mpsc::UnboundedReceiver<AckRequest>,
    /// What this link owes its broker for what the broker sent (see [`acks`]).
    acks: InboundAcks,
    echo: EchoWindow,
    /// 3.1.1: what other instances announced they publish here (see [`Control::echo_topic`]),
    /// by [`ha::portable_fingerprint`].
    peer_echo: EchoWindow,
    storm: StormGuard,
    /// Packet ids the last connection left unacknowledged, in the order it sent them: the next
    /// connection releases them in that order (see `session::open`).
    release_first: Vec<u16>,
    /// Origin tags (`<bridge id>/<origin broker>`) by origin, built once instead of per publish.
    tags: HashMap<Arc<str>, String, ahash::RandomState>,
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
    /// The next connection consumes the broker (the mesh's session, the rules' subscriptions);
    /// otherwise it only publishes. Decided from the control records (see [`crate::ha`]).
    consumer: bool,
    /// What the broker shows of the instances and of its owner, this connection.
    view: ha::View,
    /// When this link last wrote an owner record naming this instance.
    claimed: Option<Instant>,
    /// The connection is changing role.
    switch: Option<Switch>,
    /// When the broker closed this link's consuming connection itself; cleared once the next
    /// connection read the records (see [`Link::check_takeover`]) or could not connect.
    closed_as_owner: Option<Instant>,
    /// When the instance record was last written.
    announced: Option<Instant>,
    /// This link coordinates through control records: off when `[bridge] ha` is, or when the
    /// broker ended two connections in a row before they read their own record back (a broker
    /// that refuses `$` topics by disconnecting, as rumqttd does).
    coordinate: bool,
    /// Connections in a row that ended before reading their own record back.
    unsynced_ends: u32,
    /// Subscribe and forward the mesh's probes: `probe_interval` > 0, until the broker refuses
    /// the probe subscription (or drops two connections in a row before answering it).
    probes: bool,
    /// Connections in a row lost with the probe subscription unanswered.
    probe_drops: u32,
    /// This broker's park sessions (see [`park`]).
    parks: Parks,
    /// The message this broker closes the connection on, if any (see [`poison`]).
    poison: PoisonWatch,
    /// This process has had the mesh's consumer session on this broker (a later connection
    /// that finds it gone reports it: [`metrics::session_lost`]).
    had_session: bool,
    /// The newest sealing time of an owner record accepted on this broker (see
    /// [`Link::on_control`]): kept across connections.
    owner_sealed: u64,
}

/// The park sessions of this (origin) broker, as its owner drains them.
#[derive(Debug, Default)]
struct Parks {
    /// Targets whose park session was drained since this process took the broker.
    ready: std::collections::HashSet<Arc<str>>,
    /// Drains that must read everything before the broker is consumed.
    pending: Vec<tokio::sync::oneshot::Receiver<()>>,
    /// When those started.
    started: Option<Instant>,
}

/// Counters of a link's storm guard (see [`StormGuard`]): 1024 take ~70 KiB, and a loop that
/// is most of a link's traffic is found within a few copies of the threshold.
const STORM_TRACKED: usize = 1024;

/// How long a takeover waits for its park sessions to be read before it consumes anyway.
const PARK_WAIT: Duration = Duration::from_secs(15);

/// How often a coordinating link decides again without a record arriving (records go stale,
/// claims settle): a contested claim is acted on within this of [`ha::CLAIM_SETTLE`].
const HA_CHECK: Duration = Duration::from_millis(100);

impl Parks {
    /// Forgets the drains that have read everything (or ended).
    fn prune(&mut self) {
        self.pending.retain_mut(|rx| {
            matches!(
                rx.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            )
        });
    }
}

/// Waits until the first of `pending` has read everything (or ended).
async fn first_read(pending: &mut [tokio::sync::oneshot::Receiver<()>]) {
    if let Some(rx) = pending.first_mut() {
        let _ = rx.await;
    }
}

/// Per-connection delivery state.
struct Conn {
    client: Client,
    connected: Option<Instant>,
    max_packet: Option<u32>,
    /// What the broker has not acknowledged yet (see [`outflight`]).
    flight: OutFlight<Outbound>,
    /// Taken from the queue, on its way to the client (kept to reuse its allocation).
    batch: Vec<Outbound>,
    /// [`Link::finished`] at the last stall check, and how many checks in a row saw no change.
    last_finished: u64,
    stalled_checks: u32,
    /// This connection consumes the broker.
    consumer: bool,
    /// The next SUBACK answers the control subscription (queued before any other).
    control_suback: bool,
    /// SUBACKs owed for rule subscriptions (queued after the control one, before the probe one).
    rule_subacks: u32,
    /// The probe subscription's SUBACK is owed (queued last).
    probe_suback: bool,
    /// The broker ended this connection itself (see [`LinkEvent::PeerClosed`]).
    peer_closed: bool,
    /// The broker refused a rule subscription on this connection.
    rule_refused: bool,
    /// Since when (ms since the Unix epoch) this consuming connection has every subscription
    /// the rules want in place.
    subscribed: Option<u64>,
}

impl Link {
    fn new(ctx: LinkContext) -> Self {
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        let echo = EchoWindow::new(ctx.dedup_window, ctx.dedup_max_entries);
        let storm = StormGuard::new(ctx.storm_threshold, Duration::from_secs(10), STORM_TRACKED);
        let coordinate = ctx.ha.enabled;
        Self {
            acks_tx,
            acks_rx,
            acks: InboundAcks::default(),
            echo,
            peer_echo: EchoWindow::new(ctx.dedup_window, ctx.dedup_max_entries),
            storm,
            release_first: Vec::new(),
            tags: HashMap::default(),
            subscribed: None,
            finished: 0,
            marked: (0, Instant::now()),
            consumer: !coordinate,
            view: ha::View::default(),
            claimed: None,
            switch: None,
            closed_as_owner: None,
            announced: None,
            coordinate,
            unsynced_ends: 0,
            probes: ctx.probes,
            probe_drops: 0,
            parks: Parks::default(),
            poison: PoisonWatch::new(PoisonPolicy::default()),
            owner_sealed: 0,
            had_session: false,
            ctx,
        }
    }

    async fn run(mut self) {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        self.ctx
            .stats
            .parking
            .store(self.ctx.parker.is_some(), relaxed);
        self.ctx
            .stats
            .park_limit
            .store(self.ctx.ha.queue_limit, relaxed);
        if let Some(ctx) = self.park_context(self.ctx.name.clone()) {
            tokio::spawn(park::publish_copies(park::CopyPublisher {
                park: ctx,
                client_id: topics::copies_id(
                    &self.ctx.settings.client_id,
                    &self.ctx.ha.identity.instance,
                ),
                queue: self.ctx.queue.clone(),
                stats: self.ctx.stats.clone(),
                consumption: self.ctx.consumption.subscribe(),
                stop: self.ctx.disconnect.clone(),
            }));
        }
        let mut backoff = Backoff::default();
        let mut reconnect = false;
        loop {
            if reconnect {
                inc(&self.ctx.stats.reconnects);
            }
            reconnect = true;
            self.ctx.stats.set_state(LinkState::Connecting);
            let who = self.connect_as();
            let mut session = session::open(&self.ctx.settings, &who, &self.release_first);
            let outcome = self.connection(&mut session).await;
            drop(session);
            match outcome {
                Outcome::Shutdown => break,
                Outcome::Switch => {
                    // Another session: its packet ids are not the last connection's.
                    self.release_first.clear();
                    self.consumer = !self.consumer;
                    if !self.consumer {
                        // The next takeover reads the park sessions again.
                        self.parks = Parks::default();
                    }
                    if self.consumer {
                        // A session another process may have subscribed (same configuration).
                        self.subscribed = None;
                    }
                    reconnect = false;
                }
                Outcome::Lost {
                    error,
                    uptime,
                    peer_closed,
                } => {
                    // Read the owner record before consuming again: another instance may have
                    // taken the session over (mosquitto just closes the connection then).
                    if self.coordinate {
                        self.note_unsynced_end(uptime.is_some());
                    }
                    // The broker closed the consuming connection: who took the session over
                    // is read from the records on the next connection. One that cannot connect
                    // says the broker went away instead (a restart).
                    self.closed_as_owner =
                        (self.consumer && self.coordinate && peer_closed && uptime.is_some())
                            .then(Instant::now);
                    if self.consumer && self.coordinate {
                        self.consumer = false;
                        self.release_first.clear();
                        self.parks = Parks::default();
                    }
                    let delay = backoff.next_delay(uptime, rand::random::<f64>());
                    // A target that is down is where copies pile up.
                    self.park_depth_check();
                    self.ctx.stats.set_state(LinkState::Backoff);
                    metrics::link_error(&self.ctx.stats, &error, delay);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.ctx.disconnect.cancelled() => break,
                        _ = self.ctx.stop.cancelled(), if !self.ctx.stop.is_cancelled() => {
                            // Stopping while down: nothing can be delivered; report drained.
                            let _ = self.ctx.drained.send(true);
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = self.ctx.disconnect.cancelled() => break,
                            }
                        }
                    }
                }
            }
        }
        self.ctx.queue.set_connected(false);
        self.ctx.stats.set_state(LinkState::Stopped);
        self.ctx.stats.set_ha(|h| h.consuming = false);
        info!("link stopped");
    }

    /// The identity of the next connection: the mesh's consumer session, or this instance's
    /// own clean one; both with a retained Will saying this instance is gone.
    fn connect_as(&self) -> ConnectAs {
        let ha = &self.ctx.ha;
        let id = &ha.identity;
        let topic = ha.control.instance_topic(&id.instance);
        let will = (
            topic.clone(),
            ha.seal(&topic, record_bytes(&id.record(false))),
            ha.will_delay,
        );
        ConnectAs {
            client_id: if self.consumer {
                self.ctx.settings.client_id.clone()
            } else {
                topics::publisher_id(&self.ctx.settings.client_id, &id.instance)
            },
            clean: !self.consumer,
            will: self.coordinate.then_some(will),
        }
    }

    /// One connection, from dialling to its end: a short loop over the steps below.
    async fn connection(&mut self, session: &mut Session) -> Outcome {
        let mut conn = Conn {
            client: session.client.clone(),
            connected: None,
            max_packet: None,
            flight: OutFlight::default(),
            batch: Vec::new(),
            last_finished: self.finished,
            stalled_checks: 0,
            consumer: self.consumer,
            control_suback: false,
            rule_subacks: 0,
            probe_suback: false,
            peer_closed: false,
            rule_refused: false,
            subscribed: None,
        };
        self.view = ha::View::default();
        self.switch = None;
        self.announced = None;
        self.ctx.stats.set_ha(|h| {
            h.consuming = false;
            h.owner = None;
        });
        let mut spool_check = tokio::time::interval(Duration::from_secs(5));
        self.note_consumer(&conn);
        let mut stall_check = tokio::time::interval(Duration::from_secs(1));
        let mut ha_check = tokio::time::interval(HA_CHECK);
        let outcome = loop {
            if self.housekeeping(&mut conn) {
                break self.leave(&mut conn, session).await;
            }
            let room = self.has_room(&conn);
            if room && self.fill_window(&mut conn) {
                continue;
            }
            tokio::select! {
                biased;
                _ = self.ctx.disconnect.cancelled() => {
                    break self.close(&mut conn, session).await;
                }
                // While the copies this broker's messages made wait for it, take no more.
                event = session.events.recv(), if !self.ctx.queue.park_backlog_full() => match event {
                    None => break Outcome::Lost { error: "connection task ended".into(), uptime: uptime(&conn), peer_closed: false },
                    Some(LinkEvent::Closed(error)) => break Outcome::Lost { error, uptime: uptime(&conn), peer_closed: conn.peer_closed },
                    Some(event) => self.on_event(&mut conn, event),
                },
                Some(ack) = self.acks_rx.recv() => self.complete(ack),
                _ = tokio::time::sleep(Duration::from_millis(20)),
                    if self.switch.is_some() || self.ctx.queue.park_backlog_full() => {}
                _ = self.ctx.queue.notified(), if room => {}
                _ = self.ctx.stop.cancelled(), if !self.ctx.stop.is_cancelled() => {}
                _ = stall_check.tick() => self.stall_tick(&mut conn),
                _ = ha_check.tick(), if self.coordinate => self.ha_tick(&mut conn),
                // A takeover waits for its park sessions: go on as soon as they are read.
                _ = first_read(&mut self.parks.pending), if !self.parks.pending.is_empty() => {
                    self.parks.prune();
                    self.reconsider(&mut conn);
                }
                _ = spool_check.tick() => self.spool_tick(&conn),
            }
        };
        // Whatever the records said, this process sees nothing of the broker now.
        self.report_consumer(None);
        self.end_of_connection(conn, outcome).await
    }

    /// Before each wait: report drained while stopping, hand due acknowledgements to the
    /// client, let a full spool take what waits for room, and evacuate a queue that overflowed.
    fn housekeeping(&mut self, conn: &mut Conn) -> bool {
        if self.ctx.stop.is_cancelled() {
            let idle = conn.flight.outstanding() == 0 && self.ctx.queue.is_empty();
            let _ = self.ctx.drained.send(idle || conn.connected.is_none());
        }
        if conn.connected.is_some() {
            self.flush_acks(&conn.client);
        }
        self.ctx.queue.unblock();
        if conn.connected.is_some() && conn.consumer && self.ctx.queue.take_rules_changed() {
            self.apply_rule_change(conn);
        }
        if conn.connected.is_some() && self.ctx.queue.evacuate_requested() {
            self.evacuate(conn, "its queue is full");
        }
        self.switch_ready(conn)
    }

    /// The rules changed (a reload): subscribe what they want now and unsubscribe what they no
    /// longer want. What is queued or in flight is unaffected: a queued message is mapped by
    /// the rules in force when it is published.
    fn apply_rule_change(&mut self, conn: &Conn) {
        let wanted = self.ctx.queue.rules().subscriptions();
        let have = self.subscribed.clone().unwrap_or_default();
        let (added, removed) = (missing(&wanted, &have), missing(&have, &wanted));
        info!(?added, ?removed, "topic rules changed");
        change_subscriptions(&conn.client, &added, &removed);
        self.subscribed = Some(wanted);
    }

    /// Connected, with room in the in-flight window, not changing role.
    fn has_room(&self, conn: &Conn) -> bool {
        conn.connected.is_some()
            && self.switch.is_none()
            && conn.flight.outstanding() < self.window()
    }

    /// The in-flight window: `inflight`, or 1 while finding a message the broker refuses (see
    /// [`poison`]).
    fn window(&self) -> usize {
        self.poison.window(usize::from(self.ctx.settings.inflight))
    }

    /// Publishes from the queue up to the in-flight window. True when it published and the
    /// client took everything (fill again before waiting); false when there was nothing, or
    /// the client refused: the rest went back, in order, to be retried after the next event
    /// (retrying at once would spin without ever reading that event).
    fn fill_window(&mut self, conn: &mut Conn) -> bool {
        let free = self.window().saturating_sub(conn.flight.outstanding());
        let mut batch = std::mem::take(&mut conn.batch);
        self.ctx.queue.take(free, &mut batch);
        let had = !batch.is_empty();
        let mut items = batch.drain(..);
        while let Some(item) = items.next() {
            if let Err(item) = self.publish(conn, item) {
                let rest: Vec<Outbound> = std::iter::once(item).chain(items).collect();
                self.ctx.queue.requeue_front(rest);
                conn.batch = batch;
                return false;
            }
        }
        drop(items);
        conn.batch = batch;
        if had {
            self.update_gauges(conn);
        }
        had
    }

    /// Every second: a target that finishes nothing for two checks in a row while messages
    /// wait on it (frozen process, stalled network) stops holding the origins. And every 2 s
    /// while it makes progress, markers behind the copies parked for it let the origins'
    /// owners discard those it has now (see [`crate::router::TargetQueue::mark_copies`]): a
    /// target whose connections last a few seconds (restarts, takeovers) still gets its copies
    /// trimmed.
    fn stall_tick(&mut self, conn: &mut Conn) {
        if conn.connected.is_some()
            && self.finished != self.marked.0
            && self.marked.1.elapsed() >= Duration::from_secs(2)
        {
            self.ctx.queue.mark_copies(true);
            self.marked = (self.finished, Instant::now());
        }
        if conn.connected.is_some()
            && conn.flight.outstanding() > 0
            && self.finished == conn.last_finished
        {
            conn.stalled_checks += 1;
            // Again on every check while it stays stalled: what arrived since (while its
            // spool was still empty) must not hold its origins either.
            if conn.stalled_checks >= 2 {
                self.evacuate(conn, "it acknowledged nothing for 2 s");
            }
        } else {
            conn.stalled_checks = 0;
        }
        conn.last_finished = self.finished;
    }

    /// Every 5 s, a safety net: a connected link holding nothing while its spool has rows
    /// behind its read position that no pending deletion accounts for has lost its place. Never
    /// expected; rewinding is safe because the link holds nothing read from the spool. Also
    /// logs the link's state at debug level.
    fn spool_tick(&self, conn: &Conn) {
        let idle =
            conn.connected.is_some() && conn.flight.outstanding() == 0 && self.ctx.queue.is_empty();
        if conn.connected.is_some() {
            // Once the spool is empty (deletions may still have been on their way at the last
            // delivery's markers).
            self.ctx.queue.mark_copies(false);
        }
        self.park_depth_check();
        if idle && let Some(first_row) = self.ctx.queue.orphaned_row() {
            warn!(
                first_row,
                rows = self.ctx.queue.spool_readable(),
                "spool rows behind the read position; reading the spool again"
            );
            self.ctx.queue.rewind();
        }
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let stats = &self.ctx.stats;
        debug!(
            queued = self.ctx.queue.len(),
            awaiting_sent = conn.flight.awaiting_sent(),
            inflight = conn.flight.inflight(),
            unacked_in = self.acks.unacknowledged(),
            acks_due = self.acks.due(),
            echo_window = self.echo.len(),
            messages_in = n(&stats.messages_in),
            messages_out = n(&stats.messages_out),
            forwarded = n(&stats.forwarded),
            dropped_echo = n(&stats.dropped_echo),
            "link state"
        );
    }

    /// The connection ended: whatever was not acknowledged goes back, in its original order,
    /// to the front of the spool (or, without one, of the memory queue), and is on disk before
    /// the next connection reads the spool from its start.
    async fn end_of_connection(&mut self, mut conn: Conn, outcome: Outcome) -> Outcome {
        if conn.probe_suback && matches!(outcome, Outcome::Lost { .. }) {
            self.probe_drops += 1;
            if self.probe_drops >= 2 {
                self.probes = false;
                warn!(
                    filter = %self.ctx.ha.control.probe_filter(),
                    "the broker closed two connections in a row before answering the probe \
                     subscription (it refuses `$` topics?): probes through this broker are off; \
                     set [bridge] probe_interval = \"0s\" on such brokers"
                );
            }
        }
        if conn.connected.is_some() && matches!(outcome, Outcome::Lost { .. }) {
            let written: Vec<u64> = conn.flight.written().into_iter().map(poison_id).collect();
            self.poison.lost(&written);
        }
        let (unconfirmed, release_first) = conn.flight.drain();
        if conn.connected.is_some() {
            // (A connection that never got its CONNACK knows nothing newer.)
            self.release_first = release_first;
        }
        if !unconfirmed.is_empty() {
            self.ctx.stats.redelivered.fetch_add(
                unconfirmed.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            debug!(
                count = unconfirmed.len(),
                "unacknowledged messages requeued"
            );
        }
        match outcome {
            // Back in a moment in the other role: the queue stays in memory.
            Outcome::Switch => self.ctx.queue.requeue_front(unconfirmed),
            Outcome::Shutdown | Outcome::Lost { .. } => {
                let shutdown = matches!(outcome, Outcome::Shutdown)
                    && !self
                        .ctx
                        .restarting
                        .load(std::sync::atomic::Ordering::Acquire);
                self.ctx.queue.disconnected(unconfirmed, shutdown);
                self.ctx.queue.sync().await;
            }
        }
        self.update_gauges(&conn);
        outcome
    }

    fn on_event(&mut self, conn: &mut Conn, event: LinkEvent) {
        match event {
            LinkEvent::Connected {
                session_present,
                max_packet_size,
            } => {
                if !session_present {
                    // The broker has no memory of us: packet ids of the old session mean nothing.
                    self.acks.new_session();
                }
                if conn.consumer {
                    if !session_present
                        && self.had_session
                        && !self.ctx.settings.session_expiry.is_zero()
                    {
                        metrics::session_lost(&self.ctx.stats);
                    }
                    self.had_session = true;
                }
                conn.connected = Some(Instant::now());
                conn.max_packet = max_packet_size;
                let role = if conn.consumer { "owner" } else { "publisher" };
                info!(session_present, role, "connected");
                if self.coordinate {
                    match conn
                        .client
                        .subscribe_records(&self.ctx.ha.control.filters(), 0)
                    {
                        Ok(()) => conn.control_suback = true,
                        Err(e) => warn!(error = %e, "control subscription could not be queued"),
                    }
                    self.announce(conn, true);
                }
                if conn.consumer {
                    self.subscribe_rules(conn, session_present);
                    let alone = (!self.coordinate).then(|| self.ctx.ha.identity.instance.clone());
                    self.ctx.stats.set_ha(|h| {
                        h.consuming = true;
                        if let Some(me) = alone {
                            h.owner = Some(me);
                            h.instances = 1;
                        }
                    });
                }
                self.ctx.queue.set_connected(true);
                self.ctx.stats.clear_error();
                self.ctx.stats.set_state(LinkState::Connected);
            }
            LinkEvent::Publish { msg, ack } if self.ctx.ha.control.is_probe(&msg.topic) => {
                self.on_probe(msg, ack)
            }
            LinkEvent::Publish { msg, ack } if self.ctx.ha.control.is_control(&msg.topic) => {
                if let Some(a) = ack.and_then(|a| self.acks.receive(a)) {
                    // Subscribed at QoS 0; a broker that upgraded it is acknowledged in turn.
                    self.complete(a);
                }
                self.on_control(conn, &msg);
            }
            LinkEvent::Publish { msg, ack } => self.on_publish(msg, ack),
            LinkEvent::Sent(pkid) => match conn.flight.sent(pkid) {
                Sent::Done(item) => {
                    // QoS 0: written, never acknowledged; not counted as delivered.
                    self.finish(item);
                    inc(&self.ctx.stats.sent_qos0);
                }
                Sent::InFlight => {}
                Sent::Evicted { old, seqs } => {
                    // Never expected. The evicted message would hold its origin's
                    // acknowledgement forever: send it again (a duplicate at worst).
                    warn!(
                        pkid,
                        old_seq = seqs.0,
                        new_seq = seqs.1,
                        "packet id reused before the broker acknowledged it; message sent again"
                    );
                    self.ctx.queue.requeue_front(vec![old]);
                }
                Sent::Control => {}
                Sent::Unexpected => {
                    warn!(pkid, "publish reported sent with no message waiting for it");
                }
            },
            LinkEvent::PubAck(pkid, result) | LinkEvent::PubRec(pkid, result @ Err(_)) => {
                match conn.flight.acknowledged(pkid) {
                    Some(item) => self.acknowledged(item, result),
                    None => debug!(pkid, "acknowledgement for a packet id not in flight"),
                }
            }
            LinkEvent::PubRec(pkid, Ok(())) => {
                if let Some((old_seq, old)) = conn.flight.received(pkid) {
                    warn!(
                        pkid,
                        old_seq,
                        "packet id reused before the broker completed it; message sent again"
                    );
                    self.ctx.queue.requeue_front(vec![old]);
                }
            }
            LinkEvent::PubComp(pkid) => {
                // Also answers the PUBRELs sent on a resumed session: those match nothing here.
                if let Some(item) = conn.flight.completed(pkid) {
                    self.acknowledged(item, Ok(()));
                }
            }
            LinkEvent::SubAck(failures) if conn.control_suback => {
                conn.control_suback = false;
                if !failures.is_empty() {
                    let error = format!(
                        "control subscription {:?} refused ({}): this instance cannot see the \
                         others; allow it in the broker's ACL",
                        self.ctx.ha.control.filters(),
                        failures.join(", ")
                    );
                    warn!(%error);
                    self.go_lone(conn);
                }
            }
            LinkEvent::SubAck(failures) if conn.rule_subacks == 0 && conn.probe_suback => {
                conn.probe_suback = false;
                self.probe_drops = 0;
                if !failures.is_empty() {
                    self.probes = false;
                    warn!(
                        filter = %self.ctx.ha.control.probe_filter(),
                        reason = %failures.join(", "),
                        "probe subscription refused (a broker ACL?): probes from this broker are \
                         not forwarded"
                    );
                }
            }
            LinkEvent::SubAck(failures) => {
                conn.rule_subacks = conn.rule_subacks.saturating_sub(1);
                if failures.is_empty() {
                    info!(topics = ?self.subscribed.as_deref().unwrap_or_default(), "subscribed");
                } else {
                    conn.rule_refused = true;
                    let error = format!("subscription refused: {}", failures.join(", "));
                    warn!(%error);
                    self.ctx.stats.set_error(error);
                }
                if conn.rule_subacks == 0 && !conn.rule_refused {
                    self.subscriptions_in_place(conn);
                }
            }
            LinkEvent::PeerClosed => conn.peer_closed = true,
            LinkEvent::Closed(_) => {}
        }
        self.update_gauges(conn);
    }

    /// Every subscription the rules want is in place on this consuming connection: the
    /// broker delivers to it from now on. Noted in the owner record, for the other instances'
    /// readiness (see [`ha::OwnerRecord::subscribed`]).
    fn subscriptions_in_place(&mut self, conn: &mut Conn) {
        if !conn.consumer || conn.subscribed.is_some() {
            return;
        }
        let since = ha::unix_ms();
        conn.subscribed = Some(since);
        let me = &self.ctx.ha.identity;
        let note = self
            .view
            .owner
            .as_ref()
            .filter(|o| o.instance == me.instance && !o.released && !self.view.lone)
            .map(|o| OwnerRecord {
                subscribed: Some(ha::Subscribed {
                    since,
                    nonce: me.nonce,
                }),
                ..o.clone()
            });
        if let Some(record) = note.filter(|_| self.coordinate) {
            self.write_owner(conn, &record);
        }
        self.note_consumer(conn);
    }

    /// Reports who consumes the broker as this connection sees it now.
    fn note_consumer(&self, conn: &Conn) {
        let own = conn
            .subscribed
            .filter(|_| conn.consumer && self.switch.is_none());
        let consumer = conn.connected.and_then(|_| {
            self.view
                .consumer(&self.ctx.ha.identity, own, Instant::now())
        });
        self.report_consumer(consumer);
    }

    fn report_consumer(&self, consumer: Option<ha::Consumer>) {
        self.ctx
            .consumption
            .send_if_modified(|c| c.update(consumer));
    }

    /// A consuming connection subscribes what the rules want.
    fn subscribe_rules(&mut self, conn: &mut Conn, session_present: bool) {
        // This connection applies the rules as they are now.
        self.ctx.queue.take_rules_changed();
        let wanted = self.ctx.queue.rules().subscriptions();
        // 3.1.1 has no "retained only on new subscription": skip re-subscribing what a
        // kept session has, so the broker does not resend every retained message on
        // each reconnect; a kept session also drops what the rules no longer want.
        let kept =
            session_present.then(|| self.subscribed.clone().unwrap_or_else(|| wanted.clone()));
        let (to_subscribe, stale) = match &kept {
            None => (wanted.clone(), Vec::new()),
            Some(have) if self.ctx.settings.broker.protocol == Protocol::V5 => {
                (wanted.clone(), missing(have, &wanted))
            }
            Some(have) => (missing(&wanted, have), missing(have, &wanted)),
        };
        // What the rules dropped first, then what they want.
        change_subscriptions(&conn.client, &[], &stale);
        if wanted.is_empty() {
            // Only `out` rules: nothing to take from this broker (and an empty
            // SUBSCRIBE is a protocol error).
            info!("subscribed to nothing (no `in` rule)");
        } else if to_subscribe.is_empty() {
            info!("subscribed (the broker kept the session's subscriptions)");
        }
        change_subscriptions(&conn.client, &to_subscribe, &[]);
        conn.rule_subacks += u32::from(!to_subscribe.is_empty());
        self.subscribed = Some(wanted);
        if to_subscribe.is_empty() {
            // Nothing to wait for: the kept session has them, or there is nothing to take.
            self.subscriptions_in_place(conn);
        }
        if self.probes {
            // The mesh's probes come through the consumer like any message (see `probe`).
            change_subscriptions(&conn.client, &[self.ctx.ha.control.probe_filter()], &[]);
            conn.probe_suback = true;
        }
    }

    fn acknowledged(&mut self, item: Outbound, result: Result<(), session::Refused>) {
        match result {
            Ok(()) if item.probe => {}
            Ok(()) => inc(&self.ctx.stats.messages_out),
            Err(reason) => metrics::message_rejected(&self.ctx.stats, &item.msg.topic, &reason.0),
        }
        self.finish(item);
    }

    /// Whether a message from the broker is taken now, with the acknowledgement it owes. Not
    /// while stopping or changing role (unacknowledged, the broker keeps it for the session's
    /// next connection, ours or the next owner's), nor a redelivery after a reconnect while the
    /// first copy is still on its way (the first copy's acknowledgement covers it).
    fn take_in(&mut self, ack: Option<AckRequest>) -> Option<Option<AckRequest>> {
        if self.ctx.stop.is_cancelled() || self.switch.is_some() {
            return None;
        }
        match ack {
            Some(a) => {
                let taken = self.acks.receive(a);
                if taken.is_none() {
                    debug!(pkid = a.pkid, "redelivery of a message already forwarded");
                }
                taken.map(Some)
            }
            None => Some(None),
        }
    }

    /// On a 3.1.1 link: whether `msg` (fingerprint `fp`) is the echo of what this link, or
    /// another instance (its echo note), published here; taken out of the window if so.
    fn take_311_echo(&mut self, fp: u64, msg: &Message, now: Instant) -> bool {
        self.ctx.settings.broker.protocol == Protocol::V311
            && (self.echo.take_echo(fp, now)
                || (!self.peer_echo.is_empty()
                    && self
                        .peer_echo
                        .take_echo(ha::portable_fingerprint(&msg.topic, &msg.payload), now)))
    }

    fn on_publish(&mut self, msg: Message, ack: Option<AckRequest>) {
        inc(&self.ctx.stats.messages_in);
        let Some(ack) = self.take_in(ack) else {
            return;
        };
        if msg.has_origin_tag() {
            inc(&self.ctx.stats.dropped_tagged);
            self.complete_opt(ack);
            return;
        }
        let fp = fingerprint(&msg.topic, &msg.payload);
        let now = Instant::now();
        if self.take_311_echo(fp, &msg, now) {
            inc(&self.ctx.stats.dropped_echo);
            self.complete_opt(ack);
            return;
        }
        if let StormVerdict::Storm { first } = self.storm.observe(fp, now) {
            metrics::storm(&self.ctx.stats, &msg.topic, first, self.ctx.storm_threshold);
            self.complete_opt(ack);
            return;
        }
        // Into the mesh through this broker's first matching `in` rule (topic and QoS cap).
        let mapped = msg
            .topic_str()
            .and_then(|t| self.ctx.queue.rules().inbound(t))
            .map(|m| match m.topic {
                // Unchanged (no prefix): the received bytes go on as they are.
                std::borrow::Cow::Borrowed(_) => (None, m.qos_cap),
                std::borrow::Cow::Owned(t) => (Some(bytes::Bytes::from(t)), m.qos_cap),
            });
        let Some((mesh_topic, qos_cap)) = mapped else {
            // Only what a rule subscribed arrives; a topic none takes (not UTF-8) goes nowhere.
            inc(&self.ctx.stats.dropped_unmatched);
            self.complete_opt(ack);
            return;
        };
        let mut msg = msg;
        if let Some(topic) = mesh_topic {
            msg.topic = topic;
        }
        msg.qos = msg.qos.min(qos_cap);
        let targets = self
            .ctx
            .router
            .forward(&self.ctx.name, msg, ack.map(|a| (a, &self.acks_tx)));
        if targets > 0 {
            inc(&self.ctx.stats.forwarded);
        }
    }

    /// A probe (see [`crate::probe`]) from the broker: forwarded to every other broker
    /// whatever the rules say, counted nowhere, dropped silently when it is an echo.
    fn on_probe(&mut self, msg: Message, ack: Option<AckRequest>) {
        let Some(ack) = self.take_in(ack) else {
            return;
        };
        // Due at once (in order behind what came before it), forwarded or not: a probe
        // measures a path and carries nothing worth holding the origin for. Held until a
        // frozen target took it, it would hold every message received after it, as
        // acknowledgements go in order.
        self.complete_opt(ack);
        let fp = fingerprint(&msg.topic, &msg.payload);
        if msg.has_origin_tag() || self.take_311_echo(fp, &msg, Instant::now()) {
            return;
        }
        self.ctx.router.forward_probe(&self.ctx.name, msg);
    }

    /// Hands `item` to the client (or finishes it when the target cannot take it); gives it
    /// back when the client's request channel is full or closed.
    fn publish(&mut self, conn: &mut Conn, item: Outbound) -> Result<(), Outbound> {
        let broker = &self.ctx.settings.broker;
        let qos = item.msg.qos.min(broker.max_qos);
        let Some(topic) = item.msg.topic_str() else {
            metrics::message_rejected(&self.ctx.stats, &item.msg.topic, "topic is not UTF-8");
            self.finish(item);
            return Ok(());
        };
        // Out to this broker through its first matching `out` rule (the fan-out only queues
        // what one takes; a spooled message may predate a rule change).
        let probe = item.probe;
        if probe && !self.probes {
            // This broker refuses `$` topics (see `probe_drops`): a probe would cost the
            // connection.
            self.finish(item);
            return Ok(());
        }
        let mapped = if probe {
            // Probes measure the path, not the rules.
            Some(crate::rules::Mapped {
                topic: std::borrow::Cow::Borrowed(topic),
                qos_cap: 2,
            })
        } else {
            self.ctx.queue.rules().outbound(topic)
        };
        let Some(mapped) = mapped else {
            inc(&self.ctx.stats.dropped_unmatched);
            self.finish(item);
            return Ok(());
        };
        let qos = qos.min(mapped.qos_cap);
        let topic = mapped.topic;
        if let Some(reason) = self.unsendable(conn, &item, &topic) {
            self.set_aside(item, &reason);
            return Ok(());
        }
        let properties = match broker.protocol {
            Protocol::V5 => {
                if !self.tags.contains_key(&item.origin) {
                    let tag = format!("{}/{}", self.ctx.bridge_id, item.origin);
                    self.tags.insert(item.origin.clone(), tag);
                }
                Some(item.msg.forward_properties(&self.tags[&item.origin]))
            }
            Protocol::V311 => None,
        };
        if broker.protocol == Protocol::V311 && !conn.consumer && self.coordinate {
            // Another instance may consume this broker: tell it this is an echo first (a
            // 3.1.1 message carries no origin tag). Same connection, so the note arrives first.
            let fp = ha::portable_fingerprint(topic.as_bytes(), &item.msg.payload);
            let note = self.ctx.ha.control.echo_topic();
            let payload = self.ctx.ha.seal(&note, fp.to_be_bytes().to_vec());
            if conn
                .client
                .publish_record(&note, payload, 0, false, None)
                .is_err()
            {
                return Err(item);
            }
            conn.flight.handed_control();
        }
        match conn.client.publish(&item.msg, &topic, qos, properties) {
            Ok(()) => {
                if broker.protocol == Protocol::V311 {
                    // The echo comes back on the broker's topic, as published.
                    self.echo.record(
                        fingerprint(topic.as_bytes(), &item.msg.payload),
                        Instant::now(),
                    );
                }
                conn.flight.handed(item);
                Ok(())
            }
            Err(SendError::Full | SendError::Closed) => Err(item),
        }
    }

    /// Why `item`, mapped to `topic`, cannot be sent to this broker, if it cannot: a topic
    /// longer than MQTT allows, a packet over the maximum the broker announced, or the message
    /// the broker closed the last connections on (see [`poison`]).
    fn unsendable(&self, conn: &Conn, item: &Outbound, topic: &str) -> Option<String> {
        if topic.len() > MAX_TOPIC {
            return Some(format!(
                "its topic is {} bytes once mapped for this broker, over MQTT's {MAX_TOPIC}",
                topic.len()
            ));
        }
        if let Some(max) = conn.max_packet {
            // Only where the broker announced a maximum: this runs for every message.
            let size =
                item.msg.approx_packet_size() + topic.len().saturating_sub(item.msg.topic.len());
            if size > max as usize {
                return Some(format!(
                    "{size} bytes exceed the broker's maximum packet size {max}"
                ));
            }
        }
        if self.poison.active() && self.poison.is_poison(poison_id(item)) {
            return Some(
                "the broker closed the connection each time right after this message was written, alone (it refuses it: a packet over its maximum size?)"
                    .to_string(),
            );
        }
        None
    }

    /// This target cannot take `item` as mapped: into the dead-letter table, and on with the
    /// next message. A probe is only dropped (it measures a path, it carries nothing).
    fn set_aside(&mut self, item: Outbound, reason: &str) {
        if item.probe {
            self.finish(item);
            return;
        }
        if self.poison.active() {
            self.poison.done(poison_id(&item));
        }
        self.finished += 1;
        self.ctx.queue.set_aside(&self.ctx.name, item, reason);
    }

    /// Moves what waits on this target (queued and in flight) to its spool, so the origins
    /// are acknowledged without waiting for it.
    fn evacuate(&mut self, conn: &mut Conn, why: &str) {
        let mut items = conn.flight.all_mut();
        let moved = self.ctx.queue.evacuate(&mut items);
        if moved > 0 {
            info!(
                moved,
                reason = why,
                "target slow: waiting messages moved to the spool"
            );
        }
    }

    /// With parking, every spooled message of this target has a copy in a park session on its
    /// origin broker: the spool's depth bounds each session's. Reported (log, metrics) when it
    /// nears the brokers' queue limit, beyond which a broker drops copies (mosquitto
    /// `max_queued_messages`, default 1000).
    fn park_depth_check(&self) {
        if self.ctx.parker.is_none() {
            return;
        }
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let (depth, near) = self.ctx.stats.park_depth(self.ctx.queue.spool_depth().0);
        let limit = self.ctx.ha.queue_limit;
        let was = self.ctx.stats.park_near_logged.swap(near, relaxed);
        if near && !was {
            warn!(
                depth,
                limit,
                "copies parked for this broker near the brokers' queue limit \
                 (broker_queue_limit; mosquitto max_queued_messages): beyond it a broker drops \
                 copies and the loss of this host would lose them; raise the brokers' limit"
            );
        }
    }

    /// This target is done with `item` (see [`Link::finished`]).
    fn finish(&mut self, item: Outbound) {
        if self.poison.active() {
            self.poison.done(poison_id(&item));
        }
        self.finished += 1;
        self.ctx.queue.finish(item);
    }

    fn complete_opt(&mut self, ack: Option<AckRequest>) {
        if let Some(a) = ack {
            self.complete(a);
        }
    }

    /// Every target is done with a received message.
    fn complete(&mut self, ack: AckRequest) {
        self.acks.complete(ack);
    }

    /// Takes every completion the targets reported so far (before a last flush).
    fn take_completions(&mut self) {
        while let Ok(ack) = self.acks_rx.try_recv() {
            self.complete(ack);
        }
    }

    fn flush_acks(&mut self, client: &Client) {
        while let Some(ack) = self.acks.next_due() {
            if client.ack(ack).is_err() {
                // Retried after the next event.
                break;
            }
            self.acks.handed();
        }
    }

    async fn close(&mut self, conn: &mut Conn, session: &mut Session) -> Outcome {
        self.take_completions();
        self.flush_acks(&conn.client);
        if conn.connected.is_some() && self.coordinate {
            // A planned handover: everything received was acknowledged above; a peer may take
            // the session at once.
            if conn.consumer {
                self.release(conn);
            }
            self.announce(conn, false);
        }
        let _ = conn.client.disconnect();
        session.wait_closed().await;
        info!("disconnected");
        Outcome::Shutdown
    }

    /// Writes this instance's record on this broker: alive (and read back to sync the view), or
    /// gone (at shutdown).
    fn announce(&mut self, conn: &mut Conn, alive: bool) {
        let ha = &self.ctx.ha;
        let topic = ha.control.instance_topic(&ha.identity.instance);
        let payload = ha.seal(&topic, record_bytes(&ha.identity.record(alive)));
        // An alive record expires (MQTT 5) unless refreshed: a record left by a process that
        // died without its Will reaching the broker does not name a live instance for long.
        let expiry = alive.then_some(ha::LIVENESS);
        if conn
            .client
            .publish_record(&topic, payload, 0, true, expiry)
            .is_ok()
        {
            conn.flight.handed_control();
            self.announced = Some(Instant::now());
        }
    }

    /// This instance's claim of the broker, or its release, as of now.
    fn claim(&self, released: bool) -> OwnerRecord {
        OwnerRecord {
            instance: self.ctx.ha.identity.instance.clone(),
            since: ha::unix_ms(),
            released,
            subscribed: None,
        }
    }

    /// Writes the broker's owner record.
    fn write_owner(&self, conn: &mut Conn, record: &OwnerRecord) {
        let ha = &self.ctx.ha;
        let topic = ha.control.owner_topic(&self.ctx.name);
        let payload = ha.seal(&topic, serde_json::to_vec(record).unwrap_or_default());
        if conn
            .client
            .publish_record(&topic, payload, 0, true, None)
            .is_ok()
        {
            conn.flight.handed_control();
        }
    }

    fn release(&mut self, conn: &mut Conn) {
        self.write_owner(conn, &self.claim(true));
        info!("ownership released");
    }

    /// A control record arrived.
    fn on_control(&mut self, conn: &mut Conn, msg: &Message) {
        let Some(topic) = msg.topic_str() else { return };
        let now = Instant::now();
        tracing::trace!(topic, retained = msg.retain, "control record");
        let parsed = self.ctx.ha.control.parse(topic);
        let kind = match parsed {
            Some(ControlTopic::Instance(_)) => ControlKind::Instance,
            Some(ControlTopic::Owner(_)) => ControlKind::Owner,
            Some(ControlTopic::Echo) => ControlKind::Echo,
            None => return,
        };
        if msg.payload.is_empty() {
            // A retained record deleted: nothing to authenticate, nothing to believe.
            if let Some(ControlTopic::Instance(name)) = parsed {
                self.view.instances.remove(name);
            }
            return;
        }
        let (body, sealed_at) = match self.ctx.ha.open(&msg.topic, &msg.payload) {
            Ok(opened) => opened,
            Err(why) => {
                metrics::control_rejected(&self.ctx.stats, kind, &msg.topic, why);
                return;
            }
        };
        match parsed {
            Some(ControlTopic::Instance(name)) => {
                let Ok(record) = serde_json::from_slice::<InstanceRecord>(body) else {
                    debug!(topic, "unreadable instance record ignored");
                    self.view.instances.remove(name);
                    return;
                };
                // A live record is refreshed every HEARTBEAT: an old one is a replay. (A Will,
                // `alive: false`, was sealed when its connection began and may fire any time.)
                if record.alive && sealed_at.is_some_and(|t| !fresh(t, ha::LIVENESS)) {
                    let why = crate::seal::Rejected::Stale;
                    metrics::control_rejected(&self.ctx.stats, kind, &msg.topic, why);
                    return;
                }
                let me = &self.ctx.ha.identity;
                if name == me.instance && record.nonce == me.nonce && !record.alive {
                    // The Will of an earlier connection of ours, fired after we reconnected.
                    if conn.connected.is_some() && !self.ctx.stop.is_cancelled() {
                        self.announce(conn, true);
                    }
                    return;
                }
                let impostor = self.view.impostor;
                self.view.instance(name, record, msg.retain, me, now);
                if self.view.impostor != impostor {
                    let error = format!(
                        "another process announces itself as instance {:?}: give every process of the mesh its own [bridge] instance",
                        me.instance
                    );
                    tracing::error!(%error);
                    self.ctx.stats.set_error(error);
                }
            }
            Some(ControlTopic::Echo) => {
                // Another instance is about to publish this message here: its echo is not a
                // client's message. A note older than the echo window is a replay.
                if sealed_at.is_some_and(|t| !fresh(t, self.ctx.dedup_window)) {
                    let why = crate::seal::Rejected::Stale;
                    metrics::control_rejected(&self.ctx.stats, kind, &msg.topic, why);
                    return;
                }
                // Only another live instance of the mesh writes notes, and only for a 3.1.1
                // broker: any other note is not the mesh's, and must not make this link drop a
                // message (a mesh of one process needs no key for that).
                let peers = self.view.live(&self.ctx.ha.identity, now).len() > 1;
                let v311 = self.ctx.settings.broker.protocol == Protocol::V311;
                if let (true, true, Ok(fp)) = (peers, v311, <[u8; 8]>::try_from(body)) {
                    self.peer_echo.record(u64::from_be_bytes(fp), now);
                }
                return;
            }
            Some(ControlTopic::Owner(broker)) if broker == &*self.ctx.name => {
                // Owner records only move forward: one older than the newest seen (beyond the
                // clocks' skew) is a replay.
                if let Some(t) = sealed_at {
                    if t.saturating_add(crate::seal::SKEW_MS) < self.owner_sealed {
                        let why = crate::seal::Rejected::Stale;
                        metrics::control_rejected(&self.ctx.stats, kind, &msg.topic, why);
                        return;
                    }
                    self.owner_sealed = self.owner_sealed.max(t);
                }
                let record = serde_json::from_slice::<OwnerRecord>(body).ok();
                self.view.owner(record, msg.retain, now);
            }
            _ => return,
        }
        self.reconsider(conn);
    }

    /// Every [`HA_CHECK`]: refresh the instance record when due, and decide again (records go
    /// stale, claims settle).
    fn ha_tick(&mut self, conn: &mut Conn) {
        if conn.connected.is_none() || self.ctx.stop.is_cancelled() || !self.coordinate {
            return;
        }
        if self.announced.is_none_or(|t| t.elapsed() >= ha::HEARTBEAT) {
            self.announce(conn, true);
        }
        if !self.view.synced && uptime(conn).is_some_and(|t| t >= ha::SYNC_TIMEOUT) {
            self.go_lone(conn);
        }
        self.reconsider(conn);
        if conn.consumer && self.switch.is_none() {
            self.parks_for_new_targets();
        }
    }

    /// A connection ended: two in a row that ended before reading their own record back mean
    /// the broker refuses the control topic by disconnecting; stop coordinating on it.
    fn note_unsynced_end(&mut self, had_connack: bool) {
        if self.view.synced || self.view.lone || !had_connack {
            self.unsynced_ends = 0;
            return;
        }
        self.unsynced_ends += 1;
        if self.unsynced_ends >= 2 {
            self.coordinate = false;
            self.consumer = true;
            // Probes are `$` topics too: subscribing them would cost the connection again.
            self.probes = false;
            warn!(
                filters = ?self.ctx.ha.control.filters(),
                "the broker closed two connections in a row before they read their control \
                 records back (it refuses `$` topics?): consuming it as a lone instance, without \
                 probes; set [bridge] ha = false and probe_interval = \"0s\" for a mesh of one \
                 process on such brokers"
            );
        }
    }

    /// The broker hides the control topic from this connection: consume it as a lone instance
    /// (what every instance did before instances coordinated).
    fn go_lone(&mut self, conn: &mut Conn) {
        if self.view.lone {
            return;
        }
        self.view.lone = true;
        warn!(
            filters = ?self.ctx.ha.control.filters(),
            "this connection cannot read its control records back (a broker ACL?): consuming \
             the broker as a lone instance; for several instances, allow the bridge's user to \
             read and write the filter"
        );
        self.reconsider(conn);
    }

    /// Acts on [`ha::decide`] (claim, take over, step down or hand over), then reports who
    /// consumes the broker.
    fn reconsider(&mut self, conn: &mut Conn) {
        self.act_on_ownership(conn);
        self.note_consumer(conn);
    }

    fn act_on_ownership(&mut self, conn: &mut Conn) {
        if conn.connected.is_none() || self.switch.is_some() || self.ctx.stop.is_cancelled() {
            return;
        }
        self.check_takeover(conn);
        let ha = self.ctx.ha.clone();
        let me = &ha.identity;
        let now = Instant::now();
        let decision = ha::decide(&self.view, me, &self.ctx.name, now);
        if decision != Decision::Own && !matches!(decision, Decision::Standby { .. }) {
            debug!(
                ?decision,
                owner = ?self.view.owner,
                live = ?self.view.live(me, now),
                "ownership decision"
            );
        }
        let owner = self.view.live_owner(me, now).map(str::to_string);
        let instances = self.view.live(me, now).len();
        let mut seen: Vec<(String, bool, u64, String)> = self
            .view
            .instances
            .iter()
            .map(|(name, s)| {
                let live = self.view.is_live(name, me, now);
                (name.clone(), live, s.record.started, s.record.admin.clone())
            })
            .collect();
        seen.push((me.instance.clone(), true, me.started, me.admin.clone()));
        self.ctx.stats.set_ha(|h| {
            h.owner = owner.clone();
            h.instances = instances;
            h.seen = seen;
        });
        match decision {
            // What the park sessions hold is older than what the broker delivers next.
            Decision::Own if !conn.consumer && self.parks_drained() => {
                info!("this instance owns the broker: taking its session");
                inc(&self.ctx.stats.takeovers);
                self.begin_switch(false);
            }
            Decision::Claim if self.claim_rested() => {
                // With no other instance live here nobody can claim at the same time: the
                // claim counts as soon as the broker hands it back (see `View::uncontested`).
                self.view.uncontested = self.view.alone(me, now);
                info!(
                    uncontested = self.view.uncontested,
                    "no live owner: claiming the broker"
                );
                self.claimed = Some(now);
                self.write_owner(conn, &self.claim(false));
            }
            Decision::Standby { owner: Some(owner) } if conn.consumer => {
                warn!(%owner, "another instance owns the broker: stepping down");
                inc(&self.ctx.stats.step_downs);
                self.begin_switch(false);
            }
            Decision::HandOver { to } if conn.consumer => {
                info!(to = %to, "handing the broker over to an instance that joined");
                inc(&self.ctx.stats.handovers);
                self.begin_switch(true);
            }
            Decision::HandOver { to } if self.claim_rested() => {
                // Named owner, not consuming yet (reading the park sessions, say): release the
                // claim at once; the preferred instance claims it.
                info!(to = %to, "handing the broker over to an instance that joined, before consuming it");
                inc(&self.ctx.stats.handovers);
                self.claimed = Some(now);
                self.parks = Parks::default();
                self.release(conn);
            }
            _ => {}
        }
    }

    /// After the broker closed this link's consuming connection: once this connection has read
    /// the records, an owner record that still names this instance means no instance of the
    /// mesh took the session over. Another client did, with the mesh's client id (or the broker
    /// restarted faster than the first reconnect): logged, counted, alerted.
    fn check_takeover(&mut self, conn: &Conn) {
        if conn.consumer || !self.view.synced {
            return;
        }
        let Some(closed) = self.closed_as_owner.take() else {
            return;
        };
        let me = &self.ctx.ha.identity;
        if self.view.live_owner(me, Instant::now()) == Some(me.instance.as_str()) {
            metrics::session_taken(&self.ctx.stats, closed.elapsed());
        }
    }

    /// Before consuming this broker: every park session on it read into its target (started
    /// on the first call; true once all of them read everything, or after [`PARK_WAIT`]).
    fn parks_drained(&mut self) -> bool {
        if self.ctx.parker.is_none() {
            return true;
        }
        let Some(started) = self.parks.started else {
            info!("taking the broker: reading its park sessions first");
            let me = self.ctx.name.clone();
            for target in self.ctx.router.names().into_iter().filter(|t| *t != me) {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.spawn_park_drain(target, tx, false);
                self.parks.pending.push(rx);
            }
            self.parks.started = Some(Instant::now());
            return self.parks.pending.is_empty();
        };
        self.parks.prune();
        if !self.parks.pending.is_empty() && started.elapsed() < PARK_WAIT {
            return false;
        }
        if !self.parks.pending.is_empty() {
            warn!("park sessions not read within 15 s: consuming the broker anyway");
            self.parks.pending.clear();
        }
        true
    }

    /// Starts the drain of this broker's park session for `target`; `joined`: the target
    /// joined the mesh while this process ran (see [`park::ParkContext::joined`]).
    fn spawn_park_drain(
        &mut self,
        target: Arc<str>,
        read_all: tokio::sync::oneshot::Sender<()>,
        joined: bool,
    ) {
        let Some(mut ctx) = self.park_context(target.clone()) else {
            return;
        };
        ctx.joined = joined;
        self.parks.ready.insert(target);
        tokio::spawn(park::recover(ctx, read_all));
    }

    fn park_context(&self, target: Arc<str>) -> Option<park::ParkContext> {
        Some(park::ParkContext {
            settings: self.ctx.settings.clone(),
            origin: self.ctx.name.clone(),
            target,
            router: self.ctx.router.clone(),
            parker: self.ctx.parker.clone()?,
            joined: false,
            ha: self.ctx.ha.clone(),
            stats: self.ctx.stats.clone(),
        })
    }

    /// While consuming: a target that joined since gets its park session on this broker, and
    /// one that left has its park session discarded.
    fn parks_for_new_targets(&mut self) {
        if self.ctx.parker.is_none() {
            return;
        }
        let names = self.ctx.router.names();
        for target in &names {
            if *target != self.ctx.name && !self.parks.ready.contains(target) {
                let (tx, _rx) = tokio::sync::oneshot::channel();
                self.spawn_park_drain(target.clone(), tx, true);
            }
        }
        let gone: Vec<Arc<str>> = self
            .parks
            .ready
            .iter()
            .filter(|t| !names.contains(t))
            .cloned()
            .collect();
        for target in gone {
            self.parks.ready.remove(&target);
            if let Some(ctx) = self.park_context(target) {
                tokio::spawn(park::discard(ctx));
            }
        }
    }

    /// This link wrote no owner record in the last 2 s (claims and releases are not repeated
    /// faster: the broker's answer is on its way).
    fn claim_rested(&self) -> bool {
        self.claimed
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
    }

    fn begin_switch(&mut self, release: bool) {
        self.switch = Some(Switch {
            since: Instant::now(),
            release,
        });
        self.ctx.stats.set_ha(|h| h.consuming = false);
    }

    /// A connection changing role leaves once nothing is in flight either way (or after
    /// [`SWITCH_TIMEOUT`]): what it received is acknowledged, what it sent is acknowledged.
    fn switch_ready(&self, conn: &Conn) -> bool {
        let Some(switch) = self.switch else {
            return false;
        };
        let idle = conn.flight.outstanding() == 0 && self.acks.unacknowledged() == 0;
        if !idle && switch.since.elapsed() >= SWITCH_TIMEOUT {
            warn!(
                in_flight = conn.flight.outstanding(),
                unacknowledged = self.acks.unacknowledged(),
                "changing role with messages still in flight"
            );
        }
        idle || switch.since.elapsed() >= SWITCH_TIMEOUT || conn.connected.is_none()
    }

    /// Ends a connection that changes role: acknowledges, releases when handing over, and
    /// disconnects cleanly (no Will).
    async fn leave(&mut self, conn: &mut Conn, session: &mut Session) -> Outcome {
        self.take_completions();
        self.flush_acks(&conn.client);
        if self.switch.is_some_and(|s| s.release) {
            self.release(conn);
        }
        let _ = conn.client.disconnect();
        session.wait_closed().await;
        Outcome::Switch
    }

    fn update_gauges(&self, conn: &Conn) {
        let s = &self.ctx.stats;
        s.inflight.store(
            conn.flight.outstanding() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        s.dedup_entries.store(self.echo.len() as i64, relaxed);
        s.dedup_bytes
            .store(self.echo.approx_bytes() as i64, relaxed);
        s.dedup_evictions.store(self.echo.evictions(), relaxed);
        s.dedup_expirations.store(self.echo.expirations(), relaxed);
    }
}

/// Whether a payload sealed at `t` is at most `max_age` old (clocks of other hosts may be
/// [`crate::seal::SKEW_MS`] off either way).
fn fresh(t: u64, max_age: Duration) -> bool {
    let max_age = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    crate::seal::fresh(
        t,
        ha::unix_ms(),
        max_age.saturating_add(crate::seal::SKEW_MS),
        crate::seal::SKEW_MS,
    )
}

/// Longest topic MQTT can carry (a two-byte length).
const MAX_TOPIC: usize = u16::MAX as usize;

/// What the poison watch knows a message by: its topic and payload (see [`poison`]).
fn poison_id(item: &Outbound) -> u64 {
    fingerprint(&item.msg.topic, &item.msg.payload)
}

fn record_bytes(record: &InstanceRecord) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}

/// The filters of `a` that `b` lacks, in `a`'s order.
fn missing(a: &[String], b: &[String]) -> Vec<String> {
    a.iter().filter(|f| !b.contains(f)).cloned().collect()
}

/// Queues a SUBSCRIBE of `subscribe` and UNSUBSCRIBEs of `unsubscribe`, each only when not
/// empty (an empty SUBSCRIBE is a protocol error); what cannot be queued is logged.
fn change_subscriptions(client: &Client, subscribe: &[String], unsubscribe: &[String]) {
    if !subscribe.is_empty()
        && let Err(e) = client.subscribe(subscribe)
    {
        warn!(error = %e, "subscribe could not be queued");
    }
    if !unsubscribe.is_empty()
        && let Err(e) = client.unsubscribe(unsubscribe)
    {
        warn!(error = %e, "unsubscribe could not be queued");
    }
}

fn uptime(conn: &Conn) -> Option<Duration> {
    conn.connected.map(|t| t.elapsed())
}
