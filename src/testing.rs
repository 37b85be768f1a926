//! What the integration tests and the benchmark harness use of the crate's insides, in one
//! place; nothing else of `link` is public.

/// A free TCP port on 127.0.0.1, below the ephemeral range (see [`crate::demo::free_port`]).
pub use crate::demo::free_port;

/// Seeds a rumqttc v5 event loop's QoS 2 receive state after a reconnect, as the links do
/// (rumqttc forgets it, and a broker resuming the session resends PUBREL for it).
pub use crate::link::session::seed_v5;

/// The rendezvous score of an instance for a broker: the instance with the highest score is
/// the one that claims a broker nobody owns (see `ha`).
pub fn rendezvous(instance: &str, broker: &str) -> u64 {
    crate::ha::score(instance, broker)
}

/// An unsealed, well-formed park copy of a QoS 1 message `topic`/`payload` from `origin` for
/// `target` (see `park`): what a client that can publish on the origin broker could
/// forge into its park session.
pub fn forged_park_copy(origin: &str, target: &str, topic: &str, payload: &[u8]) -> Vec<u8> {
    let msg = crate::message::Message {
        topic: bytes::Bytes::copy_from_slice(topic.as_bytes()),
        payload: bytes::Bytes::copy_from_slice(payload),
        qos: 1,
        retain: false,
        properties: None,
    };
    crate::park::Park::Copy {
        target: target.into(),
        spool_id: 1,
        key: 1,
        record: std::sync::Arc::new(crate::spool::encode(origin, &msg)),
    }
    .encode()
}
