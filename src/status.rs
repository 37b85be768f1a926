//! What the supervisor reports of the mesh, as the admin API serves it and the CLI prints it:
//! one status row per link, and readiness.

use serde::{Deserialize, Serialize};

use crate::message::Protocol;
use crate::metrics::LinkState;

/// One link, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BrokerStatus {
    /// Broker name.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Protocol version of the link.
    pub protocol: Protocol,
    /// TLS on.
    pub tls: bool,
    /// TLS without verifying the broker's certificate (`insecure_skip_verify`).
    #[serde(default)]
    pub tls_insecure: bool,
    /// When the client certificate (mTLS) expires (RFC 3339, UTC), as the files read at the
    /// last connection say; none without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_expires: Option<String>,
    /// Changed TLS files that could not be used (the previous ones were kept).
    #[serde(default)]
    pub tls_reload_failures: u64,
    /// Link state.
    pub state: LinkState,
    /// Since when (RFC 3339, UTC).
    pub since: String,
    /// Messages received from the broker.
    pub messages_in: u64,
    /// Messages (QoS 1 and 2) published to the broker and acknowledged.
    pub messages_out: u64,
    /// QoS 0 messages written to the broker's connection (never acknowledged).
    #[serde(default)]
    pub sent_qos0: u64,
    /// Messages from this broker handed to other brokers.
    pub forwarded: u64,
    /// Echoes dropped (3.1.1).
    pub dropped_echo: u64,
    /// Tagged messages not forwarded (single hop).
    pub dropped_tagged: u64,
    /// Messages dropped because this broker's queue overflowed.
    pub dropped_overflow: u64,
    /// Repeats dropped by the storm guard.
    pub dropped_storm: u64,
    /// Messages dropped because the spool's disk refused writes for too long.
    #[serde(default)]
    pub dropped_spool_failed: u64,
    /// Messages no topic rule took (see `meshbridge_dropped_unmatched_total`).
    #[serde(default)]
    pub dropped_unmatched: u64,
    /// Messages the broker refused.
    pub rejected: u64,
    /// Messages set aside for this broker (`bridge dead-letters`).
    #[serde(default)]
    pub dead_letters: u64,
    /// Times another client took the mesh's session over (see `meshbridge_session_taken_total`).
    #[serde(default)]
    pub session_taken: u64,
    /// Times the broker had lost the mesh's session (see `meshbridge_session_lost_total`).
    #[serde(default)]
    pub session_lost: u64,
    /// Control payloads refused on this broker, by kind (see `meshbridge_control_rejected`).
    #[serde(default)]
    pub control_rejected: std::collections::BTreeMap<String, u64>,
    /// Messages published again after a reconnect.
    pub redelivered: u64,
    /// Messages written to the durable spool (the broker was down or fell behind).
    #[serde(default)]
    pub spooled: u64,
    /// Times its queue was full and held the origins instead of spilling.
    #[serde(default)]
    pub holds: u64,
    /// Reconnections.
    pub reconnects: u64,
    /// Messages waiting for this broker (queued + in flight).
    pub queue_depth: u64,
    /// The in-flight window now (see `link::window`).
    #[serde(default)]
    pub inflight_window: u64,
    /// Connections the link publishes on (see `link::spread`).
    #[serde(default)]
    pub publish_connections: u64,
    /// Messages waiting in the durable spool.
    #[serde(default)]
    pub spool_messages: u64,
    /// Bytes of those.
    #[serde(default)]
    pub spool_bytes: u64,
    /// Messages waiting for room in a full spool (overflow policy `block`), unacknowledged
    /// upstream.
    #[serde(default)]
    pub spool_blocked: u64,
    /// What happens when the spool is full.
    #[serde(default)]
    pub spool_overflow: crate::spool::Overflow,
    /// Live entries of the dedup window.
    pub dedup_entries: u64,
    /// Approximate heap bytes of the dedup window.
    #[serde(default)]
    pub dedup_bytes: u64,
    /// Dedup records evicted because the window was full (each a duplicate to come).
    #[serde(default)]
    pub dedup_evictions: u64,
    /// Dedup records expired without their echo.
    #[serde(default)]
    pub dedup_expirations: u64,
    /// The instance that consumes this broker, as the broker's owner record names it (see
    /// docs/HA.md); none while nobody does.
    #[serde(default)]
    pub owner: Option<String>,
    /// This instance consumes the broker.
    #[serde(default)]
    pub consuming: bool,
    /// The broker's consumer (this instance or the owner another one is) has its subscriptions
    /// in place: what is published on the broker now reaches the mesh.
    #[serde(default)]
    pub subscribed: bool,
    /// Since when (RFC 3339, UTC), while subscribed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribed_since: Option<String>,
    /// Live instances of the mesh, as this broker shows them.
    #[serde(default)]
    pub instances: u64,
    /// Copies of spooled messages this broker, their origin, acknowledged into its park
    /// sessions.
    #[serde(default)]
    pub parked: u64,
    /// Messages waiting for this broker with copies parked on their origin brokers.
    #[serde(default)]
    pub park_depth: u64,
    /// That depth is near the brokers' queue limit (`broker_queue_limit`).
    #[serde(default)]
    pub park_near_limit: bool,
    /// Messages spooled for this broker without a copy on their origin broker.
    #[serde(default)]
    pub park_skipped: u64,
    /// Times this instance took the broker's session.
    #[serde(default)]
    pub takeovers: u64,
    /// Times this instance stopped consuming the broker because another owns it.
    #[serde(default)]
    pub step_downs: u64,
    /// Times this instance handed the broker over to an instance that joined.
    #[serde(default)]
    pub handovers: u64,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// What the probes show of every pair into this broker (see `bridge status --matrix`).
    #[serde(default)]
    pub replication_in: Vec<crate::probe::PairStatus>,
    /// Every origin that still delivers elsewhere is stalled into this broker.
    #[serde(default)]
    pub cut_off: bool,
}

impl BrokerStatus {
    /// The link's TLS mode: `on`, `off`, or `insecure` (the broker's certificate is not
    /// verified), as status and the metrics show it.
    pub fn tls_mode(&self) -> &'static str {
        match (self.tls, self.tls_insecure) {
            (true, true) => "insecure",
            (true, false) => "on",
            (false, _) => "off",
        }
    }
}

/// One instance of the mesh as the brokers show it (`bridge instances`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Its name (`[bridge] instance`).
    pub name: String,
    /// Its admin API address, as it announces it.
    pub admin: String,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// The process answering is this instance.
    pub this: bool,
    /// Brokers on which it is live.
    pub live_on: Vec<String>,
    /// Brokers that show it gone or stale.
    pub gone_on: Vec<String>,
    /// Brokers whose owner record names it (it consumes them).
    pub owns: Vec<String>,
}

/// `GET /readyz` body (see [`crate::supervisor::Supervisor::ready`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ReadyReport {
    /// Start-up done (every reachable broker consumed once), at least one link connected, and
    /// the spool takes writes.
    pub(crate) ready: bool,
    /// Links connected now.
    #[serde(default)]
    pub(crate) connected: usize,
    /// Links still waiting for their first connection.
    pub(crate) waiting: Vec<String>,
    /// Brokers connected but not consumed yet (no consumer has its subscriptions in place).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) unconsumed: Vec<String>,
    /// The spool's write error, while its disk refuses writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) spool_error: Option<String>,
}
