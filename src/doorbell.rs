//! A doorbell: wakes the one task that waits on it.
//!
//! A link waits in a `select!` that polls every enabled branch at every pass, and a forwarded
//! message makes several passes on each link it crosses. With tokio's `Notify`, a wait that is
//! polled registers under the `Notify`'s mutex and is taken off under it again when the pass
//! ends, and a cancellation token's wait does the same and reads its flag under another mutex:
//! about 170 instructions per wait and pass (callgrind). A doorbell has one waiter, so a flag
//! and an [`AtomicWaker`] do: a pass costs two atomic operations and the waker's registration.
//!
//! A ring while nobody waits is kept (once, like `Notify::notify_one`'s permit): the next wait
//! returns at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use tokio_util::sync::CancellationToken;

/// A wake-up for one waiting task; ring from any thread.
#[derive(Debug, Default)]
pub(crate) struct Doorbell {
    rung: AtomicBool,
    waker: AtomicWaker,
}

/// As a [`std::task::Waker`], it rings: whatever is polled with it reports to the bell's
/// waiter (see `link::session::inline`).
impl std::task::Wake for Doorbell {
    fn wake(self: Arc<Self>) {
        self.ring();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ring();
    }
}

impl Doorbell {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Wakes the waiting task, or the next wait if none waits now.
    pub(crate) fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once the bell was rung since the last wait that returned (which takes the ring).
    pub(crate) fn poll_rung(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.rung.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A ring between the check above and the registration woke the previous waker, if any.
        if self.rung.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Registers `waker` as the waiter without taking a ring: whether the bell was rung (a
    /// ring before this woke the waker registered before it, if any).
    pub(crate) fn register(&self, waker: &std::task::Waker) -> bool {
        self.waker.register(waker);
        self.rung.load(Ordering::Acquire)
    }

    /// Waits for a ring (cancel-safe: a ring is taken only when this returns).
    pub(crate) async fn rung(&self) {
        std::future::poll_fn(|cx| self.poll_rung(cx)).await
    }

    /// Rings when the first of `tokens` is cancelled, and again once both are; then ends. So
    /// after each cancellation a ring follows, and the waiter asks the tokens which. A task of
    /// this costs two waits registered once, where a `select!` on the tokens themselves pays
    /// for both at every pass.
    pub(crate) async fn ring_on_cancel(self: Arc<Self>, tokens: [CancellationToken; 2]) {
        let [a, b] = tokens;
        tokio::select! {
            _ = a.cancelled() => {}
            _ = b.cancelled() => {}
        }
        self.ring();
        tokio::join!(a.cancelled(), b.cancelled());
        self.ring();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A ring while nobody waits is kept once: the next wait returns at once, the one after
    /// waits.
    #[tokio::test]
    async fn a_ring_is_kept_once() {
        let bell = Doorbell::new();
        bell.ring();
        bell.ring();
        bell.rung().await;
        let second = tokio::time::timeout(Duration::from_millis(20), bell.rung()).await;
        assert!(second.is_err(), "two rings before a wait are one");
    }

    /// A ring from another thread wakes the task that waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ring_wakes_the_waiting_task() {
        let bell = Arc::new(Doorbell::new());
        for _ in 0..1000 {
            let waiting = tokio::spawn({
                let bell = bell.clone();
                async move { bell.rung().await }
            });
            tokio::task::yield_now().await;
            bell.ring();
            tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .expect("the waiting task was woken")
                .unwrap();
        }
    }

    /// A wait dropped before the ring (a `select!` that took another branch) loses nothing.
    #[tokio::test]
    async fn a_dropped_wait_loses_no_ring() {
        let bell = Doorbell::new();
        let dropped = tokio::time::timeout(Duration::from_millis(5), bell.rung()).await;
        assert!(dropped.is_err());
        bell.ring();
        tokio::time::timeout(Duration::from_secs(10), bell.rung())
            .await
            .expect("the ring after a dropped wait is kept");
    }

    /// A ring follows each cancellation, in either order: the waiter woken by the first and
    /// the second finds each cancelled when it asks.
    #[tokio::test]
    async fn a_ring_follows_each_cancellation() {
        for second_first in [false, true] {
            let bell = Arc::new(Doorbell::new());
            let (stop, disconnect) = (CancellationToken::new(), CancellationToken::new());
            let watcher = tokio::spawn(
                bell.clone()
                    .ring_on_cancel([stop.clone(), disconnect.clone()]),
            );
            let (first, second) = if second_first {
                (&disconnect, &stop)
            } else {
                (&stop, &disconnect)
            };
            first.cancel();
            tokio::time::timeout(Duration::from_secs(10), bell.rung())
                .await
                .expect("a ring after the first cancellation");
            assert!(first.is_cancelled() && !second.is_cancelled());
            second.cancel();
            tokio::time::timeout(Duration::from_secs(10), bell.rung())
                .await
                .expect("a ring after the second");
            tokio::time::timeout(Duration::from_secs(10), watcher)
                .await
                .expect("the watcher ends once both are cancelled")
                .unwrap();
        }
    }
}
