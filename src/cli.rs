//! The command line: `bridge run|check|demo|add-broker|remove-broker|status|instances|…`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Keeps several MQTT brokers in sync: every message published on one is delivered on all.
#[derive(Debug, Parser)]
#[command(name = "bridge", version, about)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=info,meshbridge=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Where the running bridge's admin API is.
#[derive(Debug, Args)]
pub struct AdminTarget {
    /// Admin API address of the running bridge (token: MESHBRIDGE_ADMIN_TOKEN).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "config")]
    pub admin: Option<String>,
    /// Read admin_listen (and the token file) from this config file.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bridge daemon (SIGTERM/SIGINT: drain and exit 0; SIGHUP: reload the brokers).
    Run {
        /// Config file.
        #[arg(long, short, default_value = "bridge.toml")]
        config: PathBuf,
        /// A damaged spool file is moved aside (`spool.redb.damaged-<time>`, logged; the
        /// messages it held are lost) and an empty spool is started, instead of refusing to start.
        #[arg(long)]
        spool_recover: bool,
    },
    /// Validate a config file and exit (0: ok).
    Check {
        /// Config file.
        #[arg(long, short, default_value = "bridge.toml")]
        config: PathBuf,
    },
    /// Embedded brokers + bridge + sample traffic, for a first look (Ctrl-C stops it).
    Demo {
        /// Stop after this many seconds (exit 1 if a sample message did not arrive everywhere).
        #[arg(long, value_name = "SECONDS")]
        duration: Option<u64>,
    },
    /// Write a development PKI: CA, broker server certificate, bridge client certificate.
    Certs {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// DNS name or IP the brokers are dialled by (repeatable; default localhost, 127.0.0.1).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Write a new mesh key (mode 0600) for `[bridge] mesh_key_file`: it authenticates the
    /// mesh's control records and makes its client ids unguessable. Give every process of the
    /// mesh the same file.
    MeshKey {
        /// Output file.
        #[arg(long, default_value = "mesh.key")]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print a shell completion script (bash: `bridge completions bash >
    /// /etc/bash_completion.d/bridge`; zsh: into a directory of $fpath as `_bridge`; fish:
    /// `~/.config/fish/completions/bridge.fish`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `bridge man > /usr/share/man/man1/bridge.1`).
    Man,
    /// Add a broker to a running bridge (persisted under its data_dir).
    AddBroker(AddBrokerArgs),
    /// Remove a broker (by name or address) from a running bridge.
    RemoveBroker {
        /// Broker name or host:port.
        broker: String,
        /// Where the bridge is.
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Convert a mosquitto bridge master's configuration into a bridge.toml (every option it
    /// cannot express is reported, one line each).
    ImportMosquitto {
        /// The mosquitto configuration file (its `include_dir`s are read too).
        file: PathBuf,
        /// Where to write the bridge.toml (password files go beside it, mode 0600).
        #[arg(long, default_value = "bridge.toml")]
        out: PathBuf,
        /// `[bridge] id` of the result.
        #[arg(long, default_value = "mesh")]
        id: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// List the instances of the mesh (every bridge process sharing its id), as the brokers
    /// show them to a running bridge: where each is live, what it owns.
    Instances {
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// Where the bridge is.
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List the messages set aside for a broker that could not take them as mapped (a topic
    /// over 65 535 bytes, a packet over its maximum size, one it closes the connection on),
    /// newest first: the links went on without them.
    DeadLetters {
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// How many, at most.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Where the bridge is.
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Compare the retained messages of every broker (a snapshot of each, under its rules)
    /// and print the differences per broker pair; --repair makes them agree (the value most
    /// brokers hold wins; a tie goes to the broker listed first).
    Reconcile {
        /// Write the winning value where a broker differs or misses it.
        #[arg(long)]
        repair: bool,
        /// With --repair: also clear topics most brokers do not hold.
        #[arg(long, requires = "repair")]
        delete_extra: bool,
        /// JSON for scripts instead of a report.
        #[arg(long)]
        json: bool,
        /// Where the bridge is.
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Show the state of every link of a running bridge.
    Status {
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// The replication lag matrix from the end-to-end probes (p50/p99 over the last
        /// minute, stalled pairs marked) instead of the links.
        #[arg(long)]
        matrix: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Where the bridge is.
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// `bridge add-broker`'s arguments.
#[derive(Debug, Args)]
pub struct AddBrokerArgs {
    /// Broker address, host:port.
    pub address: String,
    /// Broker name (default: from the address).
    #[arg(long)]
    pub name: Option<String>,
    /// Protocol version: v5 or v3.1.1.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Plain TCP instead of TLS.
    #[arg(long)]
    pub no_tls: bool,
    /// Name to verify in the broker's certificate.
    #[arg(long)]
    pub server_name: Option<String>,
    /// A topic rule in mosquitto's syntax, repeatable:
    /// 'PATTERN [in|out|both] [QOS] [MESH-PREFIX BROKER-PREFIX]' (mosquitto's local and remote
    /// prefix; defaults out and QoS 0, as mosquitto). None: [bridge] topics both ways.
    #[arg(long = "topic", value_name = "RULE")]
    pub topics: Vec<String>,
    /// Where the bridge is.
    #[command(flatten)]
    pub target: AdminTarget,
}
