//! The message as it travels through the bridge, independent of the protocol version of the
//! link it came from, and the acknowledgement owed to its origin broker.
//!
//! Topic and payload are `Bytes`, shared (not copied) between all targets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::mpsc;

use crate::doorbell::Doorbell;

/// MQTT protocol version spoken on one link. It is written (config, CLI, admin API, status,
/// metrics) as [`Protocol::as_str`] says, and read back only in that spelling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum Protocol {
    /// MQTT 5: No Local, retain-as-published, properties and the origin tag. The default.
    #[default]
    V5,
    /// MQTT 3.1.1: echo suppression through the dedup window.
    V311,
}

impl Protocol {
    /// Every protocol.
    pub const ALL: [Protocol; 2] = [Protocol::V5, Protocol::V311];

    /// Its one spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::V5 => "v5",
            Protocol::V311 => "v3.1.1",
        }
    }
}

/// A protocol spelled otherwise than [`Protocol::as_str`].
#[derive(Debug, thiserror::Error)]
#[error("unknown protocol {0:?} (expected v5 or v3.1.1)")]
pub struct UnknownProtocol(pub String);

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = UnknownProtocol;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownProtocol(s.to_string()))
    }
}

impl From<Protocol> for &'static str {
    fn from(p: Protocol) -> Self {
        p.as_str()
    }
}

impl TryFrom<String> for Protocol {
    type Error = UnknownProtocol;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// User property that marks a message forwarded by a meshbridge (`<bridge id>/<origin broker>`).
pub(crate) const ORIGIN_TAG: &str = "mb-origin";

/// A message received from one broker, to be forwarded to the others.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    /// Topic name.
    pub(crate) topic: Bytes,
    /// Payload, shared by every copy.
    pub(crate) payload: Bytes,
    /// QoS it was received with (0, 1, 2).
    pub(crate) qos: u8,
    /// Retain flag as published (MQTT 5 retain-as-published) or as delivered (3.1.1).
    pub(crate) retain: bool,
    /// MQTT 5 properties; `None` from a 3.1.1 link and for a message that carries none.
    /// Behind an `Arc`: inline they are 144 of the message's 216 bytes, moved at every hand-over
    /// and held by every queued message, and most messages carry none; shared, one set serves
    /// every copy and every publish that carries the same (see [`Message::tag_only`]).
    pub(crate) properties: Option<Arc<PublishProperties>>,
}

impl Message {
    /// Whether any meshbridge has already forwarded this message (single-hop rule).
    pub(crate) fn has_origin_tag(&self) -> bool {
        self.properties
            .as_ref()
            .is_some_and(|p| p.user_properties.iter().any(|(k, _)| k == ORIGIN_TAG))
    }

    /// Whether MQTT 3.1.1 carries this message whole: it has no MQTT 5 property that would be
    /// forwarded (a topic alias and subscription identifiers belong to the origin's connection).
    pub(crate) fn plain(&self) -> bool {
        self.properties.as_ref().is_none_or(|p| {
            p.payload_format_indicator.is_none()
                && p.message_expiry_interval.is_none()
                && p.response_topic.is_none()
                && p.correlation_data.is_none()
                && p.user_properties.is_empty()
                && p.content_type.is_none()
        })
    }

    /// The properties a message that carries none goes out with on an MQTT 5 target: the origin
    /// tag `tag` alone. Built once per origin and target and shared by every such publish.
    pub(crate) fn tag_only(tag: &str) -> Arc<PublishProperties> {
        Arc::new(PublishProperties {
            user_properties: vec![(ORIGIN_TAG.to_string(), tag.to_string())],
            ..Default::default()
        })
    }

    /// Properties to publish with on an MQTT 5 target: everything the origin gave, minus what is
    /// only meaningful on the origin connection (topic alias, subscription identifiers), plus the
    /// origin tag, which `tag_only` (see [`Message::tag_only`]) carries. A message without
    /// properties of its own shares `tag_only`: no allocation per publish.
    pub(crate) fn forward_properties(
        &self,
        tag_only: &Arc<PublishProperties>,
    ) -> Arc<PublishProperties> {
        let Some(own) = &self.properties else {
            return tag_only.clone();
        };
        let mut props = PublishProperties::clone(own);
        props.topic_alias = None;
        props.subscription_identifiers.clear();
        props
            .user_properties
            .extend(tag_only.user_properties.iter().cloned());
        Arc::new(props)
    }

