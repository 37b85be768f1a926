//! A message on its way to one target.

use std::sync::Arc;

use crate::message::{AckShare, Message};

/// A message on its way to one target.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// The message, shared by all targets.
    pub(crate) msg: Arc<Message>,
    /// This target's share of the origin's acknowledgement (QoS ≥ 1 only).
    pub(crate) share: Option<AckShare>,
    /// Origin broker name, for the origin tag.
    pub(crate) origin: Arc<str>,
    /// Its key in the target's spool, when it was read from there (removed once delivered).
    pub(crate) key: Option<u64>,
    /// A probe (see [`crate::probe`]): delivered while the target keeps up, never spooled
    /// (late, it would measure nothing; dropped, it counts as lost).
    pub(crate) probe: bool,
}

impl Outbound {
    /// A message for a target, not (yet) spooled.
    pub(crate) fn new(msg: Arc<Message>, share: Option<AckShare>, origin: Arc<str>) -> Self {
        Self {
            msg,
            share,
            origin,
            key: None,
            probe: false,
        }
    }

    /// A probe for a target (see the `probe` field).
    pub(crate) fn probe(msg: Arc<Message>, share: Option<AckShare>, origin: Arc<str>) -> Self {
        Self {
            probe: true,
            ..Self::new(msg, share, origin)
        }
    }

    /// Completes this target's share, if any.
    pub(crate) fn complete(&mut self) {
        if let Some(share) = self.share.take() {
            share.complete();
        }
    }
}
