//! `bridge`: parse the command line, set up logging, dispatch. Exit codes: 0 ok, 64 bad
//! configuration or usage, 65 damaged spool file (see `run --spool-recover`), 1 other failures
//! (admin API unreachable or refusing, runtime errors).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use meshbridge::admin::AddBrokerRequest;
use meshbridge::admin::client::{
    AdminClient, dead_letters_table, instances_table, matrix_table, reconcile_table, status_table,
};
use meshbridge::cli::{AddBrokerArgs, AdminTarget, Cli, Command, LogFormat};
use meshbridge::config::Config;
use meshbridge::message::Protocol;
use tokio_util::sync::CancellationToken;

/// Exit code for bad configuration or usage (EX_USAGE, as linkerd2-proxy does).
const EXIT_CONFIG: u8 = 64;

/// Exit code for a damaged spool file (EX_DATAERR): restarting does not help, an operator must
/// move it aside or run with `--spool-recover`.
const EXIT_DATA: u8 = 65;

/// Exit code for every other failure (admin API unreachable or refusing, runtime errors).
const EXIT_FAILURE: u8 = 1;

/// Why a subcommand failed: the one line to print and the exit code it carries.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl std::fmt::Display) -> Self {
        Self {
            code,
            message: message.to_string(),
        }
    }

    fn config(message: impl std::fmt::Display) -> Self {
        Self::new(EXIT_CONFIG, message)
    }

    fn other(message: impl std::fmt::Display) -> Self {
        Self::new(EXIT_FAILURE, message)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its library logs only speak up for problems.
    // rumqttc's state machine warns once per PUBACK/PUBREC with an error reason; the links
    // count and log those themselves, rate-limited (metrics::message_rejected).
    let default_filter = if matches!(cli.command, Command::Demo { .. }) {
        "warn,rumqttd=off"
    } else {
        "info,rumqttc::v5::state=error,rumqttc::state=error"
    };
    init_tracing(cli.log_format, default_filter);
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            spool_recover,
        } => run(config, spool_recover),
        Command::Demo { duration } => demo(duration),
        Command::Certs { out, names, force } => certs(&out, names, force),
        Command::MeshKey { out, force } => mesh_key(&out, force),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "bridge", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => man(),
        Command::AddBroker(args) => add_broker(args),
        Command::RemoveBroker { broker, target } => remove_broker(&broker, &target),
        Command::Reconcile {
            repair,
            delete_extra,
            json,
            target,
        } => reconcile(repair, delete_extra, json, &target),
        Command::Status {
            json,
            matrix,
            watch,
            target,
        } => status(json, matrix, watch, &target),
        Command::Instances { json, target } => instances(json, &target),
        Command::DeadLetters {
            json,
            limit,
            target,
        } => dead_letters(json, limit, &target),
        Command::ImportMosquitto {
            file,
            out,
            id,
            force,
        } => import_mosquitto(&file, &out, &id, force),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// `bridge check`: the config's warnings on stderr, then ok or the one-line error.
fn check(path: &std::path::Path) -> Result<(), Failure> {
    let config = Config::load(path).map_err(Failure::config)?;
    for w in config.all_warnings() {
        eprintln!("warning: {w}");
    }
    println!("{}: ok ({} brokers)", path.display(), config.brokers.len());
    Ok(())
}

/// `bridge run`: the control plane (admin API, signals, supervisor) on this thread; the links on
/// their own threads (`bridge.worker_threads`, see meshbridge::link::threads).
fn run(path: std::path::PathBuf, spool_recover: bool) -> Result<(), Failure> {
    let config = Config::load(&path).map_err(Failure::config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::other(format!("cannot start the runtime: {e}")))?;
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let (reload_tx, reload) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(signal_handler(shutdown.clone(), reload_tx));
        meshbridge::run(
            config,
            meshbridge::Control {
                shutdown,
                reload,
                config_path: Some(path),
                spool_recover,
            },
        )
        .await
    });
    result.map_err(|e| match e {
        meshbridge::RunError::AdminBind { .. } => Failure::config(e),
        meshbridge::RunError::Spool(meshbridge::spool::SpoolError::Damaged { .. }) => {
            Failure::new(EXIT_DATA, e)
        }
        other => Failure::other(other),
    })
}

