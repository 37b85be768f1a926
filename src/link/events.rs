//! What a link does with the events of its connection: the CONNACK, what was written, the
//! acknowledgements, the SUBACKs; and the subscriptions the broker's rules want.

use std::time::Instant;

use tracing::{debug, info, warn};

use super::outflight::Written;
use super::session::{Client, LinkEvent, Session};
use super::spread::LaneEvent;
use super::{Conn, Link, Outcome, uptime};
use crate::ha::role::Now;
use crate::message::Protocol;
use crate::metrics::{self, inc};

/// Events a link takes in one go: what the driver reported while the link was busy (a burst
/// of acknowledgements and messages) costs one wake, and one pass of housekeeping and filling
/// the window, instead of one per event. Bounded so that due acknowledgements and the window
/// are seen to at least every this many events.
const EVENT_BATCH: usize = 64;

impl Link {
    /// `first`, the event just received, and up to [`EVENT_BATCH`] in all of those already
    /// waiting behind it. The end of the connection, if one of them says so.
    pub(super) fn on_events(
        &mut self,
        conn: &mut Conn,
        first: Option<LinkEvent>,
        session: &mut Session,
    ) -> Option<Outcome> {
        self.now = Instant::now();
        let mut handled = 0;
        let end = batch(
            first,
            || session.try_event(),
            EVENT_BATCH,
            |event| {
                handled += 1;
                self.take_event(conn, event)
            },
        );
        super::threads::worked(handled);
        self.update_gauges(conn);
        end
    }

    /// One event, or the end of the channel (`None`): the end of the connection, if it is one.
    fn take_event(&mut self, conn: &mut Conn, event: Option<LinkEvent>) -> Option<Outcome> {
        match event {
            None => Some(Outcome::Lost {
                error: "connection task ended".into(),
                uptime: uptime(conn),
                peer_closed: false,
            }),
            Some(LinkEvent::Closed(error)) => Some(Outcome::Lost {
                error,
                uptime: uptime(conn),
                peer_closed: conn.peer_closed,
            }),
            Some(event) => {
                self.on_event(conn, event);
                None
            }
        }
    }

