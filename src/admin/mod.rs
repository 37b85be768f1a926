//! Admin API: the HTTP/JSON server run by the daemon, the client used by the CLI verbs, and
//! the types both sides share.
//!
//! Routes (JSON unless noted):
//! - `GET /healthz` — 200 while the process works (no token needed)
//! - `GET /readyz` — 200 once every broker started with the process that is reachable has a
//!   consumer with its subscriptions in place (this process, or the live owner another process
//!   of the mesh is), while at least one link is connected and the spool takes writes; else 503
//!   with the reason (no token needed: keepalived/nginx checks). A broker down does not hold it
//!   back; once met, the start-up part is not asked again (a failover, or a broker added at
//!   run time, does not make the process unready).
//! - `GET /metrics` — Prometheus text
//! - `GET /api/v1/brokers` — status of every link
//! - `POST /api/v1/brokers` — add a broker ([`AddBrokerRequest`]): 201 once a consumer of the
//!   new broker has its subscriptions in place (what is published there from then on reaches
//!   the mesh); 202 when none had within 10 s (added, not consumed yet: `subscribed` in
//!   `GET /api/v1/brokers` says when it is); 400, 409
//! - `DELETE /api/v1/brokers/{name-or-address}` — remove a broker; 200, 404
//! - `GET /api/v1/dead-letters?limit=N` — messages set aside for a broker that could not
//!   take them as mapped, newest first ([`crate::spool::dead::DeadLetter`])
//!
//! When a token is configured every route but the two health checks requires
//! `Authorization: Bearer <token>`; a request without it gets 401 and is logged.

pub mod client;
mod exposition;
pub(crate) mod server;

pub use crate::status::{BrokerStatus, InstanceStatus};

use serde::{Deserialize, Serialize};

use crate::message::Protocol;

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
    /// Topic rules (none: `[bridge] topics` both ways), as in `[[broker.rule]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<crate::rules::RuleSpec>,
}

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    /// One line saying what is wrong.
    pub(crate) error: String,
}
