//! The deployment files under docker/ cannot run here (no Docker engine), so every one that a
//! tool on this machine can check is checked: nginx -t, haproxy -c, mosquitto started on its
//! config, bridge check, sh -n. The only changes made before checking are container paths,
//! host names and ports, rewritten to this machine's (listed in each test).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Certs, free_port, require, wait_port};

fn docker(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("docker")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rewrite(text: &str, subs: &[(&str, String)]) -> String {
    subs.iter()
        .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run checker");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn certs(dir: &Path) -> Certs {
    let certs = Certs::generate(&dir.join("certs"));
    let pem = std::fs::read_to_string(certs.dir.join("server.crt")).unwrap()
        + &std::fs::read_to_string(certs.dir.join("server.key")).unwrap();
    std::fs::write(certs.dir.join("server.pem"), pem).unwrap();
    certs
}

#[test]
fn nginx_front_configs_pass_nginx_t() {
    require("nginx");
    let tmp = common::tempdir();
    let certs = certs(tmp.path());
    for file in [
        "nginx/nginx-stream-passthrough.conf",
        "nginx/nginx-stream-tls-termination.conf",
    ] {
        // Rewritten: broker host names (not resolvable here) and the certificate directory.
        let mut text = rewrite(
            &docker(file),
            &[
                ("mqtt1:", "127.0.0.1:".into()),
                ("mqtt2:", "127.0.0.2:".into()),
                ("mqtt3:", "127.0.0.3:".into()),
                ("/etc/nginx/certs", certs.dir.display().to_string()),
            ],
        );
        let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
        if Path::new(module).exists() {
            // Debian builds the stream module as a dynamic module.
            text = format!("load_module {module};\n{text}");
        }
        let conf = tmp.path().join("nginx.conf");
        std::fs::write(&conf, text).unwrap();
        let (ok, out) = run(Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(tmp.path())
            .arg("-c")
            .arg(&conf)
            .arg("-g")
            .arg(format!(
                "pid {0}/nginx.pid; error_log {0}/error.log;",
                tmp.path().display()
            )));
        assert!(ok, "{file}: {out}");
    }
}

#[test]
fn haproxy_front_configs_pass_haproxy_c() {
    require("haproxy");
    let tmp = common::tempdir();
    let certs = certs(tmp.path());
    for file in [
        "haproxy/haproxy-passthrough.cfg",
        "haproxy/haproxy-tls-termination.cfg",
    ] {
        // Rewritten: the certificate directory only (unresolvable names are allowed by init-addr).
        let text = rewrite(
            &docker(file),
            &[("/etc/haproxy/certs", certs.dir.display().to_string())],
        );
        let conf = tmp.path().join("haproxy.cfg");
        std::fs::write(&conf, text).unwrap();
        let (ok, out) = run(Command::new("haproxy").arg("-c").arg("-f").arg(&conf));
        assert!(ok && out.contains("valid"), "{file}: {out}");
    }
}

#[test]
fn mosquitto_config_starts_a_broker() {
    require("mosquitto");
    let tmp = common::tempdir();
    let certs = certs(tmp.path());
    let port = free_port();
    // Rewritten: certificate and data directories, the port, and loopback only.
    let text = rewrite(
        &docker("mosquitto/mosquitto.conf"),
        &[
            ("/mosquitto/certs", certs.dir.display().to_string()),
            ("/mosquitto/data/", format!("{}/", tmp.path().display())),
            ("listener 8883", format!("listener {port} 127.0.0.1")),
        ],
    ) + "user root\n";
    let conf = tmp.path().join("mosquitto.conf");
    std::fs::write(&conf, text).unwrap();
    let mut child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let up = wait_port(port, Duration::from_secs(10));
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        up && exited.is_none(),
        "mosquitto refused docker/mosquitto/mosquitto.conf: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bridge_config_passes_bridge_check() {
    let tmp = common::tempdir();
    let certs = certs(tmp.path());
    // Rewritten: the certificate and data directories.
    let text = rewrite(
        &docker("bridge.toml"),
        &[
            ("/etc/meshbridge/certs", certs.dir.display().to_string()),
            (
                "/var/lib/meshbridge",
                tmp.path().join("data").display().to_string(),
            ),
        ],
    );
    let conf = tmp.path().join("bridge.toml");
    std::fs::write(&conf, text).unwrap();
    let (ok, out) = run(Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(["check", "--config"])
        .arg(&conf));
    assert!(ok && out.contains("ok (3 brokers)"), "{out}");
}

#[test]
fn keepalived_check_script_fails_when_the_bridge_is_not_ready() {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docker/keepalived/check_meshbridge.sh");
    let (ok, out) = run(Command::new("sh").arg("-n").arg(&script));
    assert!(ok, "syntax: {out}");
    if Command::new("sh")
        .arg("-c")
        .arg("command -v curl")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let (ok, _) = run(Command::new("sh")
            .arg(&script)
            .arg(format!("127.0.0.1:{}", free_port())));
        assert!(!ok, "nothing listens there: the check must fail");
    }
}

