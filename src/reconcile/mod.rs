//! Retained anti-entropy: do the brokers hold the same retained messages, and if not, make
//! them.
//!
//! A **snapshot** of a broker ([`snapshot`]) is what a short-lived clean session subscribed to
//! the broker side of its rules receives as retained, mapped to mesh topics. Two brokers agree
//! on a topic when both hold nothing there, or both hold the same [`Value`]: payload, QoS, and
//! the MQTT 5 properties a publisher chose (content type, response topic, correlation data,
//! payload format, user properties without the bridge's origin tag; the remaining expiry
//! interval changes by itself and is not compared).
//!
//! **The rule for conflicts** ([`plan`]): among the brokers a topic concerns (those holding it,
//! and those its rules would replicate it to), the value most of them hold wins; a tie goes to
//! the value held by the broker listed first (config order, then brokers added at run time).
//! Absence is a vote only with `--delete-extra`, and then only wins outright (more brokers
//! without the topic than holding the winning value). Without it nothing is ever deleted.
//!
//! Repairs are written through the target's normal queue ([`run`]), so they are loop-free
//! (origin tag, echo window) and durable like any forwarded message.

pub mod run;
pub(crate) mod snapshot;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::message::{Message, ORIGIN_TAG};

/// What is compared of a retained message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Value {
    payload: Bytes,
    qos: u8,
    /// The compared properties, in a fixed order.
    properties: Vec<(String, String)>,
}

impl Value {
    /// The compared part of `msg`.
    pub(crate) fn of(msg: &Message) -> Self {
        let mut properties = Vec::new();
        if let Some(p) = &msg.properties {
            if let Some(v) = &p.content_type {
                properties.push(("content-type".into(), v.clone()));
            }
            if let Some(v) = &p.response_topic {
                properties.push(("response-topic".into(), v.clone()));
            }
            if let Some(v) = &p.correlation_data {
                properties.push(("correlation-data".into(), format!("{v:02x?}")));
            }
            if let Some(v) = p.payload_format_indicator {
                properties.push(("payload-format".into(), v.to_string()));
            }
            for (k, v) in &p.user_properties {
                if k != ORIGIN_TAG {
                    properties.push((format!("user:{k}"), v.clone()));
                }
            }
        }
        Self {
            payload: msg.payload.clone(),
            qos: msg.qos,
            properties,
        }
    }

    /// A short description for people: the payload's start, its size and QoS.
    pub(crate) fn describe(&self) -> String {
        let shown: String = String::from_utf8_lossy(&self.payload[..self.payload.len().min(24)])
            .chars()
            .map(|c| if c.is_control() { '.' } else { c })
            .collect();
        let more = if self.payload.len() > 24 { "…" } else { "" };
        let props = if self.properties.is_empty() {
            String::new()
        } else {
            format!(", {} properties", self.properties.len())
        };
        format!(
            "{shown:?}{more} ({} B, QoS {}{props})",
            self.payload.len(),
            self.qos
        )
    }
}

/// One retained message of a snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// What is compared.
    pub(crate) value: Value,
    /// The message as received, on its mesh topic (written to the brokers that differ).
    pub(crate) msg: Arc<Message>,
}

/// A broker's retained messages by mesh topic.
pub(crate) type Snapshot = BTreeMap<String, Held>;

/// One broker as [`plan`] sees it.
pub(crate) struct View<'a> {
    /// Broker name.
    pub(crate) name: &'a str,
    /// Its snapshot.
    pub(crate) held: &'a Snapshot,
    /// Whether its rules replicate the mesh topic to it (an `out` rule takes it).
    pub(crate) takes: &'a dyn Fn(&str) -> bool,
}

/// What to change on one broker.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// Make `broker` hold `held` (on its mesh topic).
    Write {
        /// Where.
        broker: String,
        /// The winning value, from `from`.
        held: Held,
        /// A broker holding it.
        from: String,
    },
    /// Clear the topic on `broker` (`--delete-extra`).
    Delete {
        /// Where.
        broker: String,
        /// Mesh topic.
        topic: String,
    },
}

/// One topic on which the brokers disagree.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopicDiff {
    /// Mesh topic.
    pub topic: String,
    /// Per broker the topic concerns: its value described, or `None` (absent).
    pub held: Vec<(String, Option<String>)>,
}

/// The differences and the actions that remove them.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Topics the brokers disagree on, in topic order.
    pub(crate) topics: Vec<TopicDiff>,
    /// Per pair of brokers (in `views` order): topics only the first holds, only the second
    /// holds, and held by both with different values.
    pub(crate) pairs: Vec<(String, String, u64, u64, u64)>,
    /// What makes them agree.
    pub(crate) actions: Vec<Action>,
}

