//! Brokers that are down at start, die mid-stream and come back; graceful shutdown.

mod common;

use std::time::Duration;

use common::mqtt::{self, Pub};
use common::{Bridge, MeshBuilder, bridge_config, multiset_diff};

fn batch(prefix: &str, n: usize, qos: u8) -> Vec<Pub> {
    (0..n)
        .map(|i| Pub::new(format!("{prefix}/{}", i % 5), format!("{prefix}-{i}"), qos))
        .collect()
}

fn payloads(msgs: &[Pub]) -> Vec<Vec<u8>> {
    msgs.iter().map(|m| m.payload.clone()).collect()
}

fn only(prefix: &str, got: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    got.into_iter()
        .filter(|p| p.starts_with(prefix.as_bytes()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_or_dying_later_never_stops_the_others() {
    let mut m = MeshBuilder::new(3).down(2).start();
    let common::Mesh {
        brokers, bridge, ..
    } = &mut m;
    let [b1, b2, b3] = &mut brokers[..] else {
        unreachable!()
    };

    // b3 is down: b1 -> b2 works all the same.
    let s2 = mqtt::subscribe(b2.plain_port, "s2", "#").await;
    let phase1 = batch("one", 300, 1);
    mqtt::publish(b1.plain_port, "p1", &phase1).await;
    s2.wait_count(300, Duration::from_secs(20)).await;
    assert_eq!(
        multiset_diff(&payloads(&phase1), &only("one", s2.payloads())),
        ""
    );
    assert!(
        bridge.wait_log("link down", 1, Duration::from_secs(5)),
        "b3's failure is logged"
    );
    assert!(
        bridge
            .log()
            .lines()
            .any(|l| l.contains("link{broker=b3}") && l.contains("link down")),
        "the failure names b3"
    );

    // b3 comes back: it joins the mesh.
    b3.restart();
    bridge.wait_subscribed(&["b3"]);
    let s3 = mqtt::subscribe(b3.plain_port, "s3", "#").await;
    let phase2 = batch("two", 300, 2);
    mqtt::publish(b1.plain_port, "p2", &phase2).await;
    let from_b3 = batch("three", 100, 1);
    mqtt::publish(b3.plain_port, "p3", &from_b3).await;
    // s3 may also get b3's spooled copies of phase 1, depending on when it subscribed.
    s3.wait_prefix("two", 300, Duration::from_secs(20)).await;
    s2.wait_count(700, Duration::from_secs(20)).await;
    assert_eq!(
        multiset_diff(&payloads(&phase2), &only("two", s3.payloads())),
        "",
        "b1 -> b3 after rejoin"
    );
    assert_eq!(
        multiset_diff(&payloads(&from_b3), &only("three", s2.payloads())),
        "",
        "b3 -> b2 after rejoin"
    );

    // b2 dies mid-stream: b1 -> b3 goes on without loss.
    let phase4 = batch("four", 1000, 1);
    let publisher = {
        let msgs = phase4.clone();
        let port = b1.plain_port;
        tokio::spawn(async move { mqtt::publish(port, "p4", &msgs).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    b2.kill();
    publisher.await.unwrap();
    s3.wait_prefix("four", 1000, Duration::from_secs(30)).await;
    s3.settle(Duration::from_millis(500)).await;
    assert_eq!(
        multiset_diff(&payloads(&phase4), &only("four", s3.payloads())),
        "",
        "b1 -> b3 while b2 is down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let mut m = MeshBuilder::new(2).start();
    let common::Mesh {
        brokers, bridge, ..
    } = &mut m;
    let [b1, b2] = &brokers[..] else {
        unreachable!()
    };
    let s2 = mqtt::subscribe(b2.plain_port, "s2", "#").await;
    let msgs = batch("x", 200, 1);
    mqtt::publish(b1.plain_port, "p1", &msgs).await;
    s2.wait_count(200, Duration::from_secs(20)).await;

    let status = bridge.terminate().expect("bridge exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let log = bridge.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("bridge stopped"), "{log}");
    for b in ["b1", "b2"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("link{{broker={b}}}")) && l.contains("disconnected")),
            "{b} disconnected cleanly:\n{log}"
        );
    }
    // A clean DISCONNECT, not a dropped socket: mosquitto logs it as such.
    assert!(
        b1.log().contains("Client mesh-b1 disconnected"),
        "b1 did not see a DISCONNECT:\n{}",
        b1.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_killed_mid_stream_resumes_its_sessions_without_loss() {
    // kill -9 while QoS 1 and 2 messages flow: the brokers keep the bridge's sessions, so what
    // was published meanwhile (and what was in flight) is delivered after the restart. The QoS 2
    // exchanges cut in half make the broker resend PUBREL on the new connection, which must be
    // answered, not treated as a protocol error (rumqtt#664).
    let (tmp, certs, [b1, b2]) = common::lab();
    for protocol in ["v5", "v3.1.1"] {
        let extra = format!("protocol = \"{protocol}\"");
        let cfg = bridge_config(
            &certs,
            &format!("mesh{}", protocol.len()),
            &tmp.path().join("data"),
            &[(&b1, &extra), (&b2, &extra)],
        );
        let mut bridge = Bridge::start(&tmp.path().join(format!("bridge-{protocol}")), &cfg);
        bridge.wait_subscribed(&["b1", "b2"]);
        let s2 = mqtt::subscribe(b2.plain_port, &format!("s2-{protocol}"), "kill/#").await;
        let mut msgs = batch("kill", 1500, 2);
        msgs.extend(batch("kill/one", 1500, 1));
        let publisher = {
            let msgs = msgs.clone();
            let port = b1.plain_port;
            let id = format!("p-{protocol}");
            tokio::spawn(async move { mqtt::publish(port, &id, &msgs).await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        bridge.kill();
        let before = s2.count();
        publisher.await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        bridge.spawn();
        s2.wait_count(msgs.len(), Duration::from_secs(30)).await;
        s2.settle(Duration::from_millis(700)).await;
        let got = s2.payloads();
        let mut unique = got.clone();
        unique.sort();
        unique.dedup();
        let mut want = payloads(&msgs);
        want.sort();
        assert_eq!(
            unique,
            want,
            "{protocol}: every message arrives after the restart ({} before the kill, {} in all)",
            before,
            got.len()
        );
        assert!(
            before < msgs.len(),
            "{protocol}: the kill happened mid-stream"
        );
        assert!(
            !bridge.log().contains("Unsolicited pubrel"),
            "{protocol}: a resent PUBREL broke the connection:\n{}",
            bridge.log()
        );
        eprintln!(
            "{protocol}: {} duplicates after kill -9",
            got.len() - unique.len()
        );
        bridge.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_reflood_retained_messages() {
    // mosquitto#2248: a bridge that re-subscribes on every reconnect gets every retained
    // message again and pushes it to the other brokers. With persistent sessions the bridge
    // must not: MQTT 5 links subscribe with "retained only on new subscription", 3.1.1 links
    // do not re-subscribe a session the broker kept.
    let (tmp, certs, [b1, b2]) = common::lab();
    for protocol in ["v5", "v3.1.1"] {
        let extra = format!("protocol = \"{protocol}\"");
        let cfg = bridge_config(
            &certs,
            &format!("rf{}", protocol.len()),
            &tmp.path().join(format!("data-{protocol}")),
            &[(&b1, &extra), (&b2, &extra)],
        );
        let mut bridge = Bridge::start(&tmp.path().join(format!("bridge-{protocol}")), &cfg);
        bridge.wait_subscribed(&["b1", "b2"]);
        let topic = format!("keep/{protocol}");
        let live = mqtt::subscribe(b2.plain_port, &format!("live-{protocol}"), &topic).await;
        let mut r = Pub::new(topic.clone(), "retained state", 1);
        r.retain = true;
        mqtt::publish(b1.plain_port, &format!("pr-{protocol}"), &[r]).await;
        assert_eq!(
            live.wait_count(1, Duration::from_secs(10)).await,
            1,
            "{protocol}: replicated once"
        );

        for round in 0..2 {
            assert!(bridge.terminate().is_some_and(|s| s.success()));
            bridge.spawn();
            let needle = "session_present=true";
            assert!(
                bridge.wait_log(needle, 2 * (round + 1), Duration::from_secs(20)),
                "{protocol}: sessions resumed:\n{}",
                bridge.log()
            );
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        assert_eq!(
            live.count(),
            1,
            "{protocol}: the retained message was flooded again on reconnect"
        );
        bridge.terminate();
    }
}
