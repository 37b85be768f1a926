//! `bridge`: parse the command line, set up logging, dispatch. Exit codes: 0 ok, 64 bad
//! configuration or usage, 65 damaged spool file (see `run --spool-recover`), 1 other failures
//! (admin API unreachable or refusing, runtime errors).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use meshbridge::admin::AddBrokerRequest;
use meshbridge::admin::client::{AdminClient, status_table};
use meshbridge::cli::{AdminTarget, Cli, Command, LogFormat};
use meshbridge::config::Config;
use meshbridge::message::Protocol;
use tokio_util::sync::CancellationToken;

/// Exit code for bad configuration or usage (EX_USAGE, as linkerd2-proxy does).
const EXIT_CONFIG: u8 = 64;

/// Exit code for a damaged spool file (EX_DATAERR): restarting does not help, an operator must
/// move it aside or run with `--spool-recover`.
const EXIT_DATA: u8 = 65;

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
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
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                for w in c.all_warnings() {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok ({} brokers)", config.display(), c.brokers.len());
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_CONFIG, e),
        },
        Command::Run {
            config: path,
            spool_recover,
        } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => return fail(EXIT_CONFIG, e),
            };
            // The control plane (admin API, signals, supervisor) on this thread; the links on
            // their own threads (`bridge.worker_threads`, see meshbridge::link::threads).
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
            };
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
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ meshbridge::RunError::AdminBind { .. }) => fail(EXIT_CONFIG, e),
                Err(
                    e @ meshbridge::RunError::Spool(meshbridge::spool::SpoolError::Damaged {
                        ..
                    }),
                ) => fail(EXIT_DATA, e),
                Err(e) => fail(1, e),
            }
        }
        Command::Demo { duration } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
            };
            match runtime.block_on(meshbridge::demo::run(
                duration.map(std::time::Duration::from_secs),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, e),
            }
        }
        Command::Certs { out, names, force } => {
            let names = if names.is_empty() {
                vec!["localhost".to_string(), "127.0.0.1".to_string()]
            } else {
                names
            };
            match meshbridge::certs::generate(&out, &names, force) {
                Ok(files) => {
                    for f in files {
                        println!("wrote {}", f.display());
                    }
                    println!("server certificate names: {}", names.join(", "));
                    ExitCode::SUCCESS
                }
                Err(e @ meshbridge::certs::CertsError::Write { .. }) => fail(1, e),
                Err(e) => fail(EXIT_CONFIG, e),
            }
        }
        Command::AddBroker {
            address,
            name,
            protocol,
            no_tls,
            server_name,
            target,
        } => {
            let protocol = match protocol.map(|p| p.parse::<Protocol>()).transpose() {
                Ok(p) => p,
                Err(e) => return fail(EXIT_CONFIG, format!("--protocol: {e}")),
            };
            let client = match admin_client(&target) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let request = AddBrokerRequest {
                address,
                name,
                protocol,
                tls: Some(!no_tls),
                server_name,
            };
            match client.add(&request) {
                Ok(s) => {
                    println!(
                        "added {} ({}, {}{})",
                        s.name,
                        s.address,
                        s.protocol,
                        if s.tls { ", tls" } else { "" }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, e),
            }
        }
        Command::RemoveBroker { broker, target } => {
            let client = match admin_client(&target) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.remove(&broker) {
                Ok(name) => {
                    println!("removed {name}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, e),
            }
        }
        Command::Status { json, target } => {
            let client = match admin_client(&target) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.status() {
                Ok(links) if json => match serde_json::to_string_pretty(&links) {
                    Ok(text) => {
                        println!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(1, e),
                },
                Ok(links) => {
                    print!("{}", status_table(&links));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, e),
            }
        }
    }
}

/// The admin client for `--admin` (token from MESHBRIDGE_ADMIN_TOKEN) or `--config` (address
/// and token file from the config), defaulting to 127.0.0.1:9183.
fn admin_client(target: &AdminTarget) -> Result<AdminClient, ExitCode> {
    if let Some(path) = &target.config {
        let config = Config::load(path).map_err(|e| fail(EXIT_CONFIG, e))?;
        let mut addr = config.admin_listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        return Ok(AdminClient::new(
            &addr.to_string(),
            config.admin_token.map(|t| t.expose().to_string()),
        ));
    }
    let addr = target
        .admin
        .clone()
        .unwrap_or_else(|| "127.0.0.1:9183".into());
    if let Err(e) = meshbridge::config::parse_address(&addr, 9183) {
        return Err(fail(EXIT_CONFIG, format!("--admin: {e}")));
    }
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
