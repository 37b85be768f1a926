//! The proxies between the contenders and the brokers: a delay each way (`--rtt`), and a gate
//! that can cut the contenders off one broker (`--outage`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

/// Whether the contenders can reach a broker. Closing it ends their connections to the
/// broker (as a broker that stops does: the proxy closes them) and refuses new ones until it
/// opens again; the load's own clients connect to the broker directly and stay.
#[derive(Debug, Clone)]
pub(super) struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    pub(super) fn new() -> Self {
        Gate(Arc::new(watch::channel(true).0))
    }

    pub(super) fn set_open(&self, open: bool) {
        self.0.send_replace(open);
    }

    fn is_open(&self) -> bool {
        *self.0.borrow()
    }

    async fn closed(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| !open).await;
    }
}

/// Forwards every connection accepted on `listener` to `127.0.0.1:target`, each byte delayed
/// by `one_way` in each direction (latency only: no bandwidth limit, nothing reordered), while
/// `gate` (if any) is open.
pub(super) async fn run(listener: TcpListener, target: u16, one_way: Duration, gate: Option<Gate>) {
    while let Ok((inbound, _)) = listener.accept().await {
        if gate.as_ref().is_some_and(|g| !g.is_open()) {
            // Refused: the contender sees its connection closed before its CONNACK.
            continue;
        }
        let gate = gate.clone();
        tokio::spawn(async move {
            let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            let up = tokio::spawn(delayed_pipe(ri, wo, one_way));
            let down = tokio::spawn(delayed_pipe(ro, wi, one_way));
            if let Some(gate) = gate {
                gate.closed().await;
                // Dropping the halves closes both connections.
                up.abort();
                down.abort();
            }
        });
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
async fn delayed_pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    if delay.is_zero() {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((read_at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(read_at + delay).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    // The writer goes with this task (a gate that closes aborts it).
    let _abort_writer = AbortOnDrop(writer.abort_handle());
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0
            || tx
                .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
