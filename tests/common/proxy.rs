//! A TCP proxy between one process and one broker, to cut that connection alone: `blackhole`
//! stops forwarding bytes both ways while keeping every socket open (a cable pulled, a
//! firewall dropping packets), `reset` closes every connection, `heal` forwards again.
//! [`Proxy::delayed`] delays every byte by a fixed time each way instead: a WAN (this kernel
//! has no netem).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running proxy; stops accepting when dropped.
pub struct Proxy {
    /// Where the process connects.
    pub port: u16,
    blackhole: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `127.0.0.1:target`.
    pub fn start(target: u16) -> Proxy {
        Self::with_delay(target, Duration::ZERO)
    }

    /// [`Proxy::start`], each byte delivered `one_way` after it was read, in each direction
    /// (latency only: no bandwidth limit, nothing reordered).
    pub fn delayed(target: u16, one_way: Duration) -> Proxy {
        Self::with_delay(target, one_way)
    }

    fn with_delay(target: u16, delay: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (bh, st, sp) = (blackhole.clone(), streams.clone(), stop.clone());
        std::thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if bh.load(Ordering::SeqCst) {
                    // A black hole accepts nothing new either: the connection attempt hangs.
                    st.lock().unwrap().push(client);
                    continue;
                }
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut s = st.lock().unwrap();
                    s.push(client.try_clone().unwrap());
                    s.push(server.try_clone().unwrap());
                }
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    bh.clone(),
                    delay,
                );
                pump(server, client, bh.clone(), delay);
            }
        });
        Proxy {
            port,
            blackhole,
            streams,
            stop,
        }
    }

    /// Stops forwarding, both ways, without closing anything.
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    /// Forwards again (connections made from now on; black-holed ones stay stuck).
    pub fn heal(&self) {
        self.blackhole.store(false, Ordering::SeqCst);
    }

    /// Closes every connection.
    pub fn reset(&self) {
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.reset();
    }
}

/// Copies `from` to `to` until either closes; while black-holed, reads are held back (the
/// bytes stay in the kernel's buffers, as behind a dead link).
fn pump(from: TcpStream, to: TcpStream, blackhole: Arc<AtomicBool>, delay: Duration) {
    if !delay.is_zero() {
        return pump_delayed(from, to, delay);
    }
    pump_now(from, to, blackhole)
}

/// Copies `from` to `to`, each chunk written `delay` after it was read (a writer thread keeps
/// the reader from waiting).
fn pump_delayed(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        while let Ok((read_at, chunk)) = rx.recv() {
            let due = read_at + delay;
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0
                || tx
                    .send((std::time::Instant::now(), buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
}

fn pump_now(mut from: TcpStream, mut to: TcpStream, blackhole: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            while blackhole.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if blackhole.load(Ordering::SeqCst) {
                        // Cut while this chunk was on its way: it never arrives.
                        continue;
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
