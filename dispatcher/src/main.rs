//! `dispatcher`: the daemon and its operator commands. This file is the
//! CLI only; the parts, bottom to top (imports point down this list):
//!
//! - `config`: the TOML; `http`: user-space HTTP framing and the
//!   dispatcher's own answers; `bpf`: the kernel objects (programs, pins,
//!   and each group of maps owned by the part that uses it);
//!   `access_log`; `tcp`: what the kernel tells of a TCP socket.
//! - `deliver`: where a worker's frames and lease messages meet the
//!   connection tasks.
//! - `pool`: the running pools, their worker slots as activation drives
//!   them, the workers' control channels, reloads.
//! - `splice`: spliced tunnels (the kernel joins a client's socket with
//!   its app's after a 101; a task watches them).
//! - `conn`: one client connection (ordered write-back, leases, slow path,
//!   time-outs, parking).
//! - `admin`: control socket, inspection, metrics, the CLI's client side.
//! - `daemon`: `dispatcher serve`, which wires them together and accepts.

mod access_log;
mod admin;
mod bpf;
mod config;
mod conn;
mod daemon;
mod deliver;
#[cfg(test)]
mod fuzz;
mod http;
mod pool;
mod splice;
mod tcp;

use std::path::PathBuf;

use admin::cli;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// An eBPF-accelerated HTTP request dispatcher: the kernel frames and routes
/// requests into per-pool queues, unprivileged workers pull them.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the BPF programs, start the pools' workers and serve HTTP until
    /// Ctrl-C or SIGTERM. Needs root.
    Serve {
        /// Configuration file (TOML; see examples/dispatcher.toml). Without
        /// it, the built-in demo configuration is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override the configuration's listen address (e.g. 127.0.0.1:9000).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Override the configuration's instance name.
        #[arg(long)]
        instance: Option<String>,
        /// Attach the XDP guard (allow/deny lists, per-source connection
        /// rate; see `[guard]` in examples/dispatcher.toml) to this
        /// interface, the one clients reach the service through.
        #[arg(long)]
        iface: Option<String>,
    },
    /// Check a configuration file and print what it routes where.
    Check {
        /// Configuration file to check.
        config: PathBuf,
    },
    /// Print the counters of a running instance as JSON: per pool, requests
    /// the kernel queued and those the slow path parsed; hand-offs by reason.
    Stats {
        /// Instance name.
        #[arg(long, default_value = config::DEFAULT_INSTANCE)]
        instance: String,
    },
    /// Make a running instance read its configuration file again (as
    /// SIGHUP does) and apply it without dropping a connection: pools added,
    /// removed or changed (a changed pool's workers are replaced; the old
    /// ones finish what they have), routes rewritten. Prints what changed,
    /// or why nothing did.
    Reload {
        /// Instance name.
        #[arg(long, default_value = config::DEFAULT_INSTANCE)]
        instance: String,
    },
    /// A running instance: listener, programs and where they are
    /// attached, uptime.
    Status(View),
    /// Its pools: state, workers (pid, uptime), queue depth per slot,
    /// requests, workers started and crashes.
    Pools(View),
    /// Its effective route table, in match order.
    Routes(View),
    /// Its live queue depths per pool slot.
    Queues {
        #[command(flatten)]
        view: View,
        /// Refresh every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Start a stopped pool (by `stop` or rapid-fail protection).
    Start(Named),
    /// Stop a pool's workers; its requests get 503 until `start`.
    Stop(Named),
    /// Recycle a pool's workers: each stops taking requests, the next
    /// starts at once, the old one finishes what it took.
    Recycle(Named),
    /// Show or change the XDP guard of a running instance: its allow and
    /// deny lists take effect for the next packet, no restart.
    Guard {
        #[command(subcommand)]
        action: GuardAction,
        /// Instance name.
        #[arg(long, default_value = config::DEFAULT_INSTANCE, global = true)]
        instance: String,
    },
    /// Act on a pool of a running instance (through its control socket).
    Pool {
        #[command(subcommand)]
        action: PoolAction,
        /// Instance name.
        #[arg(long, default_value = config::DEFAULT_INSTANCE, global = true)]
        instance: String,
    },
}

