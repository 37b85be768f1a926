//! meshbench: the mosquitto bridge master and `bridge`, side by side on the same brokers.
//!
//! `cargo run --release --bin meshbench -- [--brokers 3] [--messages 20000] [--qos 1] [--size 64]
//! [--rate 5000] [--seconds 5] [--topics 1] [--down 0]
//! [--queue-capacity N] [--inflight N] [--inflight-max N] [--v311] [--worker-threads N] [--links-per-thread N] [--repeat R] [--instances K]
//! [--steady] [--rtt MS] [--broker-inflight N] [--mosquitto PATH] [--burst N [--burst-origins K]] [--outage N]`
//!
//! Starts N mosquitto brokers on free loopback ports, then, in turn, (a) a mosquitto "bridge
//! master" (one `connection` per broker, `topic # both 2`, MQTT 3.1.1, bridge flag on) and
//! (b) `bridge run` (MQTT 5 links), and drives each with the same load: a publisher on broker 1,
//! a subscriber on every other broker, sequence-numbered payloads counted exactly once.
//! With `--down K`, K more brokers are configured but never started: the master queues their
//! copies in memory, `bridge` writes them to its spool (the cost of the spool under load).
//! Prints for each: delivered msgs/s per subscriber, CPU seconds of the bridge process per
//! forwarded message, peak RSS, latency p50/p99 at a fixed offered rate, and the ratios.
//! With `--repeat R`, the pair runs R times on the same brokers, which contender goes first
//! alternating; each run's ratios are printed, then the medians. `--worker-threads N` and
//! `--links-per-thread N` set the bridge's `worker_threads` and `links_per_thread`. The last
//! line is how many messages the bridge wrote to its spool in each run
//! (`meshbridge_spooled_total`): a target more than `queue_capacity` messages behind is served
//! from the spool, a slower path, so a run that spooled is a different case.
//! CPU is also measured over the whole fixed-rate phase (`CPU µs/msg at fixed rate`); with
//! `--steady` only that phase runs (the steady case: `--steady --rate 2000 --seconds 60`). Each
//! run ends with the ceiling: the same load with publisher and subscriber on broker 1 and no
//! bridge, and the bridge's ratios to it. Two lines say what no bridge could beat on this
//! machine: the kernel's part of the bridge's CPU at the fixed rate against the master's whole
//! CPU, and the flat-out throughput the bridge's run would reach if the bridge cost nothing
//! (the machine's busy time, from /proc/stat, spent on the brokers and the load generator).
//! CPU rows are split into kernel (system time) and user; flat out, a third line says what
//! the bridge's user space can still win: the share of that bound a bridge costing only its
//! kernel time would reach, against the share the bridge reached.
//! With `--rtt MS` each contender reaches each broker through a proxy that delays every byte by
//! MS/2 each way (a WAN; the proxy runs in this process, its CPU is the load generator's); the
//! publisher and subscribers connect directly. `--broker-inflight N` sets the
//! `max_inflight_messages` of the brokers and the master (default 100; mosquitto's own default
//! is 20, 0 is no limit): what mosquitto announces to MQTT 5 clients as its Receive Maximum, and
//! its window towards MQTT 3.1.1 clients. `--mosquitto PATH` runs another mosquitto build
//! (2.0.13 and later enforce these windows; Debian 12's 2.0.11 does not).
//! With `--outage N` the contenders reach the last broker through a gate that shuts while N
//! messages are published on the first, and opens during a stream at `--rate` for `--seconds`:
//! how fast the backlog reaches it, and the stream's latency meanwhile (see `outage.rs`).
//! `MESHBENCH_BRIDGE_EXTRA` adds lines to the bridge's `[bridge]` section.
//! Linux only (reads /proc). Requires mosquitto on PATH (or in /usr/sbin).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

mod burst;
mod outage;
mod proxy;
mod report;

/// Why meshbench stops.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    /// The command line (exit 64).
    #[error("{0}")]
    Usage(String),
    /// A contender exited while it was measured: its figures would mean nothing.
    #[error("{what} exited at start ({status}) {last_log_line}")]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        last_log_line: String,
    },
}

