//! The configuration file (TOML), its validation, and the built-in demo.
//!
//! Errors name the file, the line and the field at fault: syntax and type
//! errors come from the TOML parser with their position; semantic errors
//! (a bad route, a duplicate pool) carry the span of the value.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use dispatcher_ebpf::{
    abi::{MAX_POOLS, MAX_RINGS, MAX_ROUTE_ENTRIES},
    route::{route_keys, RouteError, MAX_ROUTE_PREFIX},
};
use serde::Deserialize;
use toml::Spanned;

/// Default fast-path body limit: bodies up to this many bytes are copied
/// by the kernel; larger ones go through the dispatcher.
pub const DEFAULT_MAX_FAST_BODY: u64 = 64 * 1024;
/// Default ring size per worker slot.
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;
/// Default queue limit per worker slot (bytes of queued records).
pub const DEFAULT_QUEUE_BYTES: u32 = 2 << 20;
/// Default instance name (pin directory `/sys/fs/bpf/<instance>`).
pub const DEFAULT_INSTANCE: &str = "dispatcher";
/// Run-time state directory (instance lock, pool names, control socket,
/// demo files), one directory per instance.
pub const RUN_DIR: &str = "/run/dispatcher";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default user workers run as when the dispatcher runs as root.
pub const DEFAULT_WORKER_USER: &str = "nobody";
/// Bytes queued on each running worker of a web garden before the next
/// one starts (a head record takes about 100-500).
pub const DEFAULT_SCALE_OUT_QUEUE_BYTES: u32 = 16 * 1024;
/// Default time a connection's oldest request may wait for its response.
pub const DEFAULT_RESPONSE_TIMEOUT_SECS: u64 = 60;
/// Default time a request head may take to arrive in full (408 after).
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 30;
/// Default time an idle keep-alive connection is kept open.
pub const DEFAULT_KEEPALIVE_TIMEOUT_SECS: u64 = 75;
/// Default longest wait for the next bytes of a request body (nginx's
/// `client_body_timeout`); 408 after.
pub const DEFAULT_BODY_TIMEOUT_SECS: u64 = 60;
/// Default slowest average a request body may arrive at once it has taken
/// `body_timeout_secs` (HTTP.sys's `MinSendRate` is 150 B/s); 408 below.
pub const DEFAULT_MIN_BODY_RATE: u64 = 150;
/// Default most requests one connection may have read and not yet
/// answered: past it, the dispatcher stops reading the connection (TCP
/// pushes back on the client) until it reads its answers.
pub const DEFAULT_MAX_PIPELINED: u64 = 128;
/// Default most response bytes one connection may have waiting to be
/// written before the dispatcher stops reading it.
pub const DEFAULT_MAX_PENDING_BYTES: u64 = 1 << 20;
/// Default time SIGTERM or Ctrl-C waits for in-flight requests before the
/// workers are killed and the dispatcher exits.
pub const DEFAULT_DRAIN_SECS: u64 = 5;
/// Default start mode of a pool's worker.
pub const DEFAULT_START_MODE: &str = "on-demand";
/// Default idle time-out of an on-demand worker (WAS: 20 minutes).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 1200;
/// Default rapid-fail protection: this many crashes (WAS: 5)...
pub const DEFAULT_RAPID_FAIL_MAX_CRASHES: u32 = 5;
/// ...within this many seconds (WAS: 5 minutes) stop the pool.
pub const DEFAULT_RAPID_FAIL_INTERVAL_SECS: u64 = 300;
/// Default health-check interval (WAS: 30 s)...
pub const DEFAULT_PING_INTERVAL_SECS: u64 = 30;
/// ...and how long a worker may leave a non-empty queue untouched (WAS: 90 s).
pub const DEFAULT_PING_RESPONSE_LIMIT_SECS: u64 = 90;
/// Default time a new worker has to start pulling requests (WAS: 90 s).
pub const DEFAULT_STARTUP_TIME_LIMIT_SECS: u64 = 90;
/// Default time a stopped worker has between SIGTERM and SIGKILL (WAS: 90 s).
pub const DEFAULT_SHUTDOWN_TIME_LIMIT_SECS: u64 = 90;
/// Default recycling interval (WAS: 1740 minutes).
pub const DEFAULT_RECYCLE_INTERVAL_SECS: u64 = 1740 * 60;
/// Most worker processes (slots) one pool may have (the verdict's
/// shortest-queue scan is bounded by it).
pub const MAX_GARDEN: u32 = 8;
/// Default largest request body the slow path accepts (413 above).
pub const DEFAULT_MAX_BODY: u64 = 64 << 20;

