//! Admin API and CLI verbs against a running bridge and real mosquitto brokers: health,
//! readiness, metrics, status, live add/remove with persistence, retained hand-over, tokens,
//! SIGHUP reload.

mod common;

use std::time::{Duration, Instant};

use common::mqtt::{self, Pub};
use common::{
    Bridge, MeshBuilder, admin_addr, bridge_config, free_port, http_get, metric, multiset_diff,
    signal,
};

fn cli(args: &[&str]) -> (i32, String, String) {
    common::cli_in(args, None)
}

fn status_json(admin: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = cli(&["status", "--json", "--admin", admin]);
    assert_eq!(code, 0, "status failed: {err}");
    serde_json::from_str(&out).expect("status --json is JSON")
}

fn wait_state(admin: &str, broker: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let links = status_json(admin);
        if links
            .iter()
            .any(|l| l["name"] == broker && l["state"] == state)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{broker} never became {state}: {links:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_status() {
    let m = MeshBuilder::new(3).down(2).start();
    let [b1, b2, _b3] = &m.brokers[..] else {
        unreachable!()
    };
    let (admin, bridge) = (m.admin.clone(), &m.bridge);
    assert!(common::wait_port(
        admin.rsplit(':').next().unwrap().parse().unwrap(),
        Duration::from_secs(10)
    ));
    assert_eq!(http_get(&format!("http://{admin}/healthz"), None).0, 200);
    bridge.wait_subscribed(&["b1", "b2"]);

    // Ready once every link connected or reported why not (b3 is down: its error counts).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(&format!("http://{admin}/readyz"), None);
        if code == 200 {
            assert!(body.contains("\"ready\":true"), "{body}");
            break;
        }
        assert_eq!(code, 503, "{body}");
        assert!(Instant::now() < deadline, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let s2 = mqtt::subscribe(b2.plain_port, "s2", "m/#").await;
    let msgs: Vec<Pub> = (0..50)
        .map(|i| Pub::new("m/x", format!("{i}"), 1))
        .collect();
    mqtt::publish(b1.plain_port, "p1", &msgs).await;
    s2.wait_count(50, Duration::from_secs(10)).await;

    // The subscriber can see a message before the bridge has processed the broker's PUBACK.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (code, text) = http_get(&format!("http://{admin}/metrics"), None);
        assert_eq!(code, 200);
        let forwarded = metric(&text, "meshbridge_forwarded_total", "b1").unwrap_or(0.0);
        let out = metric(&text, "meshbridge_messages_out_total", "b2").unwrap_or(0.0);
        if forwarded >= 50.0 && out >= 50.0 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "counters never reached 50:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        metric(&text, "meshbridge_connected", "b1"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "meshbridge_connected", "b3"),
        Some(0.0),
        "{text}"
    );
    assert!(
        metric(&text, "meshbridge_reconnects_total", "b3").is_some(),
        "{text}"
    );
    assert!(
        text.contains("# TYPE meshbridge_queue_depth gauge"),
        "{text}"
    );
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );

    let links = status_json(&admin);
    let b3s = links
        .iter()
        .find(|l| l["name"] == "b3")
        .expect("b3 in status");
    assert_ne!(b3s["state"], "connected");
    assert!(
        b3s["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{b3s}"
    );
    let (code, table, _) = cli(&["status", "--admin", &admin]);
    assert_eq!(code, 0);
    assert!(table.starts_with("BROKER"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("b1 ") && l.contains("connected")),
        "{table}"
    );

    // Unknown routes and an unreachable admin address are clear errors.
    assert_eq!(http_get(&format!("http://{admin}/nope"), None).0, 404);
    let (code, _, err) = cli(&["status", "--admin", &format!("127.0.0.1:{}", free_port())]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the admin API"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_brokers_live_and_persist_it() {
    let mut m = MeshBuilder::new(3).meshed(&[0, 1]).start();
    let admin = m.admin.clone();
    let common::Mesh {
        brokers,
        bridge,
        tmp,
        ..
    } = &mut m;
    let [b1, b2, b3] = &brokers[..] else {
        unreachable!()
    };

    // A retained message exists in the mesh before b3 joins.
    let mut r = Pub::new("state/door", "open", 1);
    r.retain = true;
    mqtt::publish(b1.plain_port, "p-r", &[r]).await;
    let s2 = mqtt::subscribe(b2.plain_port, "s2", "#").await;
    s2.wait_count(1, Duration::from_secs(10)).await;

    // add-broker while traffic flows between b1 and b2.
    let flow: Vec<Pub> = (0..600)
        .map(|i| Pub::new("flow/x", format!("f{i}"), 1))
        .collect();
    let publisher = {
        let msgs = flow.clone();
        let port = b1.plain_port;
        tokio::spawn(async move { mqtt::publish(port, "p-flow", &msgs).await })
    };
    let addr3 = format!("127.0.0.1:{}", b3.tls_port);
    let (code, out, err) = cli(&["add-broker", &addr3, "--name", "b3", "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("added b3"), "{out}");
    publisher.await.unwrap();
    s2.wait_count(601, Duration::from_secs(20)).await;
    let flow_payloads: Vec<Vec<u8>> = flow.iter().map(|m| m.payload.clone()).collect();
    let got: Vec<Vec<u8>> = s2
        .payloads()
        .into_iter()
        .filter(|p| p.starts_with(b"f"))
        .collect();
    assert_eq!(
        multiset_diff(&flow_payloads, &got),
        "",
        "b1 -> b2 undisturbed by the addition"
    );
    wait_state(&admin, "b3", "connected");
    bridge.wait_subscribed(&["b3"]);

    // The new broker got the mesh's retained state, and replicates both ways.
    let late = mqtt::subscribe(b3.plain_port, "late", "state/#").await;
    late.wait_count(1, Duration::from_secs(10)).await;
    let m = late.messages();
    assert_eq!(m.len(), 1);
    assert_eq!(&m[0].payload[..], b"open");
    assert!(m[0].retain);
    let s3 = mqtt::subscribe(b3.plain_port, "s3", "live/#").await;
    mqtt::publish(b1.plain_port, "p-a", &[Pub::new("live/a", "to b3", 1)]).await;
    assert_eq!(s3.wait_count(1, Duration::from_secs(10)).await, 1);
    let s2n = s2.count();
    mqtt::publish(b3.plain_port, "p-b", &[Pub::new("live/b", "from b3", 1)]).await;
    assert!(
        s2.wait_count(s2n + 1, Duration::from_secs(10)).await > s2n,
        "b3 -> b2"
    );

    // Errors: duplicate, bad address, bad protocol, unknown broker.
    let (code, _, err) = cli(&["add-broker", &addr3, "--name", "b3", "--admin", &admin]);
    assert_eq!(code, 1);
    assert!(
        err.contains("exists already") && err.contains("409"),
        "{err}"
    );
    let (code, _, err) = cli(&["add-broker", &addr3, "--name", "other", "--admin", &admin]);
    assert_eq!(code, 1);
    assert!(err.contains("already in the mesh as \"b3\""), "{err}");
    let (code, _, err) = cli(&["add-broker", "10.0.0.3:88x3", "--admin", &admin]);
    assert_eq!(code, 1);
    assert!(
        err.contains("broker.address") && err.contains("invalid port"),
        "{err}"
    );
    let (code, _, err) = cli(&["add-broker", &addr3, "--protocol", "v4", "--admin", &admin]);
    assert_eq!(code, 64);
    assert!(err.contains("--protocol"), "{err}");
    let (code, _, err) = cli(&["remove-broker", "nope", "--admin", &admin]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no broker named or addressed \"nope\""),
        "{err}"
    );

    // remove-broker by address: b2 leaves, b1 <-> b3 goes on.
    let addr2 = format!("127.0.0.1:{}", b2.tls_port);
    let (code, out, err) = cli(&["remove-broker", &addr2, "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed b2"), "{out}");
    let before = s2.count();
    mqtt::publish(
        b1.plain_port,
        "p-c",
        &[Pub::new("live/c", "after removal", 1)],
    )
    .await;
    // s3 has live/a (from b1), live/b (published on b3 itself), now live/c.
    assert_eq!(s3.wait_count(3, Duration::from_secs(10)).await, 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s2.count(), before, "a removed broker receives nothing");
    let names: Vec<String> = status_json(&admin)
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["b1", "b3"]);

    // The membership survives a restart.
    assert!(bridge.terminate().is_some_and(|s| s.success()));
    bridge.spawn();
    let port: u16 = admin.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        common::wait_port(port, Duration::from_secs(10)),
        "admin API back"
    );
    wait_state(&admin, "b1", "connected");
    wait_state(&admin, "b3", "connected");
    let names: Vec<String> = status_json(&admin)
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["b1", "b3"], "persisted under data_dir");
    let persisted = std::fs::read_to_string(tmp.path().join("data/membership.json")).unwrap();
    assert!(
        persisted.contains("\"b3\"") && persisted.contains("\"removed\""),
        "{persisted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_required_and_refusals_are_logged() {
    let (tmp, certs, [b1]) = common::lab();
    let token_file = tmp.path().join("admin.token");
    std::fs::write(&token_file, "s3cr3t-token\n").unwrap();
    let cfg = bridge_config(&certs, "mesh", &tmp.path().join("data"), &[(&b1, "")]).replace(
        "[bridge]\n",
        &format!(
            "[bridge]\nadmin_token_file = \"{}\"\n",
            token_file.display()
        ),
    );
    let admin = admin_addr(&cfg);
    let bridge = Bridge::start(&tmp.path().join("bridge"), &cfg);
    bridge.wait_subscribed(&["b1"]);
    assert_eq!(
        http_get(&format!("http://{admin}/healthz"), None).0,
        200,
        "health checks stay open"
    );
    assert_eq!(http_get(&format!("http://{admin}/metrics"), None).0, 401);
    assert_eq!(
        http_get(&format!("http://{admin}/metrics"), Some("wrong")).0,
        401
    );
    assert_eq!(
        http_get(&format!("http://{admin}/metrics"), Some("s3cr3t-token")).0,
        200
    );
    let (code, _, err) = cli(&["status", "--admin", &admin]);
    assert_eq!(code, 1);
    assert!(err.contains("bearer token") && err.contains("401"), "{err}");
    // --config reads the address and the token file.
    let cfg_path = bridge.dir.join("bridge.toml");
    let (code, out, err) = cli(&["status", "--config", cfg_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("b1"), "{out}");
    // The scheme is case-insensitive (RFC 7235).
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let lower = agent
        .get(&format!("http://{admin}/metrics"))
        .header("Authorization", "bearer s3cr3t-token")
        .call()
        .unwrap();
    assert_eq!(lower.status().as_u16(), 200);
    // A flood of refused requests is one log line per peer every 10 s, not one each.
    for _ in 0..50 {
        assert_eq!(
            http_get(&format!("http://{admin}/metrics"), Some("guess")).0,
            401
        );
    }
    assert!(
        bridge.wait_log("without a valid token refused", 1, Duration::from_secs(5)),
        "{}",
        bridge.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    let lines = bridge
        .log()
        .matches("without a valid token refused")
        .count();
    assert_eq!(
        lines,
        1,
        "53 refusals within 10 s: one line\n{}",
        bridge.log()
    );
    assert!(
        !bridge.log().contains("s3cr3t-token"),
        "the token never reaches the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_broker_changes_from_the_config_file() {
    let m = MeshBuilder::new(3).meshed(&[0, 1]).start();
    let [b1, b2, b3] = &m.brokers[..] else {
        unreachable!()
    };
    let (admin, bridge, cfg) = (m.admin.clone(), &m.bridge, m.config.clone());
    let pid = bridge_pid(bridge);
    // Retained in the mesh before b3 joins: b3 gets it from its peers' snapshots.
    let s2 = mqtt::subscribe(b2.plain_port, "s2", "state/#").await;
    mqtt::publish(
        b1.plain_port,
        "p-r",
        &[Pub {
            retain: true,
            ..Pub::new("state/hup", "kept", 1)
        }],
    )
    .await;
    assert_eq!(s2.wait_count(1, Duration::from_secs(10)).await, 1);

    // b3 appears in the file, b2 disappears: SIGHUP applies both.
    let new_cfg = format!(
        "{}{}",
        cfg.split("[[broker]]").next().unwrap(),
        [&b1, &b3]
            .iter()
            .map(|b| common::broker_block(b, ""))
            .collect::<String>()
    );
    std::fs::write(bridge.dir.join("bridge.toml"), &new_cfg).unwrap();
    signal(pid, "HUP");
    bridge.wait_subscribed(&["b3"]);
    assert!(bridge.wait_log("configuration reloaded", 1, Duration::from_secs(10)));
    wait_state(&admin, "b3", "connected");
    let names: Vec<String> = status_json(&admin)
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["b1", "b3"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = mqtt::subscribe(b3.plain_port, "r3", "state/#").await;
        if r.wait_count(1, Duration::from_millis(500)).await == 1 {
            assert_eq!(&r.messages()[0].payload[..], b"kept");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b3 never got the retained message"
        );
    }
    let s3 = mqtt::subscribe(b3.plain_port, "s3", "hup/#").await;
    mqtt::publish(b1.plain_port, "p", &[Pub::new("hup/x", "after reload", 1)]).await;
    assert_eq!(s3.wait_count(1, Duration::from_secs(10)).await, 1);

    // A broken file is refused and the running set is kept.
    std::fs::write(bridge.dir.join("bridge.toml"), "[bridge]\nid = ").unwrap();
    signal(pid, "HUP");
    assert!(
        bridge.wait_log("reload refused", 1, Duration::from_secs(10)),
        "{}",
        bridge.log()
    );
    assert_eq!(status_json(&admin).len(), 2);

    // Process-wide settings: refused, naming each key; nothing is applied.
    // (Before, the log said `configuration reloaded started=[] removed=[]` and kept the old
    // address silently.)
    let b3_moved = common::broker_block(b3, "max_qos = 1").replace(
        &format!("127.0.0.1:{}", b3.tls_port),
        &format!("127.0.0.1:{}", b2.tls_port),
    );
    let head = cfg
        .split("[[broker]]")
        .next()
        .unwrap()
        .replace("id = \"mesh\"", "id = \"other\"");
    let b4 = format!(
        "[[broker]]\nname = \"b4\"\naddress = \"127.0.0.1:{}\"\n",
        free_port()
    );
    let changed = format!("{head}{}{b3_moved}{b4}", common::broker_block(b1, ""));
    std::fs::write(bridge.dir.join("bridge.toml"), &changed).unwrap();
    signal(pid, "HUP");
    assert!(
        bridge.wait_log("reload refused", 2, Duration::from_secs(10)),
        "{}",
        bridge.log()
    );
    let log = bridge.log();
    let line = log.lines().rfind(|l| l.contains("reload refused")).unwrap();
    assert!(line.contains("bridge.id"), "{line}");
    // A broker's own connection settings are applied by restarting its link (not refused);
    // here the refusal of the whole reload keeps them as they were.
    assert!(!line.contains("broker b3"), "{line}");
    let links = status_json(&admin);
    let names: Vec<&str> = links.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["b1", "b3"], "b4 not added by a refused reload");
    assert_eq!(
        links[1]["address"],
        format!("127.0.0.1:{}", b3.tls_port),
        "b3 keeps running as it was"
    );
}

fn bridge_pid(bridge: &Bridge) -> u32 {
    bridge.pid().expect("bridge running")
}

/// Removing a broker and adding one of the same name while the old link still drains must not
/// cost the new one its messages (the old link's end deleted the spool table both shared): the
/// add is refused, naming why, until the drain has ended; then the name is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_refused_while_its_removal_drains_then_free_again() {
    let m = MeshBuilder::new(4)
        .meshed(&[0, 1])
        .bridge_keys("drain_timeout = \"4s\"")
        .start();
    let [b1, _b2, b3, b4] = &m.brokers[..] else {
        unreachable!()
    };
    let (admin, bridge) = (m.admin.clone(), &m.bridge);
    let addr3 = format!("127.0.0.1:{}", b3.tls_port);
    let addr4 = format!("127.0.0.1:{}", b4.tls_port);
    let (code, _, err) = cli(&["add-broker", &addr3, "--name", "z", "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    wait_state(&admin, "z", "connected");

    // z freezes with messages for it; its removal drains for up to 4 s.
    signal(b3.pid().unwrap(), "STOP");
    let msgs: Vec<Pub> = (0..50)
        .map(|i| Pub::new("d/old", format!("{i}"), 1))
        .collect();
    mqtt::publish(b1.plain_port, "p-old", &msgs).await;
    let admin2 = admin.clone();
    let removal = std::thread::spawn(move || cli(&["remove-broker", "z", "--admin", &admin2]));
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !removal.is_finished(),
        "the removal should still be draining"
    );
    let (code, _, err) = cli(&["add-broker", &addr4, "--name", "z", "--admin", &admin]);
    assert_eq!(code, 1, "an add during the drain must be refused: {err}");
    assert!(
        err.contains("still draining") && err.contains("409"),
        "{err}"
    );
    let (code, out, err) = removal.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed z"), "{out}");
    signal(b3.pid().unwrap(), "CONT");

    // The name is free again, and the new z gets every new message.
    let (code, _, err) = cli(&["add-broker", &addr4, "--name", "z", "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    wait_state(&admin, "z", "connected");
    bridge.wait_log("link{broker=z}", 1, Duration::from_secs(5));
    let s4 = mqtt::subscribe(b4.plain_port, "s4", "d/new").await;
    let msgs: Vec<Pub> = (0..30)
        .map(|i| Pub::new("d/new", format!("{i}"), 1))
        .collect();
    mqtt::publish(b1.plain_port, "p-new", &msgs).await;
    assert_eq!(s4.wait_count(30, Duration::from_secs(15)).await, 30);
    let expected: Vec<Vec<u8>> = (0..30).map(|i| format!("{i}").into_bytes()).collect();
    assert_eq!(multiset_diff(&expected, &s4.payloads()), "");
    let z = status_json(&admin)
        .into_iter()
        .find(|l| l["name"] == "z")
        .expect("z listed");
    assert_eq!(z["spool_messages"], 0, "{z}");
}

/// `/readyz` is for a load balancer: it says whether this process can do its job. Before, it
/// said 200 with every broker down, and 503 for seconds whenever a broker was added at run time
/// (the keepalived check, `interval 2 fall 2`, could fail over on an `add-broker`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_ignores_a_broker_added_at_run_time_and_fails_with_every_broker_down() {
    let mut m = MeshBuilder::new(2).start();
    let admin = m.admin.clone();
    let [b1, b2] = &mut m.brokers[..] else {
        unreachable!()
    };
    let ready = || http_get(&format!("http://{admin}/readyz"), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready().0 != 200 {
        assert!(Instant::now() < deadline, "never ready: {}", ready().1);
        std::thread::sleep(Duration::from_millis(50));
    }

    // A broker that accepts TCP and never answers: its link waits for CONNACK for seconds.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let (code, _, err) = cli(&[
        "add-broker",
        &silent_addr,
        "--name",
        "silent",
        "--no-tls",
        "--admin",
        &admin,
    ]);
    assert_eq!(code, 0, "{err}");
    let (_held, _) = silent.accept().unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (code, body) = ready();
        assert_eq!(
            code, 200,
            "a broker added at run time made the process unready: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every broker down: nothing can be forwarded, so not ready; back when one returns.
    b1.kill();
    b2.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = ready();
        if code == 503 {
            assert!(body.contains("\"connected\":0"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still ready with every broker down: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b1_status = || {
        status_json(&admin)
            .into_iter()
            .find(|l| l["name"] == "b1")
            .unwrap()
    };
    assert!(
        b1_status()["last_error"].is_string(),
        "b1 down: {}",
        b1_status()
    );
    b1.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready().0 != 200 {
        assert!(Instant::now() < deadline, "not ready again: {}", ready().1);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Connected again: the error of the outage no longer shows as the link's last error.
    wait_state(&admin, "b1", "connected");
    assert!(b1_status()["last_error"].is_null(), "{}", b1_status());
}

/// `insecure_skip_verify = true` works, but nobody may forget it is on: the log at start,
/// `status` and `/metrics` say so (before: nothing did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_tls_is_shown_in_log_status_and_metrics() {
    let m = MeshBuilder::new(2)
        .link_keys_of(0, "insecure_skip_verify = true")
        .start();
    let (admin, bridge) = (m.admin.clone(), &m.bridge);
    assert!(
        bridge
            .log()
            .lines()
            .any(|l| l.contains("brokers=b1") && l.contains("insecure_skip_verify = true")),
        "{}",
        bridge.log()
    );
    let links = status_json(&admin);
    assert_eq!(links[0]["tls_insecure"], true, "{links:?}");
    assert_eq!(links[1]["tls_insecure"], false, "{links:?}");
    let (code, table, err) = cli(&["status", "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    let b1_row = table.lines().find(|l| l.starts_with("b1 ")).unwrap();
    assert!(b1_row.contains(" insecure "), "{table}");
    let text = http_get(&format!("http://{admin}/metrics"), None).1;
    assert!(
        text.contains("meshbridge_link_info{broker=\"b1\",protocol=\"v5\",tls=\"insecure\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("meshbridge_link_info{broker=\"b2\",protocol=\"v5\",tls=\"on\"} 1"),
        "{text}"
    );
}

/// Snapshots of the brokers' retained messages (for a broker added at run time, and for
/// `reconcile`) are bounded (`retained_max_bytes`): past it the snapshot fails, clearly, instead
/// of filling the bridge's memory; forwarding is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_snapshots_are_bounded() {
    let m = MeshBuilder::new(3)
        .meshed(&[0, 1])
        .bridge_keys("retained_max_bytes = \"4 KiB\"")
        .start();
    let [b1, b2, b3] = &m.brokers[..] else {
        unreachable!()
    };
    let admin = m.admin.clone();
    let msgs: Vec<Pub> = (0..3)
        .map(|i| Pub {
            retain: true,
            ..Pub::new(format!("big/{i}"), vec![b'x'; 2000], 1)
        })
        .collect();
    let s2 = mqtt::subscribe(b2.plain_port, "s2", "big/#").await;
    mqtt::publish(b1.plain_port, "p1", &msgs).await;
    assert_eq!(
        s2.wait_count(3, Duration::from_secs(10)).await,
        3,
        "forwarded all the same"
    );
    let (code, out, err) = cli(&["reconcile", "--json", "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    for b in report["brokers"].as_array().unwrap() {
        assert!(b["retained"].is_null(), "{b}");
        assert!(
            b["error"]
                .as_str()
                .unwrap()
                .contains("retained_max_bytes (4096 B)"),
            "{b}"
        );
    }
    let (code, _, err) = cli(&[
        "add-broker",
        &format!("127.0.0.1:{}", b3.tls_port),
        "--name",
        "b3",
        "--admin",
        &admin,
    ]);
    assert_eq!(code, 0, "{err}");
    wait_state(&admin, "b3", "connected");
    assert!(m.bridge.wait_log(
        "no peer snapshot: the added broker gets retained messages only as they are published",
        1,
        Duration::from_secs(10)
    ));
    let text = http_get(&format!("http://{admin}/metrics"), None).1;
    assert!(
        text.contains("meshbridge_reconcile_snapshot_failures_total 4"),
        "two for reconcile, two for the addition: {text}"
    );
    // Live messages still reach the new broker.
    let s3 = mqtt::subscribe(b3.plain_port, "s3", "big/#").await;
    mqtt::publish(b1.plain_port, "p2", &[Pub::new("big/live", "x", 1)]).await;
    assert_eq!(s3.wait_count(1, Duration::from_secs(10)).await, 1);
}

/// One broker under another spelling of its address (`localhost`, an IPv4-mapped IPv6
/// address) was accepted as a second member, and every message then arrived on it twice.
/// Refused now on add-broker, in the file, and for a persisted addition at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_broker_under_another_address_is_refused() {
    let (tmp, certs, [b1, b2]) = common::lab::<2>();
    let data = tmp.path().join("data");
    // A persisted addition of b1 again, under another spelling: ignored at start.
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("membership.json"),
        format!(
            r#"{{"added":[{{"name":"b1-again","address":"localhost:{}","protocol":"v5","tls":true}}]}}"#,
            b1.tls_port
        ),
    )
    .unwrap();
    let cfg = bridge_config(&certs, "mesh", &data, &[(&b1, ""), (&b2, "")]);
    let admin = admin_addr(&cfg);
    let bridge = Bridge::start(&tmp.path().join("bridge"), &cfg);
    bridge.wait_subscribed(&["b1", "b2"]);
    assert!(
        bridge.log().contains("persisted addition ignored")
            && bridge.log().contains("already in the mesh as \"b1\""),
        "{}",
        bridge.log()
    );
    for alias in [
        format!("localhost:{}", b2.tls_port),
        format!("[::ffff:127.0.0.1]:{}", b2.tls_port),
    ] {
        let (code, _, err) = cli(&["add-broker", &alias, "--name", "dup", "--admin", &admin]);
        assert_eq!(code, 1, "{alias} accepted");
        assert!(
            err.contains("already in the mesh as \"b2\"") && err.contains("409"),
            "{alias}: {err}"
        );
    }
    let names: Vec<String> = status_json(&admin)
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["b1", "b2"]);

    // b2 once more in the file: the reload is refused as a file that does not validate.
    let again = format!(
        "{cfg}[[broker]]\nname = \"b2-again\"\naddress = \"localhost:{}\"\n",
        b2.tls_port
    );
    std::fs::write(bridge.dir.join("bridge.toml"), again).unwrap();
    signal(bridge_pid(&bridge), "HUP");
    assert!(
        bridge.wait_log("listed twice", 1, Duration::from_secs(10)),
        "{}",
        bridge.log()
    );
    assert_eq!(status_json(&admin).len(), 2);

    // Messages still arrive once.
    let s2 = mqtt::subscribe(b2.plain_port, "s2", "once/#").await;
    mqtt::publish(b1.plain_port, "p1", &[Pub::new("once/x", "1", 1)]).await;
    assert_eq!(s2.wait_count(1, Duration::from_secs(10)).await, 1);
    s2.settle(Duration::from_millis(700)).await;
    assert_eq!(s2.count(), 1);
}

/// The admin port had no timeouts and no connection cap: idle connections stayed open for
/// minutes, a POST whose body never came stayed open forever, and under a low LimitNOFILE idle
/// connections starved /healthz and a link's reconnect. Now: a connection cap (the rest wait in
/// the listen backlog, without a file descriptor), idle and stalled connections closed after
/// 10 s, and 413 for an oversized body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_closes_idle_and_stalled_connections_and_caps_them() {
    use std::io::{Read, Write};
    let m = MeshBuilder::new(1).start();
    let admin = m.admin.clone();
    let pid = bridge_pid(&m.bridge);
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds();

    // 413 for a body over the limit.
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let big = format!("{{\"address\": \"{}\"}}", "x".repeat(200 << 10));
    let resp = agent
        .post(&format!("http://{admin}/api/v1/brokers"))
        .header("Content-Type", "application/json")
        .send(big.as_bytes())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);

    // A body announced larger than what is sent, and 150 connections that send nothing.
    let mut stalled = std::net::TcpStream::connect(&admin).unwrap();
    stalled
        .write_all(b"POST /api/v1/brokers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"addr")
        .unwrap();
    let idle: Vec<std::net::TcpStream> = (0..150)
        .map(|_| std::net::TcpStream::connect(&admin).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = fds();
    // 64 with the whole API, 64 more for a health check each (closed after 1 s).
    assert!(
        during <= before + 64 + 64 + 2,
        "the bridge holds {during} descriptors with 151 admin connections open (was {before})"
    );

    // Within the timeouts the server closes both kinds; then /healthz answers again.
    let started = Instant::now();
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stalled.read_to_end(&mut answer);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the stalled request was held {:?}",
        started.elapsed()
    );
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        first.read(&mut buf).unwrap_or(0),
        0,
        "idle connection closed"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get(&format!("http://{admin}/healthz"), None).0 != 200 {
        assert!(Instant::now() < deadline, "/healthz never answered again");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 70 idle admin connections held open (more than the 64 served with the whole API): /healthz
/// and /readyz still answer at once (2 of 11 checks did within 2 s before; a front or
/// keepalived then failed the bridge over), while the rest of the API says it is at its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_answer_with_the_admin_port_at_its_connection_cap() {
    let m = MeshBuilder::new(1).start();
    let admin = m.admin.clone();
    let idle: Vec<std::net::TcpStream> = (0..70)
        .map(|_| std::net::TcpStream::connect(&admin).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .new_agent();
    let mut slowest = Duration::ZERO;
    for i in 0..11 {
        let path = if i % 2 == 0 { "healthz" } else { "readyz" };
        let started = Instant::now();
        let resp = agent
            .get(&format!("http://{admin}/{path}"))
            .call()
            .unwrap_or_else(|e| panic!("/{path} did not answer: {e}"));
        slowest = slowest.max(started.elapsed());
        assert_eq!(resp.status().as_u16(), 200, "/{path}");
    }
    println!("11 health checks with 70 idle admin connections: slowest {slowest:?}");
    let resp = agent
        .get(&format!("http://{admin}/api/v1/brokers"))
        .call()
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        503,
        "beyond the cap only health checks"
    );
    drop(idle);
}

/// Four brokers sharing one client key file that other users can read, and one without TLS:
/// `run` logs each warning once, naming the brokers it concerns (at 32 brokers the key file's
/// warning was logged 32 times at every start).
#[test]
fn a_warning_shared_by_brokers_is_logged_once_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = common::tempdir();
    let certs = common::Certs::generate(&tmp.path().join("certs"));
    let key = certs.path("client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cfg = format!(
        "[bridge]\nid = \"mesh\"\nadmin_listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n\n[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{key}\"\n\n",
        common::free_port(),
        tmp.path().join("data").display(),
        certs.path("ca.crt"),
        certs.path("client.crt"),
    );
    for i in 1..=4 {
        cfg.push_str(&format!(
            "[[broker]]\nname = \"b{i}\"\naddress = \"127.0.0.1:{}\"\n\n",
            common::free_port()
        ));
    }
    cfg.push_str(&format!(
        "[[broker]]\nname = \"plain\"\naddress = \"127.0.0.1:{}\"\ntls = false\n",
        common::free_port()
    ));
    let bridge = Bridge::start(&tmp.path().join("bridge"), &cfg);
    assert!(bridge.wait_log("link added broker=plain", 1, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(300));
    let log = bridge.log();
    let lines =
        |needle: &str| -> Vec<&str> { log.lines().filter(|l| l.contains(needle)).collect() };
    let key_lines = lines("can be read by other users");
    assert_eq!(key_lines.len(), 1, "{log}");
    assert!(
        key_lines[0].contains("brokers=b1,b2,b3,b4"),
        "{}",
        key_lines[0]
    );
    let tls_lines = lines("TLS is off");
    assert_eq!(tls_lines.len(), 1, "{log}");
    assert!(tls_lines[0].contains("brokers=plain"), "{}", tls_lines[0]);
}

/// A SIGHUP that moves b3 to another address (a second proxy in front of the same broker) and
/// changes its protocol restarts b3's link alone, under a 400 msg/s stream from b1: nothing is
/// lost to b3, its new connections go to the new address, and the other links are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_brokers_connection_restarts_that_link_only() {
    use common::proxy::Proxy;
    let (tmp, certs, b) = common::lab::<3>();
    let old_way = Proxy::start(b[2].tls_port);
    let new_way = Proxy::start(b[2].tls_port);
    let cfg = common::bridge_config(
        &certs,
        "mesh",
        &tmp.path().join("data"),
        &[(&b[0], ""), (&b[1], "")],
    );
    let b3 = |port: u16, protocol: &str| {
        format!(
            "[[broker]]\nname = \"b3\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"{protocol}\"\n"
        )
    };
    let bridge = Bridge::start(
        &tmp.path().join("bridge"),
        &format!("{cfg}{}", b3(old_way.port, "v5")),
    );
    bridge.wait_subscribed(&["b1", "b2", "b3"]);
    let admin = common::admin_addr(&cfg);
    let sub = mqtt::subscribe(b[2].plain_port, "s3", "seq/#").await;
    let n = 2400;
    let msgs: Vec<Pub> = (0..n)
        .map(|i| Pub::new("seq/b1", format!("{i}"), 1))
        .collect();
    let port = b[0].plain_port;
    let stream = tokio::spawn(async move {
        mqtt::publish_paced(
            port,
            "p1",
            &msgs,
            400,
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(
        bridge.dir.join("bridge.toml"),
        format!("{cfg}{}", b3(new_way.port, "v3.1.1")),
    )
    .unwrap();
    common::signal(bridge_pid(&bridge), "HUP");
    assert!(
        bridge.wait_log(
            "restarting the link with the reloaded settings",
            1,
            Duration::from_secs(10)
        ),
        "{}",
        bridge.log()
    );
    stream.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let tally = || {
        let mut seen = vec![0usize; n];
        for m in sub.messages().iter().filter(|m| m.topic == "seq/b1") {
            seen[std::str::from_utf8(&m.payload)
                .unwrap()
                .parse::<usize>()
                .unwrap()] += 1;
        }
        (
            seen.iter().filter(|c| **c == 0).count(),
            seen.iter().map(|c| c.saturating_sub(1)).sum::<usize>(),
        )
    };
    while tally().0 > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sub.settle(Duration::from_millis(300)).await;
    let (lost, dups) = tally();
    println!("b1 -> b3 across the link's restart: lost {lost} of {n}, duplicates {dups}");
    assert_eq!(lost, 0, "{}", bridge.log());
    let links = status_json(&admin);
    let row = links.iter().find(|l| l["name"] == "b3").unwrap();
    assert_eq!(row["address"], format!("127.0.0.1:{}", new_way.port));
    assert_eq!(row["protocol"], "v3.1.1");
    assert_eq!(row["state"], "connected");
    let b1 = links.iter().find(|l| l["name"] == "b1").unwrap();
    assert_eq!(b1["reconnects"], 0, "b1's link was not restarted");
    drop(old_way);
}
