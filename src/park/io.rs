//! The I/O half of parking (see [`crate::park`]): the park sessions of one origin broker. `<id>-X~park-T` on
//! broker X, subscribed to T's park topic, holds copies of what was spooled for T while X's
//! messages went to T. Short-lived tasks use it, run by X's owner:
//!
//! - [`recover`], before the owner consumes X: creates the session if it is new, and hands every
//!   copy it holds to T's queue as a message from X (a copy of a row this process's spool still
//!   holds is parked again instead, so it is not delivered twice). A marker it publishes itself
//!   tells it when it has read everything; each copy is acknowledged once T's queue is done with
//!   it (delivered, or spooled and parked again).
//! - [`trim`], after a marker this process published behind its copies came back acknowledged:
//!   acknowledges every copy up to it when T's spool is empty, otherwise those whose rows the
//!   spool no longer holds, up to the first it holds.
//! - [`discard`], after T left the mesh: ends the session with every copy in it.
//!
//! The copies themselves are published by [`publish_copies`], one task per origin link with a
//! connection of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{Instrument, debug, info, warn};

use super::{CopyLane, Park, ParkItem, Parker};
use crate::link::acks::InboundAcks;
use crate::link::session::{self, ConnectAs, LinkEvent, Session, SessionSettings};
use crate::link::window::Window;
use crate::message::{AckGroup, AckRequest, AckSender, Message};
use crate::router::{Outbound, Router};
use crate::seal::ControlKind;
use crate::spool::{self, Decoded};
use crate::topics;

/// Why a park task or the copy publisher ended before it was done (its copies stay where they
/// are for the next one).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ParkError {
    /// The connection ended (the driver's reason).
    #[error("connection lost: {0}")]
    Lost(String),
    /// The broker refused the park subscription.
    #[error("park subscription refused: {0}")]
    Refused(String),
    /// A request could not be queued on the connection.
    #[error("{0}")]
    Send(#[from] session::SendError),
}

/// How long a park task may take before it gives up (the copies stay for the next one).
const PARK_TIMEOUT: Duration = Duration::from_secs(60);

/// What a park task needs.
#[derive(Debug, Clone)]
pub(crate) struct ParkContext {
    /// The origin broker's connection settings.
    pub(crate) settings: SessionSettings,
    /// The origin broker's name.
    pub(crate) origin: Arc<str>,
    /// The target whose copies these are.
    pub(crate) target: Arc<str>,
    /// The targets' queues.
    pub(crate) router: Arc<Router>,
    /// Parks a copy again.
    pub(crate) parker: Arc<Parker>,
    /// The target joined the mesh while this process ran: every copy for it from this
    /// process's spool was made in this run, so one the spool no longer holds was delivered
    /// from it already (see [`hand_over`]).
    pub(crate) joined: bool,
    /// The mesh key (park records are sealed: [`crate::seal`]).
    pub(crate) ha: Arc<crate::link::HaContext>,
    /// The origin link's counters (refused park records).
    pub(crate) stats: Arc<crate::metrics::LinkStats>,
}

impl ParkContext {
    /// Connects as the park session; `clean`: a new, empty one that ends with the connection.
    fn connect(&self, clean: bool) -> Session {
        let who = ConnectAs {
            client_id: topics::park_id(&self.settings.client_id, &self.target),
            clean,
            will: None,
        };
        session::open(&self.settings, &who, &[])
    }
}

/// The target left the mesh: its park session on this origin goes, with every copy in it (a
/// broker added later under the same name must not receive them).
pub(crate) async fn discard(ctx: ParkContext) {
    let span = tracing::info_span!("park", origin = %ctx.origin, target = %ctx.target);
    async move {
        let mut s = ctx.connect(true);
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.next_event().await {
                    Some(LinkEvent::Connected { .. }) => return true,
                    None | Some(LinkEvent::Closed(_)) => return false,
                    Some(_) => {}
                }
            }
        })
        .await
        .unwrap_or(false);
        if connected {
            let _ = s.client.disconnect();
            s.wait_closed().await;
            info!("the target left the mesh: its park session was discarded");
        } else {
            warn!("the target left the mesh; its park session could not be discarded now");
        }
    }
    .instrument(span)
    .await
}

