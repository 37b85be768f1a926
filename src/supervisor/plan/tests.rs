use super::*;

fn set<'a>(names: &[&'a str]) -> HashSet<&'a str> {
    names.iter().copied().collect()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// b1..b3 from the file, running; b9 added at run time, running.
fn mesh() -> Members<'static> {
    Members {
        running: set(&["b1", "b2", "b3", "b9"]),
        from_config: set(&["b1", "b2", "b3"]),
        added_at_runtime: set(&["b9"]),
        ..Members::default()
    }
}

#[test]
fn an_unchanged_file_changes_nothing() {
    assert_eq!(
        reload(&mesh(), &["b1", "b2", "b3"], &[]),
        ReloadPlan::default()
    );
}

#[test]
fn rules_and_connection_changes_apply_to_the_brokers_of_the_file() {
    let changes = [
        Change::Rules("b1".into()),
        Change::Restart("b2".into(), vec!["port"]),
        // b9 came from add-broker: the file's idea of it is not applied.
        Change::Rules("b9".into()),
        Change::Restart("b9".into(), vec!["tls"]),
    ];
    let plan = reload(&mesh(), &["b1", "b2", "b3", "b9"], &changes);
    assert_eq!(plan.rules, names(&["b1"]));
    assert_eq!(
        plan.restart,
        names(&["b2"]),
        "a restarted link is not also started"
    );
    assert!(plan.start.is_empty() && plan.remove.is_empty(), "{plan:?}");
}

#[test]
fn a_broker_that_left_the_file_is_removed_unless_added_at_run_time() {
    let changes = [Change::Remove("b3".into()), Change::Remove("b9".into())];
    let plan = reload(&mesh(), &["b1", "b2"], &changes);
    assert_eq!(plan.remove, names(&["b3"]));
    assert!(plan.start.is_empty());
}

#[test]
fn brokers_of_the_file_that_do_not_run_start_or_wait_for_a_drain() {
    let mut now = mesh();
    // b4 is new, b5 failed to start at the last reload, b6 is the name of a removed broker
    // whose link still drains, b7 was removed at run time.
    now.draining = set(&["b6"]);
    now.removed_at_runtime = set(&["b7"]);
    let file = ["b1", "b2", "b3", "b4", "b5", "b6", "b7"];
    let plan = reload(&now, &file, &[Change::Add("b4".into())]);
    assert_eq!(plan.start, names(&["b4", "b5"]));
    assert_eq!(plan.wait, names(&["b6"]));
}

#[test]
fn a_change_for_a_broker_that_does_not_run_is_not_applied_to_it() {
    let mut now = mesh();
    now.running.remove("b2");
    let changes = [
        Change::Rules("b2".into()),
        Change::Restart("b2".into(), vec!["host"]),
    ];
    let plan = reload(&now, &["b1", "b2", "b3"], &changes);
    assert!(plan.rules.is_empty() && plan.restart.is_empty(), "{plan:?}");
    assert_eq!(
        plan.start,
        names(&["b2"]),
        "it starts with the file's settings"
    );
}

fn view(name: &str) -> StartView<'_> {
    StartView {
        name,
        consumed: false,
        connected: true,
        failing: false,
        ever_connected: true,
    }
}

#[test]
fn readiness_waits_for_every_reachable_broker_to_be_consumed() {
    let links = [
        StartView {
            consumed: true,
            ..view("consumed")
        },
        view("unconsumed"),
        StartView {
            connected: false,
            ever_connected: false,
            ..view("dialling")
        },
        StartView {
            connected: false,
            failing: true,
            ever_connected: false,
            ..view("down")
        },
        StartView {
            connected: false,
            failing: true,
            ..view("was_up")
        },
        StartView {
            failing: true,
            ..view("flapping")
        },
    ];
    let (waiting, unconsumed) = start_blockers(links);
    assert_eq!(waiting, names(&["dialling"]));
    assert_eq!(
        unconsumed,
        names(&["unconsumed", "flapping"]),
        "a connected link counts whatever its last error"
    );
    assert_eq!(start_blockers([]), (vec![], vec![]));
}
