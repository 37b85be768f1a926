//! Owns the set of links: starts one task per broker, registers its queue with the router,
//! applies additions and removals at run time (persisting them), and shuts everything down in
//! order (stop intake → drain → disconnect).
//!
//! Its parts: [`handle`] (what it keeps of a running link, and how links stop), [`plan`] (its
//! decisions, pure: what a reload changes, what holds readiness back at start) and [`report`]
//! (status rows, instances, the lag matrix, readiness).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{BrokerConfig, BrokerSection, Change, Config, ConfigError};
use crate::ha::Consumption;
use crate::link::threads::LinkThreads;
use crate::link::{self, LinkContext, session::SessionSettings};
use crate::membership::{AddedBroker, Membership, MembershipError};
use crate::metrics::LinkStats;
use crate::probe::ProbeBook;
use crate::reconcile::run::{Member, ReconcileStats};
use crate::router::{Router, TargetQueue};
use crate::spool::Spool;
use crate::status::BrokerStatus;

mod handle;
mod plan;
mod report;

pub(crate) use handle::{LinkHandle, Restart, restart_links, shutdown_links};

/// Why a membership change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The request itself is wrong (bad address, name, protocol…).
    #[error("{0}")]
    Invalid(String),
    /// A broker with that name or address is already a member.
    #[error("{0}")]
    Conflict(String),
    /// No such broker.
    #[error("no broker named or addressed {0:?}")]
    NotFound(String),
    /// The change could not be persisted (it was not applied).
    #[error("{0}")]
    Persist(#[from] MembershipError),
}

impl From<ConfigError> for ChangeError {
    fn from(e: ConfigError) -> Self {
        ChangeError::Invalid(e.to_string())
    }
}

/// Logs the warnings of `brokers`, each distinct one once with the brokers it concerns (32
/// brokers sharing one key file make one line, not 32).
fn log_warnings(brokers: &[BrokerConfig]) {
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for b in brokers {
        let tls_off = b.tls.is_none().then(|| "TLS is off".to_string());
        for text in b.warnings.iter().cloned().chain(tls_off) {
            match groups.iter_mut().find(|(t, _)| *t == text) {
                Some((_, names)) => names.push(&b.name),
                None => groups.push((text, vec![&b.name])),
            }
        }
    }
    for (text, names) in groups {
        warn!(brokers = %names.join(","), "{text}");
    }
}

/// How long an addition (`add-broker`, SIGHUP) waits for the new broker's consumer to have its
/// subscriptions in place before it reports the broker as added but not consumed yet.
pub(crate) const ADD_WAIT: Duration = Duration::from_secs(10);

/// Whether some consumer of the broker behind `consumption` had its subscriptions in place
/// within `within` (at once if it had already).
pub(crate) async fn consumed_within(
    consumption: Option<watch::Receiver<Consumption>>,
    within: Duration,
) -> bool {
    let Some(mut rx) = consumption else {
        return false;
    };
    tokio::time::timeout(within, rx.wait_for(|c| c.ever))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// The running mesh.
#[derive(Debug)]
pub(crate) struct Supervisor {
    config: Config,
    router: Arc<Router>,
    spool: Arc<Spool>,
    links: BTreeMap<String, LinkHandle>,
    membership: Membership,
    /// Names of the brokers that come from the config file.
    from_config: HashSet<String>,
    /// Where the links run.
    threads: LinkThreads,
    /// Brokers taken out whose links are still draining: their spool table is deleted when
    /// the drain ends, so a broker of the same name may not start before (see [`Self::drained`]).
    draining: HashSet<String>,
    /// This process among the mesh's instances.
    ha: Arc<link::HaContext>,
    /// Copies of spooled messages on the origin brokers.
    parker: Option<Arc<crate::park::Parker>>,
    /// The end-to-end probes of this process.
    probes: Arc<std::sync::Mutex<ProbeBook>>,
    /// This run of the process, in the probes' payloads.
    probe_run: u64,
    /// Stops the probe watcher.
    probe_watch: CancellationToken,
    /// Counters of the reconciliations.
    reconcile_stats: Arc<ReconcileStats>,
    /// Readiness's start-up condition was met once (see [`Self::ready`]).
    started: bool,
    /// The links of the config are being started: their warnings are logged together.
    starting: bool,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.probe_watch.cancel();
        for l in self.links.values() {
            l.probe_stop.cancel();
        }
    }
}

