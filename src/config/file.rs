//! The config file as written (serde structs, unknown keys refused) and its validation into a
//! [`Config`], every error naming its key.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::*;

/// The file as written: `[bridge]`, `[tls]` and `[[broker]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    /// `[bridge]`: identity and process-wide settings.
    pub(crate) bridge: BridgeSection,
    /// `[tls]`: defaults for every broker.
    #[serde(default)]
    pub(crate) tls: TlsSection,
    /// `[[broker]]`: the initial members of the mesh.
    #[serde(default, rename = "broker")]
    pub(crate) brokers: Vec<BrokerSection>,
}

/// `[bridge]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BridgeSection {
    /// Origin tag and client-id prefix.
    pub(crate) id: String,
    /// This process's name within the mesh (default: the host name).
    pub(crate) instance: Option<String>,
    /// The brokers this process prefers to consume (its own site's).
    pub(crate) prefer: Option<Vec<String>>,
    /// MQTT 5 Will Delay of the instance records' Wills.
    pub(crate) will_delay: Option<String>,
    /// Coordinate with other processes of the mesh (default true).
    pub(crate) ha: Option<bool>,
    /// The brokers' per-client queue limit (mosquitto `max_queued_messages`), 0: none.
    pub(crate) broker_queue_limit: Option<u64>,
    /// Admin API address (`/healthz`, `/readyz`, `/metrics`).
    pub(crate) admin_listen: Option<String>,
    /// File holding the bearer token; required when `admin_listen` is not loopback.
    pub(crate) admin_token_file: Option<PathBuf>,
    /// File holding the mesh key (see [`crate::seal`]): authenticates the control plane and
    /// derives the client ids.
    pub(crate) mesh_key_file: Option<PathBuf>,
    /// Where membership and spool live.
    pub(crate) data_dir: Option<PathBuf>,
    /// Filters subscribed on every broker.
    pub(crate) topics: Option<Vec<String>>,
    /// How long a message published on a 3.1.1 link waits for its echo.
    pub(crate) dedup_window: Option<String>,
    /// Bound on the entries of one link's dedup window.
    pub(crate) dedup_max_entries: Option<usize>,
    /// Session expiry asked of MQTT 5 brokers.
    pub(crate) session_expiry: Option<String>,
    /// MQTT keep-alive.
    pub(crate) keep_alive: Option<String>,
    /// Messages one link keeps in flight to its broker on a short path (the window's floor).
    pub(crate) inflight: Option<u16>,
    /// The most messages one link keeps in flight (the window's cap).
    pub(crate) inflight_max: Option<u16>,
    /// Connections a link publishes on while an MQTT 5 broker's Receive Maximum holds a long
    /// path back (its own and the rest opened for it).
    pub(crate) publish_connections: Option<u8>,
    /// Whether the first of those extra connections speaks MQTT 3.1.1 (no Receive Maximum).
    pub(crate) v311_lane: Option<bool>,
    /// Messages one target may hold in memory while it is down or slow.
    pub(crate) queue_capacity: Option<usize>,
    /// Threads that run the links (read at start; a reload does not change it).
    pub(crate) worker_threads: Option<usize>,
    /// Links one thread takes before the next thread is used (read at start).
    pub(crate) links_per_thread: Option<usize>,
    /// How long shutdown waits for in-flight messages.
    pub(crate) drain_timeout: Option<String>,
    /// Identical messages from one broker within 10 s before the storm guard drops repeats.
    pub(crate) storm_threshold: Option<u32>,
    /// Time between end-to-end probes (`"0s"`: off).
    pub(crate) probe_interval: Option<String>,
    /// A pair without a probe for this long is stalled (default: 3 probe intervals).
    pub(crate) probe_stall_after: Option<String>,
    /// Time between reconciliations of the brokers' retained messages (`"0s"`: off).
    pub(crate) reconcile_interval: Option<String>,
    /// Retained messages one broker's snapshot may hold.
    pub(crate) retained_max: Option<usize>,
    /// Bytes those may take (`"64 MiB"`, or a number of bytes).
    pub(crate) retained_max_bytes: Option<SizeValue>,
    /// Bound of one target's spool in bytes (`"1 GiB"`, or a number of bytes).
    pub(crate) spool_max_bytes: Option<SizeValue>,
    /// Bound of one target's spool in messages.
    pub(crate) spool_max_messages: Option<u64>,
    /// `drop_oldest` or `block`.
    pub(crate) spool_overflow: Option<String>,
}

