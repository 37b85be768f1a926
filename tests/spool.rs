//! Nothing lost: chaos against real mosquitto brokers with persistence on. Sequence-numbered
//! QoS 1 and 2 streams, counted on persistent subscribers; target brokers stopped (SIGTERM,
//! SIGKILL, SIGSTOP) mid-stream; the bridge killed while a target is down; spool bounds and
//! overflow policies; a message too large for one target.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::mqtt::{self, Got, Pub};
use common::{
    Bridge, BrokerOpts, Certs, MeshBuilder, Mosquitto, admin_addr, bridge_config, http_get, metric,
    signal,
};

/// The memory bound of a frozen target ([`slow_target_spills_to_disk_and_memory_stays_bounded`])
/// is measured with no other test of this file running. Under the CPU load of the others (each
/// starts brokers and a bridge, on two cores) the bridge's high-water mark there was 21-33 MiB
/// above its start in most runs, but 41 and 80 MiB in two CI runs of the twenty-first session's
/// code, and 81 MiB in one of three runs of the code before it (f4bfd7e): a spike of an
/// overloaded machine, with the code before this session's too, not the bound the test is
/// about. Alone, ten runs of both stayed within 21-33 MiB.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// `n` messages numbered 0..n on two topics, alternating QoS 1 and QoS 2.
fn stream(n: usize) -> Vec<Pub> {
    (0..n)
        .map(|i| {
            let qos = 1 + (i % 2) as u8;
            Pub::new(format!("seq/q{qos}"), format!("{i:06}"), qos)
        })
        .collect()
}

/// The sequence number a payload starts with (padding may follow).
fn seq(g: &Got) -> usize {
    let digits = g.payload.iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&g.payload[..digits])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX)
}

/// What a subscriber got of `0..n`: the numbers missing, the duplicates, and the first
/// place where a topic's order broke (first deliveries only: a duplicate may come late).
struct Tally {
    missing: Vec<usize>,
    duplicates: usize,
    order: Option<String>,
}

fn tally(got: &[Got], n: usize) -> Tally {
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut last: BTreeMap<&str, usize> = BTreeMap::new();
    let mut order = None;
    for g in got {
        let s = seq(g);
        if !seen.insert(s) {
            duplicates += 1;
            continue;
        }
        if let Some(prev) = last.insert(&g.topic, s)
            && prev > s
            && order.is_none()
        {
            order = Some(format!("{} after {} on {}", s, prev, g.topic));
        }
    }
    Tally {
        missing: (0..n).filter(|i| !seen.contains(i)).collect(),
        duplicates,
        order,
    }
}

/// Asserts that `what` (e.g. "b3 missing") is empty, showing how many and the first ten.
fn assert_none(what: &str, seqs: &[usize]) {
    assert!(
        seqs.is_empty(),
        "{what} {}: {:?}…",
        seqs.len(),
        &seqs[..seqs.len().min(10)]
    );
}

/// Waits until `sub` has every number of `0..n` (or 60 s passed), then asserts that none is
/// missing and that first deliveries came in order; prints the duplicates.
async fn assert_all_in_order(sub: &mqtt::Sub, name: &str, n: usize) {
    sub.wait_count(n, Duration::from_secs(60)).await;
    sub.settle(Duration::from_millis(500)).await;
    let t = tally(&sub.messages(), n);
    assert_none(&format!("{name} missing"), &t.missing);
    assert_eq!(t.order, None, "{name} order");
    eprintln!("{name} duplicates: {}", t.duplicates);
}

/// A bridge over b1..b3 with `bridge_keys` added to `[bridge]`.
fn mesh(
    tmp: &std::path::Path,
    certs: &Certs,
    b: &[Mosquitto; 3],
    bridge_keys: &str,
) -> (Bridge, String) {
    let cfg = bridge_config(
        certs,
        "mesh",
        &tmp.join("data"),
        &[(&b[0], ""), (&b[1], ""), (&b[2], "")],
    )
    .replacen("\n\n[tls]", &format!("\n{bridge_keys}\n\n[tls]"), 1);
    let bridge = Bridge::start(&tmp.join("bridge"), &cfg);
    bridge.wait_subscribed(&["b1", "b2", "b3"]);
    let admin = admin_addr(&cfg);
    (bridge, admin)
}

