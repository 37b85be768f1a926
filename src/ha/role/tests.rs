//! The transitions tests/ha.rs exercises end to end against mosquitto, driven here with a clock
//! of the test's own.

use super::*;
use crate::ha::tests::{alive, owner_record};
use crate::ha::{CLAIM_SETTLE, LIVENESS, REBALANCE_SETTLE, score};

/// Wall clock at the test's time zero.
const BASE: u64 = 1_800_000_000_000;
const BROKER: &str = "b1";

/// A clock: `n(ms)` is `ms` after the test's time zero, on both clocks.
struct Clock(Instant);

impl Clock {
    fn new() -> Self {
        Self(Instant::now())
    }

    fn n(&self, ms: u64) -> Now {
        Now {
            at: self.0 + Duration::from_millis(ms),
            unix_ms: BASE + ms,
        }
    }
}

/// This process: instance `a`, nonce 1.
fn me() -> Identity {
    crate::ha::tests::me("a", BASE)
}

/// An instance name the rendezvous ranks above (`above`) or below this instance for [`BROKER`].
fn other(above: bool) -> String {
    (0..)
        .map(|i| format!("p{i}"))
        .find(|n| (score(n, BROKER) > score("a", BROKER)) == above)
        .unwrap_or_default()
}

fn switches(actions: &[Action]) -> Vec<&SwitchWhy> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Switch(why) => Some(why),
            _ => None,
        })
        .collect()
}

fn claims(actions: &[Action]) -> Vec<&OwnerRecord> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::WriteOwner { record, .. } => Some(record),
            _ => None,
        })
        .collect()
}

/// A connection of `r` that got its CONNACK at `t`.
fn connect(r: &mut Role, c: &Clock, t: u64) -> Vec<Action> {
    r.connecting();
    let actions = r.connected(c.n(t));
    r.announced(c.n(t));
    actions
}

/// `a`, alone on the broker, claims it and (without parking) takes its session over; returns
/// the role on its consuming connection, subscribed at 10 ms, and the claim's time.
fn owning(c: &Clock) -> (Role, u64) {
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    connect(&mut r, c, 0);
    let claim = claims(&r.instance("a", Some(me().record(true)), false, c.n(1)))[0].clone();
    let taken = r.owner(Some(claim.clone()), None, false, c.n(2)).unwrap();
    assert_eq!(switches(&taken), [&SwitchWhy::TakeOver]);
    assert!(r.switch_ready(true, c.n(3)));
    r.ended(End::Switched, c.n(3));
    assert!(r.consumer());
    connect(&mut r, c, 4);
    // The broker sends the stored owner record before this connection's own record.
    assert_eq!(r.owner(Some(claim.clone()), None, true, c.n(5)), Ok(vec![]));
    assert_eq!(
        r.instance("a", Some(me().record(true)), false, c.n(6)),
        vec![]
    );
    let note = r.subscribed(c.n(10));
    assert_eq!(
        claims(&note)[0].subscribed.map(|s| s.since),
        Some(BASE + 10)
    );
    (r, claim.since)
}

#[test]
fn alone_a_link_claims_reads_its_parks_then_takes_the_session() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, true, Policy::default());
    assert!(!r.consumer(), "a coordinating link starts as a publisher");
    assert_eq!(
        connect(&mut r, &c, 0),
        [Action::SubscribeControl, Action::Announce { alive: true }]
    );
    // Nothing is decided before the connection read its own record back.
    assert!(claims(&r.tick(c.n(50))).is_empty());
    let claim = r.instance("a", Some(me().record(true)), false, c.n(60));
    let claim = claims(&claim)[0].clone();
    assert_eq!(
        (claim.instance.as_str(), claim.released, claim.since),
        ("a", false, BASE + 60)
    );
    // Uncontested: it counts as soon as it is read back, once the park sessions are read.
    let read = r.owner(Some(claim), None, false, c.n(70)).unwrap();
    assert_eq!(read, [Action::ReadParks]);
    assert!(
        switches(&r.tick(c.n(170))).is_empty(),
        "waits for its parks"
    );
    assert_eq!(
        r.parks_read(c.n(200)),
        [Action::Switch(SwitchWhy::TakeOver)]
    );
    assert!(r.switching());
    assert_eq!(r.consumer_now(c.n(200)), None);
    assert!(
        !r.switch_ready(false, c.n(300)),
        "waits for what is in flight"
    );
    assert!(r.switch_ready(true, c.n(300)));
    assert_eq!(
        r.ended(End::Switched, c.n(300)),
        [Action::ForgetPacketIds, Action::ForgetSubscriptions]
    );
    assert!(r.consumer());
}