#[derive(Debug, Clone)]
struct Opts {
    brokers: usize,
    messages: usize,
    qos: u8,
    size: usize,
    rate: u64,
    seconds: u64,
    topics: usize,
    down: usize,
    queue_capacity: Option<u64>,
    /// The bridge's `inflight`.
    inflight: Option<u64>,
    /// The bridge's `inflight_max`.
    inflight_max: Option<u64>,
    /// The bridge's links speak MQTT 3.1.1 (as the master's do) instead of 5.
    v311: bool,
    worker_threads: Option<u64>,
    links_per_thread: Option<u64>,
    repeat: usize,
    /// Bridge processes on the mesh (docs/HA.md): CPU and RSS are their sums.
    instances: usize,
    /// Only the fixed-rate phase (the steady case): no flat-out run.
    steady: bool,
    /// Round-trip time between each contender and each broker, in ms (a WAN): a proxy delays
    /// every byte by half of it each way. The load's clients connect directly.
    rtt_ms: u64,
    /// Instead of the flat-out and fixed-rate phases: `burst` messages published at once on
    /// each of `burst_origins` brokers, every one expected on every broker.
    burst: Option<usize>,
    burst_origins: usize,
    /// Instead of the two phases: the contenders lose the last broker, `outage` messages are
    /// published on the first as fast as possible, then the broker comes back while a live
    /// stream runs at `rate` for `seconds`; how fast its backlog drains.
    outage: Option<usize>,
    /// The `max_inflight_messages` of the brokers and of the master (the Receive Maximum
    /// mosquitto announces to MQTT 5 clients, and its window towards MQTT 3.1.1 clients; 0:
    /// none).
    broker_inflight: u64,
    /// The mosquitto binary of the brokers and the master (default: the installed one).
    mosquitto: Option<PathBuf>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            brokers: 3,
            messages: 20_000,
            qos: 1,
            size: 64,
            rate: 5_000,
            seconds: 5,
            topics: 1,
            down: 0,
            queue_capacity: None,
            inflight: None,
            inflight_max: None,
            v311: false,
            worker_threads: None,
            links_per_thread: None,
            repeat: 1,
            instances: 1,
            steady: false,
            rtt_ms: 0,
            burst: None,
            burst_origins: 4,
            outage: None,
            broker_inflight: 100,
            mosquitto: None,
        }
    }
}

