//! The role of one link on its broker: owner (it consumes the mesh's session) or publisher. A
//! pure state machine: the link tells it what happened (a connection began, a record arrived,
//! time passed, the connection ended) and carries out the [`Action`]s it returns (write a
//! record, change role, read the park sessions). Every timing rule is a field of
//! [`Policy`]; time comes in as [`Now`], so the tests below drive it with a clock of their own.
//!
//! What the records mean and who should own a broker is [`super::decide`]'s; this is how one
//! link acts on it, connection after connection:
//! - a publisher that [`Decision::Claim`]s writes an owner record (not again within
//!   [`Policy::claim_rest`]), and once it owns the broker reads the broker's park sessions
//!   (at most [`Policy::park_wait`]) before it switches to the consuming session;
//! - an owner that another live instance supersedes steps down, one that the rendezvous
//!   prefers a newcomer over hands the broker over (releasing it once what it has in flight is
//!   done, at most [`Policy::switch_timeout`]);
//! - a connection that cannot read its own record back within [`Policy::sync_timeout`] (or
//!   whose control subscription is refused) consumes the broker as a lone instance; a broker
//!   that ends [`Policy::unsynced_ends`] connections in a row before that is not coordinated on
//!   at all.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::{
    Consumer, Decision, HEARTBEAT, Identity, InstanceRecord, OwnerRecord, RoleStatus, Subscribed,
    View, decide,
};
use crate::policy::Policy;

/// A moment as the link's clocks read it: monotonic for timing, the wall clock for records.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    /// Monotonic.
    pub(crate) at: Instant,
    /// Milliseconds since the Unix epoch.
    pub(crate) unix_ms: u64,
}

impl Now {
    /// The clocks now.
    pub(crate) fn read() -> Self {
        Self {
            at: Instant::now(),
            unix_ms: super::unix_ms(),
        }
    }
}

/// Why a connection changes role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SwitchWhy {
    /// This instance owns the broker: it takes the mesh's session.
    TakeOver,
    /// Another live instance owns it: this one stops consuming.
    StepDown {
        /// The owner.
        owner: String,
    },
    /// An instance that joined is preferred: the owner releases the broker for it once what it
    /// has in flight is done.
    HandOver {
        /// The instance expected to claim it.
        to: String,
    },
}

/// What the link must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Subscribe the control topics ([`Role::control_refused`] on a refusal).
    SubscribeControl,
    /// Write this instance's record, alive (then [`Role::announced`] once queued) or gone.
    Announce {
        /// Alive, or gone (at shutdown).
        alive: bool,
    },
    /// Write the broker's owner record: a claim, a release, or a subscription note.
    WriteOwner {
        /// The record.
        record: OwnerRecord,
        /// A release for an instance that joined (counted as a handover).
        handover: bool,
    },
    /// Read the broker's park sessions into their targets; [`Role::parks_read`] once done.
    ReadParks,
    /// Stop waiting for the park sessions being read (they took [`Policy::park_wait`]).
    StopWaitingForParks,
    /// Forget which park sessions were read: the next takeover reads them again.
    ForgetParks,
    /// While consuming: targets that joined get their park session, those that left lose it.
    CheckParkTargets,
    /// Change role: take nothing new, finish what is in flight, then end the connection
    /// ([`Role::switch_ready`]) and come back in the other role.
    Switch(SwitchWhy),
    /// The broker closed the consuming connection this long ago, and no instance of the mesh
    /// took the session over: another client used the mesh's client id (or the broker
    /// restarted faster than the first reconnect).
    SessionTaken(Duration),
    /// Another process announces itself with this instance's name.
    Impostor,
    /// The packet ids the last connection left unacknowledged mean nothing to the next one (a
    /// session of its own).
    ForgetPacketIds,
    /// The next consuming connection takes over a session another process (or this one before
    /// a restart) may have used: its subscriptions are taken to be what the rules want, and
    /// any packet id up to `inflight_max` may wait for a PUBREL.
    ForgetSubscriptions,
    /// Subscribe no more probes on this broker (it refuses `$` topics).
    ProbesOff,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// To come back in the other role.
    Switched,
    /// Lost; `had_connack`: it was connected; `peer_closed`: the broker closed it.
    Lost {
        /// It got its CONNACK.
        had_connack: bool,
        /// The broker ended it itself.
        peer_closed: bool,
    },
    /// The process stops.
    Shutdown,
}

/// An owner record older than the newest this link accepted (beyond the clocks' skew): a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stale;

