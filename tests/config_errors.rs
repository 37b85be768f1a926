//! `bridge check` and `bridge run` on bad configuration: one line naming the culprit, exit 64,
//! never a panic. Table-driven over the files in tests/fixtures/config.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn bridge(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run bridge");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (fixture, what the one-line error must contain)
const CASES: &[(&str, &[&str])] = &[
    (
        "does-not-exist.toml",
        &["does-not-exist.toml", "No such file"],
    ),
    ("syntax.toml", &["syntax.toml", "line 2"]),
    ("unknown_key.toml", &["unknown field `dedup_windw`"]),
    ("unknown_broker_key.toml", &["unknown field `adress`"]),
    ("wrong_type.toml", &["inflight", "invalid type"]),
    ("missing_bridge.toml", &["missing field `bridge`"]),
    ("bad_address.toml", &["broker[0].address", "invalid port"]),
    (
        "bad_worker_threads.toml",
        &["bridge.worker_threads", "between 1 and 256"],
    ),
    (
        "bad_links_per_thread.toml",
        &["bridge.links_per_thread", "at least 1"],
    ),
    (
        "bad_publish_connections.toml",
        &["bridge.publish_connections", "0", "between 1", "16"],
    ),
    (
        "bad_probe_stall.toml",
        &[
            "bridge.probe_stall_after",
            "longer than probe_interval (5s)",
        ],
    ),
    (
        "bad_reconcile_interval.toml",
        &["bridge.reconcile_interval", "at least 10s"],
    ),
    ("duplicate_names.toml", &["broker[1].name", "\"b1\""]),
    (
        "duplicate_addresses.toml",
        &["broker[1].address", "127.0.0.1:1883"],
    ),
    (
        "missing_ca_file.toml",
        &["tls.ca_file", "does-not-exist/ca.crt"],
    ),
    (
        "invalid_ca_file.toml",
        &["tls.ca_file", "not-a-cert.pem", "no PEM certificate"],
    ),
    (
        "invalid_broker_ca_file.toml",
        &["broker[0].ca_file", "not-a-cert.pem"],
    ),
    ("cert_without_key.toml", &["tls.cert_file", "key_file"]),
    ("tls_without_ca.toml", &["broker[0].ca_file", "no CA"]),
    (
        "password_in_clear.toml",
        &["broker[0].password_file", "clear text", "10.0.0.1"],
    ),
    (
        "missing_password_file.toml",
        &["broker[0].password_file", "no-such-password"],
    ),
    (
        "missing_mesh_key.toml",
        &["bridge.mesh_key_file", "no-such-key"],
    ),
    (
        "bad_mesh_key.toml",
        &[
            "bridge.mesh_key_file",
            "password.txt",
            "line 1",
            "64 hex digits",
        ],
    ),
    (
        "admin_public_without_token.toml",
        &["bridge.admin_listen", "admin_token_file"],
    ),
    (
        "insecure_without_tls.toml",
        &["broker[0].insecure_skip_verify"],
    ),
    (
        "broker_is_admin_address.toml",
        &["broker[0].address", "own admin API"],
    ),
    ("dot_name.toml", &["broker[0].name", "\"..\""]),
    (
        "bad_ipv4_host.toml",
        &["broker[0].address", "not a valid IPv4 address"],
    ),
    (
        "rule_bad_filter.toml",
        &["broker[0].rule[0].filter", "edge", "a/#/b", "last one"],
    ),
    (
        "rule_prefix_wildcard.toml",
        &["broker[0].rule[0].broker_prefix", "edge", "x/+/"],
    ),
    (
        "rule_overlap.toml",
        &["broker[0].rule[0]", "edge", "rule[1]", "a/b/#", "twice"],
    ),
    (
        "rule_bad_direction.toml",
        &["rule_bad_direction.toml", "unknown variant `sideways`"],
    ),
    ("rule_unknown_key.toml", &["unknown field `topic`"]),
    (
        "server_name_without_tls.toml",
        &["broker[0].server_name", "tls = false"],
    ),
    (
        "bad_duration.toml",
        &["bridge.dedup_window", "thirty seconds"],
    ),
    ("bad_max_qos.toml", &["broker[0].max_qos"]),
    (
        "bad_drain_rate.toml",
        &["broker[0].drain_rate", "at least 1 message per second"],
    ),
    (
        "bad_spool_size.toml",
        &["bridge.spool_max_bytes", "\"lots\""],
    ),
    (
        "bad_spool_overflow.toml",
        &["bridge.spool_overflow", "drop_newest", "block"],
    ),
    ("bad_bridge_id.toml", &["bridge.id"]),
    (
        "bad_protocol.toml",
        &["unknown protocol \"v4\"", "expected v5 or v3.1.1"],
    ),
    ("bad_topic.toml", &["bridge.topics[0]"]),
];

