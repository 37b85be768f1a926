//! `bridge demo`: a first look with nothing installed. Starts four embedded rumqttd brokers on
//! free loopback ports (TLS for the bridge, plain TCP for you), a bridge meshing three of them
//! over MQTT 3.1.1, and sample traffic whose arrival on every other broker is printed as it
//! happens. The fourth broker is there to try `bridge add-broker` on.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting up files or ports failed.
    #[error("demo setup: {0}")]
    Setup(String),
    /// Some sample messages did not arrive everywhere (only with `--duration`).
    #[error("{missing} of {published} sample messages did not reach every other broker")]
    Incomplete {
        /// Messages that did not arrive everywhere.
        missing: usize,
        /// Messages published.
        published: usize,
    },
}

/// A free TCP port on 127.0.0.1 for a server of a loopback lab (this demo, meshbench, the
/// tests), each call in a process a different one. Chosen below Linux's ephemeral range
/// (32768-60999), between 20000 and 31999: a port from that range (what binding port 0
/// returns) can be taken as the local port of any outgoing connection before the server binds
/// it, and two calls may return the same one.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    // Processes start at different places, so parallel labs rarely probe the same ports.
    let start = (std::process::id().wrapping_mul(7_919)) % SPAN;
    for _ in 0..SPAN {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (start + offset) % SPAN;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port on 127.0.0.1 between 20000 and 31999",
    ))
}

fn lab_port() -> Result<u16, DemoError> {
    free_port().map_err(|e| DemoError::Setup(format!("no free loopback port: {e}")))
}

/// One embedded broker.
struct Embedded {
    name: String,
    plain: u16,
    tls: u16,
}

fn start_broker(name: &str, certs: &Path) -> Result<Embedded, DemoError> {
    let (plain, tls) = (lab_port()?, lab_port()?);
    let connections = "connection_timeout_ms = 60000\nmax_payload_size = 1048576\nmax_inflight_count = 100\ndynamic_filters = true\n";
    let text = format!(
        "id = 0\n[router]\nid = 0\nmax_connections = 1000\nmax_outgoing_packet_count = 200\nmax_segment_size = 104857600\nmax_segment_count = 10\n\
         [v4.1]\nname = \"{name}-plain\"\nlisten = \"127.0.0.1:{plain}\"\nnext_connection_delay_ms = 1\n[v4.1.connections]\n{connections}\
         [v4.2]\nname = \"{name}-tls\"\nlisten = \"127.0.0.1:{tls}\"\nnext_connection_delay_ms = 1\n\
         [v4.2.tls]\ncapath = \"{ca}\"\ncertpath = \"{crt}\"\nkeypath = \"{key}\"\n[v4.2.connections]\n{connections}",
        ca = certs.join("ca.crt").display(),
        crt = certs.join("server.crt").display(),
        key = certs.join("server.key").display(),
    );
    let config: rumqttd::Config = toml::from_str(&text)
        .map_err(|e| DemoError::Setup(format!("embedded broker config: {e}")))?;
    let thread_name = format!("rumqttd-{name}");
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("embedded broker stopped: {e}");
            }
        })
        .map_err(|e| DemoError::Setup(format!("cannot start an embedded broker: {e}")))?;
    Ok(Embedded {
        name: name.to_string(),
        plain,
        tls,
    })
}

