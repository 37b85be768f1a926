//! What the supervisor keeps of a running link, and how links stop: together (intake first,
//! then the drain, then the disconnect), or one at a time to start again with a reloaded
//! broker's settings.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Supervisor;
use crate::config::BrokerConfig;
use crate::ha::Consumption;
use crate::metrics::LinkStats;
use crate::router::TargetQueue;
use crate::status::BrokerStatus;

/// What the supervisor keeps of one running link.
#[derive(Debug)]
pub(crate) struct LinkHandle {
    /// The broker.
    pub(crate) broker: BrokerConfig,
    /// Its counters.
    pub(crate) stats: Arc<LinkStats>,
    /// Its queue.
    pub(crate) queue: Arc<TargetQueue>,
    pub(super) stop: CancellationToken,
    pub(super) disconnect: CancellationToken,
    pub(super) drained: watch::Receiver<bool>,
    pub(super) join: JoinHandle<()>,
    /// The broker left the mesh: its spool is deleted once the link stopped.
    pub(super) leaving: bool,
    /// Started with the process: readiness waits for its broker to be consumed (or the link to
    /// be down with an error).
    pub(super) at_start: bool,
    /// The broker's socket addresses (see [`BrokerConfig::endpoints`]), resolved when it
    /// started: another entry for the same broker is refused.
    pub(super) endpoints: Vec<std::net::SocketAddr>,
    /// Stops the broker's probe client (see [`crate::probe`]).
    pub(super) probe_stop: CancellationToken,
    /// Who consumes the broker, as its link sees it (readiness, status).
    pub(super) consumption: watch::Receiver<Consumption>,
    /// Set when the link stops to be started again with new settings (see [`Restart`]).
    pub(super) restarting: Arc<std::sync::atomic::AtomicBool>,
}

/// A link stopped by a reload that changed its broker's connection settings, to be started
/// again with them on the same queue and spool once it has stopped (see
/// [`Supervisor::reload`], [`Supervisor::restarted`]).
#[derive(Debug)]
pub(crate) struct Restart {
    /// The running link (its queue and counters go on with the new one).
    pub(crate) old: LinkHandle,
    /// The broker as the reloaded file has it.
    pub(crate) new: BrokerConfig,
}

/// Restarts the links of `restarts` (outside the supervisor's lock while each old link stops):
/// the old link stops at once (it acknowledges what it can, disconnects, and leaves what it
/// holds in the spool as on a lost connection), then a new one starts with the new settings on
/// the same queue, spool and counters. Messages forwarded meanwhile wait in the queue.
pub(crate) async fn restart_links(
    supervisor: &tokio::sync::Mutex<Supervisor>,
    restarts: Vec<Restart>,
) {
    for Restart { old, new } in restarts {
        let name = new.name.clone();
        info!(broker = %name, changed = %old.broker.changed_keys(&new).join(", "), "restarting the link with the reloaded settings");
        old.restarting
            .store(true, std::sync::atomic::Ordering::Release);
        old.probe_stop.cancel();
        old.stop.cancel();
        old.disconnect.cancel();
        let LinkHandle {
            join,
            queue,
            stats,
            at_start,
            ..
        } = old;
        if tokio::time::timeout(Duration::from_secs(10), join)
            .await
            .is_err()
        {
            warn!(broker = %name, "the link did not stop in time; starting the new one anyway");
        }
        supervisor
            .lock()
            .await
            .restarted(new, queue, stats, at_start);
    }
}

