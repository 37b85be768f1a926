//! Which park sessions of one origin broker its owner has read (see [`crate::park`]): the
//! bookkeeping of the drains, without their connections.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::oneshot;

/// The drains of one origin broker's park sessions, as its link starts them.
#[derive(Debug, Default)]
pub(crate) struct Drains {
    /// Targets whose park session was read (or is being read) since this process took the
    /// broker.
    ready: HashSet<Arc<str>>,
    /// Drains a takeover waits for: each tells once it has read everything (or ended).
    pending: Vec<oneshot::Receiver<()>>,
}

impl Drains {
    /// A takeover reads the park sessions of `targets`: one sender per target, for its drain
    /// to tell once it read everything; the takeover waits for all of them.
    pub(crate) fn start(&mut self, targets: Vec<Arc<str>>) -> Vec<(Arc<str>, oneshot::Sender<()>)> {
        targets
            .into_iter()
            .map(|target| {
                let (tx, rx) = oneshot::channel();
                self.pending.push(rx);
                self.ready.insert(target.clone());
                (target, tx)
            })
            .collect()
    }

    /// Whether every drain the takeover waits for has read everything (those that have are
    /// forgotten).
    pub(crate) fn all_read(&mut self) -> bool {
        self.pending
            .retain_mut(|rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        self.pending.is_empty()
    }

    /// Whether the takeover waits for a drain.
    pub(crate) fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Waits until the first drain waited for has read everything (or ended).
    pub(crate) async fn first_read(&mut self) {
        if let Some(rx) = self.pending.first_mut() {
            let _ = rx.await;
        }
    }

    /// The takeover stops waiting (the drains go on).
    pub(crate) fn stop_waiting(&mut self) {
        self.pending.clear();
    }

    /// Forgets everything: the next takeover reads every park session again.
    pub(crate) fn forget(&mut self) {
        *self = Self::default();
    }

    /// While consuming `origin`, with `names` the mesh's brokers now: the targets that joined
    /// since (their session is to be read, nobody waits for it) and those that left (their
    /// session is to be discarded).
    #[allow(clippy::type_complexity)]
    pub(crate) fn changes(
        &mut self,
        names: &[Arc<str>],
        origin: &str,
    ) -> (Vec<(Arc<str>, oneshot::Sender<()>)>, Vec<Arc<str>>) {
        let joined: Vec<(Arc<str>, oneshot::Sender<()>)> = names
            .iter()
            .filter(|t| &***t != origin && !self.ready.contains(*t))
            .map(|t| (t.clone(), oneshot::channel().0))
            .collect();
        self.ready.extend(joined.iter().map(|(t, _)| t.clone()));
        let left: Vec<Arc<str>> = self
            .ready
            .iter()
            .filter(|t| !names.contains(t))
            .cloned()
            .collect();
        for t in &left {
            self.ready.remove(t);
        }
        (joined, left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<Arc<str>> {
        n.iter().map(|s| Arc::from(*s)).collect()
    }

    #[test]
    fn a_takeover_waits_for_every_drain_it_started() {
        let mut d = Drains::default();
        assert!(d.all_read(), "nothing to wait for");
        let mut senders = d.start(names(&["b2", "b3"]));
        assert!(d.waiting() && !d.all_read());
        let (_, first) = senders.remove(0);
        first.send(()).unwrap();
        assert!(!d.all_read(), "one still reading");
        // A drain that ended without reading everything (its task gone) counts as done.
        drop(senders);
        assert!(d.all_read());
        assert!(!d.waiting());
    }

    #[test]
    fn waiting_can_stop_and_everything_can_be_forgotten() {
        let mut d = Drains::default();
        let _senders = d.start(names(&["b2"]));
        d.stop_waiting();
        assert!(d.all_read());
        // b2 was read: no second drain while consuming...
        let (joined, left) = d.changes(&names(&["b1", "b2"]), "b1");
        assert!(joined.is_empty() && left.is_empty());
        // ...until the next takeover.
        d.forget();
        let (joined, _) = d.changes(&names(&["b1", "b2"]), "b1");
        assert_eq!(joined.len(), 1);
    }

    #[test]
    fn targets_that_join_or_leave_while_consuming_are_found_once() {
        let mut d = Drains::default();
        let _s = d.start(names(&["b2"]));
        let (joined, left) = d.changes(&names(&["b1", "b2", "b4"]), "b1");
        assert_eq!(
            joined.iter().map(|(t, _)| &**t).collect::<Vec<_>>(),
            ["b4"],
            "never the origin itself"
        );
        assert!(left.is_empty());
        let (joined, left) = d.changes(&names(&["b1", "b4"]), "b1");
        assert!(joined.is_empty());
        assert_eq!(left, names(&["b2"]));
        let (joined, left) = d.changes(&names(&["b1", "b4"]), "b1");
        assert!(joined.is_empty() && left.is_empty());
    }
}
