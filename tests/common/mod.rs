//! Test harness: dev certificates, real mosquitto brokers on free loopback ports, the `bridge`
//! binary as a child process, and MQTT test clients. Every wait has a deadline; every process is
//! killed on drop.
#![allow(dead_code)]

pub mod mqtt;
pub mod proxy;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A temporary directory for one test; kept (and its path printed) when MESHBRIDGE_KEEP_TMP is
/// set, so the brokers' and the bridge's logs can be read after a failure.
pub fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    if std::env::var_os("MESHBRIDGE_KEEP_TMP").is_some() {
        eprintln!("test files kept in {}", dir.path().display());
        let mut dir = dir;
        dir.disable_cleanup(true);
        return dir;
    }
    dir
}

/// A free TCP port on loopback, below the ephemeral range (see `meshbridge::testing::free_port`).
pub fn free_port() -> u16 {
    meshbridge::testing::free_port().expect("free loopback port")
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Fails the test with a clear message when a required program is missing.
pub fn require(program: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: run ./scripts/test.sh (it installs what the tests need)"
    );
}

/// Dev PKI made at test time: a CA, a server certificate for 127.0.0.1/localhost, one for the
/// name `mqtt.internal` only (for server_name tests) and a client certificate for mTLS.
pub struct Certs {
    /// Directory holding the PEM files.
    pub dir: PathBuf,
}

impl Certs {
    /// Writes the PEM files into `dir`.
    pub fn generate(dir: &Path) -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "meshbridge test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        let leaf = |name: &str, sans: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
            let key_file = dir.join(format!("{name}.key"));
            std::fs::write(&key_file, key.serialize_pem()).unwrap();
            // Private, as the bridge asks of a key file (it warns otherwise).
            std::fs::set_permissions(
                &key_file,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        };
        leaf("server", vec!["localhost".into(), "127.0.0.1".into()]);
        leaf("internal", vec!["mqtt.internal".into()]);
        leaf("client", vec!["bridge-client".into()]);
        // A second, unrelated CA: its certificates must be refused.
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = CertifiedIssuer::self_signed(other, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("other-ca.crt"), other.pem()).unwrap();
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    /// Path of a file in the cert directory.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

/// How a test broker is set up.
#[derive(Clone, Debug)]
pub struct BrokerOpts {
    /// Server certificate name in the cert dir (`server` or `internal`).
    pub server_cert: &'static str,
    /// Require a client certificate on the TLS listener.
    pub mtls: bool,
    /// Add a third listener that requires this user name and password.
    pub password: Option<(&'static str, &'static str)>,
    /// Persist sessions and messages across restarts.
    pub persistence: bool,
    /// More mosquitto.conf lines (global options).
    pub extra_conf: &'static str,
    /// An ACL file's lines for the TLS listener (the bridge's), e.g. to refuse its publishes.
    pub tls_acl: Option<&'static str>,
    /// The CA bundle the TLS listener verifies client certificates with (default: the lab's
    /// CA).
    pub client_ca: Option<String>,
    /// More lines for the TLS listener, e.g. `use_identity_as_username true`.
    pub tls_listener_conf: &'static str,
}

impl Default for BrokerOpts {
    fn default() -> Self {
        Self {
            server_cert: "server",
            mtls: true,
            password: None,
            persistence: false,
            extra_conf: "",
            tls_acl: None,
            client_ca: None,
            tls_listener_conf: "",
        }
    }
}

impl BrokerOpts {
    /// Defaults, with sessions and messages persisted across restarts.
    pub fn persistent() -> Self {
        Self {
            persistence: true,
            ..Self::default()
        }
    }
}

/// A real mosquitto on loopback with a TLS listener (for the bridge), a plain listener (for
/// test clients) and optionally a password listener.
pub struct Mosquitto {
    /// Name (b1, b2, …).
    pub name: String,
    /// TLS (mTLS by default) listener.
    pub tls_port: u16,
    /// Plain anonymous listener.
    pub plain_port: u16,
    /// Password listener, if configured.
    pub auth_port: Option<u16>,
    dir: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker; its files live under `dir/name`.
    pub fn start(dir: &Path, name: &str, certs: &Certs, opts: BrokerOpts) -> Mosquitto {
        require("mosquitto");
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (tls_port, plain_port) = (free_port(), free_port());
        let auth_port = opts.password.map(|_| free_port());
        let mut conf = String::new();
        writeln!(conf, "per_listener_settings true").unwrap();
        writeln!(conf, "user root").unwrap();
        writeln!(conf, "max_queued_messages 1000000").unwrap();
        writeln!(conf, "max_inflight_messages 100").unwrap();
        writeln!(
            conf,
            "log_dest file {}",
            dir.join("mosquitto.log").display()
        )
        .unwrap();
        writeln!(conf, "log_type all").unwrap();
        writeln!(conf, "{}", opts.extra_conf).unwrap();
        if opts.persistence {
            writeln!(
                conf,
                "persistence true\npersistence_location {}/\nautosave_interval 1",
                dir.display()
            )
            .unwrap();
        } else {
            writeln!(conf, "persistence false").unwrap();
        }
        writeln!(
            conf,
            "listener {plain_port} 127.0.0.1\nallow_anonymous true"
        )
        .unwrap();
        writeln!(conf, "listener {tls_port} 127.0.0.1\nallow_anonymous true").unwrap();
        let client_ca = opts
            .client_ca
            .clone()
            .unwrap_or_else(|| certs.path("ca.crt"));
        writeln!(conf, "cafile {client_ca}\n{}", opts.tls_listener_conf).unwrap();
        writeln!(
            conf,
            "certfile {}",
            certs.path(&format!("{}.crt", opts.server_cert))
        )
        .unwrap();
        writeln!(
            conf,
            "keyfile {}",
            certs.path(&format!("{}.key", opts.server_cert))
        )
        .unwrap();
        writeln!(conf, "require_certificate {}", opts.mtls).unwrap();
        if let Some(acl) = opts.tls_acl {
            let acl_file = dir.join("tls.acl");
            std::fs::write(&acl_file, acl).unwrap();
            writeln!(conf, "acl_file {}", acl_file.display()).unwrap();
        }
        if let (Some((user, pass)), Some(port)) = (opts.password, auth_port) {
            let pwfile = dir.join("passwd");
            std::fs::write(&pwfile, "").unwrap();
            let ok = Command::new("mosquitto_passwd")
                .args(["-b", pwfile.to_str().unwrap(), user, pass])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "mosquitto_passwd failed");
            writeln!(
                conf,
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}",
                pwfile.display()
            )
            .unwrap();
        }
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut broker = Mosquitto {
            name: name.to_string(),
            tls_port,
            plain_port,
            auth_port,
            dir,
            conf: conf_path,
            child: None,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mosquitto");
        self.child = Some(child);
        let ok = wait_port(self.plain_port, Duration::from_secs(10))
            && wait_port(self.tls_port, Duration::from_secs(10));
        assert!(
            ok,
            "mosquitto {} did not open its ports; log:\n{}",
            self.name,
            self.log()
        );
    }

