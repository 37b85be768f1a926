//! The client half of a connection: the requests a link makes, queued on rumqttc's request
//! channel without waiting (MQTT 5 or 3.1.1 behind one interface).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5b;

use crate::message::{AckRequest, Message};

/// The client half of a connection.
#[derive(Debug, Clone)]
pub(crate) enum Client {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

/// Why a request could not be queued.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// rumqttc's request channel is full; try again after the next event.
    #[error("request channel full")]
    Full,
    /// The connection is gone.
    #[error("connection closed")]
    Closed,
}

fn qos_v4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl From<rumqttc::ClientError> for SendError {
    fn from(e: rumqttc::ClientError) -> Self {
        match e {
            rumqttc::ClientError::TryRequestFull(_) => SendError::Full,
            rumqttc::ClientError::Request(_) | rumqttc::ClientError::TryRequest(_) => {
                SendError::Closed
            }
        }
    }
}

impl From<rumqttc::v5::ClientError> for SendError {
    fn from(e: rumqttc::v5::ClientError) -> Self {
        match e {
            rumqttc::v5::ClientError::TryRequestFull(_) => SendError::Full,
            rumqttc::v5::ClientError::Request(_) | rumqttc::v5::ClientError::TryRequest(_) => {
                SendError::Closed
            }
        }
    }
}

impl Client {
    /// Queues a publish of `msg` to `topic` at `qos` with packet id `pkid`, which the caller
    /// chose (see [`super::outflight::OutFlight::free_id`]; 0 for QoS 0); on MQTT 5 with
    /// `properties`. A `topic` that is `msg.topic` itself (no rule renamed it) is shared, not
    /// copied, on MQTT 5.
    pub(crate) fn publish(
        &self,
        msg: &Message,
        topic: &str,
        qos: u8,
        pkid: u16,
        properties: Option<Arc<v5b::PublishProperties>>,
    ) -> Result<(), SendError> {
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::from_bytes(topic, qos_v4(qos), msg.payload.clone());
                p.retain = msg.retain;
                p.pkid = pkid;
                Ok(c.try_publish_packet(p)?)
            }
            Client::V5(c) => {
                let same = topic.as_ptr() == msg.topic.as_ptr() && topic.len() == msg.topic.len();
                let topic = if same {
                    msg.topic.clone()
                } else {
                    Bytes::copy_from_slice(topic.as_bytes())
                };
                Ok(c.try_publish_packet(v5b::Publish {
                    dup: false,
                    qos: qos_v5(qos),
                    retain: msg.retain,
                    topic,
                    pkid,
                    payload: msg.payload.clone(),
                    properties,
                })?)
            }
        }
    }

    /// Queues one of the bridge's own records (control records at QoS 0, park records at QoS
    /// 1), retained or not; on MQTT 5 with a message expiry when given. `pkid` is the packet id
    /// the caller chose, or 0 to have rumqttc number it (a connection either numbers all its
    /// QoS 1 publishes itself or none).
    pub(crate) fn publish_record(
        &self,
        topic: &str,
        payload: Vec<u8>,
        qos: u8,
        pkid: u16,
        retain: bool,
        expiry: Option<Duration>,
    ) -> Result<(), SendError> {
        let payload = Bytes::from(payload);
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::from_bytes(topic, qos_v4(qos), payload);
                p.retain = retain;
                p.pkid = pkid;
                Ok(c.try_publish_packet(p)?)
            }
            Client::V5(c) => {
                let properties = expiry.map(|e| v5b::PublishProperties {
                    message_expiry_interval: Some(u32::try_from(e.as_secs()).unwrap_or(u32::MAX)),
                    ..Default::default()
                });
                let mut p = v5b::Publish::new(topic, qos_v5(qos), payload, properties);
                p.retain = retain;
                p.pkid = pkid;
                Ok(c.try_publish_packet(p)?)
            }
        }
    }

    /// Subscribes filters of the bridge's own records in one SUBSCRIBE, at `qos`: without No
    /// Local (a link reads its own control records back, a park task its own marker), retained
    /// messages sent on every subscription.
    pub(crate) fn subscribe_records(&self, filters: &[String], qos: u8) -> Result<(), SendError> {
        match self {
            Client::V4(c) => Ok(c.try_subscribe_many(
                filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos_v4(qos))),
            )?),
            Client::V5(c) => Ok(c.try_subscribe_many(
                filters
                    .iter()
                    .map(|f| v5b::Filter::new(f.clone(), qos_v5(qos))),
            )?),
        }
    }

    /// Subscribes a probe client's filter at QoS 1; on MQTT 5 with No Local (its own probes
    /// would only add traffic to the connection it measures).
    pub(crate) fn subscribe_probes(&self, filter: &str) -> Result<(), SendError> {
        match self {
            Client::V4(c) => Ok(c.try_subscribe(filter, rumqttc::QoS::AtLeastOnce)?),
            Client::V5(c) => {
                let mut f = v5b::Filter::new(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
                f.nolocal = true;
                Ok(c.try_subscribe_many([f])?)
            }
        }
    }

    /// Queues the acknowledgement of an incoming publish (PUBACK or PUBREC).
    pub(crate) fn ack(&self, ack: AckRequest) -> Result<(), SendError> {
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", qos_v4(ack.qos), Vec::new());
                p.pkid = ack.pkid;
                Ok(c.try_ack(&p)?)
            }
            Client::V5(c) => {
                let mut p = v5b::Publish::new("", qos_v5(ack.qos), Bytes::new(), None);
                p.pkid = ack.pkid;
                Ok(c.try_ack(&p)?)
            }
        }
    }

    /// Subscribes the filters: on MQTT 5 with No Local, retain-as-published, and retained
    /// messages only on a new subscription (a resumed session does not re-flood them).
    pub(crate) fn subscribe(&self, filters: &[String]) -> Result<(), SendError> {
        match self {
            Client::V4(c) => Ok(c.try_subscribe_many(
                filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::ExactlyOnce)),
            )?),
            Client::V5(c) => Ok(c.try_subscribe_many(filters.iter().map(|f| {
                let mut filter =
                    v5b::Filter::new(f.clone(), rumqttc::v5::mqttbytes::QoS::ExactlyOnce);
                filter.nolocal = true;
                filter.preserve_retain = true;
                filter.retain_forward_rule = v5b::RetainForwardRule::OnNewSubscribe;
                filter
            }))?),
        }
    }

    /// Queues an UNSUBSCRIBE per filter (a rule change).
    pub(crate) fn unsubscribe(&self, filters: &[String]) -> Result<(), SendError> {
        for f in filters {
            match self {
                Client::V4(c) => c.try_unsubscribe(f.clone())?,
                Client::V5(c) => c.try_unsubscribe(f.clone())?,
            }
        }
        Ok(())
    }

    /// Queues a DISCONNECT.
    pub(crate) fn disconnect(&self) -> Result<(), SendError> {
        match self {
            Client::V4(c) => Ok(c.try_disconnect()?),
            Client::V5(c) => Ok(c.try_disconnect()?),
        }
    }
}