#[test]
fn container_and_unit_files_keep_their_promises() {
    let dockerfile = docker("Dockerfile");
    assert!(
        dockerfile.contains("USER meshbridge"),
        "runs as a non-root user"
    );
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/healthz"));
    assert!(dockerfile.contains("--bin bridge"));
    let compose = docker("compose.yaml");
    for service in [
        "mqtt1:",
        "mqtt2:",
        "mqtt3:",
        "front:",
        "bridge-a:",
        "bridge-b:",
    ] {
        assert!(compose.contains(service), "compose.yaml has {service}");
    }
    // The HA pair: one config, an instance name each (the host name), a data volume each.
    for own in [
        "hostname: bridge-a",
        "hostname: bridge-b",
        "bridge-a-data:/var/lib/meshbridge",
        "bridge-b-data:/var/lib/meshbridge",
    ] {
        assert!(compose.contains(own), "compose.yaml has {own}");
    }
    assert!(
        !docker("bridge.toml").contains("instance"),
        "bridge.toml leaves the instance name to the host name, so both processes share it"
    );
    for mounted in [
        "./mosquitto/mosquitto.conf",
        "./nginx/nginx-stream-passthrough.conf",
        "./bridge.toml",
    ] {
        assert!(compose.contains(mounted), "compose.yaml mounts {mounted}");
    }
    let unit = docker("systemd/meshbridge.service");
    assert!(unit.contains("Restart=always") && unit.contains("NoNewPrivileges=yes"));
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
}

/// `bridge completions bash|zsh|fish` and `bridge man` write what each shell and `man` take,
/// for every subcommand, and the Dockerfile installs them where each looks.
#[test]
fn completions_and_the_manual_page_come_from_the_cli() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bridge"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "bridge {args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("_bridge()") && bash.contains("add-broker") && bash.contains("dead-letters")
    );
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bridge.bash");
    std::fs::write(&script, &bash).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(syntax.success(), "bash completion parses");
    assert!(run(&["completions", "zsh"]).starts_with("#compdef bridge"));
    assert!(run(&["completions", "fish"]).contains("complete -c bridge"));
    let man = run(&["man"]);
    assert!(
        man.contains(".TH bridge 1"),
        "{}",
        &man[..200.min(man.len())]
    );
    for sub in [
        "BRIDGE-RUN",
        "BRIDGE-ADD-BROKER",
        "BRIDGE-MESH-KEY",
        "BRIDGE-DEAD-LETTERS",
    ] {
        assert!(man.contains(&format!(".TH {sub} ")), "{sub} in the manual");
    }
    let dockerfile = docker("Dockerfile");
    for installed in [
        "bridge completions bash > /usr/share/bash-completion/completions/bridge",
        "bridge completions zsh > /usr/share/zsh/vendor-completions/_bridge",
        "bridge completions fish > /usr/share/fish/vendor_completions.d/bridge.fish",
        "bridge man | gzip -9 > /usr/local/share/man/man1/bridge.1.gz",
    ] {
        assert!(
            dockerfile.contains(installed),
            "the Dockerfile runs {installed}"
        );
    }
}

#[test]
fn prometheus_alert_rules_and_config_pass_promtool() {
    require("promtool");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docker/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"],
        &["check", "config", "prometheus.yml"],
    ] {
        let (ok, out) = run(Command::new("promtool").args(args).current_dir(&dir));
        assert!(ok, "promtool {args:?}:\n{out}");
    }
}