async fn wait_port(port: u16) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err(DemoError::Setup(format!(
                "embedded broker did not open port {port}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A sample message in flight.
struct Sample {
    /// The broker it was published on.
    origin: String,
    /// When.
    sent: Instant,
    /// The brokers meshed with the origin when it was published.
    expected: Vec<String>,
    /// Where it has arrived so far, and after how long.
    arrivals: Vec<(String, Duration)>,
}

/// Sample messages in flight, by sequence number.
type Pending = HashMap<u64, Sample>;

/// The demo's lab: four embedded brokers with TLS, and the bridge meshing the first three;
/// returns the directory they use (keep it), the brokers, the admin port, and the bridge.
async fn start() -> Result<
    (
        tempfile::TempDir,
        Vec<Embedded>,
        u16,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), crate::RunError>>,
    ),
    DemoError,
> {
    let dir = tempfile::tempdir().map_err(|e| DemoError::Setup(e.to_string()))?;
    let certs = dir.path().join("certs");
    crate::certs::generate(&certs, &["localhost".into(), "127.0.0.1".into()], true)
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let brokers: Vec<Embedded> = ["b1", "b2", "b3", "b4"]
        .iter()
        .map(|n| start_broker(n, &certs))
        .collect::<Result<_, _>>()?;
    for b in &brokers {
        wait_port(b.plain).await?;
        wait_port(b.tls).await?;
    }
    let mesh = &brokers[..3];
    let admin = lab_port()?;
    let mut cfg = format!(
        "[bridge]\nid = \"demo\"\n# The embedded brokers (rumqttd) refuse `$` topics: one process, no coordination, no probes.\nha = false\nprobe_interval = \"0s\"\nadmin_listen = \"127.0.0.1:{admin}\"\ndata_dir = \"data\"\n\n[tls]\nca_file = \"certs/ca.crt\"\n\n"
    );
    for b in mesh {
        cfg.push_str(&format!(
            "[[broker]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\nprotocol = \"v3.1.1\"\n\n",
            b.name, b.tls
        ));
    }
    let cfg_path = dir.path().join("bridge.toml");
    std::fs::write(&cfg_path, &cfg).map_err(|e| DemoError::Setup(e.to_string()))?;
    let config =
        crate::config::Config::load(&cfg_path).map_err(|e| DemoError::Setup(e.to_string()))?;

    let shutdown = CancellationToken::new();
    let (_reload_tx, reload) = mpsc::unbounded_channel();
    let bridge = tokio::spawn(crate::run(
        config,
        crate::Control {
            shutdown: shutdown.clone(),
            reload,
            config_path: Some(cfg_path.clone()),
            spool_recover: false,
        },
    ));
    Ok((dir, brokers, admin, shutdown, bridge))
}

/// Runs the demo until Ctrl-C, or for `duration` when given.
pub async fn run(duration: Option<Duration>) -> Result<(), DemoError> {
    let (_dir, brokers, admin, shutdown, bridge) = start().await?;
    let (mesh, spare) = brokers.split_at(3);
    wait_ready(admin).await?;

    print_intro(mesh, &spare[0], admin);

    let pending: Arc<Mutex<Pending>> = Arc::default();
    let stop = CancellationToken::new();
    // Every embedded broker is watched and has a publisher from the start, b4 too: once it is
    // added, it takes part in the sample traffic both ways.
    let mut tasks = Vec::new();
    let mut publishers = Vec::new();
    for b in &brokers {
        tasks.push(tokio::spawn(watch(
            b.name.clone(),
            b.plain,
            pending.clone(),
            stop.clone(),
        )));
        publishers.push(connect(&format!("demo-pub-{}", b.name), b.plain, &stop).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let mut published = 0u64;
    let mut meshed: Vec<usize> = (0..mesh.len()).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(700));
    // One listener for the whole run: a fresh `ctrl_c()` per turn would miss a Ctrl-C that
    // comes while the turn publishes.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        // Which embedded brokers the bridge has connected links to, as its own status says.
        if let Some(now) = meshed_brokers(admin, &brokers).await {
            report_changes(&brokers, &meshed, &now);
            meshed = now;
        }
        if meshed.is_empty() {
            continue;
        }
        published += 1;
        let k = meshed[(published as usize - 1) % meshed.len()];
        sample(&brokers, &meshed, k, published, &pending, &publishers[k]).await;
    }
    // Let the last messages land.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.cancel();
    let missing = pending.lock().unwrap_or_else(|p| p.into_inner()).len();
    println!(
        "\n{published} sample messages published, {} arrived on every other broker.",
        published as usize - missing
    );
    shutdown.cancel();
    let _ = bridge.await;
    for t in tasks {
        t.abort();
    }
    match duration {
        Some(_) if missing > 0 => Err(DemoError::Incomplete {
            missing,
            published: published as usize,
        }),
        _ => Ok(()),
    }
}

/// What the demo runs, and what to try.
fn print_intro(mesh: &[Embedded], b4: &Embedded, admin: u16) {
    println!("meshbridge demo: 3 embedded MQTT brokers meshed by one bridge (TLS, MQTT 3.1.1).\n");
    for b in mesh {
        println!(
            "  {}  plain 127.0.0.1:{}   (bridge connects over TLS to :{})",
            b.name, b.plain, b.tls
        );
    }
    println!("\nTry it (mosquitto-clients):");
    println!("  mosquitto_sub -p {} -t 'demo/#' -v", mesh[0].plain);
    println!(
        "  mosquitto_pub -p {} -t demo/hello -m hi      # arrives on b1 too",
        mesh[2].plain
    );
    println!(
        "\nAdd a fourth broker (b4, not meshed yet) while this runs; the sample traffic then goes to and from it:"
    );
    println!(
        "  cargo run --release -- add-broker 127.0.0.1:{} --name b4 --protocol v3.1.1 --no-tls --admin 127.0.0.1:{admin}",
        b4.plain
    );
    println!("  cargo run --release -- status --admin 127.0.0.1:{admin}");
    println!("\nSample traffic (Ctrl-C to stop):");
}

/// Says which brokers joined or left the mesh (`was` → `now`, indexes into `brokers`).
fn report_changes(brokers: &[Embedded], was: &[usize], now: &[usize]) {
    for &i in now.iter().filter(|i| !was.contains(i)) {
        println!(
            "  -- {} joined the mesh: sample traffic now goes to and from it",
            brokers[i].name
        );
    }
    for &i in was.iter().filter(|i| !now.contains(i)) {
        println!("  -- {} left the mesh", brokers[i].name);
    }
}

/// Publishes sample number `published` on broker `k`, expected on every other broker of
/// `meshed`.
async fn sample(
    brokers: &[Embedded],
    meshed: &[usize],
    k: usize,
    published: u64,
    pending: &Mutex<Pending>,
    publisher: &AsyncClient,
) {
    let origin = &brokers[k].name;
    let expected: Vec<String> = meshed
        .iter()
        .filter(|&&i| i != k)
        .map(|&i| brokers[i].name.clone())
        .collect();
    let payload = format!("#{published} from {origin}");
    pending.lock().unwrap_or_else(|p| p.into_inner()).insert(
        published,
        Sample {
            origin: origin.clone(),
            sent: Instant::now(),
            expected,
            arrivals: Vec::new(),
        },
    );
    println!("  published {payload:<14} on {origin} (demo/{origin})");
    let _ = publisher
        .publish(format!("demo/{origin}"), QoS::AtLeastOnce, false, payload)
        .await;
}

/// The embedded brokers (indexes into `brokers`) that the bridge has a connected link to,
/// matched by port; `None` when the admin API did not answer (keep the previous set).
async fn meshed_brokers(admin: u16, brokers: &[Embedded]) -> Option<Vec<usize>> {
    let rows = tokio::task::spawn_blocking(move || {
        crate::admin::client::AdminClient::new(&format!("127.0.0.1:{admin}"), None).status()
    })
    .await
    .ok()?
    .ok()?;
    let connected: Vec<&str> = rows
        .iter()
        .filter(|r| r.state == crate::metrics::LinkState::Connected)
        .map(|r| r.address.as_str())
        .collect();
    Some(
        brokers
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                connected.iter().any(|a| {
                    a.rsplit_once(':')
                        .and_then(|(_, p)| p.parse::<u16>().ok())
                        .is_some_and(|p| p == b.plain || p == b.tls)
                })
            })
            .map(|(i, _)| i)
            .collect(),
    )
}

