//! Topic rules per broker, as a mosquitto bridge `topic` line has them: a filter, a direction,
//! a QoS cap, and a prefix pair mapping the broker's topics to the mesh's. Pure: no I/O.
//!
//! Meaning (mosquitto's, with the mesh in the place of the bridge master's own broker):
//! - `in` takes messages from the broker into the mesh: the broker is subscribed to
//!   `broker_prefix + filter`, and a message on `broker_prefix + rest` enters the mesh as
//!   `mesh_prefix + rest`.
//! - `out` gives messages of the mesh to the broker: a mesh topic matching
//!   `mesh_prefix + filter` is published to the broker as `broker_prefix + rest`.
//! - `both` is both.
//!
//! The first matching rule in file order decides (its mapping and its QoS cap); a message goes
//! to a broker at most once whatever else matches. Because a broker delivers one copy per
//! matching subscription, the `in` filters of one broker must not overlap unless one covers
//! the other ([`Rules::new`] refuses that); a covered filter is not subscribed on its own.
//! A broker without rules has one `both` rule per `[bridge] topics` filter, without prefixes.

/// Which way a rule lets messages through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From the broker into the mesh.
    In,
    /// From the mesh to the broker.
    Out,
    /// Both ways (the default).
    #[default]
    Both,
}

impl Direction {
    fn inbound(self) -> bool {
        self != Direction::Out
    }

    fn outbound(self) -> bool {
        self != Direction::In
    }
}

/// One rule as written: a `[[broker.rule]]` table, an element of an add request's `rules`,
/// or a `--topic` line; persisted with a broker added at run time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Topic filter, relative to the prefixes.
    pub filter: String,
    /// `in`, `out` or `both` (default).
    #[serde(default)]
    pub direction: Direction,
    /// QoS cap (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// Prefix of the broker's topics (mosquitto's remote prefix).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub broker_prefix: String,
    /// Prefix of the same topics in the mesh (mosquitto's local prefix).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mesh_prefix: String,
}

/// Why a mosquitto `topic` line (or a line of words) cannot be read: one line saying what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LineError(pub String);

impl RuleSpec {
    /// A mosquitto `topic` line's arguments: `pattern [in|out|both] [qos] [local remote]`, with
    /// mosquitto's defaults (`out`, QoS 0); words in double quotes (`""` is empty).
    pub fn from_mosquitto(line: &str) -> Result<Self, LineError> {
        let w = words(line)?;
        let filter = w
            .first()
            .cloned()
            .ok_or_else(|| LineError("empty topic line".into()))?;
        let direction = match w.get(1).map(String::as_str) {
            None | Some("out") => Direction::Out,
            Some("in") => Direction::In,
            Some("both") => Direction::Both,
            Some(other) => {
                return Err(LineError(format!(
                    "direction {other:?}: expected in, out or both"
                )));
            }
        };
        let qos = match w.get(2) {
            None => 0,
            Some(q) => q
                .parse()
                .map_err(|_| LineError(format!("QoS {q:?}: expected 0, 1 or 2")))?,
        };
        if w.len() == 4 || w.len() > 5 {
            return Err(LineError(
                "expected `pattern [direction [qos [local-prefix remote-prefix]]]`".into(),
            ));
        }
        Ok(RuleSpec {
            filter,
            direction,
            qos: Some(qos),
            mesh_prefix: w.get(3).cloned().unwrap_or_default(),
            broker_prefix: w.get(4).cloned().unwrap_or_default(),
        })
    }

    fn rule(&self) -> Rule {
        Rule {
            filter: self.filter.clone(),
            direction: self.direction,
            qos: self.qos.unwrap_or(2),
            broker_prefix: self.broker_prefix.clone(),
            mesh_prefix: self.mesh_prefix.clone(),
        }
    }
}

/// Splits a line into words; double quotes group (`""` is an empty word).
pub(crate) fn words(line: &str) -> Result<Vec<String>, LineError> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(ch) => word.push(ch),
                    None => return Err(LineError("unclosed quote".into())),
                }
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                word.push(ch);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

/// One rule of one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Topic filter, relative to the prefixes.
    pub(crate) filter: String,
    /// Which way it lets messages through.
    pub(crate) direction: Direction,
    /// Highest QoS forwarded through it.
    pub(crate) qos: u8,
    /// Prefix of the broker's topics.
    pub(crate) broker_prefix: String,
    /// Prefix of the same topics in the mesh.
    pub(crate) mesh_prefix: String,
}

/// A topic mapped by a rule, with the rule's QoS cap. Borrowed when no prefix changes it (no
/// allocation on the common path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapped<'a> {
    /// The topic on the other side.
    pub(crate) topic: std::borrow::Cow<'a, str>,
    /// Highest QoS through this rule.
    pub(crate) qos_cap: u8,
}

