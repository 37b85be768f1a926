//! A link's own MQTT 5 connection, polled by the link's task itself: no driver task, no event
//! channel, and requests taken from rumqttc's channel without a wake-up (see the vendored
//! `EventLoop::poll_inline`).
//!
//! With a driver task, a forwarded message crossed it four times (two per broker, each way),
//! each a task wake, a poll and a channel hand-over: at a low rate about half of the task
//! polls per message (callgrind: 12 polls of about 3 600 instructions). The link now reads
//! its socket in its own `select!`, hands its requests to the write buffer before each wait
//! ([`Inline::pump`]), and writes as part of the same wait.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, Waker, ready};

use super::driver::{aborted_v5, event_v5};
use super::{LinkEvent, Progress};
use crate::doorbell::Doorbell;

/// The event loop of one connection and what it has to say.
pub(super) struct Inline {
    el: rumqttc::v5::EventLoop,
    written: Arc<AtomicU64>,
    /// Events taken from the event loop and not yet handed to the link (the end of the
    /// connection makes two).
    ready: VecDeque<LinkEvent>,
    /// The connection ended; its last events are in `ready`.
    ended: bool,
    /// Rung by whatever the connection waits on (the socket, both ways; the connect and its
    /// timeout): everything in it is polled with `io_waker`, never with the task's own waker.
    io: Arc<Doorbell>,
    io_waker: Waker,
    /// The last read found nothing, and `io` has not rung since: a read now would find nothing
    /// again. A link's task wakes for its queue, its acknowledgements and its timers too, and
    /// a read that finds nothing costs a readiness check and a waker registration under the
    /// reactor's lock (about 600 instructions, callgrind); a doorbell's check costs about 50.
    parked: bool,
}

impl std::fmt::Debug for Inline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inline")
            .field("ready", &self.ready.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Inline {
    pub(super) fn new(el: rumqttc::v5::EventLoop, written: Arc<AtomicU64>) -> Self {
        let io = Arc::new(Doorbell::new());
        Self {
            el,
            written,
            ready: VecDeque::new(),
            ended: false,
            io_waker: Waker::from(io.clone()),
            io,
            parked: false,
        }
    }

    /// Writes what waits and, with `reading`, the next event (`None` after the end); without,
    /// `Flushed` once everything was written (cancel-safe). The connection is polled only
    /// when `io` rang since it last had nothing; the task's waker waits on `io`.
    pub(super) fn poll_progress(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<Progress> {
        // Ready: it rang, and took the ring; pending: the task's waker is registered.
        let rung = self.io.poll_rung(cx).is_ready();
        if rung {
            self.parked = false;
        }
        // Lent out for the polls below (a clone would count a reference up and down).
        let waker = std::mem::replace(&mut self.io_waker, Waker::noop().clone());
        let progress = self.poll_io(&mut Context::from_waker(&waker), reading);
        self.io_waker = waker;
        if rung && progress.is_pending() && self.io.register(cx.waker()) {
            // It rang again meanwhile: the connection has more, or tokio's budget asks the
            // task to yield (not looping here, which would never yield). The ring stays.
            cx.waker().wake_by_ref();
        }
        progress
    }

    /// [`Inline::poll_progress`]'s writes and reads, with `cx` made of `io_waker`.
    fn poll_io(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<Progress> {
        if self.unflushed() && self.poll_flush(cx).is_ready() && !reading {
            return Poll::Ready(Progress::Flushed);
        }
        if !reading {
            return Poll::Pending;
        }
        if !self.parked {
            let event = self.poll_event(cx);
            self.parked = event.is_pending();
            return event.map(Progress::Event);
        }
        // What the link's own requests left (their `written` count), without a read.
        match self.try_event() {
            Some(event) => Poll::Ready(Progress::Event(Some(event))),
            None => Poll::Pending,
        }
    }

    /// The next event; `None` after the end (cancel-safe). Polled with `io_waker` only.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<LinkEvent>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Poll::Ready(Some(event));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match ready!(self.el.poll_inline(cx)) {
                Ok(event) => {
                    if let Some(event) = event_v5(event, &self.written) {
                        return Poll::Ready(Some(event));
                    }
                }
                Err(e) => self.end(&e),
            }
        }
    }

    /// An event already read, if any (a batch takes these after the first, without reading
    /// the socket again).
    pub(super) fn try_event(&mut self) -> Option<LinkEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            let event = self.el.state.events.pop_front()?;
            if let Some(event) = event_v5(event, &self.written) {
                return Some(event);
            }
        }
    }

    /// Hands the requests the link queued to the write buffer.
    pub(super) fn pump(&mut self) {
        if self.ended {
            return;
        }
        if let Err(e) = self.el.pump() {
            self.end(&e);
        }
    }

    /// Bytes wait to be written.
    pub(super) fn unflushed(&self) -> bool {
        !self.ended && self.el.unflushed()
    }

    /// Writes what waits (cancel-safe); ready when written or when the connection failed (its
    /// end is then among the events). Polled with `io_waker` only.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.ended {
            return Poll::Ready(());
        }
        if let Err(e) = ready!(self.el.poll_flush(cx)) {
            self.end(&e);
        }
        Poll::Ready(())
    }

    /// Pings when the keep-alive interval is due. While the link reads nothing (`reading`
    /// false: its intake is paused), a ping still unanswered is not an error: its answer
    /// waits unread; the next one goes out once it is read.
    pub(super) fn keep_alive(&mut self, reading: bool) {
        if self.ended || (!reading && self.el.state.await_pingresp) {
            return;
        }
        if let Err(e) = self.el.keep_alive(tokio::time::Instant::now()) {
            self.end(&e);
        }
    }

    /// The connection ended with `e`: what the event loop still holds first (what was read,
    /// and what was written: `written` must count every publish before the link hears of the
    /// end), then `PeerClosed` when the broker closed it, then `Closed`, as a driver reports it.
    fn end(&mut self, e: &rumqttc::v5::ConnectionError) {
        while let Some(event) = self.el.state.events.pop_front() {
            if let Some(event) = event_v5(event, &self.written) {
                self.ready.push_back(event);
            }
        }
        if aborted_v5(e) {
            self.ready.push_back(LinkEvent::PeerClosed);
        }
        self.ready.push_back(LinkEvent::Closed(e.to_string()));
        self.ended = true;
        self.parked = false;
    }
}