#[test]
fn a_consuming_connection_notes_its_subscriptions_and_reports_itself_as_the_consumer() {
    let c = Clock::new();
    let (r, _) = owning(&c);
    let consumer = r.consumer_now(c.n(11)).expect("consumed");
    assert!(consumer.this);
    assert_eq!(consumer.since, BASE + 10);
    let status = r.status(c.n(11));
    assert!(status.consuming);
    assert_eq!(status.owner.as_deref(), Some("a"));
}

#[test]
fn a_contested_claim_stands_claim_settle_before_it_counts() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    connect(&mut r, &c, 0);
    let below = other(false);
    // Another live instance, which the rendezvous ranks below this one: this one claims...
    assert_eq!(r.instance(&below, Some(alive(BASE)), true, c.n(1)), vec![]);
    let claim = claims(&r.instance("a", Some(me().record(true)), false, c.n(2)))[0].clone();
    // ...but the other may have claimed at the same time: the claim must stand first.
    assert_eq!(r.owner(Some(claim), None, false, c.n(10)), Ok(vec![]));
    let settle = CLAIM_SETTLE.as_millis() as u64;
    assert!(switches(&r.tick(c.n(10 + settle - 1))).is_empty());
    assert_eq!(switches(&r.tick(c.n(10 + settle))), [&SwitchWhy::TakeOver]);
}

#[test]
fn claims_are_not_repeated_within_claim_rest() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    connect(&mut r, &c, 0);
    assert_eq!(
        claims(&r.instance("a", Some(me().record(true)), false, c.n(1))).len(),
        1
    );
    // The claim's answer is slow to come back.
    assert!(claims(&r.tick(c.n(1_999))).is_empty());
    assert_eq!(claims(&r.tick(c.n(2_001))).len(), 1);
}

#[test]
fn an_owner_hands_over_to_a_newcomer_once_it_was_live_rebalance_settle() {
    let c = Clock::new();
    let (mut r, since) = owning(&c);
    let newcomer = other(true);
    // It started after this instance took the broker.
    let came = r.instance(&newcomer, Some(alive(since + 100)), false, c.n(1_000));
    assert!(switches(&came).is_empty());
    let settle = REBALANCE_SETTLE.as_millis() as u64;
    assert!(switches(&r.tick(c.n(1_000 + settle - 1))).is_empty());
    // (Its record is refreshed every heartbeat.)
    r.instance(
        &newcomer,
        Some(alive(since + 100)),
        false,
        c.n(1_000 + settle - 1),
    );
    let handing = r.tick(c.n(1_000 + settle));
    assert_eq!(
        switches(&handing),
        [&SwitchWhy::HandOver {
            to: newcomer.clone()
        }]
    );
    assert!(
        claims(&handing).is_empty(),
        "released once what is in flight is done"
    );
    assert_eq!(r.consumer_now(c.n(1_000 + settle)), None);
    let release = r.leaving(c.n(1_000 + settle + 50));
    let released = claims(&release)[0];
    assert!(released.released && released.instance == "a");
    assert_eq!(
        r.ended(End::Switched, c.n(1_000 + settle + 60)),
        [Action::ForgetPacketIds, Action::ForgetParks]
    );
    assert!(!r.consumer());
}

#[test]
fn a_switch_leaves_after_switch_timeout_with_messages_in_flight() {
    let c = Clock::new();
    let (mut r, since) = owning(&c);
    let newcomer = other(true);
    r.instance(&newcomer, Some(alive(since + 100)), false, c.n(100));
    let settle = REBALANCE_SETTLE.as_millis() as u64;
    r.instance(&newcomer, Some(alive(since + 100)), false, c.n(99 + settle));
    assert_eq!(switches(&r.tick(c.n(100 + settle))).len(), 1);
    let timeout = Policy::default().switch_timeout.as_millis() as u64;
    assert!(!r.switch_ready(false, c.n(100 + settle + timeout - 1)));
    assert!(r.switch_ready(false, c.n(100 + settle + timeout)));
}