/// A byte size as written: a number of bytes or a string with a unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// `"512 MiB"`, `"1GB"`…
    Text(String),
}

/// `[tls]` or the TLS keys of one `[[broker]]`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    /// PEM file with the CA certificates that sign the brokers' certificates.
    pub(crate) ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mTLS.
    pub(crate) cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub(crate) key_file: Option<PathBuf>,
    /// Name to verify in the broker's certificate (and to send as SNI) instead of the address host.
    pub(crate) server_name: Option<String>,
    /// Accept any broker certificate. For labs only.
    pub(crate) insecure_skip_verify: Option<bool>,
}

/// `[[broker]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BrokerSection {
    /// Name used in logs, metrics, the client id and the origin tag. Default: from the address.
    pub(crate) name: Option<String>,
    /// `host:port`; the port defaults to 8883 with TLS and 1883 without.
    pub(crate) address: String,
    /// `v5` (default) or `v3.1.1`.
    pub(crate) protocol: Option<Protocol>,
    /// `false` for plain TCP.
    pub(crate) tls: Option<bool>,
    /// Per-broker override of `[tls].ca_file`.
    pub(crate) ca_file: Option<PathBuf>,
    /// Per-broker override of `[tls].cert_file`.
    pub(crate) cert_file: Option<PathBuf>,
    /// Per-broker override of `[tls].key_file`.
    pub(crate) key_file: Option<PathBuf>,
    /// Per-broker override of `[tls].server_name`.
    pub(crate) server_name: Option<String>,
    /// Per-broker override of `[tls].insecure_skip_verify`.
    pub(crate) insecure_skip_verify: Option<bool>,
    /// MQTT user name.
    pub(crate) username: Option<String>,
    /// File whose first line is the MQTT password.
    pub(crate) password_file: Option<PathBuf>,
    /// Highest QoS forwarded to this broker (0, 1 or 2; default 2).
    pub(crate) max_qos: Option<u8>,
    /// Most messages per second published to this broker while it has a backlog in the spool
    /// (none: as fast as it acknowledges them).
    pub(crate) drain_rate: Option<u32>,
    /// Topic rules (`[[broker.rule]]`); none: `[bridge] topics` both ways.
    #[serde(default, rename = "rule")]
    pub(crate) rules: Vec<crate::rules::RuleSpec>,
}

impl FileConfig {
    /// Checks every value and builds the runtime [`Config`].
    pub(crate) fn validate(self, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut b = self.bridge;
        if !valid_name(&b.id) {
            return Err(invalid(
                "bridge.id",
                format!("{:?}: use 1-64 characters from A-Z a-z 0-9 - _ .", b.id),
            ));
        }
        let mut warnings = Vec::new();
        let (admin_listen, admin_token, mesh_key) = b.access(base_dir, &mut warnings)?;
        let t = b.timings()?;
        let topics = b.topics.take().unwrap_or_else(|| vec!["#".to_string()]);
        check_topics(&topics)?;
        let n = b.counts()?;
        let prefer = b.prefer()?;
        let spool = spool_limits(b.spool_max_bytes, b.spool_max_messages, b.spool_overflow)?;
        let instance = b.instance.unwrap_or_else(default_instance);
        if !valid_name(&instance) {
            return Err(invalid(
                "bridge.instance",
                format!("{instance:?}: use 1-64 characters from A-Z a-z 0-9 - _ ."),
            ));
        }
        let mut config = Config {
            prefer,
            spool,
            probe_interval: t.probe_interval,
            probe_stall_after: t.probe_stall_after,
            reconcile_interval: t.reconcile_interval,
            bridge_id: b.id,
            instance,
            will_delay: t.will_delay,
            ha: b.ha.unwrap_or(true),
            broker_queue_limit: b.broker_queue_limit.unwrap_or(1000),
            admin_listen,
            admin_token,
            mesh_key,
            data_dir: resolve(base_dir, b.data_dir.as_deref().unwrap_or(Path::new("data"))),
            topics,
            dedup_window: parse_duration(
                "bridge.dedup_window",
                b.dedup_window.as_deref(),
                Duration::from_secs(30),
            )?,
            dedup_max_entries: n.dedup_max_entries,
            session_expiry: t.session_expiry,
            keep_alive: t.keep_alive,
            inflight: n.inflight,
            inflight_max: n.inflight_max,
            publish_connections: n.publish_connections,
            v311_lane: b.v311_lane.unwrap_or(true),
            queue_capacity: n.queue_capacity,
            worker_threads: n.worker_threads,
            links_per_thread: n.links_per_thread,
            drain_timeout: parse_duration(
                "bridge.drain_timeout",
                b.drain_timeout.as_deref(),
                Duration::from_secs(5),
            )?,
            storm_threshold: b.storm_threshold.unwrap_or(1000),
            retained_max: b.retained_max.unwrap_or(100_000),
            retained_max_bytes: parse_size(
                "bridge.retained_max_bytes",
                b.retained_max_bytes,
                64 << 20,
            )?,
            tls_defaults: self.tls,
            base_dir: base_dir.to_path_buf(),
            brokers: Vec::new(),
            warnings,
        };
        config.add_brokers(self.brokers)?;
        config.warn_prefer_unknown();
        Ok(config)
    }
}