    /// The broker's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM (mosquitto saves its persistence file) and reap.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let _ = wait_child(&mut c, Duration::from_secs(10));
        }
    }

    /// Starts the broker again on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends a signal by name to a process.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The `bridge` binary running `run --config`, logging to a file.
pub struct Bridge {
    /// Directory with its config and log.
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Bridge {
    /// Writes `config` to `dir/bridge.toml` and starts `bridge run`.
    pub fn start(dir: &Path, config: &str) -> Bridge {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("bridge.toml"), config).unwrap();
        let mut b = Bridge {
            dir: dir.to_path_buf(),
            child: None,
        };
        b.spawn();
        b
    }

    /// Starts the process again with the same config (appending to the same log).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("bridge.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bridge"))
            .args(["run", "--config"])
            .arg(self.dir.join("bridge.toml"))
            .env(
                "RUST_LOG",
                std::env::var("MESHBRIDGE_TEST_LOG")
                    .unwrap_or_else(|_| "info,meshbridge=debug".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start bridge");
        self.child = Some(child);
    }

    /// The bridge's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bridge.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle` at least `times` times.
    pub fn wait_log(&self, needle: &str, times: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().matches(needle).count() >= times {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits until every named link has logged that it subscribed (asserts, with the log).
    pub fn wait_subscribed(&self, brokers: &[&str]) {
        self.wait_subscribed_after(0, brokers)
    }

    /// Restarts a stopped bridge and waits until the new process subscribed on `brokers`.
    pub fn respawn_subscribed(&mut self, brokers: &[&str]) {
        let from = self.log().len();
        self.spawn();
        self.wait_subscribed_after(from, brokers);
    }

    /// [`Self::wait_subscribed`], reading the log from byte `from` on.
    fn wait_subscribed_after(&self, from: usize, brokers: &[&str]) {
        for b in brokers {
            let needle = format!("link{{broker={b}}}");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let log = self.log();
                if log
                    .get(from..)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.contains(&needle) && l.contains("subscribed"))
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "link {b} did not subscribe; bridge log:\n{log}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM; returns the exit status (None when it did not exit within 20 s).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        signal(c.id(), "TERM");
        let status = wait_child(&mut c, Duration::from_secs(20));
        if status.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        status
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- bridge log ----\n{}", self.log());
        }
    }
}

/// A `[[broker]]` block for a test broker's TLS listener.
pub fn broker_block(b: &Mosquitto, extra: &str) -> String {
    format!(
        "[[broker]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\n{extra}\n",
        b.name, b.tls_port
    )
}

/// A bridge config for the given brokers over mTLS.
pub fn bridge_config(
    certs: &Certs,
    id: &str,
    data: &Path,
    brokers: &[(&Mosquitto, &str)],
) -> String {
    let mut s = format!(
        "[bridge]\nid = \"{id}\"\nadmin_listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n\n[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n",
        free_port(),
        data.display(),
        certs.path("ca.crt"),
        certs.path("client.crt"),
        certs.path("client.key"),
    );
    for (b, extra) in brokers {
        s.push_str(&broker_block(b, extra));
    }
    s
}

/// A test directory, its dev certificates and `N` mosquitto brokers named b1..bN with default
/// options. Keep the directory alive as long as the processes.
pub fn lab<const N: usize>() -> (tempfile::TempDir, Certs, [Mosquitto; N]) {
    lab_with(std::array::from_fn(|_| BrokerOpts::default()))
}

/// [`lab`] with broker `b{i+1}` set up by `opts[i]`.
pub fn lab_with<const N: usize>(
    opts: [BrokerOpts; N],
) -> (tempfile::TempDir, Certs, [Mosquitto; N]) {
    let tmp = tempdir();
    let certs = Certs::generate(&tmp.path().join("certs"));
    let mut opts = opts.into_iter();
    let brokers = std::array::from_fn(|i| {
        let o = opts.next().unwrap_or_default();
        Mosquitto::start(tmp.path(), &format!("b{}", i + 1), &certs, o)
    });
    (tmp, certs, brokers)
}

/// Three mosquitto brokers (b1..b3, default options) and a bridge linking all of them with
/// `link` as extra keys in every `[[broker]]`, subscribed and ready. The directory holds
/// every file; keep it alive as long as the processes.
pub fn three_brokers_meshed(link: &str) -> (tempfile::TempDir, [Mosquitto; 3], Bridge) {
    let (tmp, certs, brokers) = lab::<3>();
    let cfg = bridge_config(
        &certs,
        "mesh",
        &tmp.path().join("data"),
        &brokers.iter().map(|b| (b, link)).collect::<Vec<_>>(),
    );
    let bridge = Bridge::start(&tmp.path().join("bridge"), &cfg);
    bridge.wait_subscribed(&["b1", "b2", "b3"]);
    (tmp, brokers, bridge)
}

/// Compares what a subscriber got with what was expected, as multisets of payloads; returns a
/// description of the difference (empty when equal).
pub fn multiset_diff(expected: &[Vec<u8>], got: &[Vec<u8>]) -> String {
    let mut counts: BTreeMap<&[u8], i64> = BTreeMap::new();
    for e in expected {
        *counts.entry(e).or_default() += 1;
    }
    for g in got {
        *counts.entry(g).or_default() -= 1;
    }
    let missing: Vec<_> = counts.iter().filter(|(_, c)| **c > 0).collect();
    let extra: Vec<_> = counts.iter().filter(|(_, c)| **c < 0).collect();
    if missing.is_empty() && extra.is_empty() {
        return String::new();
    }
    let show = |v: &[(&&[u8], &i64)]| {
        v.iter()
            .take(5)
            .map(|(k, c)| format!("{}x{}", String::from_utf8_lossy(k), c.abs()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{} missing (e.g. {}), {} duplicated/unexpected (e.g. {}); expected {}, got {}",
        missing.len(),
        show(&missing),
        extra.len(),
        show(&extra),
        expected.len(),
        got.len()
    )
}

/// The `admin_listen` address written in a bridge config.
pub fn admin_addr(cfg: &str) -> String {
    cfg.lines()
        .find_map(|l| l.strip_prefix("admin_listen = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("admin_listen in config")
        .to_string()
}

/// GET on the admin API: status code and body.
pub fn http_get(url: &str, token: Option<&str>) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut req = agent.get(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = req.call().expect("admin API reachable");
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// Value of a metric line such as `meshbridge_forwarded_total{broker="b1"} 12`.
pub fn metric(text: &str, name: &str, broker: &str) -> Option<f64> {
    let prefix = format!("{name}{{broker=\"{broker}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// A lab built step by step: `n` mosquitto brokers (b1..bn) and a bridge meshing some of them.
/// Replaces the setup each test used to repeat (lab, config, bridge, wait).
pub struct MeshBuilder {
    opts: Vec<BrokerOpts>,
    link_keys: Vec<String>,
    bridge_keys: String,
    meshed: Vec<usize>,
    down: Vec<usize>,
}

/// What [`MeshBuilder::start`] made. Keep it alive as long as the processes.
pub struct Mesh {
    /// The brokers, b1 first.
    pub brokers: Vec<Mosquitto>,
    /// The bridge, subscribed on every meshed broker that is up.
    pub bridge: Bridge,
    /// Its admin address (`host:port`).
    pub admin: String,
    /// Its config file's text.
    pub config: String,
    /// Dev certificates of the lab.
    pub certs: Certs,
    /// The directory holding every file (dropped last).
    pub tmp: tempfile::TempDir,
}

impl MeshBuilder {
    /// `n` brokers with default options, all meshed.
    pub fn new(n: usize) -> Self {
        Self {
            opts: vec![BrokerOpts::default(); n],
            link_keys: vec![String::new(); n],
            bridge_keys: String::new(),
            meshed: (0..n).collect(),
            down: Vec::new(),
        }
    }

    /// Broker `b{i+1}` set up by `opts`.
    pub fn broker(mut self, i: usize, opts: BrokerOpts) -> Self {
        self.opts[i] = opts;
        self
    }

    /// Every broker set up by `opts`.
    pub fn every_broker(mut self, opts: BrokerOpts) -> Self {
        self.opts = vec![opts; self.opts.len()];
        self
    }

    /// Keys added to `[bridge]` (one per line).
    pub fn bridge_keys(mut self, keys: &str) -> Self {
        self.bridge_keys = keys.to_string();
        self
    }

    /// Keys added to every `[[broker]]`.
    pub fn link_keys(mut self, keys: &str) -> Self {
        for k in &mut self.link_keys {
            *k = keys.to_string();
        }
        self
    }

    /// Keys added to broker `b{i+1}`'s `[[broker]]`.
    pub fn link_keys_of(mut self, i: usize, keys: &str) -> Self {
        self.link_keys[i] = keys.to_string();
        self
    }

    /// Only these brokers (indexes) are in the config file; the others are there to add.
    pub fn meshed(mut self, indexes: &[usize]) -> Self {
        self.meshed = indexes.to_vec();
        self
    }

    /// Broker `b{i+1}` is killed before the bridge starts.
    pub fn down(mut self, i: usize) -> Self {
        self.down.push(i);
        self
    }

    /// Starts the brokers and the bridge; returns once the bridge subscribed on every meshed
    /// broker that is up.
    pub fn start(self) -> Mesh {
        let tmp = tempdir();
        let certs = Certs::generate(&tmp.path().join("certs"));
        let mut brokers: Vec<Mosquitto> = self
            .opts
            .into_iter()
            .enumerate()
            .map(|(i, o)| Mosquitto::start(tmp.path(), &format!("b{}", i + 1), &certs, o))
            .collect();
        for &i in &self.down {
            brokers[i].kill();
        }
        let links: Vec<(&Mosquitto, &str)> = self
            .meshed
            .iter()
            .map(|&i| (&brokers[i], self.link_keys[i].as_str()))
            .collect();
        let mut config = bridge_config(&certs, "mesh", &tmp.path().join("data"), &links);
        if !self.bridge_keys.is_empty() {
            config = config.replacen("\n\n[tls]", &format!("\n{}\n\n[tls]", self.bridge_keys), 1);
        }
        let admin = admin_addr(&config);
        let bridge = Bridge::start(&tmp.path().join("bridge"), &config);
        let up: Vec<String> = self
            .meshed
            .iter()
            .filter(|i| !self.down.contains(i))
            .map(|i| format!("b{}", i + 1))
            .collect();
        bridge.wait_subscribed(&up.iter().map(String::as_str).collect::<Vec<_>>());
        Mesh {
            brokers,
            bridge,
            admin,
            config,
            certs,
            tmp,
        }
    }
}

impl Mesh {
    /// `/metrics` of the bridge.
    pub fn metrics(&self) -> String {
        http_get(&format!("http://{}/metrics", self.admin), None).1
    }
}

/// Runs the `bridge` binary with `args` (in `dir` when given), logs off: (exit code, stdout,
/// stderr).
pub fn cli_in(args: &[&str], dir: Option<&Path>) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bridge"));
    command.args(args).env("RUST_LOG", "off");
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let out = command.output().expect("run bridge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
