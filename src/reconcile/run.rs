//! Running a reconciliation (`bridge reconcile`, `reconcile_interval`) and seeding a broker
//! added at run time: snapshots of the members taken side by side, the [`plan`], and the
//! repairs pushed into the targets' queues.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::snapshot::{self, Limits};
use super::{Action, Snapshot, TopicDiff, View, plan, retained_message};
use crate::link::session::SessionSettings;
use crate::router::{Outbound, Router, TargetQueue};
use crate::rules::Rules;

/// Whether a broker's rules replicate a mesh topic to it.
type Takes<'a> = Box<dyn Fn(&str) -> bool + 'a>;

/// Differing topics listed in a report (all are counted).
pub(crate) const MAX_LISTED: usize = 100;

/// One member of the mesh as a reconciliation needs it.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    /// Broker name.
    pub(crate) name: String,
    /// How to connect.
    pub(crate) settings: SessionSettings,
    /// Its topic rules.
    pub(crate) rules: Rules,
    /// Its queue (repairs go there).
    pub(crate) queue: Arc<TargetQueue>,
}

/// What `POST /api/v1/reconcile` asks.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Make every broker hold the same retained set.
    #[serde(default)]
    pub repair: bool,
    /// With `repair`: also clear topics most brokers do not hold.
    #[serde(default)]
    pub delete_extra: bool,
}

/// One broker's snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrokerSnapshot {
    /// Broker name.
    pub name: String,
    /// Retained messages under its rules (`None`: the snapshot failed).
    pub retained: Option<u64>,
    /// Why the snapshot failed.
    pub error: Option<String>,
}

/// Differences between two brokers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairDiff {
    /// First broker.
    pub first: String,
    /// Second broker.
    pub second: String,
    /// Topics only the first holds.
    pub only_first: u64,
    /// Topics only the second holds.
    pub only_second: u64,
    /// Topics both hold with different values.
    pub different: u64,
}

/// What a reconciliation found and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Every member's snapshot.
    pub brokers: Vec<BrokerSnapshot>,
    /// Per pair of brokers whose snapshots succeeded.
    pub pairs: Vec<PairDiff>,
    /// Topics the brokers disagree on.
    pub differing_topics: u64,
    /// The first [`MAX_LISTED`] of them, with what each broker holds.
    pub topics: Vec<TopicDiff>,
    /// Repairs were asked for.
    pub repair: bool,
    /// Retained messages written.
    pub written: u64,
    /// Retained topics cleared (`delete_extra`).
    pub deleted: u64,
    /// Topics left alone because a retained message on them was forwarded during the run
    /// (the snapshot may be older than the brokers).
    pub changed_during_run: u64,
    /// Repairs the previous run wrote and this one found needed again: not repeated (the
    /// broker does not keep what is written there: an ACL, a retain limit…).
    #[serde(default)]
    pub not_repeated: u64,
    /// What this run did not do, and why (deletions without every snapshot, repairs not
    /// repeated), one line each.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Counters of every reconciliation and seeding of this process, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ReconcileStats {
    /// Reconciliations run.
    pub(crate) runs: AtomicU64,
    /// Snapshots that failed.
    pub(crate) snapshot_failures: AtomicU64,
    /// Topics that differed at the last reconciliation.
    pub(crate) last_differences: AtomicU64,
    /// Retained messages written or cleared by repairs.
    pub(crate) repaired: AtomicU64,
    /// Retained messages handed to brokers added at run time.
    pub(crate) seeded: AtomicU64,
    /// The writes of the last run with repairs, as (broker, topic, value): the same write
    /// planned again means it did not take (see [`ReconcileReport::not_repeated`]).
    pub(crate) last_written: std::sync::Mutex<std::collections::HashSet<(String, String, u64)>>,
}

/// What identifies a write of `value` to `topic` on `broker` across runs.
fn write_key(broker: &str, topic: &str, value: &super::Value) -> (String, String, u64) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    (broker.to_string(), topic.to_string(), h.finish())
}

