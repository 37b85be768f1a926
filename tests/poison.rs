//! One message must not wedge a link (issue 26), against real mosquitto brokers: a message a
//! target cannot take as mapped is set aside in the dead-letter table (`bridge dead-letters`
//! lists it) and the link goes on with the next one. Before, the link sent it again on every
//! connection and nothing behind it was ever delivered.

mod common;

use std::time::Duration;

use common::mqtt::{self, Pub, Sub};
use common::{Bridge, BrokerOpts, Mosquitto};

/// Numbered messages that follow the poison one.
const N: usize = 3000;

/// (lost, duplicates, out of order) of `0..n` on `topic` as `sub` received them.
fn count(sub: &Sub, topic: &str, n: usize) -> (usize, usize, usize) {
    sub.sequence(topic, n)
}

/// Waits until `sub` has every one of `0..N` on `topic` (or 60 s passed); asserts none lost
/// and their order, prints the duplicates.
async fn all_arrive(sub: &Sub, target: &str, topic: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count(sub, topic, N).0 > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sub.settle(Duration::from_millis(300)).await;
    let (lost, dups, disorder) = count(sub, topic, N);
    println!("-> {target}: lost {lost} of {N}, duplicates {dups}, out of order {disorder}");
    assert_eq!(lost, 0, "{target}: messages behind the poison one lost");
    assert_eq!(disorder, 0, "{target}: order");
}

/// `bridge dead-letters --json` of the bridge at `admin`.
fn dead_letters(admin: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = common::cli_in(&["dead-letters", "--json", "--admin", admin], None);
    assert_eq!(code, 0, "bridge dead-letters: {err}");
    serde_json::from_str(&out).expect("JSON")
}

fn start(
    tmp: &std::path::Path,
    certs: &common::Certs,
    links: &[(&Mosquitto, &str)],
) -> (Bridge, String) {
    let cfg = common::bridge_config(certs, "mesh", &tmp.join("data"), links);
    let admin = common::admin_addr(&cfg);
    let bridge = Bridge::start(&tmp.join("bridge"), &cfg);
    let names: Vec<&str> = links.iter().map(|(b, _)| b.name.as_str()).collect();
    bridge.wait_subscribed(&names);
    (bridge, admin)
}

/// A 65 530-byte topic on b1, whose rule puts `site1/` in front of it in the mesh: 65 536
/// bytes, more than MQTT can carry. It is set aside for b2 (MQTT 5) and b3 (3.1.1), and the
/// 3000 messages behind it arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_too_long_once_mapped_is_set_aside_and_the_links_go_on() {
    let (tmp, certs, b) = common::lab::<3>();
    let (_bridge, admin) = start(
        tmp.path(),
        &certs,
        &[
            (
                &b[0],
                "[[broker.rule]]\nfilter = \"#\"\ndirection = \"in\"\nmesh_prefix = \"site1/\"",
            ),
            (&b[1], ""),
            (&b[2], "protocol = \"v3.1.1\""),
        ],
    );
    let s2 = mqtt::subscribe(b[1].plain_port, "s2", "site1/#").await;
    let s3 = mqtt::subscribe(b[2].plain_port, "s3", "site1/#").await;
    let long = format!("t/{}", "x".repeat(65_528));
    let mut msgs = vec![Pub::new(long, "poison", 1)];
    msgs.extend((0..N).map(|i| Pub::new("seq", format!("{i}"), 1)));
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    mqtt::publish_paced(b[0].plain_port, "p1", &msgs, 2000, progress).await;
    all_arrive(&s2, "b2", "site1/seq").await;
    all_arrive(&s3, "b3", "site1/seq").await;
    let letters = dead_letters(&admin);
    let mut targets: Vec<&str> = letters
        .iter()
        .map(|d| d["target"].as_str().unwrap())
        .collect();
    targets.sort_unstable();
    assert_eq!(
        targets,
        ["b2", "b3"],
        "one dead letter per target: {letters:?}"
    );
    for d in &letters {
        assert_eq!(d["origin"], "b1");
        assert_eq!(d["topic_bytes"], 65_536);
        assert!(d["topic"].as_str().unwrap().starts_with("site1/t/xxx"));
        assert!(
            d["reason"].as_str().unwrap().contains("over MQTT's 65535"),
            "{d}"
        );
    }
    let metrics = common::http_get(&format!("http://{admin}/metrics"), None).1;
    for t in ["b2", "b3"] {
        assert_eq!(
            common::metric(&metrics, "meshbridge_dead_letters_total", t),
            Some(1.0),
            "{t}"
        );
    }
    let (code, table, _) = common::cli_in(&["dead-letters", "--admin", &admin], None);
    assert_eq!(code, 0);
    assert!(table.contains("65536") && table.contains("b1"), "{table}");
}

/// b3 (MQTT 3.1.1, which announces no maximum packet size) closes the connection on any
/// packet over 20 000 bytes. A 30 kB message is sent alone until the broker has closed the
/// connection three times in a row on it, then set aside; everything behind it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_a_311_broker_closes_the_connection_on_is_set_aside() {
    let small = BrokerOpts {
        extra_conf: "max_packet_size 20000",
        ..Default::default()
    };
    let (tmp, certs, b) = common::lab_with([Default::default(), Default::default(), small]);
    let (bridge, admin) = start(
        tmp.path(),
        &certs,
        &[(&b[0], ""), (&b[1], ""), (&b[2], "protocol = \"v3.1.1\"")],
    );
    let s2 = mqtt::subscribe(b[1].plain_port, "s2", "#").await;
    let s3 = mqtt::subscribe(b[2].plain_port, "s3", "#").await;
    let mut msgs = vec![Pub::new("big", vec![b'x'; 30_000], 1)];
    msgs.extend((0..N).map(|i| Pub::new("seq", format!("{i}"), 1)));
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    mqtt::publish_paced(b[0].plain_port, "p1", &msgs, 2000, progress).await;
    all_arrive(&s2, "b2", "seq").await;
    all_arrive(&s3, "b3", "seq").await;
    assert_eq!(
        s2.messages().iter().filter(|m| m.topic == "big").count(),
        1,
        "b2 takes the big one"
    );
    assert!(
        s3.messages().iter().all(|m| m.topic != "big"),
        "b3 never got it"
    );
    let letters = dead_letters(&admin);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["target"], "b3");
    assert_eq!(letters[0]["payload_bytes"], 30_000);
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("closed the connection"),
        "{:?}",
        letters[0]
    );
    let log = bridge.log();
    assert!(
        log.lines()
            .any(|l| l.contains("link{broker=b3}") && l.contains("dead letter")),
        "the set-aside is logged:\n{log}"
    );
    let closed = log
        .lines()
        .filter(|l| l.contains("link{broker=b3}") && l.contains("link down"))
        .count();
    println!("b3 closed the bridge's connection {closed} times before the message was set aside");
    assert!(closed >= 3, "three strikes, then set aside:\n{log}");
}
