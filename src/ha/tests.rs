//! The records, the view and the decision.

use super::*;

pub(super) fn me(name: &str, started: u64) -> Identity {
    Identity {
        instance: name.into(),
        nonce: 1,
        started,
        admin: String::new(),
        prefer: Vec::new(),
    }
}

/// A claim of `instance` written at `since`: not released, without a subscription note.
pub(super) fn owner_record(instance: &str, since: u64) -> OwnerRecord {
    OwnerRecord {
        instance: instance.into(),
        since,
        released: false,
        subscribed: None,
    }
}

/// An alive record of another process (nonce 7) that started at `started`.
pub(super) fn alive(started: u64) -> InstanceRecord {
    InstanceRecord {
        alive: true,
        nonce: 7,
        started,
        admin: String::new(),
        prefer: Vec::new(),
    }
}

fn synced_view(me: &Identity, now: Instant) -> View {
    let mut v = View::default();
    v.instance(&me.instance, me.record(true), true, me, now);
    assert!(!v.synced, "a stored copy of an earlier connection's record");
    v.instance(&me.instance, me.record(true), false, me, now);
    assert!(v.synced);
    v
}

/// The name of two that the rendezvous prefers for `broker`.
fn preferred<'a>(a: &'a str, b: &'a str, broker: &str) -> &'a str {
    if (score(a, broker), a) > (score(b, broker), b) {
        a
    } else {
        b
    }
}

#[test]
fn nothing_is_decided_before_the_view_is_synced() {
    let a = me("a", 1);
    assert_eq!(
        decide(&View::default(), &a, "b1", Instant::now()),
        Decision::Standby { owner: None }
    );
}

#[test]
fn alone_an_instance_claims_then_owns() {
    let now = Instant::now();
    let a = me("a", 1);
    let mut v = synced_view(&a, now);
    assert_eq!(decide(&v, &a, "b1", now), Decision::Claim);
    v.owner(Some(owner_record("a", 2)), false, now);
    assert_eq!(
        decide(&v, &a, "b1", now),
        Decision::Standby { owner: None },
        "a fresh claim stands a moment first"
    );
    assert_eq!(decide(&v, &a, "b1", now + CLAIM_SETTLE), Decision::Own);
}

#[test]
fn an_uncontested_claim_owns_at_once_until_another_instance_shows_up() {
    let now = Instant::now();
    let a = me("a", 1);
    let mut v = synced_view(&a, now);
    // A record of a process that is gone does not contest anything.
    let mut gone = alive(1);
    gone.alive = false;
    v.instance("old", gone, true, &a, now);
    assert!(v.alone(&a, now));
    assert_eq!(decide(&v, &a, "b1", now), Decision::Claim);
    v.uncontested = true;
    let claim = owner_record("a", 2);
    v.owner(Some(claim.clone()), false, now);
    assert_eq!(
        decide(&v, &a, "b1", now),
        Decision::Own,
        "nobody else to wait for"
    );
    // Another instance shows up before the session was taken: it may have claimed too.
    v.instance("b", alive(1), false, &a, now);
    assert!(!v.uncontested && !v.alone(&a, now));
    v.owner(Some(claim), false, now);
    assert_eq!(
        decide(&v, &a, "b1", now),
        Decision::Standby { owner: None },
        "a contested claim stands a moment first"
    );
    assert_eq!(decide(&v, &a, "b1", now + CLAIM_SETTLE), Decision::Own);
}