fn parse() -> Result<Opts, BenchError> {
    let mut o = Opts::default();
    let mut args = std::env::args().skip(1);
    let mut origins = None;
    while let Some(a) = args.next() {
        let mut v = || -> Result<u64, BenchError> {
            args.next()
                .ok_or_else(|| BenchError::Usage(format!("{a} needs a value")))?
                .parse()
                .map_err(|e| BenchError::Usage(format!("{a}: {e}")))
        };
        match a.as_str() {
            "--brokers" => o.brokers = v()? as usize,
            "--messages" => o.messages = v()? as usize,
            "--qos" => o.qos = v()? as u8,
            "--size" => o.size = v()? as usize,
            "--rate" => o.rate = v()?,
            "--seconds" => o.seconds = v()?,
            "--topics" => o.topics = v()? as usize,
            "--down" => o.down = v()? as usize,
            "--queue-capacity" => o.queue_capacity = Some(v()?),
            "--inflight" => o.inflight = Some(v()?),
            "--inflight-max" => o.inflight_max = Some(v()?),
            "--v311" => o.v311 = true,
            "--worker-threads" => o.worker_threads = Some(v()?),
            "--links-per-thread" => o.links_per_thread = Some(v()?),
            "--repeat" => o.repeat = v()? as usize,
            "--instances" => o.instances = v()? as usize,
            "--steady" => o.steady = true,
            "--rtt" => o.rtt_ms = v()?,
            "--burst" => o.burst = Some(v()? as usize),
            "--burst-origins" => origins = Some(v()? as usize),
            "--outage" => o.outage = Some(v()? as usize),
            "--broker-inflight" => o.broker_inflight = v()?,
            "--mosquitto" => {
                o.mosquitto = Some(PathBuf::from(args.next().ok_or_else(|| {
                    BenchError::Usage("--mosquitto needs a path".into())
                })?))
            }
            "-h" | "--help" => {
                return Err(BenchError::Usage("usage: meshbench [--brokers N] [--messages M] [--qos 0|1|2] [--size BYTES] [--rate MSG_PER_S] [--seconds S] [--topics T] [--down K] [--queue-capacity N] [--inflight N] [--inflight-max N] [--v311] [--worker-threads N] [--links-per-thread N] [--repeat R] [--instances K] [--steady] [--rtt MS] [--broker-inflight N] [--mosquitto PATH] [--burst N [--burst-origins K]] [--outage N]".into()))
            }
            other => return Err(BenchError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    // By default the burst starts on four brokers (or every one, when fewer).
    o.burst_origins = origins.unwrap_or(o.brokers.min(4));
    validate(&o)?;
    Ok(o)
}

/// The options' values that make no run.
fn validate(o: &Opts) -> Result<(), BenchError> {
    if o.brokers < 2
        || o.qos > 2
        || o.size < 24
        || o.topics == 0
        || o.rate == 0
        || o.repeat == 0
        || o.instances == 0
        || (o.burst.is_some() && !(1..=o.brokers).contains(&o.burst_origins))
        || o.burst == Some(0)
        || (o.outage.is_some() && (o.brokers < 3 || o.burst.is_some() || o.outage == Some(0)))
    {
        return Err(BenchError::Usage(
            "need --brokers >= 2, --qos 0..2, --size >= 24, --topics >= 1, --rate >= 1, --repeat >= 1, --instances >= 1, --burst >= 1, 1 <= --burst-origins <= --brokers, --outage >= 1 with --brokers >= 3 and no --burst".into(),
        ));
    }
    Ok(())
}

/// A port below the ephemeral range: the run's many client connections cannot take it before
/// a broker or the bridge's admin API binds it.
fn free_port() -> u16 {
    meshbridge::testing::free_port().expect("free loopback port")
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Proc(Child);

impl Proc {
    /// An error when the process has exited (figures measured against it would be
    /// meaningless), with the last line of its log if it has one.
    fn running(&mut self, what: &str, log: Option<&Path>) -> Result<(), BenchError> {
        let Ok(Some(status)) = self.0.try_wait() else {
            return Ok(());
        };
        let last = log
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| t.lines().last().map(str::to_string))
            .unwrap_or_default();
        Err(BenchError::Exited {
            what: what.to_string(),
            status,
            last_log_line: last,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(o: &Opts, dir: &Path, name: &str, port: u16, extra: &str) -> Proc {
    let inflight = o.broker_inflight;
    let conf = dir.join(format!("{name}.conf"));
    let user = if is_root() { "user root\n" } else { "" };
    std::fs::write(
        &conf,
        format!(
            "{user}persistence false\nmax_queued_messages 1000000\nmax_inflight_messages {inflight}\nset_tcp_nodelay true\nlog_dest none\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n{extra}"
        ),
    )
    .expect("write mosquitto config");
    let bin = match &o.mosquitto {
        Some(path) => path.as_path(),
        None if Path::new("/usr/sbin/mosquitto").exists() => Path::new("/usr/sbin/mosquitto"),
        None => Path::new("mosquitto"),
    };
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto (apt-get install mosquitto)");
    wait_port(port);
    Proc(child)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// (utime, stime) of a process, in seconds.
fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// utime + stime of the processes `pids` together, in seconds.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_split(*p)).map(|(u, s)| u + s).sum()
}

/// The whole machine's (busy, all) CPU time from /proc/stat, in seconds: busy is user, nice,
/// system, irq, softirq and steal; all adds idle and iowait.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy / 100.0, (busy + at(3) + at(4)) / 100.0)
}

/// Peak resident set size (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// Nagle off for the load generator's own connections (mosquitto gets `set_tcp_nodelay true`):
/// latency then measures the bridges, not 40 ms delayed-ACK stalls on one-way QoS 0 streams.
fn nodelay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Seen {
    seqs: HashSet<u64>,
    duplicates: u64,
    latencies_us: Vec<u64>,
    first: Option<Instant>,
    last: Option<Instant>,
    /// `--outage`: the backlog is the sequence numbers below this (0: none); how many of them
    /// arrived, when the first did and when the last.
    backlog: u64,
    backlog_seen: u64,
    backlog_first: Option<Instant>,
    backlog_done: Option<Instant>,
}

async fn subscriber(port: u16, id: String, seen: Arc<Mutex<Seen>>) -> AsyncClient {
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
async fn publish(port: u16, o: &Opts, first_seq: u64, count: usize, rate: u64) {
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
struct Result_ {
    throughput: f64,
    cpu_per_msg_us: f64,
    /// The kernel's (system time) part of it, flat out.
    sys_per_msg_us: f64,
    /// CPU per forwarded message over the whole fixed-rate phase.
    steady_cpu_per_msg_us: f64,
    /// The kernel's (system time) part of it.
    steady_sys_per_msg_us: f64,
    /// CPU per forwarded message of everything else on the machine (brokers, load generator)
    /// during the flat-out phase.
    others_per_msg_us: f64,
    /// Share of the machine busy during the flat-out phase.
    machine_busy: f64,
    peak_rss_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    missing: u64,
    duplicates: u64,
    /// `--burst`: seconds from the first publish to the last delivery.
    burst_secs: f64,
    /// `--outage`: the backlog's messages per second from the first to reach the broker that
    /// came back to the last, and the seconds from its return to that first one.
    drain_rate: f64,
    reconnect_secs: f64,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Measures one contender: the burst or the outage when asked for, otherwise both phases.
async fn contend(o: &Opts, lab: &Lab, pids: &[u32], label: &str) -> Result_ {
    let ports = &lab.ports;
    match (o.burst, o.outage, &lab.gate) {
        (Some(n), _, _) => burst::measure(o, n, ports, pids, label).await,
        (_, Some(n), Some(gate)) => outage::measure(o, n, ports, pids, label, gate).await,
        _ => measure(o, ports, pids, label).await,
    }
}

/// Runs both phases (throughput, then latency at a fixed rate) against one bridge process.
async fn measure(o: &Opts, ports: &[u16], pids: &[u32], label: &str) -> Result_ {
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

fn bridge_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.with_file_name("bridge")
}

/// The contenders' setup, shared by every repetition.
struct Lab {
    dir: tempfile::TempDir,
    /// Ports of the running brokers.
    ports: Vec<u16>,
    /// Where the contenders dial each broker, those configured but never started (`--down`)
    /// included: the brokers' ports, or with `--rtt` the delaying proxies in front of them.
    dialled: Vec<u16>,
    bridge_bin: PathBuf,
    /// `--outage`: the gate between the contenders and the last broker.
    gate: Option<proxy::Gate>,
}

/// (a) The mosquitto bridge master, seed 004 style.
async fn run_master(o: &Opts, lab: &Lab, run: usize) -> Result<Result_, BenchError> {
    let mut conns = String::new();
    for (i, p) in lab.dialled.iter().enumerate() {
        let _ = write!(
            conns,
            "connection b{n}\naddress 127.0.0.1:{p}\ntopic # both 2\ncleansession false\ntry_private true\n\
             bridge_protocol_version mqttv311\nnotifications false\nremote_clientid master{run}-b{n}\n",
            n = i + 1
        );
    }
    let mut master = mosquitto(o, lab.dir.path(), "master", free_port(), &conns);
    tokio::time::sleep(Duration::from_secs(2)).await;
    master.running("the mosquitto bridge master", None)?;
    let r = contend(o, lab, &[master.0.id()], &format!("master{run}")).await;
    drop(master);
    discard_sessions(&lab.ports, |n| format!("master{run}-b{n}")).await;
    Ok(r)
}

/// Ends a stopped contender's persistent sessions on the running brokers (a clean-start
/// connection with the same client id), so the brokers do not queue every later message for
/// it while the next contender is measured.
async fn discard_sessions(ports: &[u16], client_id: impl Fn(usize) -> String) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, port) in ports.iter().enumerate() {
        let mut opts = MqttOptions::new(client_id(i + 1), "127.0.0.1", *port);
        opts.set_clean_start(true);
        let (client, mut el) = AsyncClient::new(opts, 10);
        let connected = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if !connected {
            eprintln!(
                "warning: could not discard session {} on port {port}",
                client_id(i + 1)
            );
            continue;
        }
        let _ = client.disconnect().await;
        // Let the event loop write the DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while el.poll().await.is_ok() {}
        })
        .await;
    }
}

/// (b) `bridge run`, `--instances` processes of one mesh; also returns how many messages they
/// wrote to their spools.
async fn run_bridge(o: &Opts, lab: &Lab, run: usize) -> Result<(Result_, Option<u64>), BenchError> {
    let spawned = Instant::now();
    let mut bridges = Vec::new();
    let mut admin_ports = Vec::new();
    for k in 0..o.instances {
        let admin_port = free_port();
        let cfg = bridge_config(o, lab, run, k, admin_port);
        let cfg_path = lab.dir.path().join(format!("bridge{run}-{k}.toml"));
        std::fs::write(&cfg_path, cfg).expect("write bridge config");
        // Warnings and errors only: nothing is written per message.
        let log_path = lab.dir.path().join(format!("bridge{run}-{k}.log"));
        let log = std::fs::File::create(&log_path).expect("create bridge log");
        bridges.push((
            Proc(
                Command::new(&lab.bridge_bin)
                    .args(["run", "--config"])
                    .arg(&cfg_path)
                    // (MESHBENCH_BRIDGE_LOG: another filter, to look into a run.)
                    .env(
                        "RUST_LOG",
                        std::env::var("MESHBENCH_BRIDGE_LOG").unwrap_or_else(|_| "warn".into()),
                    )
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start bridge"),
            ),
            log_path,
        ));
        admin_ports.push(admin_port);
    }
    // Measured from when every process says it replicates (`/readyz`): at 32 brokers a fresh
    // mesh takes seconds to consume every broker, and a burst published before would not be
    // forwarded at all. Then the same settling time as before.
    let ready_by = Instant::now() + Duration::from_secs(120);
    for port in &admin_ports {
        while !ready(*port) && Instant::now() < ready_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "run {}: bridge ready (/readyz 200) {:.2} s after it started",
        run + 1,
        spawned.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(if o.instances > 1 { 4 } else { 2 })).await;
    for (bridge, log) in &mut bridges {
        bridge.running("bridge", Some(log))?;
    }
    let pids: Vec<u32> = bridges.iter().map(|(b, _)| b.0.id()).collect();
    let r = contend(o, lab, &pids, &format!("bridge{run}")).await;
    let spooled = admin_ports
        .iter()
        .map(|p| spooled_total(*p))
        .try_fold(0, |sum, s| s.map(|s| sum + s));
    keep_logs(&bridges);
    drop(bridges);
    discard_sessions(&lab.ports, |n| format!("bench{run}-b{n}")).await;
    Ok((r, spooled))
}

/// The config of bridge process `k` of run `run`, its admin API on `admin_port`.
fn bridge_config(o: &Opts, lab: &Lab, run: usize, k: usize, admin_port: u16) -> String {
    let mut cfg = format!(
        "[bridge]\nid = \"bench{run}\"\ninstance = \"i{k}\"\nadmin_listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n",
        admin_port,
        lab.dir.path().join(format!("data{run}-{k}")).display()
    );
    if let Some(n) = o.queue_capacity {
        let _ = writeln!(cfg, "queue_capacity = {n}");
    }
    if let Some(n) = o.inflight {
        let _ = writeln!(cfg, "inflight = {n}");
    }
    if let Some(n) = o.inflight_max {
        let _ = writeln!(cfg, "inflight_max = {n}");
    }
    if let Some(n) = o.worker_threads {
        let _ = writeln!(cfg, "worker_threads = {n}");
    }
    if let Some(n) = o.links_per_thread {
        let _ = writeln!(cfg, "links_per_thread = {n}");
    }
    // (MESHBENCH_BRIDGE_EXTRA: more `[bridge]` lines, to try a setting.)
    if let Ok(extra) = std::env::var("MESHBENCH_BRIDGE_EXTRA") {
        let _ = writeln!(cfg, "{extra}");
    }
    for (i, p) in lab.dialled.iter().enumerate() {
        let _ = write!(
            cfg,
            "[[broker]]\nname = \"b{}\"\naddress = \"127.0.0.1:{p}\"\ntls = false\n{}",
            i + 1,
            if o.v311 {
                "protocol = \"v3.1.1\"\n"
            } else {
                ""
            }
        );
    }
    cfg
}

/// With `MESHBENCH_BRIDGE_LOG` set, copies the bridges' logs where the run's directory is not
/// (it goes with the run), and says where.
fn keep_logs(bridges: &[(Proc, PathBuf)]) {
    if std::env::var_os("MESHBENCH_BRIDGE_LOG").is_some() {
        // Kept where the run's directory is not: it goes with the run.
        for (_, log) in bridges {
            if let Some(name) = log.file_name() {
                let kept =
                    std::env::temp_dir().join(format!("meshbench-{}", name.to_string_lossy()));
                let _ = std::fs::copy(log, &kept);
                eprintln!("bridge log kept: {}", kept.display());
            }
        }
    }
}

/// One run of both contenders, in the given order.
async fn pair(
    o: &Opts,
    lab: &Lab,
    run: usize,
    master_first: bool,
) -> Result<(Result_, Result_, Option<u64>), BenchError> {
    if master_first {
        let a = run_master(o, lab, run).await?;
        let (b, spooled) = run_bridge(o, lab, run).await?;
        Ok((a, b, spooled))
    } else {
        let (b, spooled) = run_bridge(o, lab, run).await?;
        Ok((run_master(o, lab, run).await?, b, spooled))
    }
}

/// The ceiling: the same load with publisher and subscriber on broker 1, no bridge at all.
async fn run_direct(o: &Opts, lab: &Lab, run: usize) -> Result_ {
    let p = lab.ports[0];
    measure(o, &[p, p], &[], &format!("direct{run}")).await
}

/// Median of a list (NaN when it is empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[tokio::main]
async fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(64);
        }
    };
    let bridge_bin = bridge_binary();
    if !bridge_bin.exists() {
        eprintln!(
            "error: {} not found: run with `cargo run --release --bin meshbench`",
            bridge_bin.display()
        );
        std::process::exit(1);
    }
    let (brokers, lab) = start_lab(&o, bridge_bin).await;
    report::header(&o);
    // Which contender goes first alternates, so neither always meets warmer (or busier) brokers.
    let mut runs = Vec::new();
    let mut directs = Vec::new();
    for run in 0..o.repeat {
        let (a, b, spooled) = match pair(&o, &lab, run, run % 2 == 0).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: run {}: {e}", run + 1);
                // Stops the brokers (exit would skip their Drop).
                drop((brokers, lab));
                std::process::exit(1);
            }
        };
        if o.repeat > 1 {
            report::run_line(&o, run, &a, &b, spooled);
        }
        runs.push((a, b, spooled));
        if o.burst.is_none() && o.outage.is_none() {
            directs.push(run_direct(&o, &lab, run).await);
        }
    }
    report::summary(&o, &runs, &directs);
}

