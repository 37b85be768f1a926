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

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

mod burst;
mod load;
mod opts;
mod outage;
mod proxy;
mod report;

use load::{Result_, Seen, contend, measure, percentile, publish, subscriber};
use opts::{BenchError, Opts, parse};

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