impl Config {
    /// A warning for each `bridge.prefer` name that is not a broker of the file (it counts once
    /// a broker of that name is a member).
    fn warn_prefer_unknown(&mut self) {
        for name in &self.prefer {
            if !self.brokers.iter().any(|b| *b.name == **name) {
                self.warnings.push(format!(
                    "bridge.prefer: {name:?} is not a broker of this file (it counts once a broker \
                     of that name is a member)"
                ));
            }
        }
    }
}

impl BridgeSection {
    /// `prefer`: broker names.
    fn prefer(&mut self) -> Result<Vec<String>, ConfigError> {
        let prefer = self.prefer.take().unwrap_or_default();
        if let Some(bad) = prefer.iter().find(|n| !valid_name(n)) {
            return Err(invalid(
                "bridge.prefer",
                format!("{bad:?} is not a broker name (1-64 characters from A-Z a-z 0-9 - _ .)"),
            ));
        }
        Ok(prefer)
    }

    /// The admin API's address and token, and the mesh key; warnings about their files.
    fn access(
        &self,
        base_dir: &Path,
        warnings: &mut Vec<String>,
    ) -> Result<(SocketAddr, Option<Secret>, Option<crate::seal::MeshKey>), ConfigError> {
        let b = self;
        let admin_listen: SocketAddr = match b.admin_listen.as_deref() {
            None => default_admin_listen(),
            Some(text) => text.parse().map_err(|_| {
                invalid(
                    "bridge.admin_listen",
                    format!(
                        "{text:?}: expected IP:port, e.g. \"{}\"",
                        default_admin_listen()
                    ),
                )
            })?,
        };
        let admin_token = match &b.admin_token_file {
            Some(p) => {
                let path = resolve(base_dir, p);
                warnings.extend(loose_permissions("bridge.admin_token_file", &path));
                Some(read_secret("bridge.admin_token_file", &path)?)
            }
            None => None,
        };
        let mesh_key = match &b.mesh_key_file {
            Some(p) => {
                let path = resolve(base_dir, p);
                warnings.extend(loose_permissions("bridge.mesh_key_file", &path));
                Some(
                    crate::seal::MeshKey::load(&path, &b.id)
                        .map_err(|e| invalid("bridge.mesh_key_file", e.to_string()))?,
                )
            }
            None => {
                if b.ha.unwrap_or(true) {
                    warnings.push(format!(
                        "bridge.mesh_key_file is not set: the control records under $meshbridge/{}/ are not authenticated and the mesh's client ids are known, so any client that can publish on a broker, or connect with a chosen client id, can take a broker out of the mesh or discard its sessions; set a key (`bridge mesh-key --out FILE`), or deny `$meshbridge/#` and the `{}-*` client ids to every other user in the brokers' ACL (docs/SECURITY.md)",
                        b.id, b.id
                    ));
                }
                None
            }
        };
        if !admin_listen.ip().is_loopback() && admin_token.is_none() {
            return Err(invalid(
                "bridge.admin_listen",
                format!(
                    "{admin_listen} is not loopback: set bridge.admin_token_file so the API requires a token"
                ),
            ));
        }
        Ok((admin_listen, admin_token, mesh_key))
    }

