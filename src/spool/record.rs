//! The on-disk record of one spooled message, versioned by its first byte. Format 1:
//!
//! ```text
//! u8 format (1) · u64 spooled at (ms since the epoch) · u8 flags (QoS in bits 0-1, retain 0x4,
//! properties 0x8) · bytes origin · bytes topic · bytes payload · [properties]
//! bytes = u32 length + that many bytes; opt = u8 0, or u8 1 + bytes
//! properties = opt payload format indicator · opt message expiry (u32) · opt response topic ·
//!              opt correlation data · opt content type · u32 n · n × (bytes key, bytes value)
//! ```
//!
//! The time is kept so that an MQTT 5 message expiry interval counts the time spent spooled.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

use crate::message::Message;

/// Why a record cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RecordError {
    /// It ends before its last field.
    #[error("truncated record")]
    Truncated,
    /// Written by a format this build does not know.
    #[error("unknown record format {0}")]
    UnknownFormat(u8),
    /// A text field (origin, property) is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// An optional field's tag is neither 0 nor 1.
    #[error("bad optional field tag {0}")]
    BadTag(u8),
    /// The message expiry field is not 4 bytes.
    #[error("bad expiry field")]
    BadExpiry,
}

const FORMAT: u8 = 1;
const HAS_PROPS: u8 = 0b1000;
const RETAIN: u8 = 0b0100;

/// Encodes a message and its origin for the spool. The time is kept so that an MQTT 5 message
/// expiry interval counts the time spent in the spool.
pub(crate) fn encode(origin: &str, msg: &Message) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + origin.len() + msg.topic.len() + msg.payload.len());
    b.put_u8(FORMAT);
    b.put_u64(now_ms());
    let mut flags = msg.qos & 0b11;
    if msg.retain {
        flags |= RETAIN;
    }
    if msg.properties.is_some() {
        flags |= HAS_PROPS;
    }
    b.put_u8(flags);
    put_bytes(&mut b, origin.as_bytes());
    put_bytes(&mut b, &msg.topic);
    put_bytes(&mut b, &msg.payload);
    if let Some(p) = &msg.properties {
        put_opt(&mut b, p.payload_format_indicator.map(|v| vec![v]));
        put_opt(
            &mut b,
            p.message_expiry_interval.map(|v| v.to_be_bytes().to_vec()),
        );
        put_opt(
            &mut b,
            p.response_topic.as_ref().map(|v| v.as_bytes().to_vec()),
        );
        put_opt(&mut b, p.correlation_data.as_ref().map(|v| v.to_vec()));
        put_opt(
            &mut b,
            p.content_type.as_ref().map(|v| v.as_bytes().to_vec()),
        );
        b.put_u32(p.user_properties.len() as u32);
        for (k, v) in &p.user_properties {
            put_bytes(&mut b, k.as_bytes());
            put_bytes(&mut b, v.as_bytes());
        }
    }
    b
}

/// A spooled message decoded, or why it was not.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// The message and the name of its origin broker.
    Message(Arc<str>, Message),
    /// Its MQTT 5 message expiry interval ran out while it waited.
    Expired(Message),
}

/// Decodes what [`encode`] wrote.
pub(crate) fn decode(mut b: &[u8]) -> Result<Decoded, RecordError> {
    let r = &mut b;
    let format = get_u8(r)?;
    if format != FORMAT {
        return Err(RecordError::UnknownFormat(format));
    }
    if r.remaining() < 8 {
        return Err(RecordError::Truncated);
    }
    let spooled_at = r.get_u64();
    let flags = get_u8(r)?;
    let origin =
        String::from_utf8(get_bytes(r)?.to_vec()).map_err(|_| RecordError::NotUtf8("origin"))?;
    let topic = Bytes::copy_from_slice(get_bytes(r)?);
    let payload = Bytes::copy_from_slice(get_bytes(r)?);
    let text = |v: Option<&[u8]>| -> Result<Option<String>, RecordError> {
        v.map(|v| String::from_utf8(v.to_vec()).map_err(|_| RecordError::NotUtf8("a property")))
            .transpose()
    };
    let properties = if flags & HAS_PROPS != 0 {
        let pfi = get_opt(r)?.map(|v| v.first().copied().unwrap_or(0));
        let expiry = match get_opt(r)? {
            Some(v) => Some(u32::from_be_bytes(
                v.try_into().map_err(|_| RecordError::BadExpiry)?,
            )),
            None => None,
        };
        let response_topic = text(get_opt(r)?)?;
        let correlation_data = get_opt(r)?.map(Bytes::copy_from_slice);
        let content_type = text(get_opt(r)?)?;
        if r.remaining() < 4 {
            return Err(RecordError::Truncated);
        }
        let n = r.get_u32() as usize;
        let mut user_properties = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let k = text(Some(get_bytes(r)?))?.unwrap_or_default();
            let v = text(Some(get_bytes(r)?))?.unwrap_or_default();
            user_properties.push((k, v));
        }
        Some(Arc::new(PublishProperties {
            payload_format_indicator: pfi,
            message_expiry_interval: expiry,
            topic_alias: None,
            response_topic,
            correlation_data,
            user_properties,
            subscription_identifiers: Vec::new(),
            content_type,
        }))
    } else {
        None
    };
    let mut msg = Message {
        topic,
        payload,
        qos: flags & 0b11,
        retain: flags & RETAIN != 0,
        properties,
    };
    if let Some(expiry) = msg
        .properties
        .as_mut()
        .and_then(|p| Arc::make_mut(p).message_expiry_interval.as_mut())
    {
        let waited = now_ms().saturating_sub(spooled_at) / 1000;
        if waited >= u64::from(*expiry) {
            return Ok(Decoded::Expired(msg));
        }
        *expiry -= waited as u32;
    }
    Ok(Decoded::Message(origin.into(), msg))
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    b.put_u32(v.len() as u32);
    b.put_slice(v);
}

