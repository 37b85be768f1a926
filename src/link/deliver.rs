//! The target side of a link: what it publishes to its broker from its queue, within its
//! window, mapped by the broker's `out` rules; what it sets aside (a message the broker cannot
//! take); when it moves what waits to the spool (a stalled target).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tracing::{debug, info, warn};

use super::session::{self, SendError};
use super::spread::Route;
use super::{Conn, Link};
use crate::dedup::fingerprint;
use crate::ha;
use crate::message::{Message, Protocol};
use crate::metrics::{self, inc};
use crate::router::Outbound;

/// Messages taken from the queue at a time while filling the window.
const FILL_BATCH: usize = 256;

impl Link {
    /// Connected, with room in the in-flight window, not changing role.
    pub(super) fn has_room(&self, conn: &Conn) -> bool {
        conn.connected.is_some() && !self.role.switching() && conn.outstanding() < self.room(conn)
    }

    /// What the connection and its lanes take in flight together.
    fn room(&self, conn: &Conn) -> usize {
        self.window(conn) + conn.spread.as_ref().map_or(0, |s| s.window())
    }

    /// The in-flight window: what the path takes (see [`super::window`]), or 1 while finding
    /// a message the broker refuses (see [`super::poison`]).
    pub(super) fn window(&self, conn: &Conn) -> usize {
        self.poison.window(conn.pace.size())
    }

