//! MQTT 5 test clients (rumqttc, plain TCP on a broker's anonymous listener).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::task::JoinHandle;

/// A message as a test subscriber saw it.
#[derive(Debug, Clone)]
pub struct Got {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Delivered QoS.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Properties.
    pub props: Option<PublishProperties>,
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Pub {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS 0-2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Properties.
    pub props: Option<PublishProperties>,
}

impl Pub {
    /// A plain message.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>, qos: u8) -> Pub {
        Pub {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain: false,
            props: None,
        }
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A subscriber collecting everything it receives.
pub struct Sub {
    /// Everything received, in order.
    pub got: Arc<Mutex<Vec<Got>>>,
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to `127.0.0.1:port`, subscribes `filter` (QoS 2, retain as published) and returns
/// once the SUBACK arrived.
pub async fn subscribe(port: u16, id: &str, filter: &str) -> Sub {
    let opts = MqttOptions::new(id, "127.0.0.1", port);
    let (client, el) = AsyncClient::new(sub_options(opts), 1000);
    client.subscribe_many([filter_of(filter)]).await.unwrap();
    collect(client, el, None).await
}

/// Test subscribers announce the widest receive window. mosquitto (2.0.11) queues what does not
/// fit in a client's window and can send a new message ahead of the queued ones
/// (eclipse-mosquitto/mosquitto#2306): with a narrow window a burst from the bridge would show
/// up here out of order although the bridge published it in order.
fn sub_options(mut opts: MqttOptions) -> MqttOptions {
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_receive_maximum(Some(u16::MAX));
    opts.set_max_packet_size(Some(64 * 1024 * 1024));
    opts
}

fn filter_of(filter: &str) -> Filter {
    let mut f = Filter::new(filter, QoS::ExactlyOnce);
    f.preserve_retain = true;
    f
}

/// Records every publish `el` delivers; returns once subscribed. With `resubscribe`, a
/// CONNACK without a session subscribes that filter again, and one with a session counts as
/// subscribed.
async fn collect(client: AsyncClient, mut el: EventLoop, resubscribe: Option<String>) -> Sub {
    let got = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let sink = got.clone();
    let again = client.clone();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => match &resubscribe {
                    Some(filter) if !ack.session_present => {
                        let _ = again.try_subscribe_many([filter_of(filter)]);
                    }
                    Some(_) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    None => {}
                },
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => sink.lock().unwrap().push(Got {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    props: p.properties.map(|b| (*b).clone()),
                }),
                Ok(_) => {}
                Err(_) => {
                    // rumqttc forgets its QoS 2 receive state when the connection drops, and a
                    // broker resuming the session resends PUBREL for it (rumqtt#664).
                    meshbridge::testing::seed_v5(&mut el);
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("test subscriber: no SUBACK within 10 s")
        .unwrap();
    Sub { got, client, task }
}

impl Sub {
    /// Number of messages received so far.
    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Waits until at least `n` messages arrived (or `within` passed); returns the count.
    pub async fn wait_count(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        while self.count() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.count()
    }

    /// Waits until at least `n` payloads starting with `prefix` arrived (or `within` passed);
    /// returns their count. For subscribers that also see other traffic.
    pub async fn wait_prefix(&self, prefix: &str, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let matching = || {
            self.got
                .lock()
                .unwrap()
                .iter()
                .filter(|g| g.payload.starts_with(prefix.as_bytes()))
                .count()
        };
        while matching() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        matching()
    }

    /// Waits until no message arrived for `quiet` (at most 15 s: a message storm never
    /// settles, and the caller's count check then fails); returns the count.
    pub async fn settle(&self, quiet: Duration) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = self.count();
        loop {
            tokio::time::sleep(quiet).await;
            let now = self.count();
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// (lost, duplicates, out of order) of the sequence numbers `0..n` published as payloads on
    /// `topic`, as received so far (per (origin, target) when the topic names the origin).
    pub fn sequence(&self, topic: &str, n: usize) -> (usize, usize, usize) {
        let mut seen = vec![0usize; n];
        let mut disorder = 0;
        let mut last: Option<usize> = None;
        for m in self.messages().iter().filter(|m| m.topic == topic) {
            let i: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            seen[i] += 1;
            if seen[i] == 1 {
                if last.is_some_and(|l| i < l) {
                    disorder += 1;
                }
                last = Some(i);
            }
        }
        let lost = seen.iter().filter(|c| **c == 0).count();
        let dups = seen.iter().map(|c| c.saturating_sub(1)).sum();
        (lost, dups, disorder)
    }

    /// Payloads received.
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|g| g.payload.to_vec())
            .collect()
    }

    /// A copy of everything received.
    pub fn messages(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Disconnects.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
    }
}

/// Publishes every message on `127.0.0.1:port` and returns once each was acknowledged by the
/// broker (QoS 0: written).
pub async fn publish(port: u16, id: &str, msgs: &[Pub]) {
    publish_paced(port, id, msgs, 0, Arc::new(AtomicUsize::new(0))).await
}

/// A subscriber with a persistent session (clean start off, 1 h session expiry, QoS 2) that
/// reconnects after its broker went away, and subscribes again when the broker lost the
/// session. What a real consumer behind a restarting broker looks like.
pub async fn subscribe_persistent(port: u16, id: &str, filter: &str) -> Sub {
    let mut opts = sub_options(MqttOptions::new(id, "127.0.0.1", port));
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(3600));
    let (client, el) = AsyncClient::new(opts, 1000);
    collect(client, el, Some(filter.to_string())).await
}

/// Publishes `msgs` at about `rate` messages per second (in bursts every 10 ms; 0: as fast as
/// the client takes them), counting
/// in `progress` how many were handed to the client, and returns once every one was
/// acknowledged.
pub async fn publish_paced(
    port: u16,
    id: &str,
    msgs: &[Pub],
    rate: u32,
    progress: Arc<AtomicUsize>,
) {
    let per_tick = if rate == 0 {
        msgs.len().max(1)
    } else {
        (rate as usize / 100).max(1)
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 1000);
    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(0))) => {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
    });
    for chunk in msgs.chunks(per_tick) {
        tick.tick().await;
        for m in chunk {
            let r = match &m.props {
                Some(p) => {
                    client
                        .publish_with_properties(
                            m.topic.clone(),
                            qos(m.qos),
                            m.retain,
                            m.payload.clone(),
                            p.clone(),
                        )
                        .await
                }
                None => {
                    client
                        .publish(m.topic.clone(), qos(m.qos), m.retain, m.payload.clone())
                        .await
                }
            };
            r.unwrap();
            progress.fetch_add(1, Ordering::SeqCst);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < msgs.len() {
        assert!(
            Instant::now() < deadline,
            "test publisher: not every message was acknowledged"
        );
        if task.is_finished() {
            panic!("test publisher: connection lost: {:?}", task.await);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    task.abort();
}