impl Supervisor {
    /// Starts a link for every broker of the config, with the persisted membership changes
    /// applied (see [`crate::membership`] for the precedence).
    /// Spools of brokers that are no longer members are deleted. The links run on `threads`.
    pub(crate) fn start(
        config: Config,
        spool: Arc<Spool>,
        threads: LinkThreads,
    ) -> Result<Self, ChangeError> {
        let membership = Membership::load(&config.data_dir)?;
        let ha = Arc::new(link::HaContext {
            identity: crate::ha::Identity::new(
                &config.instance,
                &config.admin_listen.to_string(),
                &config.prefer,
            ),
            control: crate::topics::Control::new(&config.bridge_id),
            will_delay: config.will_delay,
            enabled: config.ha,
            queue_limit: config.broker_queue_limit,
            key: config.mesh_key.clone(),
        });
        info!(instance = %config.instance, "instance of mesh {:?}", config.bridge_id);
        let router = Arc::new(Router::default());
        // Copies of what is spooled go to the origin brokers (docs/HA.md) unless coordination
        // is off (brokers that refuse `$` topics).
        let parker = config.ha.then(|| {
            Arc::new(crate::park::Parker::new(
                crate::park::spool_id(&config.data_dir),
                config.queue_capacity,
            ))
        });
        let probes = Arc::new(std::sync::Mutex::new(ProbeBook::new(
            config.probe_interval,
            config.probe_stall_after,
        )));
        let probe_watch = CancellationToken::new();
        if !config.probe_interval.is_zero() {
            tokio::spawn(crate::probe::client::watch(
                probes.clone(),
                probe_watch.clone(),
            ));
        }
        let mut sup = Supervisor {
            probes,
            probe_run: crate::ha::unix_ms(),
            probe_watch,
            reconcile_stats: Arc::default(),
            ha,
            parker,
            threads,
            router,
            spool,
            links: BTreeMap::new(),
            from_config: config.brokers.iter().map(|b| b.name.clone()).collect(),
            membership,
            config,
            draining: HashSet::new(),
            started: false,
            starting: true,
        };
        sup.start_members();
        Ok(sup)
    }

    /// Starts the link of every member: the config file's brokers not removed at run time, then
    /// those added at run time; discards the spools of brokers that are no member any more.
    fn start_members(&mut self) {
        for broker in self.config.brokers.clone() {
            if self.membership.removed.contains(&broker.name) {
                info!(broker = %broker.name, "not started: removed at run time (data_dir/membership.json)");
                continue;
            }
            self.spawn(broker);
        }
        for added in self.membership.added.clone() {
            if self.links.contains_key(&added.name) {
                warn!(broker = %added.name, "persisted addition ignored: the config file has a broker of that name");
                continue;
            }
            if let Err(e) = self
                .build(&added)
                .and_then(|b| self.spawn_member(b).map(|_| ()))
            {
                warn!(broker = %added.name, error = %e, "persisted addition ignored");
            }
        }
        let started: Vec<BrokerConfig> = self.links.values().map(|l| l.broker.clone()).collect();
        log_warnings(&started);
        self.starting = false;
        self.spool
            .discard_others(&self.links.keys().cloned().collect());
        for link in self.links.values_mut() {
            link.at_start = true;
        }
    }

    fn build(&self, spec: &AddedBroker) -> Result<BrokerConfig, ChangeError> {
        let section = BrokerSection {
            name: (!spec.name.is_empty()).then(|| spec.name.clone()),
            address: spec.address.clone(),
            protocol: Some(spec.protocol),
            tls: Some(spec.tls),
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: spec.server_name.clone(),
            insecure_skip_verify: None,
            username: None,
            password_file: None,
            max_qos: None,
            drain_rate: None,
            rules: spec.rules.clone(),
        };
        Ok(self.config.broker_from_section("broker", section)?)
    }