/// The built-in demo configuration (`dispatcher serve` without `--config`).
pub const DEMO: &str = include_str!("../../examples/demo.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    instance: Option<Spanned<String>>,
    #[serde(default)]
    fast_path: RawFastPath,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    pool: Vec<RawPool>,
    iface: Option<String>,
    #[serde(default)]
    guard: RawGuard,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    admin: RawAdmin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    metrics: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    access: Option<String>,
    access_max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    syn_rate_per_sec: Option<u32>,
    syn_burst: Option<u32>,
    max_connections_per_source: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFastPath {
    max_body: Option<u64>,
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_true")]
    direct_responses: bool,
    /// Off by default: it costs 5–9% on small files and 64 KiB answers
    /// and half of a 1 MiB `sendfile`'s throughput (docs/design.md).
    #[serde(default)]
    lease_gate: bool,
    #[serde(default = "default_true")]
    tunnel_splice: bool,
}

impl Default for RawFastPath {
    fn default() -> Self {
        RawFastPath { max_body: None, enabled: true, direct_responses: true, lease_gate: false, tunnel_splice: true }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body: Option<u64>,
    response_timeout_secs: Option<u64>,
    header_timeout_secs: Option<u64>,
    keepalive_timeout_secs: Option<u64>,
    body_timeout_secs: Option<u64>,
    min_body_rate: Option<u64>,
    drain_secs: Option<u64>,
    max_pipelined: Option<u64>,
    max_pending_bytes: Option<u64>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    routes: Vec<Spanned<String>>,
    command: Spanned<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    queue_bytes: Option<Spanned<u32>>,
    ring_bytes: Option<Spanned<u32>>,
    user: Option<String>,
    start_mode: Option<Spanned<String>>,
    idle_timeout_secs: Option<u64>,
    rapid_fail_max_crashes: Option<u32>,
    rapid_fail_interval_secs: Option<Spanned<u64>>,
    ping_interval_secs: Option<u64>,
    ping_response_limit_secs: Option<Spanned<u64>>,
    startup_time_limit_secs: Option<Spanned<u64>>,
    shutdown_time_limit_secs: Option<u64>,
    group: Option<String>,
    recycle_requests: Option<u64>,
    recycle_interval_secs: Option<u64>,
    recycle_private_memory_kib: Option<u64>,
    max_processes: Option<Spanned<u32>>,
    min_processes: Option<Spanned<u32>>,
    scale_out_queue_bytes: Option<u32>,
}

/// The XDP guard's lists and limits (see `dispatcher-ebpf`'s `guard.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guard {
    pub allow: Vec<ipnet::IpNet>,
    pub deny: Vec<ipnet::IpNet>,
    /// New connections per second and source; 0: no limit.
    pub syn_rate_per_sec: u32,
    pub syn_burst: u32,
    /// Open connections per source; 0: no limit.
    pub max_connections_per_source: u32,
}

/// Default burst of new connections a source may open above its rate.
pub const DEFAULT_SYN_BURST: u32 = 20;

/// Parses a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("`{s}` is not an IPv4 or IPv6 address or CIDR (like 10.0.0.0/8 or 2001:db8::/32)"))
}

