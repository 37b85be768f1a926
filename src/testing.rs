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