#[test]
fn an_owner_keeps_the_broker_from_an_instance_that_merely_reconnected() {
    let c = Clock::new();
    let (mut r, since) = owning(&c);
    // Preferred by the rendezvous, but it was there before this instance took the broker.
    let preferred = other(true);
    let settle = REBALANCE_SETTLE.as_millis() as u64;
    for t in (100..=100 + 3 * settle).step_by(1_000) {
        r.instance(&preferred, Some(alive(since - 1)), false, c.n(t));
        let actions = r.tick(c.n(t));
        assert!(switches(&actions).is_empty() && claims(&actions).is_empty());
    }
    assert!(r.consumer_now(c.n(100 + 3 * settle)).is_some());
}

#[test]
fn an_owner_that_finds_another_owning_steps_down_once_and_stays_down() {
    // The SIGSTOP case: this owner was frozen longer than LIVENESS; another instance claimed
    // the broker meanwhile. On waking it reads that record on its connection.
    let c = Clock::new();
    let (mut r, _) = owning(&c);
    let o = other(false);
    let woke = 20_000;
    r.instance(&o, Some(alive(BASE)), false, c.n(woke));
    let down = r
        .owner(
            Some(owner_record(&o, BASE + 16_000)),
            None,
            false,
            c.n(woke + 1),
        )
        .unwrap();
    assert_eq!(switches(&down), [&SwitchWhy::StepDown { owner: o.clone() }]);
    for t in [woke + 100, woke + 200, woke + 5_000] {
        assert!(
            switches(&r.tick(c.n(t))).is_empty(),
            "one switch, no flapping"
        );
    }
    assert!(r.switch_ready(true, c.n(woke + 5_000)));
    r.ended(End::Switched, c.n(woke + 5_000));
    assert!(!r.consumer());
    // As a publisher it leaves the broker to the live owner: no claim, no takeover.
    connect(&mut r, &c, woke + 6_000);
    r.owner(
        Some(owner_record(&o, BASE + 16_000)),
        None,
        true,
        c.n(woke + 6_001),
    )
    .unwrap();
    r.instance(&o, Some(alive(BASE)), true, c.n(woke + 6_001));
    let back = r.instance("a", Some(me().record(true)), false, c.n(woke + 6_002));
    assert!(claims(&back).is_empty() && switches(&back).is_empty());
    for t in (woke + 6_100..woke + 14_000).step_by(1_000) {
        r.instance(&o, Some(alive(BASE)), false, c.n(t));
        let actions = r.tick(c.n(t));
        assert!(claims(&actions).is_empty() && switches(&actions).is_empty());
    }
}

#[test]
fn a_gone_owner_is_replaced_once_its_record_is_stale() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    connect(&mut r, &c, 0);
    let o = other(false);
    r.owner(Some(owner_record(&o, BASE - 1)), None, true, c.n(1))
        .unwrap();
    r.instance(&o, Some(alive(BASE - 10)), true, c.n(1));
    let synced = r.instance("a", Some(me().record(true)), false, c.n(2));
    assert!(claims(&synced).is_empty(), "the owner is live");
    let liveness = LIVENESS.as_millis() as u64;
    assert!(claims(&r.tick(c.n(liveness))).is_empty());
    let claim = r.tick(c.n(1 + liveness));
    assert_eq!(claims(&claim)[0].instance, "a", "its record went stale");
}

#[test]
fn a_link_that_cannot_read_its_records_back_consumes_alone() {
    let c = Clock::new();
    let sync = Policy::default().sync_timeout.as_millis() as u64;
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    connect(&mut r, &c, 0);
    assert!(switches(&r.tick(c.n(sync - 1))).is_empty());
    assert_eq!(switches(&r.tick(c.n(sync))), [&SwitchWhy::TakeOver]);
    // The same when the broker refuses the control subscription outright.
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    connect(&mut r, &c, 0);
    assert_eq!(switches(&r.control_refused(c.n(5))), [&SwitchWhy::TakeOver]);
}

#[test]
fn a_broker_that_drops_two_connections_before_they_sync_is_not_coordinated_on() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    let lost = End::Lost {
        had_connack: true,
        peer_closed: true,
    };
    connect(&mut r, &c, 0);
    assert!(!r.ended(lost, c.n(10)).contains(&Action::ProbesOff));
    assert!(r.coordinates());
    connect(&mut r, &c, 20);
    assert_eq!(r.ended(lost, c.n(30)), [Action::ProbesOff]);
    assert!(!r.coordinates());
    assert!(r.consumer());
    assert_eq!(connect(&mut r, &c, 40), vec![], "no control subscription");
    assert!(r.status(c.n(41)).consuming);
}

