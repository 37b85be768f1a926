//! `--burst N`: the backlog after an outage. A subscriber on every broker; then `N` messages
//! published as fast as possible on each of the first `--burst-origins` brokers at once, every
//! one expected on every broker. Measured: how long until every subscriber has every message
//! (the burst's messages over that time: "delivered everywhere per second"), what is missing
//! or twice, the latency of each delivery, the contender's CPU per forward and its peak RSS.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    Opts, Result_, Seen, cpu_of, machine_cpu, peak_rss_mib, percentile, publish, subscriber,
};

/// How long a burst may take to be delivered before what is still missing counts as lost.
const BURST_DEADLINE: Duration = Duration::from_secs(300);

pub(super) async fn measure(
    o: &Opts,
    n: usize,
    ports: &[u16],
    pids: &[u32],
    label: &str,
) -> Result_ {
    let cpu = || cpu_of(pids);
    let mut seen = Vec::new();
    let mut subs = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let s = Arc::new(Mutex::new(Seen::default()));
        subs.push(subscriber(*port, format!("bench-sub-{label}-{i}"), s.clone()).await);
        seen.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = n * o.burst_origins;
    let cpu0 = cpu();
    let machine0 = machine_cpu();
    let started = Instant::now();
    let publishers: Vec<_> = (0..o.burst_origins)
        .map(|k| {
            let (o, port) = (o.clone(), ports[k]);
            tokio::spawn(async move { publish(port, &o, (k * n) as u64, n, 0).await })
        })
        .collect();
    for p in publishers {
        let _ = p.await;
    }
    let complete =
        |s: &Arc<Mutex<Seen>>| s.lock().unwrap_or_else(|e| e.into_inner()).seqs.len() >= total;
    while !seen.iter().all(complete) && started.elapsed() < BURST_DEADLINE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let machine1 = machine_cpu();
    let mut r = Result_::default();
    let mut last = started;
    let mut lat = Vec::new();
    for s in &seen {
        let s = s.lock().unwrap_or_else(|e| e.into_inner());
        last = last.max(s.last.unwrap_or(started));
        r.missing += (total - s.seqs.len().min(total)) as u64;
        r.duplicates += s.duplicates;
        lat.extend_from_slice(&s.latencies_us);
    }
    lat.sort_unstable();
    let secs = last.duration_since(started).as_secs_f64().max(1e-6);
    r.throughput = total as f64 / secs;
    r.burst_secs = secs;
    // Every message crosses to every broker but its origin.
    let forwards = (total * (ports.len() - 1)) as f64;
    r.cpu_per_msg_us = (cpu() - cpu0) / forwards * 1e6;
    // The machine's busy time spent on everything but the contender (the 32 brokers, the
    // publishers and subscribers) per forward: what bounds any bridge on this machine.
    let busy = machine1.0 - machine0.0;
    r.machine_busy = busy / (machine1.1 - machine0.1).max(1e-6);
    r.others_per_msg_us = (busy / forwards * 1e6 - r.cpu_per_msg_us).max(0.0);
    r.p50_ms = percentile(&lat, 0.50);
    r.p99_ms = percentile(&lat, 0.99);
    r.peak_rss_mib = pids.iter().map(|p| peak_rss_mib(*p)).sum();
    for c in subs {
        let _ = c.disconnect().await;
    }
    r
}