/// A connection changing role.
#[derive(Debug, Clone, Copy)]
struct Switch {
    since: Instant,
    /// Write a released owner record before leaving (a handover).
    release: bool,
}

/// The connection under way.
#[derive(Debug, Clone, Copy)]
struct Connection {
    /// It consumes the broker.
    consumer: bool,
    /// When it got its CONNACK.
    connected: Option<Instant>,
    /// Since when (ms since the epoch) it has every subscription the rules want in place.
    subscribed: Option<u64>,
}

/// Where a takeover stands with the broker's park sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parks {
    Unread,
    Reading { since: Instant },
    Read,
}

/// The role of one link (see the module documentation).
#[derive(Debug)]
pub(crate) struct Role {
    policy: Policy,
    me: Identity,
    broker: String,
    /// Copies are parked on the brokers: a takeover reads them first.
    parking: bool,
    /// The next (or current) connection consumes the broker.
    consumer: bool,
    /// Coordinate through control records: off with `[bridge] ha = false`, or on a broker that
    /// ended [`Policy::unsynced_ends`] connections in a row before they read their record back.
    coordinate: bool,
    view: View,
    /// When this link last wrote a claim or a release.
    claimed: Option<Instant>,
    switch: Option<Switch>,
    /// When the broker closed the consuming connection itself; cleared once the next
    /// connection read the records (or could not connect).
    closed_as_owner: Option<Instant>,
    /// When the alive record was last queued.
    announced: Option<Instant>,
    unsynced_ends: u32,
    /// The newest sealing time of an owner record accepted: kept across connections.
    owner_sealed: u64,
    stopping: bool,
    conn: Option<Connection>,
    parks: Parks,
}

impl Role {
    /// The role of `me`'s link to `broker`: a publisher that coordinates, or with `coordinate`
    /// off the broker's only consumer.
    pub(crate) fn new(
        me: Identity,
        broker: &str,
        coordinate: bool,
        parking: bool,
        policy: Policy,
    ) -> Self {
        Self {
            policy,
            me,
            broker: broker.to_string(),
            parking,
            consumer: !coordinate,
            coordinate,
            view: View::default(),
            claimed: None,
            switch: None,
            closed_as_owner: None,
            announced: None,
            unsynced_ends: 0,
            owner_sealed: 0,
            stopping: false,
            conn: None,
            parks: Parks::Unread,
        }
    }

    /// The next (or current) connection consumes the broker.
    pub(crate) fn consumer(&self) -> bool {
        self.consumer
    }

    /// This link coordinates through control records.
    pub(crate) fn coordinates(&self) -> bool {
        self.coordinate
    }

    /// The connection is changing role: it takes nothing new.
    pub(crate) fn switching(&self) -> bool {
        self.switch.is_some()
    }

    /// Another live instance shows on this broker.
    pub(crate) fn has_peers(&self, now: Now) -> bool {
        self.view.live(&self.me, now.at).len() > 1
    }

    /// The process stops: no more decisions.
    pub(crate) fn stop(&mut self) {
        self.stopping = true;
    }

    /// A connection begins (dialling): it sees nothing of the broker yet.
    pub(crate) fn connecting(&mut self) {
        self.view = View::default();
        self.switch = None;
        self.announced = None;
        self.conn = Some(Connection {
            consumer: self.consumer,
            connected: None,
            subscribed: None,
        });
    }

    /// The broker accepted the connection.
    pub(crate) fn connected(&mut self, now: Now) -> Vec<Action> {
        if let Some(c) = &mut self.conn {
            c.connected = Some(now.at);
        }
        if self.coordinate {
            vec![Action::SubscribeControl, Action::Announce { alive: true }]
        } else {
            Vec::new()
        }
    }

    /// The alive record was queued.
    pub(crate) fn announced(&mut self, now: Now) {
        self.announced = Some(now.at);
    }

    /// An instance record arrived (`None`: deleted, or unreadable); `retained`: the broker had
    /// it stored.
    pub(crate) fn instance(
        &mut self,
        name: &str,
        record: Option<InstanceRecord>,
        retained: bool,
        now: Now,
    ) -> Vec<Action> {
        let Some(record) = record else {
            self.view.instances.remove(name);
            return Vec::new();
        };
        if name == self.me.instance && record.nonce == self.me.nonce && !record.alive {
            // The Will of an earlier connection of ours, fired after we reconnected.
            return if self.is_connected() && !self.stopping {
                vec![Action::Announce { alive: true }]
            } else {
                Vec::new()
            };
        }
        let impostor = self.view.impostor;
        self.view.instance(name, record, retained, &self.me, now.at);
        let mut actions = Vec::new();
        if self.view.impostor != impostor {
            actions.push(Action::Impostor);
        }
        actions.extend(self.act(now));
        actions
    }

