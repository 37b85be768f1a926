//! The rules' unit tests: matching, the control-topic fences, covering, directions and
//! prefixes, mosquitto `topic` lines, and the refusals of bad rules.

use super::*;

fn rule(filter: &str, direction: Direction, qos: u8, bp: &str, mp: &str) -> Rule {
    Rule {
        filter: filter.into(),
        direction,
        qos,
        broker_prefix: bp.into(),
        mesh_prefix: mp.into(),
    }
}

fn mapped(topic: &str, qos_cap: u8) -> Option<Mapped<'_>> {
    Some(Mapped {
        topic: topic.into(),
        qos_cap,
    })
}

#[test]
fn matching_follows_mqtt() {
    for (f, t) in [
        ("#", "a/b"),
        ("a/#", "a"),
        ("a/#", "a/b/c"),
        ("a/+/c", "a/b/c"),
        ("+", "a"),
        ("a/+", "a/"),
        ("$SYS/#", "$SYS/x"),
    ] {
        assert!(matches(f, t), "{f} {t}");
    }
    for (f, t) in [
        ("a/+", "a"),
        ("a/+/c", "a/b/d"),
        ("a/b", "a/b/c"),
        ("#", "$SYS/x"),
        ("+/x", "$SYS/x"),
    ] {
        assert!(!matches(f, t), "{f} {t}");
    }
}

#[test]
fn no_rule_maps_traffic_into_the_control_topics_or_writes_nul() {
    let rule = |broker_prefix: &str, mesh_prefix: &str| Rule {
        filter: "#".into(),
        direction: Direction::Both,
        qos: 2,
        broker_prefix: broker_prefix.into(),
        mesh_prefix: mesh_prefix.into(),
    };
    for (b, m, key) in [
        ("", "$meshbridge/", "mesh_prefix"),
        ("$meshbridge/m/", "", "broker_prefix"),
        ("", "$meshbridgex/", "mesh_prefix"),
        ("a\0/", "", "broker_prefix"),
        ("", "site/\0", "mesh_prefix"),
    ] {
        let e = Rules::new(vec![rule(b, m)]).expect_err(key);
        assert_eq!(e.key(), format!("rule[0].{key}"), "{e}");
    }
    assert!(
        Rules::new(vec![rule("$SYS/", "site1/sys/")]).is_ok(),
        "$SYS may be bridged"
    );
}

#[test]
fn covering_and_overlap() {
    assert!(covers("a/#", "a/b/#") && covers("a/#", "a") && covers("#", "a/+"));
    assert!(covers("a/+", "a/b") && !covers("a/+", "a/#") && !covers("a/b", "a/+"));
    assert!(overlap("a/+/c", "a/b/#") && !covers("a/+/c", "a/b/#"));
    assert!(!overlap("a/b", "a/c") && !overlap("a/+", "a/b/c"));
    // A leading wildcard never matches a `$` topic.
    assert!(!covers("#", "$SYS/#") && !overlap("#", "$SYS/#") && !overlap("+/x", "$SYS/x"));
    let r = Rules::everything(&["#".into(), "$SYS/#".into()]);
    assert_eq!(r.subscriptions(), vec!["#", "$SYS/#"]);
    assert_eq!(
        r.inbound("$SYS/broker/uptime"),
        mapped("$SYS/broker/uptime", 2)
    );
}

#[test]
fn no_rules_means_everything_both_ways() {
    let r = Rules::everything(&["#".into()]);
    assert_eq!(r.subscriptions(), vec!["#"]);
    assert_eq!(r.inbound("a/b"), mapped("a/b", 2));
    assert_eq!(r.outbound("a/b"), mapped("a/b", 2));
}