#[test]
fn the_consumer_is_this_process_or_a_live_owner_that_noted_its_subscriptions() {
    let now = Instant::now();
    let b = me("b", 1);
    let mut v = synced_view(&b, now);
    assert_eq!(v.consumer(&b, None, now), None);
    assert_eq!(
        v.consumer(&b, Some(42), now),
        Some(Consumer {
            instance: "b".into(),
            this: true,
            since: 42
        })
    );
    v.instance("a", alive(1), false, &b, now);
    let mut record = owner_record("a", 5);
    v.owner(Some(record.clone()), false, now);
    assert_eq!(
        v.consumer(&b, None, now),
        None,
        "claimed, not subscribed yet"
    );
    // A note left by an earlier run of "a" (another nonce).
    record.subscribed = Some(Subscribed { since: 9, nonce: 8 });
    v.owner(Some(record.clone()), false, now);
    assert_eq!(v.consumer(&b, None, now), None, "an earlier run's note");
    record.subscribed = Some(Subscribed { since: 9, nonce: 7 });
    v.owner(Some(record.clone()), false, now);
    let a_consumes = Some(Consumer {
        instance: "a".into(),
        this: false,
        since: 9,
    });
    assert_eq!(v.consumer(&b, None, now), a_consumes);
    assert_eq!(v.consumer(&b, None, now + LIVENESS), None, "gone stale");
    record.released = true;
    v.owner(Some(record), false, now);
    assert_eq!(v.consumer(&b, None, now), None, "released");
}

#[test]
fn an_owner_record_without_a_subscription_note_still_parses() {
    let old = br#"{"instance":"a","since":5,"released":false}"#;
    let r: OwnerRecord = serde_json::from_slice(old).expect("a record of an older version");
    assert_eq!(r.subscribed, None);
    let back = serde_json::to_string(&r).expect("serializes");
    assert_eq!(back.as_bytes(), old, "a claim writes no note");
}

#[test]
fn two_instances_agree_on_one_claimer_per_broker() {
    let now = Instant::now();
    let (a, b) = (me("a", 1), me("b", 1));
    for broker in ["b1", "b2", "b3", "b4", "b5", "b6"] {
        let mut va = synced_view(&a, now);
        va.instance("b", alive(1), false, &a, now);
        let mut vb = synced_view(&b, now);
        vb.instance("a", alive(1), false, &b, now);
        let claims = [decide(&va, &a, broker, now), decide(&vb, &b, broker, now)]
            .iter()
            .filter(|d| **d == Decision::Claim)
            .count();
        assert_eq!(claims, 1, "{broker}");
        let winner = preferred("a", "b", broker);
        let view = if winner == "a" { &va } else { &vb };
        let who = if winner == "a" { &a } else { &b };
        assert_eq!(decide(view, who, broker, now), Decision::Claim);
    }
}

#[test]
fn a_live_owner_is_kept_and_a_gone_one_replaced() {
    let now = Instant::now();
    let b = me("b", 1);
    let mut v = synced_view(&b, now);
    v.instance("a", alive(1), false, &b, now);
    v.owner(Some(owner_record("a", 5)), true, now);
    // Sticky, whatever the rendezvous says.
    assert_eq!(
        decide(&v, &b, "b1", now),
        Decision::Standby {
            owner: Some("a".into())
        }
    );
    // Its Will.
    let mut gone = alive(1);
    gone.alive = false;
    v.instance("a", gone, false, &b, now);
    assert_eq!(decide(&v, &b, "b1", now), Decision::Claim);
    // Or a record gone stale.
    v.instance("a", alive(1), true, &b, now);
    let later = now + LIVENESS + Duration::from_secs(1);
    let mut v2 = v.clone();
    v2.synced = true;
    assert_eq!(decide(&v2, &b, "b1", later), Decision::Claim);
    // Or released.
    v.owner(
        Some(OwnerRecord {
            released: true,
            ..owner_record("a", 5)
        }),
        true,
        now,
    );
    assert_eq!(decide(&v, &b, "b1", now), Decision::Claim);
}

#[test]
fn an_owner_hands_over_to_a_newcomer_only_after_it_settled() {
    let now = Instant::now();
    // A broker the rendezvous gives to "b" rather than "a".
    let broker = (0..100)
        .map(|i| format!("b{i}"))
        .find(|br| preferred("a", "b", br) == "b")
        .expect("some broker prefers b");
    let a = me("a", 1);
    let mut v = synced_view(&a, now);
    v.owner(Some(owner_record("a", 10)), true, now);
    // "b" started before "a" claimed: it merely reconnected; no handover.
    v.instance("b", alive(5), false, &a, now);
    let later = now + REBALANCE_SETTLE;
    assert_eq!(decide(&v, &a, &broker, later), Decision::Own);
    // "b" is a newcomer: handed over once it has been live long enough.
    v.instance("b", alive(20), false, &a, now);
    assert_eq!(decide(&v, &a, &broker, now), Decision::Own);
    assert_eq!(
        decide(&v, &a, &broker, later),
        Decision::HandOver { to: "b".into() }
    );
}

