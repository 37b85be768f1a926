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
    let started = Instant::now();
    publish(ports[0], o, 0, n, 0).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !seen[..cut].iter().all(|s| lock(s) >= n) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut r = Result_::default();
    let live_end = seen[..cut]
        .iter()
        .filter_map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).last)
        .max()
        .unwrap_or(started);
    r.throughput = n as f64 / live_end.duration_since(started).as_secs_f64().max(1e-6);
    // From here on the reachable brokers' latencies are the live stream's.
    for s in &seen[..cut] {
        s.lock()
            .unwrap_or_else(|e| e.into_inner())
            .latencies_us
            .clear();
    }

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
    let forwards = (total * seen.len()) as f64;
    r.cpu_per_msg_us = (cpu() - cpu0) / forwards * 1e6;
    r.peak_rss_mib = pids.iter().map(|p| peak_rss_mib(*p)).sum();
    for c in subs {
        let _ = c.disconnect().await;
    }
    r
}
