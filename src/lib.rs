//! meshbridge: keeps several independent MQTT brokers in sync.
//!
//! One [`link`] task per broker holds an MQTT client connection (TLS by default), subscribes the
//! configured filters and hands every message it receives to the [`router`], which queues it for
//! every *other* link. Each link publishes its queue to its broker and reports acknowledgements
//! back, so the origin broker is acknowledged only once the targets have the message.
//!
//! Loops are prevented in layers: MQTT 5 links subscribe with No Local and tag what they forward
//! (a tagged message is never forwarded again); MQTT 3.1.1 links drop the echoes of their own
//! publishes with a bounded [`dedup`] window; a storm guard drops what still goes round.
//!
//! Layout, lowest first (a module imports only from the ones above it in this list):
//! - vocabulary and leaf services, importing nothing of the crate: [`message`] (the
//!   protocol-neutral message, [`message::Protocol`], the acknowledgement owed to an origin),
//!   [`tls`] (rustls client configurations from PEM files, read again at every new connection
//!   when they changed), [`dedup`] (the echo window and the
//!   storm guard, pure), [`topics`] (every `$meshbridge/<id>/` topic and client id of the mesh,
//!   pure), [`files`] (files only their owner reads), [`ratelimit`] (one log line per key and interval, pure), [`rules`]
//!   (per-broker topic rules: filters, directions, QoS caps, prefix mapping; pure), [`policy`]
//!   (a link's timing rules, one struct), [`seal`] (the mesh key: sealing and opening control
//!   payloads, derived client ids; pure), [`ha`] (which instance of a mesh consumes which broker:
//!   `mod.rs` the records and the decision, `role.rs` the role of one link as a state machine
//!   returning actions; pure, uses `policy` and `seal`'s skew); [`metrics`] (metric names,
//!   per-link counters, log-and-count functions) uses only `ratelimit` and `seal`'s kinds.
//! - [`config`]: `bridge.toml`, validated into [`config::Config`] with errors that name the key;
//!   owner of every default. `file.rs` the file as written and its validation, `broker.rs` one
//!   broker, `address.rs` names and addresses.
//! - [`spool`]: the durable per-target spool: `mod.rs` the store (redb) and its API, `writer.rs`
//!   the group-commit thread, `record.rs` the versioned on-disk record, `target.rs` one target's
//!   counters and the rows held in memory while the disk fails, `store.rs` the database handle
//!   and its health, `dead.rs` the dead-letter table (messages a target cannot take).
//! - [`park`], its data half: `mod.rs` the park records (copies of spooled messages kept on
//!   their origin brokers, docs/HA.md), `lane.rs` the copy lane of each origin broker, the
//!   parker that fills them and which origins hold copies, `drains.rs` which park sessions an
//!   owner has read (pure).
//! - [`router`]: `mod.rs` the fan-out (and the retained watch a reconciliation uses),
//!   `outbound.rs` a message on its way to one target, `queue.rs` a target's queue in front of
//!   its spool, `spooled.rs` the durable part of a queue (the spool, the copies it parks).
//! - [`link`]: one task per broker; `mod.rs` the connection loop, `intake.rs` what the broker
//!   sends into the fan-out, `deliver.rs` what the queue holds out to the broker, `events.rs`
//!   the connection's events and subscriptions, `role.rs` the control records and the role's
//!   actions carried out; `acks.rs` what it owes its broker and `outflight.rs` what one
//!   connection has not seen acknowledged, `poison.rs` which message the broker closes the
//!   connection on (pure state machines), `session.rs` the rumqttc client and driver,
//!   `backoff.rs`, `threads.rs` the threads the links run on. Beside it, [`park`]'s I/O half:
//!   `io.rs` the park sessions and the copy publisher.
//! - [`probe`]: end-to-end probes: `mod.rs` the bookkeeping (lag, loss, stalled pairs, the
//!   matrix; pure), `client.rs` the probe client of one broker. [`reconcile`]: the brokers'
//!   retained messages compared and repaired: `mod.rs` the comparison and the rule for
//!   conflicts (pure), `snapshot.rs` one broker's snapshot, `run.rs` a reconciliation and the
//!   seeding of a broker added at run time.
//! - [`membership`]: run-time membership changes persisted under `data_dir`; [`status`]: a
//!   link's status row and readiness.
//! - [`supervisor`]: owns the links; start, add/remove at run time, reload (a broker whose
//!   connection settings changed gets its link restarted on the same queue), readiness,
//!   ordered shutdown; what a reload does to each broker and what holds readiness back at
//!   start-up are decided in `supervisor/plan.rs` (pure, unit-tested); `handle.rs` is a
//!   running link's handle and how links stop, `report.rs` the status rows and readiness.
//! - [`admin`]: the HTTP API: `server.rs` (accept loop with limits, routes), `exposition.rs`
//!   (Prometheus text), `client.rs` (the CLI side).
//! - [`cli`], [`certs`] (`bridge certs`), [`demo`] (`bridge demo`), [`import`] (`bridge
//!   import-mosquitto`), and [`testing`] (what the
//!   integration tests and meshbench use of the insides).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// The map above names the private modules: read it with `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub mod admin;
pub mod certs;
pub mod cli;
pub mod config;
pub(crate) mod dedup;
pub mod demo;
pub(crate) mod doorbell;
pub(crate) mod files;
pub(crate) mod ha;
pub mod import;
pub(crate) mod link;
pub(crate) mod membership;
pub mod message;
pub(crate) mod metrics;
pub(crate) mod park;
pub(crate) mod policy;
pub mod probe;
pub(crate) mod ratelimit;
pub mod reconcile;
pub(crate) mod router;
pub mod rules;
pub mod seal;
pub mod spool;
pub(crate) mod status;
pub(crate) mod supervisor;
pub mod testing;
pub(crate) mod tls;
pub(crate) mod topics;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The admin API address cannot be bound.
    #[error("bridge.admin_listen: cannot listen on {addr}: {source}")]
    AdminBind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The persisted membership cannot be read.
    #[error("{0}")]
    Start(#[from] supervisor::ChangeError),
    /// The spool cannot be opened (in use, unreadable).
    #[error("{0}")]
    Spool(#[from] spool::SpoolError),
    /// The threads that run the links cannot be started.
    #[error("cannot start the link threads: {0}")]
    Threads(std::io::Error),
}

/// How the process controls a running bridge.
#[derive(Debug)]
pub struct Control {
    /// Cancelled on SIGTERM/SIGINT: drain and return.
    pub shutdown: CancellationToken,
    /// One item per SIGHUP: reload the config file.
    pub reload: mpsc::UnboundedReceiver<()>,
    /// The config file, for reloads.
    pub config_path: Option<PathBuf>,
    /// Move a damaged spool file aside and start with an empty spool (`--spool-recover`).
    pub spool_recover: bool,
}

/// Runs the bridge until `control.shutdown` is cancelled, then drains and returns.
pub async fn run(config: config::Config, mut control: Control) -> Result<(), RunError> {
    let drain_timeout = config.drain_timeout;
    let reconcile_interval = config.reconcile_interval;
    let admin_addr = config.admin_listen;
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| RunError::AdminBind {
            addr: admin_addr,
            source,
        })?;
    info!(
        bridge = %config.bridge_id,
        brokers = config.brokers.len(),
        topics = ?config.topics,
        admin = %admin_addr,
        "bridge starting"
    );
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let token = config.admin_token.clone();
    let spool = if control.spool_recover {
        spool::Spool::open_recovering(&config.data_dir, config.spool)?
    } else {
        spool::Spool::open(&config.data_dir, config.spool)?
    };
    let threads = link::threads::LinkThreads::start(
        config
            .worker_threads
            .unwrap_or_else(link::threads::LinkThreads::default_count),
        config.links_per_thread,
    )
    .map_err(RunError::Threads)?;
    let supervisor = Arc::new(Mutex::new(supervisor::Supervisor::start(
        config,
        spool.clone(),
        threads,
    )?));
    let admin_stop = CancellationToken::new();
    let periodic = (!reconcile_interval.is_zero()).then(|| {
        tokio::spawn(reconcile_every(
            supervisor.clone(),
            reconcile_interval,
            admin_stop.clone(),
        ))
    });
    let admin = tokio::spawn(admin::server::serve(
        listener,
        admin::server::AdminState::new(supervisor.clone(), token, drain_timeout),
        admin_stop.clone(),
    ));
    loop {
        tokio::select! {
            _ = control.shutdown.cancelled() => break,
            Some(()) = control.reload.recv() => reload(&supervisor, control.config_path.as_deref(), drain_timeout).await,
        }
    }
    info!("shutting down: draining in-flight messages");
    let links = supervisor.lock().await.take_all();
    supervisor::shutdown_links(links, drain_timeout).await;
    spool.close();
    admin_stop.cancel();
    let _ = admin.await;
    if let Some(p) = periodic {
        let _ = p.await;
    }
    info!("bridge stopped");
    Ok(())
}

