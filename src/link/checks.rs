//! A connection's periodic checks on one timer.
//!
//! A link waits in a `select!` that polls every enabled branch at every pass, and a forwarded
//! message makes several passes on each link it crosses. Three intervals (the HA check, the
//! stall check, the spool check) were three timers polled at each pass; one timer at the
//! shortest period, with a due time per check, costs one poll. Each check runs at the first
//! tick at or after its due time, then is due its period later.
//!
//! The timer runs in a task of its own that rings a doorbell at each tick: a link polls the
//! doorbell (about 50 instructions, see [`crate::doorbell`]) where polling the timer itself cost
//! about 150 at every pass (callgrind).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::task::AbortOnDropHandle;

use crate::doorbell::Doorbell;
use crate::policy::Policy;

/// One check's period and next due time.
#[derive(Debug)]
struct Due {
    every: Duration,
    next: Instant,
}

impl Due {
    /// Due at once, then every `every`.
    fn new(every: Duration, now: Instant) -> Self {
        Self { every, next: now }
    }

    /// Whether the check runs at `now`; if so it is due again `every` later.
    fn take(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.every;
        true
    }
}

/// Which checks are due at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fired {
    /// [`Policy::check`]: the HA role decides again.
    pub(super) ha: bool,
    /// [`Policy::stall_check`]: does the target make progress.
    pub(super) stall: bool,
    /// [`Policy::spool_check`]: the spool's state.
    pub(super) spool: bool,
}

/// The timer and the due times of one connection's checks.
#[derive(Debug)]
pub(super) struct Checks {
    /// The timer's period.
    #[cfg(test)]
    period: Duration,
    /// Rung at each tick by `_timer`.
    tick: Arc<Doorbell>,
    /// The timer's task (ended with the checks).
    _timer: AbortOnDropHandle<()>,
    ha: Due,
    stall: Due,
    spool: Due,
}

impl Checks {
    /// All three due at the first tick, which is at once. The timer ticks at the shortest
    /// period of the checks that run: the HA check's only when the link `coordinates` (a link
    /// stops coordinating during a connection, never starts).
    pub(super) fn new(policy: &Policy, coordinates: bool) -> Self {
        Self::starting(policy, coordinates, Instant::now())
    }

    /// [`Checks::new`] with the first tick and due times at `now`.
    fn starting(policy: &Policy, coordinates: bool, now: Instant) -> Self {
        let others = policy.stall_check.min(policy.spool_check);
        let period = if coordinates {
            policy.check.min(others)
        } else {
            others
        };
        let tick = Arc::new(Doorbell::new());
        let timer = {
            let tick = tick.clone();
            let mut interval = tokio::time::interval_at(now, period);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tokio::spawn(async move {
                loop {
                    interval.tick().await;
                    tick.ring();
                }
            })
        };
        Self {
            #[cfg(test)]
            period,
            tick,
            _timer: AbortOnDropHandle::new(timer),
            ha: Due::new(policy.check, now),
            stall: Due::new(policy.stall_check, now),
            spool: Due::new(policy.spool_check, now),
        }
    }

    /// The next tick and what is due at it (cancel-safe: a tick is taken only when this
    /// returns; ticks the link was too busy to take count once).
    pub(super) async fn next(&mut self) -> Fired {
        self.tick.rung().await;
        self.due(Instant::now())
    }

    fn due(&mut self, now: Instant) -> Fired {
        Fired {
            ha: self.ha.take(now),
            stall: self.stall.take(now),
            spool: self.spool.take(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(check: u64, stall: u64, spool: u64) -> Policy {
        Policy {
            check: Duration::from_millis(check),
            stall_check: Duration::from_millis(stall),
            spool_check: Duration::from_millis(spool),
            ..Policy::default()
        }
    }

    /// Each check runs at its own period on the shared tick; all at the first.
    #[tokio::test]
    async fn each_check_keeps_its_own_period() {
        let p = policy(100, 1000, 5000);
        let start = Instant::now();
        let mut c = Checks::starting(&p, true, start);
        let (mut ha, mut stall, mut spool) = (0, 0, 0);
        for i in 0..100u64 {
            let f = c.due(start + Duration::from_millis(100 * i));
            if i == 0 {
                assert_eq!(
                    f,
                    Fired {
                        ha: true,
                        stall: true,
                        spool: true
                    }
                );
            }
            ha += u32::from(f.ha);
            stall += u32::from(f.stall);
            spool += u32::from(f.spool);
        }
        // 10 s of ticks: at 0, 0.1, …, 9.9 s.
        assert_eq!((ha, stall, spool), (100, 10, 2));
    }

    /// A late tick runs what is due then, and the next due time counts from it.
    #[test]
    fn a_late_tick_does_not_bunch_checks_up() {
        let start = Instant::now();
        let mut d = Due::new(Duration::from_secs(1), start);
        assert!(d.take(start));
        assert!(!d.take(start + Duration::from_millis(999)));
        assert!(d.take(start + Duration::from_millis(3500)));
        assert!(!d.take(start + Duration::from_millis(4000)));
        assert!(d.take(start + Duration::from_millis(4500)));
    }

    /// The timer ticks at the shortest period: the next tick after the first runs the check
    /// with that period alone.
    #[tokio::test]
    async fn the_timer_ticks_at_the_shortest_period() {
        let mut c = Checks::new(&policy(1000, 20, 5000), true);
        let all = Fired {
            ha: true,
            stall: true,
            spool: true,
        };
        assert_eq!(c.next().await, all);
        let f = c.next().await;
        assert_eq!(
            f,
            Fired {
                ha: false,
                stall: true,
                spool: false
            }
        );
    }

    /// Without the HA check, the timer ticks at the period of the others.
    #[tokio::test]
    async fn without_coordination_the_ha_period_does_not_set_the_pace() {
        let c = Checks::new(&policy(10, 1000, 5000), false);
        assert_eq!(c.period, Duration::from_secs(1));
        let c = Checks::new(&policy(10, 1000, 5000), true);
        assert_eq!(c.period, Duration::from_millis(10));
    }
}