    /// `broker` with its endpoints, unless a running link is that broker already (by address
    /// text, or an endpoint in common: see [`BrokerConfig::same_broker`]).
    fn not_a_member(
        &self,
        broker: BrokerConfig,
    ) -> Result<(BrokerConfig, Vec<std::net::SocketAddr>), ChangeError> {
        let endpoints = broker.endpoints(true);
        if let Some(other) = self
            .links
            .values()
            .find(|l| l.broker.same_broker(&l.endpoints, &broker, &endpoints))
        {
            return Err(ChangeError::Conflict(format!(
                "{} is already in the mesh as {:?} ({})",
                broker.address(),
                other.broker.name,
                other.broker.address()
            )));
        }
        Ok((broker, endpoints))
    }

    /// Starts `broker` unless a running link is that broker already ([`Self::not_a_member`]).
    fn spawn_member(&mut self, broker: BrokerConfig) -> Result<&LinkHandle, ChangeError> {
        let (broker, endpoints) = self.not_a_member(broker)?;
        Ok(self.spawn_resolved(broker, endpoints))
    }

    fn spawn(&mut self, broker: BrokerConfig) -> &LinkHandle {
        let endpoints = broker.endpoints(true);
        self.spawn_resolved(broker, endpoints)
    }

    fn spawn_resolved(
        &mut self,
        broker: BrokerConfig,
        endpoints: Vec<std::net::SocketAddr>,
    ) -> &LinkHandle {
        let stats = Arc::new(LinkStats::default());
        let mut queue = TargetQueue::with_spool(
            self.config.queue_capacity,
            stats.clone(),
            self.spool.clone(),
            &broker.name,
        )
        .with_rules(broker.rules.clone());
        if let Some(p) = &self.parker {
            queue = queue.with_parker(p.clone(), &broker.name);
        }
        self.spawn_link(broker, endpoints, Arc::new(queue), stats)
    }

    /// Starts the link (and probe client) of `broker` on `queue`.
    fn spawn_link(
        &mut self,
        broker: BrokerConfig,
        endpoints: Vec<std::net::SocketAddr>,
        queue: Arc<TargetQueue>,
        stats: Arc<LinkStats>,
    ) -> &LinkHandle {
        let name: Arc<str> = broker.name.as_str().into();
        let (drained_tx, drained) = watch::channel(false);
        let (consumption_tx, consumption) = watch::channel(Consumption::default());
        let restarting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = CancellationToken::new();
        let disconnect = CancellationToken::new();
        if !self.starting {
            // At start they are logged once for every broker (see `log_warnings`).
            log_warnings(std::slice::from_ref(&broker));
        }
        let ctx = LinkContext {
            settings: self.session_settings(&broker),
            name: name.clone(),
            bridge_id: self.config.bridge_id.as_str().into(),
            ha: self.ha.clone(),
            parker: self.parker.clone(),
            router: self.router.clone(),
            queue: queue.clone(),
            stats: stats.clone(),
            dedup_window: self.config.dedup_window,
            dedup_max_entries: self.config.dedup_max_entries,
            storm_threshold: self.config.storm_threshold,
            probes: !self.config.probe_interval.is_zero(),
            stop: stop.clone(),
            disconnect: disconnect.clone(),
            drained: drained_tx,
            consumption: consumption_tx,
            restarting: restarting.clone(),
        };
        let probe_stop = CancellationToken::new();
        if !self.config.probe_interval.is_zero() {
            self.lock_probes()
                .add_broker(&name, std::time::Instant::now());
            tokio::spawn(crate::probe::client::run(
                crate::probe::client::ProbeContext {
                    settings: ctx.settings.clone(),
                    name: name.clone(),
                    control: self.ha.control.clone(),
                    instance: self.ha.identity.instance.as_str().into(),
                    run: self.probe_run,
                    book: self.probes.clone(),
                    key: self.config.mesh_key.clone(),
                    stats: stats.clone(),
                    stop: probe_stop.clone(),
                },
            ));
        }
        self.router.insert(name, queue.clone());
        info!(broker = %broker.name, address = %broker.address(), protocol = %broker.protocol, "link added");
        let join = self.threads.spawn(link::run(ctx));
        let key = broker.name.clone();
        self.links.insert(
            key.clone(),
            LinkHandle {
                broker,
                stats,
                queue,
                stop,
                disconnect,
                drained,
                join,
                leaving: false,
                at_start: false,
                endpoints,
                probe_stop,
                consumption,
                restarting,
            },
        );
        &self.links[&key]
    }

