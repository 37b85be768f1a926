//! `bridge import-mosquitto` against real mosquitto: the seed 004 bridge-master template
//! converts and runs (3 and 4 brokers), and a mosquitto bridge master with non-trivial topic
//! lines and meshbridge running what the import made of the same file deliver the same
//! (topic, payload) set to every broker.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::mqtt::{self, Pub, Sub};
use common::{Bridge, BrokerOpts, Mosquitto, free_port};

fn bridge(args: &[&str], dir: &Path) -> (i32, String, String) {
    common::cli_in(args, Some(dir))
}

/// Plain brokers (the master template dials port 1883 without TLS).
fn brokers(tmp: &Path, n: usize) -> Vec<Mosquitto> {
    let certs = common::Certs::generate(&tmp.join("certs"));
    (0..n)
        .map(|i| Mosquitto::start(tmp, &format!("b{}", i + 1), &certs, BrokerOpts::default()))
        .collect()
}

/// Imports `master` (written to `dir/master.conf`) and returns the bridge.toml text, with a
/// free admin port and a data_dir of its own (the import leaves both at their defaults).
fn import(dir: &Path, master: &str) -> (String, String) {
    std::fs::write(dir.join("master.conf"), master).unwrap();
    let (code, out, err) = bridge(
        &["import-mosquitto", "master.conf", "--out", "bridge.toml"],
        dir,
    );
    assert_eq!(code, 0, "{out}{err}");
    let toml = std::fs::read_to_string(dir.join("bridge.toml")).unwrap();
    let toml = toml.replacen(
        "[bridge]\n",
        &format!(
            "[bridge]\nadmin_listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n",
            free_port(),
            dir.join("data").display()
        ),
        1,
    );
    (toml, out)
}