/// Where `serve` reads its configuration, at start-up and on each reload:
/// a file or the built-in demo, with the command line's overrides.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub instance: Option<String>,
    pub iface: Option<String>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut cfg = match &self.path {
            Some(p) => Config::load(p)?,
            None => Config::parse(DEMO, "built-in demo configuration", PathBuf::from("."))?,
        };
        if let Some(l) = self.listen {
            cfg.listen = l;
        }
        if let Some(i) = &self.instance {
            cfg.instance = i.clone();
        }
        if let Some(i) = &self.iface {
            cfg.iface = Some(i.clone());
        }
        Ok(cfg)
    }
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}", p.display()),
            None => write!(f, "built-in demo configuration"),
        }
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub instance: String,
    /// Largest body the kernel copies itself.
    pub max_fast_body: u64,
    /// Whether the kernel fast path is used at all.
    pub fast_path: bool,
    /// Whether workers may write a connection's responses straight into
    /// its socket (a lease on the connection, see `worker::proto`).
    pub direct_responses: bool,
    /// Whether the kernel lets only the dispatcher and a connection's
    /// lease holder write into its socket (the sk_msg lease gate).
    pub lease_gate: bool,
    /// Whether the kernel joins a spliced tunnel's two sockets after a 101
    /// (sockmap redirects), rather than a worker copying between them.
    pub tunnel_splice: bool,
    /// Largest body the slow path accepts.
    pub max_body: u64,
    pub response_timeout_secs: u64,
    pub header_timeout_secs: u64,
    pub keepalive_timeout_secs: u64,
    /// Longest wait for the next bytes of a request body (408 after).
    pub body_timeout_secs: u64,
    /// Slowest average rate (bytes/s) a body may arrive at after
    /// `body_timeout_secs` (408 below; 0: no minimum).
    pub min_body_rate: u64,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_secs: u64,
    /// Most requests a connection may have read and not yet answered.
    pub max_pipelined: u64,
    /// Most response bytes a connection may have waiting.
    pub max_pending_bytes: u64,
    pub pools: Vec<Pool>,
    /// Interface the XDP guard is attached to (none: no guard).
    pub iface: Option<String>,
    pub guard: Guard,
    /// The access log's file (none: no access log), and the size past
    /// which it is rotated (renamed to `<file>.1`; 0: never).
    pub access_log: Option<PathBuf>,
    pub access_log_max_bytes: u64,
    /// Where `GET /metrics` is served (none: nowhere).
    pub metrics: Option<SocketAddr>,
    /// Directory relative worker arguments and commands resolve against.
    pub base_dir: PathBuf,
}

/// One application pool: its routes and how to start its worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub routes: Vec<Route>,
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub queue_bytes: u32,
    pub ring_bytes: u32,
    /// User the worker runs as (when the dispatcher is root).
    pub user: String,
    /// `on-demand` (`false`) or `always-running` (`true`).
    pub always_running: bool,
    /// On-demand workers exit after this long without a request; 0: never.
    pub idle_timeout_secs: u64,
    /// Crashes within `rapid_fail_interval_secs` that stop the pool; 0: off.
    pub rapid_fail_max_crashes: u32,
    pub rapid_fail_interval_secs: u64,
    /// Health checks every this many seconds; 0: off.
    pub ping_interval_secs: u64,
    pub ping_response_limit_secs: u64,
    pub startup_time_limit_secs: u64,
    pub shutdown_time_limit_secs: u64,
    /// Group the worker runs as (default: the user's primary group).
    pub group: Option<String>,
    /// Web garden: worker slots (each its own ring and process) and how
    /// many of them always run.
    pub max_processes: u32,
    pub min_processes: u32,
    /// A web garden's next worker starts only once each running one has
    /// this many bytes queued (0: every slot starts on its first request).
    pub scale_out_queue_bytes: u32,
    /// Recycling triggers; 0: off.
    pub recycle_requests: u64,
    pub recycle_interval_secs: u64,
    pub recycle_private_memory_kib: u64,
}

/// A URL prefix: `host/path-prefix`, host `*` for any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Lower-cased host without port or trailing dot; `None` for `*`.
    pub host: Option<String>,
    pub prefix: String,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.host.as_deref().unwrap_or("*"), self.prefix)
    }
}

/// A configuration error with its location.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {msg}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub msg: String,
}

struct Ctx<'a> {
    file: &'a str,
    src: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Option<Range<usize>>, msg: impl Into<String>) -> ConfigError {
        let line = span.map(|s| self.src[..char_floor(self.src, s.start)].matches('\n').count() + 1);
        ConfigError { file: self.file.to_string(), line, msg: msg.into() }
    }
}

