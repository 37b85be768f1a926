//! `bridge.toml`: serde structs with defaults, then `validate()` into a [`Config`] whose every
//! value has been checked (addresses parsed, certificate files loaded, secrets read).
//!
//! Every error is one line that names the key at fault, e.g.
//! `broker[2].address: "10.0.0.3:88x3": invalid port`. Unknown keys are errors (`deny_unknown_fields`).
//! Relative paths are resolved against the directory of the config file, so a systemd unit or a
//! container can start the bridge from any working directory.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::message::Protocol;
use crate::tls;

mod address;
mod broker;
mod file;

pub use address::parse_address;
pub(crate) use address::valid_name;
use address::{is_loopback_host, is_this_host};
pub use broker::BrokerConfig;
use file::resolve;
pub(crate) use file::{BrokerSection, FileConfig, TlsSection};

/// Upper bound of `bridge.worker_threads`.
pub(crate) const MAX_WORKER_THREADS: usize = 256;

/// An error in the configuration: the key (or file) at fault and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message, folded onto one line.
        message: String,
    },
    /// A key has a value that is not acceptable.
    #[error("{key}: {message}")]
    Invalid {
        /// The key at fault, e.g. `broker[1].address` or `tls.ca_file`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The admin API's port when `bridge.admin_listen` (or the CLI's `--admin`) names none.
pub const DEFAULT_ADMIN_PORT: u16 = 9183;

/// `bridge.admin_listen` when the file has none (and the CLI's `--admin` default): loopback.
pub fn default_admin_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::from([127, 0, 0, 1]), DEFAULT_ADMIN_PORT)
}

/// Whether a broker is dialled over TLS when its `tls` key (or an add request's) says nothing.
pub(crate) const DEFAULT_TLS: bool = true;

/// Links a thread takes before the next thread is used, by default (`bridge.links_per_thread`).
/// Measured on 2 cores shared with the brokers (docs/BENCHMARKS.md, "link threads"): 3 links on
/// one thread cost 20-30 % less CPU per message than 3 spread over two, and 8 links on one
/// thread fall behind.
pub(crate) const LINKS_PER_THREAD: usize = 4;

/// Default time between end-to-end probes (`bridge.probe_interval`).
pub(crate) const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Default cap of a link's in-flight window (`inflight_max`): 8192 messages cover a path of
/// 100 ms at 40 000 msg/s with the window's headroom; the slots it takes in the MQTT client are
/// allocated only as the window grows into them.
pub(crate) const DEFAULT_INFLIGHT_MAX: u16 = 8192;

/// Default `publish_connections`: while an MQTT 5 broker's Receive Maximum holds a long path
/// back, a link publishes on its own connection and three more (see `link::spread`): four
/// times the broker's Receive Maximum per round trip.
pub(crate) const DEFAULT_PUBLISH_CONNECTIONS: u8 = 4;

/// Most `publish_connections`: every one is a client of the broker, and every message
/// published on one of the extra connections comes back on the link's subscription.
pub(crate) const MAX_PUBLISH_CONNECTIONS: u8 = 16;