/// `bridge demo`.
fn demo(duration: Option<u64>) -> Result<(), Failure> {
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Failure::other(format!("cannot start the runtime: {e}")))?;
    runtime
        .block_on(meshbridge::demo::run(
            duration.map(std::time::Duration::from_secs),
        ))
        .map_err(Failure::other)
}

/// `bridge certs`.
fn certs(out: &std::path::Path, names: Vec<String>, force: bool) -> Result<(), Failure> {
    let names = if names.is_empty() {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        names
    };
    let files = meshbridge::certs::generate(out, &names, force).map_err(|e| match e {
        meshbridge::certs::CertsError::Write { .. } => Failure::other(e),
        other => Failure::config(other),
    })?;
    for f in files {
        println!("wrote {}", f.display());
    }
    println!("server certificate names: {}", names.join(", "));
    Ok(())
}

/// `bridge man`: the manual page of `bridge` and its subcommands, in one roff page.
fn man() -> Result<(), Failure> {
    use clap::CommandFactory;
    let command = Cli::command();
    let mut out = Vec::new();
    let page = clap_mangen::Man::new(command.clone());
    page.render(&mut out).map_err(Failure::other)?;
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        clap_mangen::Man::new(sub.clone())
            .title(format!("BRIDGE-{}", sub.get_name().to_uppercase()))
            .render(&mut out)
            .map_err(Failure::other)?;
    }
    std::io::Write::write_all(&mut std::io::stdout(), &out).map_err(Failure::other)
}

/// `bridge mesh-key`.
fn mesh_key(out: &std::path::Path, force: bool) -> Result<(), Failure> {
    meshbridge::seal::write_key_file(out, force).map_err(|e| match e {
        meshbridge::seal::KeyError::Exists(_) => Failure::config(e),
        other => Failure::other(other),
    })?;
    println!(
        "wrote {} (mode 0600): set [bridge] mesh_key_file to it on every process of the mesh",
        out.display()
    );
    Ok(())
}