/// Creates the park session if it is new and hands what it holds to the target; `read_all`
/// is told once everything the session held has been read (the owner may consume from then
/// on: what it forwards comes after). Returns when every copy was acknowledged, or after
/// [`PARK_TIMEOUT`].
pub(crate) async fn recover(ctx: ParkContext, read_all: oneshot::Sender<()>) {
    let span = tracing::info_span!("park", origin = %ctx.origin, target = %ctx.target);
    recover_inner(ctx, read_all).instrument(span).await
}

/// Park sessions read at once by this process: at start every owner reads one per other broker
/// (56 connections at 8 brokers), and the heap they grow stays with the process.
static RECOVERING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);

async fn recover_inner(ctx: ParkContext, read_all: oneshot::Sender<()>) {
    let mut read_all = Some(read_all);
    let _permit = RECOVERING.acquire().await;
    let outcome = tokio::time::timeout(PARK_TIMEOUT, run(&ctx, Mode::Recover, &mut read_all)).await;
    if let Some(tx) = read_all.take() {
        let _ = tx.send(());
    }
    match outcome {
        Ok(Ok(n)) if n > 0 => info!(copies = n, "park session drained into the target"),
        Ok(Ok(_)) => debug!("park session ready, nothing parked"),
        Ok(Err(e)) => {
            warn!(error = %e, "park session: not drained; its copies stay for the next owner")
        }
        Err(_) => {
            warn!("park session: not drained within 60 s; its copies stay for the next owner")
        }
    }
}

/// The trims of one origin's park sessions: one at a time per target, and the latest marker
/// that came back meanwhile kept for when it ends. Two at once would take over each other's
/// session (they connect with the same client id): a trim slower than the markers' 2 s (a
/// large park session, a long path) would be cut off by the next one, again and again.
#[derive(Debug, Default)]
pub(crate) struct Trims(std::sync::Mutex<HashMap<Arc<str>, Option<u64>>>);

impl Trims {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Option<u64>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marker `nonce` for `target` came back: true when its trim starts now; otherwise it is
    /// kept (the latest only) for when the running one ends.
    fn start(&self, target: &Arc<str>, nonce: u64) -> bool {
        let mut trims = self.lock();
        match trims.get_mut(target) {
            Some(next) => {
                *next = Some(nonce);
                false
            }
            None => {
                trims.insert(target.clone(), None);
                true
            }
        }
    }

    /// The trim for `target` ended: the marker to trim up to next, if one came back meanwhile.
    fn ended(&self, target: &Arc<str>) -> Option<u64> {
        let mut trims = self.lock();
        let next = trims.get_mut(target).and_then(Option::take);
        if next.is_none() {
            trims.remove(target);
        }
        next
    }
}

/// Trims up to marker `nonce`, then up to each marker that came back meanwhile, in turn.
async fn trim_in_turn(ctx: ParkContext, mut nonce: u64, trims: Arc<Trims>) {
    loop {
        trim(ctx.clone(), nonce).await;
        match trims.ended(&ctx.target) {
            Some(next) => nonce = next,
            None => return,
        }
    }
}

/// Acknowledges (discards) the copies in the park session up to the marker `nonce`: all of them
/// when the target's spool is empty, otherwise those already delivered from it (see [`run`]).
pub(crate) async fn trim(ctx: ParkContext, nonce: u64) {
    let span = tracing::info_span!("park", origin = %ctx.origin, target = %ctx.target);
    async move {
        match tokio::time::timeout(PARK_TIMEOUT, run(&ctx, Mode::Trim(nonce), &mut None)).await {
            Ok(Ok(n)) => debug!(copies = n, "delivered copies discarded"),
            Ok(Err(e)) => debug!(error = %e, "park session not trimmed; later"),
            Err(_) => debug!("park session not trimmed within 60 s; later"),
        }
    }
    .instrument(span)
    .await
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Recover,
    Trim(u64),
}

