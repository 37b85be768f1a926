//! The Prometheus/OpenMetrics exposition of `GET /metrics`: every metric, rendered from the
//! status rows and the process-wide figures. The names and their meaning are owned by
//! [`crate::metrics`].

use super::BrokerStatus;
use crate::metrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Renders every metric in the Prometheus text format.
pub(crate) fn encode(
    links: &[BrokerStatus],
    reconcile: &crate::reconcile::run::ReconcileStats,
    overflow: crate::spool::Overflow,
    spool: &crate::spool::SpoolHealth,
    probes: (&crate::probe::Matrix, crate::probe::LagFamily),
) -> String {
    let mut registry = Registry::default();
    link_counters(&mut registry, links);
    link_gauges(&mut registry, links);
    link_details(&mut registry, links);
    process_metrics(&mut registry, reconcile, overflow, spool);
    probe_metrics(&mut registry, probes);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

type Labels = Vec<(&'static str, String)>;
/// Name, help text, and how to read the value from a status row.
type Metric<T> = (&'static str, &'static str, fn(&BrokerStatus) -> T);

const LINK_COUNTERS: [Metric<u64>; 26] = [
    (
        metrics::MESSAGES_IN,
        "Messages received from the broker",
        |s| s.messages_in,
    ),
    (
        metrics::MESSAGES_OUT,
        "Messages (QoS 1 and 2) published to the broker and acknowledged",
        |s| s.messages_out,
    ),
    (
        metrics::SENT_QOS0,
        "QoS 0 messages written to the broker's connection (not acknowledged by MQTT)",
        |s| s.sent_qos0,
    ),
    (
        metrics::FORWARDED,
        "Messages from the broker handed to other brokers",
        |s| s.forwarded,
    ),
    (
        metrics::DROPPED_ECHO,
        "Echoes of the bridge's own publishes dropped (MQTT 3.1.1)",
        |s| s.dropped_echo,
    ),
    (
        metrics::DROPPED_TAGGED,
        "Messages not forwarded because they carry an origin tag",
        |s| s.dropped_tagged,
    ),
    (
        metrics::DROPPED_OVERFLOW,
        "Messages dropped because the broker's spool (or queue) overflowed",
        |s| s.dropped_overflow,
    ),
    (
        metrics::DROPPED_STORM,
        "Repeats dropped by the storm guard",
        |s| s.dropped_storm,
    ),
    (
        metrics::DROPPED_SPOOL_FAILED,
        "Messages dropped because the spool's disk refused writes and the memory holding them was full",
        |s| s.dropped_spool_failed,
    ),
    (metrics::REJECTED, "Messages the broker refused", |s| {
        s.rejected
    }),
    (
        metrics::SESSION_LOST,
        "Times the broker had lost the mesh's session (expired, lost by the broker, or taken over with a clean session)",
        |s| s.session_lost,
    ),
    (
        metrics::TLS_RELOAD_FAILURES,
        "Changed TLS files that could not be used (the previous ones were kept)",
        |s| s.tls_reload_failures,
    ),
    (
        metrics::SESSION_TAKEN,
        "Times another client took the mesh's session over (no instance of the mesh claimed the broker)",
        |s| s.session_taken,
    ),
    (
        metrics::DEAD_LETTERS,
        "Messages set aside for the broker (bridge dead-letters lists them)",
        |s| s.dead_letters,
    ),
    (
        metrics::REDELIVERED,
        "Messages published again after a reconnect",
        |s| s.redelivered,
    ),
    (
        metrics::SPOOLED,
        "Messages written to the broker's spool (down or behind)",
        |s| s.spooled,
    ),
    (
        metrics::HOLDS,
        "Times the broker's queue was full and held the origins that keep to no window instead of spilling",
        |s| s.holds,
    ),
    (metrics::RECONNECTS, "Reconnections", |s| s.reconnects),
    (
        metrics::PARKED,
        "Copies of spooled messages this broker (their origin) holds for other brokers, acknowledged",
        |s| s.parked,
    ),
    (
        metrics::PARK_SKIPPED,
        "Messages spooled for the broker without a copy on their origin broker: on this host's disk only",
        |s| s.park_skipped,
    ),
    (
        metrics::TAKEOVERS,
        "Times this instance took the broker's consumer session",
        |s| s.takeovers,
    ),
    (
        metrics::STEP_DOWNS,
        "Times this instance stopped consuming the broker because another instance owns it",
        |s| s.step_downs,
    ),
    (
        metrics::HANDOVERS,
        "Times this instance handed the broker over to an instance that joined",
        |s| s.handovers,
    ),
    (
        metrics::DROPPED_UNMATCHED,
        "Messages no topic rule of the broker took",
        |s| s.dropped_unmatched,
    ),
    (
        metrics::DEDUP_EVICTIONS,
        "Dedup records dropped because the window was full: each one's echo is forwarded once more",
        |s| s.dedup_evictions,
    ),
    (
        metrics::DEDUP_EXPIRATIONS,
        "Dedup records that expired without their echo coming back",
        |s| s.dedup_expirations,
    ),
];

/// The per-link counters (a table).
fn link_counters(registry: &mut Registry, links: &[BrokerStatus]) {
    for (name, help, value) in LINK_COUNTERS {
        let family = Family::<Labels, Counter>::default();
        for s in links {
            family
                .get_or_create(&vec![("broker", s.name.clone())])
                .inc_by(value(s));
        }
        registry.register(name, help, family);
    }
}

const LINK_GAUGES: [Metric<i64>; 14] = [
    (
        metrics::PARK_DEPTH,
        "Messages waiting for the broker with copies parked on their origin brokers",
        |s| s.park_depth as i64,
    ),
    (
        metrics::PARK_NEAR_LIMIT,
        "1 while the park depth is at 80% of broker_queue_limit or more",
        |s| i64::from(s.park_near_limit),
    ),
    (
        metrics::CONSUMING,
        "1 while this instance consumes the broker",
        |s| i64::from(s.consuming),
    ),
    (
        metrics::SUBSCRIBED,
        "1 while the broker's consumer (this instance or another) has its subscriptions in place",
        |s| i64::from(s.subscribed),
    ),
    (
        metrics::INSTANCES,
        "Live instances of the mesh, as the broker shows them",
        |s| s.instances as i64,
    ),
    (metrics::CONNECTED, "1 while the link is connected", |s| {
        i64::from(s.state == metrics::LinkState::Connected)
    }),
    (
        metrics::DEDUP_ENTRIES,
        "Live entries of the link's dedup window",
        |s| s.dedup_entries as i64,
    ),
    (
        metrics::DEDUP_BYTES,
        "Approximate heap bytes of the link's dedup window",
        |s| s.dedup_bytes as i64,
    ),
    (
        metrics::QUEUE_DEPTH,
        "Messages waiting for the broker (queued and in flight)",
        |s| s.queue_depth as i64,
    ),
    (
        metrics::INFLIGHT_WINDOW,
        "The link's in-flight window now: inflight on a short path, more on a long one",
        |s| s.inflight_window as i64,
    ),
    (
        metrics::PUBLISH_CONNECTIONS,
        "Connections the link publishes on: more than 1 while the broker's Receive Maximum holds a long path back",
        |s| s.publish_connections as i64,
    ),
    (
        metrics::SPOOL_MESSAGES,
        "Messages waiting in the broker's durable spool",
        |s| s.spool_messages as i64,
    ),
    (
        metrics::SPOOL_BYTES,
        "Bytes in the broker's durable spool",
        |s| s.spool_bytes as i64,
    ),
    (
        metrics::SPOOL_BLOCKED,
        "Messages waiting for room in a full spool, unacknowledged upstream",
        |s| s.spool_blocked as i64,
    ),
];

/// The per-link gauges (a table).
fn link_gauges(registry: &mut Registry, links: &[BrokerStatus]) {
    for (name, help, value) in LINK_GAUGES {
        let family = Family::<Labels, Gauge>::default();
        for s in links {
            family
                .get_or_create(&vec![("broker", s.name.clone())])
                .set(value(s));
        }
        registry.register(name, help, family);
    }
}

/// Per-link metrics with labels of their own: certificate expiry, refused control records,
/// link info.
fn link_details(registry: &mut Registry, links: &[BrokerStatus]) {
    let expiry = Family::<Labels, Gauge>::default();
    for s in links {
        let secs = s
            .client_cert_expires
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        if let Some(secs) = secs {
            expiry
                .get_or_create(&vec![("broker", s.name.clone())])
                .set(i64::try_from(secs.as_secs()).unwrap_or(i64::MAX));
        }
    }
    registry.register(
        metrics::CLIENT_CERT_EXPIRY,
        "When the link's client certificate expires, seconds since the Unix epoch",
        expiry,
    );
    let rejected = Family::<Labels, Counter>::default();
    for s in links {
        for (kind, n) in &s.control_rejected {
            rejected
                .get_or_create(&vec![("broker", s.name.clone()), ("kind", kind.clone())])
                .inc_by(*n);
        }
    }
    registry.register(
        metrics::CONTROL_REJECTED,
        "Control payloads (records, Wills, echo notes, probes) refused: not sealed with the mesh key, a bad seal, or stale",
        rejected,
    );
    let info = Family::<Labels, Gauge>::default();
    for s in links {
        info.get_or_create(&vec![
            ("broker", s.name.clone()),
            ("protocol", s.protocol.to_string()),
            ("tls", s.tls_mode().to_string()),
        ])
        .set(1);
    }
    registry.register(
        metrics::LINK_INFO,
        "1 per link: its protocol and TLS mode (insecure: the broker's certificate is not verified)",
        info,
    );
}

/// The process's own metrics: spool policy and health, reconciliation.
fn process_metrics(
    registry: &mut Registry,
    reconcile: &crate::reconcile::run::ReconcileStats,
    overflow: crate::spool::Overflow,
    spool: &crate::spool::SpoolHealth,
) {
    let policy = Family::<Labels, Gauge>::default();
    policy
        .get_or_create(&vec![("policy", overflow.to_string())])
        .set(1);
    registry.register(
        metrics::SPOOL_OVERFLOW_POLICY,
        "Spool overflow policy in force (drop_oldest or block)",
        policy,
    );
    // Process-wide figures: one value each.
    use std::sync::atomic::Ordering::Relaxed;
    let gauges: [(&str, &str, i64); 3] = [
        (
            metrics::SPOOL_FAILING,
            "1 while the spool's disk refuses writes (messages are held in memory meanwhile)",
            i64::from(spool.error.is_some()),
        ),
        (
            metrics::SPOOL_HELD,
            "Messages held in memory until the spool's disk takes them",
            spool.held_messages as i64,
        ),
        (
            metrics::RECONCILE_DIFFERENCES,
            "Retained topics the brokers disagreed on at the last reconciliation",
            reconcile.last_differences.load(Relaxed) as i64,
        ),
    ];
    for (name, help, value) in gauges {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    }
    let counters: [(&str, &str, u64); 5] = [
        (
            metrics::SPOOL_WRITE_FAILURES,
            "Spool transactions that failed (disk full, I/O error)",
            spool.write_failures,
        ),
        (
            metrics::RECONCILE_RUNS,
            "Reconciliations of the retained messages run",
            reconcile.runs.load(Relaxed),
        ),
        (
            metrics::RECONCILE_REPAIRED,
            "Retained messages written or cleared by reconciliations",
            reconcile.repaired.load(Relaxed),
        ),
        (
            metrics::RECONCILE_SNAPSHOT_FAILURES,
            "Snapshots of a broker's retained messages that failed",
            reconcile.snapshot_failures.load(Relaxed),
        ),
        (
            metrics::RETAINED_SEEDED,
            "Retained messages handed to brokers added at run time, from their peers' snapshots",
            reconcile.seeded.load(Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    }
}

/// The probes' lag histograms and pair metrics.
fn probe_metrics(
    registry: &mut Registry,
    probes: (&crate::probe::Matrix, crate::probe::LagFamily),
) {
    let (matrix, lag) = probes;
    if matrix.enabled {
        registry.register(
            metrics::REPLICATION_LAG,
            "Time from a probe's publish on the origin broker to its arrival on the target broker",
            lag,
        );
        let pair = |p: &crate::probe::PairStatus| crate::probe::labels(&p.origin, &p.target);
        let stalled = Family::<Labels, Gauge>::default();
        let lost = Family::<Labels, Counter>::default();
        let seen = Family::<Labels, Counter>::default();
        let age = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for p in &matrix.pairs {
            stalled.get_or_create(&pair(p)).set(i64::from(p.stalled));
            lost.get_or_create(&pair(p)).inc_by(p.lost);
            seen.get_or_create(&pair(p)).inc_by(p.seen);
            if let Some(ms) = p.last_seen_ms_ago {
                age.get_or_create(&pair(p)).set(ms as f64 / 1000.0);
            }
        }
        registry.register(
            metrics::REPLICATION_STALLED,
            "1 while no probe from the origin has come out of the target for probe_stall_after",
            stalled,
        );
        registry.register(
            metrics::PROBES_LOST,
            "Probes that did not come out of the target within probe_stall_after",
            lost,
        );
        registry.register(
            metrics::PROBES_SEEN,
            "Probes that came out of the target",
            seen,
        );
        registry.register(
            metrics::PROBE_LAST_SEEN_AGE,
            "Seconds since the last probe from the origin came out of the target",
            age,
        );
    }
}