    /// The broker's owner record arrived (`None`: unreadable), sealed at `sealed_at` when
    /// there is a mesh key.
    pub(crate) fn owner(
        &mut self,
        record: Option<OwnerRecord>,
        sealed_at: Option<u64>,
        retained: bool,
        now: Now,
    ) -> Result<Vec<Action>, Stale> {
        // Owner records only move forward.
        if let Some(t) = sealed_at {
            if t.saturating_add(crate::seal::SKEW_MS) < self.owner_sealed {
                return Err(Stale);
            }
            self.owner_sealed = self.owner_sealed.max(t);
        }
        self.view.owner(record, retained, now.at);
        Ok(self.act(now))
    }

    /// The broker refused the control subscription: this connection cannot see the others.
    pub(crate) fn control_refused(&mut self, now: Now) -> Vec<Action> {
        self.go_lone(now)
    }

    /// Every subscription the rules want is in place on this consuming connection: noted in the
    /// owner record, for the other instances' readiness (see [`OwnerRecord::subscribed`]).
    pub(crate) fn subscribed(&mut self, now: Now) -> Vec<Action> {
        let Some(conn) = &mut self.conn else {
            return Vec::new();
        };
        if !conn.consumer || conn.subscribed.is_some() {
            return Vec::new();
        }
        conn.subscribed = Some(now.unix_ms);
        let me = &self.me;
        let note = self
            .view
            .owner
            .as_ref()
            .filter(|o| o.instance == me.instance && !o.released && !self.view.lone)
            .map(|o| OwnerRecord {
                subscribed: Some(Subscribed {
                    since: now.unix_ms,
                    nonce: me.nonce,
                }),
                ..o.clone()
            });
        match note {
            Some(record) if self.coordinate => vec![Action::WriteOwner {
                record,
                handover: false,
            }],
            _ => Vec::new(),
        }
    }