    /// The durations of `[bridge]`, checked against each other and MQTT's bounds.
    fn timings(&self) -> Result<Timings, ConfigError> {
        let b = self;
        let session_expiry = parse_duration(
            "bridge.session_expiry",
            b.session_expiry.as_deref(),
            Duration::from_secs(7 * 24 * 3600),
        )?;
        if session_expiry.as_secs() > u64::from(u32::MAX) {
            return Err(invalid(
                "bridge.session_expiry",
                "longer than MQTT allows (~136 years)",
            ));
        }
        let keep_alive = parse_duration(
            "bridge.keep_alive",
            b.keep_alive.as_deref(),
            Duration::from_secs(30),
        )?;
        // rumqttc refuses (panics on) an MQTT 5 keep-alive under 5 s.
        if keep_alive < Duration::from_secs(5) || keep_alive.as_secs() > u64::from(u16::MAX) {
            return Err(invalid(
                "bridge.keep_alive",
                "must be between 5s and 65535s",
            ));
        }
        let will_delay =
            parse_duration("bridge.will_delay", b.will_delay.as_deref(), Duration::ZERO)?;
        if will_delay.as_secs() > u64::from(u32::MAX) {
            return Err(invalid("bridge.will_delay", "longer than MQTT allows"));
        }
        let probe_interval = parse_duration(
            "bridge.probe_interval",
            b.probe_interval.as_deref(),
            DEFAULT_PROBE_INTERVAL,
        )?;
        if !probe_interval.is_zero() && probe_interval < Duration::from_millis(100) {
            return Err(invalid(
                "bridge.probe_interval",
                "at least 100ms (or 0s: off)",
            ));
        }
        let probe_stall_after = parse_duration(
            "bridge.probe_stall_after",
            b.probe_stall_after.as_deref(),
            probe_interval * 3,
        )?;
        if !probe_interval.is_zero() && probe_stall_after <= probe_interval {
            return Err(invalid(
                "bridge.probe_stall_after",
                format!(
                    "must be longer than probe_interval ({})",
                    humantime::format_duration(probe_interval)
                ),
            ));
        }
        let reconcile_interval = parse_duration(
            "bridge.reconcile_interval",
            b.reconcile_interval.as_deref(),
            Duration::ZERO,
        )?;
        if !reconcile_interval.is_zero() && reconcile_interval < Duration::from_secs(10) {
            return Err(invalid(
                "bridge.reconcile_interval",
                "at least 10s (or 0s: off)",
            ));
        }
        Ok(Timings {
            session_expiry,
            keep_alive,
            will_delay,
            probe_interval,
            probe_stall_after,
            reconcile_interval,
        })
    }
}

/// The durations of `[bridge]` (see [`BridgeSection::timings`]).
struct Timings {
    session_expiry: Duration,
    keep_alive: Duration,
    will_delay: Duration,
    probe_interval: Duration,
    probe_stall_after: Duration,
    reconcile_interval: Duration,
}

impl Config {
    /// Adds the `[[broker]]` sections, each once by name and by address.
    fn add_brokers(&mut self, sections: Vec<BrokerSection>) -> Result<(), ConfigError> {
        let config = self;
        let mut names = HashSet::new();
        for (i, section) in sections.into_iter().enumerate() {
            let broker = config.broker_from_section(&format!("broker[{i}]"), section)?;
            if !names.insert(broker.name.clone()) {
                return Err(invalid(
                    format!("broker[{i}].name"),
                    format!("{:?} is used by another broker", broker.name),
                ));
            }
            // Without DNS: `check` stays offline. Names are compared resolved when the links
            // start (supervisor).
            let mine = broker.endpoints(false);
            if let Some(other) = config
                .brokers
                .iter()
                .find(|b| b.same_broker(&b.endpoints(false), &broker, &mine))
            {
                return Err(invalid(
                    format!("broker[{i}].address"),
                    format!(
                        "{} is listed twice (also broker {:?}, {})",
                        broker.address(),
                        other.name,
                        other.address()
                    ),
                ));
            }
            config.brokers.push(broker);
        }
        Ok(())
    }
}

/// The `[bridge] topics` filters: at least one, each valid.
fn check_topics(topics: &[String]) -> Result<(), ConfigError> {
    if topics.is_empty() {
        return Err(invalid("bridge.topics", "at least one filter is needed"));
    }
    for (i, t) in topics.iter().enumerate() {
        if let Err(e) = crate::rules::check_filter(t) {
            return Err(invalid(
                format!("bridge.topics[{i}]"),
                format!("{t:?}: {e}"),
            ));
        }
    }
    Ok(())
}

