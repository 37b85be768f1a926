//! The link's side of its role ([`crate::ha::role`]): reading and authenticating the control
//! records, carrying out what the role decides (records, switches, park sessions), and
//! reporting who consumes the broker.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{Conn, Link};
use crate::ha::role::{Action, Now, Stale, SwitchWhy};
use crate::ha::{self, InstanceRecord, OwnerRecord};
use crate::message::Message;
use crate::metrics::{self, inc};
use crate::park::io as park;
use crate::seal::{ControlKind, Rejected};
use crate::topics::ControlTopic;

impl Link {
    /// A control record arrived: authenticated, checked for freshness, and handed to the role.
    pub(super) fn on_control(&mut self, conn: &mut Conn, msg: &Message) {
        let Some(topic) = msg.topic_str() else { return };
        tracing::trace!(topic, retained = msg.retain, "control record");
        let parsed = self.ctx.ha.control.parse(topic);
        let kind = match parsed {
            Some(ControlTopic::Instance(_)) => ControlKind::Instance,
            Some(ControlTopic::Owner(_)) => ControlKind::Owner,
            Some(ControlTopic::Echo) => ControlKind::Echo,
            None => return,
        };
        let now = Now::read();
        if msg.payload.is_empty() {
            // A retained record deleted: nothing to authenticate, nothing to believe.
            if let Some(ControlTopic::Instance(name)) = parsed {
                let actions = self.role.instance(name, None, msg.retain, now);
                self.carry_out(Some(conn), actions);
            }
            return;
        }
        let rejected =
            |why: Rejected| metrics::control_rejected(&self.ctx.stats, kind, &msg.topic, why);
        let (body, sealed_at) = match self.ctx.ha.open(&msg.topic, &msg.payload) {
            Ok(opened) => opened,
            Err(why) => return rejected(why),
        };
        let actions = match parsed {
            Some(ControlTopic::Instance(name)) => {
                let record = serde_json::from_slice::<InstanceRecord>(body).ok();
                if record.is_none() {
                    debug!(topic, "unreadable instance record ignored");
                }
                // A live record is refreshed every HEARTBEAT: an old one is a replay. (A Will,
                // `alive: false`, was sealed when its connection began and may fire any time.)
                let alive = record.as_ref().is_some_and(|r| r.alive);
                if alive && sealed_at.is_some_and(|t| !fresh(t, ha::LIVENESS)) {
                    return rejected(Rejected::Stale);
                }
                self.role.instance(name, record, msg.retain, now)
            }
            Some(ControlTopic::Echo) => {
                // Another instance is about to publish this message here: its echo is not a
                // client's message. A note older than the echo window is a replay.
                if sealed_at.is_some_and(|t| !fresh(t, self.ctx.dedup_window)) {
                    return rejected(Rejected::Stale);
                }
                // Only another live instance of the mesh writes notes (a 3.1.1 link, or the
                // 3.1.1 lane of an MQTT 5 link): with no peer, a note is not the mesh's, and
                // must not make this link drop a message (a mesh of one process needs no key
                // for that).
                if let (true, Ok(fp)) = (self.role.has_peers(now), <[u8; 8]>::try_from(body)) {
                    self.peer_echo.record(u64::from_be_bytes(fp), now.at);
                }
                return;
            }
            Some(ControlTopic::Owner(broker)) if broker == &*self.ctx.name => {
                let record = serde_json::from_slice::<OwnerRecord>(body).ok();
                match self.role.owner(record, sealed_at, msg.retain, now) {
                    Ok(actions) => actions,
                    Err(Stale) => return rejected(Rejected::Stale),
                }
            }
            _ => return,
        };
        self.carry_out(Some(conn), actions);
    }

    /// Every [`Policy::check`](crate::policy::Policy::check) while coordinating.
    pub(super) fn ha_tick(&mut self, conn: &mut Conn) {
        let actions = self.role.tick(Now::read());
        self.carry_out(Some(conn), actions);
    }

    /// Carries out what the role decided (on the connection, when there is one), then reports
    /// who consumes the broker.
    pub(super) fn carry_out(&mut self, mut conn: Option<&mut Conn>, actions: Vec<Action>) {
        for action in actions {
            self.carry_out_one(conn.as_deref_mut(), action);
        }
        self.report();
    }