impl LinkHandle {
    /// The status row of this link.
    pub(crate) fn status(&self) -> BrokerStatus {
        let s = &self.stats;
        let (state, since) = s.state();
        let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (spool_messages, spool_bytes, spool_blocked) = self.queue.spool_depth();
        let (consumer, ha) = {
            let c = self.consumption.borrow();
            (c.now.clone(), c.status.clone())
        };
        BrokerStatus {
            name: self.broker.name.clone(),
            address: self.broker.address(),
            protocol: self.broker.protocol,
            tls: self.broker.tls.is_some(),
            client_cert_expires: self
                .broker
                .tls
                .as_ref()
                .and_then(|t| t.expires())
                .map(|secs| rfc3339_ms(secs.saturating_mul(1000))),
            tls_reload_failures: self.broker.tls.as_ref().map_or(0, |t| t.failures()),
            tls_insecure: self
                .broker
                .tls_inputs
                .as_ref()
                .is_some_and(|t| t.insecure_skip_verify),
            state,
            since: humantime::format_rfc3339_seconds(since).to_string(),
            messages_in: n(&s.messages_in),
            messages_out: n(&s.messages_out),
            sent_qos0: n(&s.sent_qos0),
            forwarded: n(&s.forwarded),
            dropped_echo: n(&s.dropped_echo),
            dropped_tagged: n(&s.dropped_tagged),
            dropped_overflow: n(&s.dropped_overflow),
            dropped_storm: n(&s.dropped_storm),
            dropped_spool_failed: n(&s.dropped_spool_failed),
            dropped_unmatched: n(&s.dropped_unmatched),
            rejected: n(&s.rejected),
            dead_letters: n(&s.dead_letters),
            session_lost: n(&s.session_lost),
            session_taken: n(&s.session_taken),
            control_rejected: crate::seal::ControlKind::ALL
                .iter()
                .map(|k| (k.as_str().to_string(), n(&s.control_rejected[k.index()])))
                .collect(),
            redelivered: n(&s.redelivered),
            spooled: n(&s.spooled),
            holds: n(&s.holds),
            reconnects: n(&s.reconnects),
            queue_depth: self.queue.len() as u64 + s.inflight.load(Ordering::Relaxed).max(0) as u64,
            inflight_window: s.window.load(Ordering::Relaxed).max(0) as u64,
            publish_connections: s.publish_connections.load(Ordering::Relaxed).max(0) as u64,
            spool_messages,
            spool_bytes,
            spool_blocked,
            spool_overflow: self.queue.spool_overflow(),
            dedup_entries: s.dedup_entries.load(Ordering::Relaxed).max(0) as u64,
            dedup_bytes: s.dedup_bytes.load(Ordering::Relaxed).max(0) as u64,
            dedup_evictions: n(&s.dedup_evictions),
            dedup_expirations: n(&s.dedup_expirations),
            owner: ha.owner,
            consuming: ha.consuming,
            subscribed: consumer.is_some(),
            subscribed_since: consumer.map(|c| rfc3339_ms(c.since)),
            instances: ha.instances as u64,
            parked: n(&s.parked),
            park_skipped: n(&s.park_skipped),
            park_depth: s.park_depth(spool_messages).0,
            park_near_limit: s.park_depth(spool_messages).1,
            takeovers: n(&s.takeovers),
            step_downs: n(&s.step_downs),
            handovers: n(&s.handovers),
            last_error: s.last_error(),
            replication_in: Vec::new(),
            cut_off: false,
        }
    }

    /// Stops this link: no new messages are taken from its broker, what is queued for it is
    /// delivered for up to `drain_timeout`, then it acknowledges what it can and disconnects.
    pub(crate) async fn shutdown(self, drain_timeout: Duration) {
        shutdown_all(vec![self], drain_timeout).await
    }
}

/// Stops links together (see [`LinkHandle::shutdown`]): intake stops everywhere first, so
/// acknowledgements between them still flow while they drain.
pub(crate) async fn shutdown_links(links: Vec<LinkHandle>, drain_timeout: Duration) {
    shutdown_all(links, drain_timeout).await
}

async fn shutdown_all(links: Vec<LinkHandle>, drain_timeout: Duration) {
    for l in &links {
        l.stop.cancel();
        l.probe_stop.cancel();
    }
    let wait_drained = async {
        for l in &links {
            let mut rx = l.drained.clone();
            let _ = rx.wait_for(|d| *d).await;
        }
    };
    if tokio::time::timeout(drain_timeout, wait_drained)
        .await
        .is_err()
    {
        let left: usize = links.iter().map(|l| l.queue.len()).sum();
        warn!(
            queued = left,
            "drain timeout: disconnecting with messages still queued"
        );
    }
    for l in &links {
        l.disconnect.cancel();
    }
    for l in links {
        let name = l.broker.name.clone();
        if tokio::time::timeout(Duration::from_secs(5), l.join)
            .await
            .is_err()
        {
            warn!(broker = %name, "link did not stop in time");
        }
        if l.leaving {
            l.queue.discard_spool();
            l.queue.sync().await;
        }
    }
}

/// `ms` milliseconds since the Unix epoch as RFC 3339 (UTC), to the millisecond.
fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