    /// One event of the connection.
    fn on_event(&mut self, conn: &mut Conn, event: LinkEvent) {
        match event {
            LinkEvent::Connected {
                session_present,
                max_packet_size,
                receive_max,
            } => {
                if let Some(max) = receive_max {
                    // The broker takes no more at once (a stricter one disconnects).
                    conn.pace.cap_at(usize::from(max));
                }
                self.on_connected(conn, session_present, max_packet_size)
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
            LinkEvent::Written => self.on_written(conn),
            LinkEvent::PubAck(pkid, result) | LinkEvent::PubRec(pkid, result @ Err(_)) => {
                if pace(conn, pkid, self.now) {
                    self.held_back(conn);
                }
                match conn.flight.acknowledged(pkid) {
                    Some(item) => {
                        if let Some(spread) = &mut conn.spread {
                            spread.own_acked(pkid, &item.msg.topic);
                        }
                        self.acknowledged(item, result)
                    }
                    None => debug!(pkid, "acknowledgement for a packet id not in flight"),
                }
            }
            LinkEvent::PubRec(pkid, Ok(())) => {
                if pace(conn, pkid, self.now) {
                    self.held_back(conn);
                }
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
            LinkEvent::SubAck(failures) => self.on_suback(conn, failures),
            LinkEvent::PeerClosed => conn.peer_closed = true,
            LinkEvent::Closed(_) => {}
        }
    }

    /// The broker accepted the connection: control records, then the rules' subscriptions.
    fn on_connected(&mut self, conn: &mut Conn, session_present: bool, max_packet: Option<u32>) {
        if !session_present {
            // The broker has no memory of us: packet ids of the old session mean nothing.
            self.acks.new_session();
        }
        let consumer = self.role.consumer();
        if consumer {
            if !session_present && self.had_session && !self.ctx.settings.session_expiry.is_zero() {
                metrics::session_lost(&self.ctx.stats);
            }
            self.had_session = true;
        }
        conn.connected = Some(Instant::now());
        conn.max_packet = max_packet;
        let role = if consumer { "owner" } else { "publisher" };
        info!(session_present, role, "connected");
        let actions = self.role.connected(Now::read());
        self.carry_out(Some(conn), actions);
        if consumer {
            self.subscribe_rules(conn, session_present);
        }
        self.ctx.queue.set_connected(true);
        self.set_lane_open(true);
        self.ctx.stats.clear_error();
        self.ctx.stats.set_state(metrics::LinkState::Connected);
    }

    /// The client wrote a QoS 0 publish.
    fn on_written(&mut self, conn: &mut Conn) {
        match conn.flight.written_unnumbered() {
            Written::Done(item) => {
                // Never acknowledged; not counted as delivered.
                self.finish(item);
                inc(&self.ctx.stats.sent_qos0);
            }
            Written::Control => {}
            Written::Unexpected => warn!("QoS 0 publish reported written with none waiting"),
        }
    }

    /// A SUBACK: they come in the order the subscriptions were queued (control, rules, probes).
    fn on_suback(&mut self, conn: &mut Conn, failures: Vec<String>) {
        if conn.control_suback {
            conn.control_suback = false;
            if !failures.is_empty() {
                let error = format!(
                    "control subscription {:?} refused ({}): this instance cannot see the \
                     others; allow it in the broker's ACL",
                    self.ctx.ha.control.filters(),
                    failures.join(", ")
                );
                warn!(%error);
                let actions = self.role.control_refused(Now::read());
                self.carry_out(Some(conn), actions);
            }
        } else if conn.rule_subacks == 0 && conn.probe_suback {
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
        } else {
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
    }

    /// Every subscription the rules want is in place on this consuming connection: the broker
    /// delivers to it from now on (see [`crate::ha::role::Role::subscribed`]).
    fn subscriptions_in_place(&mut self, conn: &mut Conn) {
        let actions = self.role.subscribed(Now::read());
        self.carry_out(Some(conn), actions);
    }

    /// A consuming connection subscribes what the rules want.
    pub(super) fn subscribe_rules(&mut self, conn: &mut Conn, session_present: bool) {
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

    /// The rules changed (a reload): subscribe what they want now and unsubscribe what they no
    /// longer want. What is queued or in flight is unaffected: a queued message is mapped by
    /// the rules in force when it is published.
    pub(super) fn apply_rule_change(&mut self, conn: &Conn) {
        let wanted = self.ctx.queue.rules().subscriptions();
        let have = self.subscribed.clone().unwrap_or_default();
        let (added, removed) = (missing(&wanted, &have), missing(&have, &wanted));
        info!(?added, ?removed, "topic rules changed");
        change_subscriptions(&conn.client, &added, &removed);
        self.subscribed = Some(wanted);
    }
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

/// Hands `first` (`None`: the channel closed) to `take`, then what `events` holds already
/// behind it, `max` in all, and stops at the first one `take` says ends the connection. An
/// event is taken from the channel only when `take` will have it: one taken and dropped at
/// the batch's end would be lost (a PUBACK lost holds its origin's acknowledgement forever).
fn batch<T, R>(
    first: Option<T>,
    mut waiting: impl FnMut() -> Option<T>,
    max: usize,
    mut take: impl FnMut(Option<T>) -> Option<R>,
) -> Option<R> {
    let mut end = take(first);
    for _ in 1..max {
        if end.is_some() {
            break;
        }
        // Nothing waiting, or the end: the next wait finds out which.
        let Some(event) = waiting() else { break };
        end = take(Some(event));
    }
    end
}

/// The broker acknowledged `pkid`: the window learns from it (see [`super::window`]). True,
/// once per connection, when the broker's Receive Maximum is found to hold a long path back.
fn pace(conn: &mut Conn, pkid: u16, now: Instant) -> bool {
    let before = conn.pace.size();
    conn.pace.acknowledged(pkid, now);
    if conn.pace.size() != before {
        debug!(
            window = conn.pace.size(),
            outstanding = conn.flight.outstanding(),
            "in-flight window"
        );
    }
    if conn.starved_said || conn.pace.starved().is_none() {
        return false;
    }
    conn.starved_said = true;
    true
}

impl Link {
    /// The broker's Receive Maximum holds this connection's long path back: said once, and
    /// on MQTT 5 more connections opened to publish on (see [`super::spread`]).
    fn held_back(&mut self, conn: &mut Conn) {
        let Some((max, rtt)) = conn.pace.starved() else {
            return;
        };
        let ms = rtt.as_secs_f64() * 1000.0;
        let rate = max as f64 / rtt.as_secs_f64();
        let settings = &self.ctx.settings;
        let extra = usize::from(settings.publish_connections).saturating_sub(1);
        let spread = extra > 0 && settings.broker.protocol == Protocol::V5;
        // The echo of what a 3.1.1 lane publishes is known by its fingerprint: on this link's
        // subscription where this process consumes the broker, by an echo note the lane
        // publishes first where another one does (see `Link::hand_to_lane`).
        let v311 = spread && settings.v311_lane;
        warn!(
            receive_maximum = max,
            round_trip_ms = ms.round(),
            publish_connections = if spread { extra + 1 } else { 1 },
            v311_lane = v311,
            "the broker takes at most {max} messages in flight per connection (its Receive \
             Maximum; mosquitto: max_inflight_messages, default 20) over a {ms:.0} ms round \
             trip: about {rate:.0} msg/s per connection{}; raise max_inflight_messages on the \
             broker (0: no limit; docs/FLOW.md)",
            match (spread, v311) {
                (true, true) => format!(
                    ", so this link publishes on {} connections (publish_connections), one of \
                     them MQTT 3.1.1 (no Receive Maximum) for the messages without MQTT 5 \
                     properties (v311_lane)",
                    extra + 1
                ),
                (true, false) => format!(
                    ", so this link publishes on {} connections (publish_connections)",
                    extra + 1
                ),
                _ => String::new(),
            }
        );
        if spread && conn.spread.is_none() {
            let instance = &self.ctx.ha.identity.instance;
            conn.spread = Some(super::spread::open(settings, instance, extra, v311));
        }
    }

    /// A report of lane `lane`.
    pub(super) fn on_lane_event(&mut self, conn: &mut Conn, lane: usize, event: LaneEvent) {
        let Some(spread) = &mut conn.spread else {
            return;
        };
        match event {
            LaneEvent::Up { tx, cap } => {
                debug!(lane, cap, "lane connected");
                spread.up(lane, tx, cap);
            }
            LaneEvent::Acked(seq, result) => {
                if let Some(item) = spread.acked(lane, seq) {
                    self.acknowledged(item, result);
                }
            }
            LaneEvent::Down(error) => {
                let items = spread.down(lane);
                warn!(
                    lane = lane + 1,
                    %error,
                    requeued = items.len(),
                    "a publishing connection ended; its topics go back to the link's own \
                     connection"
                );
                let relaxed = std::sync::atomic::Ordering::Relaxed;
                self.ctx
                    .stats
                    .redelivered
                    .fetch_add(items.len() as u64, relaxed);
                self.ctx.queue.requeue_front(items);
            }
        }
        self.update_gauges(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// Takes batches as the link does (one wait, then [`batch`]) until `end`, recording what
    /// each batch handed over.
    async fn batches(rx: &mut mpsc::Receiver<u32>, max: usize, end: u32) -> Vec<Vec<u32>> {
        let mut all = Vec::new();
        loop {
            let first = rx.recv().await;
            let mut seen = Vec::new();
            let ended = batch(
                first,
                || rx.try_recv().ok(),
                max,
                |e| {
                    seen.push(e?);
                    (e == Some(end)).then_some(())
                },
            );
            all.push(seen);
            if ended.is_some() {
                return all;
            }
        }
    }

    /// A channel holding the events `0..n` (its sender kept open).
    async fn holding(n: u32) -> (mpsc::Sender<u32>, mpsc::Receiver<u32>) {
        let (tx, rx) = mpsc::channel(1000);
        for i in 0..n {
            tx.send(i).await.unwrap();
        }
        (tx, rx)
    }

    #[tokio::test]
    async fn no_event_is_lost_at_a_batch_boundary() {
        let (_tx, mut rx) = holding(200).await;
        let all = batches(&mut rx, 64, 199).await;
        let sizes: Vec<usize> = all.iter().map(Vec::len).collect();
        assert_eq!(sizes, [64, 64, 64, 8]);
        let handed: Vec<u32> = all.into_iter().flatten().collect();
        assert_eq!(handed, (0..200).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_end_of_the_connection_ends_the_batch_and_leaves_the_rest_waiting() {
        let (_tx, mut rx) = holding(10).await;
        let all = batches(&mut rx, 64, 3).await;
        assert_eq!(all, [vec![0, 1, 2, 3]]);
        assert_eq!(rx.try_recv(), Ok(4));
    }

    #[tokio::test]
    async fn a_closed_channel_is_handed_over_as_the_end() {
        let (tx, mut rx) = mpsc::channel::<u32>(4);
        tx.send(7).await.unwrap();
        drop(tx);
        let mut seen = Vec::new();
        let first = rx.recv().await;
        let end = batch(
            first,
            || rx.try_recv().ok(),
            64,
            |e| {
                seen.push(e);
                e.is_none().then_some(())
            },
        );
        assert_eq!(end, None);
        assert_eq!(seen, [Some(7)]);
        // The next wait finds the channel closed.
        assert_eq!(
            batch(
                rx.recv().await,
                || rx.try_recv().ok(),
                64,
                |e| { e.is_none().then_some(()) }
            ),
            Some(())
        );
    }
}