#[test]
fn check_rejects_bad_config_with_one_line_naming_the_key() {
    let mut failures = Vec::new();
    for (file, needles) in CASES {
        let path = fixture(file);
        let (code, _stdout, stderr) = bridge(&["check", "--config", path.to_str().unwrap()]);
        let lines: Vec<&str> = stderr.lines().collect();
        let ok = code == Some(64)
            && lines.len() == 1
            && lines[0].starts_with("error: ")
            && needles.iter().all(|n| lines[0].contains(n))
            && !stderr.contains("panicked");
        if !ok {
            failures.push(format!(
                "{file}: exit {code:?}, stderr {stderr:?}, wanted {needles:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn run_rejects_bad_config_the_same_way() {
    for file in [
        "bad_address.toml",
        "unknown_key.toml",
        "missing_ca_file.toml",
    ] {
        let path = fixture(file);
        let (code, _, stderr) = bridge(&["run", "--config", path.to_str().unwrap()]);
        assert_eq!(code, Some(64), "{file}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{file}: {stderr}");
    }
}

#[test]
fn check_accepts_a_valid_config() {
    let path = fixture("valid.toml");
    let (code, stdout, stderr) = bridge(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("ok (2 brokers)"), "{stdout}");
}

#[test]
fn example_config_is_valid_apart_from_its_certificates() {
    // bridge.toml.example documents every key; it must parse, and fail only on the
    // certificate files it points at (which a user creates with the certs/ instructions).
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bridge.toml.example");
    let (code, _, stderr) = bridge(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("tls.ca_file") && stderr.contains("certs/ca.crt"),
        "{stderr}"
    );
}

/// Settings that work but weaken security are accepted with a warning naming them (before:
/// `check` said ok and nothing anywhere mentioned them).
#[test]
fn check_warns_of_insecure_tls_and_secret_files_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = dir.join("certs");
    meshbridge::certs::generate(&certs, &["localhost".into()], false).unwrap();
    let password = dir.join("password");
    std::fs::write(&password, "secret\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key = certs.join("client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    // Group-readable by another group than the process's own (its own group, as a Kubernetes
    // Secret with fsGroup gives it, is no warning).
    // (Changing a file's group to one the user is not in needs root, as CI runs.)
    let other_group = std::os::unix::fs::chown(&key, None, Some(65534)).is_ok();
    let cfg = dir.join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[bridge]\nid = \"m\"\n\n[tls]\nca_file = \"{ca}\"\ncert_file = \"{crt}\"\nkey_file = \"{key}\"\n\n\
             [[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:8883\"\ninsecure_skip_verify = true\n\
             username = \"u\"\npassword_file = \"{pw}\"\n\n\
             [[broker]]\nname = \"b2\"\naddress = \"127.0.0.1:8884\"\n",
            ca = certs.join("ca.crt").display(),
            crt = certs.join("client.crt").display(),
            key = key.display(),
            pw = password.display(),
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = bridge(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("ok (2 brokers)"), "{stdout}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("broker b1: insecure_skip_verify = true")
                && w.contains("client certificate")),
        "{stderr}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("broker[0].password_file") && w.contains("0644")),
        "{stderr}"
    );
    assert!(
        !other_group
            || warnings
                .iter()
                .any(|w| w.contains("tls.key_file") && w.contains("0640")),
        "{stderr}"
    );
    assert!(!stderr.contains("broker b2:"), "b2 is verified: {stderr}");
}

#[test]
fn bad_cli_usage_is_a_clear_error() {
    let (code, _, stderr) = bridge(&["frobnicate"]);
    assert_eq!(code, Some(2), "clap's usage error: {stderr}");
    assert!(stderr.contains("frobnicate"));
}