/// One pass over a park session: what it has read so far.
struct Pass<'a> {
    ctx: &'a ParkContext,
    mode: Mode,
    /// The marker that ends the pass.
    marker: u64,
    topic: String,
    /// The target's queue (`None`: it left the mesh).
    queue: Option<Arc<crate::router::TargetQueue>>,
    /// Trimming while the target's spool still holds rows (see [`run`]).
    partial: bool,
    /// A partial trim reached a copy it keeps: everything from there stays.
    stopped: bool,
    seen_marker: bool,
    /// The broker had no such session: it holds nothing.
    new_session: bool,
    handled: usize,
    acks: InboundAcks,
    acks_tx: AckSender,
}

impl Pass<'_> {
    fn done(&self) -> bool {
        (self.seen_marker && self.acks.unacknowledged() == 0 || self.stopped)
            && self.acks.due() == 0
    }

    /// The park subscription was answered; true when the pass is over (a new, empty session).
    fn subscribed(
        &mut self,
        s: &Session,
        read_all: &mut Option<oneshot::Sender<()>>,
    ) -> Result<bool, ParkError> {
        if !matches!(self.mode, Mode::Recover) {
            return Ok(false);
        }
        if self.new_session {
            // A session the broker did not have holds nothing: read at once. It is subscribed
            // now, so copies parked from here on wait for the next drain. (The first start of
            // a mesh has one per pair of brokers to create: at 32 brokers, 992 marker round
            // trips before anything was consumed.)
            if let Some(tx) = read_all.take() {
                let _ = tx.send(());
            }
            return Ok(true);
        }
        // Behind everything the session holds.
        let m = Park::Marker {
            target: self.ctx.target.clone(),
            nonce: self.marker,
        };
        let payload = self.ctx.ha.seal(&self.topic, m.encode());
        s.client
            .publish_record(&self.topic, payload, 1, 0, false, None)?;
        Ok(false)
    }

    /// A record read from the session.
    fn record(
        &mut self,
        msg: &Message,
        ack: Option<AckRequest>,
        read_all: &mut Option<oneshot::Sender<()>>,
    ) {
        let ctx = self.ctx;
        let ack = ack.and_then(|a| self.acks.receive(a));
        // A record without a valid seal is nobody's copy: discarded below.
        let park = match ctx.ha.open(&msg.topic, &msg.payload) {
            Ok((body, _)) => Park::decode(&ctx.target, body),
            Err(why) => {
                crate::metrics::control_rejected(&ctx.stats, ControlKind::Park, &msg.topic, why);
                None
            }
        };
        let recover = matches!(self.mode, Mode::Recover);
        match park {
            Some(Park::Marker { nonce, .. }) if nonce == self.marker => {
                self.seen_marker = true;
                if let Some(tx) = read_all.take() {
                    let _ = tx.send(());
                }
                self.complete(ack);
            }
            Some(Park::Copy {
                key,
                spool_id,
                record,
                ..
            }) if recover => {
                self.handled += 1;
                hand_over(
                    ctx,
                    key,
                    spool_id,
                    record,
                    ack,
                    &self.acks_tx,
                    &mut self.acks,
                );
            }
            Some(Park::Copy {
                key,
                spool_id,
                record,
                ..
            }) if self.partial => {
                let held = self
                    .queue
                    .as_ref()
                    .and_then(|q| q.spool_holds(key, &record));
                if spool_id == ctx.parker.spool_id && held == Some(false) {
                    self.handled += 1;
                    self.complete(ack);
                } else {
                    // Kept, unacknowledged, with everything behind it.
                    self.stopped = true;
                }
            }
            _ => {
                // Trimming, an older marker, or not a park record: discarded.
                self.handled += usize::from(!recover);
                self.complete(ack);
            }
        }
    }

    fn complete(&mut self, ack: Option<AckRequest>) {
        if let Some(a) = ack {
            self.acks.complete(a);
        }
    }
}

