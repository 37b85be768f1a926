//! `bridge import-mosquitto`: a mosquitto "bridge master" configuration (one `connection` block
//! per broker) turned into an equivalent `bridge.toml`. Pure: [`files`] reads the
//! configuration (with its `include_dir`s) and writes the result.
//!
//! Every `connection` becomes a `[[broker]]`; its `topic` lines become rules with mosquitto's
//! meaning (direction default `out`, QoS default 0, local prefix = mesh prefix, remote prefix =
//! broker prefix). Every option the result cannot express is reported, one line each, saying why.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// One `connection` block as read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Connection {
    name: String,
    address: Option<String>,
    topics: Vec<Topic>,
    cafile: Option<String>,
    certfile: Option<String>,
    keyfile: Option<String>,
    insecure: bool,
    username: Option<String>,
    password: Option<String>,
    protocol: Option<String>,
    keepalive: Option<u64>,
}

/// One `topic` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Topic {
    filter: String,
    direction: String,
    qos: u8,
    local_prefix: String,
    remote_prefix: String,
}

/// What [`convert`] made.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    /// The bridge.toml text.
    pub toml: String,
    /// Password files to write beside it (file name, password), mode 0600.
    pub passwords: Vec<(String, String)>,
    /// One line for every option that has no equivalent, or was changed, and why.
    pub notes: Vec<String>,
}

