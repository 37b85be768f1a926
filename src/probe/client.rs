//! The probe client of one broker: a clean session of its own
//! (`<id>-<broker>~probe@<instance>`) that publishes this process's probes on the broker and
//! observes the probes of the other brokers coming out of it. A link's own session cannot do
//! either: it does not see its own publishes (No Local), and it consumes the broker.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::ProbeBook;
use crate::link::session::{self, ConnectAs, LinkEvent, SessionSettings};
use crate::topics::{self, Control};

/// Everything the probe client of one broker needs.
#[derive(Debug, Clone)]
pub(crate) struct ProbeContext {
    /// The broker's connection settings (`client_id` is the link's: the probe client's is
    /// derived from it).
    pub(crate) settings: SessionSettings,
    /// Broker name.
    pub(crate) name: Arc<str>,
    /// The mesh's control topics.
    pub(crate) control: Control,
    /// This process's instance name.
    pub(crate) instance: Arc<str>,
    /// This run of the process (probes of an earlier run are ignored).
    pub(crate) run: u64,
    /// The shared bookkeeping.
    pub(crate) book: Arc<Mutex<ProbeBook>>,
    /// Cancelled when the broker leaves or the process stops.
    pub(crate) stop: CancellationToken,
    /// The mesh key: probes are sealed with it, and one without a valid, fresh seal is refused
    /// (counted on this broker's link).
    pub(crate) key: Option<crate::seal::MeshKey>,
    /// The broker's link counters (refused probes).
    pub(crate) stats: Arc<crate::metrics::LinkStats>,
}

/// How old a sealed probe may be: older ones are replays (a probe is due every
/// `probe_interval`; the bookkeeping counts a late one as lost anyway).
const PROBE_MAX_AGE_MS: u64 = 60_000;

fn lock(book: &Mutex<ProbeBook>) -> std::sync::MutexGuard<'_, ProbeBook> {
    book.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the probe client of one broker until `stop`; reconnects every 2 s while the broker is
/// unreachable (its link reports why).
pub(crate) async fn run(ctx: ProbeContext) {
    let span = tracing::info_span!("probe", broker = %ctx.name);
    async move {
        while !ctx.stop.is_cancelled() {
            if let Err(e) = connection(&ctx).await {
                debug!(error = %e, "probe connection lost; again in 2 s");
            }
            tokio::select! {
                _ = ctx.stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
    .instrument(span)
    .await
}

/// Why a probe connection ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    /// The connection closed or failed (the reason rumqttc gave).
    #[error("{0}")]
    Closed(String),
    /// The subscription could not be queued.
    #[error("probe subscription: {0}")]
    Subscribe(#[from] session::SendError),
}

async fn connection(ctx: &ProbeContext) -> Result<(), Ended> {
    let who = ConnectAs {
        client_id: topics::probe_id(&ctx.settings.client_id, &ctx.instance),
        clean: true,
        will: None,
    };
    let mut s = session::open(&ctx.settings, &who, &[]);
    let interval = lock(&ctx.book).interval();
    // Each broker's probes at their own phase of the interval: probes published on every
    // broker at once would queue behind each other in the brokers' sockets and measure that.
    let phase = interval.mul_f64(rand::random::<f64>());
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let topic = ctx.control.probe_topic(&ctx.instance, &ctx.name);
    let mut connected = false;
    loop {
        tokio::select! {
            _ = ctx.stop.cancelled() => {
                let _ = s.client.disconnect();
                s.wait_closed().await;
                return Ok(());
            }
            event = s.next_event() => match event {
                None => return Err(Ended::Closed("connection task ended".into())),
                Some(LinkEvent::Closed(e)) => return Err(Ended::Closed(e)),
                Some(LinkEvent::Connected { .. }) => {
                    let filter = ctx.control.probe_filter_of(&ctx.instance);
                    s.client.subscribe_probes(&filter)?;
                    connected = true;
                }
                Some(LinkEvent::Publish { msg, ack }) => {
                    if let Some(a) = ack {
                        let _ = s.client.ack(a);
                    }
                    observe(ctx, &msg.topic, &msg.payload);
                }
                Some(LinkEvent::SubAck(failures)) if !failures.is_empty() => {
                    warn!(
                        reason = %failures.join(", "),
                        "probe subscription refused (a broker ACL?): no probe can be seen on this broker"
                    );
                }
                Some(_) => {}
            },
            _ = ticks.tick(), if connected => {
                let Some(seq) = lock(&ctx.book).send(&ctx.name, Instant::now()) else {
                    continue;
                };
                let payload = crate::seal::seal_if(
                    ctx.key.as_ref(),
                    &topic,
                    super::encode(ctx.run, seq),
                    crate::ha::unix_ms(),
                );
                if s.client.publish_record(&topic, payload, 1, 0, false, None).is_err() {
                    lock(&ctx.book).unsend(&ctx.name, seq);
                }
            }
        }
    }
}

/// A probe came out of this broker.
fn observe(ctx: &ProbeContext, topic: &[u8], payload: &[u8]) {
    let Some((instance, origin)) = std::str::from_utf8(topic)
        .ok()
        .and_then(|t| ctx.control.parse_probe(t))
    else {
        return;
    };
    if instance != &*ctx.instance || origin == &*ctx.name {
        return;
    }
    let payload = match &ctx.key {
        None => payload,
        Some(k) => {
            let kind = crate::seal::ControlKind::Probe;
            let opened = k.open(topic, payload).and_then(|(body, t)| {
                let now = crate::ha::unix_ms();
                let max_age = PROBE_MAX_AGE_MS + crate::seal::SKEW_MS;
                if crate::seal::fresh(t, now, max_age, crate::seal::SKEW_MS) {
                    Ok(body)
                } else {
                    Err(crate::seal::Rejected::Stale)
                }
            });
            match opened {
                Ok(body) => body,
                Err(why) => {
                    crate::metrics::control_rejected(&ctx.stats, kind, topic, why);
                    return;
                }
            }
        }
    };
    match super::decode(payload) {
        Some((run, seq)) if run == ctx.run => {
            let lag = lock(&ctx.book).observe(origin, &ctx.name, seq, Instant::now());
            tracing::trace!(origin, seq, ?lag, "probe seen");
        }
        _ => {}
    }
}

/// Every second: counts lost probes and logs each pair that stalls or recovers, once.
pub(crate) async fn watch(book: Arc<Mutex<ProbeBook>>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for t in lock(&book).tick(Instant::now()) {
            if t.stalled {
                warn!(
                    origin = %t.origin,
                    target = %t.target,
                    silent_for = ?t.silent_for,
                    "replication stalled: no probe from origin came out of target"
                );
            } else {
                info!(origin = %t.origin, target = %t.target, "replication flows again");
            }
        }
    }
}
