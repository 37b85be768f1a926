//! Several processes, one mesh: which process consumes which broker. Pure state, no I/O.
//!
//! Every process ("instance") of a mesh holds one connection to every broker. Through it the
//! instance publishes what the mesh forwards to that broker, and it announces itself with a
//! retained *instance record* under the control topic `$meshbridge/<bridge id>/instance/<name>`
//! (refreshed every [`HEARTBEAT`], with a retained Will saying it is gone). `#` never matches a
//! `$` topic, so no user subscriber and no link sees these.
//!
//! Only the *owner* of a broker consumes it: it connects with the mesh's persistent session
//! `<bridge id>-<broker>` and subscribes the rules' filters; every other instance connects with
//! a clean session of its own (`<bridge id>-<broker>@<instance>`) and only publishes. The broker
//! arbitrates: one connection per client id, so a second owner takes the session (and every
//! message it holds unacknowledged) over and the first loses its connection. Which instance
//! should own a broker is written in a retained *owner record* (`…/owner/<broker>`) on that
//! broker, and decided by [`decide`] from what that broker shows, by every instance alike:
//!
//! - the recorded owner keeps the broker while it is live there (sticky: a process that comes
//!   back does not take a broker back, which is what keeps ownership from flapping);
//! - a broker without a live owner goes to the live instance with the highest rendezvous score
//!   ([`score`]), which claims it by writing the owner record; the broker orders competing
//!   claims and everyone acts on the last one, once it stood [`CLAIM_SETTLE`] — at once when no
//!   other instance was live to compete ([`View::uncontested`]);
//! - an owner hands a broker over, cleanly, to an instance that started after the owner took it
//!   and that the rendezvous prefers, once that instance has been live for [`REBALANCE_SETTLE`]:
//!   this spreads the brokers over instances that join, and never moves one back to an instance
//!   that merely reconnected;
//! - locality: an instance may name the brokers it prefers (`[bridge] prefer`, in its record:
//!   [`InstanceRecord::prefer`]). Among live instances one that prefers the broker comes before
//!   the rendezvous, and an owner that does not prefer the broker hands it to a live one that
//!   does (after [`REBALANCE_SETTLE`], even one that merely reconnected): each site's process
//!   consumes its own broker, and a failover still moves a broker to any live process.
//!
//! Views are per broker: an instance cut from one broker is gone (its Will) on that broker only,
//! and only that broker changes owner.
//!
//! Once its subscriptions are in place the owner writes its record again with a
//! [`Subscribed`] note: [`View::consumer`] tells every instance whether the broker is consumed,
//! which is what readiness waits for.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub(crate) mod role;

/// Every instance republishes its record this often.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(5);
/// An instance record not refreshed for this long is stale: its instance is taken for gone even
/// though no Will said so (a broker restarted without persistence of the Will, a record that
/// outlived its process).
pub(crate) const LIVENESS: Duration = Duration::from_secs(15);
/// How long a newcomer the rendezvous prefers must have been live before an owner hands it a
/// broker.
pub(crate) const REBALANCE_SETTLE: Duration = Duration::from_secs(5);

/// What an instance says of itself on one broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InstanceRecord {
    /// False in the Will and in the record written at shutdown.
    pub(crate) alive: bool,
    /// Random per process: tells two processes with one instance name apart.
    pub(crate) nonce: u64,
    /// When the process started, milliseconds since the Unix epoch.
    pub(crate) started: u64,
    /// Its admin API address, for operators.
    pub(crate) admin: String,
    /// The brokers it prefers to consume (`[bridge] prefer`: the brokers of its own site).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) prefer: Vec<String>,
}

/// Who owns a broker, as written on that broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OwnerRecord {
    /// The owning instance.
    pub(crate) instance: String,
    /// When it claimed the broker, milliseconds since the Unix epoch.
    pub(crate) since: u64,
    /// Written by an owner that stopped consuming (shutdown, handover): nobody owns it now.
    pub(crate) released: bool,
    /// Written again by the owner once its subscriptions are in place (the broker delivers to
    /// it): what other instances' readiness waits for. Absent in a claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) subscribed: Option<Subscribed>,
}

