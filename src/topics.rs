//! Every name the mesh uses on a broker, in one place: the control topics under
//! `$meshbridge/<bridge id>/` (instance and owner records, echo notes, probes, park copies) and
//! the client ids of its connections. Pure; imports nothing of the crate.
//!
//! Client ids, from the base `<bridge id>-<broker>` (with a mesh key
//! `<bridge id>-<broker>-<16 hex>`, see `seal`):
//! - the consumer (owner) of the broker: the base itself, a persistent session;
//! - every other process's connection: `<base>@<instance>` ([`publisher_id`]);
//! - a park session for target T: `<base>~park-T` ([`park_id`]); the copy publisher:
//!   `<base>~copies@<instance>` ([`copies_id`]);
//! - the probe client: `<base>~probe@<instance>` ([`probe_id`]); a snapshot:
//!   `<base>~snapshot-<n>@<instance>` ([`snapshot_id`]).

/// The root of every mesh's control topics: no rule may bridge it or map traffic into it.
pub(crate) const ROOT: &str = "$meshbridge";

/// The base client id of the mesh `bridge_id` on `broker`; `suffix` derived from the mesh key.
pub(crate) fn base_id(bridge_id: &str, broker: &str, suffix: Option<&str>) -> String {
    match suffix {
        Some(s) => format!("{bridge_id}-{broker}-{s}"),
        None => format!("{bridge_id}-{broker}"),
    }
}

/// A process's connection to a broker it does not consume.
pub(crate) fn publisher_id(base: &str, instance: &str) -> String {
    format!("{base}@{instance}")
}

/// The park session for `target` on a broker.
pub(crate) fn park_id(base: &str, target: &str) -> String {
    format!("{base}~park-{target}")
}

/// A process's copy publisher on a broker.
pub(crate) fn copies_id(base: &str, instance: &str) -> String {
    format!("{base}~copies@{instance}")
}

/// Extra publishing connection `n` of a process's link to a broker (see `link::spread`).
pub(crate) fn lane_id(base: &str, instance: &str, n: usize) -> String {
    format!("{base}~lane{n}@{instance}")
}

/// A process's probe client on a broker.
pub(crate) fn probe_id(base: &str, instance: &str) -> String {
    format!("{base}~probe@{instance}")
}

/// The `n`th snapshot a process takes of a broker.
pub(crate) fn snapshot_id(base: &str, n: u64, instance: &str) -> String {
    format!("{base}~snapshot-{n}@{instance}")
}

/// The control topics of one mesh.
#[derive(Debug, Clone)]
pub(crate) struct Control {
    prefix: String,
}