/// `at`, or the start of the character it falls inside (a parser's byte
/// span may point into a multibyte character; slicing there panicked, as a
/// fuzz target found).
fn char_floor(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: None,
            msg: format!("cannot read: {e}"),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&src, &path.display().to_string(), base)
    }

    /// Validates configuration text; `file` names it in errors.
    pub fn parse(src: &str, file: &str, base_dir: PathBuf) -> Result<Config, ConfigError> {
        let cx = Ctx { file, src };
        let raw: RawConfig = toml::from_str(src).map_err(|e| {
            // The offending line, so the message names the field.
            let text = e.span().and_then(|sp| {
                let start = src[..char_floor(src, sp.start)].rfind('\n').map_or(0, |i| i + 1);
                src[start..].lines().next().map(str::trim).filter(|l| !l.is_empty())
            });
            let msg = match text {
                Some(t) => format!("{} (in `{t}`)", e.message()),
                None => e.message().to_string(),
            };
            cx.err(e.span(), msg)
        })?;
        let listen = match &raw.listen {
            Some(l) => l.get_ref().parse::<SocketAddr>().map_err(|e| {
                cx.err(Some(l.span()), format!("field `listen`: `{}` is not an address:port ({e})", l.get_ref()))
            })?,
            None => DEFAULT_LISTEN.parse().unwrap(),
        };
        if !listen.is_ipv4() {
            return Err(cx.err(
                raw.listen.as_ref().map(|l| l.span()),
                "field `listen`: only IPv4 addresses are supported so far",
            ));
        }
        let instance = match &raw.instance {
            Some(i) => {
                let v = i.get_ref();
                if v.is_empty()
                    || v.len() > 32
                    || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(cx.err(
                        Some(i.span()),
                        format!("field `instance`: `{v}` must be 1-32 characters of [A-Za-z0-9_-]"),
                    ));
                }
                v.clone()
            }
            None => DEFAULT_INSTANCE.to_string(),
        };
        if raw.pool.is_empty() {
            return Err(cx.err(None, "no `[[pool]]` defined: at least one pool is needed"));
        }
        if raw.pool.len() > MAX_POOLS as usize || raw.pool.len() > MAX_RINGS as usize {
            return Err(cx.err(None, format!("{} pools defined; at most {} are supported", raw.pool.len(), MAX_POOLS)));
        }
        let mut names = HashSet::new();
        let mut seen_routes: BTreeMap<(Option<String>, String), String> = BTreeMap::new();
        let mut pools = Vec::new();
        let mut slots_used = 0u32;
        for p in &raw.pool {
            let name = p.name.get_ref();
            if name.is_empty()
                || name.len() > 32
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(cx.err(
                    Some(p.name.span()),
                    format!("pool field `name`: `{name}` must be 1-32 characters of [A-Za-z0-9_-]"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(cx.err(Some(p.name.span()), format!("pool field `name`: pool `{name}` is defined twice")));
            }
            if p.routes.is_empty() {
                return Err(cx.err(Some(p.name.span()), format!("pool `{name}`: field `routes` is empty")));
            }
            let mut routes = Vec::new();
            for r in &p.routes {
                let route = parse_route(r.get_ref(), listen.port()).map_err(|m| {
                    cx.err(Some(r.span()), format!("pool `{name}`, field `routes`: `{}`: {m}", r.get_ref()))
                })?;
                let k = (route.host.clone(), route.prefix.clone());
                if let Some(other) = seen_routes.insert(k, name.clone()) {
                    return Err(cx.err(
                        Some(r.span()),
                        format!("pool `{name}`, field `routes`: `{}` is already routed to pool `{other}`", r.get_ref()),
                    ));
                }
                routes.push(route);
            }
            if p.command.get_ref().trim().is_empty() {
                return Err(cx.err(Some(p.command.span()), format!("pool `{name}`: field `command` is empty")));
            }
            let queue_bytes = p.queue_bytes.as_ref().map(|q| *q.get_ref()).unwrap_or(DEFAULT_QUEUE_BYTES);
            // Only steers the slot choice; the queue limit applies to the
            // real depth. Past the limit it would keep spare slots idle.
            let scale_out_queue_bytes =
                p.scale_out_queue_bytes.unwrap_or(DEFAULT_SCALE_OUT_QUEUE_BYTES).min(queue_bytes / 2);
            let ring_bytes = match &p.ring_bytes {
                Some(r) => {
                    let v = *r.get_ref();
                    if !v.is_power_of_two() || v < 4096 {
                        return Err(cx.err(
                            Some(r.span()),
                            format!("pool `{name}`, field `ring_bytes`: {v} must be a power of two of at least 4096"),
                        ));
                    }
                    v
                }
                None => DEFAULT_RING_BYTES,
            };
            if queue_bytes > ring_bytes {
                let span = p.queue_bytes.as_ref().map(|q| q.span());
                return Err(cx.err(
                    span,
                    format!("pool `{name}`, field `queue_bytes`: {queue_bytes} exceeds the ring size {ring_bytes}"),
                ));
            }
            let always_running = match p.start_mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                None => DEFAULT_START_MODE == "always-running",
                Some(("on-demand", _)) => false,
                Some(("always-running", _)) => true,
                Some((other, span)) => {
                    return Err(cx.err(
                        Some(span),
                        format!("pool `{name}`, field `start_mode`: `{other}` is not `on-demand` or `always-running`"),
                    ))
                }
            };
            let rapid_fail_interval_secs =
                p.rapid_fail_interval_secs.as_ref().map(|v| *v.get_ref()).unwrap_or(DEFAULT_RAPID_FAIL_INTERVAL_SECS);
            if rapid_fail_interval_secs == 0 {
                let span = p.rapid_fail_interval_secs.as_ref().map(|v| v.span());
                return Err(
                    cx.err(span, format!("pool `{name}`, field `rapid_fail_interval_secs`: must be at least 1"))
                );
            }
            let at_least_1 = |v: &Option<Spanned<u64>>, default: u64, field: &str| -> Result<u64, ConfigError> {
                match v {
                    Some(s) if *s.get_ref() == 0 => {
                        Err(cx.err(Some(s.span()), format!("pool `{name}`, field `{field}`: must be at least 1")))
                    }
                    Some(s) => Ok(*s.get_ref()),
                    None => Ok(default),
                }
            };
            let max_processes = p.max_processes.as_ref().map_or(1, |v| *v.get_ref());
            if !(1..=MAX_GARDEN).contains(&max_processes) {
                let span = p.max_processes.as_ref().map(|v| v.span());
                return Err(cx.err(
                    span,
                    format!("pool `{name}`, field `max_processes`: {max_processes} is not in 1..={MAX_GARDEN}"),
                ));
            }
            let min_processes = p.min_processes.as_ref().map_or(0, |v| *v.get_ref());
            if min_processes > max_processes {
                let span = p.min_processes.as_ref().map(|v| v.span());
                return Err(cx.err(
                    span,
                    format!(
                        "pool `{name}`, field `min_processes`: {min_processes} exceeds max_processes {max_processes}"
                    ),
                ));
            }
            slots_used += max_processes;
            if slots_used > MAX_RINGS {
                return Err(cx.err(
                    p.max_processes.as_ref().map(|v| v.span()),
                    format!("pool `{name}`: the pools need {slots_used} worker slots; at most {MAX_RINGS} fit"),
                ));
            }
            let ping_response_limit_secs =
                at_least_1(&p.ping_response_limit_secs, DEFAULT_PING_RESPONSE_LIMIT_SECS, "ping_response_limit_secs")?;
            let startup_time_limit_secs =
                at_least_1(&p.startup_time_limit_secs, DEFAULT_STARTUP_TIME_LIMIT_SECS, "startup_time_limit_secs")?;
            pools.push(Pool {
                name: name.clone(),
                routes,
                command: p.command.get_ref().clone(),
                args: p.args.clone(),
                env: p.env.clone(),
                queue_bytes,
                ring_bytes,
                user: p.user.clone().unwrap_or_else(|| DEFAULT_WORKER_USER.to_string()),
                always_running,
                idle_timeout_secs: p.idle_timeout_secs.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS),
                rapid_fail_max_crashes: p.rapid_fail_max_crashes.unwrap_or(DEFAULT_RAPID_FAIL_MAX_CRASHES),
                rapid_fail_interval_secs,
                ping_interval_secs: p.ping_interval_secs.unwrap_or(DEFAULT_PING_INTERVAL_SECS),
                ping_response_limit_secs,
                startup_time_limit_secs,
                shutdown_time_limit_secs: p.shutdown_time_limit_secs.unwrap_or(DEFAULT_SHUTDOWN_TIME_LIMIT_SECS),
                group: p.group.clone(),
                max_processes,
                min_processes,
                scale_out_queue_bytes,
                recycle_requests: p.recycle_requests.unwrap_or(0),
                recycle_interval_secs: p.recycle_interval_secs.unwrap_or(DEFAULT_RECYCLE_INTERVAL_SECS),
                recycle_private_memory_kib: p.recycle_private_memory_kib.unwrap_or(0),
            });
        }
        let entries: usize =
            pools.iter().flat_map(|p| &p.routes).map(|r| if r.prefix.ends_with('/') { 1 } else { 2 }).sum();
        if entries > MAX_ROUTE_ENTRIES as usize {
            return Err(cx.err(None, format!("the routes need {entries} route-table entries; at most {MAX_ROUTE_ENTRIES} fit (a prefix without a trailing `/` takes two)")));
        }
        let cidrs = |list: &[Spanned<String>], field: &str| {
            list.iter()
                .map(|c| {
                    parse_cidr(c.get_ref()).map_err(|e| cx.err(Some(c.span()), format!("field `guard.{field}`: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        const MAX_SYN_RATE: u32 = 1_000_000;
        if raw.guard.syn_rate_per_sec.unwrap_or(0) > MAX_SYN_RATE || raw.guard.syn_burst.unwrap_or(0) > MAX_SYN_RATE {
            return Err(cx.err(
                None,
                format!("fields `guard.syn_rate_per_sec` and `guard.syn_burst` must be at most {MAX_SYN_RATE}"),
            ));
        }
        let guard = Guard {
            allow: cidrs(&raw.guard.allow, "allow")?,
            deny: cidrs(&raw.guard.deny, "deny")?,
            syn_rate_per_sec: raw.guard.syn_rate_per_sec.unwrap_or(0),
            syn_burst: raw.guard.syn_burst.unwrap_or(DEFAULT_SYN_BURST).max(1),
            max_connections_per_source: raw.guard.max_connections_per_source.unwrap_or(0),
        };
        Ok(Config {
            listen,
            instance,
            max_fast_body: raw.fast_path.max_body.unwrap_or(DEFAULT_MAX_FAST_BODY),
            fast_path: raw.fast_path.enabled,
            direct_responses: raw.fast_path.direct_responses,
            lease_gate: raw.fast_path.lease_gate,
            tunnel_splice: raw.fast_path.tunnel_splice,
            max_body: raw.limits.max_body.unwrap_or(DEFAULT_MAX_BODY),
            response_timeout_secs: raw.limits.response_timeout_secs.unwrap_or(DEFAULT_RESPONSE_TIMEOUT_SECS).max(1),
            header_timeout_secs: raw.limits.header_timeout_secs.unwrap_or(DEFAULT_HEADER_TIMEOUT_SECS).max(1),
            keepalive_timeout_secs: raw.limits.keepalive_timeout_secs.unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT_SECS).max(1),
            body_timeout_secs: raw.limits.body_timeout_secs.unwrap_or(DEFAULT_BODY_TIMEOUT_SECS).max(1),
            min_body_rate: raw.limits.min_body_rate.unwrap_or(DEFAULT_MIN_BODY_RATE),
            drain_secs: raw.limits.drain_secs.unwrap_or(DEFAULT_DRAIN_SECS),
            max_pipelined: raw.limits.max_pipelined.unwrap_or(DEFAULT_MAX_PIPELINED).max(1),
            max_pending_bytes: raw.limits.max_pending_bytes.unwrap_or(DEFAULT_MAX_PENDING_BYTES).max(1),
            pools,
            iface: raw.iface.filter(|i| !i.is_empty()),
            guard,
            metrics: match &raw.admin.metrics {
                Some(m) => Some(m.get_ref().parse::<SocketAddr>().map_err(|e| {
                    cx.err(
                        Some(m.span()),
                        format!("field `admin.metrics`: `{}` is not an address:port ({e})", m.get_ref()),
                    )
                })?),
                None => None,
            },
            access_log_max_bytes: raw.log.access_max_bytes.unwrap_or(0),
            access_log: raw.log.access.filter(|a| !a.is_empty()).map(|a| base_dir.join(a)),
            base_dir,
        })
    }
}

/// Parses `host[:port]/prefix`.
pub fn parse_route(s: &str, listen_port: u16) -> Result<Route, String> {
    let slash = s.find('/').ok_or("a route is `host/path-prefix` (host `*` for any); there is no `/`")?;
    let (host, prefix) = s.split_at(slash);
    if host.is_empty() {
        return Err("the host is empty; use `*` for any host".into());
    }
    let host = if host == "*" {
        None
    } else {
        let name = dispatcher_ebpf::scan::strip_port(host.as_bytes());
        let port = &host[name.len()..];
        if !port.is_empty() {
            let p: u16 = port[1..].parse().map_err(|_| format!("`{port}` is not a port"))?;
            if p != listen_port {
                return Err(format!("names port {p} but the dispatcher listens on port {listen_port}"));
            }
        }
        let mut name = std::str::from_utf8(name).unwrap().to_ascii_lowercase();
        if name.ends_with('.') {
            name.pop();
        }
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~[]:".contains(&b)) {
            return Err(format!("`{name}` is not a host name"));
        }
        Some(name)
    };
    route_keys(1, prefix.as_bytes()).map_err(|e| match e {
        RouteError::NotAbsolute => "the path prefix must start with `/`".to_string(),
        RouteError::TooLong => format!("the path prefix is longer than {MAX_ROUTE_PREFIX} bytes"),
        RouteError::BadByte => {
            "the path prefix may not contain `?`, `#`, `%`, `\\`, spaces, control bytes, `//` or dot segments"
                .to_string()
        }
    })?;
    Ok(Route { host, prefix: prefix.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid() {
        let c = Config::parse(DEMO, "demo", PathBuf::from(".")).unwrap();
        assert_eq!(c.pools.len(), 2);
        assert!(c.fast_path, "the fast path is on by default");
        assert_eq!(c.max_fast_body, DEFAULT_MAX_FAST_BODY);
    }

    #[test]
    fn bad_route_names_file_line_and_field() {
        let src = "listen = \"127.0.0.1:9000\"\n\n[[pool]]\nname = \"a\"\ncommand = \"x\"\nroutes = [\"*/ok/\",\n  \"*noslash\"]\n";
        let e = Config::parse(src, "my.toml", PathBuf::from(".")).unwrap_err();
        assert_eq!(e.line, Some(7), "{e}");
        let s = e.to_string();
        assert!(s.starts_with("my.toml:7:"), "{s}");
        assert!(s.contains("field `routes`"), "{s}");
    }

    #[test]
    fn unknown_field_is_reported_with_line() {
        let src = "[[pool]]\nname = \"a\"\ncommand = \"x\"\nroutes = [\"*/\"]\nqueue_lenght = 5\n";
        let e = Config::parse(src, "f.toml", PathBuf::from(".")).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.to_string().contains("queue_lenght"), "{e}");
    }

    #[test]
    fn duplicate_route_and_port_mismatch() {
        let src = "[[pool]]\nname = \"a\"\ncommand = \"x\"\nroutes = [\"*/\"]\n[[pool]]\nname = \"b\"\ncommand = \"x\"\nroutes = [\"*/\"]\n";
        let e = Config::parse(src, "f.toml", PathBuf::from(".")).unwrap_err();
        assert!(e.to_string().contains("already routed to pool `a`"), "{e}");
        assert_eq!(
            parse_route("example.com:81/x", 80).unwrap_err(),
            "names port 81 but the dispatcher listens on port 80"
        );
        assert_eq!(parse_route("Example.COM.:80/x", 80).unwrap().host.as_deref(), Some("example.com"));
    }
}
