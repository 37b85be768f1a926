//! Link threads: where the links run.
//!
//! Every link runs on one of `bridge.worker_threads` threads, each running a current-thread
//! tokio runtime, together with the tasks it spawns (a 3.1.1 connection's driver, lanes, park
//! readers). A one-worker multi-thread runtime, used before, read the clock about three times
//! as often for its own tuning and kept a work-stealing queue nobody stole from: a
//! current-thread one runs the same tasks on the same thread with 4 % fewer instructions per
//! message (docs/BENCHMARKS.md, twenty-second session).
//!
//! A message crosses several tasks on its way (link → target link, and back for the
//! acknowledgement; on 3.1.1 through each connection's driver too). On one shared work-stealing
//! runtime those tasks spread over all workers, and a hand-over often wakes another one. Here a
//! link's own hand-overs stay on its thread: only the hand-over to a target link on another
//! thread wakes that thread, and only when it is idle. Measured in docs/BENCHMARKS.md ("link
//! threads").
//!
//! Links are packed: a new link goes to the first thread that runs fewer than
//! `bridge.links_per_thread` links ([`LINKS_PER_THREAD`](crate::config::LINKS_PER_THREAD) by
//! default), and only when every thread has that many to the one that runs the fewest. A
//! hand-over between two threads costs a wake-up, so a small mesh (the usual 2-4 brokers) runs
//! on one thread, which forwards tens of thousands of messages per second; a larger one spreads
//! over the threads, where one would fall behind on the fan-out. With 1, every link gets a
//! thread of its own (while there are threads): more CPU per message, but a small mesh can use
//! more than one core. A link that ends frees its place. The control plane (admin API,
//! supervisor, signals) stays on the runtime that called [`LinkThreads::start`].
//!
//! A thread that runs out of work after a spell in which it had fallen behind (a read found at
//! least [`BUSY_BATCH`] events waiting, or a target took that many messages from its queue at
//! once) first lets the other processes on its core run (`sched_yield`), and only then sleeps
//! in the reactor. Flat out, a link thread that forwards faster than the brokers feed it
//! otherwise sleeps and is woken for every few messages, about 6 000 times a second, and each
//! sleep, wake-up and small read costs more in the kernel than the messages it brings (the
//! switch alone was 12 % of the thread's CPU, and a small read makes the kernel send a bare TCP
//! acknowledgement). After the yield, what the brokers wrote meanwhile is there: one read and
//! one write per socket carry it. Flat out at 3 brokers, CPU per forwarded message fell from
//! 7.25 to 3.5 µs (QoS 1) and from 1.75-2.5 to 1.5 µs (QoS 0), context switches 7-fold
//! (docs/BENCHMARKS.md, twenty-third session). At a moderate rate a thread never falls that far
//! behind (at 2 000 msg/s and 8 brokers no batch reached 8): it does not yield, and latency is
//! as before. On a machine with idle cores the yield returns at once.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[cfg(test)]
use crate::config::LINKS_PER_THREAD;

/// The threads that run the links.
#[derive(Debug)]
pub(crate) struct LinkThreads {
    threads: Vec<LinkThread>,
    /// Links a thread takes before the next one is used.
    per_thread: usize,
}

#[derive(Debug)]
struct LinkThread {
    /// Spawns onto the thread's runtime.
    handle: Handle,
    /// Dropped, ends the thread, which shuts its runtime down without waiting for its tasks.
    _stop: oneshot::Sender<()>,
    /// Links running on it now.
    links: Arc<AtomicUsize>,
}

impl LinkThreads {
    /// Starts `count` threads (at least one), named `link-0`, `link-1`, …, each taking
    /// `per_thread` links (at least one) before the next is used.
    pub(crate) fn start(count: usize, per_thread: usize) -> std::io::Result<Self> {
        let threads = (0..count.max(1))
            .map(|i| {
                let runtime = Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(before_park)
                    .build()?;
                let handle = runtime.handle().clone();
                let (stop, stopped) = oneshot::channel::<()>();
                std::thread::Builder::new()
                    .name(format!("link-{i}"))
                    .spawn(move || {
                        // Runs what is spawned onto `handle` until the sender is dropped.
                        let _ = runtime.block_on(stopped);
                        runtime.shutdown_background();
                    })?;
                Ok(LinkThread {
                    handle,
                    _stop: stop,
                    links: Arc::new(AtomicUsize::new(0)),
                })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            threads,
            per_thread: per_thread.max(1),
        })
    }

    /// Default size: one thread per CPU core.
    pub(crate) fn default_count() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Runs `link` on the first thread with fewer than `per_thread` links, or else on the one
    /// with the fewest (the first of those on a tie).
    pub(crate) fn spawn<F>(&self, link: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let loads = self.loads();
        // `start` made at least one thread.
        let pick = loads
            .iter()
            .position(|&n| n < self.per_thread)
            .or_else(|| (0..loads.len()).min_by_key(|&i| loads[i]))
            .unwrap_or(0);
        let thread = &self.threads[pick];
        thread.links.fetch_add(1, Ordering::Relaxed);
        // Given back however the link ends: returned, aborted, or dropped before it ever ran.
        let place = Place(thread.links.clone());
        let link = async move {
            let _place = place;
            link.await
        };
        thread.handle.spawn(link)
    }

