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
    // probe_stall_after (2 s), plus up to one probe interval and one 1 s check, plus the
    // matrix poll: well within 6 s.
    assert!(took < Duration::from_secs(6), "stalled only after {took:?}");
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

fn retained(topic: &str, payload: &str, qos: u8) -> Pub {
    Pub {
        retain: true,
        ..Pub::new(topic, payload, qos)
    }
}

/// What a fresh subscriber to `filter` on `port` gets as retained: (topic, payload), sorted.
async fn retained_on(port: u16, filter: &str) -> Vec<(String, String)> {
    let s = mqtt::subscribe(port, &format!("look-{}", rand::random::<u32>()), filter).await;
    s.settle(Duration::from_millis(400)).await;
    let mut got: Vec<(String, String)> = s
        .messages()
        .into_iter()
        .filter(|g| g.retain)
        .map(|g| (g.topic, String::from_utf8_lossy(&g.payload).into_owned()))
        .collect();
    got.sort();
    got
}

fn reconcile(admin: &str, args: &[&str]) -> meshbridge::reconcile::run::ReconcileReport {
    let mut all = vec!["reconcile", "--json", "--admin", admin];
    all.extend_from_slice(args);
    let (code, out, err) = cli_in(&all, None);
    assert_eq!(code, 0, "reconcile {args:?}: {err}");
    serde_json::from_str(&out).expect("reconcile JSON")
}

/// Retained messages set directly on brokers while the bridge was down (QoS 0: no session
/// keeps them for the bridge) make the brokers disagree; `reconcile` shows where, `--repair`
/// fixes it without a loop, and a second run finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_and_repairs_retained_drift() {
    let mut mesh = MeshBuilder::new(3).start();
    let ports: Vec<u16> = mesh.brokers.iter().map(|b| b.plain_port).collect();
    mqtt::publish(ports[0], "p0", &[retained("state/a", "1", 1)]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while retained_on(ports[2], "state/#").await.is_empty() && Instant::now() < deadline {}
    assert_eq!(mesh.bridge.terminate().map(|s| s.success()), Some(true));
    mqtt::publish(ports[1], "p1", &[retained("state/b", "only-b2", 0)]).await;
    mqtt::publish(ports[2], "p2", &[retained("state/a", "2", 0)]).await;
    mesh.bridge.respawn_subscribed(&["b1", "b2", "b3"]);

    let r = reconcile(&mesh.admin, &[]);
    assert_eq!(r.differing_topics, 2, "{r:#?}");
    let pair = |a: &str, b: &str| {
        let p = r
            .pairs
            .iter()
            .find(|p| p.first == a && p.second == b)
            .unwrap();
        (p.only_first, p.only_second, p.different)
    };
    assert_eq!(pair("b1", "b2"), (0, 1, 0));
    assert_eq!(pair("b1", "b3"), (0, 0, 1));
    assert_eq!(pair("b2", "b3"), (1, 0, 1));
    assert_eq!(
        (r.written, r.deleted),
        (0, 0),
        "nothing changed without --repair"
    );
    let (_, table, _) = cli_in(&["reconcile", "--admin", &mesh.admin], None);
    println!("{table}");
    assert!(
        table.contains(
            "state/a: b1=\"1\" (1 B, QoS 1), b2=\"1\" (1 B, QoS 1), b3=\"2\" (1 B, QoS 0)"
        ) && table.contains("state/b: b1=absent, b2=\"only-b2\"")
            && table.contains("--repair"),
        "{table}"
    );

    let watch_b1 = mqtt::subscribe(ports[0], "watch-b1", "state/#").await;
    let before = watch_b1.settle(Duration::from_millis(300)).await;
    let r = reconcile(&mesh.admin, &["--repair"]);
    // state/b to b1 and b3; state/a = "1" (2 brokers against 1) to b3.
    assert_eq!((r.written, r.deleted), (3, 0), "{r:#?}");
    let expected = vec![
        ("state/a".to_string(), "1".to_string()),
        ("state/b".to_string(), "only-b2".to_string()),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in &ports {
        loop {
            let got = retained_on(*port, "state/#").await;
            if got == expected || Instant::now() > deadline {
                assert_eq!(got, expected, "broker on port {port}");
                break;
            }
        }
    }
    // The repair of b3 was not forwarded back: b1's subscriber saw its own repair only.
    watch_b1.settle(Duration::from_millis(700)).await;
    let seen: Vec<String> = watch_b1.messages()[before..]
        .iter()
        .map(|g| g.topic.clone())
        .collect();
    assert_eq!(seen, ["state/b"]);
    let r = reconcile(&mesh.admin, &[]);
    assert_eq!(r.differing_topics, 0, "{r:#?}");
    let text = mesh.metrics();
    assert!(text.contains("meshbridge_reconcile_runs_total 4"), "{text}");
    assert!(text.contains("meshbridge_reconcile_repaired_total 3"));
    assert!(text.contains("meshbridge_reconcile_differences 0"));
    // --delete-extra needs --repair.
    let (code, _, err) = cli_in(
        &["reconcile", "--delete-extra", "--admin", &mesh.admin],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("--repair"), "{err}");
}

/// A broker added right after a bridge restart (nothing retained in the bridge's memory) gets
/// every retained message from its peers' snapshots, properties included; and the periodic
/// reconciliation repairs drift on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_broker_gets_the_retained_set_after_a_restart() {
    let mut mesh = MeshBuilder::new(3)
        .meshed(&[0, 1])
        .bridge_keys("reconcile_interval = \"10s\"")
        .start();
    let ports: Vec<u16> = mesh.brokers.iter().map(|b| b.plain_port).collect();
    let mut msgs: Vec<Pub> = (0..50)
        .map(|i| retained(&format!("ret/{i:02}"), &format!("v{i}"), 1))
        .collect();
    msgs[0].props = Some(rumqttc::v5::mqttbytes::v5::PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    });
    mqtt::publish(ports[0], "p0", &msgs).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while retained_on(ports[1], "ret/#").await.len() < 50 && Instant::now() < deadline {}
    assert_eq!(mesh.bridge.terminate().map(|s| s.success()), Some(true));
    // Drift while it is down: only b2 holds this one.
    mqtt::publish(ports[1], "p1", &[retained("drift/x", "d", 0)]).await;
    mesh.bridge.respawn_subscribed(&["b1", "b2"]);
    let addr = format!("127.0.0.1:{}", mesh.brokers[2].tls_port);
    let (code, _, err) = cli_in(
        &["add-broker", &addr, "--name", "b3", "--admin", &mesh.admin],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let want: Vec<String> = (0..50).map(|i| format!("ret/{i:02}")).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    let got = loop {
        let got = retained_on(ports[2], "#").await;
        if got.len() >= 51 || Instant::now() > deadline {
            break got;
        }
    };
    let topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    let mut expected: Vec<&str> = vec!["drift/x"];
    expected.extend(want.iter().map(String::as_str));
    assert_eq!(topics, expected);
    let s = mqtt::subscribe(ports[2], "props", "ret/00").await;
    s.wait_count(1, Duration::from_secs(5)).await;
    let props = s.messages()[0].props.clone().unwrap_or_default();
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert!(props.user_properties.contains(&("k".into(), "v".into())));
    assert!(
        mesh.metrics()
            .contains("meshbridge_retained_seeded_total 51"),
        "{}",
        mesh.metrics()
    );
    // The periodic reconciliation (every 10 s) gives b1 the drifted topic.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = retained_on(ports[0], "drift/#").await;
        if !got.is_empty() {
            assert_eq!(got, [("drift/x".to_string(), "d".to_string())]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not repaired by the periodic run"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        mesh.metrics()
            .contains("meshbridge_reconcile_repaired_total 1")
    );
}

/// mosquitto sends a new subscription at most its in-flight window plus `max_queued_messages`
/// (1000 by default) of its retained QoS 1/2 messages and drops the rest: a snapshot of 1500
/// held about 1100 and was reported complete, so a repair "fixed" brokers to what it saw and
/// `--delete-extra` deleted topics that most brokers held. Now a snapshot that reaches
/// `broker_queue_limit` is reported as possibly incomplete and left out, and nothing is
/// deleted while any snapshot is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_at_the_brokers_queue_limit_is_not_trusted() {
    let mesh = MeshBuilder::new(3)
        .every_broker(common::BrokerOpts {
            extra_conf: "max_queued_messages 1000",
            ..Default::default()
        })
        .start();
    let ports: Vec<u16> = mesh.brokers.iter().map(|b| b.plain_port).collect();
    let live = mqtt::subscribe(ports[2], "live-b3", "state/#").await;
    let msgs: Vec<Pub> = (0..1500)
        .map(|i| retained(&format!("state/{i}"), "v", 1))
        .collect();
    mqtt::publish_paced(
        ports[0],
        "p0",
        &msgs,
        1000,
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    )
    .await;
    assert_eq!(live.wait_count(1500, Duration::from_secs(30)).await, 1500);
    let r = reconcile(&mesh.admin, &["--repair", "--delete-extra"]);
    println!("{r:#?}");
    for b in &r.brokers {
        let error = b.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("may be incomplete") && error.contains("broker_queue_limit (1000)"),
            "{}: {b:?}",
            b.name
        );
    }
    assert_eq!((r.written, r.deleted), (0, 0), "{r:#?}");
}

