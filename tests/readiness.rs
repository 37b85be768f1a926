//! Ready means replicating (issue 25), against real mosquitto brokers: numbered QoS 1 streams
//! run on every broker from before the bridge starts; every message published after
//! `/readyz` first answered 200 (or after `bridge add-broker` answered) must reach every other
//! broker exactly once. For one process and for two started together, MQTT 5 and 3.1.1, and
//! for a broker added at run time. Also prints how long each start took (docs/HA.md).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::mqtt::{self, Pub, Sub};
use common::{Bridge, Certs, Mosquitto};

/// Messages per second of each stream: one every 5 ms, so a second unconsumed is ~200 lost.
const RATE: u32 = 200;

/// One bridge process (killed when dropped).
struct Process {
    admin: String,
    _bridge: Bridge,
    started: Instant,
}

/// The config of instance `instance` of mesh "mesh" for `brokers` (name, port, protocol).
fn config(certs: &Certs, dir: &std::path::Path, instance: &str, brokers: &[Link]) -> String {
    let mut s = format!(
        "[bridge]\nid = \"mesh\"\ninstance = \"{instance}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
         data_dir = \"{}\"\n\n[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n",
        common::free_port(),
        dir.join("data").display(),
        certs.path("ca.crt"),
        certs.path("client.crt"),
        certs.path("client.key"),
    );
    for l in brokers {
        s.push_str(&format!(
            "[[broker]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\nprotocol = \"{}\"\n\n",
            l.name, l.port, l.protocol
        ));
    }
    s
}

/// A broker as the bridge dials it.
#[derive(Clone)]
struct Link {
    name: String,
    port: u16,
    protocol: &'static str,
}

fn links(brokers: &[Mosquitto], protocol: &'static str) -> Vec<Link> {
    brokers
        .iter()
        .map(|b| Link {
            name: b.name.clone(),
            port: b.tls_port,
            protocol,
        })
        .collect()
}

fn start(tmp: &std::path::Path, certs: &Certs, instance: &str, brokers: &[Link]) -> Process {
    let dir = tmp.join(instance);
    let cfg = config(certs, &dir, instance, brokers);
    let admin = common::admin_addr(&cfg);
    let started = Instant::now();
    Process {
        admin,
        _bridge: Bridge::start(&dir, &cfg),
        started,
    }
}

/// `GET /readyz`: 200, or anything else (refused while the process starts: 0).
fn readyz(admin: &str) -> u16 {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(500)))
        .build()
        .new_agent();
    agent
        .get(format!("http://{admin}/readyz"))
        .call()
        .map_or(0, |r| r.status().as_u16())
}