impl From<crate::tls::TlsError> for ConfigError {
    fn from(e: crate::tls::TlsError) -> Self {
        ConfigError::Invalid {
            key: e.key,
            message: e.message,
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Origin tag and client-id prefix.
    pub(crate) bridge_id: String,
    /// This process's name within the mesh (see [`crate::ha`]).
    pub(crate) instance: String,
    /// The brokers this process prefers to consume, before the rendezvous (see [`crate::ha`]).
    pub(crate) prefer: Vec<String>,
    /// MQTT 5 Will Delay of the instance records' Wills.
    pub(crate) will_delay: Duration,
    /// Coordinate with the mesh's other processes (see [`crate::ha`]).
    pub(crate) ha: bool,
    /// The brokers' per-client queue limit (mosquitto `max_queued_messages`; 0: none): a park
    /// session nearing it is reported.
    pub(crate) broker_queue_limit: u64,
    /// Admin API address.
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin API, when configured.
    pub admin_token: Option<Secret>,
    /// The mesh key (`mesh_key_file`), when configured (see [`crate::seal`]).
    pub(crate) mesh_key: Option<crate::seal::MeshKey>,
    /// Directory for persisted state.
    pub(crate) data_dir: PathBuf,
    /// Filters subscribed on every broker.
    pub(crate) topics: Vec<String>,
    /// TTL of the dedup window of 3.1.1 links.
    pub(crate) dedup_window: Duration,
    /// Bound on the entries of one dedup window.
    pub(crate) dedup_max_entries: usize,
    /// Session expiry asked of MQTT 5 brokers.
    pub(crate) session_expiry: Duration,
    /// MQTT keep-alive.
    pub(crate) keep_alive: Duration,
    /// Unacknowledged messages one link keeps in flight towards its broker on a short path: the
    /// floor of its window (see `link::window`).
    pub(crate) inflight: u16,
    /// The cap of a link's window: on a long path the window grows to the path's
    /// bandwidth-delay product, up to this (and the broker's Receive Maximum). Also the Receive
    /// Maximum the links announce (MQTT 5): an origin's window spans its farthest target's path.
    pub(crate) inflight_max: u16,
    /// Connections a link publishes on while an MQTT 5 broker's Receive Maximum holds a long
    /// path back: its own and `publish_connections - 1` more (see `link::spread`); 1: its own.
    pub(crate) publish_connections: u8,
    /// The first of those extra connections speaks MQTT 3.1.1, which sets no limit on what a
    /// client has in flight, and carries the QoS 1 messages that need nothing of MQTT 5
    /// (see `link::spread`).
    pub(crate) v311_lane: bool,
    /// Messages one target may hold in memory.
    pub(crate) queue_capacity: usize,
    /// Threads that run the links (`link::threads`); `None`: one per CPU core.
    pub(crate) worker_threads: Option<usize>,
    /// Links one thread takes before the next thread is used.
    pub(crate) links_per_thread: usize,
    /// How long shutdown waits for in-flight messages.
    pub(crate) drain_timeout: Duration,
    /// Identical messages from one broker within 10 s before repeats are dropped (0: off).
    pub(crate) storm_threshold: u32,
    /// Time between end-to-end probes (zero: off; see [`crate::probe`]).
    pub(crate) probe_interval: Duration,
    /// A pair without a probe for this long is stalled.
    pub(crate) probe_stall_after: Duration,
    /// Time between reconciliations of the retained messages (zero: off).
    pub(crate) reconcile_interval: Duration,
    /// Retained messages one broker's snapshot may hold (reconcile, a broker added).
    pub(crate) retained_max: usize,
    /// Bytes those may take.
    pub(crate) retained_max_bytes: u64,
    /// Bounds and overflow policy of each target's spool.
    pub(crate) spool: crate::spool::Limits,
    /// `[tls]` defaults, kept to build brokers added at run time.
    pub(crate) tls_defaults: TlsSection,
    /// Directory of the config file (relative paths are resolved against it).
    pub(crate) base_dir: PathBuf,
    /// The brokers, in file order.
    pub brokers: Vec<BrokerConfig>,
    /// Settings that work but weaken security (a token file others can read…), one line each:
    /// printed by `check`, logged at start. Each broker's own are in [`BrokerConfig::warnings`].
    pub(crate) warnings: Vec<String>,
}

impl Config {
    /// Every warning: the bridge's and each broker's.
    pub fn all_warnings(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        // A `[tls]` file is every broker's: said once.
        for w in self
            .warnings
            .iter()
            .chain(self.brokers.iter().flat_map(|b| &b.warnings))
        {
            if !all.contains(w) {
                all.push(w.clone());
            }
        }
        all
    }
}

/// A warning when the secret file at `path` (for `key`) can be read by other users, as ssh
/// warns of a private key: it should be mode 0600 (or 0400). Read access for the file's group
/// is no warning when that group is the process's own (a Kubernetes Secret mounted with
/// `fsGroup`, a service user's own group).
fn loose_permissions(key: &str, path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(path).ok()?;
        let mode = meta.permissions().mode() & 0o777;
        let own_group = effective_gid() == Some(meta.gid());
        let loose = if own_group { 0o007 } else { 0o077 };
        (mode & loose != 0).then(|| {
            format!(
                "{key}: {} can be read by other users (mode {mode:04o}): chmod 600 it",
                path.display()
            )
        })
    }
    #[cfg(not(unix))]
    {
        let _ = (key, path);
        None
    }
}

/// This process's effective group id, from /proc (Linux); `None` where it cannot be read.
fn effective_gid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Gid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// A secret (password, token) that never shows in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself; call only where it is sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::from_toml(&text, path, &base_dir)
    }

    /// Parses and validates TOML text; `path` only names the file in errors.
    pub(crate) fn from_toml(
        text: &str,
        path: &Path,
        base_dir: &Path,
    ) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: one_line(&e.to_string()),
        })?;
        file.validate(base_dir)
    }
}