/// Starts the brokers (and with `--rtt` the delaying proxies in front of them).
async fn start_lab(o: &Opts, bridge_bin: PathBuf) -> (Vec<Proc>, Lab) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports: Vec<u16> = (0..o.brokers).map(|_| free_port()).collect();
    let brokers: Vec<Proc> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| mosquitto(o, dir.path(), &format!("b{}", i + 1), *p, ""))
        .collect();
    // Brokers configured on both contenders but never started.
    let down: Vec<u16> = (0..o.down).map(|_| free_port()).collect();
    let configured: Vec<u16> = ports.iter().chain(&down).copied().collect();
    // With `--outage` the last broker is reached through a gate, with `--rtt` every broker
    // through a delay.
    let gate = o.outage.map(|_| proxy::Gate::new());
    let one_way = Duration::from_millis(o.rtt_ms) / 2;
    let mut dialled = Vec::new();
    for (i, target) in configured.iter().enumerate() {
        let gated = gate.clone().filter(|_| i + 1 == o.brokers);
        if o.rtt_ms == 0 && gated.is_none() {
            dialled.push(*target);
            continue;
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind a proxy port");
        dialled.push(listener.local_addr().expect("proxy address").port());
        tokio::spawn(proxy::run(listener, *target, one_way, gated));
    }
    let lab = Lab {
        dir,
        ports,
        dialled,
        bridge_bin,
        gate,
    };

    (brokers, lab)
}

/// The bridge's `meshbridge_spooled_total`, summed over its links, from its admin API.
fn spooled_total(admin_port: u16) -> Option<u64> {
    let body = ureq::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with("meshbridge_spooled_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum(),
    )
}

/// Whether the bridge whose admin API listens on `admin_port` answers `/readyz` with 200.
fn ready(admin_port: u16) -> bool {
    ureq::get(format!("http://127.0.0.1:{admin_port}/readyz"))
        .call()
        .is_ok_and(|r| r.status() == 200)
}
