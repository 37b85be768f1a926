//! `bridge demo` and `bridge certs`: the first look works, and what it reports is real.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicates_what_it_says() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(["demo", "--duration", "6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start demo");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Find b1's plain port in the banner, then watch b1 with a client of our own.
    let mut lines = Vec::new();
    let port: u16 = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("demo banner");
        lines.push(line.clone());
        if let Some(rest) = line.trim().strip_prefix("b1  plain 127.0.0.1:") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // The embedded brokers speak MQTT 3.1.1.
    let mut opts = rumqttc::MqttOptions::new("demo-checker", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    client
        .subscribe("demo/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let topics = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = topics.clone();
    let checker = tokio::spawn(async move {
        while let Ok(event) = el.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                sink.lock().unwrap().push(p.topic);
            }
        }
    });
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    lines.extend(rx.try_iter());
    let out = lines.join("\n");
    assert!(status.success(), "demo failed:\n{out}");
    assert!(out.contains("Add a fourth broker"), "{out}");
    let arrived = out.lines().filter(|l| l.contains("arrived on")).count();
    assert!(arrived >= 3, "sample traffic reported:\n{out}");
    let summary = out
        .lines()
        .find(|l| l.contains("sample messages published"))
        .expect("summary");
    let published: usize = summary.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        summary.contains(&format!("{published} arrived on every other broker")),
        "{summary}"
    );
    // Our own subscriber on b1 saw messages published on b2 and b3: the report is real.
    checker.abort();
    let topics = topics.lock().unwrap().clone();
    assert!(topics.iter().any(|t| t == "demo/b2"), "{topics:?}");
    assert!(topics.iter().any(|t| t == "demo/b3"), "{topics:?}");
}

#[test]
fn certs_command_writes_a_usable_pki_and_refuses_to_overwrite() {
    let tmp = common::tempdir();
    let out = tmp.path().join("pki");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "certs",
            "--out",
            out.to_str().unwrap(),
            "--name",
            "mqtt.internal",
            "--name",
            "10.0.0.1",
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_bridge"))
            .args(&args)
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for f in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let again = run(&[]);
    assert_eq!(again.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(run(&["--force"]).status.success());
    // The bridge accepts them in a config.
    let cfg = tmp.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[bridge]\nid = \"x\"\n[tls]\nca_file = \"{0}/ca.crt\"\ncert_file = \"{0}/client.crt\"\nkey_file = \"{0}/client.key\"\n[[broker]]\nname = \"b1\"\naddress = \"10.0.0.1:8883\"\n",
            out.display()
        ),
    )
    .unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(["check", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args([
            "certs",
            "--out",
            out.to_str().unwrap(),
            "--name",
            "not a name",
            "--force",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"not a name\""));
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let tmp = common::tempdir();
    let cfg = tmp.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[bridge]\nid = \"j\"\nadmin_listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:{}\"\ntls = false\n",
            common::free_port(),
            tmp.path().join("data").display(),
            common::free_port()
        ),
    )
    .unwrap();
    let log = tmp.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args([
            "--log-format",
            "json",
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("link down")
    {
        assert!(std::time::Instant::now() < deadline, "no link-down line");
        std::thread::sleep(Duration::from_millis(50));
    }
    common::signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
    let down = text.lines().find(|l| l.contains("link down")).unwrap();
    let v: serde_json::Value = serde_json::from_str(down).unwrap();
    assert_eq!(
        v["span"]["broker"], "b1",
        "the broker name is a field: {down}"
    );
}
