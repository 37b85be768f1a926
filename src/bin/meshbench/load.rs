//! The load and what it measures: a publisher and a subscriber per broker, counting
//! sequence numbers exactly once, flat out and at a fixed rate, with each contender's CPU.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use super::{Lab, Opts, burst, cpu_split, machine_cpu, outage, peak_rss_mib};

/// Nagle off for the load generator's own connections (mosquitto gets `set_tcp_nodelay true`):
/// latency then measures the bridges, not 40 ms delayed-ACK stalls on one-way QoS 0 streams.
pub(crate) fn nodelay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

pub(crate) fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) seqs: HashSet<u64>,
    pub(crate) duplicates: u64,
    pub(crate) latencies_us: Vec<u64>,
    pub(crate) first: Option<Instant>,
    pub(crate) last: Option<Instant>,
    /// `--outage`: the backlog is the sequence numbers below this (0: none); how many of them
    /// arrived, when the first did and when the last.
    pub(crate) backlog: u64,
    pub(crate) backlog_seen: u64,
    pub(crate) backlog_first: Option<Instant>,
    pub(crate) backlog_done: Option<Instant>,
}

pub(crate) async fn subscriber(port: u16, id: String, seen: Arc<Mutex<Seen>>) -> AsyncClient {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(Some(16 * 1024 * 1024));
    opts.set_network_options(nodelay());
    let (client, mut el) = AsyncClient::new(opts, 10_000);
    client
        .subscribe_many([Filter::new("bench/#", QoS::ExactlyOnce)])
        .await
        .expect("subscribe");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Instant::now();
                    let seq = u64::from_be_bytes(p.payload[0..8].try_into().unwrap_or_default());
                    let sent = u64::from_be_bytes(p.payload[8..16].try_into().unwrap_or_default());
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    if s.seqs.insert(seq) {
                        s.latencies_us.push(now_micros().saturating_sub(sent));
                        if seq < s.backlog {
                            s.backlog_seen += 1;
                            s.backlog_first.get_or_insert(now);
                            if s.backlog_seen == s.backlog {
                                s.backlog_done = Some(now);
                            }
                        }
                    } else {
                        s.duplicates += 1;
                    }
                    s.first.get_or_insert(now);
                    s.last = Some(now);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
    client
}