fn one_line(message: &str) -> String {
    // toml's messages span several lines: location, a source excerpt with a caret, the reason.
    // Keep all three on one line: "line 3, column 12: `inflight = "lots"`: invalid type …".
    let mut location = String::new();
    let mut source = None;
    let mut reason = Vec::new();
    for line in message.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if location.is_empty() {
            location = line.to_string();
        } else if let Some((num, text)) = line.split_once('|') {
            let num = num.trim();
            if !num.is_empty() && num.chars().all(|c| c.is_ascii_digit()) {
                source = Some(text.trim().to_string());
            }
        } else {
            reason.push(line.to_string());
        }
    }
    let mut out = location;
    if let Some(src) = source.filter(|s| !s.is_empty()) {
        out.push_str(&format!(": `{src}`"));
    }
    if !reason.is_empty() {
        out.push_str(&format!(": {}", reason.join(" ")));
    }
    out
}

/// Reads the first line of a secret file.
pub(crate) fn read_secret(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    let line = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string();
    if line.is_empty() {
        return Err(invalid(key, format!("{}: file is empty", path.display())));
    }
    Ok(Secret(line))
}

impl Config {
    /// What differs in `new` that a reload cannot apply (process-wide keys: everything but the
    /// `[[broker]]` list, whose additions, removals, rules and connection settings a reload
    /// applies), as config keys: `bridge.id`, `tls`… Empty when `new` can be applied.
    pub(crate) fn changes_needing_restart(&self, new: &Config) -> Vec<String> {
        let mut keys = Vec::new();
        macro_rules! check {
            ($($field:ident => $key:literal,)*) => {
                $(if self.$field != new.$field {
                    keys.push($key.to_string());
                })*
            };
        }
        check! {
            bridge_id => "bridge.id",
            admin_listen => "bridge.admin_listen",
            admin_token => "bridge.admin_token_file",
            mesh_key => "bridge.mesh_key_file",
            data_dir => "bridge.data_dir",
            topics => "bridge.topics",
            dedup_window => "bridge.dedup_window",
            dedup_max_entries => "bridge.dedup_max_entries",
            session_expiry => "bridge.session_expiry",
            keep_alive => "bridge.keep_alive",
            instance => "bridge.instance",
            prefer => "bridge.prefer",
            will_delay => "bridge.will_delay",
            ha => "bridge.ha",
            broker_queue_limit => "bridge.broker_queue_limit",
            inflight => "bridge.inflight",
            inflight_max => "bridge.inflight_max",
            publish_connections => "bridge.publish_connections",
            v311_lane => "bridge.v311_lane",
            queue_capacity => "bridge.queue_capacity",
            worker_threads => "bridge.worker_threads",
            links_per_thread => "bridge.links_per_thread",
            drain_timeout => "bridge.drain_timeout",
            storm_threshold => "bridge.storm_threshold",
            retained_max => "bridge.retained_max",
            probe_interval => "bridge.probe_interval",
            probe_stall_after => "bridge.probe_stall_after",
            reconcile_interval => "bridge.reconcile_interval",
            retained_max_bytes => "bridge.retained_max_bytes",
            spool => "bridge.spool_*",
            tls_defaults => "tls",
        }
        // A broker's own settings (address, protocol, TLS, credentials, max_qos, drain_rate)
        // restart that broker's link (see `Supervisor::reload`).
        keys
    }
}

/// One thing a reload of the config file changes (see [`diff`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// A process-wide setting changed (its key): the reload is refused as a whole.
    NeedsRestart(String),
    /// A broker appeared in the file.
    Add(String),
    /// A broker left the file.
    Remove(String),
    /// A broker's topic rules changed: applied in place.
    Rules(String),
    /// A broker's connection settings changed (the keys): its link restarts with them.
    Restart(String, Vec<&'static str>),
}

/// What a reload from `old` to `new` changes, per key and broker: process-wide keys first, then
/// per broker of `new` (in file order) its rules before its restart, additions, and last the
/// brokers that left. Pure: the supervisor applies it (with what was changed at run time,
/// which takes precedence).
pub(crate) fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut changes: Vec<Change> = old
        .changes_needing_restart(new)
        .into_iter()
        .map(Change::NeedsRestart)
        .collect();
    for b in &new.brokers {
        match old.brokers.iter().find(|o| o.name == b.name) {
            Some(o) => {
                if o.rules != b.rules {
                    changes.push(Change::Rules(b.name.clone()));
                }
                let keys = o.changed_keys(b);
                if !keys.is_empty() {
                    changes.push(Change::Restart(b.name.clone(), keys));
                }
            }
            None => changes.push(Change::Add(b.name.clone())),
        }
    }
    for o in &old.brokers {
        if !new.brokers.iter().any(|b| b.name == o.name) {
            changes.push(Change::Remove(o.name.clone()));
        }
    }
    changes
}

#[cfg(test)]
mod tests;
