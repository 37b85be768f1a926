//! One validated broker: its address, TLS inputs, credentials and limits; how to tell a second
//! entry for it, and which of its settings a running link cannot change.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use super::*;

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
    pub(crate) tls: Option<Arc<tls::TlsSource>>,
    /// MQTT credentials.
    pub(crate) credentials: Option<(String, Secret)>,
    /// Highest QoS forwarded to this broker.
    pub(crate) max_qos: u8,
    /// Most messages per second published to it while it has a backlog in the spool (`None`:
    /// as fast as it acknowledges them; see `link::drain`).
    pub(crate) drain_rate: Option<u32>,
    /// What `tls` was built from (`None` for plain TCP): to see a change, and to report
    /// `insecure_skip_verify`.
    pub(crate) tls_inputs: Option<TlsInputs>,
    /// Settings of this broker that weaken security, one line each (logged when it starts).
    pub(crate) warnings: Vec<String>,
    /// Its topic rules (see [`crate::rules`]).
    pub(crate) rules: Arc<crate::rules::Rules>,
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
        if self.drain_rate != new.drain_rate {
            keys.push("drain_rate");
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
            .field("drain_rate", &self.drain_rate)
            .finish()
    }
}

impl Config {
    /// Builds and checks one broker from its section; `key` prefixes error keys
    /// (`broker[2]` for the file, `broker` for the admin API).
    pub(crate) fn broker_from_section(
        &self,
        key: &str,
        mut s: BrokerSection,
    ) -> Result<BrokerConfig, ConfigError> {
        let use_tls = s.tls.unwrap_or(DEFAULT_TLS);
        let (host, port) = parse_address(&s.address, if use_tls { 8883 } else { 1883 })
            .map_err(|e| invalid(format!("{key}.address"), e.to_string()))?;
        if port == self.admin_listen.port() && is_this_host(&host, self.admin_listen.ip()) {
            return Err(invalid(
                format!("{key}.address"),
                format!(
                    "{host}:{port} is this bridge's own admin API (bridge.admin_listen = {})",
                    self.admin_listen
                ),
            ));
        }
        let name = match s.name.take() {
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
        if s.drain_rate == Some(0) {
            return Err(invalid(
                format!("{key}.drain_rate"),
                "0: must be at least 1 message per second (leave it out for no limit)".to_string(),
            ));
        }
        let rules = crate::rules::Rules::from_specs(&s.rules, &self.topics)
            .map_err(|e| invalid(format!("{key}.{}", e.key()), format!("{name}: {e}")))?;
        let mut warnings = Vec::new();
        let (tls, tls_inputs) = self.broker_tls(key, &name, use_tls, &s, &mut warnings)?;
        let credentials = self.credentials(key, s.username, s.password_file, &mut warnings)?;
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
            drain_rate: s.drain_rate,
            tls_inputs,
            warnings,
            rules: Arc::new(rules),
        })
    }

    /// The TLS configuration of broker `name` (section `key`), from its keys and `[tls]`.
    fn broker_tls(
        &self,
        key: &str,
        name: &str,
        use_tls: bool,
        s: &BrokerSection,
        warnings: &mut Vec<String>,
    ) -> Result<(Option<Arc<tls::TlsSource>>, Option<TlsInputs>), ConfigError> {
        let d = &self.tls_defaults;
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
            Some(tls_source(key, ca, cert, keyf, server_name, insecure)?)
        } else {
            if s.insecure_skip_verify == Some(true) {
                return Err(invalid(
                    format!("{key}.insecure_skip_verify"),
                    "set on a broker with tls = false; remove one of them",
                ));
            }
            None
        };
        Ok((tls, tls_inputs))
    }

    /// A broker's username and password (section `key`).
    fn credentials(
        &self,
        key: &str,
        username: Option<String>,
        password_file: Option<PathBuf>,
        warnings: &mut Vec<String>,
    ) -> Result<Option<(String, Secret)>, ConfigError> {
        Ok(match (username, password_file) {
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
        })
    }
}

/// A file of a broker's TLS configuration: the key that named it, and its path.
type KeyedPath = (String, PathBuf);

/// The TLS source of a broker (section `key`) from its checked keys.
fn tls_source(
    key: &str,
    ca: Option<KeyedPath>,
    cert: Option<KeyedPath>,
    keyf: Option<KeyedPath>,
    server_name: Option<String>,
    insecure: bool,
) -> Result<Arc<tls::TlsSource>, ConfigError> {
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
        Some(n) => Some(
            rustls::pki_types::ServerName::try_from(n.clone()).map_err(|_| {
                invalid(
                    format!("{key}.server_name"),
                    format!("{n:?}: not a valid DNS name or IP"),
                )
            })?,
        ),
        None => None,
    };
    Ok(Arc::new(tls::TlsSource::new(&tls::TlsFiles {
        ca: ca.as_ref().map(|(k, p)| (k.as_str(), p.as_path())),
        client_auth: client_auth
            .as_ref()
            .map(|((ck, cp), (kk, kp))| ((ck.as_str(), cp.as_path()), (kk.as_str(), kp.as_path()))),
        server_name,
        insecure,
    })?))
}
