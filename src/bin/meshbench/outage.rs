//! `--outage N`: a target's backlog after an outage, and the live traffic meanwhile.
//!
//! A subscriber on every broker but the first. The gate in front of the last broker closes (the
//! contender loses it, as when it stops; its subscriber, connected directly, stays). `N`
//! messages are published on the first broker as fast as possible: the brokers still reached
//! get them live (the live path's rate), the contender keeps the rest for the last one (the
//! master in memory, `bridge` in its spool). Then the gate opens, and a live stream runs on the
//! first broker at `--rate` for `--seconds` while the backlog drains. Measured: the backlog's
//! rate into the broker that came back (from its first message to its last, the spill path's
//! rate), how long it took the contender to send the first, the live stream's latency at the
//! brokers that never left (does the drain hold them up?), what is missing or twice, CPU per
//! forward and peak RSS.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proxy::Gate;
use super::{Opts, Result_, Seen, cpu_of, peak_rss_mib, percentile, publish, subscriber};

/// How long the backlog may take to reach the broker that came back.
const DRAIN_DEADLINE: Duration = Duration::from_secs(300);

pub(super) async fn measure(
    o: &Opts,
    n: usize,
    ports: &[u16],
    pids: &[u32],
    label: &str,
    gate: &Gate,
) -> Result_ {
    let cpu = || cpu_of(pids);
    let lock = |s: &Arc<Mutex<Seen>>| s.lock().unwrap_or_else(|e| e.into_inner()).seqs.len();
    // seen[0..cut] stay reachable; seen[cut] is behind the gate.
    let mut seen = Vec::new();
    let mut subs = Vec::new();
    for (i, port) in ports.iter().enumerate().skip(1) {
        let s = Arc::new(Mutex::new(Seen {
            backlog: n as u64,
            ..Seen::default()
        }));
        subs.push(subscriber(*port, format!("bench-sub-{label}-{i}"), s.clone()).await);
        seen.push(s);
    }
    let cut = seen.len() - 1;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.set_open(false);
    // Both contenders see the connection end at once; let them settle into it.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let cpu0 = cpu();
    let mut r = Result_ {
        throughput: during_outage(o, n, ports[0], &seen[..cut]).await,
        ..Result_::default()
    };
    gate.set_open(true);
    let opened = Instant::now();
    let live = (o.rate * o.seconds) as usize;
    let stream = {
        let (o, port) = (o.clone(), ports[0]);
        tokio::spawn(async move { publish(port, &o, n as u64, live, o.rate).await })
    };
    let total = n + live;
    let deadline = opened + DRAIN_DEADLINE;
    while !seen.iter().all(|s| lock(s) >= total) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stream.await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    tally(&mut r, &seen, n, total, opened);
    let forwards = (total * seen.len()) as f64;
    r.cpu_per_msg_us = (cpu() - cpu0) / forwards * 1e6;
    r.peak_rss_mib = pids.iter().map(|p| peak_rss_mib(*p)).sum();
    for c in subs {
        let _ = c.disconnect().await;
    }
    r
}

/// The outage: `n` messages published on the first broker (at `port`) as fast as it goes; the
/// rate at which the brokers still reached (`kept`) got them all.
async fn during_outage(o: &Opts, n: usize, port: u16, kept: &[Arc<Mutex<Seen>>]) -> f64 {
    fn lock(s: &Arc<Mutex<Seen>>) -> std::sync::MutexGuard<'_, Seen> {
        s.lock().unwrap_or_else(|e| e.into_inner())
    }
    let started = Instant::now();
    publish(port, o, 0, n, 0).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !kept.iter().all(|s| lock(s).seqs.len() >= n) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = kept
        .iter()
        .filter_map(|s| lock(s).last)
        .max()
        .unwrap_or(started);
    // From here on the reachable brokers' latencies are the live stream's.
    for s in kept {
        lock(s).latencies_us.clear();
    }
    n as f64 / end.duration_since(started).as_secs_f64().max(1e-6)
}

/// What is missing or twice of `total` at every broker; the stream's latency at those never
/// cut off (all but the last); the backlog's `n` messages at the last, opened at `opened`.
fn tally(r: &mut Result_, seen: &[Arc<Mutex<Seen>>], n: usize, total: usize, opened: Instant) {
    let cut = seen.len() - 1;
    let mut lat = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().unwrap_or_else(|e| e.into_inner());
        r.missing += (total - s.seqs.len().min(total)) as u64;
        r.duplicates += s.duplicates;
        if i < cut {
            lat.extend_from_slice(&s.latencies_us);
        } else if let (Some(first), Some(done)) = (s.backlog_first, s.backlog_done) {
            r.reconnect_secs = first.saturating_duration_since(opened).as_secs_f64();
            r.drain_rate = n as f64 / done.duration_since(first).as_secs_f64().max(1e-6);
        }
    }
    lat.sort_unstable();
    r.p50_ms = percentile(&lat, 0.50);
    r.p99_ms = percentile(&lat, 0.99);
}
