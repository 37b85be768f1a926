//! `bridge.toml`: serde structs with defaults, then `validate()` into a [`Config`] whose every
//! value has been checked (addresses parsed, certificate files loaded, secrets read).
//!
//! Every error is one line that names the key at fault, e.g.
//! `broker[2].address: "10.0.0.3:88x3": invalid port`. Unknown keys are errors (`deny_unknown_fields`).
//! Relative paths are resolved against the directory of the config file, so a systemd unit or a
//! container can start the bridge from any working directory.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::message::Protocol;
use crate::tls;

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
    /// Admin API address (`/healthz`, `/readyz`, `/metrics`).
    pub(crate) admin_listen: Option<String>,
    /// File holding the bearer token; required when `admin_listen` is not loopback.
    pub(crate) admin_token_file: Option<PathBuf>,
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
    /// Messages one link may have handed to its broker without an acknowledgement.
    pub(crate) inflight: Option<u16>,
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
    /// Retained messages the bridge remembers for brokers added at run time.
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
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Origin tag and client-id prefix.
    pub(crate) bridge_id: String,
    /// Admin API address.
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin API, when configured.
    pub admin_token: Option<Secret>,
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
    /// Unacknowledged messages one link may have in flight towards its broker.
    pub(crate) inflight: u16,
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
    /// Retained messages remembered for brokers added at run time.
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
/// warns of a private key: it should be mode 0600 (or 0400).
fn loose_permissions(key: &str, path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then(|| {
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

/// One validated broker.
#[derive(Clone)]
pub struct BrokerConfig {
    /// Unique name.
    pub(crate) name: String,
    /// Host name or IP address to dial.
    pub(crate) host: String,
    /// TCP port.
    pub(crate) port: u16,
    /// Protocol version of the link.
    pub(crate) protocol: Protocol,
    /// TLS client configuration; `None` for plain TCP.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT credentials.
    pub(crate) credentials: Option<(String, Secret)>,
    /// Highest QoS forwarded to this broker.
    pub(crate) max_qos: u8,
    /// What `tls` was built from (`None` for plain TCP): to see a change, and to report
    /// `insecure_skip_verify`.
    pub(crate) tls_inputs: Option<TlsInputs>,
    /// Settings of this broker that weaken security, one line each (logged when it starts).
    pub(crate) warnings: Vec<String>,
}

/// The files and settings a broker's TLS client configuration was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsInputs {
    /// CA file.
    pub(crate) ca_file: Option<PathBuf>,
    /// Client certificate and key files (mTLS).
    pub(crate) cert_file: Option<PathBuf>,
    /// Client key file.
    pub(crate) key_file: Option<PathBuf>,
    /// Name verified in the broker's certificate.
    pub(crate) server_name: Option<String>,
    /// Certificate verification off.
    pub(crate) insecure_skip_verify: bool,
}

impl BrokerConfig {
    /// The socket addresses this broker's `host:port` stands for, to tell a second entry for
    /// one broker from a second broker: an IP address canonical (an IPv4-mapped IPv6 address is
    /// its IPv4 address), `localhost` both loopback addresses, and a DNS name, with `resolve`,
    /// what the system resolver answers (nothing when it fails; without `resolve`, nothing).
    pub(crate) fn endpoints(&self, resolve: bool) -> Vec<SocketAddr> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return vec![SocketAddr::new(ip.to_canonical(), self.port)];
        }
        if self.host.eq_ignore_ascii_case("localhost") {
            return vec![
                SocketAddr::new(IpAddr::from([127, 0, 0, 1]), self.port),
                SocketAddr::new(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), self.port),
            ];
        }
        if !resolve {
            return Vec::new();
        }
        use std::net::ToSocketAddrs;
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map(|a| {
                a.map(|s| SocketAddr::new(s.ip().to_canonical(), s.port()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `other` (with its [`Self::endpoints`]) is this broker (with its) again: the
    /// same address text, or an endpoint in common. Two entries that name distinct TLS
    /// `server_name`s may share an endpoint: a proxy routing by SNI to two brokers.
    pub(crate) fn same_broker(
        &self,
        mine: &[SocketAddr],
        other: &BrokerConfig,
        theirs: &[SocketAddr],
    ) -> bool {
        if self.address().eq_ignore_ascii_case(&other.address()) {
            return true;
        }
        let sni = |b: &BrokerConfig| b.tls_inputs.as_ref().and_then(|t| t.server_name.clone());
        if let (Some(a), Some(b)) = (sni(self), sni(other))
            && a != b
        {
            return false;
        }
        mine.iter().any(|e| theirs.contains(e))
    }

    /// The settings of this broker that differ in `new` (a link cannot change them while it
    /// runs), as config keys.
    pub(crate) fn changed_keys(&self, new: &BrokerConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.address() != new.address() {
            keys.push("address");
        }
        if self.protocol != new.protocol {
            keys.push("protocol");
        }
        if self.tls_inputs != new.tls_inputs {
            keys.push("tls");
        }
        if self.credentials != new.credentials {
            keys.push("username/password_file");
        }
        if self.max_qos != new.max_qos {
            keys.push("max_qos");
        }
        keys
    }
    /// `host:port` as given.
    pub(crate) fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("name", &self.name)
            .field("address", &self.address())
            .field("protocol", &self.protocol)
            .field("tls", &self.tls.is_some())
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .field("max_qos", &self.max_qos)
            .finish()
    }
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

fn parse_duration(
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

fn spool_limits(
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
fn parse_size(key: &str, value: Option<SizeValue>, default: u64) -> Result<u64, ConfigError> {
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

fn resolve(base_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
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

/// Whether a broker or API name is acceptable: it lands in client ids, metric labels and paths
/// (so not `.` or `..`, which a URL path or a file path would read as a directory).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.chars().all(|c| c == '.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Splits `host:port` (or `[v6]:port`, or a bare host) into its parts.
pub fn parse_address(text: &str, default_port: u16) -> Result<(String, u16), String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty address".into());
    }
    if text.contains("://") {
        return Err(format!("{text:?}: give host:port without a scheme"));
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: unclosed '[' in IPv6 address"))?;
        match after {
            "" => (host.to_string(), None),
            p if p.starts_with(':') => (host.to_string(), Some(&p[1..])),
            _ => return Err(format!("{text:?}: expected ':port' after ']'")),
        }
    } else if text.matches(':').count() > 1 {
        // A bare IPv6 address without port.
        (text.to_string(), None)
    } else {
        match text.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (text.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{text:?}: missing host"));
    }
    let host_ok = host.parse::<IpAddr>().is_ok()
        || host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !host_ok {
        return Err(format!("{text:?}: invalid host {host:?}"));
    }
    // A name whose last label is all digits is no DNS name (RFC 3696): a mistyped IPv4 address.
    if host.parse::<IpAddr>().is_err()
        && host
            .rsplit('.')
            .next()
            .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!("{text:?}: {host:?} is not a valid IPv4 address"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("{text:?}: invalid port {p:?}")),
            Ok(port) => port,
        },
    };
    Ok((host, port))
}

/// Whether `host` (as written, not resolved) names the address `listen` binds.
fn is_this_host(host: &str, listen: IpAddr) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => {
            ip == listen || (listen.is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
        }
        Err(_) => host == "localhost" && (listen.is_loopback() || listen.is_unspecified()),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

impl FileConfig {
    /// Checks every value and builds the runtime [`Config`].
    pub(crate) fn validate(self, base_dir: &Path) -> Result<Config, ConfigError> {
        let b = self.bridge;
        if !valid_name(&b.id) {
            return Err(invalid(
                "bridge.id",
                format!("{:?}: use 1-64 characters from A-Z a-z 0-9 - _ .", b.id),
            ));
        }
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
        let mut warnings = Vec::new();
        let admin_token = match &b.admin_token_file {
            Some(p) => {
                let path = resolve(base_dir, p);
                warnings.extend(loose_permissions("bridge.admin_token_file", &path));
                Some(read_secret("bridge.admin_token_file", &path)?)
            }
            None => None,
        };
        if !admin_listen.ip().is_loopback() && admin_token.is_none() {
            return Err(invalid(
                "bridge.admin_listen",
                format!(
                    "{admin_listen} is not loopback: set bridge.admin_token_file so the API requires a token"
                ),
            ));
        }
        let topics = b.topics.unwrap_or_else(|| vec!["#".to_string()]);
        if topics.is_empty() {
            return Err(invalid("bridge.topics", "at least one filter is needed"));
        }
        for (i, t) in topics.iter().enumerate() {
            if let Err(e) = check_filter(t) {
                return Err(invalid(
                    format!("bridge.topics[{i}]"),
                    format!("{t:?}: {e}"),
                ));
            }
        }
        let inflight = b.inflight.unwrap_or(100);
        if inflight == 0 {
            return Err(invalid("bridge.inflight", "must be at least 1"));
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
        if keep_alive < Duration::from_secs(1) || keep_alive.as_secs() > u64::from(u16::MAX) {
            return Err(invalid(
                "bridge.keep_alive",
                "must be between 1s and 65535s",
            ));
        }
        let spool = spool_limits(b.spool_max_bytes, b.spool_max_messages, b.spool_overflow)?;
        let mut config = Config {
            spool,
            bridge_id: b.id,
            admin_listen,
            admin_token,
            data_dir: resolve(base_dir, b.data_dir.as_deref().unwrap_or(Path::new("data"))),
            topics,
            dedup_window: parse_duration(
                "bridge.dedup_window",
                b.dedup_window.as_deref(),
                Duration::from_secs(30),
            )?,
            dedup_max_entries,
            session_expiry,
            keep_alive,
            inflight,
            queue_capacity,
            worker_threads,
            links_per_thread,
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
        let mut names = HashSet::new();
        for (i, section) in self.brokers.into_iter().enumerate() {
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
        Ok(config)
    }
}

/// Checks an MQTT topic filter.
fn check_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("empty filter");
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

impl Config {
    /// Builds and checks one broker from its section; `key` prefixes error keys
    /// (`broker[2]` for the file, `broker` for the admin API).
    pub(crate) fn broker_from_section(
        &self,
        key: &str,
        s: BrokerSection,
    ) -> Result<BrokerConfig, ConfigError> {
        let d = &self.tls_defaults;
        let use_tls = s.tls.unwrap_or(DEFAULT_TLS);
        let (host, port) = parse_address(&s.address, if use_tls { 8883 } else { 1883 })
            .map_err(|e| invalid(format!("{key}.address"), e))?;
        if port == self.admin_listen.port() && is_this_host(&host, self.admin_listen.ip()) {
            return Err(invalid(
                format!("{key}.address"),
                format!(
                    "{host}:{port} is this bridge's own admin API (bridge.admin_listen = {})",
                    self.admin_listen
                ),
            ));
        }
        let name = match s.name {
            Some(n) => n,
            None => format!("{}-{port}", host.replace(':', "_")),
        };
        if !valid_name(&name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{name:?}: use 1-64 characters from A-Z a-z 0-9 - _ ."),
            ));
        }
        let max_qos = s.max_qos.unwrap_or(2);
        if max_qos > 2 {
            return Err(invalid(
                format!("{key}.max_qos"),
                format!("{max_qos}: must be 0, 1 or 2"),
            ));
        }
        let pick = |own: &Option<PathBuf>, default: &Option<PathBuf>, k: &str| {
            own.as_ref()
                .map(|p| (format!("{key}.{k}"), resolve(&self.base_dir, p)))
                .or_else(|| {
                    default
                        .as_ref()
                        .map(|p| (format!("tls.{k}"), resolve(&self.base_dir, p)))
                })
        };
        let ca = pick(&s.ca_file, &d.ca_file, "ca_file");
        let cert = pick(&s.cert_file, &d.cert_file, "cert_file");
        let keyf = pick(&s.key_file, &d.key_file, "key_file");
        let server_name = s.server_name.clone().or_else(|| d.server_name.clone());
        let insecure = s
            .insecure_skip_verify
            .or(d.insecure_skip_verify)
            .unwrap_or(false);
        let mut warnings = Vec::new();
        if !use_tls && s.server_name.is_some() {
            return Err(invalid(
                format!("{key}.server_name"),
                "set on a broker with tls = false (it names the certificate to verify); remove one of them",
            ));
        }
        if use_tls && insecure {
            warnings.push(format!(
                "broker {name}: insecure_skip_verify = true: its certificate is not verified, so anyone on the path can pose as it{}",
                if cert.is_some() {
                    " and is offered the client certificate"
                } else {
                    ""
                }
            ));
        }
        if use_tls && let Some((k, p)) = &keyf {
            warnings.extend(loose_permissions(k, p));
        }
        let tls_inputs = use_tls.then(|| TlsInputs {
            ca_file: ca.as_ref().map(|(_, p)| p.clone()),
            cert_file: cert.as_ref().map(|(_, p)| p.clone()),
            key_file: keyf.as_ref().map(|(_, p)| p.clone()),
            server_name: server_name.clone(),
            insecure_skip_verify: insecure,
        });
        let tls = if use_tls {
            let client_auth = match (cert, keyf) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                (Some((k, _)), None) => {
                    return Err(invalid(k, "a client certificate needs key_file too"));
                }
                (None, Some((k, _))) => {
                    return Err(invalid(k, "a client key needs cert_file too"));
                }
            };
            if ca.is_none() && !insecure {
                return Err(invalid(
                    format!("{key}.ca_file"),
                    "TLS is on but no CA is set: set tls.ca_file (or the broker's ca_file), or tls = false",
                ));
            }
            let server_name = match server_name {
                Some(n) => Some(rustls::pki_types::ServerName::try_from(n.clone()).map_err(
                    |_| {
                        invalid(
                            format!("{key}.server_name"),
                            format!("{n:?}: not a valid DNS name or IP"),
                        )
                    },
                )?),
                None => None,
            };
            Some(tls::client_config(&tls::TlsFiles {
                ca: ca.as_ref().map(|(k, p)| (k.as_str(), p.as_path())),
                client_auth: client_auth.as_ref().map(|((ck, cp), (kk, kp))| {
                    ((ck.as_str(), cp.as_path()), (kk.as_str(), kp.as_path()))
                }),
                server_name,
                insecure,
            })?)
        } else {
            if s.insecure_skip_verify == Some(true) {
                return Err(invalid(
                    format!("{key}.insecure_skip_verify"),
                    "set on a broker with tls = false; remove one of them",
                ));
            }
            None
        };
        let credentials = match (s.username, s.password_file) {
            (Some(u), Some(p)) => {
                let path = resolve(&self.base_dir, &p);
                let k = format!("{key}.password_file");
                warnings.extend(loose_permissions(&k, &path));
                Some((u, read_secret(&k, &path)?))
            }
            (Some(u), None) => Some((u, Secret(String::new()))),
            (None, Some(_)) => {
                return Err(invalid(
                    format!("{key}.password_file"),
                    "a password needs a username",
                ));
            }
            (None, None) => None,
        };
        if tls.is_none()
            && credentials.as_ref().is_some_and(|(_, p)| !p.0.is_empty())
            && !is_loopback_host(&host)
        {
            return Err(invalid(
                format!("{key}.password_file"),
                format!(
                    "refusing to send a password in clear text to {host}:{port}; enable TLS for this broker"
                ),
            ));
        }
        Ok(BrokerConfig {
            name,
            host,
            port,
            protocol: s.protocol.unwrap_or_default(),
            tls,
            credentials,
            max_qos,
            tls_inputs,
            warnings,
        })
    }

    /// What differs in `new` that a reload cannot apply (everything but adding and removing
    /// brokers), as config keys: `bridge.id`, `broker b2: address, max_qos`… Empty when `new`
    /// can be applied by a reload.
    pub(crate) fn changes_needing_restart(&self, new: &Config) -> Vec<String> {
        let mut keys = Vec::new();
        let mut check = |changed: bool, key: &str| {
            if changed {
                keys.push(key.to_string());
            }
        };
        check(self.bridge_id != new.bridge_id, "bridge.id");
        check(self.admin_listen != new.admin_listen, "bridge.admin_listen");
        check(
            self.admin_token != new.admin_token,
            "bridge.admin_token_file",
        );
        check(self.data_dir != new.data_dir, "bridge.data_dir");
        check(self.topics != new.topics, "bridge.topics");
        check(self.dedup_window != new.dedup_window, "bridge.dedup_window");
        check(
            self.dedup_max_entries != new.dedup_max_entries,
            "bridge.dedup_max_entries",
        );
        check(
            self.session_expiry != new.session_expiry,
            "bridge.session_expiry",
        );
        check(self.keep_alive != new.keep_alive, "bridge.keep_alive");
        check(self.inflight != new.inflight, "bridge.inflight");
        check(
            self.queue_capacity != new.queue_capacity,
            "bridge.queue_capacity",
        );
        check(
            self.worker_threads != new.worker_threads,
            "bridge.worker_threads",
        );
        check(
            self.links_per_thread != new.links_per_thread,
            "bridge.links_per_thread",
        );
        check(
            self.drain_timeout != new.drain_timeout,
            "bridge.drain_timeout",
        );
        check(
            self.storm_threshold != new.storm_threshold,
            "bridge.storm_threshold",
        );
        check(self.retained_max != new.retained_max, "bridge.retained_max");
        check(
            self.retained_max_bytes != new.retained_max_bytes,
            "bridge.retained_max_bytes",
        );
        check(self.spool != new.spool, "bridge.spool_*");
        check(self.tls_defaults != new.tls_defaults, "tls");
        for old in &self.brokers {
            if let Some(b) = new.brokers.iter().find(|b| b.name == old.name) {
                let changed = old.changed_keys(b);
                if !changed.is_empty() {
                    keys.push(format!("broker {}: {}", old.name, changed.join(", ")));
                }
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("10.0.0.1:8883", 1).unwrap(),
            ("10.0.0.1".into(), 8883)
        );
        assert_eq!(
            parse_address("mqtt.internal", 8883).unwrap(),
            ("mqtt.internal".into(), 8883)
        );
        assert_eq!(
            parse_address("[::1]:1883", 1).unwrap(),
            ("::1".into(), 1883)
        );
        assert_eq!(parse_address("::1", 1883).unwrap(), ("::1".into(), 1883));
        for bad in [
            "",
            ":8883",
            "host:",
            "host:0",
            "host:99999",
            "ho st:1",
            "mqtts://h:1",
            "[::1",
            "999.1.1.1:1",
            "1.2.3:1",
            "10.0.0.256",
        ] {
            assert!(parse_address(bad, 1).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn one_broker_under_two_addresses_is_seen() {
        let base = std::env::temp_dir();
        let config = FileConfig {
            bridge: toml::from_str("id = \"m\"").unwrap(),
            tls: TlsSection::default(),
            brokers: Vec::new(),
        }
        .validate(&base)
        .unwrap();
        let broker = |address: &str, server_name: Option<&str>| {
            let mut section: BrokerSection = toml::from_str(&format!(
                "address = \"{address}\"\ntls = {}",
                server_name.is_some()
            ))
            .unwrap();
            if let Some(n) = server_name {
                section.server_name = Some(n.into());
                section.insecure_skip_verify = Some(true);
            }
            config.broker_from_section("broker", section).unwrap()
        };
        let same = |a: &BrokerConfig, b: &BrokerConfig| {
            a.same_broker(&a.endpoints(true), b, &b.endpoints(true))
        };
        let ip = broker("127.0.0.1:1883", None);
        for alias in [
            "localhost:1883",
            "[::ffff:127.0.0.1]:1883",
            "LOCALHOST:1883",
        ] {
            assert!(same(&ip, &broker(alias, None)), "{alias}");
        }
        assert!(same(
            &broker("[::1]:1883", None),
            &broker("localhost:1883", None)
        ));
        assert!(!same(&ip, &broker("127.0.0.1:1884", None)), "another port");
        assert!(
            !same(&ip, &broker("127.0.0.2:1883", None)),
            "another address"
        );
        // Behind one SNI-routing proxy: distinct server names are distinct brokers.
        assert!(!same(
            &broker("127.0.0.1:8883", Some("b1.internal")),
            &broker("localhost:8883", Some("b2.internal"))
        ));
        assert!(same(
            &broker("127.0.0.1:8883", Some("b1.internal")),
            &broker("localhost:8883", Some("b1.internal"))
        ));
    }

    #[test]
    fn names() {
        for ok in ["b1", "edge-7.site_2", "a.b"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "...", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn filters() {
        for ok in ["#", "a/+/b", "+", "a/#", "$SYS/#"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
    }
}