/// `bridge add-broker`.
fn add_broker(args: AddBrokerArgs) -> Result<(), Failure> {
    let AddBrokerArgs {
        address,
        name,
        protocol,
        no_tls,
        server_name,
        topics,
        target,
    } = args;
    let rules = topics
        .iter()
        .map(|t| {
            meshbridge::rules::RuleSpec::from_mosquitto(t)
                .map_err(|e| Failure::config(format!("--topic {t:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = protocol
        .map(|p| p.parse::<Protocol>())
        .transpose()
        .map_err(|e| Failure::config(format!("--protocol: {e}")))?;
    let client = admin_client(&target)?;
    let request = AddBrokerRequest {
        address,
        name,
        protocol,
        tls: Some(!no_tls),
        server_name,
        rules,
    };
    let s = client.add(&request).map_err(Failure::other)?;
    let consumed = if s.subscribed {
        "consumed: what is published there from now on reaches the mesh".to_string()
    } else {
        format!(
            "not consumed yet ({}): `bridge status` shows SUBSCRIBED once it is",
            s.last_error
                .as_deref()
                .unwrap_or("no consumer has subscribed within 10 s")
        )
    };
    println!(
        "added {} ({}, {}{}); {consumed}",
        s.name,
        s.address,
        s.protocol,
        if s.tls { ", tls" } else { "" }
    );
    Ok(())
}

/// `bridge remove-broker`.
fn remove_broker(broker: &str, target: &AdminTarget) -> Result<(), Failure> {
    let name = admin_client(target)?
        .remove(broker)
        .map_err(Failure::other)?;
    println!("removed {name}");
    Ok(())
}

/// `bridge import-mosquitto`: reads the configuration with its `include_dir`s, writes the
/// bridge.toml and the password files, prints what could not be expressed, then checks the
/// result like `bridge check`.
fn import_mosquitto(
    file: &std::path::Path,
    out: &std::path::Path,
    id: &str,
    force: bool,
) -> Result<(), Failure> {
    let files = meshbridge::import::read(file).map_err(Failure::config)?;
    let imported = meshbridge::import::convert(&files, id).map_err(Failure::config)?;
    let written = meshbridge::import::write(&imported, out, force).map_err(|e| match e {
        meshbridge::import::WriteError::Exists(_) | meshbridge::import::WriteError::Symlink(_) => {
            Failure::config(e)
        }
        meshbridge::import::WriteError::Io { .. } => Failure::other(e),
    })?;
    for (path, private) in written {
        let mode = if private { " (mode 0600)" } else { "" };
        println!("wrote {}{mode}", path.display());
    }
    for note in &imported.notes {
        println!("note: {note}");
    }
    let config = Config::load(out).map_err(|e| {
        Failure::other(format!(
            "{} was written, but does not check: {e}",
            out.display()
        ))
    })?;
    println!(
        "{}: ok ({} brokers); review the notes, then `bridge run --config {}`",
        out.display(),
        config.brokers.len(),
        out.display()
    );
    Ok(())
}

/// `bridge status`: a table, or JSON for scripts.
fn status(json: bool, matrix: bool, watch: bool, target: &AdminTarget) -> Result<(), Failure> {
    let client = admin_client(target)?;
    loop {
        if watch {
            // Clear the screen and go home, so the table stays in place.
            print!("\x1b[2J\x1b[H");
        }
        if matrix {
            let m = client.matrix().map_err(Failure::other)?;
            print_json_or(json, &m, matrix_table)?;
        } else {
            let links = client.status().map_err(Failure::other)?;
            print_json_or(json, links.as_slice(), status_table)?;
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// `bridge reconcile`: compare (and repair) the brokers' retained messages.
fn reconcile(
    repair: bool,
    delete_extra: bool,
    json: bool,
    target: &AdminTarget,
) -> Result<(), Failure> {
    let request = meshbridge::reconcile::run::ReconcileRequest {
        repair,
        delete_extra,
    };
    let report = admin_client(target)?
        .reconcile(&request)
        .map_err(Failure::other)?;
    print_json_or(json, &report, reconcile_table)
}

/// `bridge instances`: the mesh's instances as the brokers show them to the bridge asked.
fn instances(json: bool, target: &AdminTarget) -> Result<(), Failure> {
    let rows = admin_client(target)?.instances().map_err(Failure::other)?;
    print_json_or(json, rows.as_slice(), instances_table)
}

/// `bridge dead-letters`.
fn dead_letters(json: bool, limit: usize, target: &AdminTarget) -> Result<(), Failure> {
    let rows = admin_client(target)?
        .dead_letters(limit)
        .map_err(Failure::other)?;
    print_json_or(json, rows.as_slice(), dead_letters_table)
}

/// Prints `value` as JSON for scripts, or as the table `table` makes of it.
fn print_json_or<T: serde::Serialize + ?Sized>(
    json: bool,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), Failure> {
    if json {
        let text = serde_json::to_string_pretty(value).map_err(Failure::other)?;
        println!("{text}");
    } else {
        print!("{}", table(value));
    }
    Ok(())
}

/// The admin client for `--admin` (token from MESHBRIDGE_ADMIN_TOKEN) or `--config` (address
/// and token file from the config), defaulting to the default `admin_listen`.
fn admin_client(target: &AdminTarget) -> Result<AdminClient, Failure> {
    if let Some(path) = &target.config {
        let config = Config::load(path).map_err(Failure::config)?;
        let mut addr = config.admin_listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        return Ok(AdminClient::new(
            &addr.to_string(),
            config.admin_token.map(|t| t.expose().to_string()),
        ));
    }
    let default = meshbridge::config::default_admin_listen().to_string();
    let given = target.admin.as_deref().unwrap_or(&default);
    // A host without a port dials the default admin port (not HTTP's 80).
    let (host, port) =
        meshbridge::config::parse_address(given, meshbridge::config::DEFAULT_ADMIN_PORT)
            .map_err(|e| Failure::config(format!("--admin: {e}")))?;
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(AdminClient::new(
        &addr,
        std::env::var("MESHBRIDGE_ADMIN_TOKEN").ok(),
    ))
}

fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// Installs the SIGTERM/SIGINT/SIGHUP handlers now (inside the runtime, before the admin port
/// opens, so that a signal sent as soon as the process answers is handled) and returns the
/// task that turns them into a shutdown or reloads.
fn signal_handler(
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::UnboundedSender<()>,
) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let installed = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        async move {
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = installed else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM received"); break; }
                    _ = int.recv() => { tracing::info!("SIGINT received"); break; }
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP received: reloading the configuration");
                        let _ = reload.send(());
                    }
                }
            }
            shutdown.cancel();
        }
    }
    #[cfg(not(unix))]
    async move {
        let _ = tokio::signal::ctrl_c().await;
        drop(reload);
        shutdown.cancel();
    }
}