/// Publishes `count` messages starting at `first_seq`; `rate` 0 means as fast as possible.
pub(crate) async fn publish(port: u16, o: &Opts, first_seq: u64, count: usize, rate: u64) {
    let mut opts = MqttOptions::new(format!("bench-pub-{first_seq}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_network_options(nodelay());
    let (client, mut el) = AsyncClient::new(opts, 10_000);
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = acked.clone();
    let q = o.qos;
    let driver = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(0))) if q == 0 => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let start = Instant::now();
    for i in 0..count {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let seq = first_seq + i as u64;
        let mut payload = vec![b'x'; o.size];
        payload[0..8].copy_from_slice(&seq.to_be_bytes());
        payload[8..16].copy_from_slice(&now_micros().to_be_bytes());
        let topic = format!("bench/t{}", seq as usize % o.topics);
        let _ = client.publish(topic, qos(o.qos), false, payload).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.load(std::sync::atomic::Ordering::Relaxed) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = client.disconnect().await;
    driver.abort();
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Result_ {
    pub(crate) throughput: f64,
    pub(crate) cpu_per_msg_us: f64,
    /// The kernel's (system time) part of it, flat out.
    pub(crate) sys_per_msg_us: f64,
    /// CPU per forwarded message over the whole fixed-rate phase.
    pub(crate) steady_cpu_per_msg_us: f64,
    /// The kernel's (system time) part of it.
    pub(crate) steady_sys_per_msg_us: f64,
    /// CPU per forwarded message of everything else on the machine (brokers, load generator)
    /// during the flat-out phase.
    pub(crate) others_per_msg_us: f64,
    /// Share of the machine busy during the flat-out phase.
    pub(crate) machine_busy: f64,
    pub(crate) peak_rss_mib: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) missing: u64,
    pub(crate) duplicates: u64,
    /// `--burst`: seconds from the first publish to the last delivery.
    pub(crate) burst_secs: f64,
    /// `--outage`: the backlog's messages per second from the first to reach the broker that
    /// came back to the last, and the seconds from its return to that first one.
    pub(crate) drain_rate: f64,
    pub(crate) reconnect_secs: f64,
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Measures one contender: the burst or the outage when asked for, otherwise both phases.
pub(crate) async fn contend(o: &Opts, lab: &Lab, pids: &[u32], label: &str) -> Result_ {
    let ports = &lab.ports;
    match (o.burst, o.outage, &lab.gate) {
        (Some(n), _, _) => burst::measure(o, n, ports, pids, label).await,
        (_, Some(n), Some(gate)) => outage::measure(o, n, ports, pids, label, gate).await,
        _ => measure(o, ports, pids, label).await,
    }
}

/// Runs both phases (throughput, then latency at a fixed rate) against one bridge process.
pub(crate) async fn measure(o: &Opts, ports: &[u16], pids: &[u32], label: &str) -> Result_ {
    // (user, system) seconds of the contender's processes together.
    let contender_cpu = || {
        pids.iter()
            .map(|p| cpu_split(*p))
            .fold((0.0, 0.0), |(u, s), (pu, ps)| (u + pu, s + ps))
    };
    // Throughput: as fast as possible.
    let mut seen = Vec::new();
    let mut subs = Vec::new();
    for (i, port) in ports.iter().enumerate().skip(1) {
        let s = Arc::new(Mutex::new(Seen::default()));
        subs.push(subscriber(*port, format!("bench-sub-{label}-{i}"), s.clone()).await);
        seen.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut r = Result_::default();
    if !o.steady {
        flat_out(o, ports, &seen, &contender_cpu, &mut r).await;
    }

    // Latency (and CPU, the steady case) at a fixed offered rate.
    let base = 1_000_000_000u64;
    let count = (o.rate * o.seconds) as usize;
    for s in &seen {
        *s.lock().unwrap_or_else(|e| e.into_inner()) = Seen::default();
    }
    let (user0, sys0) = contender_cpu();
    publish(ports[0], o, base, count, o.rate).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let forwarded = (count * (ports.len() - 1)) as f64;
    let (user1, sys1) = contender_cpu();
    r.steady_cpu_per_msg_us = (user1 + sys1 - user0 - sys0) / forwarded * 1e6;
    r.steady_sys_per_msg_us = (sys1 - sys0) / forwarded * 1e6;
    if o.steady {
        for s in &seen {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            r.missing += (count - s.seqs.len().min(count)) as u64;
            r.duplicates += s.duplicates;
        }
    }
    let mut lat: Vec<u64> = seen
        .iter()
        .flat_map(|s| {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .latencies_us
                .clone()
        })
        .collect();
    lat.sort_unstable();
    r.p50_ms = percentile(&lat, 0.50);
    r.p99_ms = percentile(&lat, 0.99);
    r.peak_rss_mib = pids.iter().map(|p| peak_rss_mib(*p)).sum();
    for c in subs {
        let _ = c.disconnect().await;
    }
    r
}

/// The flat-out phase: `o.messages` as fast as the publisher goes.
async fn flat_out(
    o: &Opts,
    ports: &[u16],
    seen: &[Arc<Mutex<Seen>>],
    contender_cpu: &impl Fn() -> (f64, f64),
    r: &mut Result_,
) {
    let (user0, sys0) = contender_cpu();
    let machine0 = machine_cpu();
    let started = Instant::now();
    publish(ports[0], o, 0, o.messages, 0).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = seen
            .iter()
            .all(|s| s.lock().unwrap_or_else(|e| e.into_inner()).seqs.len() >= o.messages);
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let machine1 = machine_cpu();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (user1, sys1) = contender_cpu();
    let cpu = user1 + sys1 - user0 - sys0;
    let mut rates = Vec::new();
    for s in seen {
        let s = s.lock().unwrap_or_else(|e| e.into_inner());
        let end = s.last.unwrap_or(started);
        let secs = end.duration_since(started).as_secs_f64().max(1e-6);
        rates.push(s.seqs.len() as f64 / secs);
        r.missing += (o.messages - s.seqs.len().min(o.messages)) as u64;
        r.duplicates += s.duplicates;
    }
    r.throughput = rates.iter().sum::<f64>() / rates.len() as f64;
    let forwarded = (o.messages * (ports.len() - 1)) as f64;
    r.cpu_per_msg_us = cpu / forwarded * 1e6;
    r.sys_per_msg_us = (sys1 - sys0) / forwarded * 1e6;
    // Up to the last delivery (the 300 ms after it would count as idle).
    let busy = machine1.0 - machine0.0;
    r.machine_busy = busy / (machine1.1 - machine0.1).max(1e-6);
    r.others_per_msg_us = (busy / forwarded * 1e6 - r.cpu_per_msg_us).max(0.0);
}