/// What a control topic names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ControlTopic<'a> {
    /// An instance record.
    Instance(&'a str),
    /// An owner record.
    Owner(&'a str),
    /// An echo note (see [`Control::echo_topic`]).
    Echo,
}

impl Control {
    /// The control topics of the mesh `bridge_id`.
    pub(crate) fn new(bridge_id: &str) -> Self {
        Self {
            prefix: format!("{ROOT}/{bridge_id}/"),
        }
    }

    /// The filters every link subscribes (without No Local: it reads its own records back).
    pub(crate) fn filters(&self) -> [String; 3] {
        [
            format!("{}instance/+", self.prefix),
            format!("{}owner/+", self.prefix),
            self.echo_topic(),
        ]
    }

    /// Where an instance that publishes into an MQTT 3.1.1 broker it does not consume first
    /// writes the portable fingerprint of the message (`ha::portable_fingerprint`), so that the
    /// owner drops the echo.
    pub(crate) fn echo_topic(&self) -> String {
        format!("{}echo", self.prefix)
    }

    /// The record of `instance`.
    pub(crate) fn instance_topic(&self, instance: &str) -> String {
        format!("{}instance/{instance}", self.prefix)
    }

    /// The owner record of `broker`.
    pub(crate) fn owner_topic(&self, broker: &str) -> String {
        format!("{}owner/{broker}", self.prefix)
    }

    /// Whether `topic` is one of this mesh's control topics.
    pub(crate) fn is_control(&self, topic: &[u8]) -> bool {
        topic.starts_with(self.prefix.as_bytes())
    }

    /// Where copies of messages spooled for `target` are parked on an origin broker (see
    /// `park`).
    pub(crate) fn park_topic(&self, target: &str) -> String {
        format!("{}park/{target}", self.prefix)
    }

    /// Every probe of the mesh (see [`crate::probe`]): what a consuming link subscribes.
    pub(crate) fn probe_filter(&self) -> String {
        format!("{}probe/#", self.prefix)
    }

    /// The probes of `instance`: what its probe clients subscribe.
    pub(crate) fn probe_filter_of(&self, instance: &str) -> String {
        format!("{}probe/{instance}/+", self.prefix)
    }

    /// Where `instance` publishes its probes on broker `origin`.
    pub(crate) fn probe_topic(&self, instance: &str, origin: &str) -> String {
        format!("{}probe/{instance}/{origin}", self.prefix)
    }

    /// Whether `topic` is a probe of this mesh. Cheap for every other topic: one byte unless
    /// the topic starts with `$`.
    pub(crate) fn is_probe(&self, topic: &[u8]) -> bool {
        topic.first() == Some(&b'$')
            && topic
                .strip_prefix(self.prefix.as_bytes())
                .is_some_and(|rest| rest.starts_with(b"probe/"))
    }

    /// `(instance, origin)` of a probe topic.
    pub(crate) fn parse_probe<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("probe/")?
            .rsplit_once('/')
    }

    /// What `topic` names, if it is a record of this mesh.
    pub(crate) fn parse<'a>(&self, topic: &'a str) -> Option<ControlTopic<'a>> {
        let rest = topic.strip_prefix(self.prefix.as_str())?;
        if rest == "echo" {
            return Some(ControlTopic::Echo);
        }
        if let Some(name) = rest.strip_prefix("instance/") {
            return Some(ControlTopic::Instance(name));
        }
        rest.strip_prefix("owner/").map(ControlTopic::Owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_topics_parse_back() {
        let c = Control::new("m1");
        assert_eq!(
            c.filters(),
            [
                "$meshbridge/m1/instance/+",
                "$meshbridge/m1/owner/+",
                "$meshbridge/m1/echo"
            ]
        );
        assert_eq!(c.parse(&c.echo_topic()), Some(ControlTopic::Echo));
        let t = c.instance_topic("host-a");
        assert_eq!(c.parse(&t), Some(ControlTopic::Instance("host-a")));
        let t = c.owner_topic("b1");
        assert_eq!(c.parse(&t), Some(ControlTopic::Owner("b1")));
        assert!(c.is_control(t.as_bytes()));
        assert!(!Control::new("m2").is_control(t.as_bytes()), "another mesh");
        let p = c.probe_topic("host-1", "b2");
        assert!(c.is_probe(p.as_bytes()) && !c.is_probe(t.as_bytes()));
        assert!(!Control::new("m2").is_probe(p.as_bytes()));
        assert_eq!(c.parse_probe(&p), Some(("host-1", "b2")));
        assert!(crate::rules::matches(&c.probe_filter(), &p));
        assert!(crate::rules::matches(&c.probe_filter_of("host-1"), &p));
        assert!(!crate::rules::matches(&c.probe_filter_of("host-2"), &p));
        assert!(
            !crate::rules::matches("#", &p),
            "never seen by a `#` subscriber"
        );
        assert_eq!(c.parse("$meshbridge/m1/other"), None);
        assert_eq!(c.park_topic("b3"), "$meshbridge/m1/park/b3");
        assert_eq!(c.parse(&c.park_topic("b3")), None, "not a record");
    }

    #[test]
    fn client_ids() {
        let base = base_id("m", "b1", None);
        assert_eq!(base, "m-b1");
        assert_eq!(base_id("m", "b1", Some("00ff")), "m-b1-00ff");
        assert_eq!(publisher_id(&base, "host-a"), "m-b1@host-a");
        assert_eq!(park_id(&base, "b3"), "m-b1~park-b3");
        assert_eq!(copies_id(&base, "host-a"), "m-b1~copies@host-a");
        assert_eq!(probe_id(&base, "host-a"), "m-b1~probe@host-a");
        assert_eq!(snapshot_id(&base, 7, "host-a"), "m-b1~snapshot-7@host-a");
    }
}