    /// Links per thread, in thread order.
    pub(crate) fn loads(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|t| t.links.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for LinkThreads {
    fn drop(&mut self) {
        // Links are shut down in order before this (supervisor::shutdown_links); what is left
        // is dropped by each thread as it ends, without waiting here, which is allowed from
        // inside another runtime.
        self.threads.clear();
    }
}

/// A batch this large (events one read brought, messages a target took at once) means the
/// thread had fallen behind: when it runs out of work, it yields its core before it sleeps
/// (see the module's doc). Flat out at 3 brokers (QoS 1) 4 % of the spells have one without
/// the yield and about 30 % with it; at a steady 2 000 msg/s and 8 brokers none reached 8.
pub(crate) const BUSY_BATCH: usize = 16;

thread_local! {
    /// The largest batch handled on this thread since it last ran out of work.
    static SPELL: Cell<usize> = const { Cell::new(0) };
}

/// A link handled a batch of `n` messages or events on this thread.
pub(crate) fn worked(n: usize) {
    SPELL.set(SPELL.get().max(n));
}

/// The thread ran out of work: ends the spell, true when the thread had fallen behind in it.
fn spell_ended() -> bool {
    SPELL.replace(0) >= BUSY_BATCH
}

/// Runs on a link thread before it sleeps in the reactor.
fn before_park() {
    if spell_ended() {
        std::thread::yield_now();
    }
}

/// A link's place on its thread, given back when the link's future is dropped.
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spawns a link that runs until its sender is dropped.
    fn parked(threads: &LinkThreads) -> (tokio::sync::oneshot::Sender<()>, JoinHandle<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = threads.spawn(async move {
            let _ = rx.await;
        });
        (tx, join)
    }

    #[tokio::test]
    async fn links_fill_one_thread_then_spread_and_free_their_place() {
        let threads = LinkThreads::start(2, LINKS_PER_THREAD).expect("threads start");
        let mut links: Vec<_> = (0..LINKS_PER_THREAD).map(|_| parked(&threads)).collect();
        assert_eq!(
            threads.loads(),
            vec![LINKS_PER_THREAD, 0],
            "packed on the first"
        );
        links.push(parked(&threads));
        assert_eq!(threads.loads(), vec![LINKS_PER_THREAD, 1], "then the next");
        // Past LINKS_PER_THREAD everywhere: the least loaded.
        links.extend((0..LINKS_PER_THREAD).map(|_| parked(&threads)));
        assert_eq!(
            threads.loads(),
            vec![LINKS_PER_THREAD + 1, LINKS_PER_THREAD],
            "both full, then the fewest"
        );
        let (tx, join) = links.remove(0);
        drop(tx);
        join.await.expect("link ends");
        assert_eq!(
            threads.loads(),
            vec![LINKS_PER_THREAD, LINKS_PER_THREAD],
            "an ended link frees its place"
        );
        let (tx, join) = parked(&threads);
        assert_eq!(
            threads.loads(),
            vec![LINKS_PER_THREAD + 1, LINKS_PER_THREAD]
        );
        drop(tx);
        join.await.expect("link ends");
        drop(links);
    }

    #[tokio::test]
    async fn an_aborted_link_frees_its_place() {
        let threads = LinkThreads::start(1, LINKS_PER_THREAD).expect("threads start");
        let link = threads.spawn(std::future::pending());
        assert_eq!(threads.loads(), vec![1]);
        // Aborted whether or not it was polled yet: either way its future is dropped.
        link.abort();
        assert!(link.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(threads.loads(), vec![0]);
    }

    #[tokio::test]
    async fn a_link_and_what_it_spawns_share_one_thread() {
        let threads = LinkThreads::start(2, LINKS_PER_THREAD).expect("threads start");
        let (tx, rx) = tokio::sync::oneshot::channel();
        threads
            .spawn(async move {
                let own = std::thread::current().id();
                // The connection driver is spawned like this (link::session::open).
                let spawned = tokio::spawn(async { std::thread::current().id() })
                    .await
                    .expect("task runs");
                let _ = tx.send((
                    own,
                    spawned,
                    std::thread::current().name().map(String::from),
                ));
            })
            .await
            .expect("link ends");
        let (own, spawned, name) = rx.await.expect("reported");
        assert_eq!(own, spawned);
        assert_eq!(name.as_deref(), Some("link-0"));
    }

    #[tokio::test]
    async fn one_link_per_thread_spreads_them() {
        let threads = LinkThreads::start(3, 1).expect("threads start");
        let links: Vec<_> = (0..4).map(|_| parked(&threads)).collect();
        assert_eq!(threads.loads(), vec![2, 1, 1], "one each, then the fewest");
        drop(links);
    }

    #[test]
    fn a_spell_with_a_large_batch_ends_in_a_yield_small_ones_do_not() {
        assert!(!spell_ended(), "no work");
        for _ in 0..100 {
            worked(BUSY_BATCH - 1);
        }
        assert!(!spell_ended(), "many small batches");
        worked(1);
        worked(BUSY_BATCH);
        worked(2);
        assert!(spell_ended(), "one large batch");
        assert!(!spell_ended(), "a spell ends with the park");
    }

    #[tokio::test]
    async fn a_link_thread_ends_its_spell_when_it_parks() {
        let threads = LinkThreads::start(1, LINKS_PER_THREAD).expect("threads start");
        threads
            .spawn(async { worked(BUSY_BATCH) })
            .await
            .expect("link ends");
        // Nothing left to run: the thread parks, and its hook takes the spell.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        threads
            .spawn(async move {
                let _ = tx.send(SPELL.get());
            })
            .await
            .expect("link ends");
        assert_eq!(rx.await.expect("reported"), 0);
    }

    #[test]
    fn zero_means_one() {
        let threads = LinkThreads::start(0, 0).expect("threads start");
        assert_eq!(threads.loads(), vec![0]);
        assert_eq!(threads.per_thread, 1);
    }
}