#[test]
fn a_lost_consuming_connection_reads_the_records_before_consuming_again() {
    let c = Clock::new();
    let (mut r, _) = owning(&c);
    let lost = End::Lost {
        had_connack: true,
        peer_closed: true,
    };
    assert_eq!(
        r.ended(lost, c.n(100)),
        [Action::ForgetPacketIds, Action::ForgetParks]
    );
    assert!(!r.consumer());
    // The owner record still names this instance: nobody of the mesh took the session over.
    connect(&mut r, &c, 200);
    r.owner(Some(owner_record("a", BASE + 1)), None, true, c.n(201))
        .unwrap();
    let back = r.instance("a", Some(me().record(true)), false, c.n(202));
    assert_eq!(
        back,
        [
            Action::SessionTaken(Duration::from_millis(102)),
            Action::Switch(SwitchWhy::TakeOver)
        ]
    );
}

#[test]
fn a_takeover_consumes_anyway_after_park_wait() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, true, Policy::default());
    connect(&mut r, &c, 0);
    let claim = claims(&r.instance("a", Some(me().record(true)), false, c.n(1)))[0].clone();
    assert_eq!(
        r.owner(Some(claim), None, false, c.n(2)),
        Ok(vec![Action::ReadParks])
    );
    let wait = Policy::default().park_wait.as_millis() as u64;
    assert!(switches(&r.tick(c.n(1 + wait))).is_empty());
    let late = r.tick(c.n(2 + wait));
    assert!(late.contains(&Action::StopWaitingForParks));
    assert_eq!(switches(&late), [&SwitchWhy::TakeOver]);
}

#[test]
fn a_claimer_still_reading_its_parks_releases_for_a_newcomer() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, true, Policy::default());
    connect(&mut r, &c, 0);
    let claim = claims(&r.instance("a", Some(me().record(true)), false, c.n(1)))[0].clone();
    let since = claim.since;
    r.owner(Some(claim), None, false, c.n(2)).unwrap();
    let newcomer = other(true);
    let settle = REBALANCE_SETTLE.as_millis() as u64;
    r.instance(&newcomer, Some(alive(since + 1)), false, c.n(2_100));
    r.instance(
        &newcomer,
        Some(alive(since + 1)),
        false,
        c.n(2_099 + settle),
    );
    let release = r.tick(c.n(2_100 + settle));
    assert!(release.contains(&Action::ForgetParks));
    assert!(release.contains(&Action::WriteOwner {
        record: OwnerRecord {
            released: true,
            ..owner_record("a", BASE + 2_100 + settle)
        },
        handover: true
    }));
}

#[test]
fn owner_records_only_move_forward() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    connect(&mut r, &c, 0);
    let o = owner_record("x", BASE);
    assert!(
        r.owner(Some(o.clone()), Some(100_000), true, c.n(1))
            .is_ok()
    );
    let replay = 100_000 - crate::seal::SKEW_MS - 1;
    assert_eq!(
        r.owner(Some(o.clone()), Some(replay), false, c.n(2)),
        Err(Stale)
    );
    assert!(r.owner(Some(o), Some(replay + 1), false, c.n(3)).is_ok());
}

#[test]
fn the_will_of_an_earlier_connection_is_answered_with_a_fresh_record() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    connect(&mut r, &c, 0);
    let will = me().record(false);
    assert_eq!(
        r.instance("a", Some(will.clone()), false, c.n(5)),
        [Action::Announce { alive: true }]
    );
    r.stop();
    assert_eq!(r.instance("a", Some(will), false, c.n(6)), vec![]);
}

#[test]
fn an_impostor_is_reported() {
    let c = Clock::new();
    let mut r = Role::new(me(), BROKER, true, false, Policy::default());
    connect(&mut r, &c, 0);
    let theirs = InstanceRecord {
        nonce: 99,
        ..me().record(true)
    };
    assert!(
        r.instance("a", Some(theirs), false, c.n(1))
            .contains(&Action::Impostor)
    );
}

#[test]
fn shutdown_releases_what_it_consumes_and_says_it_is_gone() {
    let c = Clock::new();
    let (mut r, _) = owning(&c);
    let closing = r.closing(c.n(50));
    assert!(claims(&closing)[0].released);
    assert_eq!(closing.last(), Some(&Action::Announce { alive: false }));
}