fn put_opt(b: &mut Vec<u8>, v: Option<Vec<u8>>) {
    match v {
        Some(v) => {
            b.put_u8(1);
            put_bytes(b, &v);
        }
        None => b.put_u8(0),
    }
}

fn get_u8(r: &mut &[u8]) -> Result<u8, RecordError> {
    if r.remaining() < 1 {
        return Err(RecordError::Truncated);
    }
    Ok(r.get_u8())
}

fn get_bytes<'a>(r: &mut &'a [u8]) -> Result<&'a [u8], RecordError> {
    if r.remaining() < 4 {
        return Err(RecordError::Truncated);
    }
    let n = r.get_u32() as usize;
    if r.len() < n {
        return Err(RecordError::Truncated);
    }
    let (v, rest) = r.split_at(n);
    *r = rest;
    Ok(v)
}

fn get_opt<'a>(r: &mut &'a [u8]) -> Result<Option<&'a [u8]>, RecordError> {
    match get_u8(r)? {
        0 => Ok(None),
        1 => get_bytes(r).map(Some),
        t => Err(RecordError::BadTag(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(props: Option<PublishProperties>) -> Message {
        Message {
            topic: Bytes::from_static(b"a/b"),
            payload: Bytes::from_static(b"\x00payload\xff"),
            qos: 2,
            retain: true,
            properties: props.map(Arc::new),
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let props = PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(3600),
            topic_alias: None,
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            subscription_identifiers: Vec::new(),
            content_type: Some("text/plain".into()),
        };
        for m in [msg(None), msg(Some(props))] {
            let Decoded::Message(origin, back) = decode(&encode("b1", &m)).unwrap() else {
                panic!("expired")
            };
            assert_eq!(&*origin, "b1");
            assert_eq!(back.topic, m.topic);
            assert_eq!(back.payload, m.payload);
            assert_eq!((back.qos, back.retain), (2, true));
            assert_eq!(back.properties, m.properties);
        }
    }

    #[test]
    fn expired_while_spooled() {
        let props = PublishProperties {
            message_expiry_interval: Some(10),
            ..Default::default()
        };
        let mut rec = encode("b1", &msg(Some(props)));
        // Pretend it was spooled 11 s ago.
        let at = now_ms() - 11_000;
        rec[1..9].copy_from_slice(&at.to_be_bytes());
        assert!(matches!(decode(&rec).unwrap(), Decoded::Expired(_)));
        rec[1..9].copy_from_slice(&(now_ms() - 4_000).to_be_bytes());
        let Decoded::Message(_, m) = decode(&rec).unwrap() else {
            panic!("not expired yet")
        };
        assert_eq!(m.properties.unwrap().message_expiry_interval, Some(6));
    }

    #[test]
    fn each_kind_of_bad_record_is_its_own_error() {
        let good = encode("b1", &msg(Some(PublishProperties::default())));
        let mut newer = good.clone();
        newer[0] = 9;
        assert_eq!(decode(&newer).unwrap_err(), RecordError::UnknownFormat(9));
        assert_eq!(decode(&good[..5]).unwrap_err(), RecordError::Truncated);
        // origin "b1" is at bytes 14..16 (format, time, flags, length).
        let mut latin = good.clone();
        latin[14] = 0xff;
        assert_eq!(decode(&latin).unwrap_err(), RecordError::NotUtf8("origin"));
        // The first optional property tag follows origin, topic and payload.
        let tag = 10 + (4 + 2) + (4 + 3) + (4 + 10);
        let mut bad_tag = good.clone();
        bad_tag[tag] = 7;
        assert_eq!(decode(&bad_tag).unwrap_err(), RecordError::BadTag(7));
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let rec = encode("b1", &msg(Some(PublishProperties::default())));
        for n in 0..rec.len() {
            assert!(decode(&rec[..n]).is_err(), "prefix of {n} bytes");
        }
    }
}
