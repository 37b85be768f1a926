//! Topic rules per broker against real mosquitto: directions, the QoS cap, prefix mapping both
//! ways, overlapping rules (first match, one copy), a retained message through a mapping, and
//! what a broker without rules gets.

mod common;

use std::time::Duration;

use common::MeshBuilder;
use common::mqtt::{self, Pub, Sub};

/// b1, an edge site: exports telemetry under `site7/`, takes its own commands, and shares
/// `sensors/#` as `site7/sensors/#` both ways.
const EDGE: &str = r#"
[[broker.rule]]
filter = "telemetry/#"
direction = "in"
qos = 1
mesh_prefix = "site7/"

[[broker.rule]]
filter = "commands/site7/#"
direction = "out"

[[broker.rule]]
filter = "sensors/#"
mesh_prefix = "site7/"
"#;

/// b4: `x/special/#` enters the mesh under `special/`, the rest of `x/#` as it is (the first
/// rule covers part of the second: one subscription, `x/#`, and the first match decides).
const OVERLAP: &str = r#"
[[broker.rule]]
filter = "x/special/#"
direction = "in"
mesh_prefix = "special/"

[[broker.rule]]
filter = "x/#"
"#;

async fn topics(sub: &Sub) -> Vec<String> {
    sub.settle(Duration::from_millis(800)).await;
    let mut t: Vec<String> = sub.messages().into_iter().map(|g| g.topic).collect();
    t.sort();
    t
}

fn sorted(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_filter_cap_and_map_topics_per_broker() {
    let m = MeshBuilder::new(4)
        .link_keys_of(0, EDGE)
        .link_keys_of(3, OVERLAP)
        .start();
    assert!(
        m.bridge.log().lines().any(|l| l.contains("link{broker=b1}")
            && l.contains(r#"subscribed topics=["telemetry/#", "sensors/#"]"#)),
        "b1 subscribes only what its in rules take:\n{}",
        m.bridge.log()
    );
    assert!(
        m.bridge
            .log()
            .lines()
            .any(|l| l.contains("link{broker=b4}") && l.contains(r#"subscribed topics=["x/#"]"#)),
        "b4: the covered filter is not subscribed on its own:\n{}",
        m.bridge.log()
    );
    let port = |i: usize| m.brokers[i].plain_port;
    let s1 = mqtt::subscribe(port(0), "s1", "#").await;
    let s2 = mqtt::subscribe(port(1), "s2", "#").await;
    let s3 = mqtt::subscribe(port(2), "s3", "#").await;
    let s4 = mqtt::subscribe(port(3), "s4", "#").await;

    let sends: [(usize, &str, u8, bool); 11] = [
        (0, "telemetry/t1", 2, false),
        (1, "commands/site7/reboot", 1, false),
        (1, "commands/site8/x", 1, false),
        (1, "telemetry/t2", 1, false),
        (0, "other/x", 1, false),
        (0, "sensors/a", 1, false),
        (1, "site7/sensors/b", 1, false),
        (1, "sensors/c", 1, false),
        (3, "x/special/1", 1, false),
        (3, "x/2", 1, false),
        (1, "site7/sensors/door", 1, true),
    ];
    for (i, topic, qos, retain) in sends {
        let p = Pub {
            retain,
            ..Pub::new(topic, format!("{topic}@b{}", i + 1), qos)
        };
        mqtt::publish(port(i), &format!("p-{topic}"), &[p]).await;
    }

    // b1 gets its commands and its sensors back under its own names, nothing else.
    assert_eq!(
        topics(&s1).await,
        sorted(&[
            "telemetry/t1",
            "other/x",
            "sensors/a",
            "commands/site7/reboot",
            "sensors/b",
            "sensors/door",
        ]),
    );
    // b2 (no rules) gets b1's exports under site7/, b4's x/special/ under special/, once each.
    let mesh_from_others = [
        "site7/telemetry/t1",
        "site7/sensors/a",
        "special/x/special/1",
        "x/2",
    ];
    let own_b2 = [
        "commands/site7/reboot",
        "commands/site8/x",
        "telemetry/t2",
        "site7/sensors/b",
        "sensors/c",
        "site7/sensors/door",
    ];
    let all: Vec<&str> = mesh_from_others.iter().chain(&own_b2).copied().collect();
    assert_eq!(topics(&s2).await, sorted(&all));
    // b3 (no rules) gets everything from the others.
    assert_eq!(topics(&s3).await, sorted(&all));
    // b4 takes only x/# from the mesh (nothing there): its own two.
    assert_eq!(topics(&s4).await, sorted(&["x/special/1", "x/2"]));

    // The QoS cap of b1's telemetry rule: published at 2, forwarded at 1.
    let t1 = s2
        .messages()
        .into_iter()
        .find(|g| g.topic == "site7/telemetry/t1")
        .expect("t1 on b2");
    assert_eq!(t1.qos, 1, "capped by the rule");

    // The retained message went through the mapping: a new subscriber on b1 gets it there.
    let late = mqtt::subscribe(port(0), "late", "sensors/door").await;
    assert_eq!(late.wait_count(1, Duration::from_secs(10)).await, 1);
    let door = &late.messages()[0];
    assert!(door.retain, "retained on b1");
    assert_eq!(&door.payload[..], b"site7/sensors/door@b2");
}