/// Why a broker's rules are refused (`rule` is its index); [`RuleError::key`] names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RuleError {
    /// The filter is not a valid MQTT filter.
    #[error("{filter:?}: {why}")]
    Filter {
        /// The rule.
        rule: usize,
        /// Its filter.
        filter: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A prefix that would make invalid topics (a wildcard, NUL) or map traffic into the
    /// mesh's control topics.
    #[error("{prefix:?}: {why}")]
    Prefix {
        /// The rule.
        rule: usize,
        /// `broker_prefix` or `mesh_prefix`.
        key: &'static str,
        /// The prefix.
        prefix: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The QoS cap is not 0, 1 or 2.
    #[error("{qos}: must be 0, 1 or 2")]
    Qos {
        /// The rule.
        rule: usize,
        /// The value.
        qos: u8,
    },
    /// Two `in` filters overlap and neither covers the other: a message matching both would
    /// arrive twice.
    #[error(
        "{a:?} and rule[{second}] ({b:?}) take overlapping topics from the broker and neither covers the other: a message on both would arrive twice; narrow one, or make one cover the other"
    )]
    Overlap {
        /// The earlier rule.
        first: usize,
        /// Its subscription.
        a: String,
        /// The later rule.
        second: usize,
        /// Its subscription.
        b: String,
    },
}

impl RuleError {
    /// The key at fault, relative to the broker: `rule[1].filter`, `rule[0]`…
    pub(crate) fn key(&self) -> String {
        match self {
            RuleError::Filter { rule, .. } => format!("rule[{rule}].filter"),
            RuleError::Prefix { rule, key, .. } => format!("rule[{rule}].{key}"),
            RuleError::Qos { rule, .. } => format!("rule[{rule}].qos"),
            RuleError::Overlap { first, .. } => format!("rule[{first}]"),
        }
    }
}

/// The rules of one broker, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// The rules of `specs` (none: `filters` both ways), checked like [`Rules::new`].
    pub(crate) fn from_specs(specs: &[RuleSpec], filters: &[String]) -> Result<Self, RuleError> {
        if specs.is_empty() {
            return Ok(Self::everything(filters));
        }
        Self::new(specs.iter().map(RuleSpec::rule).collect())
    }

    /// Checks `rules`: valid filters, no wildcard in a prefix, QoS caps 0-2, and `in` filters
    /// that overlap only where one covers the other.
    pub(crate) fn new(rules: Vec<Rule>) -> Result<Self, RuleError> {
        for (i, r) in rules.iter().enumerate() {
            check_filter(&r.filter).map_err(|why| RuleError::Filter {
                rule: i,
                filter: r.filter.clone(),
                why,
            })?;
            for (key, prefix) in [
                ("broker_prefix", &r.broker_prefix),
                ("mesh_prefix", &r.mesh_prefix),
            ] {
                if let Err(why) = check_prefix(prefix) {
                    return Err(RuleError::Prefix {
                        rule: i,
                        key,
                        prefix: prefix.clone(),
                        why,
                    });
                }
            }
            if r.qos > 2 {
                return Err(RuleError::Qos {
                    rule: i,
                    qos: r.qos,
                });
            }
        }
        let inbound: Vec<(usize, String)> = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.direction.inbound())
            .map(|(i, r)| (i, format!("{}{}", r.broker_prefix, r.filter)))
            .collect();
        for (n, (i, a)) in inbound.iter().enumerate() {
            for (j, b) in &inbound[n + 1..] {
                if overlap(a, b) && !covers(a, b) && !covers(b, a) {
                    return Err(RuleError::Overlap {
                        first: *i,
                        a: a.clone(),
                        second: *j,
                        b: b.clone(),
                    });
                }
            }
        }
        Ok(Self { rules })
    }

    /// The rules of a broker that has none: every filter both ways, no prefixes, no cap.
    /// The filters were checked by the config.
    pub(crate) fn everything(filters: &[String]) -> Self {
        Self {
            rules: filters
                .iter()
                .map(|f| Rule {
                    filter: f.clone(),
                    direction: Direction::Both,
                    qos: 2,
                    broker_prefix: String::new(),
                    mesh_prefix: String::new(),
                })
                .collect(),
        }
    }

    /// What to subscribe on the broker: the `in` filters with their prefixes, without those
    /// another one covers, in rule order.
    pub(crate) fn subscriptions(&self) -> Vec<String> {
        uncovered(
            self.rules
                .iter()
                .filter(|r| r.direction.inbound())
                .map(|r| format!("{}{}", r.broker_prefix, r.filter))
                .collect(),
        )
    }

    /// What to subscribe for a snapshot of the broker's retained messages (see
    /// [`crate::reconcile`]): the broker side of every rule, whatever its direction, without
    /// those another one covers.
    pub(crate) fn snapshot_filters(&self) -> Vec<String> {
        uncovered(
            self.rules
                .iter()
                .map(|r| format!("{}{}", r.broker_prefix, r.filter))
                .collect(),
        )
    }

    /// The mesh topic of the broker's `topic`, by the first rule of any direction that
    /// matches it (a retained message the broker holds, whichever way it came).
    pub(crate) fn to_mesh<'a>(&self, topic: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        self.rules
            .iter()
            .find_map(|r| map(r, topic, &r.broker_prefix, &r.mesh_prefix))
            .map(|m| m.topic)
    }

    /// A message the broker sent on `topic`: its mesh topic and QoS cap, by the first `in`
    /// rule that matches; `None` when no rule takes it.
    pub(crate) fn inbound<'a>(&self, topic: &'a str) -> Option<Mapped<'a>> {
        self.rules
            .iter()
            .filter(|r| r.direction.inbound())
            .find_map(|r| map(r, topic, &r.broker_prefix, &r.mesh_prefix))
    }

    /// A mesh message on `topic` for this broker: its topic there and QoS cap, by the first
    /// `out` rule that matches; `None` when the broker does not take it.
    pub(crate) fn outbound<'a>(&self, topic: &'a str) -> Option<Mapped<'a>> {
        self.rules
            .iter()
            .filter(|r| r.direction.outbound())
            .find_map(|r| map(r, topic, &r.mesh_prefix, &r.broker_prefix))
    }
}