/// A record of another process that prefers `brokers`.
fn preferring(started: u64, brokers: &[&str]) -> InstanceRecord {
    InstanceRecord {
        prefer: brokers.iter().map(|b| b.to_string()).collect(),
        ..alive(started)
    }
}

#[test]
fn an_instance_that_prefers_a_broker_claims_it_whatever_the_rendezvous() {
    let now = Instant::now();
    for broker in ["b1", "b2", "b3", "b4", "b5", "b6"] {
        // "a" prefers the broker; "b" does not: "a" claims it, "b" stands by, from both views.
        let mut a = me("a", 1);
        a.prefer = vec![broker.to_string()];
        let b = me("b", 1);
        let mut va = synced_view(&a, now);
        va.instance("b", alive(1), false, &a, now);
        let mut vb = synced_view(&b, now);
        vb.instance("a", preferring(1, &[broker]), false, &b, now);
        assert_eq!(decide(&va, &a, broker, now), Decision::Claim, "{broker}");
        assert_eq!(
            decide(&vb, &b, broker, now),
            Decision::Standby { owner: None },
            "{broker}"
        );
        // Gone: any live instance takes it (failover).
        let mut gone = preferring(1, &[broker]);
        gone.alive = false;
        vb.instance("a", gone, false, &b, now);
        assert_eq!(decide(&vb, &b, broker, now), Decision::Claim, "{broker}");
    }
}

#[test]
fn an_owner_hands_a_broker_back_to_the_instance_that_prefers_it_even_one_that_reconnected() {
    let now = Instant::now();
    let later = now + REBALANCE_SETTLE;
    // A broker the rendezvous gives to "b" rather than "a": "a" owns it only as a failover.
    let broker = (0..100)
        .map(|i| format!("b{i}"))
        .find(|br| preferred("a", "b", br) == "b")
        .expect("some broker prefers b");
    let b = me("b", 1);
    let mut v = synced_view(&b, now);
    v.owner(Some(owner_record("b", 10)), true, now);
    // "a" started before "b" took the broker (it was cut off and came back), and prefers it.
    v.instance("a", preferring(5, &[&broker]), false, &b, now);
    assert_eq!(
        decide(&v, &b, &broker, now),
        Decision::Own,
        "not settled yet"
    );
    assert_eq!(
        decide(&v, &b, &broker, later),
        Decision::HandOver { to: "a".into() }
    );
    // An owner that prefers the broker itself keeps it (no flapping between two that do).
    let mut b2 = me("b", 1);
    b2.prefer = vec![broker.clone()];
    assert_eq!(decide(&v, &b2, &broker, later), Decision::Own);
    // Without the preference "a" merely reconnected: sticky.
    v.instance("a", alive(5), false, &b, now);
    assert_eq!(decide(&v, &b, &broker, later), Decision::Own);
}

#[test]
fn a_record_without_prefer_parses_and_an_empty_one_is_not_written() {
    let json = r#"{"alive":true,"nonce":7,"started":1,"admin":""}"#;
    let r: InstanceRecord = serde_json::from_str(json).expect("parses");
    assert!(r.prefer.is_empty());
    assert_eq!(serde_json::to_string(&r).expect("writes"), json);
}

#[test]
fn a_live_record_of_this_name_from_another_process_is_reported() {
    let now = Instant::now();
    let a = me("a", 1);
    let mut v = synced_view(&a, now);
    v.instance("a", alive(1), true, &a, now);
    assert_eq!(v.impostor, None, "a stored record of an earlier run");
    v.instance("a", alive(1), false, &a, now);
    assert_eq!(v.impostor, Some(7));
}
