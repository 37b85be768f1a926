//! What the supervisor reports: a status row per link with what the probes show of the pairs
//! into it, the mesh's instances, the lag matrix, and readiness (its start-up latch decided
//! by [`super::plan::start_blockers`]).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Supervisor, plan};
use crate::probe::{Matrix, ProbeBook};
use crate::status::{BrokerStatus, InstanceStatus, ReadyReport};

impl Supervisor {
    /// The status of every link, by name, with what the probes show of the pairs into it.
    pub(crate) fn status(&self) -> Vec<BrokerStatus> {
        self.status_with(&self.matrix())
    }

    /// [`Self::status`] with the probes' `matrix` already taken.
    pub(crate) fn status_with(&self, matrix: &Matrix) -> Vec<BrokerStatus> {
        self.links
            .values()
            .map(|l| {
                let mut row = l.status();
                row.replication_in = matrix
                    .pairs
                    .iter()
                    .filter(|p| p.target == row.name)
                    .cloned()
                    .collect();
                row.cut_off = matrix.cut_off(&row.name);
                row
            })
            .collect()
    }

    pub(super) fn lock_probes(&self) -> std::sync::MutexGuard<'_, ProbeBook> {
        self.probes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lag matrix of this process's probes.
    pub(crate) fn matrix(&self) -> Matrix {
        self.lock_probes().matrix(std::time::Instant::now())
    }

    /// The lag histograms, for `/metrics`.
    pub(crate) fn lag_histograms(&self) -> crate::probe::LagFamily {
        self.lock_probes().lag_family()
    }

    /// The mesh's instances, from what every broker this process is connected to shows.
    pub(crate) fn instances(&self) -> Vec<InstanceStatus> {
        let me = &self.ha.identity.instance;
        let mut all: BTreeMap<String, InstanceStatus> = BTreeMap::new();
        for (broker, link) in &self.links {
            let ha = link.consumption.borrow().status.clone();
            for (name, live, started, admin) in ha.seen {
                let row = all.entry(name.clone()).or_insert_with(|| InstanceStatus {
                    this: name == *me,
                    name: name.clone(),
                    admin,
                    started: humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(started),
                    )
                    .to_string(),
                    live_on: Vec::new(),
                    gone_on: Vec::new(),
                    owns: Vec::new(),
                });
                if live {
                    row.live_on.push(broker.clone());
                } else {
                    row.gone_on.push(broker.clone());
                }
                if live && ha.owner.as_deref() == Some(name.as_str()) {
                    row.owns.push(broker.clone());
                }
            }
        }
        all.into_values().collect()
    }

    /// Ready (for a load balancer, keepalived, a deploy script: the mesh replicates through this
    /// process) once every link started with the process either has a consumer with its
    /// subscriptions in place (this process, or the live owner another process is, as the
    /// broker's records show) or cannot reach its broker (an error is shown in status); and
    /// while at least one link is connected and the spool's disk takes writes. The first part
    /// is a start-up latch: once met it is not asked again, so a failover or a broker added at
    /// run time does not make the process unready.
    pub(crate) fn ready(&mut self) -> ReadyReport {
        let (mut waiting, mut unconsumed) = (Vec::new(), Vec::new());
        if !self.started {
            let views = self
                .links
                .values()
                .filter(|l| l.at_start)
                .map(|l| plan::StartView {
                    name: &l.broker.name,
                    consumed: l.consumption.borrow().ever,
                    connected: l.stats.state().0 == crate::metrics::LinkState::Connected,
                    failing: l.stats.last_error().is_some(),
                    ever_connected: l.stats.ever_connected.load(Ordering::Relaxed),
                });
            (waiting, unconsumed) = plan::start_blockers(views);
            self.started = waiting.is_empty() && unconsumed.is_empty();
        }
        let connected = self
            .links
            .values()
            .filter(|l| l.stats.state().0 == crate::metrics::LinkState::Connected)
            .count();
        let spool_error = self.spool.health().error;
        ReadyReport {
            ready: self.started && connected > 0 && spool_error.is_none(),
            waiting,
            unconsumed,
            connected,
            spool_error,
        }
    }
}