/// Compares the snapshots of `views` (in priority order: the tie-break) and plans the
/// repair, following the rule for conflicts in the module docs.
pub(crate) fn plan(views: &[View<'_>], delete_extra: bool) -> Plan {
    let mut topics: Vec<&String> = views.iter().flat_map(|v| v.held.keys()).collect();
    topics.sort();
    topics.dedup();
    let mut out = Plan {
        pairs: views
            .iter()
            .enumerate()
            .flat_map(|(i, a)| {
                views[i + 1..]
                    .iter()
                    .map(move |b| (a.name.to_string(), b.name.to_string(), 0, 0, 0))
            })
            .collect(),
        ..Plan::default()
    };
    for topic in topics {
        // The brokers this topic concerns, with what they hold.
        let concerned: Vec<(usize, Option<&Held>)> = views
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let held = v.held.get(topic);
                (held.is_some() || (v.takes)(topic)).then_some((i, held))
            })
            .collect();
        count_pairs(views, topic, &mut out.pairs);
        let first = concerned[0].1.map(|h| &h.value);
        if concerned.iter().all(|(_, h)| h.map(|h| &h.value) == first) {
            continue;
        }
        out.topics.push(TopicDiff {
            topic: topic.clone(),
            held: concerned
                .iter()
                .map(|(i, h)| (views[*i].name.to_string(), h.map(|h| h.value.describe())))
                .collect(),
        });
        repair(views, topic, &concerned, delete_extra, &mut out.actions);
    }
    out
}