/// Why a configuration cannot be converted at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportError {
    /// No `connection` block.
    #[error("no `connection` block: this is not a bridge master's configuration")]
    NoConnection,
    /// A line cannot be read.
    #[error("{source_name} line {line}: {message}")]
    Line {
        /// The file.
        source_name: String,
        /// Its line (1-based).
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// `s` as a TOML string, quoted and escaped.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

use crate::rules::words;

mod files;
pub use files::{MAX_CONF_BYTES, MAX_INCLUDED, ReadError, WriteError, read, write};

/// Converts the configuration `files` (name and text, in the order mosquitto reads them: the
/// main file, then each `include_dir`'s files in alphabetical order, which the caller resolves)
/// into a bridge.toml for bridge `id`.
pub fn convert(files: &[(String, String)], id: &str) -> Result<Imported, ImportError> {
    let mut connections: Vec<Connection> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut ignored_global: BTreeSet<String> = BTreeSet::new();
    for (source_name, text) in files {
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let w = words(line).map_err(|message| ImportError::Line {
                source_name: source_name.clone(),
                line: n + 1,
                message: message.to_string(),
            })?;
            let at = |what: &str| format!("{source_name} line {}: {what}", n + 1);
            let (key, args) = (w[0].as_str(), &w[1..]);
            if key == "connection" {
                connections.push(Connection {
                    name: args.first().cloned().unwrap_or_default(),
                    ..Connection::default()
                });
                continue;
            }
            if key == "include_dir" {
                continue;
            }
            let Some(c) = connections.last_mut() else {
                ignored_global.insert(key.to_string());
                continue;
            };
            option(c, key, args, id, &at, &mut notes);
        }
    }
    if connections.is_empty() {
        return Err(ImportError::NoConnection);
    }
    if !ignored_global.is_empty() {
        notes.push(format!(
            "options of the master's own broker left out (meshbridge has no broker of its own): {}",
            ignored_global.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let keepalives: BTreeSet<u64> = connections.iter().filter_map(|c| c.keepalive).collect();
    let mut toml = String::new();
    let _ = writeln!(
        toml,
        "# Converted by `bridge import-mosquitto` from {}.\n[bridge]\nid = {}",
        files.first().map_or("", |f| f.0.as_str()),
        q(id)
    );
    if let Some(&k) = keepalives.iter().next() {
        if k < 5 {
            notes.push(format!(
                "keepalive_interval {k}s: meshbridge's smallest keep-alive is 5s, used instead"
            ));
        }
        let k = k.max(5);
        let _ = writeln!(toml, "keep_alive = \"{k}s\"");
        if keepalives.len() > 1 {
            notes.push(format!(
                "keepalive_interval differs between connections: meshbridge has one, the smallest ({k}s) is used"
            ));
        }
    }
    let mut passwords = Vec::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    for c in &connections {
        let name = broker_name(c, &mut names, &mut notes);
        write_broker(&mut toml, c, &name, &mut notes, &mut passwords);
    }
    Ok(Imported {
        toml,
        passwords,
        notes,
    })
}

/// One option of a bridge `connection` block.
fn option(
    c: &mut Connection,
    key: &str,
    args: &[String],
    id: &str,
    at: &dyn Fn(&str) -> String,
    notes: &mut Vec<String>,
) {
    let one = || args.first().cloned().unwrap_or_default();
    match key {
        "address" | "addresses" => {
            c.address = args.first().cloned();
            if args.len() > 1 {
                notes.push(at(&format!(
                    "connection {}: address list: {} is used, {} not (meshbridge dials one address per broker; put the others behind your load balancer, or add each as a broker if they are distinct)",
                    c.name,
                    args[0],
                    args[1..].join(" ")
                )));
            }
        }
        "topic" => {
            let filter = args.first().cloned().unwrap_or_default();
            let direction = args.get(1).cloned().unwrap_or_else(|| "out".into());
            let qos = args.get(2).and_then(|q| q.parse().ok()).unwrap_or(0);
            c.topics.push(Topic {
                filter,
                direction,
                qos,
                local_prefix: args.get(3).cloned().unwrap_or_default(),
                remote_prefix: args.get(4).cloned().unwrap_or_default(),
            });
        }
        "bridge_cafile" => c.cafile = Some(one()),
        "bridge_certfile" => c.certfile = Some(one()),
        "bridge_keyfile" => c.keyfile = Some(one()),
        "bridge_insecure" => c.insecure = one() == "true",
        "remote_username" => c.username = Some(one()),
        "remote_password" => c.password = Some(one()),
        "bridge_protocol_version" => c.protocol = Some(one()),
        "keepalive_interval" => c.keepalive = one().parse().ok(),
        "cleansession" => {
            if one() == "true" {
                notes.push(at(&format!(
                    "connection {}: cleansession true: meshbridge's sessions are always persistent (messages published while it is down are delivered after it restarts)",
                    c.name
                )));
            }
        }
        "try_private" => notes.push(at(&format!(
            "connection {}: try_private: not needed, meshbridge prevents loops itself (No Local, origin tag, echo window)",
            c.name
        ))),
        "notifications" | "notification_topic" | "notifications_local_only" => {
            notes.push(at(&format!(
                "connection {}: {key}: no equivalent yet; link state is in `bridge status`, /metrics and /readyz",
                c.name
            )))
        }
        "remote_clientid" | "clientid" => notes.push(at(&format!(
            "connection {}: {key}: meshbridge's client id is <bridge id>-<broker name> ({id}-{})",
            c.name, c.name
        ))),
        "start_type" | "restart_timeout" | "idle_timeout" | "threshold" => {
            notes.push(at(&format!(
                "connection {}: {key}: meshbridge keeps every link up and reconnects with exponential backoff",
                c.name
            )))
        }
        "round_robin" => notes.push(at(&format!(
            "connection {}: round_robin: one address per broker (see the address list note)",
            c.name
        ))),
        other => notes.push(at(&format!(
            "connection {}: {other}: no equivalent in meshbridge; left out",
            c.name
        ))),
    }
}

/// The broker name of connection `c`: its name made valid, and unique among `names`.
fn broker_name(c: &Connection, names: &mut BTreeSet<String>, notes: &mut Vec<String>) -> String {
    let mut name: String = c
        .name
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.') {
                ch
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(64);
    if name.is_empty() || name.chars().all(|ch| ch == '.') {
        name = format!("broker{}", names.len() + 1);
    }
    while !names.insert(name.clone()) {
        name.push('_');
    }
    if name != c.name {
        notes.push(format!(
            "connection {:?} is broker {name:?} (names are 1-64 of A-Z a-z 0-9 - _ .)",
            c.name
        ));
    }
    name
}

/// The `[[broker]]` section of connection `c`, named `name`.
fn write_broker(
    toml: &mut String,
    c: &Connection,
    name: &str,
    notes: &mut Vec<String>,
    passwords: &mut Vec<(String, String)>,
) {
    let address = c.address.clone().unwrap_or_default();
    let address = if address.is_empty() {
        notes.push(format!("connection {}: no address; fill it in", c.name));
        "FILL-IN:1883".to_string()
    } else if address.contains(':') && !address.ends_with(']') {
        address
    } else {
        // mosquitto's default port for a bridge
        format!("{address}:1883")
    };
    let _ = writeln!(
        toml,
        "\n[[broker]]\nname = {}\naddress = {}",
        q(name),
        q(&address)
    );
    match c.protocol.as_deref() {
        None | Some("mqttv311") => {
            let _ = writeln!(toml, "protocol = \"v3.1.1\"");
        }
        Some("mqttv50") => {}
        Some(other) => {
            notes.push(format!(
                "connection {}: bridge_protocol_version {other}: meshbridge speaks MQTT 5 and 3.1.1; v3.1.1 is used",
                c.name
            ));
            let _ = writeln!(toml, "protocol = \"v3.1.1\"");
        }
    }
    // A mosquitto bridge uses TLS only with a CA (or insecure); so does this one.
    if c.cafile.is_some() || c.insecure {
        if let Some(ca) = &c.cafile {
            let _ = writeln!(toml, "ca_file = {}", q(ca));
        }
        if let (Some(cert), Some(key)) = (&c.certfile, &c.keyfile) {
            let _ = writeln!(toml, "cert_file = {}\nkey_file = {}", q(cert), q(key));
        }
        if c.insecure {
            let _ = writeln!(toml, "insecure_skip_verify = true");
        }
    } else {
        let _ = writeln!(toml, "tls = false");
    }
    if let Some(user) = &c.username {
        let _ = writeln!(toml, "username = {}", q(user));
        if let Some(password) = &c.password {
            let file = format!("{name}.password");
            let _ = writeln!(toml, "password_file = {}", q(&file));
            passwords.push((file, password.clone()));
        }
    }
    write_rules(toml, c, notes);
}

/// The `[[broker.rule]]` sections of connection `c`: one per `topic` line.
fn write_rules(toml: &mut String, c: &Connection, notes: &mut Vec<String>) {
    for t in &c.topics {
        let direction = match t.direction.as_str() {
            "in" | "out" | "both" => t.direction.as_str(),
            other => {
                notes.push(format!(
                    "connection {}: topic {}: direction {other:?} unknown; `out` (mosquitto's default) is used",
                    c.name, t.filter
                ));
                "out"
            }
        };
        let _ = writeln!(
            toml,
            "\n[[broker.rule]]\nfilter = {}\ndirection = \"{direction}\"\nqos = {}",
            q(&t.filter),
            t.qos.min(2)
        );
        if !t.remote_prefix.is_empty() {
            let _ = writeln!(toml, "broker_prefix = {}", q(&t.remote_prefix));
        }
        if !t.local_prefix.is_empty() {
            let _ = writeln!(toml, "mesh_prefix = {}", q(&t.local_prefix));
        }
    }
    if c.topics.is_empty() {
        notes.push(format!(
            "connection {}: no topic line: mosquitto bridges nothing; meshbridge would take [bridge] topics both ways, so an `out` rule on an unused topic keeps it closed",
            c.name
        ));
        let _ = writeln!(
            toml,
            "\n[[broker.rule]]\nfilter = \"$meshbridge-nothing\"\ndirection = \"out\""
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Imported {
        convert(&[("master.conf".into(), text.into())], "mesh").unwrap()
    }

    #[test]
    fn seed_004_master_converts() {
        let text = "listener 1883\nallow_anonymous true\n\nconnection broker-1\naddress 10.0.0.1:1883\ntopic # both 2 \"\" \"\"\n\nconnection broker-2\naddress 10.0.0.2:1883\ntopic # both 2 \"\" \"\"\n";
        let out = one(text);
        assert!(out.toml.contains("[[broker]]\nname = \"broker-1\"\naddress = \"10.0.0.1:1883\"\nprotocol = \"v3.1.1\"\ntls = false"), "{}", out.toml);
        assert!(
            out.toml
                .contains("filter = \"#\"\ndirection = \"both\"\nqos = 2"),
            "{}",
            out.toml
        );
        assert_eq!(out.toml.matches("[[broker]]").count(), 2);
        assert_eq!(out.notes.len(), 1, "{:?}", out.notes);
        assert!(out.notes[0].contains("allow_anonymous, listener"));
    }

    #[test]
    fn every_bridge_option_is_expressed_or_reported() {
        let text = "connection edge/7\naddresses a.example:8883 b.example:8883\nbridge_protocol_version mqttv50\nbridge_cafile /etc/ca.crt\nbridge_certfile /etc/c.crt\nbridge_keyfile /etc/c.key\nremote_username u\nremote_password s3cret\ntopic telemetry/# in 1 site7/ \"\"\ntopic commands/# out\ntopic sensors/# both 2 site7/ local/\ntry_private true\nnotifications false\nremote_clientid x\nstart_type automatic\ncleansession true\nkeepalive_interval 30\nbridge_outgoing_retain false\n";
        let out = one(text);
        let t = &out.toml;
        assert!(t.contains("name = \"edge-7\""), "{t}");
        assert!(t.contains("address = \"a.example:8883\""), "{t}");
        assert!(!t.contains("protocol ="), "v5 is the default: {t}");
        assert!(
            t.contains(
                "ca_file = \"/etc/ca.crt\"\ncert_file = \"/etc/c.crt\"\nkey_file = \"/etc/c.key\""
            ),
            "{t}"
        );
        assert!(
            t.contains("username = \"u\"\npassword_file = \"edge-7.password\""),
            "{t}"
        );
        assert!(!t.contains("s3cret"), "the password is not in the toml");
        assert_eq!(
            out.passwords,
            vec![("edge-7.password".to_string(), "s3cret".to_string())]
        );
        assert!(
            t.contains(
                "filter = \"telemetry/#\"\ndirection = \"in\"\nqos = 1\nmesh_prefix = \"site7/\""
            ),
            "{t}"
        );
        assert!(
            t.contains("filter = \"commands/#\"\ndirection = \"out\"\nqos = 0"),
            "mosquitto's defaults: {t}"
        );
        assert!(t.contains("filter = \"sensors/#\"\ndirection = \"both\"\nqos = 2\nbroker_prefix = \"local/\"\nmesh_prefix = \"site7/\""), "{t}");
        assert!(t.contains("keep_alive = \"30s\""), "{t}");
        for needle in [
            "edge-7",
            "address list",
            "try_private",
            "notifications",
            "remote_clientid",
            "start_type",
            "cleansession true",
            "bridge_outgoing_retain",
        ] {
            assert!(
                out.notes.iter().any(|n| n.contains(needle)),
                "{needle}: {:?}",
                out.notes
            );
        }
        assert!(out.notes.iter().all(|n| !n.contains("s3cret")));
    }

    #[test]
    fn include_dir_files_add_connections_and_bad_input_is_named() {
        let files = vec![
            (
                "main.conf".to_string(),
                "include_dir /etc/mosquitto/conf.d\n".to_string(),
            ),
            (
                "conf.d/a.conf".to_string(),
                "connection a\naddress 10.0.0.1\ntopic # both 2\n".to_string(),
            ),
            (
                "conf.d/b.conf".to_string(),
                "connection b\naddress 10.0.0.2:1884\n".to_string(),
            ),
        ];
        let out = convert(&files, "mesh").unwrap();
        assert!(
            out.toml.contains("address = \"10.0.0.1:1883\""),
            "default port: {}",
            out.toml
        );
        assert!(
            out.toml
                .contains("name = \"b\"\naddress = \"10.0.0.2:1884\"")
        );
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("connection b: no topic line"))
        );
        assert_eq!(
            convert(&[("x.conf".into(), "listener 1883\n".into())], "m"),
            Err(ImportError::NoConnection)
        );
        let e = convert(
            &[("x.conf".into(), "connection a\ntopic \"#\n".into())],
            "m",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "x.conf line 2: unclosed quote");
    }
}