    /// Adds a broker at run time: validated like a config entry, refused when its name or
    /// address is taken, persisted, then started. It receives the mesh's retained messages.
    pub(crate) fn add(&mut self, spec: AddedBroker) -> Result<BrokerStatus, ChangeError> {
        let broker = self.build(&spec)?;
        if self.draining.contains(&broker.name) {
            return Err(ChangeError::Conflict(format!(
                "{:?} was removed and is still draining (up to drain_timeout); add it again once the removal has finished",
                broker.name
            )));
        }
        if self.links.contains_key(&broker.name) {
            return Err(ChangeError::Conflict(format!(
                "a broker named {:?} exists already",
                broker.name
            )));
        }
        let (broker, endpoints) = self.not_a_member(broker)?;
        let spec = AddedBroker {
            name: broker.name.clone(),
            ..spec
        };
        let mut membership = self.membership.clone();
        membership.record_add(spec);
        membership.save(&self.config.data_dir)?;
        self.membership = membership;
        let name = broker.name.clone();
        self.spawn_resolved(broker, endpoints);
        self.seed(&name);
        info!(broker = %name, "broker added at run time");
        Ok(self.links[&name].status())
    }

    /// Hands the broker `name`, just started at run time, the retained messages of its peers,
    /// from their snapshots (not from this process's memory: it may have restarted since they
    /// were published).
    fn seed(&self, name: &str) {
        let members = self.members();
        if let Some(new) = members.iter().find(|m| m.name == name).cloned() {
            let peers: Vec<Member> = members.into_iter().filter(|m| m.name != name).collect();
            let (router, instance, limits, stats) = self.reconcile_context();
            tokio::spawn(async move {
                crate::reconcile::run::seed(&new, &peers, &router, &instance, limits, &stats).await
            });
        }
    }

    /// No more park copies for `name`, which left the mesh.
    fn forget_lane(&self, name: &str) {
        if let Some(p) = &self.parker {
            p.forget(name);
        }
    }

    /// Takes a broker out of the mesh (by name or address) and persists that; the returned
    /// handle must be shut down by the caller (outside any lock: it drains for a while).
    pub(crate) fn remove(&mut self, key: &str) -> Result<LinkHandle, ChangeError> {
        let name = self
            .links
            .values()
            .find(|l| l.broker.name == key || l.broker.address() == key)
            .map(|l| l.broker.name.clone())
            .ok_or_else(|| ChangeError::NotFound(key.to_string()))?;
        let mut membership = self.membership.clone();
        membership.record_remove(&name, self.from_config.contains(&name));
        membership.save(&self.config.data_dir)?;
        self.membership = membership;
        let handle = self
            .take_out(&name)
            .ok_or_else(|| ChangeError::NotFound(key.to_string()))?;
        info!(broker = %name, "broker removed at run time");
        Ok(handle)
    }

    /// Takes broker `name` out of the mesh: no new messages for it (what was queued is
    /// released to its origins when its link stops), no park copies, no probes; its link, if
    /// it runs, is returned marked as leaving, and the name waits for its drain (see
    /// [`Self::drained`]).
    fn take_out(&mut self, name: &str) -> Option<LinkHandle> {
        self.router.remove(name);
        self.forget_lane(name);
        self.lock_probes().remove_broker(name);
        let mut handle = self.links.remove(name)?;
        handle.leaving = true;
        self.draining.insert(name.to_string());
        Some(handle)
    }