/// An owner's note that its subscriptions are in place (see [`OwnerRecord::subscribed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Subscribed {
    /// Since when, milliseconds since the Unix epoch.
    pub(crate) since: u64,
    /// The nonce of the process that subscribed: a note left by an earlier run of the same
    /// instance (it restarted and has not subscribed yet) names another nonce and counts for
    /// nothing.
    pub(crate) nonce: u64,
}

/// What a link reports of who consumes its broker (a `watch` channel the supervisor reads for
/// readiness and status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Consumption {
    /// Who consumes the broker now, with its subscriptions in place; `None` while nobody is
    /// known to (not connected, no owner yet, the owner still subscribing).
    pub(crate) now: Option<Consumer>,
    /// Some consumer had its subscriptions in place at some time since the link started.
    pub(crate) ever: bool,
    /// Ownership of the broker as the link sees it (status, metrics).
    pub(crate) status: RoleStatus,
}

impl Consumption {
    /// This process consumes the broker now, its subscriptions in place.
    pub(crate) fn by_this(&self) -> bool {
        self.now.as_ref().is_some_and(|c| c.this)
    }

    /// Takes what the link sees now, with its ownership status; true when that changed
    /// anything.
    pub(crate) fn report(&mut self, now: Option<Consumer>, status: RoleStatus) -> bool {
        let changed = self.status != status;
        self.status = status;
        self.update(now) || changed
    }

    /// Takes what the link sees now; true when that changed anything.
    pub(crate) fn update(&mut self, now: Option<Consumer>) -> bool {
        let changed = self.now != now || (now.is_some() && !self.ever);
        self.ever |= now.is_some();
        self.now = now;
        changed
    }
}

/// Ownership of one broker as its link sees it, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RoleStatus {
    /// The live owner the broker's record names.
    pub(crate) owner: Option<String>,
    /// This instance consumes the broker.
    pub(crate) consuming: bool,
    /// Live instances on this broker, this one included.
    pub(crate) instances: usize,
    /// Every instance the broker shows a record of: name, live, start (ms since the epoch),
    /// admin address.
    pub(crate) seen: Vec<(String, bool, u64, String)>,
}

/// Who consumes a broker with its subscriptions in place, as that broker's link sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Consumer {
    /// The instance.
    pub(crate) instance: String,
    /// It is this process.
    pub(crate) this: bool,
    /// Since when its subscriptions are in place, milliseconds since the Unix epoch.
    pub(crate) since: u64,
}

/// This process.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// Its instance name.
    pub(crate) instance: String,
    /// Its nonce (see [`InstanceRecord::nonce`]).
    pub(crate) nonce: u64,
    /// Its start time (see [`InstanceRecord::started`]).
    pub(crate) started: u64,
    /// Its admin address.
    pub(crate) admin: String,
    /// The brokers it prefers to consume (see [`InstanceRecord::prefer`]).
    pub(crate) prefer: Vec<String>,
}

impl Identity {
    /// The identity of a process that starts now.
    pub(crate) fn new(instance: &str, admin: &str, prefer: &[String]) -> Self {
        Self {
            instance: instance.to_string(),
            nonce: rand::random(),
            started: unix_ms(),
            admin: admin.to_string(),
            prefer: prefer.to_vec(),
        }
    }