    /// Size of the PUBLISH packet that forwards this message, close enough to compare with a
    /// broker limit or a memory bound (properties counted with their encoded lengths, plus the
    /// origin tag).
    pub(crate) fn approx_packet_size(&self) -> usize {
        let props = self.properties.as_ref().map_or(0, |p| {
            p.user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>()
                + p.response_topic.as_ref().map_or(0, |t| 3 + t.len())
                + p.correlation_data.as_ref().map_or(0, |d| 3 + d.len())
                + p.content_type.as_ref().map_or(0, |c| 3 + c.len())
                + 16
        });
        // fixed header (≤5) + topic length (2) + topic + packet id (2) + properties length (≤4)
        // + properties + origin tag + payload
        5 + 2 + self.topic.len() + 2 + 4 + props + 64 + self.payload.len()
    }

    /// The topic as text (MQTT topics are UTF-8; a broker sending otherwise is reported upstream).
    pub(crate) fn topic_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.topic).ok()
    }
}

/// What is needed to acknowledge one QoS 1/2 publish on its origin connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckRequest {
    /// Packet identifier of the incoming publish.
    pub(crate) pkid: u16,
    /// Its QoS (1: PUBACK, 2: PUBREC).
    pub(crate) qos: u8,
    /// The broker session it belongs to; an acknowledgement for an older session is discarded
    /// (its packet id may by now name another message).
    pub(crate) epoch: u32,
}

/// Collects the completions of every target of one message; when the last one reports, the
/// acknowledgement is sent to the origin link. Dropping a share without completing it leaves the
/// message unacknowledged, so the origin broker delivers it again (at-least-once).
#[derive(Debug)]
pub(crate) struct AckGroup {
    remaining: AtomicUsize,
    request: AckRequest,
    origin: AckSender,
}

/// One target's share of an [`AckGroup`].
#[derive(Debug)]
pub(crate) struct AckShare(Arc<AckGroup>);

impl AckGroup {
    /// A group expecting `targets` completions, and its shares, one at a time (no list: one
    /// allocation per message, the group's). A share the caller does not take is never
    /// completed.
    pub(crate) fn shares(
        request: AckRequest,
        origin: AckSender,
        targets: usize,
    ) -> impl Iterator<Item = AckShare> {
        let group = Arc::new(AckGroup {
            remaining: AtomicUsize::new(targets),
            request,
            origin,
        });
        std::iter::repeat_n(group, targets).map(AckShare)
    }
}

impl AckShare {
    /// This target is done with the message (acknowledged by its broker, or accepted for later
    /// delivery); the last share acknowledges the origin.
    pub(crate) fn complete(self) {
        if self.0.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.origin.send(self.0.request);
        }
    }
}

/// Where the acknowledgements owed to one origin broker go: a channel, and a doorbell its
/// reader waits on. A link waits in a `select!` that polls every enabled branch at every pass;
/// the channel's own wait costs about 200 instructions a pass (callgrind), the doorbell's
/// about 50 (see [`crate::doorbell`]). The reader takes what the channel holds after a ring.
#[derive(Debug, Clone)]
pub(crate) struct AckSender(Arc<AckPost>);

#[derive(Debug)]
struct AckPost {
    tx: mpsc::UnboundedSender<AckRequest>,
    bell: Doorbell,
}

/// The reading end of an [`AckSender`].
#[derive(Debug)]
pub(crate) struct AckInbox {
    rx: mpsc::UnboundedReceiver<AckRequest>,
    post: Arc<AckPost>,
}

/// A sender of acknowledgements and its inbox.
pub(crate) fn ack_channel() -> (AckSender, AckInbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let post = Arc::new(AckPost {
        tx,
        bell: Doorbell::new(),
    });
    (AckSender(post.clone()), AckInbox { rx, post })
}

impl AckSender {
    /// Hands `request` to the inbox and wakes its reader. The reader may be gone (its link was
    /// removed, or is shutting down): the broker will deliver the message again.
    pub(crate) fn send(&self, request: AckRequest) {
        if self.0.tx.send(request).is_ok() {
            self.0.bell.ring();
        }
    }
}

impl AckInbox {
    /// Ready once acknowledgements may have arrived since the last wait that returned
    /// (cancel-safe); [`AckInbox::try_recv`] takes them.
    pub(crate) async fn rung(&self) {
        self.post.bell.rung().await
    }