async fn wait_ready(admin: u16) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = tokio::task::spawn_blocking(move || {
            ureq::get(format!("http://127.0.0.1:{admin}/readyz"))
                .call()
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if ok {
            // Subscriptions go out right after CONNACK; give them a moment.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Setup(
                "the bridge did not become ready within 20 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain-TCP client whose event loop runs until `stop`.
async fn connect(id: &str, port: u16, stop: &CancellationToken) -> AsyncClient {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 100);
    let stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                e = el.poll() => if e.is_err() { tokio::time::sleep(Duration::from_millis(200)).await },
            }
        }
    });
    client
}

/// Subscribes on one broker and reports each sample message from another broker.
async fn watch(name: String, port: u16, pending: Arc<Mutex<Pending>>, stop: CancellationToken) {
    let mut opts = MqttOptions::new(format!("demo-sub-{name}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 100);
    let _ = client.subscribe("demo/#", QoS::AtLeastOnce).await;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = el.poll() => e,
        };
        let Ok(Event::Incoming(Packet::Publish(p))) = event else {
            if event.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        let text = String::from_utf8_lossy(&p.payload).to_string();
        let Some(seq) = text
            .strip_prefix('#')
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            println!("  {name} got {:?} on {}", text, p.topic);
            continue;
        };
        let mut map = pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sample) = map.get_mut(&seq) else {
            continue;
        };
        if !sample.expected.contains(&name) || sample.arrivals.iter().any(|(b, _)| *b == name) {
            continue;
        }
        sample.arrivals.push((name.clone(), sample.sent.elapsed()));
        if sample.arrivals.len() == sample.expected.len() {
            let line = sample
                .arrivals
                .iter()
                .map(|(b, d)| format!("{b} ({:.1} ms)", d.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(", ");
            println!("      #{seq} from {} arrived on {line}", sample.origin);
            map.remove(&seq);
        }
    }
}
