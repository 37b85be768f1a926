//! The timing rules of a link, in one place: how often it checks, how long it waits, after how
//! many failures it gives up on something. Pure data.
//!
//! What every instance of a mesh must agree on (how often records are refreshed, when a record
//! is stale, how long a claim must stand) is not here: those are part of the records' meaning,
//! constants of [`crate::ha`]. What is here only decides how this process acts, and another
//! process may use other values without harm.

use std::time::Duration;

/// When a link acts, and after how much of what it gives up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    /// How often a coordinating link decides again without a record arriving (records go
    /// stale, claims settle). 100 ms: a contested claim is acted on within this of
    /// [`crate::ha::CLAIM_SETTLE`], and a decision costs microseconds.
    pub(crate) check: Duration,
    /// Claims and releases are not written again sooner than this: the broker's answer to the
    /// last one is on its way. 2 s: a round trip to any broker, with room to spare.
    pub(crate) claim_rest: Duration,
    /// How long a connection changing role (owner ↔ publisher) waits for what it has in flight
    /// before it goes anyway. 10 s: a broker that does not acknowledge within that is stalled,
    /// and what it did not acknowledge is sent again by the next connection.
    pub(crate) switch_timeout: Duration,
    /// How long a takeover waits for its park sessions to be read before it consumes anyway.
    /// 15 s: reading a park session takes one connection and its backlog; a broker that does
    /// not answer must not keep its own messages from being consumed.
    pub(crate) park_wait: Duration,
    /// How long a connection waits to read its own instance record back before it takes the
    /// broker for one that hides the control topic, and consumes it alone. 3 s: the broker
    /// sends every retained record before the one just written.
    pub(crate) sync_timeout: Duration,
    /// Connections in a row that end before reading their own record back after which the link
    /// stops coordinating on its broker (one that refuses `$` topics by disconnecting, as
    /// rumqttd does). 2: one loss can be a coincidence, two in a row at the same step are not.
    pub(crate) unsynced_ends: u32,
    /// Connections in a row lost with the probe subscription unanswered after which probes
    /// through the broker are off. 2, for the same reason.
    pub(crate) probe_drops: u32,
    /// How often a link checks whether its target makes progress.
    pub(crate) stall_check: Duration,
    /// Checks in a row without progress, with messages in flight, after which what waits on the
    /// target moves to its spool (the origins are not held by a frozen target). 2: one check
    /// can fall just after the last acknowledgement.
    pub(crate) stalled_checks: u32,
    /// How often, while a target delivers, markers go behind the copies parked for it (the
    /// origins' owners discard what it has): 2 s keeps the parked backlog near the spool's
    /// without a marker per message.
    pub(crate) mark_every: Duration,
    /// How often a link checks its spool and logs its state.
    pub(crate) spool_check: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            check: Duration::from_millis(100),
            claim_rest: Duration::from_secs(2),
            switch_timeout: Duration::from_secs(10),
            park_wait: Duration::from_secs(15),
            sync_timeout: Duration::from_secs(3),
            unsynced_ends: 2,
            probe_drops: 2,
            stall_check: Duration::from_secs(1),
            stalled_checks: 2,
            mark_every: Duration::from_secs(2),
            spool_check: Duration::from_secs(5),
        }
    }
}
