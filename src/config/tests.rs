//! Validation of addresses, names, filters and brokers; no broker needed.

use super::*;
use crate::rules::check_filter;

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
    for bad in [
        "",
        "a/#/b",
        "a#",
        "a/b+",
        "a/\0/b",
        "$share/g/#",
        "$queue/#",
        "$meshbridge/#",
        "$meshbridge/m/owner/+",
    ] {
        assert!(check_filter(bad).is_err(), "{bad}");
    }
}

#[test]
fn secrets_do_not_leak_through_debug() {
    let s = Secret("hunter2".into());
    assert_eq!(format!("{s:?}"), "<redacted>");
}

/// A config of brokers b1..bn from `[[broker]]` TOML, with `bridge` keys.
fn config_of(bridge: &str, brokers: &str) -> Config {
    let text = format!("[bridge]\nid = \"m\"\n{bridge}\n\n{brokers}");
    let file: FileConfig = toml::from_str(&text).unwrap();
    file.validate(&std::env::temp_dir()).unwrap()
}

#[test]
fn a_reload_is_a_pure_diff_per_key_and_broker() {
    let b = |name: &str, port: u16, extra: &str| {
        format!(
            "[[broker]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\ntls = false\n{extra}\n"
        )
    };
    let old = config_of(
        "",
        &[b("b1", 1001, ""), b("b2", 1002, ""), b("b3", 1003, "")].concat(),
    );
    assert_eq!(diff(&old, &old), Vec::new(), "nothing changed");
    let rule = "[[broker.rule]]\nfilter = \"a/#\"\n";
    let new = config_of(
        "",
        &[
            b("b1", 1001, rule),
            b("b2", 1012, "protocol = \"v3.1.1\""),
            b("b4", 1004, ""),
        ]
        .concat(),
    );
    assert_eq!(
        diff(&old, &new),
        vec![
            Change::Rules("b1".into()),
            Change::Restart("b2".into(), vec!["address", "protocol"]),
            Change::Add("b4".into()),
            Change::Remove("b3".into()),
        ]
    );
    let global = config_of(
        "inflight = 7",
        &[b("b1", 1001, ""), b("b2", 1002, ""), b("b3", 1003, "")].concat(),
    );
    assert_eq!(
        diff(&old, &global),
        vec![Change::NeedsRestart("bridge.inflight".into())]
    );
}

#[test]
fn prefer_names_brokers_and_says_which_are_not_in_the_file() {
    let brokers = "[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:1001\"\ntls = false\n";
    let c = config_of("prefer = [\"b1\", \"far\"]", brokers);
    assert_eq!(c.prefer, vec!["b1".to_string(), "far".to_string()]);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("bridge.prefer") && w.contains("\"far\"")),
        "{:?}",
        c.warnings
    );
    assert!(!c.warnings.iter().any(|w| w.contains("\"b1\"")));
    let text = format!("[bridge]\nid = \"m\"\nprefer = [\"b 1\"]\n\n{brokers}");
    let file: FileConfig = toml::from_str(&text).unwrap();
    let e = file
        .validate(&std::env::temp_dir())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bridge.prefer") && e.contains("\"b 1\""), "{e}");
    let other = config_of("prefer = [\"b1\"]", brokers);
    assert_eq!(
        diff(&c, &other),
        vec![Change::NeedsRestart("bridge.prefer".into())]
    );
}