/// Options of the inspection commands.
#[derive(clap::Args)]
struct View {
    /// Instance name.
    #[arg(long, default_value = config::DEFAULT_INSTANCE)]
    instance: String,
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    json: bool,
}

/// A pool of a running instance.
#[derive(clap::Args)]
struct Named {
    /// The pool's name.
    name: String,
    /// Instance name.
    #[arg(long, default_value = config::DEFAULT_INSTANCE)]
    instance: String,
}

#[derive(Subcommand)]
enum GuardAction {
    /// Print the interface, mode, lists and packet counters (JSON).
    Show,
    /// Change the allow list (when not empty, only its sources get in).
    Allow {
        #[command(subcommand)]
        change: ListChange,
    },
    /// Change the deny list (its sources never get in; wins over allow).
    Deny {
        #[command(subcommand)]
        change: ListChange,
    },
}

#[derive(Subcommand)]
enum ListChange {
    /// Add an address or CIDR (10.0.0.0/8, 2001:db8::/32).
    Add { cidr: String },
    /// Remove an address or CIDR.
    Del { cidr: String },
}

#[derive(Subcommand)]
enum PoolAction {
    /// Start a pool that rapid-fail protection stopped (its requests get
    /// 503 until then).
    Start {
        /// The pool's name.
        name: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        // A command's output piped into `head` ends it quietly, as it does
        // any Unix tool (Rust ignores SIGPIPE, and `println!` then panics
        // on the closed pipe). The daemon keeps ignoring it: a client that
        // goes away must not kill it.
        // SAFETY: setting a signal's disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match cli.cmd {
        Cmd::Serve { config, listen, instance, iface } => {
            let source = config::ConfigSource { path: config, listen, instance, iface };
            // A bad file is reported before anything starts.
            source.load()?;
            // One descriptor per client connection.
            worker::raise_fd_limit();
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(daemon::serve(source))?;
            rt.shutdown_timeout(std::time::Duration::from_millis(200));
            Ok(())
        }
        Cmd::Check { config } => {
            let cfg = config::Config::load(&config)?;
            println!("{}: ok; listens on {}, instance `{}`", config.display(), cfg.listen, cfg.instance);
            for p in &cfg.pools {
                let routes: Vec<String> = p.routes.iter().map(|r| r.to_string()).collect();
                println!("  pool {:<16} {} <- {}", p.name, p.command, routes.join(", "));
            }
            Ok(())
        }
        Cmd::Guard { action, instance } => {
            let cmd = match action {
                GuardAction::Show => "guard show".to_string(),
                GuardAction::Allow { change } => format!("guard allow {}", list_change(change)?),
                GuardAction::Deny { change } => format!("guard deny {}", list_change(change)?),
            };
            cli::send_json(&instance, &cmd)
        }
        Cmd::Status(v) => cli::show(&v.instance, "status", v.json),
        Cmd::Pools(v) => cli::show(&v.instance, "pools", v.json),
        Cmd::Routes(v) => cli::show(&v.instance, "routes", v.json),
        Cmd::Queues { view, watch } => loop {
            if watch && !view.json {
                // Clear the screen, home the cursor.
                print!("\x1b[2J\x1b[H");
            }
            cli::show(&view.instance, "queues", view.json)?;
            if !watch {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        },
        Cmd::Start(n) => cli::send(&n.instance, &format!("start {}", n.name)),
        Cmd::Stop(n) => cli::send(&n.instance, &format!("stop {}", n.name)),
        Cmd::Recycle(n) => cli::send(&n.instance, &format!("recycle {}", n.name)),
        Cmd::Reload { instance } => cli::send(&instance, "reload"),
        Cmd::Pool { action: PoolAction::Start { name }, instance } => {
            cli::send(&instance, &format!("pool-start {name}"))
        }
        Cmd::Stats { instance } => cli::stats(&instance),
    }
}

/// `add CIDR` / `del CIDR`, the CIDR checked here for a clear error.
fn list_change(c: ListChange) -> Result<String> {
    let (verb, cidr) = match c {
        ListChange::Add { cidr } => ("add", cidr),
        ListChange::Del { cidr } => ("del", cidr),
    };
    let net = config::parse_cidr(&cidr).map_err(anyhow::Error::msg)?;
    Ok(format!("{verb} {net}"))
}