/// b3 refuses the bridge's writes to `state/denied` (its ACL). A repair writes it there, the
/// broker drops it, and the next run finds the same difference: the repair is reported as
/// not taking and not written again (before, every periodic run wrote it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_does_not_take_is_reported_and_not_repeated() {
    let mesh = MeshBuilder::new(3)
        .broker(
            2,
            common::BrokerOpts {
                tls_acl: Some(
                    "topic read #\ntopic readwrite $meshbridge/#\ntopic write state/ok/#\n",
                ),
                ..Default::default()
            },
        )
        .start();
    let ports: Vec<u16> = mesh.brokers.iter().map(|b| b.plain_port).collect();
    mqtt::publish(
        ports[0],
        "p0",
        &[
            retained("state/denied", "x", 1),
            retained("state/ok/a", "y", 1),
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while retained_on(ports[2], "state/#").await.is_empty() && Instant::now() < deadline {}
    let first = reconcile(&mesh.admin, &["--repair"]);
    assert_eq!((first.written, first.not_repeated), (1, 0), "{first:#?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..2 {
        let again = reconcile(&mesh.admin, &["--repair"]);
        assert_eq!(again.differing_topics, 1, "{again:#?}");
        assert_eq!((again.written, again.not_repeated), (0, 1), "{again:#?}");
        assert!(
            again.notes.iter().any(|n| n.contains("not repeated")),
            "{again:#?}"
        );
    }
    let (_, table, _) = cli_in(&["reconcile", "--repair", "--admin", &mesh.admin], None);
    assert!(
        table.contains("note: 1 repairs written by the previous run"),
        "{table}"
    );
}
