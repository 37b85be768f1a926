//! The mesh's retained messages: the last one per topic, with the broker it came from, handed
//! to a broker added at run time. Bounded in count and bytes.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tracing::warn;

use crate::message::Message;
use crate::metrics;

/// A retained message with the name of the broker it came from.
pub(super) type Retained = (Arc<str>, Arc<Message>);

/// The retained messages and their size.
#[derive(Debug, Default)]
pub(super) struct RetainedTable {
    by_topic: HashMap<Bytes, Retained, ahash::RandomState>,
    /// Sum of [`Message::approx_packet_size`] over `by_topic`.
    bytes: u64,
    /// Retained messages not remembered because a bound was reached.
    skipped: u64,
}

impl RetainedTable {
    fn remove(&mut self, topic: &[u8]) {
        if let Some((_, old)) = self.by_topic.remove(topic) {
            self.bytes -= old.approx_packet_size() as u64;
        }
    }

    /// Remembers `msg` (from `origin`) as its topic's retained message, or forgets the topic
    /// (empty payload). What would pass `max` messages or `max_bytes` is not remembered, and
    /// the older value of its topic goes in any case: kept, it would be handed out stale.
    pub(super) fn note(
        &mut self,
        origin: &Arc<str>,
        msg: &Arc<Message>,
        max: usize,
        max_bytes: u64,
    ) {
        self.remove(&msg.topic);
        if msg.payload.is_empty() {
            return;
        }
        let size = msg.approx_packet_size() as u64;
        if self.by_topic.len() >= max || self.bytes + size > max_bytes {
            self.skipped += 1;
            if metrics::sampled(self.skipped, 1) {
                warn!(
                    topic = %metrics::loggable_topic(&msg.topic),
                    bytes = size,
                    skipped_total = self.skipped,
                    retained_max = max,
                    retained_max_bytes = max_bytes,
                    "retained table full: message not remembered for brokers added later"
                );
            }
            return;
        }
        self.bytes += size;
        self.by_topic
            .insert(msg.topic.clone(), (origin.clone(), msg.clone()));
    }

    /// Every retained message, with its origin.
    pub(super) fn snapshot(&self) -> Vec<Retained> {
        self.by_topic.values().cloned().collect()
    }

    /// Its size.
    pub(super) fn stats(&self) -> RetainedStats {
        RetainedStats {
            messages: self.by_topic.len(),
            bytes: self.bytes,
            skipped: self.skipped,
        }
    }
}

/// What [`Router::retained_stats`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RetainedStats {
    /// Retained messages remembered.
    pub(crate) messages: usize,
    /// Their bytes.
    pub(crate) bytes: u64,
    /// Retained messages not remembered because a bound was reached.
    pub(crate) skipped: u64,
}