/// seed 004's `mosquitto.confmaster.j2`, rendered: a connection per broker, `topic # both 2`.
fn seed_004_master(brokers: &[Mosquitto]) -> String {
    let mut s = String::from("per_listener_settings false\nallow_anonymous true\n");
    for (i, b) in brokers.iter().enumerate() {
        s.push_str(&format!(
            "\nconnection mosquitto-broker{}\naddress 127.0.0.1:{}\ntopic # both 2 \"\" \"\"\n",
            i + 1,
            b.plain_port
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_004_master_template_converts_and_runs_for_3_and_4_brokers() {
    for n in [3, 4] {
        let tmp = common::tempdir();
        let b = brokers(tmp.path(), n);
        let dir = tmp.path().join("import");
        std::fs::create_dir_all(&dir).unwrap();
        let (toml, out) = import(&dir, &seed_004_master(&b));
        assert!(out.contains(&format!("ok ({n} brokers)")), "{out}");
        assert!(
            out.contains("note: options of the master's own broker left out"),
            "{out}"
        );
        let names: Vec<String> = (1..=n).map(|i| format!("mosquitto-broker{i}")).collect();
        let run = Bridge::start(&tmp.path().join("bridge"), &toml);
        run.wait_subscribed(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let mut subs = Vec::new();
        for (i, broker) in b.iter().enumerate() {
            subs.push(mqtt::subscribe(broker.plain_port, &format!("s{i}"), "seed/#").await);
        }
        for (i, broker) in b.iter().enumerate() {
            let msgs: Vec<Pub> = (0..20)
                .map(|k| Pub::new(format!("seed/b{i}"), format!("{i}-{k}"), 1))
                .collect();
            mqtt::publish(broker.plain_port, &format!("p{i}"), &msgs).await;
        }
        for (i, s) in subs.iter().enumerate() {
            assert_eq!(
                s.wait_count(20 * n, Duration::from_secs(20)).await,
                20 * n,
                "{n} brokers: b{} got every message",
                i + 1
            );
            assert_eq!(
                s.settle(Duration::from_millis(500)).await,
                20 * n,
                "once each"
            );
        }
    }
}

/// A master whose topic lines filter, map and cap, loop-free (the master needs try_private).
fn master_with_rules(b: &[Mosquitto], listener: u16, log: &Path) -> String {
    let common = "cleansession true\ntry_private true\nbridge_protocol_version mqttv311\nnotifications false\n";
    format!(
        "listener {listener} 127.0.0.1\nallow_anonymous true\nlog_dest file {}\nlog_type all\n\n\
         connection edge1\naddress 127.0.0.1:{}\n{common}remote_clientid master-edge1\n\
         topic telemetry/# in 1 site1/ \"\"\ntopic commands/b1/# out 1\n\n\
         connection hub2\naddress 127.0.0.1:{}\n{common}remote_clientid master-hub2\n\
         topic telemetry/# in 1 site2/ \"\"\ntopic commands/# in 1\ntopic site1/# out 1\n\n\
         connection replica3\naddress 127.0.0.1:{}\n{common}remote_clientid master-replica3\n\
         topic # out 1\n",
        log.display(),
        b[0].plain_port,
        b[1].plain_port,
        b[2].plain_port
    )
}

/// What every broker's subscriber saw of one round of publishes, as (broker, topic, payload).
async fn round(b: &[Mosquitto], tag: &str) -> BTreeSet<(usize, String, String)> {
    let subs: Vec<Sub> = {
        let mut v = Vec::new();
        for (i, broker) in b.iter().enumerate() {
            v.push(mqtt::subscribe(broker.plain_port, &format!("eq-{tag}-{i}"), "#").await);
        }
        v
    };
    let sends: [(usize, &str); 10] = [
        (0, "telemetry/a"),
        (0, "commands/b1/z"),
        (0, "x/1"),
        (1, "telemetry/b"),
        (1, "commands/b1/c"),
        (1, "commands/b2/d"),
        (1, "site1/fake"),
        (2, "telemetry/e"),
        (2, "commands/b1/f"),
        (2, "y/2"),
    ];
    for (i, topic) in sends {
        mqtt::publish(
            b[i].plain_port,
            &format!("eq-p-{tag}"),
            &[Pub::new(topic, format!("{topic}@b{}", i + 1), 1)],
        )
        .await;
    }
    let mut got = BTreeSet::new();
    for (i, s) in subs.iter().enumerate() {
        s.settle(Duration::from_millis(1500)).await;
        for g in s.messages() {
            got.insert((
                i + 1,
                g.topic.clone(),
                String::from_utf8_lossy(&g.payload).into_owned(),
            ));
        }
    }
    got
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_config_delivers_what_the_mosquitto_master_delivered() {
    let tmp = common::tempdir();
    let b = brokers(tmp.path(), 3);
    let dir = tmp.path().join("master");
    std::fs::create_dir_all(&dir).unwrap();
    let listener = free_port();
    let conf = master_with_rules(&b, listener, &dir.join("master.log"));

    // (a) the mosquitto bridge master.
    std::fs::write(dir.join("run.conf"), &conf).unwrap();
    let master = Killed(
        Command::new("mosquitto")
            .arg("-c")
            .arg(dir.join("run.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto master"),
    );
    assert!(common::wait_port(listener, Duration::from_secs(10)));
    // Its three bridges connect and subscribe.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while b
        .iter()
        .zip(["master-edge1", "master-hub2", "master-replica3"])
        .any(|(broker, id)| !broker.log().contains(&format!("as {id}")))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "master bridges did not connect"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let by_master = round(&b, "m").await;
    drop(master);

    // (b) meshbridge running what the import made of the same file.
    let (toml, out) = import(&dir, &conf);
    assert!(out.contains("ok (3 brokers)"), "{out}");
    assert!(out.contains("try_private: not needed"), "{out}");
    let run = Bridge::start(&tmp.path().join("bridge"), &toml);
    run.wait_subscribed(&["edge1", "hub2"]);
    assert!(
        run.wait_log("subscribed to nothing", 1, Duration::from_secs(10)),
        "replica3 has only an out rule"
    );
    let by_bridge = round(&b, "b").await;

    eprintln!(
        "master delivered {} (broker, topic, payload): {by_master:?}",
        by_master.len()
    );
    let only = |a: &BTreeSet<_>, b: &BTreeSet<_>| a.difference(b).cloned().collect::<Vec<_>>();
    assert!(
        by_master.len() > 10,
        "the master forwarded something: {by_master:?}"
    );
    assert_eq!(
        by_master,
        by_bridge,
        "only with the master: {:?}\nonly with meshbridge: {:?}",
        only(&by_master, &by_bridge),
        only(&by_bridge, &by_master)
    );
}

/// What an operator's mistake or a hostile file system can make of the import: it never
/// writes through a symbolic link (the output or a password file, with or without --force),
/// reads only regular files of bounded size (a FIFO used to hang it, `/dev/zero` to exhaust
/// memory), and each refusal is one line naming the file, exit 64.
#[test]
fn import_writes_through_no_symlink_and_reads_only_bounded_regular_files() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let master = "connection edge-7\naddress 10.0.0.7:1883\ntopic # both 2\nremote_username u\nremote_password pw\n";
    std::fs::write(dir.join("master.conf"), master).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    for link in ["bridge.toml", "edge-7.password"] {
        std::os::unix::fs::symlink(&victim, dir.join(link)).unwrap();
        for force in [false, true] {
            let mut args = vec!["import-mosquitto", "master.conf", "--out", "bridge.toml"];
            if force {
                args.push("--force");
            }
            let (code, out, err) = bridge(&args, dir);
            assert_eq!(code, 64, "{link} (force {force}): {out}{err}");
            assert!(err.contains(link) && err.contains("symbolic link"), "{err}");
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        }
        std::fs::remove_file(dir.join(link)).unwrap();
    }
    // A dangling link too (`exists` says no, a write would create its target).
    std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("bridge.toml")).unwrap();
    let (code, _, err) = bridge(
        &["import-mosquitto", "master.conf", "--out", "bridge.toml"],
        dir,
    );
    assert_eq!(code, 64, "{err}");
    assert!(!dir.join("elsewhere").exists());
    std::fs::remove_file(dir.join("bridge.toml")).unwrap();

    let fifo = dir.join("fifo.conf");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    std::fs::write(dir.join("big.conf"), vec![b'#'; 2 << 20]).unwrap();
    let conf_d = dir.join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    std::os::unix::fs::symlink(&fifo, conf_d.join("x.conf")).unwrap();
    std::fs::write(dir.join("includes.conf"), "include_dir conf.d\n").unwrap();
    for (input, why) in [
        ("fifo.conf", "not a regular file"),
        ("/dev/zero", "not a regular file"),
        ("big.conf", "larger than a configuration file"),
        ("includes.conf", "not a regular file"),
    ] {
        let started = std::time::Instant::now();
        let (code, out, err) = bridge(&["import-mosquitto", input, "--out", "out.toml"], dir);
        assert_eq!(code, 64, "{input}: {out}{err}");
        assert!(err.contains(why), "{input}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{input}: took {:?}",
            started.elapsed()
        );
        assert!(!dir.join("out.toml").exists());
    }
}
