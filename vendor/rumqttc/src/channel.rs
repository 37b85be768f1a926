//! meshbridge patch: the request channel between the clients and the event loop, on tokio's
//! bounded `mpsc` instead of flume, with flume's names and error shapes so that the clients keep
//! their code.
//!
//! Why: the event loop waits on this channel in its `select!`, rebuilt for every event. A flume
//! wait allocates a hook and queues it under the channel's lock, and taking it off again when
//! the `select!` ends locks again; every send and receive locks too. In meshbridge's profile
//! (callgrind, a forwarding link at a fixed rate) that was about 9 % of all instructions. A
//! tokio receiver registers its waker in an `AtomicWaker`, and a wait that ends costs nothing.
//!
//! One difference: [`Sender::send`] (the blocking send of the synchronous `Client`) must not be
//! called from inside an async runtime (tokio's `blocking_send` panics there; flume's did not).

use tokio::sync::mpsc;

/// The sending half; cloned by every client of one event loop.
#[derive(Debug)]
pub struct Sender<T>(mpsc::Sender<T>);

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// The receiving half, the event loop's.
#[derive(Debug)]
pub struct Receiver<T>(mpsc::Receiver<T>);

/// The receiver is gone: the value comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError<T>(pub T);

impl<T> SendError<T> {
    /// The value that was not sent.
    pub fn into_inner(self) -> T {
        self.0
    }
}

/// Why a `try_send` did not queue its value, with the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The channel is at its capacity.
    Full(T),
    /// The receiver is gone.
    Disconnected(T),
}

/// A channel that holds up to `cap` values (at least one).
pub fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::channel(cap.max(1));
    (Sender(tx), Receiver(rx))
}

impl<T> Sender<T> {
    /// Waits for room, then queues `value`.
    pub async fn send_async(&self, value: T) -> Result<(), SendError<T>> {
        self.0.send(value).await.map_err(|e| SendError(e.0))
    }

    /// Blocks the thread until there is room (not from inside an async runtime).
    pub fn send(&self, value: T) -> Result<(), SendError<T>> {
        self.0.blocking_send(value).map_err(|e| SendError(e.0))
    }

    /// Queues `value` if there is room now.
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        self.0.try_send(value).map_err(|e| match e {
            mpsc::error::TrySendError::Full(v) => TrySendError::Full(v),
            mpsc::error::TrySendError::Closed(v) => TrySendError::Disconnected(v),
        })
    }
}

impl<T> Receiver<T> {
    /// The next value; `None` once every sender is gone and the channel is empty.
    /// Cancel-safe.
    pub async fn recv_async(&mut self) -> Option<T> {
        self.0.recv().await
    }

    /// The next value if one is queued now.
    pub fn try_recv(&mut self) -> Option<T> {
        self.0.try_recv().ok()
    }

    /// Every value queued now.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(move || self.try_recv())
    }
}