impl BridgeSection {
    /// The counts and sizes of `[bridge]`.
    fn counts(&self) -> Result<Counts, ConfigError> {
        let b = self;
        let inflight = b.inflight.unwrap_or(100);
        if inflight == 0 {
            return Err(invalid("bridge.inflight", "must be at least 1"));
        }
        let inflight_max = b.inflight_max.unwrap_or(DEFAULT_INFLIGHT_MAX.max(inflight));
        if inflight_max < inflight {
            return Err(invalid(
                "bridge.inflight_max",
                format!("{inflight_max} is below bridge.inflight ({inflight})"),
            ));
        }
        let publish_connections = b.publish_connections.unwrap_or(DEFAULT_PUBLISH_CONNECTIONS);
        if !(1..=MAX_PUBLISH_CONNECTIONS).contains(&publish_connections) {
            return Err(invalid(
                "bridge.publish_connections",
                format!(
                    "{publish_connections}: must be between 1 (the link's own connection only) \
                     and {MAX_PUBLISH_CONNECTIONS}"
                ),
            ));
        }
        let queue_capacity = b.queue_capacity.unwrap_or(10_000);
        if queue_capacity == 0 {
            return Err(invalid("bridge.queue_capacity", "must be at least 1"));
        }
        let worker_threads = b.worker_threads;
        if worker_threads.is_some_and(|n| !(1..=MAX_WORKER_THREADS).contains(&n)) {
            return Err(invalid(
                "bridge.worker_threads",
                format!("must be between 1 and {MAX_WORKER_THREADS}"),
            ));
        }
        let links_per_thread = b.links_per_thread.unwrap_or(LINKS_PER_THREAD);
        if links_per_thread == 0 {
            return Err(invalid("bridge.links_per_thread", "must be at least 1"));
        }
        let dedup_max_entries = b.dedup_max_entries.unwrap_or(200_000);
        if dedup_max_entries == 0 {
            return Err(invalid("bridge.dedup_max_entries", "must be at least 1"));
        }
        Ok(Counts {
            inflight,
            inflight_max,
            publish_connections,
            queue_capacity,
            worker_threads,
            links_per_thread,
            dedup_max_entries,
        })
    }
}

/// The counts of `[bridge]` (see [`BridgeSection::counts`]).
struct Counts {
    inflight: u16,
    inflight_max: u16,
    publish_connections: u8,
    queue_capacity: usize,
    worker_threads: Option<usize>,
    links_per_thread: usize,
    dedup_max_entries: usize,
}

pub(super) fn parse_duration(
    key: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            invalid(
                key,
                format!("{text:?}: {e} (expected e.g. \"30s\", \"5m\")"),
            )
        }),
    }
}

pub(super) fn spool_limits(
    max_bytes: Option<SizeValue>,
    max_messages: Option<u64>,
    overflow: Option<String>,
) -> Result<crate::spool::Limits, ConfigError> {
    use crate::spool::{Limits, Overflow};
    let max_bytes = parse_size("bridge.spool_max_bytes", max_bytes, 1 << 30)?;
    if max_bytes < 1024 {
        return Err(invalid("bridge.spool_max_bytes", "must be at least 1 KiB"));
    }
    let max_messages = max_messages.unwrap_or(1_000_000);
    if max_messages == 0 {
        return Err(invalid("bridge.spool_max_messages", "must be at least 1"));
    }
    let overflow = match overflow.as_deref() {
        None => Overflow::default(),
        Some(text) => text
            .parse::<Overflow>()
            .map_err(|e| invalid("bridge.spool_overflow", e.to_string()))?,
    };
    Ok(Limits {
        max_bytes,
        max_messages,
        overflow,
    })
}

/// A byte size of the config (`key`), `default` when absent.
pub(super) fn parse_size(
    key: &str,
    value: Option<SizeValue>,
    default: u64,
) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(SizeValue::Bytes(n)) => Ok(n),
        Some(SizeValue::Text(t)) => {
            t.parse::<bytesize::ByteSize>()
                .map(|b| b.as_u64())
                .map_err(|e| {
                    invalid(
                        key,
                        format!("{t:?}: {e} (expected e.g. \"1 GiB\", \"500MB\")"),
                    )
                })
        }
    }
}

pub(super) fn resolve(base_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

/// The instance name when the config gives none: the host name.
fn default_instance() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| match c {
                    'A'..='Z' | 'a'..='z' | '0'..='9' | '-' | '_' | '.' => c,
                    _ => '-',
                })
                .take(64)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty() && !h.chars().all(|c| c == '.'))
        .unwrap_or_else(|| "bridge".to_string())
}
