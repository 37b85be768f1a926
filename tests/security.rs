//! The control plane against a hostile client (issue 26), on real mosquitto brokers that let
//! any client publish and pick its client id, as the deployments this replaces do. With a
//! mesh key (`[bridge] mesh_key_file`): forged records and echo notes are refused and counted,
//! and the client ids the documentation used to give away take no session over. Numbered
//! QoS 1 traffic counted on the other brokers: nothing lost.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use common::mqtt::{self, Pub, Sub};
use common::{Mesh, MeshBuilder};

/// A mesh key written by `bridge mesh-key` into `dir`; returns its `[bridge]` line.
fn mesh_key(dir: &std::path::Path) -> String {
    let path = dir.join("mesh.key");
    let (code, out, err) = common::cli_in(&["mesh-key", "--out", path.to_str().unwrap()], None);
    assert_eq!(code, 0, "bridge mesh-key: {out}{err}");
    format!("mesh_key_file = \"{}\"", path.display())
}

/// `n` brokers meshed by one process, instance "a", with a mesh key (in the returned directory:
/// keep it as long as the mesh).
fn keyed_mesh(n: usize) -> (tempfile::TempDir, Mesh) {
    let keys = common::tempdir();
    let mesh = MeshBuilder::new(n)
        .bridge_keys(&format!("instance = \"a\"\n{}", mesh_key(keys.path())))
        .start();
    (keys, mesh)
}

