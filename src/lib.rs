//! meshbridge: keeps several independent MQTT brokers in sync.
//!
//! One [`link`] task per broker holds an MQTT client connection (TLS by default), subscribes the
//! configured filters and hands every message it receives to the [`router`], which queues it for
//! every *other* link. Each link publishes its queue to its broker and reports acknowledgements
//! back, so the origin broker is acknowledged only once the targets have the message.
//!
//! Loops are prevented in layers: MQTT 5 links subscribe with No Local and tag what they forward
//! (a tagged message is never forwarded again); MQTT 3.1.1 links drop the echoes of their own
//! publishes with a bounded [`dedup`] window.
//!
//! Layout:
//! - [`config`]: `bridge.toml`, validated into [`config::Config`] with errors that name the key.
//! - [`tls`]: rustls client configurations from PEM files.
//! - [`message`]: the protocol-neutral message and the acknowledgement owed to its origin.
//! - [`dedup`]: the echo window (pure, unit-tested).
//! - [`router`]: per-target bounded queues and fan-out.
//! - [`link`]: connection, backoff, subscribe, receive, publish, acks.
//! - [`supervisor`]: owns the links; start and ordered shutdown.
//! - [`metrics`]: metric names and per-link counters.
//! - [`cli`]: the command line.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod dedup;
pub mod link;
pub mod message;
pub mod metrics;
pub mod router;
pub mod supervisor;
pub mod tls;

use tokio_util::sync::CancellationToken;

/// Runs the bridge until `shutdown` is cancelled, then drains and returns.
pub async fn run(config: config::Config, shutdown: CancellationToken) {
    let drain_timeout = config.drain_timeout;
    tracing::info!(
        bridge = %config.bridge_id,
        brokers = config.brokers.len(),
        topics = ?config.topics,
        "bridge starting"
    );
    let supervisor = supervisor::Supervisor::start(config);
    shutdown.cancelled().await;
    tracing::info!("shutting down: draining in-flight messages");
    supervisor.shutdown(drain_timeout).await;
    tracing::info!("bridge stopped");
}
