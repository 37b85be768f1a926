//! A snapshot of one broker's retained messages: a short-lived clean session
//! (`<id>-<broker>~snapshot-<n>@<instance>`) subscribes the broker side of the rules and keeps
//! what arrives flagged retained, until nothing more came for [`QUIET`] after the SUBACK.
//! Live messages arrive unflagged (no retain-as-published) and are ignored.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Held, Snapshot, Value};
use crate::link::session::{self, ConnectAs, LinkEvent, SessionSettings};
use crate::rules::Rules;

/// How long after the last retained message (or the SUBACK) the snapshot is complete. A
/// broker sends the retained messages of a new subscription at once.
pub(crate) const QUIET: Duration = Duration::from_millis(500);

/// The most a snapshot may take, connection included.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a snapshot could not be taken.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SnapshotError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Connection(String),
    /// The broker refused the subscription.
    #[error("subscription refused: {0}")]
    Refused(String),
    /// More retained messages than the bounds allow.
    #[error(
        "more than retained_max ({max}) messages or retained_max_bytes ({max_bytes} B) retained"
    )]
    TooLarge {
        /// `retained_max`.
        max: usize,
        /// `retained_max_bytes`.
        max_bytes: u64,
    },
    /// Not complete within [`TIMEOUT`].
    #[error("not complete within {}s", TIMEOUT.as_secs())]
    Timeout,
    /// As many QoS 1/2 retained messages arrived as the brokers' per-client queue holds: a
    /// broker sends a new subscription no more than its in-flight window plus its queue limit
    /// of them and drops the rest, so the snapshot may be missing some.
    #[error(
        "{got} retained messages at QoS 1/2 reached broker_queue_limit ({limit}): a broker sends a new subscription at most its in-flight window plus max_queued_messages of them and drops the rest, so this snapshot may be incomplete; raise the brokers' max_queued_messages above the number of retained messages and set broker_queue_limit to it (0: no limit)"
    )]
    MaybeIncomplete {
        /// QoS 1/2 retained messages received.
        got: u64,
        /// `broker_queue_limit`.
        limit: u64,
    },
}

/// Bounds of one snapshot (`retained_max`, `retained_max_bytes`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Messages.
    pub(crate) max: usize,
    /// Bytes (topics, payloads, properties).
    pub(crate) max_bytes: u64,
    /// The brokers' per-client queue limit (`broker_queue_limit`; 0: none): a snapshot that
    /// reaches it may be incomplete ([`SnapshotError::MaybeIncomplete`]).
    pub(crate) queue_limit: u64,
}

static NEXT: AtomicU64 = AtomicU64::new(1);

/// Takes a snapshot of the broker of `settings`, under `rules`, as `instance`.
pub(crate) async fn take(
    settings: &SessionSettings,
    rules: &Rules,
    instance: &str,
    limits: Limits,
) -> Result<Snapshot, SnapshotError> {
    let filters = rules.snapshot_filters();
    if filters.is_empty() {
        return Ok(Snapshot::new());
    }
    let who = ConnectAs {
        client_id: crate::topics::snapshot_id(
            &settings.client_id,
            NEXT.fetch_add(1, Ordering::Relaxed),
            instance,
        ),
        clean: true,
        will: None,
    };
    let mut s = session::open(settings, &who, &[]);
    let result = tokio::time::timeout(TIMEOUT, collect(&mut s, &filters, rules, limits)).await;
    let _ = s.client.disconnect();
    s.wait_closed().await;
    result.unwrap_or(Err(SnapshotError::Timeout))
}

async fn collect(
    s: &mut session::Session,
    filters: &[String],
    rules: &Rules,
    limits: Limits,
) -> Result<Snapshot, SnapshotError> {
    let mut out = Snapshot::new();
    let mut bytes = 0u64;
    // QoS 1/2 retained messages: those a broker's per-client queue limit cuts off.
    let mut queued = 0u64;
    let complete = |out: Snapshot, queued: u64| {
        if limits.queue_limit > 0 && queued >= limits.queue_limit {
            return Err(SnapshotError::MaybeIncomplete {
                got: queued,
                limit: limits.queue_limit,
            });
        }
        Ok(out)
    };
    // Armed by the SUBACK, pushed back by every retained message.
    let mut quiet: Option<tokio::time::Instant> = None;
    loop {
        let deadline = quiet.unwrap_or_else(|| tokio::time::Instant::now() + TIMEOUT);
        let event = tokio::select! {
            _ = tokio::time::sleep_until(deadline), if quiet.is_some() => return complete(out, queued),
            e = s.next_event() => e,
        };
        match event {
            None => return Err(SnapshotError::Connection("connection task ended".into())),
            Some(LinkEvent::Closed(e)) => return Err(SnapshotError::Connection(e)),
            Some(LinkEvent::Connected { .. }) => s
                .client
                .subscribe_records(filters, 2)
                .map_err(|e| SnapshotError::Connection(e.to_string()))?,
            Some(LinkEvent::SubAck(failures)) => {
                if !failures.is_empty() {
                    return Err(SnapshotError::Refused(failures.join(", ")));
                }
                quiet = Some(tokio::time::Instant::now() + QUIET);
            }
            Some(LinkEvent::Publish { mut msg, ack }) => {
                if let Some(a) = ack {
                    let _ = s.client.ack(a);
                }
                if !msg.retain {
                    continue;
                }
                queued += u64::from(msg.qos > 0);
                if quiet.is_some() {
                    quiet = Some(tokio::time::Instant::now() + QUIET);
                }
                let Some(mesh) = msg
                    .topic_str()
                    .and_then(|t| rules.to_mesh(t))
                    .map(|t| t.into_owned())
                else {
                    continue;
                };
                msg.topic = bytes::Bytes::copy_from_slice(mesh.as_bytes());
                bytes += msg.approx_packet_size() as u64;
                let held = Held {
                    value: Value::of(&msg),
                    msg: Arc::new(msg),
                };
                out.insert(mesh, held);
                if out.len() > limits.max || bytes > limits.max_bytes {
                    return Err(SnapshotError::TooLarge {
                        max: limits.max,
                        max_bytes: limits.max_bytes,
                    });
                }
            }
            Some(_) => {}
        }
    }
}
