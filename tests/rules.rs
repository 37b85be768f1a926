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

/// Rules change while messages flow: a SIGHUP widens b2's rules (the link subscribes nothing
/// new for out rules, the fan-out starts queueing b/ for it), and add-broker --topic adds b4
/// taking only a/. Nothing already flowing is lost, nothing goes where the rules in force say
/// it must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_change_under_load_by_reload_and_add_broker() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const N: usize = 1200;
    let m = MeshBuilder::new(4)
        .meshed(&[0, 1, 2])
        .link_keys_of(1, "[[broker.rule]]\nfilter = \"a/#\"\n")
        .start();
    let port = |i: usize| m.brokers[i].plain_port;
    let s2 = mqtt::subscribe(port(1), "s2", "#").await;
    let s3 = mqtt::subscribe(port(2), "s3", "#").await;
    let s4 = mqtt::subscribe(port(3), "s4", "#").await;
    // a/i and b/i alternate, 400 msg/s for 3 s.
    let msgs: Vec<Pub> = (0..N)
        .map(|i| {
            let t = if i % 2 == 0 { "a" } else { "b" };
            Pub::new(format!("{t}/{i}"), format!("{i}"), 1)
        })
        .collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let stream = tokio::spawn({
        let progress = progress.clone();
        let port = port(0);
        async move { mqtt::publish_paced(port, "stream", &msgs, 400, progress).await }
    });
    let wait_progress = |n: usize| {
        let progress = progress.clone();
        async move {
            while progress.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    // A third of the way: b2 also takes b/#, by SIGHUP.
    wait_progress(N / 3).await;
    let cfg = m.config.replacen(
        "[[broker.rule]]\nfilter = \"a/#\"\n",
        "[[broker.rule]]\nfilter = \"a/#\"\n\n[[broker.rule]]\nfilter = \"b/#\"\n",
        1,
    );
    assert_ne!(cfg, m.config);
    std::fs::write(m.bridge.dir.join("bridge.toml"), &cfg).unwrap();
    common::signal(m.bridge.pid().unwrap(), "HUP");
    assert!(
        m.bridge.wait_log(
            "topic rules changed by the reload",
            1,
            Duration::from_secs(10)
        ),
        "{}",
        m.bridge.log()
    );
    let reloaded_at = progress.load(Ordering::SeqCst);

    // Two thirds: b4 joins with one rule, mosquitto syntax.
    wait_progress(2 * N / 3).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args([
            "add-broker",
            &format!("127.0.0.1:{}", m.brokers[3].tls_port),
            "--name",
            "b4",
            "--topic",
            "a/# out 1 \"\" \"\"",
            "--admin",
            &m.admin,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.bridge.wait_subscribed(&["b4"]);
    let added_at = progress.load(Ordering::SeqCst);
    stream.await.unwrap();

    let seqs = |s: &Sub, prefix: &str| -> Vec<usize> {
        let mut v: Vec<usize> = s
            .messages()
            .iter()
            .filter(|g| g.topic.starts_with(prefix))
            .map(|g| String::from_utf8_lossy(&g.payload).parse().unwrap())
            .collect();
        v.sort();
        v
    };
    for s in [&s2, &s3, &s4] {
        s.settle(Duration::from_millis(800)).await;
    }
    let a_all: Vec<usize> = (0..N).step_by(2).collect();
    let b_all: Vec<usize> = (1..N).step_by(2).collect();
    // b3 (no rules) and b2 (a/# all along) lose nothing of a/; b3 nothing of b/.
    assert_eq!(seqs(&s3, "a/"), a_all, "b3 a/");
    assert_eq!(seqs(&s3, "b/"), b_all, "b3 b/");
    assert_eq!(seqs(&s2, "a/"), a_all, "b2 a/ across the reload");
    // b2's b/: none before the reload began, every one after it took effect.
    let b2_b = seqs(&s2, "b/");
    let reload_began = N / 3;
    assert!(
        b2_b.iter().all(|&i| i + 20 >= reload_began),
        "b/ before the reload reached b2: {:?}",
        &b2_b[..b2_b.len().min(5)]
    );
    // The numbers of `all` above `from` that `got` lacks.
    let lacking = |all: &[usize], from: usize, got: &[usize]| -> Vec<usize> {
        all.iter()
            .copied()
            .filter(|&i| i > from && !got.contains(&i))
            .collect()
    };
    let missing = lacking(&b_all, reloaded_at, &b2_b);
    assert!(
        missing.is_empty(),
        "b/ after the reload missing on b2: {:?}",
        &missing[..missing.len().min(5)]
    );
    // b4 takes only a/, and every a/ published once it was subscribed.
    assert!(seqs(&s4, "b/").is_empty(), "b4 has no rule for b/");
    let a4 = seqs(&s4, "a/");
    let missing = lacking(&a_all, added_at, &a4);
    assert!(
        missing.is_empty(),
        "a/ after the add missing on b4: {:?}",
        &missing[..missing.len().min(5)]
    );
    // One copy each, everywhere.
    for (name, s) in [("b2", &s2), ("b3", &s3), ("b4", &s4)] {
        let all = s.messages().len();
        let distinct: std::collections::HashSet<String> =
            s.messages().into_iter().map(|g| g.topic).collect();
        assert_eq!(all, distinct.len(), "{name} got duplicates");
    }
}
