//! Replication you can see, against real mosquitto brokers: end-to-end probes and the lag
//! matrix, stalled pairs, and the retained anti-entropy (`bridge reconcile`, a broker added at
//! run time getting the retained set from a peer's snapshot).

mod common;

use std::time::{Duration, Instant};

use common::mqtt::{self, Pub};
use common::{MeshBuilder, cli_in, http_get, signal};
use meshbridge::probe::Matrix;

/// Fast probes, so a test sees several per second and a stall within seconds.
const FAST_PROBES: &str = "probe_interval = \"300ms\"\nprobe_stall_after = \"2s\"";

fn matrix(admin: &str) -> Matrix {
    let (code, out, err) = cli_in(&["status", "--matrix", "--json", "--admin", admin], None);
    assert_eq!(code, 0, "status --matrix --json: {err}");
    serde_json::from_str(&out).expect("matrix JSON")
}

/// Waits until `ok` holds for the matrix (or `within` passed); returns the last matrix.
fn wait_matrix(admin: &str, within: Duration, ok: impl Fn(&Matrix) -> bool) -> Matrix {
    let deadline = Instant::now() + within;
    loop {
        let m = matrix(admin);
        if ok(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn all_flowing(m: &Matrix) -> bool {
    m.pairs.len() == m.brokers.len() * (m.brokers.len() - 1)
        && m.pairs.iter().all(|p| p.seen >= 3 && !p.stalled)
}

/// Probes cross every pair, MQTT 5 and 3.1.1 alike, with a sane lag; a `#` subscriber never
/// sees one, and they count in no message counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_measure_every_pair_and_stay_invisible() {
    let mesh = MeshBuilder::new(3)
        .bridge_keys(FAST_PROBES)
        .link_keys_of(2, "protocol = \"v3.1.1\"")
        .start();
    let mut subs = Vec::new();
    for b in &mesh.brokers {
        subs.push(mqtt::subscribe(b.plain_port, &format!("hash-{}", b.name), "#").await);
    }
    let m = wait_matrix(&mesh.admin, Duration::from_secs(20), all_flowing);
    assert!(all_flowing(&m), "{m:#?}");
    for p in &m.pairs {
        let (p50, p99) = (p.p50_ms.unwrap(), p.p99_ms.unwrap());
        println!(
            "{}->{}: p50 {p50:.2} ms, p99 {p99:.2} ms, {} seen, {} lost",
            p.origin, p.target, p.seen, p.lost
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 < 1000.0, "{p:?}");
        assert_eq!(p.lost, 0, "{p:?}");
    }
    // User traffic still flows, and is all a `#` subscriber sees.
    mqtt::publish(
        mesh.brokers[0].plain_port,
        "user-pub",
        &[Pub::new("user/t", "hello", 1)],
    )
    .await;
    for s in &subs {
        assert_eq!(s.wait_count(1, Duration::from_secs(10)).await, 1);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (b, s) in mesh.brokers.iter().zip(&subs) {
        let topics: Vec<String> = s.messages().into_iter().map(|g| g.topic).collect();
        assert_eq!(
            topics,
            ["user/t"],
            "a `#` subscriber on {} saw a probe",
            b.name
        );
    }
    let text = mesh.metrics();
    // Counted: the user message, forwarded from b1 and published to b2 and b3 (whose 3.1.1
    // echo is dropped once). Not counted: dozens of probes through every link.
    for (b, forwarded, out, echo) in [
        ("b1", 1.0, 0.0, 0.0),
        ("b2", 0.0, 1.0, 0.0),
        ("b3", 0.0, 1.0, 1.0),
    ] {
        let get = |name: &str| common::metric(&text, name, b).unwrap_or(-1.0);
        assert_eq!(get("meshbridge_messages_in_total"), forwarded + echo, "{b}");
        assert_eq!(get("meshbridge_forwarded_total"), forwarded, "{b}");
        assert_eq!(get("meshbridge_messages_out_total"), out, "{b}");
        assert_eq!(get("meshbridge_dropped_echo_total"), echo, "{b}");
        assert_eq!(get("meshbridge_dropped_tagged_total"), 0.0, "{b}");
        assert_eq!(get("meshbridge_dropped_unmatched_total"), 0.0, "{b}");
    }
    assert!(
        text.contains("meshbridge_replication_lag_seconds_count{origin=\"b3\",target=\"b1\"}"),
        "{text}"
    );
    assert!(text.contains("meshbridge_replication_stalled{origin=\"b1\",target=\"b3\"} 0"));
    // The table a person reads.
    let (code, table, _) = cli_in(&["status", "--matrix", "--admin", &mesh.admin], None);
    assert_eq!(code, 0);
    println!("{table}");
    assert!(
        table.contains("FROM \\ TO") && !table.contains("STALLED"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 5, "no probe lost:\n{table}");
    // Health endpoints.
    let base = format!("http://{}", mesh.admin);
    assert_eq!(http_get(&format!("{base}/replicationz"), None).0, 200);
    assert_eq!(http_get(&format!("{base}/readyz/broker/b3"), None).0, 200);
    assert_eq!(http_get(&format!("{base}/readyz/broker/nope"), None).0, 404);
}

/// A frozen target: the pairs into it (and out of it) stall within `probe_stall_after` and
/// the load balancer's check of that broker fails, not the others'; SIGCONT brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_target_stalls_and_recovers() {
    let mesh = MeshBuilder::new(3)
        .bridge_keys(&format!("{FAST_PROBES}\nkeep_alive = \"5s\""))
        .start();
    let m = wait_matrix(&mesh.admin, Duration::from_secs(20), all_flowing);
    assert!(all_flowing(&m), "{m:#?}");
    let pid = mesh.brokers[2].pid().unwrap();
    signal(pid, "STOP");
    let stopped = Instant::now();
    let into_b3 = |m: &Matrix| {
        ["b1", "b2"]
            .iter()
            .all(|o| m.pair(o, "b3").is_some_and(|p| p.stalled))
    };
    let m = wait_matrix(&mesh.admin, Duration::from_secs(10), into_b3);
    let took = stopped.elapsed();
    println!("stalled after {took:?}");
    assert!(into_b3(&m), "{m:#?}");
    assert!(!m.pair("b1", "b2").unwrap().stalled, "b1->b2 still flows");
    let base = format!("http://{}", mesh.admin);
    assert_eq!(http_get(&format!("{base}/replicationz"), None).0, 503);
    let (code, body) = http_get(&format!("{base}/readyz/broker/b3"), None);
    assert_eq!(code, 503, "{body}");
    assert_eq!(http_get(&format!("{base}/readyz/broker/b1"), None).0, 200);
    assert_eq!(
        http_get(&format!("{base}/readyz"), None).0,
        200,
        "the bridge itself is fine"
    );
    let (_, status, _) = cli_in(&["status", "--json", "--admin", &mesh.admin], None);
    assert!(status.contains("\"cut_off\": true"), "{status}");
    assert!(
        mesh.metrics()
            .contains("meshbridge_replication_stalled{origin=\"b2\",target=\"b3\"} 1")
    );
    signal(pid, "CONT");
    let m = wait_matrix(&mesh.admin, Duration::from_secs(30), |m| {
        m.stalled().next().is_none()
    });
    assert!(m.stalled().next().is_none(), "{m:#?}");
    assert_eq!(http_get(&format!("{base}/readyz/broker/b3"), None).0, 200);
    let log = mesh.bridge.log();
    let into_b3: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("replication stalled") && l.contains("target=b3"))
        .collect();
    assert_eq!(
        into_b3.len(),
        2,
        "b1->b3 and b2->b3, logged once each:\n{log}"
    );
    assert!(log.contains("replication flows again"));
}