/// (lost, duplicates) of `0..n` on `topic` as `sub` got them, once every one arrived or 30 s
/// passed.
async fn tally(sub: &Sub, topic: &str, n: usize) -> (usize, usize) {
    let count = || {
        let mut seen = vec![0usize; n];
        for m in sub.messages().iter().filter(|m| m.topic == topic) {
            if let Ok(i) = std::str::from_utf8(&m.payload)
                .unwrap_or("")
                .parse::<usize>()
            {
                seen[i] += 1;
            }
        }
        (
            seen.iter().filter(|c| **c == 0).count(),
            seen.iter().map(|c| c.saturating_sub(1)).sum(),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count().0 > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sub.settle(Duration::from_millis(300)).await;
    count()
}

/// `broker`'s row of `bridge status --json`.
fn row(mesh: &Mesh, broker: &str) -> serde_json::Value {
    let (_, body) = common::http_get(&format!("http://{}/api/v1/brokers", mesh.admin), None);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    rows.into_iter().find(|r| r["name"] == broker).unwrap()
}

fn rejected(mesh: &Mesh, broker: &str, kind: &str) -> f64 {
    let prefix =
        format!("meshbridge_control_rejected_total{{broker=\"{broker}\",kind=\"{kind}\"}} ");
    mesh.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Forged retained instance records (alive, started in the far future, under twenty names:
/// some beat the real process in the rendezvous for b1) and a forged owner record naming one of
/// them. Without a key one such record made the process hand b1 over to nobody, on every
/// reconnect (3 109 of 11 500 lost); with a key they are refused, counted, and b1 stays
/// consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_are_refused_with_a_mesh_key() {
    let (_keys, mesh) = keyed_mesh(3);
    let b = &mesh.brokers;
    let sub = mqtt::subscribe(b[1].plain_port, "s2", "seq/#").await;
    let future = 4_102_444_800_000u64; // 2100
    let mut forged: Vec<Pub> = (0..20)
        .map(|i| {
            let body =
                format!("{{\"alive\":true,\"nonce\":{i},\"started\":{future},\"admin\":\"\"}}");
            let mut p = Pub::new(format!("$meshbridge/mesh/instance/x{i}"), body, 1);
            p.retain = true;
            p
        })
        .collect();
    let mut owner = Pub::new(
        "$meshbridge/mesh/owner/b1",
        format!("{{\"instance\":\"x0\",\"since\":{future},\"released\":false}}"),
        1,
    );
    owner.retain = true;
    forged.push(owner);
    mqtt::publish(b[0].plain_port, "forger", &forged).await;
    // 8 s: past the 5 s after which an owner hands a broker to a newcomer the rendezvous
    // prefers. b1 must stay consumed all along.
    let msgs: Vec<Pub> = (0..4000)
        .map(|i| Pub::new("seq/b1", format!("{i}"), 1))
        .collect();
    let port = b[0].plain_port;
    let stream = tokio::spawn(async move {
        mqtt::publish_paced(port, "p1", &msgs, 500, Arc::new(AtomicUsize::new(0))).await
    });
    let mut unconsumed = 0;
    while !stream.is_finished() {
        let r = row(&mesh, "b1");
        if r["consuming"] != true || r["owner"] != "a" {
            unconsumed += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stream.await.unwrap();
    let (lost, dups) = tally(&sub, "seq/b1", 4000).await;
    println!(
        "b1 -> b2 under forged records: lost {lost}, duplicates {dups}; b1 not consumed by \
         this process in {unconsumed} samples"
    );
    assert_eq!(lost, 0);
    assert_eq!(unconsumed, 0, "b1 was handed to a forged instance");
    let r = row(&mesh, "b1");
    assert_eq!(
        r["consuming"], true,
        "b1 still consumed by this process: {r}"
    );
    assert_eq!(r["owner"], "a", "{r}");
    assert!(
        rejected(&mesh, "b1", "instance") >= 20.0,
        "{}",
        mesh.metrics()
    );
    assert!(rejected(&mesh, "b1", "owner") >= 1.0);
    assert!(
        mesh.bridge.log().contains("control payload refused"),
        "logged (once per kind and interval)"
    );
}

/// The fingerprint the bridge's MQTT 3.1.1 echo notes carry (first 8 bytes of SHA-256 over the
/// topic's length, the topic and the payload): anyone can compute it.
fn portable_fingerprint(topic: &str, payload: &str) -> [u8; 8] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(topic.len() as u64).to_be_bytes());
    ctx.update(topic.as_bytes());
    ctx.update(payload.as_bytes());
    let digest = ctx.finish();
    digest.as_ref()[..8].try_into().unwrap()
}

/// Publishes on b1 50 forged echo notes for `echo/t` payloads `0..50`, then those 50 messages;
/// returns how many of them b2's subscriber did not get.
async fn forged_notes_then_the_messages(mesh: &Mesh) -> usize {
    let b = &mesh.brokers;
    let sub = mqtt::subscribe(b[1].plain_port, "s2", "echo/#").await;
    let notes: Vec<Pub> = (0..50)
        .map(|i| {
            Pub::new(
                "$meshbridge/mesh/echo",
                portable_fingerprint("echo/t", &i.to_string()).to_vec(),
                0,
            )
        })
        .collect();
    mqtt::publish(b[0].plain_port, "forger", &notes).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msgs: Vec<Pub> = (0..50)
        .map(|i| Pub::new("echo/t", format!("{i}"), 1))
        .collect();
    mqtt::publish(b[0].plain_port, "p1", &msgs).await;
    let (lost, dups) = tally(&sub, "echo/t", 50).await;
    println!("under 50 forged echo notes: lost {lost}, duplicates {dups}");
    lost
}

/// Without a key, in a mesh of one process: forged echo notes name no other live instance, so
/// they are not taken (they made the bridge drop the genuine messages they named).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_echo_notes_drop_nothing_in_a_mesh_of_one_process_without_a_key() {
    let mesh = MeshBuilder::new(2)
        .link_keys("protocol = \"v3.1.1\"")
        .start();
    let lost = forged_notes_then_the_messages(&mesh).await;
    assert_eq!(lost, 0, "genuine messages dropped as echoes");
    assert_eq!(row(&mesh, "b1")["dropped_echo"], 0);
}

/// 50 forged echo notes on an MQTT 3.1.1 broker for the 50 messages a client publishes next.
/// Without a key the bridge took them for another process's echoes and dropped all 50
/// genuine messages; with a key the notes are refused and every message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_echo_notes_do_not_drop_genuine_messages() {
    let keys = common::tempdir();
    let mesh = MeshBuilder::new(3)
        .bridge_keys(&mesh_key(keys.path()))
        .link_keys("protocol = \"v3.1.1\"")
        .start();
    let lost = forged_notes_then_the_messages(&mesh).await;
    assert_eq!(lost, 0, "genuine messages dropped as echoes");
    assert_eq!(row(&mesh, "b1")["dropped_echo"], 0);
    assert_eq!(rejected(&mesh, "b1", "echo"), 50.0);
}

/// A client that connects with a clean session under the client ids the mesh used to have
/// (`<id>-<broker>`, its park and copy sessions) every 300 ms during a stream. Without a key
/// each CONNECT discarded the owner's session (2 933 of 4 000 lost); with a key the mesh's
/// ids carry a suffix derived from it, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessed_client_ids_take_no_session_over() {
    let (_keys, mesh) = keyed_mesh(3);
    let b = &mesh.brokers;
    let sub = mqtt::subscribe(b[1].plain_port, "s2", "seq/#").await;
    let port = b[0].plain_port;
    let thief = tokio::spawn(async move {
        for _ in 0..20 {
            for id in ["mesh-b1", "mesh-b1~park-b2", "mesh-b1@a"] {
                mqtt::publish(port, id, &[]).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let msgs: Vec<Pub> = (0..3000)
        .map(|i| Pub::new("seq/b1", format!("{i}"), 1))
        .collect();
    mqtt::publish_paced(port, "p1", &msgs, 500, Arc::new(AtomicUsize::new(0))).await;
    thief.await.unwrap();
    let (lost, dups) = tally(&sub, "seq/b1", 3000).await;
    println!("b1 -> b2 with a client taking the documented ids: lost {lost}, duplicates {dups}");
    assert_eq!(lost, 0);
    let log = b[0].log();
    let derived = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(" as mesh-b1-"))
        .count();
    assert!(
        derived > 0,
        "the mesh's own ids carry the derived suffix:\n{log}"
    );
    assert_eq!(
        row(&mesh, "b1")["takeovers"],
        1,
        "one takeover, at the start"
    );
}

/// `bridge mesh-key` writes a key only its owner reads; `check` warns while a mesh has none.
#[test]
fn mesh_key_file_and_the_warning_without_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::tempdir();
    let key_line = mesh_key(dir.path());
    let mode = std::fs::metadata(dir.path().join("mesh.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (code, _, err) = common::cli_in(
        &[
            "mesh-key",
            "--out",
            dir.path().join("mesh.key").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 64, "no overwrite without --force: {err}");
    assert!(err.contains("exists already"), "{err}");
    let base = "[bridge]\nid = \"m\"\n\n[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:1883\"\ntls = false\n";
    let cfg = dir.path().join("bridge.toml");
    std::fs::write(&cfg, base).unwrap();
    let (code, _, err) = common::cli_in(&["check", "--config", cfg.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("bridge.mesh_key_file is not set") && err.contains("docs/SECURITY.md"),
        "{err}"
    );
    std::fs::write(
        &cfg,
        base.replace("id = \"m\"", &format!("id = \"m\"\n{key_line}")),
    )
    .unwrap();
    let (code, _, err) = common::cli_in(&["check", "--config", cfg.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("mesh_key_file"), "{err}");
}

/// Rules that would subscribe a shared or a control filter, map traffic into the mesh's
/// control topics, or carry NUL: `add-broker` through the API answers 400 naming the rule's
/// key, and nothing is added (it used to answer 201, and a NUL filter then cost the link its
/// connection on every attempt).
#[test]
fn hostile_rules_are_refused_with_the_key_named() {
    let mesh = MeshBuilder::new(2).meshed(&[0]).start();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let address = format!("127.0.0.1:{}", mesh.brokers[1].tls_port);
    for (rule, key) in [
        (serde_json::json!({"filter": "a/\u{0}/b"}), "rule[0].filter"),
        (
            serde_json::json!({"filter": "$share/g/#"}),
            "rule[0].filter",
        ),
        (
            serde_json::json!({"filter": "$meshbridge/#"}),
            "rule[0].filter",
        ),
        (
            serde_json::json!({"filter": "#", "mesh_prefix": "$meshbridge/mesh/"}),
            "rule[0].mesh_prefix",
        ),
        (
            serde_json::json!({"filter": "#", "broker_prefix": "$meshbridge/mesh/owner/"}),
            "rule[0].broker_prefix",
        ),
    ] {
        let body = serde_json::json!({"address": address, "name": "b2", "rules": [rule]});
        let mut resp = agent
            .post(format!("http://{}/api/v1/brokers", mesh.admin))
            .send_json(&body)
            .expect("admin API");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(status, 400, "{rule}: {text}");
        assert!(text.contains(key), "{rule}: {text}");
    }
    let (_, body) = common::http_get(&format!("http://{}/api/v1/brokers", mesh.admin), None);
    assert!(!body.contains("\"b2\""), "nothing added: {body}");
}

/// Without a key, a client that connects once with a clean session as `mesh-b1` discards the
/// mesh's session on b1 (and with it what b1 held for the bridge). The bridge cannot prevent
/// that, but it no longer goes unnoticed: when its consumer connects again and the broker has no
/// session, it logs an error and counts `meshbridge_session_lost_total` (an alert rule fires).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_discarded_by_a_client_is_reported() {
    let mesh = MeshBuilder::new(2).start();
    let lost = |mesh: &Mesh| {
        common::metric(&mesh.metrics(), "meshbridge_session_lost_total", "b1").unwrap_or(-1.0)
    };
    assert_eq!(lost(&mesh), 0.0);
    mqtt::publish(mesh.brokers[0].plain_port, "mesh-b1", &[]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while lost(&mesh) < 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lost(&mesh), 1.0, "{}", mesh.bridge.log());
    assert!(
        mesh.bridge
            .log()
            .contains("the broker had no session for the mesh")
    );
    assert_eq!(row(&mesh, "b1")["session_lost"], 1);
}

/// Parking with a mesh key: b3 is down while 1000 messages from b1 are spooled and their copies
/// parked (sealed) on b1; a client forges a well-formed copy into the same park session; the
/// bridge host is lost with its disk. A fresh process with the key delivers every sealed copy
/// to b3 and refuses the forged one (without a key it would have delivered it to b3 as if b1
/// had sent it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_park_copies_survive_a_host_loss_and_forged_ones_are_refused() {
    let keys = common::tempdir();
    let key = mesh_key(keys.path());
    let mesh = MeshBuilder::new(3)
        .broker(2, common::BrokerOpts::persistent())
        .bridge_keys(&format!("instance = \"a\"\n{key}"))
        .start();
    let Mesh {
        mut brokers,
        mut bridge,
        config,
        ..
    } = mesh;
    let s3 = mqtt::subscribe_persistent(brokers[2].plain_port, "s3", "seq/#").await;
    tokio::task::block_in_place(|| brokers[2].terminate());
    let msgs: Vec<Pub> = (0..1000)
        .map(|i| Pub::new("seq/b1", format!("{i}"), 1))
        .collect();
    mqtt::publish_paced(
        brokers[0].plain_port,
        "p1",
        &msgs,
        1000,
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    let admin = common::admin_addr(&config);
    let parked = || {
        common::metric(
            &common::http_get(&format!("http://{admin}/metrics"), None).1,
            "meshbridge_parked_total",
            "b1",
        )
        .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while parked() < 1000.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(parked(), 1000.0, "b1 holds a copy of each");
    let forged = meshbridge::testing::forged_park_copy("b1", "b3", "seq/b1", b"forged");
    mqtt::publish(
        brokers[0].plain_port,
        "forger",
        &[Pub::new("$meshbridge/mesh/park/b3", forged, 1)],
    )
    .await;
    // The host and its disk are lost; a fresh process takes over.
    tokio::task::block_in_place(|| bridge.kill());
    let data_dir = config
        .lines()
        .find_map(|l| l.strip_prefix("data_dir = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("data_dir");
    std::fs::remove_dir_all(data_dir).unwrap();
    let fresh_config = config.replace("instance = \"a\"", "instance = \"c\"");
    let fresh = common::Bridge::start(&bridge.dir.join("../fresh"), &fresh_config);
    tokio::task::block_in_place(|| brokers[2].restart());
    fresh.wait_subscribed(&["b1", "b2", "b3"]);
    let (lost, dups) = tally(&s3, "seq/b1", 1000).await;
    println!("b1 -> b3 across the host loss, with a key: lost {lost}, duplicates {dups}");
    assert_eq!(lost, 0);
    assert!(
        s3.messages().iter().all(|m| &m.payload[..] != b"forged"),
        "the forged copy reached b3"
    );
    let metrics = common::http_get(&format!("http://{admin}/metrics"), None).1;
    assert!(
        metrics.contains("meshbridge_control_rejected_total{broker=\"b1\",kind=\"park\"} 1"),
        "{metrics}"
    );
}

/// CPU ticks (user + system) the process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A flood of 20 000 forged retained instance records on b1 (without a key it cost the process
/// 95 % of a core and b1 its consumer for half the time, each record re-deciding over every
/// instance). With a key each costs one HMAC and is counted: b1 stays consumed, its link stays
/// up, and the CPU the flood cost is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_records_is_cheap_to_refuse() {
    let (_keys, mesh) = keyed_mesh(2);
    let pid = mesh.bridge.pid().unwrap();
    let before = cpu_ticks(pid);
    let started = std::time::Instant::now();
    let flood: Vec<Pub> = (0..20_000)
        .map(|i| {
            let mut p = Pub::new(
                format!("$meshbridge/mesh/instance/f{i}"),
                format!(
                    "{{\"alive\":true,\"nonce\":{i},\"started\":4102444800000,\"admin\":\"\"}}"
                ),
                0,
            );
            p.retain = true;
            p
        })
        .collect();
    mqtt::publish(mesh.brokers[0].plain_port, "flooder", &flood).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rejected(&mesh, "b1", "instance") < 20_000.0 && std::time::Instant::now() < deadline {
        assert_eq!(row(&mesh, "b1")["consuming"], true);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ticks = cpu_ticks(pid) - before;
    println!(
        "20 000 forged records refused in {:?}: the bridge used {} CPU ticks (1/100 s each)",
        started.elapsed(),
        ticks
    );
    assert_eq!(rejected(&mesh, "b1", "instance"), 20_000.0);
    let r = row(&mesh, "b1");
    assert_eq!(r["consuming"], true, "{r}");
    assert_eq!(r["reconnects"], 0, "b1's link stayed up: {r}");
}

/// Without a key, a client that connects as `mesh-b1` keeping the session (clean start off)
/// takes the consumer's session over, and what it receives is lost to the mesh. The broker just
/// closes the bridge's connection; the bridge finds the owner record still naming itself (no
/// instance of the mesh claimed b1), logs an error and counts
/// `meshbridge_session_taken_total`; an alert rule fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_taken_over_by_a_client_is_reported() {
    let mesh = MeshBuilder::new(2).start();
    let taken = |mesh: &Mesh| {
        common::metric(&mesh.metrics(), "meshbridge_session_taken_total", "b1").unwrap_or(-1.0)
    };
    assert_eq!(taken(&mesh), 0.0);
    let thief = mqtt::subscribe_persistent(mesh.brokers[0].plain_port, "mesh-b1", "#").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while taken(&mesh) < 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(thief);
    assert!(taken(&mesh) >= 1.0, "{}", mesh.bridge.log());
    assert!(mesh.bridge.log().contains("took the session over"));
    assert_eq!(
        common::metric(&mesh.metrics(), "meshbridge_session_taken_total", "b2"),
        Some(0.0)
    );
}