    fn carry_out_one(&mut self, conn: Option<&mut Conn>, action: Action) {
        let stats = &self.ctx.stats;
        match action {
            Action::ForgetPacketIds => self.release_first.clear(),
            Action::ForgetSubscriptions => {
                // Taking the session (back) over: another process may have used it meanwhile,
                // with its own subscriptions and packet ids.
                self.subscribed = None;
                self.pkid_high = None;
            }
            Action::ForgetParks => self.drains.forget(),
            Action::StopWaitingForParks => self.drains.stop_waiting(),
            Action::ProbesOff => self.probes = false,
            Action::CheckParkTargets => self.parks_for_new_targets(),
            Action::SessionTaken(ago) => metrics::session_taken(stats, ago),
            Action::Switch(why) => inc(match why {
                SwitchWhy::TakeOver => &stats.takeovers,
                SwitchWhy::StepDown { .. } => &stats.step_downs,
                SwitchWhy::HandOver { .. } => &stats.handovers,
            }),
            Action::Impostor => {
                let error = format!(
                    "another process announces itself as instance {:?}: give every process of the mesh its own [bridge] instance",
                    self.ctx.ha.identity.instance
                );
                tracing::error!(%error);
                stats.set_error(error);
            }
            Action::ReadParks => {
                self.read_parks();
                // (None to read: the role goes on at once.)
                self.on_parks_read(conn);
            }
            Action::SubscribeControl => {
                let Some(conn) = conn else { return };
                match conn
                    .client
                    .subscribe_records(&self.ctx.ha.control.filters(), 0)
                {
                    Ok(()) => conn.control_suback = true,
                    Err(e) => warn!(error = %e, "control subscription could not be queued"),
                }
            }
            Action::Announce { alive } => {
                if let Some(conn) = conn {
                    self.announce(conn, alive);
                }
            }
            Action::WriteOwner { record, handover } => {
                if handover {
                    inc(&stats.handovers);
                }
                if let Some(conn) = conn {
                    self.write_owner(conn, &record);
                    if record.released {
                        info!("ownership released");
                    }
                }
            }
        }
    }

    /// Reports who consumes the broker, and ownership as this link sees it, on its `watch`.
    pub(super) fn report(&self) {
        let now = Now::read();
        let consumer = self.role.consumer_now(now);
        let status = self.role.status(now);
        self.ctx
            .consumption
            .send_if_modified(|c| c.report(consumer, status));
    }

    /// The park sessions a takeover waits for are read (a drain ended); the role goes on.
    pub(super) fn on_parks_read(&mut self, conn: Option<&mut Conn>) {
        if self.drains.all_read() {
            let actions = self.role.parks_read(Now::read());
            self.carry_out(conn, actions);
        }
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
            .publish_record(&topic, payload, 0, 0, true, expiry)
            .is_ok()
        {
            conn.flight.handed_control();
            if alive {
                self.role.announced(Now::read());
            }
        }
    }

    /// Writes the broker's owner record.
    fn write_owner(&self, conn: &mut Conn, record: &OwnerRecord) {
        let ha = &self.ctx.ha;
        let topic = ha.control.owner_topic(&self.ctx.name);
        let payload = ha.seal(&topic, serde_json::to_vec(record).unwrap_or_default());
        if conn
            .client
            .publish_record(&topic, payload, 0, 0, true, None)
            .is_ok()
        {
            conn.flight.handed_control();
        }
    }

    /// Starts reading every park session on this broker into its target (a takeover).
    fn read_parks(&mut self) {
        if self.ctx.parker.is_none() {
            return;
        }
        let me = self.ctx.name.clone();
        let targets: Vec<Arc<str>> = self
            .ctx
            .router
            .names()
            .into_iter()
            .filter(|t| *t != me)
            .collect();
        for (target, read_all) in self.drains.start(targets) {
            self.spawn_park_drain(target, read_all, false);
        }
    }

    /// Starts the drain of this broker's park session for `target`; `joined`: the target
    /// joined the mesh while this process ran (see [`park::ParkContext::joined`]).
    fn spawn_park_drain(
        &mut self,
        target: Arc<str>,
        read_all: tokio::sync::oneshot::Sender<()>,
        joined: bool,
    ) {
        if let Some(mut ctx) = self.park_context(target) {
            ctx.joined = joined;
            tokio::spawn(park::recover(ctx, read_all));
        }
    }

    /// The context of a park task for `target` on this broker (`None` without parking).
    pub(super) fn park_context(&self, target: Arc<str>) -> Option<park::ParkContext> {
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
        let (joined, left) = self.drains.changes(&names, &self.ctx.name);
        for (target, read_all) in joined {
            self.spawn_park_drain(target, read_all, true);
        }
        for target in left {
            if let Some(ctx) = self.park_context(target) {
                tokio::spawn(park::discard(ctx));
            }
        }
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

fn record_bytes(record: &InstanceRecord) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}
