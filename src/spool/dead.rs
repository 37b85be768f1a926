//! The dead-letter table (`dead_letters` in the spool file): messages a target cannot take as
//! mapped — a topic over MQTT's 65 535 bytes once the rules mapped it, a packet over the
//! target's maximum packet size, one the broker closes the connection on (see
//! `link::poison`) — set aside so that the link goes on with the next message. Each row keeps
//! the whole message, its origin, its target and why; `bridge dead-letters` lists them. The
//! table keeps the newest [`MAX_ROWS`].
//!
//! A row's value: the header's length (u32, big endian), the header (JSON, [`Header`]), then
//! the message as the spool encodes it ([`super::encode`]).

use serde::{Deserialize, Serialize};

use super::record::{Decoded, decode, encode};
use crate::message::Message;

/// The table's name in the spool file (no `queue/` prefix: not a target's spool).
pub(crate) const TABLE: &str = "dead_letters";

/// Rows kept: the oldest go beyond it.
pub(crate) const MAX_ROWS: u64 = 10_000;

/// Bytes of the topic a listing shows.
const TOPIC_SHOWN: usize = 200;

/// What a row says besides the message.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    target: String,
    reason: String,
    at_ms: u64,
}

/// One dead letter, as `GET /api/v1/dead-letters` and `bridge dead-letters` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When it was set aside (RFC 3339, UTC).
    pub at: String,
    /// The broker it could not be delivered to.
    pub target: String,
    /// The broker it came from.
    pub origin: String,
    /// Its topic (as it arrived in the mesh), cut to its first 200 bytes.
    pub topic: String,
    /// The topic's length in bytes.
    pub topic_bytes: usize,
    /// The payload's length in bytes.
    pub payload_bytes: usize,
    /// Its QoS.
    pub qos: u8,
    /// Why it was set aside.
    pub reason: String,
}

/// A row for `msg` from `origin`, set aside for `target` because of `reason`, now.
pub(crate) fn row(target: &str, origin: &str, msg: &Message, reason: &str, at_ms: u64) -> Vec<u8> {
    let header = Header {
        target: target.to_string(),
        reason: reason.to_string(),
        at_ms,
    };
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let message = encode(origin, msg);
    let mut value = Vec::with_capacity(4 + header.len() + message.len());
    value.extend_from_slice(&(header.len() as u32).to_be_bytes());
    value.extend_from_slice(&header);
    value.extend_from_slice(&message);
    value
}

/// What a listing shows of a row; `None` for a row this version cannot read.
pub(crate) fn read(value: &[u8]) -> Option<DeadLetter> {
    let (len, rest) = value.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    let header: Header = serde_json::from_slice(rest.get(..len)?).ok()?;
    let (origin, msg) = match decode(rest.get(len..)?).ok()? {
        Decoded::Message(origin, msg) => (origin.to_string(), msg),
        Decoded::Expired(msg) => (String::new(), msg),
    };
    let shown = &msg.topic[..msg.topic.len().min(TOPIC_SHOWN)];
    Some(DeadLetter {
        at: humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(header.at_ms),
        )
        .to_string(),
        target: header.target,
        origin,
        topic: String::from_utf8_lossy(shown).into_owned(),
        topic_bytes: msg.topic.len(),
        payload_bytes: msg.payload.len(),
        qos: msg.qos,
        reason: header.reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_reads_back_with_its_topic_cut() {
        let msg = Message {
            topic: bytes::Bytes::from("t/".repeat(200)),
            payload: bytes::Bytes::from_static(b"12345"),
            qos: 1,
            retain: false,
            properties: None,
        };
        let value = row("b2", "b1", &msg, "too long", 1_700_000_000_000);
        let d = read(&value).expect("reads back");
        assert_eq!(d.target, "b2");
        assert_eq!(d.origin, "b1");
        assert_eq!(d.topic.len(), TOPIC_SHOWN);
        assert_eq!(d.topic_bytes, 400);
        assert_eq!(d.payload_bytes, 5);
        assert_eq!(d.qos, 1);
        assert_eq!(d.reason, "too long");
        assert_eq!(d.at, "2023-11-14T22:13:20.000Z");
        assert_eq!(read(&value[..10]), None, "cut short");
        assert_eq!(read(b""), None);
    }
}