/// One pass over the park session; returns the copies handled.
async fn run(
    ctx: &ParkContext,
    mode: Mode,
    read_all: &mut Option<oneshot::Sender<()>>,
) -> Result<usize, ParkError> {
    // Trimming while the target's spool still holds rows: only the copies of rows it no longer
    // holds go, up to the first it still holds (or made by another process: it alone knows).
    // Every copy before the marker was made after its row was sent to the spool writer; once
    // that is on disk, a row the spool lacks was delivered (or dropped by its limits).
    let queue = ctx.router.queue(&ctx.target);
    let partial = match (&mode, &queue) {
        (Mode::Trim(_), Some(q)) => {
            q.sync_spool().await;
            !q.spool_empty()
        }
        _ => false,
    };
    let (acks_tx, mut acks_rx) = crate::message::ack_channel();
    let mut pass = Pass {
        ctx,
        mode,
        marker: match mode {
            Mode::Recover => rand::random(),
            Mode::Trim(nonce) => nonce,
        },
        topic: ctx.ha.control.park_topic(&ctx.target),
        queue,
        partial,
        stopped: false,
        seen_marker: false,
        new_session: false,
        handled: 0,
        acks: InboundAcks::default(),
        acks_tx,
    };
    let mut s = ctx.connect(false);
    while !pass.done() {
        tokio::select! {
            event = s.next_event() => match event {
                None => return Err(ParkError::Lost("connection task ended".into())),
                Some(LinkEvent::Closed(e)) => return Err(ParkError::Lost(e)),
                Some(LinkEvent::Connected { session_present, .. }) => {
                    if !session_present {
                        pass.acks.new_session();
                    }
                    pass.new_session = !session_present;
                    s.client.subscribe_records(std::slice::from_ref(&pass.topic), 1)?;
                }
                Some(LinkEvent::SubAck(failures)) if !failures.is_empty() => {
                    return Err(ParkError::Refused(failures.join(", ")));
                }
                Some(LinkEvent::SubAck(_)) => {
                    if pass.subscribed(&s, read_all)? {
                        break;
                    }
                }
                Some(LinkEvent::Publish { .. }) if pass.seen_marker || pass.stopped => {
                    // Parked after the marker (the target is still down, say): left in the
                    // session, unacknowledged, for the next drain. Reading it now would hand
                    // it to the target, which would park it again, here: a loop. Likewise
                    // everything behind a copy a partial trim keeps.
                }
                Some(LinkEvent::Publish { msg, ack }) => pass.record(&msg, ack, read_all),
                Some(_) => {}
            },
            _ = acks_rx.rung() => {
                while let Some(a) = acks_rx.try_recv() {
                    pass.acks.complete(a);
                }
            }
        }
        while let Some(a) = pass.acks.next_due() {
            if s.client.ack(a).is_err() {
                break;
            }
            pass.acks.handed();
        }
    }
    let _ = s.client.disconnect();
    s.wait_closed().await;
    Ok(pass.handled)
}

