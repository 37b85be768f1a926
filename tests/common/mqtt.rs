//! MQTT 5 test clients (rumqttc, plain TCP on a broker's anonymous listener).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
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
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(Some(64 * 1024 * 1024));
    let (client, mut el) = AsyncClient::new(opts, 1000);
    let mut f = Filter::new(filter, QoS::ExactlyOnce);
    f.preserve_retain = true;
    client.subscribe_many([f]).await.unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let sink = got.clone();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
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
                    props: p.properties,
                }),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
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
    for m in msgs {
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