/// Snapshots of `members`, taken side by side, in their order; failures are counted in
/// `stats` (the callers say what each one means).
async fn snapshots(
    members: &[Member],
    instance: &str,
    limits: Limits,
    stats: &ReconcileStats,
) -> Vec<Result<Snapshot, snapshot::SnapshotError>> {
    let tasks: Vec<_> = members
        .iter()
        .map(|m| {
            let (settings, rules, instance) =
                (m.settings.clone(), m.rules.clone(), instance.to_string());
            tokio::spawn(async move { snapshot::take(&settings, &rules, &instance, limits).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        let result = t.await.unwrap_or_else(|e| {
            Err(snapshot::SnapshotError::Connection(format!(
                "snapshot task: {e}"
            )))
        });
        if result.is_err() {
            stats.snapshot_failures.fetch_add(1, Ordering::Relaxed);
        }
        out.push(result);
    }
    out
}

/// Compares the retained messages of `members` (in priority order) and, when asked, repairs
/// them.
pub(crate) async fn reconcile(
    members: &[Member],
    request: ReconcileRequest,
    router: &Router,
    instance: &str,
    limits: Limits,
    stats: &ReconcileStats,
) -> ReconcileReport {
    let watch = router.watch_retained();
    let snaps = snapshots(members, instance, limits, stats).await;
    let mut report = ReconcileReport {
        repair: request.repair,
        ..ReconcileReport::default()
    };
    let ok = taken(members, snaps, &mut report);
    let takes: Vec<Takes<'_>> = ok
        .iter()
        .map(|(m, _)| {
            Box::new(move |t: &str| m.rules.outbound(t).is_some()) as Box<dyn Fn(&str) -> bool>
        })
        .collect();
    let views: Vec<View<'_>> = ok
        .iter()
        .zip(&takes)
        .map(|((m, s), takes)| View {
            name: &m.name,
            held: s,
            takes: takes.as_ref(),
        })
        .collect();
    let mut plan = plan(&views, request.delete_extra);
    if request.delete_extra && ok.len() < members.len() {
        // A broker left out may hold what the others lack: "most brokers" is unknown.
        let skipped = plan
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Delete { .. }))
            .count();
        plan.actions.retain(|a| !matches!(a, Action::Delete { .. }));
        if skipped > 0 {
            report.notes.push(format!(
                "{skipped} deletions not done: not every broker's snapshot was taken, so whether most brokers hold those topics is unknown"
            ));
        }
    }
    report.pairs = plan
        .pairs
        .iter()
        .map(|(a, b, x, y, z)| PairDiff {
            first: a.clone(),
            second: b.clone(),
            only_first: *x,
            only_second: *y,
            different: *z,
        })
        .collect();
    report.differing_topics = plan.topics.len() as u64;
    report.topics = plan.topics.into_iter().take(MAX_LISTED).collect();
    if request.repair {
        carry_out(&plan.actions, members, &watch, stats, &mut report);
    }
    stats.runs.fetch_add(1, Ordering::Relaxed);
    stats
        .last_differences
        .store(report.differing_topics, Ordering::Relaxed);
    info!(
        differing_topics = report.differing_topics,
        written = report.written,
        deleted = report.deleted,
        changed_during_run = report.changed_during_run,
        "reconciliation done"
    );
    report
}

/// Queues the repairs of `actions` for their brokers: not one the previous run wrote and that
/// is needed again (counted, noted), nor one of a topic that changed while the snapshots were
/// taken.
fn carry_out(
    actions: &[Action],
    members: &[Member],
    watch: &crate::router::RetainedWatch<'_>,
    stats: &ReconcileStats,
    report: &mut ReconcileReport,
) {
    let mut changed = std::collections::HashSet::new();
    let last = std::mem::take(&mut *stats.last_written.lock().unwrap_or_else(|p| p.into_inner()));
    let mut written_now = std::collections::HashSet::new();
    for action in actions {
        let key = match action {
            Action::Write { broker, held, .. } => Some(write_key(
                broker,
                held.msg.topic_str().unwrap_or_default(),
                &held.value,
            )),
            Action::Delete { .. } => None,
        };
        if let Some(key) = key.as_ref().filter(|k| last.contains(*k)) {
            // Written last time and still different: writing it again would not help.
            report.not_repeated += 1;
            written_now.insert(key.clone());
            continue;
        }
        let (broker, topic, held, from) = match action {
            Action::Write { broker, held, from } => (
                broker,
                held.msg.topic_str().unwrap_or_default().to_string(),
                Some(held),
                from.as_str(),
            ),
            Action::Delete { broker, topic } => (broker, topic.clone(), None, broker.as_str()),
        };
        if watch.changed(&topic) {
            changed.insert(topic);
            continue;
        }
        let Some(member) = members.iter().find(|m| &m.name == broker) else {
            continue;
        };
        let msg = retained_message(&topic, held);
        member
            .queue
            .push(Outbound::new(Arc::new(msg), None, from.into()));
        written_now.extend(key);
        if held.is_some() {
            report.written += 1;
        } else {
            report.deleted += 1;
        }
    }
    report.changed_during_run = changed.len() as u64;
    *stats.last_written.lock().unwrap_or_else(|p| p.into_inner()) = written_now;
    if report.not_repeated > 0 {
        let note = format!(
            "{} repairs written by the previous run were needed again: not repeated (the brokers do not keep them: an ACL refusing the bridge's publish, a retain limit?)",
            report.not_repeated
        );
        warn!("{note}");
        report.notes.push(note);
    }
    stats
        .repaired
        .fetch_add(report.written + report.deleted, Ordering::Relaxed);
}

/// The members whose snapshot was taken, with it; every member's row in `report`.
fn taken<'a>(
    members: &'a [Member],
    snaps: Vec<Result<Snapshot, super::snapshot::SnapshotError>>,
    report: &mut ReconcileReport,
) -> Vec<(&'a Member, Snapshot)> {
    let mut ok: Vec<(&Member, Snapshot)> = Vec::new();
    for (m, s) in members.iter().zip(snaps) {
        match s {
            Ok(s) => {
                report.brokers.push(BrokerSnapshot {
                    name: m.name.clone(),
                    retained: Some(s.len() as u64),
                    error: None,
                });
                ok.push((m, s));
            }
            Err(e) => {
                warn!(broker = %m.name, error = %e, "reconcile: no snapshot of this broker; it is left out");
                report.brokers.push(BrokerSnapshot {
                    name: m.name.clone(),
                    retained: None,
                    error: Some(e.to_string()),
                });
            }
        }
    }
    ok
}