/// Counts `topic` in every pair of brokers it concerns both of: held by one only, or by both
/// with different values.
fn count_pairs(views: &[View<'_>], topic: &str, pairs: &mut [(String, String, u64, u64, u64)]) {
    let mut n = 0;
    for (i, a) in views.iter().enumerate() {
        for b in &views[i + 1..] {
            let (x, y) = (a.held.get(topic), b.held.get(topic));
            let pair = &mut pairs[n];
            n += 1;
            let both_concerned =
                (x.is_some() || (a.takes)(topic)) && (y.is_some() || (b.takes)(topic));
            if !both_concerned {
                continue;
            }
            match (x, y) {
                (Some(_), None) => pair.2 += 1,
                (None, Some(_)) => pair.3 += 1,
                (Some(x), Some(y)) if x.value != y.value => pair.4 += 1,
                _ => {}
            }
        }
    }
}

/// The repairs of a `topic` the `concerned` brokers disagree on: the value most of them hold
/// (of equal counts, the first seen) is written where it is missing or different; with
/// `delete_extra`, a topic most of them lack is deleted where it is held.
fn repair(
    views: &[View<'_>],
    topic: &str,
    concerned: &[(usize, Option<&Held>)],
    delete_extra: bool,
    actions: &mut Vec<Action>,
) {
    // Votes per value, in order of first appearance (the tie-break).
    let mut votes: Vec<(&Held, usize, usize)> = Vec::new();
    let mut absent = 0;
    for (i, h) in concerned {
        match h {
            None => absent += 1,
            Some(h) => match votes.iter_mut().find(|(v, _, _)| v.value == h.value) {
                Some(v) => v.1 += 1,
                None => votes.push((h, 1, *i)),
            },
        }
    }
    let Some(&(winner, count, from)) = votes
        .iter()
        .reduce(|best, v| if v.1 > best.1 { v } else { best })
    else {
        return;
    };
    let delete = delete_extra && absent > count;
    for (i, h) in concerned {
        let broker = views[*i].name.to_string();
        match (delete, h) {
            (true, Some(_)) => actions.push(Action::Delete {
                broker,
                topic: topic.to_string(),
            }),
            (false, h) if h.is_none_or(|h| h.value != winner.value) && (views[*i].takes)(topic) => {
                actions.push(Action::Write {
                    broker,
                    held: winner.clone(),
                    from: views[from].name.to_string(),
                });
            }
            _ => {}
        }
    }
}

/// A message to write as the retained value of `topic` (its mesh topic), or to clear it
/// (`None`): without the origin tags it may carry, so that the target's link adds its own.
pub(crate) fn retained_message(topic: &str, held: Option<&Held>) -> Message {
    match held {
        Some(h) => {
            let mut msg = (*h.msg).clone();
            msg.topic = Bytes::copy_from_slice(topic.as_bytes());
            msg.retain = true;
            if let Some(p) = msg.properties.as_mut().map(Arc::make_mut) {
                p.user_properties.retain(|(k, _)| k != ORIGIN_TAG);
                p.topic_alias = None;
                p.subscription_identifiers.clear();
            }
            msg
        }
        None => Message {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::new(),
            qos: 1,
            retain: true,
            properties: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    fn held(payload: &str, qos: u8, user: &[(&str, &str)]) -> Held {
        let properties = (!user.is_empty()).then(|| PublishProperties {
            user_properties: user
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            message_expiry_interval: Some(100),
            ..Default::default()
        });
        let msg = Message {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos,
            retain: true,
            properties: properties.map(Arc::new),
        };
        Held {
            value: Value::of(&msg),
            msg: Arc::new(msg),
        }
    }

    fn snap(items: &[(&str, Held)]) -> Snapshot {
        items
            .iter()
            .map(|(t, h)| (t.to_string(), h.clone()))
            .collect()
    }

    fn everything(_: &str) -> bool {
        true
    }

    /// Views of brokers whose rules take every topic.
    fn all_take<'a>(named: &[(&'a str, &'a Snapshot)]) -> Vec<View<'a>> {
        named
            .iter()
            .map(|(name, held)| View {
                name,
                held,
                takes: &everything,
            })
            .collect()
    }

    fn writes(p: &Plan) -> Vec<(String, String, String)> {
        p.actions
            .iter()
            .filter_map(|a| match a {
                Action::Write { broker, held, from } => Some((
                    broker.clone(),
                    String::from_utf8_lossy(&held.msg.payload).into_owned(),
                    from.clone(),
                )),
                Action::Delete { .. } => None,
            })
            .collect()
    }

    #[test]
    fn the_origin_tag_and_the_expiry_are_not_compared_other_properties_are() {
        let a = held("v", 1, &[("k", "1")]);
        let mut b = held("v", 1, &[("k", "1"), (ORIGIN_TAG, "mesh/b1")]);
        if let Some(p) = &mut Arc::make_mut(&mut b.msg).properties {
            Arc::make_mut(p).message_expiry_interval = Some(3);
        }
        assert_eq!(a.value, Value::of(&b.msg));
        assert_ne!(a.value, held("v", 1, &[("k", "2")]).value);
        assert_ne!(a.value, held("v", 0, &[("k", "1")]).value);
        let m = retained_message("x/y", Some(&b));
        assert!(m.retain && !m.has_origin_tag() && m.topic.as_ref() == b"x/y");
        assert!(retained_message("x", None).payload.is_empty());
    }

    #[test]
    fn the_majority_wins_ties_go_to_the_first_broker_and_nothing_is_deleted_by_default() {
        let (on, off) = (held("on", 1, &[]), held("off", 1, &[]));
        let s1 = snap(&[
            ("door", on.clone()),
            ("tie", on.clone()),
            ("extra", on.clone()),
        ]);
        let s2 = snap(&[("door", on.clone()), ("tie", off.clone())]);
        let s3 = snap(&[("door", off.clone())]);
        let views = all_take(&[("b1", &s1), ("b2", &s2), ("b3", &s3)]);
        let p = plan(&views, false);
        let topics: Vec<&str> = p.topics.iter().map(|t| t.topic.as_str()).collect();
        assert_eq!(topics, ["door", "extra", "tie"]);
        let mut w = writes(&p);
        w.sort();
        assert_eq!(
            w,
            [
                ("b2".into(), "on".into(), "b1".into()), // extra: added where missing
                ("b2".into(), "on".into(), "b1".into()), // tie: b1 is listed first
                ("b3".into(), "on".into(), "b1".into()), // door: 2 against 1
                ("b3".into(), "on".into(), "b1".into()), // extra
                ("b3".into(), "on".into(), "b1".into()), // tie
            ]
        );
        assert!(p.actions.iter().all(|a| matches!(a, Action::Write { .. })));
        // b1/b2: b1 alone holds `extra`; `tie` differs.
        assert_eq!(p.pairs[0], ("b1".into(), "b2".into(), 1, 0, 1));
        // b2/b3: b2 alone holds `tie`; `door` differs; `extra` is in neither.
        assert_eq!(p.pairs[2], ("b2".into(), "b3".into(), 1, 0, 1));
    }

    #[test]
    fn delete_extra_removes_a_minority_topic_only() {
        let on = held("on", 1, &[]);
        let s1 = snap(&[("extra", on.clone()), ("shared", on.clone())]);
        let s2 = snap(&[("shared", on.clone())]);
        let s3 = Snapshot::new();
        let views = all_take(&[("b1", &s1), ("b2", &s2), ("b3", &s3)]);
        let p = plan(&views, true);
        let deletes: Vec<(&str, &str)> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Delete { broker, topic } => Some((broker.as_str(), topic.as_str())),
                Action::Write { .. } => None,
            })
            .collect();
        assert_eq!(deletes, [("b1", "extra")], "2 without against 1 with");
        assert_eq!(
            writes(&p),
            [("b3".into(), "on".into(), "b1".into())],
            "shared: 2 to 1"
        );
    }

    #[test]
    fn a_broker_whose_rules_do_not_take_a_topic_is_left_out_of_it() {
        let on = held("on", 1, &[]);
        let s1 = snap(&[("site/a", on.clone())]);
        let s2 = Snapshot::new();
        let only_other = |t: &str| !t.starts_with("site/");
        let views = [
            View {
                name: "b1",
                held: &s1,
                takes: &everything,
            },
            View {
                name: "b2",
                held: &s2,
                takes: &only_other,
            },
        ];
        let p = plan(&views, false);
        assert!(
            p.topics.is_empty() && p.actions.is_empty(),
            "{:?}",
            p.topics
        );
        assert_eq!(p.pairs[0], ("b1".into(), "b2".into(), 0, 0, 0));
    }
}
