//! The command line (DESIGN §2). Only commands that exist are defined here:
//! what is not built is not in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ehc-agent",
    version,
    about = "WeChat electronic health card agent: scanners in, verified identities to HIS, every use reported to the open platform"
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: scanners, the HIS socket, the outbox and its uploads.
    Run(ConfigArg),
    /// The whole loop with no configuration: the platform simulator, a scanner on standard input, the HIS output printed.
    Demo {
        /// Read scans from this file (one per line; `@static 0`, `@dynamic 1`, `@expired 2`, `@unknown`, `@other` expand to sample codes) and exit when all are reported.
        #[arg(long)]
        script: Option<PathBuf>,
    },
    /// Validate the configuration: print every problem (exit 2) or a summary (exit 0).
    Check(ConfigArg),
    /// Show how a request envelope is signed: the raw string (secret redacted) and the sign.
    ///
    /// The tool for result code 21006: compare its raw string with your own.
    Sign(SignArgs),
    /// Run the platform simulator (for HIS vendors, tests and outage rehearsals).
    Sim(SimArgs),
    /// The hospital gateway: one platform account and token for every terminal (docs/gateway.md).
    Gateway(GatewayArgs),
    /// Inspect and operate the outbox (every use until the platform has it).
    Outbox(OutboxArgs),
    /// Ask the running agent how it is: exit 0 all well, 1 something needs attention, 3 not running.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: ControlArg,
    },
    /// Inject TEXT into the running agent as if scanned (for HIS integration tests); prints what HIS received.
    Scan {
        text: String,
        #[command(flatten)]
        at: ControlArg,
    },
    /// Let a browser HIS page on ORIGIN reach the agent on loopback: write the Local Network Access policies for Chromium, Chrome and Edge.
    BrowserPolicy {
        /// The HIS page's origin, e.g. http://his.hospital.lan:8080 (repeat for more).
        #[arg(long = "origin", required = true)]
        origins: Vec<String>,
        /// Only say whether the policies are in place (exit 0) or not (exit 1).
        #[arg(long)]
        check: bool,
        /// Only these browsers: chromium, chrome, edge (repeat; default all three).
        #[arg(long = "browser", value_parser = ["chromium", "chrome", "edge"])]
        browsers: Vec<String>,
        /// Prefix for the /etc paths (for a system image being prepared).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// List attached candidate scanners and print a ready [[scanner]] block for each.
    Scanners {
        #[arg(long)]
        json: bool,
        /// Show every USB device, not only likely scanners.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
pub struct OutboxArgs {
    /// Configuration file (for the outbox path, and the platform for `flush`).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// The outbox file itself, when the configuration cannot be read.
    #[arg(long, global = true)]
    pub outbox: Option<PathBuf>,
    /// The running agent's control socket (used when it answers).
    #[arg(long, global = true)]
    pub control: Option<PathBuf>,
    #[command(subcommand)]
    pub action: OutboxAction,
}

#[derive(Debug, Subcommand)]
pub enum OutboxAction {
    /// Counts by state, the oldest pending use's age, and the held rows with their result codes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Re-queue a held row (by id) or every held row, once the cause is fixed.
    Retry {
        /// Row id from `outbox list`.
        id: Option<i64>,
        #[arg(long, conflicts_with = "id")]
        held: bool,
    },
    /// Upload everything now, with a progress bar; fails with the reason if uploads are stopped.
    Flush,
    /// Delete sent rows; held rows too with --held --yes.
    Purge {
        #[arg(long)]
        held: bool,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file (default: $EHC_AGENT_CONFIG, /etc/ehc-agent/agent.toml, then the user config dir).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// How to reach the running agent.
#[derive(Debug, Args, Clone)]
pub struct ControlArg {
    /// The agent's control socket (default: beside the HIS socket of the configuration, else /run/ehc-agent/control.sock).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Configuration file, to find the control socket.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// File holding the app secret (default: the one named in the configuration).
    #[arg(long)]
    pub app_secret_file: Option<PathBuf>,
    /// Configuration file, used only to find the app secret.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Request envelope {"commonIn":..,"req":..}; standard input if absent.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8900")]
    pub listen: SocketAddr,
    /// Simulator configuration (TOML; see docs/simulator.md). Without it: the built-in demo identity and cards.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Serve HTTPS, as the platform does, with the certificate in DIR
    /// (server.pem, server.key); made there with a CA (ca.pem: the agent's
    /// `platform.ca_file`) when absent.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["cert", "key"])]
    pub tls: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM); needs --key.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    #[command(subcommand)]
    pub action: Option<SimAction>,
}

#[derive(Debug, Subcommand)]
pub enum SimAction {
    /// Ask a running simulator for a fresh dynamic code and print it.
    Mint {
        /// The running simulator's address.
        #[arg(long, default_value = "127.0.0.1:8900")]
        at: SocketAddr,
        /// Which card (index in the simulator's card list).
        #[arg(long, default_value_t = 0)]
        card: usize,
        /// Lifetime in seconds (default: the simulator's).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Print the simulator's cards and their static codes.
    Cards {
        #[arg(long, default_value = "127.0.0.1:8900")]
        at: SocketAddr,
    },
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Gateway configuration (default: /etc/ehc-agent/gateway.toml).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub action: GatewayAction,
}

#[derive(Debug, Subcommand)]
pub enum GatewayAction {
    /// Serve terminals until SIGTERM.
    Run,
    /// Enrol, list and revoke terminals.
    Terminal {
        #[command(subcommand)]
        action: TerminalAction,
    },
    /// The upstream token, today's calls per interface, the terminals.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Every terminal from its heartbeats, needing attention first: exit 0 all well, 1 something needs attention.
    Fleet {
        #[arg(long)]
        json: bool,
    },
    /// Make a hospital CA and the gateway's TLS certificate.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum TlsAction {
    /// Write ca.pem, ca.key, server.pem, server.key into DIR; print the CA for the terminals' ca_file.
    Init {
        /// Where to write them (default: /etc/ehc-agent/gateway-tls).
        #[arg(long, default_value = "/etc/ehc-agent/gateway-tls")]
        dir: PathBuf,
        /// The gateway's DNS names and IP addresses as terminals reach it (repeat).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TerminalAction {
    /// Enrol a terminal and print the lines for its agent.toml.
    Add {
        /// A name for the window or kiosk (letters, digits, - _ .).
        name: String,
        /// Write the terminal's secret to this file (mode 0600) instead of printing it.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Accept this terminal only from these networks (CIDR, repeat); default: any.
        #[arg(long = "allow")]
        allow: Vec<String>,
    },
    /// List enrolled terminals.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a terminal: its token stops working now, its appId gets 21002.
    Revoke { name: String },
}