/// The metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("meshbridge_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

/// Every `expr` of a Grafana dashboard, wherever it is nested.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The Grafana dashboard is well-formed (panels with queries, on the 24-column grid, on the
/// datasource input), and it and the alert rules only use metrics a running bridge exposes
/// (read from its /metrics, probes and lag histogram included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_metrics_the_bridge_exposes() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&docker("grafana/meshbridge-dashboard.json")).expect("JSON");
    assert_eq!(dashboard["uid"], "meshbridge");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = std::collections::HashSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24 && g["h"].as_u64().unwrap() > 0, "{p}");
        if p["type"] == "row" {
            continue;
        }
        assert!(!p["title"].as_str().unwrap_or_default().is_empty(), "{p}");
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{p}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{p}");
        for t in targets {
            assert!(
                t["expr"]
                    .as_str()
                    .is_some_and(|e| e.contains("meshbridge_")),
                "{t}"
            );
        }
    }
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    exprs.extend(
        docker("prometheus/alerts.yml")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(str::to_string),
    );
    assert!(exprs.len() > 20);

    let mesh = common::MeshBuilder::new(2)
        .bridge_keys("probe_interval = \"200ms\"")
        .start();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = mesh.metrics();
        if text.contains("meshbridge_replication_lag_seconds_count")
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut exposed = std::collections::HashSet::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        exposed.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                exposed.contains(&name),
                "{name} (in `{e}`) is not in the bridge's /metrics:\n{text}"
            );
        }
    }
}

/// Whether `program` runs here.
fn available(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// deploy/kubernetes renders with `kubectl kustomize`, every object validates against the
/// Kubernetes schemas offline (`kubernetes-validate --strict`, installed by scripts/test.sh),
/// the objects keep the promises docs/KUBERNETES.md makes, and the ConfigMap's bridge.toml
/// passes `bridge check` once the Secrets it names exist.
#[test]
fn kubernetes_base_renders_validates_and_its_config_checks() {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let tmp = tempfile::tempdir().unwrap();
    if available("kubectl", "version") || available("kubectl", "help") {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(&base)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        for kind in ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"] {
            assert!(rendered.contains(&format!("kind: {kind}\n")), "{kind}");
        }
        for promise in [
            "replicas: 2",
            "podAntiAffinity:",
            "path: /readyz",
            "path: /healthz",
            "terminationGracePeriodSeconds: 30",
            "runAsNonRoot: true",
            "readOnlyRootFilesystem: true",
            "defaultMode: 256",
            "minAvailable: 1",
            "prometheus.io/scrape: \"true\"",
            "mountPath: /var/lib/meshbridge",
        ] {
            assert!(
                rendered.contains(promise),
                "the rendered base has {promise}"
            );
        }
        let file = tmp.path().join("rendered.yaml");
        std::fs::write(&file, &rendered).unwrap();
        if available("kubernetes-validate", "--version") {
            let out = Command::new("kubernetes-validate")
                .arg("--strict")
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "kubernetes-validate: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            println!(
                "kubernetes-validate not installed: schema validation skipped (scripts/test.sh installs it)"
            );
        }
    } else {
        println!("kubectl not installed: rendering and schema validation skipped");
    }
    // The config, with the Secrets' files where the Deployment mounts them.
    let toml = std::fs::read_to_string(base.join("bridge.toml")).unwrap();
    let root = tmp.path().join("etc");
    let certs = root.join("tls");
    meshbridge::certs::generate(&certs, &["localhost".into()], false).unwrap();
    std::fs::create_dir_all(root.join("admin")).unwrap();
    std::fs::write(root.join("admin/token"), "t0ken\n").unwrap();
    std::fs::create_dir_all(root.join("mesh-key")).unwrap();
    meshbridge::seal::write_key_file(&root.join("mesh-key/mesh.key"), false).unwrap();
    let toml = toml
        .replace("/etc/meshbridge/", &format!("{}/", root.display()))
        .replace(
            "/var/lib/meshbridge",
            &tmp.path().join("data").display().to_string(),
        );
    let cfg = tmp.path().join("bridge.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bridge"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bridge check: {err}");
    assert!(!err.contains("mesh_key_file is not set"), "{err}");
}