/// A copy read from the park session: to the target's queue as a message from the origin,
/// or parked again when this process's spool still holds the row. `ack` is acknowledged once
/// that is done.
fn hand_over(
    ctx: &ParkContext,
    key: u64,
    spool_id: u64,
    record: Arc<Vec<u8>>,
    ack: Option<AckRequest>,
    acks_tx: &AckSender,
    acks: &mut InboundAcks,
) {
    let msg = match spool::decode(&record) {
        Ok(Decoded::Message(_, msg)) => msg,
        Ok(Decoded::Expired(_)) | Err(_) => {
            // Expired while parked, or unreadable: nothing to deliver.
            if let Some(a) = ack {
                acks.complete(a);
            }
            return;
        }
    };
    let share = ack.and_then(|a| AckGroup::shares(a, acks_tx.clone(), 1).next());
    let Some(queue) = ctx.router.queue(&ctx.target) else {
        // The target left the mesh.
        if let Some(s) = share {
            s.complete();
        }
        return;
    };
    let msg: Arc<Message> = Arc::new(msg);
    if spool_id == ctx.parker.spool_id && queue.spool_holds(key, &record) == Some(true) {
        // This process delivers it from its spool: keep a copy parked, no second delivery.
        let park = Park::Copy {
            target: ctx.target.clone(),
            spool_id,
            key,
            record,
        };
        ctx.parker.send(&ctx.origin, ParkItem { park, share });
        return;
    }
    if spool_id == ctx.parker.spool_id && ctx.joined {
        // Made in this run and gone from the spool: delivered from there. (A copy of an
        // earlier run's row may be all that is left of it after a crash: that one goes on.)
        if let Some(s) = share {
            s.complete();
        }
        return;
    }
    queue.push(Outbound::new(msg, share, ctx.origin.clone()));
}

/// What the copy publisher of one origin broker needs.
#[derive(Debug)]
pub(crate) struct CopyPublisher {
    /// The park context (origin broker settings, router, parker; `target` unused).
    pub(crate) park: ParkContext,
    /// Its client id: `<id>-X~copies@<instance>`, a clean session.
    pub(crate) client_id: String,
    /// The origin broker's copy lane.
    pub(crate) lane: Arc<CopyLane>,
    /// The origin link's counters.
    pub(crate) stats: Arc<crate::metrics::LinkStats>,
    /// Who consumes the origin, as its link reports it (only its consumer trims).
    pub(crate) consumption: tokio::sync::watch::Receiver<crate::ha::Consumption>,
    /// Ends the publisher (the link's last shutdown step).
    pub(crate) stop: tokio_util::sync::CancellationToken,
    /// The trims its markers start (see [`Trims`]).
    pub(crate) trims: Arc<Trims>,
}

