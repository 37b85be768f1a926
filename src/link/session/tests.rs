//! The session's pure parts: resume order, seeding, rumqttc's state as the link drives it.

use super::*;
use bytes::Bytes;

#[test]
fn resume_order_releases_known_ids_first_in_send_order() {
    // The last connection sent ids 98, 99, 100 and then (wrapped) 1, 2.
    let order = resume_order(&[98, 99, 100, 1, 2], 100);
    assert_eq!(&order[..5], &[98, 99, 100, 1, 2]);
    assert_eq!(order[5..8], [3, 4, 5], "then every other id");
    assert_eq!(order.len(), 100, "each id once");
    assert_eq!(resume_order(&[], 3), vec![1, 2, 3]);
    assert_eq!(
        resume_order(&[7, 2], 3),
        vec![2, 1, 3],
        "ids beyond the window dropped"
    );
}

#[test]
fn a_seeded_connection_answers_a_resent_pubrel_with_pubcomp() {
    let o = rumqttc::v5::MqttOptions::new("x", "127.0.0.1", 1883);
    let (_c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    let pubrel = || rumqttc::v5::Incoming::PubRel(v5b::PubRel::new(4242, None));
    assert!(
        el.state.handle_incoming_packet(pubrel()).is_err(),
        "unseeded"
    );
    seed_v5(&mut el);
    let answer = el.state.handle_incoming_packet(pubrel()).expect("seeded");
    assert!(matches!(answer, Some(v5b::Packet::PubComp(c)) if c.pkid == 4242));
    let o = rumqttc::MqttOptions::new("x", "127.0.0.1", 1883);
    let (_c, mut el) = rumqttc::AsyncClient::new(o, 10);
    seed_v4(&mut el);
    let answer = el
        .state
        .handle_incoming_packet(rumqttc::Incoming::PubRel(rumqttc::PubRel::new(u16::MAX)))
        .expect("seeded");
    assert!(matches!(answer, Some(rumqttc::Packet::PubComp(c)) if c.pkid == u16::MAX));
}

/// An MQTT 5 publish request on topic `t` with packet id `pkid`.
fn v5_publish(pkid: u16, qos: rumqttc::v5::mqttbytes::QoS) -> rumqttc::v5::Request {
    let mut p = v5b::Publish::new("t", qos, Bytes::from_static(b"x"), None);
    p.pkid = pkid;
    rumqttc::v5::Request::Publish(p)
}

#[test]
fn without_copies_the_state_still_tracks_acknowledgements_and_collisions() {
    let o = rumqttc::v5::MqttOptions::new("x", "127.0.0.1", 1883);
    let (_c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    let state = &mut el.state;
    state.keep_publish_copies = false;
    let publish = |pkid| v5_publish(pkid, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
    let puback = |pkid| rumqttc::v5::Incoming::PubAck(v5b::PubAck::new(pkid, None));
    assert!(matches!(
        state.handle_outgoing_packet(publish(5)),
        Ok(Some(v5b::Packet::Publish(_)))
    ));
    // The same id again before its PUBACK: held as a collision, written after the PUBACK.
    assert!(matches!(state.handle_outgoing_packet(publish(5)), Ok(None)));
    assert!(state.collision.is_some());
    state.events.clear();
    assert!(matches!(
        state.handle_incoming_packet(puback(5)),
        Ok(Some(v5b::Packet::Publish(p))) if p.pkid == 5
    ));
    // The PUBACK is reported before the publish that took its id again. (The link never gets
    // here: it gives an id again only after it had that id's PUBACK event.)
    let events: Vec<_> = state.events.drain(..).collect();
    assert!(
        matches!(
            &events[..],
            [
                rumqttc::v5::Event::Incoming(v5b::Packet::PubAck(a)),
                rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Publish(5)),
            ] if a.pkid == 5
        ),
        "{events:?}"
    );
    assert!(
        state.handle_incoming_packet(puback(5)).is_ok(),
        "the resent one"
    );
    assert!(
        state.handle_incoming_packet(puback(5)).is_err(),
        "unsolicited"
    );
    assert!(
        state.handle_incoming_packet(puback(60_000)).is_err(),
        "an id never used"
    );
    assert!(state.clean().is_empty(), "nothing kept to send again");
}

#[test]
fn a_full_request_channel_is_told_apart_from_a_closed_one() {
    let ack = AckRequest {
        pkid: 1,
        qos: 1,
        epoch: 0,
    };
    let opts = rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1);
    let (c, eventloop) = rumqttc::v5::AsyncClient::new(opts, 1);
    let client = Client::V5(c);
    assert!(client.ack(ack).is_ok());
    assert!(matches!(client.ack(ack), Err(SendError::Full)));
    drop(eventloop);
    assert!(matches!(client.ack(ack), Err(SendError::Closed)));

    let opts = rumqttc::MqttOptions::new("t", "127.0.0.1", 1);
    let (c, eventloop) = rumqttc::AsyncClient::new(opts, 1);
    let client = Client::V4(c);
    assert!(client.disconnect().is_ok());
    assert!(matches!(client.disconnect(), Err(SendError::Full)));
    drop(eventloop);
    assert!(matches!(client.disconnect(), Err(SendError::Closed)));
}

#[test]
fn a_publish_numbered_by_its_caller_keeps_its_id() {
    for pkid in [1, 700, 8192] {
        let mut o = rumqttc::v5::MqttOptions::new("x", "127.0.0.1", 1883);
        o.set_outgoing_inflight_upper_limit(8192);
        let (_c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
        el.state.keep_publish_copies = false;
        let written = el
            .state
            .handle_outgoing_packet(v5_publish(pkid, rumqttc::v5::mqttbytes::QoS::ExactlyOnce))
            .expect("taken");
        assert!(matches!(written, Some(v5b::Packet::Publish(p)) if p.pkid == pkid));
        let mut o = rumqttc::MqttOptions::new("x", "127.0.0.1", 1883);
        o.set_inflight(8192);
        let (_c, mut el) = rumqttc::AsyncClient::new(o, 10);
        let mut p = rumqttc::Publish::new("t", rumqttc::QoS::AtLeastOnce, b"x".to_vec());
        p.pkid = pkid;
        let written = el
            .state
            .handle_outgoing_packet(rumqttc::Request::Publish(p))
            .expect("taken");
        assert!(matches!(written, Some(rumqttc::Packet::Publish(p)) if p.pkid == pkid));
    }
}

/// Every event of a connection is moved through the driver's channel: a message in it keeps
/// its MQTT 5 properties boxed (see [`crate::message::Message`]).
#[test]
fn an_event_stays_small() {
    assert!(std::mem::size_of::<LinkEvent>() <= 112);
}

/// rumqttc's MQTT 5 packets, events and requests are moved several times per message inside
/// its event loop: the vendored copy boxes the properties and the CONNECT (PATCHED.md), which
/// made them 88 bytes instead of 392 (events) and 216 (requests).
#[test]
fn rumqttc_v5_events_and_requests_stay_small() {
    assert!(std::mem::size_of::<rumqttc::v5::Event>() <= 96);
    assert!(std::mem::size_of::<rumqttc::v5::Request>() <= 96);
}

#[test]
fn the_receive_maximum_announced_is_the_window_cap() {
    // An origin's window is held for its own round trip and its farthest target's: the
    // Receive Maximum must fit the longest path (issue 28). mosquitto 2.0.13+ keeps to it
    // exactly; with `inflight` (100) an origin 50 ms away with a target 50 ms away sent at
    // most 500 msg/s.
    let text = "[bridge]\nid = \"t\"\ninflight = 100\ninflight_max = 4000\n\n\
                [[broker]]\naddress = \"127.0.0.1:1883\"\ntls = false\n";
    let c = crate::config::Config::from_toml(
        text,
        std::path::Path::new("t.toml"),
        std::path::Path::new("."),
    )
    .expect("valid config");
    let s = SessionSettings {
        broker: c.brokers[0].clone(),
        client_id: "t-b".into(),
        keep_alive: Duration::from_secs(30),
        session_expiry: Duration::from_secs(3600),
        inflight: c.inflight,
        inflight_max: c.inflight_max,
        publish_connections: c.publish_connections,
        v311_lane: c.v311_lane,
    };
    let who = ConnectAs {
        client_id: "t-b".into(),
        clean: false,
        will: None,
    };
    assert_eq!(options_v5(&s, &who).receive_maximum(), Some(4000));
}

/// The driver's events reach a link that waits on the doorbell, and so does the driver's end:
/// an ended driver rings as it drops its sender, sending nothing (aborted, or panicked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_waiting_on_the_doorbell_sees_each_event_and_the_drivers_end() {
    let (tx, mut rx) = mpsc::channel(4);
    let bell = Arc::new(Doorbell::new());
    let sender = EventSender::new(tx, bell.clone());
    let driver = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(sender.send(LinkEvent::Written).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(sender);
    });
    let first = woken(next_event(&mut rx, &bell)).await;
    assert!(matches!(first, Some(LinkEvent::Written)), "{first:?}");
    let end = woken(next_event(&mut rx, &bell)).await;
    assert!(end.is_none(), "{end:?}");
    driver.await.unwrap();
}

/// `wait`'s output, once a wake made it ready; a panic if it was ready only when polled for
/// another reason (here the 5 s timer, which a `timeout` would hide: it polls the future first).
async fn woken<T>(wait: impl std::future::Future<Output = T>) -> T {
    tokio::select! {
        biased;
        _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("no wake in 5 s"),
        v = wait => v,
    }
}