    /// Every member, for a reconciliation: brokers of the config file first, in file order
    /// (the tie-break of [`crate::reconcile`]), then those added at run time, by name.
    pub(crate) fn members(&self) -> Vec<Member> {
        self.ordered_links()
            .into_iter()
            .map(|l| Member {
                name: l.broker.name.clone(),
                settings: self.session_settings(&l.broker),
                rules: (*l.queue.rules()).clone(),
                queue: l.queue.clone(),
            })
            .collect()
    }

    /// The links in member order: brokers of the config file in file order, then the others
    /// by name.
    fn ordered_links(&self) -> Vec<&LinkHandle> {
        let rank = |name: &str| {
            self.config
                .brokers
                .iter()
                .position(|b| b.name == name)
                .unwrap_or(usize::MAX)
        };
        let mut links: Vec<&LinkHandle> = self.links.values().collect();
        links.sort_by_key(|l| (rank(&l.broker.name), l.broker.name.clone()));
        links
    }

    /// What a reconciliation needs besides the members.
    pub(crate) fn reconcile_context(
        &self,
    ) -> (
        Arc<Router>,
        String,
        crate::reconcile::snapshot::Limits,
        Arc<ReconcileStats>,
    ) {
        (
            self.router.clone(),
            self.ha.identity.instance.clone(),
            crate::reconcile::snapshot::Limits {
                max: self.config.retained_max,
                max_bytes: self.config.retained_max_bytes,
                queue_limit: self.config.broker_queue_limit,
            },
            self.reconcile_stats.clone(),
        )
    }

    /// Counters of the reconciliations.
    pub(crate) fn reconcile_stats(&self) -> &ReconcileStats {
        &self.reconcile_stats
    }

    /// Whether this process runs the periodic reconciliation: it consumes the first member
    /// (one process of a mesh does, and it is the one that sees its brokers best).
    pub(crate) fn leads_reconcile(&self) -> bool {
        self.ordered_links()
            .first()
            .is_some_and(|l| l.consumption.borrow().by_this())
    }

    fn session_settings(&self, broker: &BrokerConfig) -> SessionSettings {
        // With a mesh key, ids no client can guess (see `seal`): every id of the mesh on this
        // broker (sessions, park, probes) starts with this one.
        let suffix = self
            .config
            .mesh_key
            .as_ref()
            .map(|key| key.client_id_suffix(&broker.name));
        let client_id =
            crate::topics::base_id(&self.config.bridge_id, &broker.name, suffix.as_deref());
        SessionSettings {
            client_id,
            keep_alive: self.config.keep_alive,
            session_expiry: self.config.session_expiry,
            inflight: self.config.inflight,
            inflight_max: self.config.inflight_max,
            publish_connections: self.config.publish_connections,
            v311_lane: self.config.v311_lane,
            broker: broker.clone(),
        }
    }

    /// Who consumes broker `name`, as its link reports it (to wait for an added broker with
    /// [`consumed_within`]).
    pub(crate) fn consumption(&self, name: &str) -> Option<watch::Receiver<Consumption>> {
        self.links.get(name).map(|l| l.consumption.clone())
    }

    /// The spool (the dead-letter listing reads it).
    pub(crate) fn spool(&self) -> Arc<Spool> {
        self.spool.clone()
    }

    /// How the spool's disk is doing.
    pub(crate) fn spool_health(&self) -> crate::spool::SpoolHealth {
        self.spool.health()
    }