#[test]
fn directions_caps_and_prefixes() {
    let r = Rules::new(vec![
        rule("telemetry/#", Direction::In, 1, "", "site7/"),
        rule("commands/site7/#", Direction::Out, 2, "", ""),
        rule("sensors/#", Direction::Both, 0, "local/", "site7/"),
    ])
    .unwrap();
    assert_eq!(r.subscriptions(), vec!["telemetry/#", "local/sensors/#"]);
    assert_eq!(r.inbound("telemetry/t1"), mapped("site7/telemetry/t1", 1));
    assert_eq!(r.inbound("commands/site7/x"), None, "out only");
    assert_eq!(
        r.outbound("commands/site7/x"),
        mapped("commands/site7/x", 2)
    );
    assert_eq!(r.outbound("site7/telemetry/t1"), None, "in only");
    assert_eq!(r.inbound("local/sensors/a"), mapped("site7/sensors/a", 0));
    assert_eq!(r.outbound("site7/sensors/a"), mapped("local/sensors/a", 0));
    assert_eq!(r.outbound("sensors/a"), None, "not under the mesh prefix");
    assert_eq!(r.inbound("sensors/a"), None, "not under the broker prefix");
}

#[test]
fn first_matching_rule_decides_and_covered_filters_are_not_subscribed() {
    let r = Rules::new(vec![
        rule("a/b/#", Direction::In, 1, "", "special/"),
        rule("a/#", Direction::Both, 2, "", ""),
    ])
    .unwrap();
    assert_eq!(r.subscriptions(), vec!["a/#"], "one subscription, one copy");
    assert_eq!(r.inbound("a/b/c"), mapped("special/a/b/c", 1));
    assert_eq!(r.inbound("a/x"), mapped("a/x", 2));
    let same = Rules::new(vec![
        rule("x/#", Direction::In, 1, "", ""),
        rule("x/#", Direction::Both, 2, "", "m/"),
    ])
    .unwrap();
    assert_eq!(same.subscriptions(), vec!["x/#"]);
    assert_eq!(same.inbound("x/1"), mapped("x/1", 1));
}

#[test]
fn mosquitto_topic_lines_parse_with_mosquittos_defaults() {
    let r = RuleSpec::from_mosquitto("sensors/# in 1 \"site7/\" \"\"").unwrap();
    assert_eq!(
        (
            r.filter.as_str(),
            r.direction,
            r.qos,
            r.mesh_prefix.as_str(),
            r.broker_prefix.as_str()
        ),
        ("sensors/#", Direction::In, Some(1), "site7/", "")
    );
    let r = RuleSpec::from_mosquitto("a/#").unwrap();
    assert_eq!(
        (r.direction, r.qos),
        (Direction::Out, Some(0)),
        "mosquitto's defaults"
    );
    assert!(
        RuleSpec::from_mosquitto("a/# sideways")
            .unwrap_err()
            .0
            .contains("sideways")
    );
    assert!(
        RuleSpec::from_mosquitto("a/# in x")
            .unwrap_err()
            .0
            .contains("QoS")
    );
    assert!(
        RuleSpec::from_mosquitto("a/# in 1 onlyone").is_err(),
        "prefixes come in pairs"
    );
    assert!(RuleSpec::from_mosquitto("").is_err());
    assert!(RuleSpec::from_mosquitto("\"a/#").is_err());
}

#[test]
fn bad_rules_are_refused_naming_the_rule() {
    let err = |rules: Vec<Rule>| {
        let e = Rules::new(rules).unwrap_err();
        format!("{}: {e}", e.key())
    };
    assert!(err(vec![rule("a/#/b", Direction::In, 2, "", "")]).starts_with("rule[0].filter"));
    assert!(err(vec![rule("+x", Direction::In, 2, "", "")]).contains("whole level"));
    assert!(err(vec![rule("", Direction::In, 2, "", "")]).contains("empty filter"));
    let e = err(vec![
        rule("a", Direction::Out, 2, "", ""),
        rule("b", Direction::In, 2, "x/+/", ""),
    ]);
    assert!(e.starts_with("rule[1].broker_prefix"), "{e}");
    assert!(err(vec![rule("a", Direction::In, 3, "", "")]).starts_with("rule[0].qos"));
    let e = err(vec![
        rule("a/+/c", Direction::In, 2, "", ""),
        rule("a/b/#", Direction::Both, 2, "", ""),
    ]);
    assert!(
        e.starts_with("rule[0]: ") && e.contains("rule[1]") && e.contains("twice"),
        "{e}"
    );
    // Overlapping out rules are fine: the first match decides, one publish.
    assert!(
        Rules::new(vec![
            rule("a/+/c", Direction::Out, 2, "", ""),
            rule("a/b/#", Direction::Out, 1, "", ""),
        ])
        .is_ok()
    );
}
