//! The command line: `bridge run|check|demo|add-broker|remove-broker|status`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Keeps several MQTT brokers in sync: every message published on one is delivered on all.
#[derive(Debug, Parser)]
#[command(name = "bridge", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bridge daemon (SIGTERM/SIGINT: drain and exit 0).
    Run {
        /// Config file.
        #[arg(long, short, default_value = "bridge.toml")]
        config: PathBuf,
    },
    /// Validate a config file and exit (0: ok).
    Check {
        /// Config file.
        #[arg(long, short, default_value = "bridge.toml")]
        config: PathBuf,
    },
    /// Embedded brokers + bridge + sample traffic, for a first look.
    Demo,
    /// Add a broker to a running bridge.
    AddBroker {
        /// Broker address, host:port.
        address: String,
        /// Broker name (default: from the address).
        #[arg(long)]
        name: Option<String>,
        /// Protocol version, v5 or v3.1.1.
        #[arg(long)]
        protocol: Option<String>,
        /// Plain TCP instead of TLS.
        #[arg(long)]
        no_tls: bool,
        /// Admin API address of the running bridge.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Remove a broker from a running bridge.
    RemoveBroker {
        /// Broker name or address.
        broker: String,
        /// Admin API address of the running bridge.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Show the state of every link of a running bridge.
    Status {
        /// Admin API address of the running bridge.
        #[arg(long)]
        admin: Option<String>,
    },
}