/// `all` without the filters another one covers (of two equal ones, the first stays), in order.
fn uncovered(all: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, f) in all.iter().enumerate() {
        let covered = all
            .iter()
            .enumerate()
            .any(|(j, g)| j != i && covers(g, f) && (!covers(f, g) || j < i));
        if !covered && !out.contains(f) {
            out.push(f.clone());
        }
    }
    out
}

/// `topic` through `rule` from the side with prefix `from` to the side with prefix `to`.
fn map<'a>(rule: &Rule, topic: &'a str, from: &str, to: &str) -> Option<Mapped<'a>> {
    // Most rules have no prefix: nothing to strip or to add. (Stripping "" and comparing two
    // empty prefixes called `memcmp` twice per message and target: 2 % of the bridge's time
    // at a steady rate, the largest single symbol in its profile.)
    let rest = if from.is_empty() {
        topic
    } else {
        topic.strip_prefix(from)?
    };
    // `from + filter` matches `topic` exactly when `filter` matches the rest; the rule on `$`
    // topics looks at the topic's first level, which is the rest's only without a prefix.
    let matched = if from.is_empty() {
        matches(&rule.filter, rest)
    } else {
        matches_levels(&rule.filter, rest)
    };
    if !matched {
        return None;
    }
    let same = from.len() == to.len() && (from.is_empty() || from == to);
    let topic = if same {
        std::borrow::Cow::Borrowed(topic)
    } else {
        std::borrow::Cow::Owned(format!("{to}{rest}"))
    };
    Some(Mapped {
        topic,
        qos_cap: rule.qos,
    })
}

/// The mesh's control topics (`$meshbridge/<id>/...`, see `topics`): no rule may take traffic
/// from them or map traffic into them.
use crate::topics::ROOT as CONTROL_ROOT;

/// Checks a rule's prefix: no wildcard, no NUL, not into the mesh's control topics.
fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.contains(['+', '#']) {
        return Err("a prefix cannot contain '+' or '#'");
    }
    if prefix.contains('\0') {
        return Err("a prefix cannot contain NUL (U+0000): MQTT forbids it in topics");
    }
    if prefix.starts_with(CONTROL_ROOT) {
        return Err(
            "a prefix cannot map topics into $meshbridge/: those are the mesh's control records",
        );
    }
    Ok(())
}

/// Checks an MQTT topic filter as a bridge subscribes it: valid, no NUL, not a shared
/// subscription (a bridge must see every message), not the mesh's control topics.
pub(crate) fn check_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("empty filter");
    }
    if filter.contains('\0') {
        return Err("a filter cannot contain NUL (U+0000): MQTT forbids it");
    }
    if filter.starts_with("$share/") || filter.starts_with("$queue/") {
        return Err(
            "a shared subscription would see only part of the broker's messages: bridge the plain filter",
        );
    }
    if filter.starts_with(CONTROL_ROOT) {
        return Err("$meshbridge/ holds the mesh's control records: it cannot be bridged");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("'#' must be a whole level and the last one");
        }
        if level.contains('+') && *level != "+" {
            return Err("'+' must be a whole level");
        }
    }
    Ok(())
}

/// Whether `topic` matches `filter` (MQTT 3.1.1/5 rules: `+` one level, `#` the rest and the
/// parent level, and a leading wildcard does not match a topic that starts with `$`).
pub(crate) fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    matches_levels(filter, topic)
}

/// [`matches`] without the rule on `$` topics.
fn matches_levels(filter: &str, topic: &str) -> bool {
    if filter == "#" {
        // The default rule, asked per message and target: no need to split the topic.
        return true;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a filter starting with a wildcard meets one starting with a `$` level: it does not
/// (a leading wildcard never matches a `$` topic).
fn dollar_apart(wild: &str, other: &str) -> bool {
    wild.starts_with(['+', '#']) && other.starts_with('$')
}

/// Whether some topic matches both filters.
fn overlap(a: &str, b: &str) -> bool {
    if dollar_apart(a, b) || dollar_apart(b, a) {
        return false;
    }
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic that matches `b` matches `a`.
fn covers(a: &str, b: &str) -> bool {
    if dollar_apart(a, b) {
        return false;
    }
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests;