/// Hands a broker added at run time the retained messages of its live peers: their snapshots
/// are compared like a reconciliation (the new broker counted as holding nothing) and what
/// wins is queued for it. Returns the number queued.
pub(crate) async fn seed(
    new: &Member,
    peers: &[Member],
    router: &Router,
    instance: &str,
    limits: Limits,
    stats: &ReconcileStats,
) -> u64 {
    let watch = router.watch_retained();
    let snaps = snapshots(peers, instance, limits, stats).await;
    let mut ok: Vec<(&Member, Snapshot)> = Vec::new();
    for (m, s) in peers.iter().zip(snaps) {
        match s {
            Ok(s) => ok.push((m, s)),
            Err(e) => {
                warn!(broker = %new.name, peer = %m.name, error = %e, "no snapshot of this peer for the added broker");
            }
        }
    }
    if ok.is_empty() && !peers.is_empty() {
        warn!(broker = %new.name, "no peer snapshot: the added broker gets retained messages only as they are published");
        return 0;
    }
    let empty = Snapshot::new();
    let peer_takes = |_: &str| false;
    let new_takes = |t: &str| new.rules.outbound(t).is_some();
    let mut views: Vec<View<'_>> = ok
        .iter()
        .map(|(m, s)| View {
            name: &m.name,
            held: s,
            takes: &peer_takes,
        })
        .collect();
    views.push(View {
        name: &new.name,
        held: &empty,
        takes: &new_takes,
    });
    let mut queued = 0;
    for action in plan(&views, false).actions {
        if let Action::Write { broker, held, from } = action
            && broker == new.name
        {
            let topic = held.msg.topic_str().unwrap_or_default().to_string();
            if watch.changed(&topic) {
                continue;
            }
            let msg = retained_message(&topic, Some(&held));
            new.queue
                .push(Outbound::new(Arc::new(msg), None, from.as_str().into()));
            queued += 1;
        }
    }
    stats.seeded.fetch_add(queued, Ordering::Relaxed);
    info!(broker = %new.name, retained = queued, peers = ok.len(), "added broker seeded with the retained messages of its peers");
    queued
}
