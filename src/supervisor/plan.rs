//! The supervisor's decisions, apart from the links they start and stop: pure, so that they
//! are tested without brokers. [`reload`]: what a reloaded config file does to each broker.
//! [`start_blockers`]: which links still hold the process's readiness back at start-up.

use std::collections::HashSet;

use crate::config::Change;

/// What the supervisor runs when a reload comes in.
#[derive(Debug, Default)]
pub(crate) struct Members<'a> {
    /// Brokers with a link now.
    pub(crate) running: HashSet<&'a str>,
    /// Brokers that came from the config file (the others were added at run time).
    pub(crate) from_config: HashSet<&'a str>,
    /// Brokers added at run time (`add-broker`), persisted: they outlive the file.
    pub(crate) added_at_runtime: HashSet<&'a str>,
    /// Brokers removed at run time (`remove-broker`), persisted: they stay out whatever the
    /// file says.
    pub(crate) removed_at_runtime: HashSet<&'a str>,
    /// Brokers taken out whose links still drain: a broker of that name waits for the drain.
    pub(crate) draining: HashSet<&'a str>,
}

/// What a reload does, broker by broker (names, in the order of the changes and the file).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ReloadPlan {
    /// Topic rules replaced in place.
    pub(crate) rules: Vec<String>,
    /// Links restarted with their new connection settings.
    pub(crate) restart: Vec<String>,
    /// Brokers that left the file: out of the fan-out, and their links (if any) drained.
    pub(crate) remove: Vec<String>,
    /// Brokers of the file started now: new ones, and those that did not run (a drain that
    /// ended, a start that failed).
    pub(crate) start: Vec<String>,
    /// Brokers of the file that start once the link of the same name has drained.
    pub(crate) wait: Vec<String>,
}

/// What the reloaded file (`file`: its broker names, in order), with `changes` against the
/// running config, does to `now`. What was changed at run time keeps its precedence: a broker
/// added by `add-broker` is not removed because the file lacks it, one removed by
/// `remove-broker` is not started because the file has it, and only brokers of the file are
/// restarted or get new rules from it.
pub(crate) fn reload(now: &Members<'_>, file: &[&str], changes: &[Change]) -> ReloadPlan {
    let in_file = |name: &str| file.contains(&name);
    let ours =
        |name: &str| in_file(name) && now.running.contains(name) && now.from_config.contains(name);
    let mut plan = ReloadPlan::default();
    for change in changes {
        match change {
            Change::Rules(name) if ours(name) => plan.rules.push(name.clone()),
            Change::Restart(name, _) if ours(name) => plan.restart.push(name.clone()),
            Change::Remove(name) if !now.added_at_runtime.contains(name.as_str()) => {
                plan.remove.push(name.clone())
            }
            // Additions start below; a reload with a process-wide change was refused before.
            _ => {}
        }
    }
    for &name in file {
        if now.running.contains(name) || now.removed_at_runtime.contains(name) {
            continue;
        }
        if now.draining.contains(name) {
            plan.wait.push(name.to_string());
        } else {
            plan.start.push(name.to_string());
        }
    }
    plan
}

/// How one link looks to the start-up part of readiness.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StartView<'a> {
    /// Its broker.
    pub(crate) name: &'a str,
    /// A consumer (this process or another) has had its subscriptions in place.
    pub(crate) consumed: bool,
    /// Connected now.
    pub(crate) connected: bool,
    /// Its last attempt failed (the error shows in status).
    pub(crate) failing: bool,
    /// It has reached its broker at least once.
    pub(crate) ever_connected: bool,
}

/// The links started with the process that hold readiness back: those that never reached
/// their broker yet (`waiting`), and those that did but whose broker nobody consumes yet
/// (`unconsumed`: what is published there now would reach no other broker). A consumed broker
/// holds nothing back, nor does one that cannot be reached (its error is in status: it must
/// not keep the others' process out of a load balancer).
pub(crate) fn start_blockers<'a>(
    links: impl IntoIterator<Item = StartView<'a>>,
) -> (Vec<String>, Vec<String>) {
    let (mut waiting, mut unconsumed) = (Vec::new(), Vec::new());
    for l in links {
        if l.consumed || (!l.connected && l.failing) {
            continue;
        }
        if l.ever_connected {
            unconsumed.push(l.name.to_string());
        } else {
            waiting.push(l.name.to_string());
        }
    }
    (waiting, unconsumed)
}

#[cfg(test)]
mod tests;