    /// Its record, `alive` or gone.
    pub(crate) fn record(&self, alive: bool) -> InstanceRecord {
        InstanceRecord {
            alive,
            nonce: self.nonce,
            started: self.started,
            admin: self.admin.clone(),
            prefer: self.prefer.clone(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An instance as one broker shows it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    /// Its last record.
    pub(crate) record: InstanceRecord,
    /// When that record arrived.
    pub(crate) at: Instant,
    /// Since when it has been live without a break (for [`REBALANCE_SETTLE`]).
    pub(crate) live_since: Option<Instant>,
}

/// What one broker shows of the mesh's instances and of its owner.
#[derive(Debug, Default, Clone)]
pub(crate) struct View {
    /// Instance records by name.
    pub(crate) instances: HashMap<String, Seen>,
    /// The owner record.
    pub(crate) owner: Option<OwnerRecord>,
    /// When the owner record arrived; `None` when the broker had it stored before this
    /// connection subscribed (it stood unchallenged).
    pub(crate) owner_at: Option<Instant>,
    /// This connection read its own instance record back: every retained record, which the
    /// broker sends before it, has arrived.
    pub(crate) synced: bool,
    /// An instance record with this process's name and another nonce arrived live: two
    /// processes use one name.
    pub(crate) impostor: Option<u64>,
    /// The broker does not let this connection read its records back (an ACL): the instance
    /// cannot coordinate on it and consumes it as a lone instance would.
    pub(crate) lone: bool,
    /// This instance's last claim was written while the broker showed no other live instance,
    /// and none has shown up since: nobody can have claimed at the same time, so the claim
    /// need not stand [`CLAIM_SETTLE`] (the first start of a mesh, or of its only process
    /// after its sessions expired). Cleared by any other live instance record.
    pub(crate) uncontested: bool,
}

/// What this instance should do about one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Consume it (the owner record names this instance).
    Own,
    /// Write an owner record naming this instance.
    Claim,
    /// Leave it to `owner` (none: the instance the rendezvous prefers is expected to claim).
    Standby {
        /// The live owner, if any.
        owner: Option<String>,
    },
    /// Stop consuming it and release it for `to`, which the rendezvous prefers (see the module
    /// documentation on rebalancing).
    HandOver {
        /// The instance expected to claim it.
        to: String,
    },
}

impl View {
    /// Takes an instance record that arrived now; `retained` when the broker sent it on
    /// subscription (stored, possibly old) rather than as it was published.
    pub(crate) fn instance(
        &mut self,
        name: &str,
        record: InstanceRecord,
        retained: bool,
        me: &Identity,
        now: Instant,
    ) {
        if name == me.instance {
            if record.nonce == me.nonce {
                // Read back as published (a stored copy is an earlier connection's).
                if record.alive && !retained {
                    self.synced = true;
                }
            } else if !retained && record.alive {
                self.impostor = Some(record.nonce);
            }
            // This process knows whether it is alive: its own entry is not kept.
            return;
        }
        if record.alive {
            self.uncontested = false;
        }
        let was_live = self.instances.get(name).and_then(|s| s.live_since);
        let live_since = record.alive.then(|| was_live.unwrap_or(now));
        self.instances.insert(
            name.to_string(),
            Seen {
                record,
                at: now,
                live_since,
            },
        );
    }

    /// Takes an owner record (`None`: the record was deleted) that arrived now; `retained`
    /// as for [`View::instance`].
    pub(crate) fn owner(&mut self, record: Option<OwnerRecord>, retained: bool, now: Instant) {
        self.owner = record;
        self.owner_at = (!retained).then_some(now);
    }

    /// Whether `name` is live on this broker: this process always is, another instance while
    /// its record says alive and is fresh.
    pub(crate) fn is_live(&self, name: &str, me: &Identity, now: Instant) -> bool {
        name == me.instance
            || self
                .instances
                .get(name)
                .is_some_and(|s| s.record.alive && now.duration_since(s.at) < LIVENESS)
    }

    /// The live instances, this one included, with their start times.
    pub(crate) fn live<'a>(&'a self, me: &'a Identity, now: Instant) -> Vec<(&'a str, u64)> {
        let mut live: Vec<(&'a str, u64)> = self
            .instances
            .iter()
            .filter(|(name, _)| self.is_live(name, me, now))
            .map(|(name, s)| (name.as_str(), s.record.started))
            .collect();
        live.push((me.instance.as_str(), me.started));
        live
    }

    /// Whether instance `name` prefers to consume `broker` (see [`InstanceRecord::prefer`]), as
    /// its record on this broker says (this instance: its own configuration).
    pub(crate) fn prefers(&self, name: &str, me: &Identity, broker: &str) -> bool {
        let prefer = if name == me.instance {
            &me.prefer
        } else {
            match self.instances.get(name) {
                Some(s) => &s.record.prefer,
                None => return false,
            }
        };
        prefer.iter().any(|b| b == broker)
    }

    /// The live owner, if the owner record names one and was not released.
    pub(crate) fn live_owner<'a>(&'a self, me: &Identity, now: Instant) -> Option<&'a str> {
        self.owner
            .as_ref()
            .filter(|o| !o.released && self.is_live(&o.instance, me, now))
            .map(|o| o.instance.as_str())
    }

