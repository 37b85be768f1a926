//! The CLI side of the admin API: `bridge add-broker`, `remove-broker`, `status`,
//! `dead-letters`…
//!
//! Every failure is one line naming what went wrong (unreachable admin address, refused
//! token, duplicate name, unknown broker…), and the CLI exits non-zero.

use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{AddBrokerRequest, BrokerStatus, ErrorBody, InstanceStatus};
use crate::probe::Matrix;
use crate::reconcile::run::{ReconcileReport, ReconcileRequest};
use crate::spool::dead::DeadLetter;

/// Why a CLI request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at the admin address.
    #[error(
        "cannot reach the admin API at {addr}: {message} (is `bridge run` running, and is this its admin_listen?)"
    )]
    Unreachable {
        /// The address tried.
        addr: String,
        /// The transport error.
        message: String,
    },
    /// The API answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The answer could not be understood.
    #[error("unexpected answer from the admin API: {0}")]
    Protocol(String),
}

/// A client for one bridge's admin API.
pub struct AdminClient {
    base: String,
    addr: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    /// A client for `addr` (`host:port`), sending `token` as bearer token when given.
    pub fn new(addr: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Self {
            base: format!("http://{addr}"),
            addr: addr.to_string(),
            token,
            agent,
        }
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn answer<T: DeserializeOwned>(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut response = result.map_err(|e| ClientError::Unreachable {
            addr: self.addr.clone(),
            message: e.to_string(),
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if status.is_success() {
            serde_json::from_str(&text).map_err(|e| ClientError::Protocol(format!("{e}: {text}")))
        } else {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or_else(|_| text.trim().to_string());
            Err(ClientError::Refused(format!(
                "{} ({})",
                message,
                status.as_u16()
            )))
        }
    }

    /// `GET /api/v1/brokers`.
    pub fn status(&self) -> Result<Vec<BrokerStatus>, ClientError> {
        let mut req = self.agent.get(format!("{}/api/v1/brokers", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        self.answer(req.call())
    }

    /// `GET /api/v1/instances`.
    pub fn instances(&self) -> Result<Vec<InstanceStatus>, ClientError> {
        let mut req = self.agent.get(format!("{}/api/v1/instances", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        self.answer(req.call())
    }

    /// `GET /api/v1/dead-letters?limit=N`: the newest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, ClientError> {
        let mut req = self
            .agent
            .get(format!("{}/api/v1/dead-letters?limit={limit}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        self.answer(req.call())
    }

    /// `POST /api/v1/reconcile` (waits up to 2 minutes: it takes a snapshot of every broker).
    pub fn reconcile(&self, body: &ReconcileRequest) -> Result<ReconcileReport, ClientError> {
        let mut req = self
            .agent
            .post(format!("{}/api/v1/reconcile", self.base))
            .config()
            .timeout_global(Some(Duration::from_secs(120)))
            .build();
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        self.answer(req.send_json(body))
    }

    /// `GET /api/v1/matrix`.
    pub fn matrix(&self) -> Result<Matrix, ClientError> {
        let mut req = self.agent.get(format!("{}/api/v1/matrix", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        self.answer(req.call())
    }

    /// `POST /api/v1/brokers`.
    pub fn add(&self, body: &AddBrokerRequest) -> Result<BrokerStatus, ClientError> {
        let mut req = self.agent.post(format!("{}/api/v1/brokers", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        self.answer(req.send_json(body))
    }

    /// `DELETE /api/v1/brokers/{key}`.
    pub fn remove(&self, key: &str) -> Result<String, ClientError> {
        let mut req =
            self.agent
                .delete(format!("{}/api/v1/brokers/{}", self.base, encode_path(key)));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let v: serde_json::Value = self.answer(req.call())?;
        Ok(v.get("removed")
            .and_then(|n| n.as_str())
            .unwrap_or(key)
            .to_string())
    }
}

/// Percent-encodes a path segment (names and `host:port` addresses, IPv6 brackets included).
fn encode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The status as a table a person reads at a glance.
pub fn status_table(links: &[BrokerStatus]) -> String {
    let mut rows = vec![[
        "BROKER".to_string(),
        "ADDRESS".into(),
        "PROTO".into(),
        "TLS".into(),
        "STATE".into(),
        "SINCE".into(),
        "IN".into(),
        "OUT".into(),
        "QUEUE".into(),
        "SPOOL".into(),
        "RECONN".into(),
        "OWNER".into(),
        "SUBSCRIBED".into(),
        "CERT UNTIL".into(),
        "LAST ERROR".into(),
    ]];
    for s in links {
        rows.push([
            s.name.clone(),
            s.address.clone(),
            s.protocol.to_string(),
            s.tls_mode().to_string(),
            format!("{:?}", s.state).to_lowercase(),
            s.since.clone(),
            s.messages_in.to_string(),
            if s.sent_qos0 > 0 {
                format!("{} (+{} qos0)", s.messages_out, s.sent_qos0)
            } else {
                s.messages_out.to_string()
            },
            s.queue_depth.to_string(),
            spool_cell(s),
            s.reconnects.to_string(),
            owner_cell(s),
            s.subscribed_since.clone().unwrap_or_else(|| "no".into()),
            s.client_cert_expires
                .as_deref()
                .map_or_else(|| "-".into(), |t| t.chars().take(10).collect()),
            s.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut out = columns(&rows);
    if let Some(s) = links.first() {
        out.push_str(&format!("spool overflow policy: {}\n", s.spool_overflow));
    }
    out
}

/// The dead letters as a table (`-` when there are none).
pub fn dead_letters_table(rows: &[DeadLetter]) -> String {
    if rows.is_empty() {
        return "no dead letters\n".to_string();
    }
    let mut table = vec![[
        "AT".to_string(),
        "ORIGIN".into(),
        "TARGET".into(),
        "QOS".into(),
        "TOPIC (BYTES)".into(),
        "PAYLOAD".into(),
        "TOPIC STARTS".into(),
        "REASON".into(),
    ]];
    for r in rows {
        let starts: String = r.topic.chars().take(40).collect();
        table.push([
            r.at.clone(),
            r.origin.clone(),
            r.target.clone(),
            r.qos.to_string(),
            r.topic_bytes.to_string(),
            r.payload_bytes.to_string(),
            starts.escape_debug().to_string(),
            r.reason.clone(),
        ]);
    }
    columns(&table)
}

/// The instances as a table: `*` marks the one answering.
pub fn instances_table(rows: &[InstanceStatus]) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    let mut table = vec![[
        "INSTANCE".to_string(),
        "ADMIN".into(),
        "STARTED".into(),
        "LIVE ON".into(),
        "GONE ON".into(),
        "OWNS".into(),
    ]];
    for r in rows {
        table.push([
            if r.this {
                format!("{}*", r.name)
            } else {
                r.name.clone()
            },
            r.admin.clone(),
            r.started.clone(),
            list(&r.live_on),
            list(&r.gone_on),
            list(&r.owns),
        ]);
    }
    columns(&table)
}

/// Rows (of equal length) as aligned columns, two spaces apart; the last column (free text)
/// is not padded.
fn columns<R: AsRef<[String]>>(rows: &[R]) -> String {
    let n = rows.first().map_or(0, |r| r.as_ref().len());
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.as_ref()[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Who consumes the broker: `NAME*` when this instance does.
fn owner_cell(s: &BrokerStatus) -> String {
    match &s.owner {
        Some(owner) if s.consuming => format!("{owner}*"),
        Some(owner) => owner.clone(),
        None => "-".into(),
    }
}

/// Spooled messages and size, and how many wait for room (policy `block`).
fn spool_cell(s: &BrokerStatus) -> String {
    let mut cell = s.spool_messages.to_string();
    if s.spool_messages > 0 {
        cell.push_str(&format!(" ({})", bytesize::ByteSize(s.spool_bytes)));
    }
    if s.spool_blocked > 0 {
        cell.push_str(&format!(" +{} blocked", s.spool_blocked));
    }
    cell
}

/// A reconciliation as a report: retained messages per broker, differences per pair, the
/// differing topics (up to 100), and what was repaired.
pub fn reconcile_table(r: &ReconcileReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let brokers: Vec<String> = r
        .brokers
        .iter()
        .map(|b| match (&b.retained, &b.error) {
            (Some(n), _) => format!("{} {n}", b.name),
            (None, e) => format!("{} FAILED ({})", b.name, e.as_deref().unwrap_or("?")),
        })
        .collect();
    let _ = writeln!(out, "retained messages: {}", brokers.join(", "));
    let mut rows = vec![[
        "PAIR".to_string(),
        "ONLY-FIRST".into(),
        "ONLY-SECOND".into(),
        "DIFFERENT".into(),
    ]];
    for p in &r.pairs {
        rows.push([
            format!("{} {}", p.first, p.second),
            p.only_first.to_string(),
            p.only_second.to_string(),
            p.different.to_string(),
        ]);
    }
    out.push_str(&columns(&rows));
    match r.differing_topics {
        0 => out.push_str("the brokers agree\n"),
        n => {
            let _ = writeln!(out, "{n} topic(s) differ:");
            for t in &r.topics {
                let held: Vec<String> = t
                    .held
                    .iter()
                    .map(|(b, v)| format!("{b}={}", v.as_deref().unwrap_or("absent")))
                    .collect();
                let _ = writeln!(out, "  {}: {}", t.topic, held.join(", "));
            }
            if (r.topics.len() as u64) < n {
                let _ = writeln!(
                    out,
                    "  ... and {} more (--json lists 100)",
                    n - r.topics.len() as u64
                );
            }
        }
    }
    if r.repair {
        let _ = writeln!(
            out,
            "repaired: {} written, {} cleared{}",
            r.written,
            r.deleted,
            if r.changed_during_run > 0 {
                format!(
                    ", {} left alone (changed during the run)",
                    r.changed_during_run
                )
            } else {
                String::new()
            }
        );
    } else if r.differing_topics > 0 {
        out.push_str("run with --repair to make every broker hold the same set\n");
    }
    for note in &r.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

/// The lag matrix as a table: one row per origin, one column per target, each cell
/// `p50/p99` in milliseconds over the last minute, `STALLED` where no probe came through for
/// `probe_stall_after`; lost probes listed below.
pub fn matrix_table(m: &Matrix) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if !m.enabled {
        out.push_str("probes are off (bridge.probe_interval = \"0s\")\n");
        return out;
    }
    let _ = writeln!(
        out,
        "lag p50/p99 in ms over the last minute (probes every {}, stalled after {}); rows: from, columns: to",
        humantime::format_duration(std::time::Duration::from_millis(m.interval_ms)),
        humantime::format_duration(std::time::Duration::from_millis(m.stall_after_ms)),
    );
    let cell = |o: &str, t: &str| -> String {
        if o == t {
            return "-".into();
        }
        match m.pair(o, t) {
            None => "?".into(),
            Some(p) if p.stalled => match p.last_seen_ms_ago {
                Some(ms) => format!("STALLED {}s", ms / 1000),
                None => "STALLED".into(),
            },
            Some(p) => match (p.p50_ms, p.p99_ms) {
                (Some(a), Some(b)) => format!("{a:.1}/{b:.1}"),
                _ => "waiting".into(),
            },
        }
    };
    let mut rows: Vec<Vec<String>> = vec![
        std::iter::once("FROM \\ TO".to_string())
            .chain(m.brokers.iter().cloned())
            .collect(),
    ];
    for o in &m.brokers {
        rows.push(
            std::iter::once(o.clone())
                .chain(m.brokers.iter().map(|t| cell(o, t)))
                .collect(),
        );
    }
    out.push_str(&columns(&rows));
    let lost: Vec<String> = m
        .pairs
        .iter()
        .filter(|p| p.lost > 0)
        .map(|p| format!("{}->{} {}", p.origin, p.target, p.lost))
        .collect();
    if !lost.is_empty() {
        let _ = writeln!(out, "probes lost: {}", lost.join(", "));
    }
    let stalled: Vec<String> = m
        .stalled()
        .map(|p| format!("{}->{}", p.origin, p.target))
        .collect();
    if !stalled.is_empty() {
        let _ = writeln!(out, "stalled: {}", stalled.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_path("b1"), "b1");
        assert_eq!(encode_path("10.0.0.3:8883"), "10.0.0.3:8883");
        assert_eq!(encode_path("[::1]:1883"), "%5B::1%5D:1883");
        assert_eq!(encode_path("a/b"), "a%2Fb");
    }
}
