//! The origin side of a link: what it takes from its broker (loop prevention, the broker's
//! `in` rules) into the fan-out, and the acknowledgements it owes the broker for it.

use std::time::Instant;

use tracing::debug;

use super::Link;
use super::session::Client;
use crate::dedup::{StormVerdict, fingerprint};
use crate::ha;
use crate::message::{AckRequest, Message};
use crate::metrics::{self, inc};

impl Link {
    /// Whether a message from the broker is taken now, with the acknowledgement it owes. Not
    /// while stopping or changing role (unacknowledged, the broker keeps it for the session's
    /// next connection, ours or the next owner's), nor a redelivery after a reconnect while the
    /// first copy is still on its way (the first copy's acknowledgement covers it).
    pub(super) fn take_in(&mut self, ack: Option<AckRequest>) -> Option<Option<AckRequest>> {
        if self.ctx.stop.is_cancelled() || self.role.switching() {
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

    /// Whether `msg` (fingerprint `fp`) is the echo of what this link (a 3.1.1 link, or its
    /// 3.1.1 lane, see [`super::spread`]) or another instance (its echo note) published here;
    /// taken out of its window if so. Where neither expects an echo (an MQTT 5 link without
    /// a 3.1.1 lane, in a mesh of one process), nothing is looked up.
    pub(super) fn take_311_echo(&mut self, fp: u64, msg: &Message, now: Instant) -> bool {
        (!self.echo.is_empty() && self.echo.take_echo(fp, now))
            || (!self.peer_echo.is_empty()
                && self
                    .peer_echo
                    .take_echo(ha::portable_fingerprint(&msg.topic, &msg.payload), now))
    }

    pub(super) fn on_publish(&mut self, msg: Message, ack: Option<AckRequest>) {
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
        let now = self.now;
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
            .and_then(|t| self.ctx.queue.in_rules(|r| r.inbound(t)))
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
    pub(super) fn on_probe(&mut self, msg: Message, ack: Option<AckRequest>) {
        let Some(ack) = self.take_in(ack) else {
            return;
        };
        // Due at once (in order behind what came before it), forwarded or not: a probe
        // measures a path and carries nothing worth holding the origin for. Held until a
        // frozen target took it, it would hold every message received after it, as
        // acknowledgements go in order.
        self.complete_opt(ack);
        let fp = fingerprint(&msg.topic, &msg.payload);
        if msg.has_origin_tag() || self.take_311_echo(fp, &msg, self.now) {
            return;
        }
        self.ctx.router.forward_probe(&self.ctx.name, msg);
    }

    pub(super) fn complete_opt(&mut self, ack: Option<AckRequest>) {
        if let Some(a) = ack {
            self.complete(a);
        }
    }

    /// Every target is done with a received message.
    pub(super) fn complete(&mut self, ack: AckRequest) {
        self.acks.complete(ack);
    }

    /// Takes every completion the targets reported so far: after each wake for one, and
    /// before a last flush.
    pub(super) fn take_completions(&mut self) {
        while let Some(ack) = self.acks_rx.try_recv() {
            self.complete(ack);
        }
    }

    pub(super) fn flush_acks(&mut self, client: &Client) {
        while let Some(ack) = self.acks.next_due() {
            if client.ack(ack).is_err() {
                // Retried after the next event.
                break;
            }
            self.acks.handed();
        }
    }
}