    /// Whether a claim written now would be uncontested (see [`View::uncontested`]): no other
    /// instance is live on this broker.
    pub(crate) fn alone(&self, me: &Identity, now: Instant) -> bool {
        self.instances
            .keys()
            .all(|name| !self.is_live(name, me, now))
    }

    /// Who consumes the broker with its subscriptions in place: this process when `own` says
    /// since when its consuming connection has them, otherwise the live owner the owner record
    /// names, once that owner noted its subscriptions (see [`OwnerRecord::subscribed`]) in
    /// this run of its process.
    pub(crate) fn consumer(
        &self,
        me: &Identity,
        own: Option<u64>,
        now: Instant,
    ) -> Option<Consumer> {
        if let Some(since) = own {
            return Some(Consumer {
                instance: me.instance.clone(),
                this: true,
                since,
            });
        }
        let owner = self.live_owner(me, now).filter(|o| *o != me.instance)?;
        let mark = self.owner.as_ref()?.subscribed?;
        let seen = self.instances.get(owner)?;
        (seen.record.nonce == mark.nonce).then(|| Consumer {
            instance: owner.to_string(),
            this: false,
            since: mark.since,
        })
    }
}

/// What this instance should do about `broker`, from what `view` shows (see the module
/// documentation). Nothing but [`Decision::Standby`] before the view is synced.
pub(crate) fn decide(view: &View, me: &Identity, broker: &str, now: Instant) -> Decision {
    if view.lone {
        return Decision::Own;
    }
    if !view.synced {
        return Decision::Standby { owner: None };
    }
    let live = view.live(me, now);
    let preferred = live
        .iter()
        .max_by_key(|(name, _)| (view.prefers(name, me, broker), score(name, broker), *name))
        .map(|(name, _)| *name)
        .unwrap_or(me.instance.as_str());
    match view.live_owner(me, now) {
        // A fresh claim of ours stands for CLAIM_SETTLE before it counts: two instances that
        // claimed at once (neither saw the other yet) both see the broker's last claim by then.
        // Not when no other instance was live: then nobody claimed at once.
        Some(owner)
            if owner == me.instance
                && !view.uncontested
                && view
                    .owner_at
                    .is_some_and(|t| now.duration_since(t) < CLAIM_SETTLE) =>
        {
            Decision::Standby { owner: None }
        }
        Some(owner) if owner == me.instance => {
            let since = view.owner.as_ref().map_or(0, |o| o.since);
            // A broker this owner does not prefer goes back to one that does, whenever it
            // started: the site's own process, back after a failover.
            let home =
                view.prefers(preferred, me, broker) && !view.prefers(&me.instance, me, broker);
            let newcomer = view.instances.get(preferred).filter(|s| {
                (s.record.started > since || home)
                    && s.live_since
                        .is_some_and(|t| now.duration_since(t) >= REBALANCE_SETTLE)
            });
            match newcomer {
                Some(_) if preferred != me.instance => Decision::HandOver {
                    to: preferred.to_string(),
                },
                _ => Decision::Own,
            }
        }
        Some(owner) => Decision::Standby {
            owner: Some(owner.to_string()),
        },
        None if preferred == me.instance => Decision::Claim,
        None => Decision::Standby { owner: None },
    }
}

/// A fingerprint of a message that every host computes alike (the echo window's own is fast
/// but depends on the CPU's features): the first 8 bytes of SHA-256 over the topic's length,
/// the topic and the payload.
pub(crate) fn portable_fingerprint(topic: &[u8], payload: &[u8]) -> u64 {
    sha256_u64(&[&(topic.len() as u64).to_be_bytes(), topic, payload])
}

/// The first 8 bytes of SHA-256 over `parts`, in order.
fn sha256_u64(parts: &[&[u8]]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// The rendezvous score of `instance` for `broker`: the same on every host, spread evenly.
pub(crate) fn score(instance: &str, broker: &str) -> u64 {
    sha256_u64(&[instance.as_bytes(), &[0], broker.as_bytes()])
}

/// How long a claim must stand before its instance takes the session.
pub(crate) const CLAIM_SETTLE: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests;