/// `reconcile_interval`: a reconciliation with repairs (never deletions) every `interval`, run
/// by the process that consumes the first broker (one per mesh).
async fn reconcile_every(
    supervisor: Arc<Mutex<supervisor::Supervisor>>,
    interval: std::time::Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let (members, (router, instance, limits, stats)) = {
            let sup = supervisor.lock().await;
            if !sup.leads_reconcile() {
                continue;
            }
            (sup.members(), sup.reconcile_context())
        };
        let request = reconcile::run::ReconcileRequest {
            repair: true,
            delete_extra: false,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = reconcile::run::reconcile(&members, request, &router, &instance, limits, &stats) => {}
        }
    }
}

/// SIGHUP: re-read the config file and apply broker additions and removals.
async fn reload(
    supervisor: &Mutex<supervisor::Supervisor>,
    path: Option<&std::path::Path>,
    drain_timeout: std::time::Duration,
) {
    let Some(path) = path else { return };
    let new = match config::Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "reload refused: the running configuration is kept");
            return;
        }
    };
    let changes = config::diff(supervisor.lock().await.config(), &new);
    let restart: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            config::Change::NeedsRestart(key) => Some(key.as_str()),
            _ => None,
        })
        .collect();
    if !restart.is_empty() {
        error!(
            changed = %restart.join("; "),
            "reload refused: these settings need a restart of the process (SIGHUP applies the [[broker]] list: additions, removals, rules, connection settings); the running configuration is kept"
        );
        return;
    }
    let (started, gone, restarts) = supervisor.lock().await.reload(new, &changes);
    let removed: Vec<String> = gone.iter().map(|h| h.broker.name.clone()).collect();
    let restarted: Vec<String> = restarts.iter().map(|r| r.new.name.clone()).collect();
    info!(?started, ?removed, ?restarted, "configuration reloaded");
    supervisor::restart_links(supervisor, restarts).await;
    for name in &started {
        // Say when what is published on the added broker reaches the mesh (or that it does
        // not yet), as `add-broker` answers it.
        let consumption = supervisor.lock().await.consumption(name);
        let name = name.clone();
        tokio::spawn(async move {
            if supervisor::consumed_within(consumption, supervisor::ADD_WAIT).await {
                info!(broker = %name, "added broker consumed: its subscriptions are in place");
            } else {
                tracing::warn!(broker = %name, "added broker not consumed yet (see `bridge status`, SUBSCRIBED)");
            }
        });
    }
    supervisor::shutdown_links(gone, drain_timeout).await;
    supervisor.lock().await.drained(&removed);
}