    /// Every [`Policy::check`]: refresh the alive record when due, give up waiting to read it
    /// back after [`Policy::sync_timeout`], and decide again (records go stale, claims settle).
    pub(crate) fn tick(&mut self, now: Now) -> Vec<Action> {
        let Some(connected) = self.conn.and_then(|c| c.connected) else {
            return Vec::new();
        };
        if self.stopping || !self.coordinate {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if self
            .announced
            .is_none_or(|t| now.at.duration_since(t) >= HEARTBEAT)
        {
            actions.push(Action::Announce { alive: true });
        }
        if !self.view.synced && now.at.duration_since(connected) >= self.policy.sync_timeout {
            actions.extend(self.go_lone(now));
        }
        actions.extend(self.act(now));
        if self.conn.is_some_and(|c| c.consumer) && self.switch.is_none() {
            actions.push(Action::CheckParkTargets);
        }
        actions
    }

    /// The park sessions a takeover waits for are read.
    pub(crate) fn parks_read(&mut self, now: Now) -> Vec<Action> {
        if matches!(self.parks, Parks::Reading { .. }) {
            self.parks = Parks::Read;
        }
        self.act(now)
    }

    /// Whether a connection changing role may end now: nothing in flight either way (`idle`),
    /// or [`Policy::switch_timeout`] passed, or it is not connected.
    pub(crate) fn switch_ready(&self, idle: bool, now: Now) -> bool {
        let Some(switch) = self.switch else {
            return false;
        };
        idle || now.at.duration_since(switch.since) >= self.policy.switch_timeout
            || !self.is_connected()
    }

    /// The connection changing role ends: a handover releases the broker first.
    pub(crate) fn leaving(&mut self, now: Now) -> Vec<Action> {
        match self.switch {
            Some(s) if s.release => vec![self.release(now, false)],
            _ => Vec::new(),
        }
    }

    /// The process ends the connection (shutdown): a planned handover, everything received was
    /// acknowledged, so a peer may take the session at once.
    pub(crate) fn closing(&mut self, now: Now) -> Vec<Action> {
        let Some(conn) = self.conn.filter(|c| c.connected.is_some()) else {
            return Vec::new();
        };
        if !self.coordinate {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if conn.consumer {
            actions.push(self.release(now, false));
        }
        actions.push(Action::Announce { alive: false });
        actions
    }

    /// The connection ended.
    pub(crate) fn ended(&mut self, end: End, now: Now) -> Vec<Action> {
        self.conn = None;
        let mut actions = Vec::new();
        match end {
            End::Shutdown => {}
            End::Switched => {
                self.consumer = !self.consumer;
                actions.push(Action::ForgetPacketIds);
                if self.consumer {
                    actions.push(Action::ForgetSubscriptions);
                } else {
                    self.parks = Parks::Unread;
                    actions.push(Action::ForgetParks);
                }
            }
            End::Lost {
                had_connack,
                peer_closed,
            } => {
                if self.coordinate {
                    actions.extend(self.note_unsynced_end(had_connack));
                }
                // Who took the session over is read from the records on the next connection;
                // one that cannot connect says the broker went away instead (a restart).
                let coordinated = self.consumer && self.coordinate;
                self.closed_as_owner =
                    (coordinated && peer_closed && had_connack).then_some(now.at);
                if coordinated {
                    // Read the owner record before consuming again: another instance may have
                    // taken the session over (mosquitto just closes the connection then).
                    self.consumer = false;
                    self.parks = Parks::Unread;
                    actions.extend([Action::ForgetPacketIds, Action::ForgetParks]);
                }
            }
        }
        actions
    }

    /// Who consumes the broker with its subscriptions in place, as this connection sees it.
    pub(crate) fn consumer_now(&self, now: Now) -> Option<Consumer> {
        let conn = self.conn?;
        conn.connected?;
        let own = conn
            .subscribed
            .filter(|_| conn.consumer && self.switch.is_none());
        self.view.consumer(&self.me, own, now.at)
    }

    /// Ownership as this link sees it now.
    pub(crate) fn status(&self, now: Now) -> RoleStatus {
        let consuming = self
            .conn
            .is_some_and(|c| c.consumer && c.connected.is_some())
            && self.switch.is_none();
        if !self.coordinate {
            return RoleStatus {
                owner: self.is_connected().then(|| self.me.instance.clone()),
                consuming,
                instances: 1,
                seen: Vec::new(),
            };
        }
        let me = &self.me;
        let mut seen: Vec<(String, bool, u64, String)> = self
            .view
            .instances
            .iter()
            .map(|(name, s)| {
                let live = self.view.is_live(name, me, now.at);
                (name.clone(), live, s.record.started, s.record.admin.clone())
            })
            .collect();
        seen.sort();
        seen.push((me.instance.clone(), true, me.started, me.admin.clone()));
        RoleStatus {
            owner: self.view.live_owner(me, now.at).map(str::to_string),
            consuming,
            instances: self.view.live(me, now.at).len(),
            seen,
        }
    }

    fn is_connected(&self) -> bool {
        self.conn.is_some_and(|c| c.connected.is_some())
    }

    /// The broker hides the control topic from this connection: consume it as a lone instance
    /// (what every instance did before instances coordinated).
    fn go_lone(&mut self, now: Now) -> Vec<Action> {
        if self.view.lone {
            return Vec::new();
        }
        self.view.lone = true;
        warn!(
            broker = %self.broker,
            "this connection cannot read its control records back (a broker ACL?): consuming \
             the broker as a lone instance; for several instances, allow the bridge's user to \
             read and write the control filters"
        );
        self.act(now)
    }

    /// A connection ended before reading its own record back: [`Policy::unsynced_ends`] in a
    /// row mean the broker refuses the control topic by disconnecting; stop coordinating on it.
    fn note_unsynced_end(&mut self, had_connack: bool) -> Vec<Action> {
        if self.view.synced || self.view.lone || !had_connack {
            self.unsynced_ends = 0;
            return Vec::new();
        }
        self.unsynced_ends += 1;
        if self.unsynced_ends < self.policy.unsynced_ends {
            return Vec::new();
        }
        self.coordinate = false;
        self.consumer = true;
        warn!(
            "the broker closed {} connections in a row before they read their control records \
             back (it refuses `$` topics?): consuming it as a lone instance, without probes; set \
             [bridge] ha = false and probe_interval = \"0s\" for a mesh of one process on such \
             brokers",
            self.unsynced_ends
        );
        // Probes are `$` topics too: subscribing them would cost the connection again.
        vec![Action::ProbesOff]
    }

    /// Acts on [`decide`]: claim, take over, step down or hand over.
    fn act(&mut self, now: Now) -> Vec<Action> {
        let Some(conn) = self.conn else {
            return Vec::new();
        };
        if conn.connected.is_none() || self.switch.is_some() || self.stopping {
            return Vec::new();
        }
        let mut actions = Vec::new();
        self.check_takeover(conn, now, &mut actions);
        let decision = decide(&self.view, &self.me, &self.broker, now.at);
        if decision != Decision::Own && !matches!(decision, Decision::Standby { .. }) {
            debug!(?decision, owner = ?self.view.owner, live = ?self.view.live(&self.me, now.at), "ownership decision");
        }
        match decision {
            // What the park sessions hold is older than what the broker delivers next.
            // (Reading them first, if not read yet.)
            Decision::Own if !conn.consumer && self.parks_ready(now, &mut actions) => {
                info!("this instance owns the broker: taking its session");
                self.begin_switch(now, false);
                actions.push(Action::Switch(SwitchWhy::TakeOver));
            }
            Decision::Claim if self.claim_rested(now) => {
                // With no other instance live here nobody can claim at the same time: the
                // claim counts as soon as the broker hands it back (see `View::uncontested`).
                self.view.uncontested = self.view.alone(&self.me, now.at);
                info!(
                    uncontested = self.view.uncontested,
                    "no live owner: claiming the broker"
                );
                self.claimed = Some(now.at);
                actions.push(Action::WriteOwner {
                    record: self.claim(false, now),
                    handover: false,
                });
            }
            Decision::Standby { owner: Some(owner) } if conn.consumer => {
                warn!(%owner, "another instance owns the broker: stepping down");
                self.begin_switch(now, false);
                actions.push(Action::Switch(SwitchWhy::StepDown { owner }));
            }
            Decision::HandOver { to } if conn.consumer => {
                info!(to = %to, "handing the broker over to an instance that joined");
                self.begin_switch(now, true);
                actions.push(Action::Switch(SwitchWhy::HandOver { to }));
            }
            Decision::HandOver { to } if self.claim_rested(now) => {
                // Named owner, not consuming yet (reading the park sessions, say): release the
                // claim at once; the preferred instance claims it.
                info!(to = %to, "handing the broker over to an instance that joined, before consuming it");
                self.parks = Parks::Unread;
                actions.push(Action::ForgetParks);
                actions.push(self.release(now, true));
            }
            _ => {}
        }
        actions
    }

    /// Whether a takeover may consume: its park sessions are read (or there are none, or it
    /// waited [`Policy::park_wait`]); starts reading them on the first call.
    fn parks_ready(&mut self, now: Now, actions: &mut Vec<Action>) -> bool {
        if !self.parking {
            return true;
        }
        match self.parks {
            Parks::Read => true,
            Parks::Unread => {
                info!("taking the broker: reading its park sessions first");
                self.parks = Parks::Reading { since: now.at };
                actions.push(Action::ReadParks);
                false
            }
            Parks::Reading { since } if now.at.duration_since(since) >= self.policy.park_wait => {
                warn!(
                    "park sessions not read within {:?}: consuming the broker anyway",
                    self.policy.park_wait
                );
                self.parks = Parks::Read;
                actions.push(Action::StopWaitingForParks);
                true
            }
            Parks::Reading { .. } => false,
        }
    }

    /// After the broker closed this link's consuming connection: once this connection has read
    /// the records, an owner record that still names this instance means no instance of the
    /// mesh took the session over.
    fn check_takeover(&mut self, conn: Connection, now: Now, actions: &mut Vec<Action>) {
        if conn.consumer || !self.view.synced {
            return;
        }
        let Some(closed) = self.closed_as_owner.take() else {
            return;
        };
        if self.view.live_owner(&self.me, now.at) == Some(self.me.instance.as_str()) {
            actions.push(Action::SessionTaken(now.at.duration_since(closed)));
        }
    }

    /// No claim or release was written in the last [`Policy::claim_rest`].
    fn claim_rested(&self, now: Now) -> bool {
        self.claimed
            .is_none_or(|t| now.at.duration_since(t) >= self.policy.claim_rest)
    }

    fn begin_switch(&mut self, now: Now, release: bool) {
        self.switch = Some(Switch {
            since: now.at,
            release,
        });
    }

    /// This instance's claim of the broker, or its release, as of `now`.
    fn claim(&self, released: bool, now: Now) -> OwnerRecord {
        OwnerRecord {
            instance: self.me.instance.clone(),
            since: now.unix_ms,
            released,
            subscribed: None,
        }
    }

    fn release(&mut self, now: Now, handover: bool) -> Action {
        if handover {
            self.claimed = Some(now.at);
        }
        Action::WriteOwner {
            record: self.claim(true, now),
            handover,
        }
    }
}

#[cfg(test)]
mod tests;