    /// The running configuration.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Applies a reloaded config file (SIGHUP): brokers that appeared are started, brokers
    /// that disappeared are taken out (returned, to be shut down by the caller), brokers whose
    /// connection settings changed (address, protocol, TLS, credentials, max_qos) are returned
    /// to be restarted ([`restart_links`]), rules change in place. Persisted run-time changes
    /// keep their precedence. Process-wide settings need a restart of the process.
    pub(crate) fn reload(
        &mut self,
        new: Config,
        changes: &[Change],
    ) -> (Vec<String>, Vec<LinkHandle>, Vec<Restart>) {
        let file: Vec<&str> = new.brokers.iter().map(|b| b.name.as_str()).collect();
        let now = plan::Members {
            running: self.links.keys().map(String::as_str).collect(),
            from_config: self.from_config.iter().map(String::as_str).collect(),
            added_at_runtime: self
                .membership
                .added
                .iter()
                .map(|a| a.name.as_str())
                .collect(),
            removed_at_runtime: self.membership.removed.iter().map(String::as_str).collect(),
            draining: self.draining.iter().map(String::as_str).collect(),
        };
        let plan = plan::reload(&now, &file, changes);
        let in_file = |name: &str| new.brokers.iter().find(|b| b.name == name).cloned();
        for name in &plan.rules {
            // The fan-out and the link take the rules from the queue; the link re-subscribes
            // the difference.
            if let (Some(link), Some(b)) = (self.links.get_mut(name), in_file(name)) {
                info!(broker = %name, "topic rules changed by the reload");
                link.queue.set_rules(b.rules.clone());
                link.broker.rules = b.rules;
            }
        }
        let mut restarts = Vec::new();
        for name in &plan.restart {
            if let (Some(new), Some(old)) = (in_file(name), self.links.remove(name)) {
                restarts.push(Restart { old, new });
            }
        }
        let mut gone = Vec::new();
        for name in &plan.remove {
            if let Some(h) = self.take_out(name) {
                info!(broker = %name, "removed from the config file");
                gone.push(h);
            }
        }
        for name in &plan.wait {
            info!(broker = %name, "starts once its previous link has drained");
        }
        let mut started = Vec::new();
        for broker in plan.start.iter().filter_map(|name| in_file(name)) {
            let name = broker.name.clone();
            match self.spawn_member(broker) {
                Ok(_) => {
                    self.seed(&name);
                    started.push(name)
                }
                Err(e) => error!(broker = %name, error = %e, "not started"),
            }
        }
        self.from_config = new.brokers.iter().map(|b| b.name.clone()).collect();
        self.config.brokers = new.brokers;
        (started, gone, restarts)
    }

    /// Starts the link of `broker` again (see [`restart_links`]) on the queue and counters of
    /// the one that stopped.
    fn restarted(
        &mut self,
        broker: BrokerConfig,
        queue: Arc<TargetQueue>,
        stats: Arc<LinkStats>,
        at_start: bool,
    ) {
        let endpoints = broker.endpoints(true);
        let name = broker.name.clone();
        self.spawn_link(broker, endpoints, queue, stats);
        if let Some(l) = self.links.get_mut(&name) {
            l.at_start = at_start;
        }
    }

    /// The links of `names`, taken out by [`Self::remove`] or [`Self::reload`], have stopped
    /// and their spools are deleted: those names may be used again. A broker of the config
    /// file that waited for one of them starts now; returns the names started.
    pub(crate) fn drained(&mut self, names: &[String]) -> Vec<String> {
        let mut started = Vec::new();
        for name in names {
            self.draining.remove(name);
            let waiting = self
                .config
                .brokers
                .iter()
                .find(|b| &b.name == name)
                .cloned();
            if let Some(broker) = waiting
                && !self.links.contains_key(name)
                && !self.membership.removed.contains(name)
            {
                match self.spawn_member(broker) {
                    Ok(_) => {
                        info!(broker = %name, "previous link drained: starting the configured broker");
                        self.seed(name);
                        started.push(name.clone());
                    }
                    Err(e) => error!(broker = %name, error = %e, "not started"),
                }
            }
        }
        started
    }

    /// Takes every link out, to be stopped with [`shutdown_links`] (outside any lock).
    pub(crate) fn take_all(&mut self) -> Vec<LinkHandle> {
        std::mem::take(&mut self.links).into_values().collect()
    }
}