/// A numbered stream on one broker, running, and how many of its messages were handed to the
/// publisher so far (those from that index on were published later).
struct Stream {
    origin: String,
    progress: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

fn stream(origin: &Mosquitto, n: usize) -> Stream {
    let topic = format!("seq/{}", origin.name);
    let msgs: Vec<Pub> = (0..n)
        .map(|i| Pub::new(&topic, format!("{i}"), 1))
        .collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let (port, id, p) = (
        origin.plain_port,
        format!("p-{}", origin.name),
        progress.clone(),
    );
    Stream {
        origin: origin.name.clone(),
        progress,
        task: tokio::spawn(async move { mqtt::publish_paced(port, &id, &msgs, RATE, p).await }),
    }
}

/// Subscribers to `seq/#` on every broker, by name.
async fn subscribers(brokers: &[Mosquitto]) -> BTreeMap<String, Sub> {
    let mut subs = BTreeMap::new();
    for b in brokers {
        let sub = mqtt::subscribe(b.plain_port, &format!("s-{}", b.name), "seq/#").await;
        subs.insert(b.name.clone(), sub);
    }
    subs
}

/// Polls `/readyz` of every process until one answers 200; returns how far each stream was
/// then, and when.
async fn first_ready(
    processes: &[&Process],
    streams: &[Stream],
) -> (BTreeMap<String, usize>, Instant) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for p in processes {
            let admin = p.admin.clone();
            let code = tokio::task::spawn_blocking(move || readyz(&admin))
                .await
                .unwrap();
            if code == 200 {
                let now = Instant::now();
                let from = streams
                    .iter()
                    .map(|s| (s.origin.clone(), s.progress.load(Ordering::SeqCst)))
                    .collect();
                return (from, now);
            }
        }
        assert!(Instant::now() < deadline, "/readyz never answered 200");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Watches for the first message of any stream to reach another broker; the task returns when.
fn first_delivery(subs: &BTreeMap<String, Sub>) -> tokio::task::JoinHandle<Instant> {
    let got: Vec<(String, Arc<std::sync::Mutex<Vec<mqtt::Got>>>)> = subs
        .iter()
        .map(|(target, sub)| (format!("seq/{target}"), sub.got.clone()))
        .collect();
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let delivered = got
                .iter()
                .any(|(own, g)| g.lock().unwrap().iter().any(|m| m.topic != *own));
            if delivered {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "nothing was delivered within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

/// Waits for the streams to end, then checks that every message of each stream from `from`
/// on (its index when readiness, or the add, was answered) reached every broker in `targets`
/// but its origin exactly once. Prints what arrived of the earlier ones.
async fn exactly_once_from(
    streams: Vec<Stream>,
    n: usize,
    from: &BTreeMap<String, usize>,
    subs: &BTreeMap<String, Sub>,
    targets: &[&str],
) {
    let origins: Vec<String> = streams.iter().map(|s| s.origin.clone()).collect();
    for s in streams {
        s.task.await.expect("stream published everything");
    }
    let mut failures = Vec::new();
    for origin in &origins {
        let first = from[origin];
        assert!(first < n, "{origin}: the stream ended before readiness");
        let topic = format!("seq/{origin}");
        for target in targets.iter().filter(|t| **t != origin) {
            let sub = &subs[*target];
            let deadline = Instant::now() + Duration::from_secs(20);
            let counts = loop {
                let mut seen = vec![0usize; n];
                for m in sub.messages().iter().filter(|m| m.topic == topic) {
                    let i: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                    seen[i] += 1;
                }
                if seen[first..].iter().all(|c| *c > 0) || Instant::now() > deadline {
                    break seen;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            sub.settle(Duration::from_millis(300)).await;
            let after = &counts[first..];
            let lost: Vec<usize> = (first..n).filter(|i| counts[*i] == 0).collect();
            let dups: usize = after.iter().map(|c| c.saturating_sub(1)).sum();
            let before = counts[..first].iter().filter(|c| **c > 0).count();
            println!(
                "{origin} -> {target}: from #{first} of {n}: lost {}, duplicates {dups}; \
                 of the {first} published before, {before} arrived",
                lost.len()
            );
            if !lost.is_empty() || dups > 0 {
                failures.push(format!(
                    "{origin} -> {target}: {} lost after readiness (first: {:?}), {dups} duplicates",
                    lost.len(),
                    lost.iter().take(5).collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Messages per stream: long enough to outlast any start-up here (the assertion says so).
const N: usize = 1600;

async fn one_process(protocol: &'static str) {
    let (tmp, certs, brokers) = common::lab::<3>();
    let subs = subscribers(&brokers).await;
    let streams: Vec<Stream> = brokers.iter().map(|b| stream(b, N)).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered = first_delivery(&subs);
    let p = start(tmp.path(), &certs, "a", &links(&brokers, protocol));
    let (from, ready_at) = first_ready(&[&p], &streams).await;
    let delivered_at = delivered.await.unwrap();
    println!(
        "{protocol}, one process: ready after {} ms, first delivery after {} ms",
        (ready_at - p.started).as_millis(),
        (delivered_at - p.started).as_millis()
    );
    exactly_once_from(streams, N, &from, &subs, &["b1", "b2", "b3"]).await;
    drop(p);
}

/// A fresh mesh (no session on any broker) started as a new user would, traffic already
/// flowing: nothing published after the first 200 of `/readyz` is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_ready_means_every_broker_is_consumed_v5() {
    one_process("v5").await;
}

/// The same on MQTT 3.1.1 links (no No Local, no origin tag: the echo window at work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_ready_means_every_broker_is_consumed_v311() {
    one_process("v3.1.1").await;
}

async fn two_processes(protocol: &'static str) {
    let (tmp, certs, brokers) = common::lab::<3>();
    let subs = subscribers(&brokers).await;
    let streams: Vec<Stream> = brokers.iter().map(|b| stream(b, N)).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let list = links(&brokers, protocol);
    let delivered = first_delivery(&subs);
    let a = start(tmp.path(), &certs, "a", &list);
    let b = start(tmp.path(), &certs, "b", &list);
    let (from, ready_at) = first_ready(&[&a, &b], &streams).await;
    let delivered_at = delivered.await.unwrap();
    println!(
        "{protocol}, two processes started together: first ready after {} ms, first delivery \
         after {} ms",
        (ready_at - a.started).as_millis(),
        (delivered_at - a.started).as_millis()
    );
    exactly_once_from(streams, N, &from, &subs, &["b1", "b2", "b3"]).await;
    drop((a, b));
}

/// Two processes of one mesh started together: the first of them to say ready speaks for the
/// whole mesh (a broker the other one owns counts once that owner noted its subscriptions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_started_together_ready_means_every_broker_is_consumed_v5() {
    two_processes("v5").await;
}

/// The same on MQTT 3.1.1 (echo notes between the processes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_started_together_ready_means_every_broker_is_consumed_v311() {
    two_processes("v3.1.1").await;
}

async fn added_broker(protocol: &'static str) {
    let (tmp, certs, brokers) = common::lab::<3>();
    let list = links(&brokers, protocol);
    let p = start(tmp.path(), &certs, "a", &list[..2]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while readyz(&p.admin) != 200 {
        assert!(Instant::now() < deadline, "not ready within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let subs = subscribers(&brokers).await;
    let streams: Vec<Stream> = [&brokers[0], &brokers[2]]
        .into_iter()
        .map(|b| stream(b, N))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = p.admin.clone();
    let address = format!("127.0.0.1:{}", brokers[2].tls_port);
    let added_at = Instant::now();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        common::cli_in(
            &[
                "add-broker",
                &address,
                "--name",
                "b3",
                "--protocol",
                protocol,
                "--admin",
                &admin,
            ],
            None,
        )
    })
    .await
    .unwrap();
    let from: BTreeMap<String, usize> = streams
        .iter()
        .map(|s| (s.origin.clone(), s.progress.load(Ordering::SeqCst)))
        .collect();
    println!(
        "{protocol}: add-broker answered after {} ms: {}",
        added_at.elapsed().as_millis(),
        out.trim()
    );
    assert_eq!(code, 0, "add-broker failed: {out}{err}");
    assert!(
        out.contains("consumed: what is published there from now on reaches the mesh"),
        "the reply says whether the broker is consumed: {out}"
    );
    exactly_once_from(streams, N, &from, &subs, &["b1", "b2", "b3"]).await;
    drop(p);
}

/// A broker added at run time: `add-broker` answers once it is consumed, and from then on its
/// messages reach the mesh and the mesh's reach it, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_broker_is_consumed_when_add_broker_answers_v5() {
    added_broker("v5").await;
}

/// The same for an MQTT 3.1.1 broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_broker_is_consumed_when_add_broker_answers_v311() {
    added_broker("v3.1.1").await;
}