    /// Publishes from the queue up to the in-flight window. True when it published and the
    /// client took everything (fill again before waiting); false when there was nothing, or
    /// the client refused: the rest went back, in order, to be retried after the next event
    /// (retrying at once would spin without ever reading that event). With lanes (see
    /// [`super::spread`]), a message whose connection is full is held back and the others go
    /// on, but for the later ones of its topic, which are held with it: a later one could find
    /// room where it did not (a message without properties on the 3.1.1 lane, where one with
    /// properties may not go) and overtake it. What was held goes back in front, in order.
    /// While the broker has a backlog in the spool, `drain_rate` bounds what goes out (see
    /// [`super::drain`]).
    pub(super) fn fill_window(&mut self, conn: &mut Conn) -> bool {
        // One clock read for the batch (the client writes it at once), and none when the queue
        // had nothing: most calls, at a low rate.
        let mut clock = None;
        let mut free = self.room(conn).saturating_sub(conn.outstanding());
        let paced = self.paced();
        if let (true, Some(pace)) = (paced, &mut self.drain_pace) {
            free = free.min(pace.allowed(*clock.insert(Instant::now())));
        }
        let mut batch = std::mem::take(&mut conn.batch);
        let mut taken = 0;
        let mut stopped = false;
        let mut held = Vec::new();
        // Topics with a message held in this pass: later ones of the topic are held too (see
        // above). Allocated only once a message is held.
        let mut held_topics: Option<HashSet<Bytes, ahash::RandomState>> = None;
        // Taken from the queue `FILL_BATCH` at a time: a window that opens by thousands (a
        // long path) would otherwise leave the batch's buffer that large for good, beside the
        // queue's and the flight's. A backlog in the spool is read in one piece, as before:
        // each read is a transaction (in pieces of 256 a drain after an outage went 15 %
        // slower).
        let piece = if self.ctx.queue.spool_readable() > 0 {
            free
        } else {
            FILL_BATCH
        };
        'fill: while free > 0 {
            let want = free.min(piece);
            self.ctx.queue.take(want, &mut batch);
            let n = batch.len();
            if n == 0 {
                break;
            }
            let now = *clock.get_or_insert_with(Instant::now);
            taken += n;
            free -= n;
            let mut items = batch.drain(..);
            while let Some(item) = items.next() {
                if held_topics
                    .as_ref()
                    .is_some_and(|t| t.contains(&item.msg.topic))
                {
                    held.push(item);
                    continue;
                }
                match self.publish(conn, item, now) {
                    Ok(()) => {}
                    Err(NotSent::Held(item)) => {
                        held_topics
                            .get_or_insert_with(HashSet::default)
                            .insert(item.msg.topic.clone());
                        held.push(item);
                    }
                    Err(NotSent::Stop(item)) => {
                        held.push(item);
                        held.extend(items);
                        stopped = true;
                        break 'fill;
                    }
                }
            }
            if n < want {
                break;
            }
        }
        conn.batch = batch;
        super::threads::worked(taken);
        self.spend_drain(paced, taken - held.len());
        if stopped {
            self.ctx.queue.requeue_front(held);
            return false;
        }
        if taken > 0 {
            self.update_gauges(conn);
        }
        if held.is_empty() {
            return taken > 0;
        }
        self.ctx.queue.requeue_front(held);
        false
    }

    /// Whether what goes out now keeps to `drain_rate`: set, and a backlog in the spool.
    pub(super) fn paced(&self) -> bool {
        self.drain_pace.is_some() && self.ctx.queue.spool_readable() > 0
    }

    /// `n` messages went out while [`Link::paced`].
    fn spend_drain(&mut self, paced: bool, n: usize) {
        if let (true, Some(pace)) = (paced, &mut self.drain_pace) {
            pace.spent(n);
        }
    }

    /// Hands `item` to the client at `now` (or finishes it when the target cannot take it);
    /// gives it back when the client's request channel is full or closed, or when its
    /// connection is full.
    pub(super) fn publish(
        &mut self,
        conn: &mut Conn,
        item: Outbound,
        now: Instant,
    ) -> Result<(), NotSent> {
        let broker = &self.ctx.settings.broker;
        // With lanes, a message that goes out at QoS 1 (unless a rule caps it to 0) is routed
        // first, and held back before the rules and its properties are worked out: it waits
        // for its topic's connection at every pass until that has room. (One a rule caps to
        // QoS 0 would not have to wait; it waits a little longer.)
        let qos1_route = (conn.spread.is_some() && item.msg.qos.min(broker.max_qos) == 1)
            .then(|| self.route(conn, &item, 1));
        if qos1_route == Some(Route::Wait) {
            return Err(NotSent::Held(item));
        }
        let Some((topic, qos_cap)) = self.map_out(&item) else {
            self.finish(item);
            return Ok(());
        };
        let qos = item.msg.qos.min(broker.max_qos).min(qos_cap);
        if qos == 2 && conn.flight.outstanding() >= usize::from(self.ctx.settings.inflight) {
            // QoS 2 keeps to `inflight` in flight, whatever the path: a 3.1.1 broker announces
            // no limit, and one that holds fewer QoS 2 messages awaiting PUBREL than the window
            // lost some across a kill -9 (tests/resilience.rs) once the window grew past it.
            // Sent once what is in flight is acknowledged.
            return Err(if conn.spread.is_some() {
                NotSent::Held(item)
            } else {
                NotSent::Stop(item)
            });
        }
        if let Some(reason) = self.unsendable(conn, &item, &topic) {
            self.set_aside(item, &reason);
            return Ok(());
        }
        let v311 = broker.protocol == Protocol::V311;
        let route = match qos1_route {
            // Nothing has changed the lanes since.
            Some(route) if qos == 1 => route,
            _ => self.route(conn, &item, qos),
        };
        match route {
            Route::Own => {}
            Route::Wait => return Err(NotSent::Held(item)),
            Route::Lane(lane) => {
                let topic = topic.into_owned();
                return self.hand_to_lane(conn, lane, item, topic, now);
            }
        }
        let properties = self.properties_for(&item);
        if v311
            && !self.role.consumer()
            && self.role.coordinates()
            && !self.note_echo(conn, &topic, &item)
        {
            return Err(NotSent::Stop(item));
        }
        // QoS 1/2 publishes are numbered here, within the ids rumqttc keeps room for.
        let pkid = match qos {
            0 => 0,
            _ => match conn.flight.free_id(self.ctx.settings.inflight_max) {
                Some(id) => id,
                None => return Err(NotSent::Stop(item)),
            },
        };
        if let Err(SendError::Full | SendError::Closed) = conn
            .client
            .publish(&item.msg, &topic, qos, pkid, properties)
        {
            return Err(NotSent::Stop(item));
        }
        if v311 {
            // The echo comes back on the broker's topic, as published.
            self.echo
                .record(fingerprint(topic.as_bytes(), &item.msg.payload), now);
        }
        self.handed(conn, item, qos, pkid, now);
        Ok(())
    }

    /// Where `item`, at `qos`, goes out: with lanes (see [`super::spread`]) a QoS 1 message
    /// where its topic is in flight, or where there is most room; everything else (and
    /// everything without lanes) on the link's own connection.
    fn route(&self, conn: &mut Conn, item: &Outbound, qos: u8) -> Route {
        if conn.spread.is_none() {
            return Route::Own;
        }
        let own_free = self.window(conn).saturating_sub(conn.flight.outstanding());
        match &mut conn.spread {
            Some(spread) if qos == 1 => {
                let plain = !item.probe && item.msg.plain();
                spread.route(&item.msg.topic, own_free, plain)
            }
            _ if own_free > 0 => Route::Own,
            _ => Route::Wait,
        }
    }

    /// The client took `item` as packet `pkid` (0: QoS 0) at `now`: in flight until the
    /// broker acknowledges it (or, QoS 0, until written).
    fn handed(&mut self, conn: &mut Conn, item: Outbound, qos: u8, pkid: u16, now: Instant) {
        if pkid == 0 {
            conn.flight.handed_unnumbered(item);
            return;
        }
        if let (Some(spread), 1) = (&mut conn.spread, qos) {
            spread.own_sent(&item.msg.topic, pkid);
        }
        if let Some(old) = conn.flight.handed_numbered(pkid, item) {
            // Never expected (the id was free): the older message would hold its origin's
            // acknowledgement forever; send it again (a duplicate at worst).
            warn!(
                pkid,
                "packet id handed out twice; the older message is sent again"
            );
            self.ctx.queue.requeue_front(vec![old]);
        }
        conn.pace.written(pkid, now, conn.flight.inflight());
        // The ids of the persistent session only: a publisher's clean session leaves nothing
        // in the broker to release.
        if self.role.consumer() {
            self.pkid_high = Some(self.pkid_high.unwrap_or(0).max(pkid));
        }
    }

    /// Hands `item` to lane `lane` of `conn` (see [`super::spread`]), to go out on `topic` at
    /// `now`. On a 3.1.1 lane without properties, and its echo, which comes back on the link's
    /// subscription without an origin tag, is expected by its fingerprint.
    fn hand_to_lane(
        &mut self,
        conn: &mut Conn,
        lane: usize,
        item: Outbound,
        topic: String,
        now: Instant,
    ) -> Result<(), NotSent> {
        let Some(spread) = &mut conn.spread else {
            return Err(NotSent::Held(item));
        };
        let v311 = spread.v311(lane);
        let properties = if v311 {
            None
        } else {
            self.properties_for(&item)
        };
        // The 3.1.1 lane's echo carries no origin tag. Where this process consumes the broker
        // it comes back to this link, which knows it by its fingerprint; where another one
        // does, the lane first publishes an echo note for it on the same connection (as a
        // 3.1.1 link does, see `note_echo`), so the note arrives first.
        let consumer = self.role.consumer();
        let fp = (v311 && consumer).then(|| fingerprint(topic.as_bytes(), &item.msg.payload));
        let note = (v311 && !consumer).then(|| self.echo_note(&topic, &item));
        let msg = item.msg.clone();
        spread
            .hand(lane, item, msg, topic, properties, note)
            .map_err(NotSent::Held)?;
        if let Some(fp) = fp {
            self.echo.record(fp, now);
        }
        Ok(())
    }

    /// The MQTT 5 properties `item` goes out with (its own and the origin tag); `None` on a
    /// 3.1.1 broker.
    fn properties_for(&mut self, item: &Outbound) -> Option<Arc<PublishProperties>> {
        if self.ctx.settings.broker.protocol == Protocol::V311 {
            return None;
        }
        if !self.tags.contains_key(&item.origin) {
            let tag = format!("{}/{}", self.ctx.bridge_id, item.origin);
            self.tags
                .insert(item.origin.clone(), Message::tag_only(&tag));
        }
        Some(item.msg.forward_properties(&self.tags[&item.origin]))
    }

    /// The topic and QoS cap `item` goes out with, through the broker's first matching `out`
    /// rule (the fan-out only queues what one takes; a spooled message may predate a rule
    /// change); `None` when it does not go out (counted).
    fn map_out<'a>(&self, item: &'a Outbound) -> Option<(std::borrow::Cow<'a, str>, u8)> {
        let Some(topic) = item.msg.topic_str() else {
            metrics::message_rejected(&self.ctx.stats, &item.msg.topic, "topic is not UTF-8");
            return None;
        };
        if item.probe {
            // Probes measure the path, not the rules; a broker that refuses `$` topics (see
            // `probe_drops`) would close the connection on one.
            return self
                .probes
                .then_some((std::borrow::Cow::Borrowed(topic), 2));
        }
        match self.ctx.queue.in_rules(|r| r.outbound(topic)) {
            Some(m) => Some((m.topic, m.qos_cap)),
            None => {
                inc(&self.ctx.stats.dropped_unmatched);
                None
            }
        }
    }

    /// On a 3.1.1 broker another instance may consume: tells it that what this link publishes
    /// next is an echo (a 3.1.1 message carries no origin tag). Same connection, so the note
    /// arrives first. False when the client cannot take it now.
    fn note_echo(&mut self, conn: &mut Conn, topic: &str, item: &Outbound) -> bool {
        let (note, payload) = self.echo_note(topic, item);
        let queued = conn
            .client
            .publish_record(&note, payload, 0, 0, false, None)
            .is_ok();
        if queued {
            conn.flight.handed_control();
        }
        queued
    }

    /// The echo note (its topic and sealed body) that tells another instance consuming this
    /// broker that `item`, published on `topic`, is the mesh's: its portable fingerprint.
    fn echo_note(&self, topic: &str, item: &Outbound) -> (String, Vec<u8>) {
        let fp = ha::portable_fingerprint(topic.as_bytes(), &item.msg.payload);
        let note = self.ctx.ha.control.echo_topic();
        let body = self.ctx.ha.seal(&note, fp.to_be_bytes().to_vec());
        (note, body)
    }

    /// Why `item`, mapped to `topic`, cannot be sent to this broker, if it cannot: a topic
    /// longer than MQTT allows, a packet over the maximum the broker announced, or the message
    /// the broker closed the last connections on (see [`super::poison`]).
    pub(super) fn unsendable(&self, conn: &Conn, item: &Outbound, topic: &str) -> Option<String> {
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
    pub(super) fn set_aside(&mut self, item: Outbound, reason: &str) {
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
    pub(super) fn evacuate(&mut self, conn: &mut Conn, why: &str) {
        let mut items = conn.flight.all_mut();
        if let Some(spread) = &mut conn.spread {
            items.extend(spread.all_mut());
        }
        let moved = self.ctx.queue.evacuate(&mut items);
        if moved > 0 {
            info!(
                moved,
                reason = why,
                "target slow: waiting messages moved to the spool"
            );
        }
    }

    /// Every [`Policy::stall_check`](crate::policy::Policy::stall_check): a target that finishes
    /// nothing for `stalled_checks` checks in a row while messages wait on it (frozen process,
    /// stalled network) stops holding the origins. And every `mark_every` while it makes
    /// progress, markers behind the copies parked for it let the origins'
    /// owners discard those it has now (see [`crate::router::TargetQueue::mark_copies`]): a
    /// target whose connections last a few seconds (restarts, takeovers) still gets its copies
    /// trimmed.
    pub(super) fn stall_tick(&mut self, conn: &mut Conn) {
        if conn.connected.is_some()
            && self.finished != self.marked.0
            && self.marked.1.elapsed() >= self.policy.mark_every
        {
            self.ctx.queue.mark_copies(true);
            self.marked = (self.finished, Instant::now());
        }
        if conn.connected.is_some() && conn.outstanding() > 0 && self.finished == conn.last_finished
        {
            conn.stalled_checks += 1;
            // Again on every check while it stays stalled: what arrived since (while its
            // spool was still empty) must not hold its origins either.
            if conn.stalled_checks >= self.policy.stalled_checks {
                self.evacuate(conn, "it acknowledged nothing for a while");
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
    pub(super) fn spool_tick(&self, conn: &Conn) {
        let idle = conn.connected.is_some() && conn.outstanding() == 0 && self.ctx.queue.is_empty();
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
            awaiting_write = conn.flight.awaiting_write(),
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

    /// With parking, every spooled message of this target has a copy in a park session on its
    /// origin broker: the spool's depth bounds each session's. Reported (log, metrics) when it
    /// nears the brokers' queue limit, beyond which a broker drops copies (mosquitto
    /// `max_queued_messages`, default 1000).
    pub(super) fn park_depth_check(&self) {
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
    pub(super) fn finish(&mut self, item: Outbound) {
        if self.poison.active() {
            self.poison.done(poison_id(&item));
        }
        self.finished += 1;
        self.ctx.queue.finish(item);
    }

    pub(super) fn acknowledged(&mut self, item: Outbound, result: Result<(), session::Refused>) {
        match result {
            Ok(()) if item.probe => {}
            Ok(()) => inc(&self.ctx.stats.messages_out),
            Err(reason) => metrics::message_rejected(&self.ctx.stats, &item.msg.topic, &reason.0),
        }
        self.finish(item);
    }

    pub(super) fn update_gauges(&self, conn: &Conn) {
        let s = &self.ctx.stats;
        s.inflight.store(
            conn.outstanding() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        s.window.store(conn.pace.size() as i64, relaxed);
        let connections = conn.spread.as_ref().map_or(1, |s| s.connections());
        s.publish_connections.store(connections as i64, relaxed);
        s.dedup_entries.store(self.echo.len() as i64, relaxed);
        s.dedup_bytes
            .store(self.echo.approx_bytes() as i64, relaxed);
        s.dedup_evictions.store(self.echo.evictions(), relaxed);
        s.dedup_expirations.store(self.echo.expirations(), relaxed);
    }
}

/// Why [`Link::publish`] gave a message back.
pub(super) enum NotSent {
    /// The client takes nothing more now: stop filling until the next event.
    Stop(Outbound),
    /// With lanes: its connection is full; the others may still take theirs.
    Held(Outbound),
}

/// Longest topic MQTT can carry (a two-byte length).
const MAX_TOPIC: usize = u16::MAX as usize;

/// What the poison watch knows a message by: its topic and payload (see [`super::poison`]).
pub(super) fn poison_id(item: &Outbound) -> u64 {
    fingerprint(&item.msg.topic, &item.msg.payload)
}
