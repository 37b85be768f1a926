//! Owns the set of links: starts one task per broker, registers its queue with the router, and
//! shuts them all down in order (stop intake → drain → disconnect).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{BrokerConfig, Config};
use crate::link::{self, LinkContext, session::SessionSettings};
use crate::metrics::LinkStats;
use crate::router::{Router, TargetQueue};

/// What the supervisor keeps of one running link.
#[derive(Debug)]
pub struct LinkHandle {
    /// The broker.
    pub broker: BrokerConfig,
    /// Its counters.
    pub stats: Arc<LinkStats>,
    /// Its queue.
    pub queue: Arc<TargetQueue>,
    stop: CancellationToken,
    disconnect: CancellationToken,
    drained: watch::Receiver<bool>,
    join: JoinHandle<()>,
}

/// The running mesh.
#[derive(Debug)]
pub struct Supervisor {
    config: Config,
    router: Arc<Router>,
    links: BTreeMap<String, LinkHandle>,
}

impl Supervisor {
    /// Starts a link for every broker of the config.
    pub fn start(config: Config) -> Self {
        let mut sup = Supervisor {
            router: Arc::new(Router::default()),
            links: BTreeMap::new(),
            config,
        };
        for broker in sup.config.brokers.clone() {
            sup.add(broker);
        }
        sup
    }

    /// Starts a link for `broker` (its name must not be in use).
    pub fn add(&mut self, broker: BrokerConfig) {
        let stats = Arc::new(LinkStats::default());
        let queue = Arc::new(TargetQueue::new(self.config.queue_capacity, stats.clone()));
        let name: Arc<str> = broker.name.as_str().into();
        let (drained_tx, drained) = watch::channel(false);
        let stop = CancellationToken::new();
        let disconnect = CancellationToken::new();
        if broker.tls.is_none() {
            warn!(broker = %broker.name, address = %broker.address(), "TLS is off for this broker");
        }
        let ctx = LinkContext {
            settings: SessionSettings {
                client_id: format!("{}-{}", self.config.bridge_id, broker.name),
                keep_alive: self.config.keep_alive,
                session_expiry: self.config.session_expiry,
                inflight: self.config.inflight,
                broker: broker.clone(),
            },
            name: name.clone(),
            bridge_id: self.config.bridge_id.as_str().into(),
            topics: self.config.topics.clone(),
            router: self.router.clone(),
            queue: queue.clone(),
            stats: stats.clone(),
            dedup_window: self.config.dedup_window,
            dedup_max_entries: self.config.dedup_max_entries,
            storm_threshold: self.config.storm_threshold,
            stop: stop.clone(),
            disconnect: disconnect.clone(),
            drained: drained_tx,
        };
        self.router.insert(name, queue.clone());
        info!(broker = %broker.name, address = %broker.address(), protocol = %broker.protocol, "link added");
        let join = tokio::spawn(link::run(ctx));
        self.links.insert(
            broker.name.clone(),
            LinkHandle {
                broker,
                stats,
                queue,
                stop,
                disconnect,
                drained,
                join,
            },
        );
    }

    /// The running links, by name.
    pub fn links(&self) -> &BTreeMap<String, LinkHandle> {
        &self.links
    }

    /// Stops every link: no new messages are taken, queued ones are delivered for up to
    /// `drain_timeout`, then the links acknowledge what they can and disconnect.
    pub async fn shutdown(self, drain_timeout: Duration) {
        for l in self.links.values() {
            l.stop.cancel();
        }
        let wait_drained = async {
            for l in self.links.values() {
                let mut rx = l.drained.clone();
                let _ = rx.wait_for(|d| *d).await;
            }
        };
        if tokio::time::timeout(drain_timeout, wait_drained)
            .await
            .is_err()
        {
            let left: usize = self.links.values().map(|l| l.queue.len()).sum();
            warn!(
                queued = left,
                "drain timeout: disconnecting with messages still queued"
            );
        }
        for l in self.links.values() {
            l.disconnect.cancel();
        }
        for (name, l) in self.links {
            if tokio::time::timeout(Duration::from_secs(5), l.join)
                .await
                .is_err()
            {
                warn!(broker = %name, "link did not stop in time");
            }
        }
    }
}