    /// The next acknowledgement waiting, if any.
    pub(crate) fn try_recv(&mut self) -> Option<AckRequest> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_has_one_spelling_everywhere() {
        for p in Protocol::ALL {
            assert_eq!(p.as_str().parse::<Protocol>().unwrap(), p);
            assert_eq!(p.to_string(), p.as_str());
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<Protocol>(&json).unwrap(), p);
        }
        for other in ["5", "v311", "3.1.1", "V5", ""] {
            assert!(other.parse::<Protocol>().is_err(), "{other:?}");
            assert!(serde_json::from_str::<Protocol>(&format!("\"{other}\"")).is_err());
        }
        assert_eq!(Protocol::default(), Protocol::V5);
    }

    #[test]
    fn last_share_acks_once() {
        let (tx, mut rx) = ack_channel();
        let req = AckRequest {
            pkid: 7,
            qos: 1,
            epoch: 0,
        };
        let mut shares = AckGroup::shares(req, tx, 3);
        shares.next().unwrap().complete();
        shares.next().unwrap().complete();
        assert!(
            rx.try_recv().is_none(),
            "two of three targets done: no ack yet"
        );
        shares.next().unwrap().complete();
        assert_eq!(rx.try_recv().unwrap(), req);
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn dropped_share_never_acks() {
        let (tx, mut rx) = ack_channel();
        let mut shares = AckGroup::shares(
            AckRequest {
                pkid: 1,
                qos: 2,
                epoch: 0,
            },
            tx,
            2,
        );
        shares.next().unwrap().complete();
        drop(shares);
        assert!(rx.try_recv().is_none());
    }

    /// The last share rings the inbox's reader, from another thread too; what it rang for is
    /// waiting then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acknowledgement_wakes_its_reader() {
        let (tx, mut rx) = ack_channel();
        let req = AckRequest {
            pkid: 3,
            qos: 1,
            epoch: 1,
        };
        let share = AckGroup::shares(req, tx, 1).next().unwrap();
        let completer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            share.complete();
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.rung())
            .await
            .expect("the completion rang the inbox");
        assert_eq!(rx.try_recv(), Some(req));
        completer.await.unwrap();
    }

    #[test]
    fn forward_properties_tag_and_strip() {
        let props = PublishProperties {
            topic_alias: Some(3),
            subscription_identifiers: vec![9],
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let m = Message {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::new(),
            qos: 1,
            retain: false,
            properties: Some(Arc::new(props)),
        };
        assert!(!m.has_origin_tag());
        let tag = Message::tag_only("br/b1");
        let out = m.forward_properties(&tag);
        assert_eq!(out.topic_alias, None);
        assert!(out.subscription_identifiers.is_empty());
        assert_eq!(out.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            out.user_properties,
            vec![
                ("k".into(), "v".into()),
                (ORIGIN_TAG.into(), "br/b1".into())
            ]
        );
    }

    /// A message is moved at every hand-over and held once per queued or in-flight copy: its
    #[test]
    fn only_what_the_origin_connection_alone_uses_leaves_a_message_plain() {
        let mut m = Message {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from_static(b"p"),
            qos: 1,
            retain: false,
            properties: None,
        };
        assert!(m.plain(), "no properties");
        m.properties = Some(Arc::new(PublishProperties {
            topic_alias: Some(3),
            subscription_identifiers: vec![9],
            ..Default::default()
        }));
        assert!(
            m.plain(),
            "a topic alias and a subscription id are not forwarded"
        );
        let kept: [fn(&mut PublishProperties); 6] = [
            |p| p.payload_format_indicator = Some(1),
            |p| p.message_expiry_interval = Some(60),
            |p| p.response_topic = Some("r".into()),
            |p| p.correlation_data = Some(Bytes::from_static(b"c")),
            |p| p.user_properties.push(("k".into(), "v".into())),
            |p| p.content_type = Some("text/plain".into()),
        ];
        for (i, set) in kept.iter().enumerate() {
            let mut props = PublishProperties::default();
            set(&mut props);
            m.properties = Some(Arc::new(props));
            assert!(!m.plain(), "property {i} needs MQTT 5");
        }
    }

    /// MQTT 5 properties (144 bytes inline) stay behind a pointer.
    #[test]
    fn a_message_stays_small() {
        assert!(std::mem::size_of::<Message>() <= 96);
    }
}
