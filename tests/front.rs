//! Deployment shapes: clients behind an nginx `stream` round-robin front, brokers reached by a
//! certificate name (`server_name`), plain TCP, and username/password.

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::mqtt::{self, Pub};
use common::{Bridge, BrokerOpts, Certs, Mosquitto, free_port, multiset_diff, require, wait_port};

/// nginx with a `stream` round-robin upstream over the brokers' plain listeners.
struct Nginx {
    port: u16,
    child: Child,
}

impl Nginx {
    fn start(dir: &Path, brokers: &[&Mosquitto]) -> Nginx {
        require("nginx");
        let dir = dir.join("nginx");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut conf = String::new();
        let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
        if Path::new(module).exists() {
            writeln!(conf, "load_module {module};").unwrap();
        }
        writeln!(
            conf,
            "daemon off;\nmaster_process off;\nworker_processes 1;"
        )
        .unwrap();
        writeln!(conf, "pid {}/nginx.pid;", dir.display()).unwrap();
        writeln!(conf, "error_log {}/error.log info;", dir.display()).unwrap();
        writeln!(conf, "events {{ worker_connections 256; }}").unwrap();
        writeln!(conf, "stream {{\n  upstream mqtt {{").unwrap();
        for b in brokers {
            writeln!(conf, "    server 127.0.0.1:{};", b.plain_port).unwrap();
        }
        writeln!(
            conf,
            "  }}\n  server {{\n    listen 127.0.0.1:{port};\n    proxy_pass mqtt;\n  }}\n}}"
        )
        .unwrap();
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        assert!(
            wait_port(port, Duration::from_secs(10)),
            "nginx did not listen on {port}"
        );
        Nginx { port, child }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_an_nginx_round_robin_front_all_see_everything() {
    let (tmp, brokers, _bridge) = common::three_brokers_meshed("");
    let front = Nginx::start(tmp.path(), &brokers.iter().collect::<Vec<_>>());

    // Three subscribers and one publisher through the front: round robin puts them on
    // different brokers (checked in the brokers' logs, not assumed).
    let mut subs = Vec::new();
    for i in 0..3 {
        subs.push(mqtt::subscribe(front.port, &format!("front-sub-{i}"), "front/#").await);
    }
    let msgs: Vec<Pub> = (0..500)
        .map(|i| Pub::new(format!("front/{}", i % 3), format!("m{i}"), 1))
        .collect();
    mqtt::publish(front.port, "front-pub", &msgs).await;
    let expected: Vec<Vec<u8>> = msgs.iter().map(|m| m.payload.clone()).collect();
    for (i, s) in subs.iter().enumerate() {
        s.wait_count(500, Duration::from_secs(30)).await;
        s.settle(Duration::from_millis(500)).await;
        assert_eq!(
            multiset_diff(&expected, &s.payloads()),
            "",
            "subscriber {i} behind the front"
        );
    }
    let homes: Vec<&str> = (0..3)
        .map(|i| {
            let id = format!("as front-sub-{i} ");
            brokers
                .iter()
                .find(|b| b.log().contains(&id))
                .map(|b| b.name.as_str())
                .expect("subscriber found on a broker")
        })
        .collect();
    let mut distinct = homes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        3,
        "round robin spread the subscribers: {homes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_override_plain_tcp_and_password() {
    let tmp = common::tempdir();
    let certs = Certs::generate(&tmp.path().join("certs"));
    // b1's certificate names only mqtt.internal; the bridge dials 127.0.0.1.
    let b1 = Mosquitto::start(
        tmp.path(),
        "b1",
        &certs,
        BrokerOpts {
            server_cert: "internal",
            ..Default::default()
        },
    );
    // b2 is reached over plain TCP with a user name and password.
    let b2 = Mosquitto::start(
        tmp.path(),
        "b2",
        &certs,
        BrokerOpts {
            password: Some(("bridge", "pa55word")),
            ..Default::default()
        },
    );
    // b3: TLS without client certificate, CA given per broker.
    let b3 = Mosquitto::start(
        tmp.path(),
        "b3",
        &certs,
        BrokerOpts {
            mtls: false,
            ..Default::default()
        },
    );
    let pw = tmp.path().join("b2.password");
    std::fs::write(&pw, "pa55word\n").unwrap();
    let cfg = format!(
        r#"[bridge]
id = "mesh"
admin_listen = "127.0.0.1:{admin}"
data_dir = "{data}"

[tls]
ca_file = "{ca}"
cert_file = "{crt}"
key_file = "{key}"

[[broker]]
name = "b1"
address = "127.0.0.1:{p1}"
server_name = "mqtt.internal"

[[broker]]
name = "b2"
address = "127.0.0.1:{p2}"
tls = false
username = "bridge"
password_file = "{pw}"

[[broker]]
name = "b3"
address = "localhost:{p3}"
cert_file = "{crt}"
"#,
        admin = free_port(),
        data = tmp.path().join("data").display(),
        ca = certs.path("ca.crt"),
        crt = certs.path("client.crt"),
        key = certs.path("client.key"),
        p1 = b1.tls_port,
        p2 = b2.auth_port.unwrap(),
        p3 = b3.tls_port,
        pw = pw.display(),
    );
    let bridge = Bridge::start(&tmp.path().join("bridge"), &cfg);
    bridge.wait_subscribed(&["b1", "b2", "b3"]);
    let s2 = mqtt::subscribe(b2.plain_port, "s2", "#").await;
    let s3 = mqtt::subscribe(b3.plain_port, "s3", "#").await;
    let msgs: Vec<Pub> = (0..100)
        .map(|i| Pub::new("names/x", format!("n{i}"), 2))
        .collect();
    mqtt::publish(b1.plain_port, "p1", &msgs).await;
    let expected: Vec<Vec<u8>> = msgs.iter().map(|m| m.payload.clone()).collect();
    s2.wait_count(100, Duration::from_secs(20)).await;
    s3.wait_count(100, Duration::from_secs(20)).await;
    assert_eq!(
        multiset_diff(&expected, &s2.payloads()),
        "",
        "b1 (server_name) -> b2 (password)"
    );
    assert_eq!(multiset_diff(&expected, &s3.payloads()), "", "b1 -> b3");
    let log = bridge.log();
    assert!(
        !log.contains("pa55word"),
        "the password never reaches the log"
    );

    // Without server_name the same certificate is refused (the override is what made it work).
    let bad: String = cfg
        .replace("server_name = \"mqtt.internal\"\n", "")
        .lines()
        .map(|l| {
            if l.starts_with("admin_listen") {
                format!("admin_listen = \"127.0.0.1:{}\"\n", free_port())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let bridge2 = Bridge::start(
        &tmp.path().join("bridge2"),
        &bad.replace("id = \"mesh\"", "id = \"mesh2\"")
            .replace("/data\"", "/data2\""),
    );
    assert!(
        bridge2.wait_log("NotValidForName", 1, Duration::from_secs(10))
            || bridge2.wait_log("certificate", 1, Duration::from_secs(1)),
        "a name mismatch is reported:\n{}",
        bridge2.log()
    );
    assert!(
        bridge2
            .log()
            .lines()
            .any(|l| l.contains("link{broker=b1}") && l.contains("link down")),
        "{}",
        bridge2.log()
    );
}
