//! Admin API: the HTTP/JSON server run by the daemon, the client used by the CLI verbs, and
//! the types both sides share.
//!
//! Routes (JSON unless noted):
//! - `GET /healthz` — 200 while the process works (no token needed)
//! - `GET /readyz` — 200 when the links started with the process have connected at least once
//!   or reported why they could not, at least one link is connected, and the spool takes
//!   writes; else 503 with the reason (no token needed: keepalived/nginx checks). A broker
//!   added at run time, or one broker down, does not make the process unready.
//! - `GET /metrics` — Prometheus text
//! - `GET /api/v1/brokers` — status of every link
//! - `POST /api/v1/brokers` — add a broker ([`AddBrokerRequest`]); 201, 400, 409
//! - `DELETE /api/v1/brokers/{name-or-address}` — remove a broker; 200, 404
//!
//! When a token is configured every route but the two health checks requires
//! `Authorization: Bearer <token>`; a request without it gets 401 and is logged.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::config::Protocol;
use crate::metrics::LinkState;

/// One link, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
    /// Messages the broker refused.
    pub rejected: u64,
    /// Messages published again after a reconnect.
    pub redelivered: u64,
    /// Messages written to the durable spool (the broker was down or fell behind).
    #[serde(default)]
    pub spooled: u64,
    /// Reconnections.
    pub reconnects: u64,
    /// Messages waiting for this broker (queued + in flight).
    pub queue_depth: u64,
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
    /// Last error, if any.
    pub last_error: Option<String>,
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

/// `GET /readyz` body (see [`crate::supervisor::Supervisor::ready`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadyReport {
    /// Start-up done, at least one link connected, and the spool takes writes.
    pub ready: bool,
    /// Links connected now.
    #[serde(default)]
    pub connected: usize,
    /// Links still waiting for their first connection.
    pub waiting: Vec<String>,
    /// The spool's write error, while its disk refuses writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_error: Option<String>,
}

/// `POST /api/v1/brokers` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AddBrokerRequest {
    /// `host:port`.
    pub address: String,
    /// Name (default: from the address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Protocol (default v5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// TLS (default on, with the `[tls]` settings of the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    /// Name to verify in the broker's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// One line saying what is wrong.
    pub error: String,
}