fn metrics(admin: &str) -> String {
    http_get(&format!("http://{admin}/metrics"), None).1
}

/// Waits until `name{broker=..}` reaches `want` (asserts, with the metrics text).
fn wait_metric(admin: &str, name: &str, broker: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = metrics(admin);
        if metric(&text, name, broker) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{broker={broker}}} never reached {want}:\n{}",
            text.lines()
                .filter(|l| l.contains(name))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until b2 got `n` messages and b3's spool holds `n` (b3 down meanwhile).
async fn spooled_for_b3(s2: &mqtt::Sub, admin: &str, n: usize) {
    s2.wait_count(n, Duration::from_secs(30)).await;
    wait_metric(
        admin,
        "meshbridge_spool_messages",
        "b3",
        n as f64,
        Duration::from_secs(20),
    );
}

async fn target_stopped_mid_stream(sigkill: bool) {
    const N: usize = 3000;
    const RATE: u32 = 500;
    let (tmp, certs, b) = common::lab_with(std::array::from_fn(|_| BrokerOpts::persistent()));
    let (bridge, _admin) = mesh(tmp.path(), &certs, &b, "");
    let [b1, b2, mut b3] = b;
    let s2 = mqtt::subscribe(b2.plain_port, "s2", "seq/#").await;
    let s3 = mqtt::subscribe_persistent(b3.plain_port, "s3", "seq/#").await;

    let progress = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (port, progress) = (b1.plain_port, progress.clone());
        tokio::spawn(
            async move { mqtt::publish_paced(port, "p1", &stream(N), RATE, progress).await },
        )
    };
    while progress.load(Ordering::SeqCst) < N / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let at_stop = progress.load(Ordering::SeqCst);
    let s2_at_stop = s2.count();
    if sigkill {
        b3.kill();
    } else {
        b3.terminate();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = s2.count() - s2_at_stop;
    let published_during = progress.load(Ordering::SeqCst) - at_stop;
    assert!(
        during * 2 >= published_during,
        "b2 must keep receiving while b3 is down: {during} of {published_during} published"
    );
    b3.restart();
    publisher.await.unwrap();
    s2.wait_count(N, Duration::from_secs(30)).await;
    s3.wait_count(N, Duration::from_secs(60)).await;
    s3.settle(Duration::from_millis(500)).await;

    let t2 = tally(&s2.messages(), N);
    assert_none("b2 missing", &t2.missing);
    assert_eq!(t2.order, None, "b2 order");
    let t3 = tally(&s3.messages(), N);
    assert_eq!(t3.order, None, "b3 order");
    if sigkill {
        // mosquitto loses what it acknowledged but had not yet handed to its subscriber when
        // it is killed (and restores its sessions from the last autosave, 1 s): only messages
        // from just before the kill may be missing. Everything after went through the spool.
        let window = at_stop.saturating_sub(RATE as usize / 2)..=at_stop;
        let outside: Vec<usize> = t3
            .missing
            .iter()
            .copied()
            .filter(|s| !window.contains(s))
            .collect();
        assert_none(
            &format!("b3 missing outside the kill window {window:?}"),
            &outside,
        );
        eprintln!(
            "SIGKILL b3 at message {at_stop}: {} lost by mosquitto inside the kill window, duplicates b2 {} b3 {}",
            t3.missing.len(),
            t2.duplicates,
            t3.duplicates
        );
    } else {
        assert_none("b3 missing", &t3.missing);
        eprintln!(
            "SIGTERM b3 at message {at_stop}: nothing lost; duplicates b2 {} b3 {}",
            t2.duplicates, t3.duplicates
        );
    }
    let log = bridge.log();
    assert!(
        log.lines()
            .any(|l| l.contains("link{broker=b3}") && l.contains("link down")),
        "b3's outage is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_sigterm_mid_stream_loses_nothing_and_keeps_order() {
    let _shared = ALONE.read().await;
    target_stopped_mid_stream(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_sigkill_mid_stream_loses_nothing_the_bridge_held() {
    let _shared = ALONE.read().await;
    target_stopped_mid_stream(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_survives_a_bridge_crash_while_a_target_is_down() {
    let _shared = ALONE.read().await;
    const N: usize = 2000;
    let (tmp, certs, mut b) = common::lab_with(std::array::from_fn(|_| BrokerOpts::persistent()));
    let (mut bridge, admin) = mesh(tmp.path(), &certs, &b, "");
    let s2 = mqtt::subscribe(b[1].plain_port, "s2", "seq/#").await;
    let s3 = mqtt::subscribe_persistent(b[2].plain_port, "s3", "seq/#").await;
    b[2].terminate();

    // b1 -> b2 flows; b3's copies go to its spool, and b1 is acknowledged. At a steady rate:
    // mosquitto 2.0.11 can send a new message ahead of older ones it queued for a client
    // whose window is full (seen in its log under a burst on a loaded machine; its quota
    // accounting was fixed later, eclipse-mosquitto/mosquitto#2306).
    mqtt::publish_paced(
        b[0].plain_port,
        "p1",
        &stream(N),
        1000,
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    spooled_for_b3(&s2, &admin, N).await;
    assert_eq!(
        metric(&metrics(&admin), "meshbridge_spooled_total", "b3"),
        Some(N as f64),
        "every copy for the down b3 is counted as spooled, once"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("b3 ") && l.contains(&format!("{N} ("))),
        "status shows b3's spool:\n{table}"
    );
    assert!(
        table.contains("spool overflow policy: drop_oldest"),
        "{table}"
    );
    // Let the last commit land (the metric counts messages on their way to disk too).
    std::thread::sleep(Duration::from_millis(500));

    // The bridge dies while b3 is down; b1 has acknowledged everything, so only the spool
    // still has b3's copies.
    bridge.kill();
    b[2].restart();
    bridge.spawn();
    s3.wait_count(N, Duration::from_secs(60)).await;
    s3.settle(Duration::from_millis(500)).await;
    let t3 = tally(&s3.messages(), N);
    assert_none("b3 missing after the crash", &t3.missing);
    assert_eq!(t3.order, None, "b3 order");
    assert!(
        bridge.log().contains("spooled messages found"),
        "the restart reports what it found"
    );
    wait_metric(
        &admin,
        "meshbridge_spool_messages",
        "b3",
        0.0,
        Duration::from_secs(20),
    );
    let t2 = tally(&s2.messages(), N);
    assert!(t2.missing.is_empty() && t2.duplicates == 0, "b2 untouched");
    assert_eq!(t2.order, None, "b2 order");
    eprintln!(
        "bridge crash with b3 down: {N} spooled, 0 lost, {} duplicates at b3",
        t3.duplicates
    );
    drop(b);
}

/// `drain_rate`: a broker back from an outage gets its backlog at that rate, in order, with
/// nothing lost (without it, 1 000 messages reach a loopback broker in a fraction of a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_at_the_brokers_drain_rate() {
    let _shared = ALONE.read().await;
    const N: usize = 1000;
    const RATE: usize = 250;
    let (tmp, certs, b) = common::lab_with(std::array::from_fn(|_| BrokerOpts::persistent()));
    let paced = format!("drain_rate = {RATE}\n");
    let cfg = bridge_config(
        &certs,
        "mesh",
        &tmp.path().join("data"),
        &[(&b[0], ""), (&b[1], ""), (&b[2], &paced)],
    );
    let bridge = Bridge::start(&tmp.path().join("bridge"), &cfg);
    bridge.wait_subscribed(&["b1", "b2", "b3"]);
    let admin = admin_addr(&cfg);
    let [b1, b2, mut b3] = b;
    let s2 = mqtt::subscribe(b2.plain_port, "s2", "seq/#").await;
    let s3 = mqtt::subscribe_persistent(b3.plain_port, "s3", "seq/#").await;
    b3.terminate();
    // Paced, as in the crash test above: mosquitto 2.0.11 can reorder a burst.
    let progress = Arc::new(AtomicUsize::new(0));
    mqtt::publish_paced(b1.plain_port, "p1", &stream(N), 1000, progress).await;
    spooled_for_b3(&s2, &admin, N).await;

    b3.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s3.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = Instant::now();
    s3.wait_count(N, Duration::from_secs(60)).await;
    let took = first.elapsed();
    s3.settle(Duration::from_millis(500)).await;
    let t3 = tally(&s3.messages(), N);
    assert_none("b3 missing", &t3.missing);
    assert_eq!(t3.order, None, "b3 order");
    // At 250 per second with a tenth of a second's worth at once, the last of 1 000 comes
    // about 3.9 s after the first.
    assert!(
        took >= Duration::from_secs(3),
        "{N} messages at drain_rate = {RATE} took only {took:?}"
    );
    let t2 = tally(&s2.messages(), N);
    assert!(t2.missing.is_empty() && t2.duplicates == 0, "b2 untouched");
    eprintln!(
        "drain_rate {RATE}: {N} in {:.2} s ({:.0}/s), {} duplicates at b3",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64(),
        t3.duplicates
    );
    drop((bridge, b1, b2, b3));
}

/// Resident set high-water mark of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_target_spills_to_disk_and_memory_stays_bounded() {
    let _alone = ALONE.write().await;
    const N: usize = 30_000;
    const SIZE: usize = 2048;
    let (tmp, certs, b) = common::lab::<3>();
    let (bridge, admin) = mesh(tmp.path(), &certs, &b, "queue_capacity = 1000");
    let pid = bridge.pid().unwrap();
    let s2 = mqtt::subscribe(b[1].plain_port, "s2", "big/#").await;
    let s3 = mqtt::subscribe(b[2].plain_port, "s3", "big/#").await;
    let base = vm_hwm_kib(pid);

    // b3 stops reading (its process is frozen; its sockets stay open).
    signal(b[2].pid().unwrap(), "STOP");
    let msgs: Vec<Pub> = (0..N)
        .map(|i| {
            let mut payload = format!("{i:06}").into_bytes();
            payload.resize(SIZE, b'.');
            Pub::new("big/x", payload, 1)
        })
        .collect();
    mqtt::publish(b[0].plain_port, "p1", &msgs).await;
    let got2 = s2.wait_count(N, Duration::from_secs(60)).await;
    assert_eq!(got2, N, "b2 is not held back by the frozen b3");
    let text = metrics(&admin);
    let spooled = metric(&text, "meshbridge_spool_messages", "b3").unwrap_or(0.0);
    let peak = vm_hwm_kib(pid);
    signal(b[2].pid().unwrap(), "CONT");

    s3.wait_count(N, Duration::from_secs(90)).await;
    s3.settle(Duration::from_millis(500)).await;
    let seqs: Vec<usize> = s3
        .messages()
        .iter()
        .map(|g| {
            std::str::from_utf8(&g.payload[..6])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(usize::MAX)
        })
        .collect();
    let distinct: HashSet<usize> = seqs.iter().copied().collect();
    assert_eq!(distinct.len(), N, "b3 gets everything once it reads again");
    let mut firsts = Vec::new();
    let mut seen = HashSet::new();
    for s in seqs {
        if seen.insert(s) {
            firsts.push(s);
        }
    }
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "b3 order");
    let growth_mib = (peak.saturating_sub(base)) / 1024;
    eprintln!(
        "frozen target: {} MiB sent to it, {spooled} spooled at the peak, bridge RSS high-water {} MiB (+{growth_mib} MiB)",
        N * SIZE / (1 << 20),
        peak / 1024
    );
    // Holding b3's copies in memory would take ~60 MiB; the bound is the memory queue
    // (1000 messages), the in-flight window and the spool's page cache.
    assert!(
        growth_mib < 40,
        "bridge memory grew by {growth_mib} MiB while b3 was frozen"
    );
    assert!(spooled > 0.0, "the backlog went to the spool");
}

/// A target freezes before any traffic: only probes wait on it when its stall is seen, and the
/// messages come later. Neither may hold the origin's acknowledgements (they go in order, so
/// one held message holds everything after it): a probe is acknowledged at once, and what
/// reaches a target still stalled goes to its spool at the next check. Probes every 100 ms
/// make sure some are caught in the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_frozen_before_traffic_does_not_hold_its_origin() {
    let _shared = ALONE.read().await;
    const N: usize = 2000;
    let (tmp, certs, b) = common::lab::<3>();
    let (_bridge, _admin) = mesh(tmp.path(), &certs, &b, "probe_interval = \"100ms\"");
    let s2 = mqtt::subscribe(b[1].plain_port, "s2", "seq/#").await;
    let s3 = mqtt::subscribe(b[2].plain_port, "s3", "seq/#").await;
    signal(b[2].pid().unwrap(), "STOP");
    // Probes from b1 reach b3's connection (it is still open) and wait there; the stall check
    // sees b3 finish nothing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let msgs: Vec<Pub> = (0..N)
        .map(|i| Pub::new("seq/q1", format!("{i:06}"), 1))
        .collect();
    mqtt::publish(b[0].plain_port, "p1", &msgs).await;
    let got2 = s2.wait_count(N, Duration::from_secs(30)).await;
    signal(b[2].pid().unwrap(), "CONT");
    assert_eq!(got2, N, "b2 is held back by what waits on the frozen b3");
    assert_all_in_order(&s3, "b3", N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_drops_oldest_counted_and_logged() {
    let _shared = ALONE.read().await;
    let (tmp, certs, mut b) = common::lab_with(std::array::from_fn(|_| BrokerOpts::persistent()));
    let (bridge, admin) = mesh(tmp.path(), &certs, &b, "spool_max_messages = 100");
    let s3 = mqtt::subscribe_persistent(b[2].plain_port, "s3", "seq/#").await;
    b[2].terminate();
    let msgs: Vec<Pub> = (0..300)
        .map(|i| Pub::new("seq/q1", format!("{i:06}"), 1))
        .collect();
    mqtt::publish(b[0].plain_port, "p1", &msgs).await;
    wait_metric(
        &admin,
        "meshbridge_dropped_overflow_total",
        "b3",
        200.0,
        Duration::from_secs(20),
    );
    wait_metric(
        &admin,
        "meshbridge_spool_messages",
        "b3",
        100.0,
        Duration::from_secs(20),
    );
    assert!(
        metrics(&admin).contains("meshbridge_spool_overflow_policy{policy=\"drop_oldest\"} 1"),
        "policy in metrics"
    );
    assert!(bridge.log().contains("spool full: oldest messages dropped"));
    b[2].restart();
    s3.wait_count(100, Duration::from_secs(30)).await;
    s3.settle(Duration::from_millis(500)).await;
    let got: Vec<usize> = s3.messages().iter().map(seq).collect();
    assert_eq!(
        got,
        (200..300).collect::<Vec<_>>(),
        "b3 gets the newest 100, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_with_block_policy_holds_the_origin_and_loses_nothing() {
    let _shared = ALONE.read().await;
    let (tmp, certs, mut b) = common::lab_with(std::array::from_fn(|_| BrokerOpts::persistent()));
    let (bridge, admin) = mesh(
        tmp.path(),
        &certs,
        &b,
        "spool_max_messages = 100\nspool_overflow = \"block\"",
    );
    let s2 = mqtt::subscribe(b[1].plain_port, "s2", "seq/#").await;
    let s3 = mqtt::subscribe_persistent(b[2].plain_port, "s3", "seq/#").await;
    b[2].terminate();
    let msgs: Vec<Pub> = (0..1000)
        .map(|i| Pub::new("seq/q1", format!("{i:06}"), 1))
        .collect();
    mqtt::publish(b[0].plain_port, "p1", &msgs).await;
    wait_metric(
        &admin,
        "meshbridge_spool_messages",
        "b3",
        100.0,
        Duration::from_secs(20),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&metrics(&admin), "meshbridge_spool_blocked", "b3").unwrap_or(0.0) == 0.0 {
        assert!(Instant::now() < deadline, "messages wait for room");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(bridge.log().contains("spool full: holding new messages"));
    // The bridge acknowledges to b1 only what is spooled for b3 (and b2 has): the rest stays
    // unacknowledged. (b1 should then stop sending once the bridge's receive window is full;
    // mosquitto 2.0.11 sometimes sends past it, so b2's count is not checked here.)
    s2.settle(Duration::from_millis(700)).await;
    let acked = b[0]
        .log()
        .lines()
        .filter(|l| l.contains("Received PUBACK from mesh-b1"))
        .count();
    assert!(
        (100..200).contains(&acked),
        "b1 was acknowledged {acked} of 1000 messages with b3's spool holding 100"
    );
    assert_eq!(
        metric(&metrics(&admin), "meshbridge_dropped_overflow_total", "b3"),
        Some(0.0)
    );

    b[2].restart();
    s2.wait_count(1000, Duration::from_secs(60)).await;
    s3.wait_count(1000, Duration::from_secs(60)).await;
    s3.settle(Duration::from_millis(500)).await;
    for (name, sub) in [("b2", &s2), ("b3", &s3)] {
        let t = tally(&sub.messages(), 1000);
        assert_none(&format!("{name} missing"), &t.missing);
        assert_eq!(t.order, None, "{name} order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_a_targets_max_packet_size_is_skipped_for_it_only() {
    let _shared = ALONE.read().await;
    let small = BrokerOpts {
        extra_conf: "max_packet_size 2000",
        ..Default::default()
    };
    let (tmp, certs, b) = common::lab_with([Default::default(), Default::default(), small]);
    let (bridge, admin) = mesh(tmp.path(), &certs, &b, "");
    let s2 = mqtt::subscribe(b[1].plain_port, "s2", "size/#").await;
    let s3 = mqtt::subscribe(b[2].plain_port, "s3", "size/#").await;
    let msgs = vec![
        Pub::new("size/t", "before".as_bytes().to_vec(), 1),
        Pub::new("size/t", vec![b'x'; 5000], 1),
        Pub::new("size/t", "after".as_bytes().to_vec(), 1),
    ];
    mqtt::publish(b[0].plain_port, "p1", &msgs).await;
    s2.wait_count(3, Duration::from_secs(20)).await;
    s3.wait_count(2, Duration::from_secs(20)).await;
    s3.settle(Duration::from_millis(300)).await;
    let lens = |s: &mqtt::Sub| {
        s.messages()
            .iter()
            .map(|g| g.payload.len())
            .collect::<Vec<_>>()
    };
    assert_eq!(lens(&s2), vec![6, 5000, 5], "b2 gets all three");
    assert_eq!(lens(&s3), vec![6, 5], "b3 gets the two that fit, in order");
    wait_metric(
        &admin,
        "meshbridge_dead_letters_total",
        "b3",
        1.0,
        Duration::from_secs(5),
    );
    let log = bridge.log();
    assert!(
        log.lines()
            .any(|l| l.contains("link{broker=b3}") && l.contains("maximum packet size 2000")),
        "the skip is logged with the limit:\n{log}"
    );
    let (code, out, err) = common::cli_in(&["dead-letters", "--json", "--admin", &admin], None);
    assert_eq!(code, 0, "{err}");
    let letters: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(letters.len(), 1, "kept as a dead letter: {out}");
    assert_eq!(letters[0]["target"], "b3");
    assert_eq!(letters[0]["payload_bytes"], 5000);
}

/// `spool_overflow = "block"` holds back QoS 1 and 2 by their acknowledgement; QoS 0 has none,
/// so holding it grew memory without bound (100k QoS 0 of 1 KB: +100k blocked, RSS +130 MB).
/// With a full spool a QoS 0 message is dropped and counted, and nothing waits in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_with_block_policy_drops_qos0_counted_and_memory_stays_bounded() {
    let _shared = ALONE.read().await;
    const N: usize = 20_000;
    const MAX: usize = 10;
    let (tmp, certs, mut b) = common::lab::<3>();
    let (_bridge, admin) = mesh(
        tmp.path(),
        &certs,
        &b,
        &format!("spool_max_messages = {MAX}\nspool_overflow = \"block\""),
    );
    let s2 = mqtt::subscribe(b[1].plain_port, "s2", "q0/#").await;
    b[2].kill();
    wait_metric(
        &admin,
        "meshbridge_connected",
        "b3",
        0.0,
        Duration::from_secs(20),
    );
    let msgs: Vec<Pub> = (0..N)
        .map(|i| {
            let mut payload = format!("{i:06}").into_bytes();
            payload.resize(1024, b'.');
            Pub::new("q0/x", payload, 0)
        })
        .collect();
    mqtt::publish(b[0].plain_port, "p1", &msgs).await;
    // b2 is live and keeps receiving (QoS 0 may drop on the way; most must arrive).
    let got2 = s2.wait_count(N * 9 / 10, Duration::from_secs(60)).await;
    assert!(got2 >= N * 9 / 10, "b2 got {got2} of {N}");
    wait_metric(
        &admin,
        "meshbridge_spool_messages",
        "b3",
        MAX as f64,
        Duration::from_secs(20),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = metrics(&admin);
        let in_b1 = metric(&text, "meshbridge_messages_in_total", "b1").unwrap_or(0.0);
        let dropped = metric(&text, "meshbridge_dropped_overflow_total", "b3").unwrap_or(0.0);
        if in_b1 > 0.0 && dropped + MAX as f64 >= in_b1 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "every QoS 0 message beyond the spool's {MAX} is dropped and counted: in {in_b1}, dropped {dropped}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        metric(&text, "meshbridge_spool_blocked", "b3"),
        Some(0.0),
        "no QoS 0 message waits in memory"
    );
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "8m") on `dir`; `None` when not root.
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    /// Bytes free on it.
    fn free(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The disk under the spool fills up while a target is down. Before: redb refused every later
/// write until a restart, each failed write was counted as an overflow and its message lost,
/// a live target stopped receiving, rows were sent again in a loop, and /readyz said 200.
/// Now: what the disk refuses is held in memory (a live target keeps receiving), /readyz and
/// the metrics say the spool fails, and once space is back the spool is opened again, the
/// held messages go to disk, and the down target gets every message, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_holds_messages_in_memory_and_recovers_when_space_is_back() {
    let _shared = ALONE.read().await;
    const N: usize = 3000;
    let (tmp, certs, mut b) = common::lab_with(std::array::from_fn(|_| BrokerOpts::persistent()));
    let Some(disk) = Tmpfs::mount(&tmp.path().join("data"), "8m") else {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    };
    let (bridge, admin) = mesh(tmp.path(), &certs, &b, "");
    let s2 = mqtt::subscribe(b[1].plain_port, "s2", "seq/#").await;
    let s3 = mqtt::subscribe_persistent(b[2].plain_port, "s3", "seq/#").await;
    b[2].terminate();
    wait_metric(
        &admin,
        "meshbridge_connected",
        "b3",
        0.0,
        Duration::from_secs(20),
    );
    // Leave the spool a few hundred KiB: 3000 messages of 1 KiB for b3 do not fit.
    let filler = disk.0.join("filler");
    let room = disk.free().saturating_sub(400 << 10);
    std::fs::write(&filler, vec![0u8; room as usize]).unwrap();

    let msgs: Vec<Pub> = (0..N)
        .map(|i| {
            let mut payload = format!("{i:06}").into_bytes();
            payload.resize(1024, b'.');
            Pub::new("seq/q1", payload, 1)
        })
        .collect();
    mqtt::publish(b[0].plain_port, "p1", &msgs[..N - 100]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_value(&admin, "meshbridge_spool_failing") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the spool never reported failing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = http_get(&format!("http://{admin}/readyz"), None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("spool_error"), "{body}");
    // The live target keeps receiving while the disk is full, the last 100 too.
    mqtt::publish(b[0].plain_port, "p1", &msgs[N - 100..]).await;
    assert_eq!(
        s2.wait_count(N, Duration::from_secs(60)).await,
        N,
        "b2 (live)"
    );
    let text = metrics(&admin);
    for name in [
        "meshbridge_dropped_overflow_total",
        "meshbridge_dropped_spool_failed_total",
    ] {
        for broker in ["b2", "b3"] {
            assert_eq!(metric(&text, name, broker), Some(0.0), "{name} {broker}");
        }
    }
    assert!(
        metric_value(&admin, "meshbridge_spool_held_messages").unwrap_or(0.0) > 0.0,
        "messages for b3 are held in memory"
    );

    // Space is back: the spool is opened again, what was held goes to disk, ready again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric_value(&admin, "meshbridge_spool_failing") != Some(0.0) {
        assert!(Instant::now() < deadline, "the spool never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        metric_value(&admin, "meshbridge_spool_held_messages"),
        Some(0.0)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&format!("http://{admin}/readyz"), None).0 != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        std::thread::sleep(Duration::from_millis(100));
    }
    b[2].restart();
    assert_all_in_order(&s3, "b3", N).await;
    let log = bridge.log();
    let failures = log.matches("spool write failed").count();
    assert!(failures <= 2, "{failures} 'spool write failed' lines");
    assert!(log.contains("spool writable again"));
    assert!(!log.contains("reading the spool again"), "no re-read loop");
}

/// Value of an unlabelled metric line such as `meshbridge_spool_failing 1`.
fn metric_value(admin: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    metrics(admin)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// A damaged spool file (here: cut short, as a full disk or a bad copy leaves it) made redb
/// panic at start (exit 101, a panic message, and systemd restarting it in a loop). Now: one
/// line naming the file and the way out, exit 65; `--spool-recover` moves it aside and starts.
#[test]
fn damaged_spool_file_is_one_clear_error_and_spool_recover_moves_it_aside() {
    let tmp = common::tempdir();
    let data = tmp.path().join("data");
    let admin = common::free_port();
    let cfg = format!(
        "[bridge]\nid = \"mesh\"\nadmin_listen = \"127.0.0.1:{admin}\"\ndata_dir = \"{}\"\n\n[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:{}\"\ntls = false\n",
        data.display(),
        common::free_port()
    );
    let mut bridge = Bridge::start(&tmp.path().join("bridge"), &cfg);
    assert!(common::wait_port(admin, Duration::from_secs(10)));
    assert_eq!(bridge.terminate().and_then(|s| s.code()), Some(0));
    let file = data.join("spool.redb");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 3)
        .unwrap();

    let config = tmp.path().join("bridge/bridge.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("spool.redb") && err.contains("damaged") && err.contains("--spool-recover"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let child = std::process::Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(["run", "--spool-recover", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(common::wait_port(admin, Duration::from_secs(10)), "started");
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("spool damaged: moved aside"), "{log}");
    let aside: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("spool.redb.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
}

/// Issue 28: a burst published at once on 4 brokers of a 32-broker mesh, with target queues
/// far smaller than it: every target's share goes through its queue's hold, its spool and
/// (under HA, the default) a park copy on the origin, and each of the 32 brokers gets every
/// message once, in order per origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_across_32_brokers_goes_through_the_spool_and_loses_nothing() {
    let _shared = ALONE.read().await;
    const BROKERS: usize = 32;
    const ORIGINS: usize = 4;
    const N: usize = 500;
    let m = MeshBuilder::new(BROKERS)
        .bridge_keys("queue_capacity = 100")
        .start();
    let mut subs = Vec::new();
    for (i, b) in m.brokers.iter().enumerate() {
        subs.push(mqtt::subscribe(b.plain_port, &format!("s{}", i + 1), "burst/#").await);
    }
    let publishers: Vec<_> = (0..ORIGINS)
        .map(|k| {
            let port = m.brokers[k].plain_port;
            let msgs: Vec<Pub> = (0..N)
                .map(|i| Pub::new(format!("burst/b{}", k + 1), i.to_string(), 1))
                .collect();
            tokio::spawn(async move { mqtt::publish(port, &format!("p{}", k + 1), &msgs).await })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    for s in &subs {
        s.wait_count(ORIGINS * N, Duration::from_secs(240)).await;
    }
    subs[BROKERS - 1].settle(Duration::from_millis(500)).await;
    let mut duplicates = 0;
    for (i, s) in subs.iter().enumerate() {
        for k in 0..ORIGINS {
            let (lost, dups, disorder) = s.sequence(&format!("burst/b{}", k + 1), N);
            assert_eq!(lost, 0, "b{} lost {lost} of b{}'s {N}", i + 1, k + 1);
            assert_eq!(disorder, 0, "b{} got b{}'s out of order", i + 1, k + 1);
            duplicates += dups;
        }
    }
    let metrics = m.metrics();
    let spooled: f64 = (1..=BROKERS)
        .filter_map(|i| metric(&metrics, "meshbridge_spooled_total", &format!("b{i}")))
        .sum();
    eprintln!(
        "32 brokers, {ORIGINS} x {N} at once: nothing lost, {spooled} spooled, {duplicates} duplicates"
    );
    assert!(spooled > 0.0, "the burst did not reach the spill path");
}