/// Publishes the copies and markers of one origin broker (see [`crate::park`]) on a
/// connection of their own: on the origin link's connection their acknowledgements would queue
/// behind the messages that link receives, and that link could not stop reading (to wait for
/// the copies) without also stopping their acknowledgements.
pub(crate) async fn publish_copies(p: CopyPublisher) {
    let span = tracing::info_span!("copies", origin = %p.park.origin);
    async move {
        while !p.stop.is_cancelled() {
            let outcome = copies_connection(&p).await;
            if let Err(e) = outcome {
                debug!(error = %e, "copy connection lost; again in 1 s");
            }
            tokio::select! {
                _ = p.stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    .instrument(span)
    .await
}

async fn copies_connection(p: &CopyPublisher) -> Result<(), ParkError> {
    use crate::link::outflight::OutFlight;
    let who = ConnectAs {
        client_id: p.client_id.clone(),
        clean: true,
        will: None,
    };
    // Copies carry no MQTT 5 property: with `v311_lane`, they go out on MQTT 3.1.1, which
    // sets no Receive Maximum (an origin's maximum would hold the copies, and with them the
    // spill path, to that many per round trip to the origin).
    let mut copy_settings = p.park.settings.clone();
    if copy_settings.v311_lane {
        copy_settings.broker.protocol = crate::message::Protocol::V311;
    }
    let mut s = session::open(&copy_settings, &who, &[]);
    let mut flight: OutFlight<ParkItem> = OutFlight::default();
    // Copies are written as fast as the path to the origin takes them (see
    // `link::window`): over a long path a fixed window would make the spill path the bottleneck.
    let settings = &p.park.settings;
    let mut pace = Window::new(
        usize::from(settings.inflight),
        usize::from(settings.inflight_max),
    );
    let mut connected = false;
    let mut batch = Vec::new();
    let result = loop {
        let window = pace.size();
        if connected && flight.outstanding() < window {
            p.lane.take(window - flight.outstanding(), &mut batch);
            let mut items = batch.drain(..);
            while let Some(item) = items.next() {
                let topic = p.park.ha.control.park_topic(item.park.target());
                let payload = p.park.ha.seal(&topic, item.park.encode());
                // Numbered here (see `OutFlight::free_id`); the window keeps one free.
                let pkid = flight.free_id(settings.inflight_max);
                let queued = pkid.is_some_and(|id| {
                    s.client
                        .publish_record(&topic, payload, 1, id, false, None)
                        .is_ok()
                });
                let Some(pkid) = pkid.filter(|_| queued) else {
                    let rest: Vec<ParkItem> = std::iter::once(item).chain(items).collect();
                    p.lane.requeue(rest);
                    break;
                };
                if let Some(old) = flight.handed_numbered(pkid, item) {
                    p.lane.requeue(vec![old]);
                }
                pace.written(pkid, std::time::Instant::now(), flight.inflight());
            }
        }
        let room = connected && flight.outstanding() < pace.size();
        tokio::select! {
            _ = p.stop.cancelled() => break Ok(()),
            event = s.next_event() => match event {
                None => break Err(ParkError::Lost("connection task ended".into())),
                Some(LinkEvent::Closed(e)) => break Err(ParkError::Lost(e)),
                Some(LinkEvent::Connected { receive_max, .. }) => {
                    connected = true;
                    if let Some(max) = receive_max {
                        pace.cap_at(usize::from(max));
                    }
                }
                Some(LinkEvent::PubAck(pkid, result)) => {
                    pace.acknowledged(pkid, std::time::Instant::now());
                    if let Some(item) = flight.acknowledged(pkid) {
                        copy_acknowledged(p, item, result);
                    }
                }
                Some(_) => {}
            },
            _ = p.lane.notified(), if room => {}
        }
    };
    // Not acknowledged: sent again on the next connection (a copy twice at worst).
    let (unconfirmed, _) = flight.drain();
    p.lane.requeue(unconfirmed);
    if result.is_ok() {
        let _ = s.client.disconnect();
        s.wait_closed().await;
    }
    result
}

/// The origin broker acknowledged a copy (its origin may be acknowledged now) or a marker
/// (the copies before it may go, if this process owns the origin).
fn copy_acknowledged(p: &CopyPublisher, item: ParkItem, result: Result<(), session::Refused>) {
    match (&item.park, result) {
        (Park::Marker { target, nonce }, Ok(())) => {
            if p.consumption.borrow().by_this() && p.trims.start(target, *nonce) {
                let mut ctx = p.park.clone();
                ctx.target = target.clone();
                tokio::spawn(trim_in_turn(ctx, *nonce, p.trims.clone()));
            }
        }
        (_, Ok(())) => crate::metrics::inc(&p.stats.parked),
        (park, Err(reason)) => crate::metrics::message_rejected(
            &p.stats,
            p.park.ha.control.park_topic(park.target()).as_bytes(),
            &format!("park copy refused ({reason}): the message is in the local spool only"),
        ),
    }
    p.lane.finish(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trim_per_session_at_a_time_then_the_latest_marker() {
        let trims = Trims::default();
        let (t, u): (Arc<str>, Arc<str>) = ("t".into(), "u".into());
        assert!(trims.start(&t, 1), "none running: starts");
        assert!(trims.start(&u, 7), "another session: starts too");
        assert!(!trims.start(&t, 2), "one running: kept");
        assert!(!trims.start(&t, 3), "the latest kept");
        assert_eq!(trims.ended(&t), Some(3), "then trimmed up to the latest");
        assert_eq!(trims.ended(&t), None, "nothing came back meanwhile: done");
        assert!(trims.start(&t, 4), "and the next one starts at once");
        assert_eq!(trims.ended(&u), None);
    }
}
