//! `cargo xtask bench`: the dispatcher measured side by side with the
//! usual ways of serving the same thing, in one run with wrk.
//!
//! The echo section: the same echo logic behind several dispatch paths.
//!
//! - standalone: the worker serving HTTP itself (no dispatch; the upper
//!   bound)
//! - nginx: nginx reverse-proxying to standalone with upstream keep-alive
//! - fast: the dispatcher's kernel path, workers writing responses into
//!   the client sockets themselves (leases)
//! - relay: the kernel path with every response relayed by the dispatcher
//!   (`direct_responses = false`; the design before leases)
//! - slow: the dispatcher with kernel classification off (user space only)
//! - fast-100k: the fast path with 100,000 more routes (route-table scaling)
//! - fast-gate: the fast path with the lease gate on (its cost)
//!
//! Cases: small GET responses at each `--connections` count, and (unless
//! `--small-only`) 64 KiB responses, a 1 MiB POST echoed back, and the
//! small GET through `h2load --h1` as a second load generator.
//!
//! The app sections ([`App`]): an application as its usual server serves
//! it (the *peers*) against the same application as a dispatcher pool
//! (`fast`): `static` is nginx serving a directory itself against the
//! worker's `static` mode over the same directory.
//!
//! Runs are interleaved (every setup once per round) so machine noise hits
//! all setups alike; each figure is the median of the rounds with min and
//! max, and ratios are computed within a round. Results go to
//! `bench/results/` as markdown, JSON and an SVG chart (of the echo
//! section).

use std::{
    fmt::Write as _,
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

mod tunnel;

/// Setups, in the order they are reported. `fast-100k` is the fast path
/// with 100,000 more routes (other hosts) in its table; `fast-gate` the
/// fast path with `lease_gate = true`.
const SETUPS: [&str; 7] = ["standalone", "nginx", "fast", "relay", "slow", "fast-100k", "fast-gate"];
/// Index of `fast-100k` in [`SETUPS`].
const FAST_100K: usize = 5;
/// Index of `fast-gate` in [`SETUPS`].
const FAST_GATE: usize = 6;
/// Extra routes of the `fast-100k` setup.
const EXTRA_ROUTES: usize = 100_000;

/// Options of a bench run.
pub struct Options {
    pub connections: Vec<u32>,
    pub seconds: u32,
    pub rounds: u32,
    /// Only the small-response cases.
    pub small_only: bool,
    /// Sections to run: `echo` and/or app names ([`App::name`]).
    pub sections: Vec<String>,
}

impl Options {
    fn echo(&self) -> bool {
        self.sections.iter().any(|s| s == "echo")
    }

    fn tunnel(&self) -> bool {
        self.sections.iter().any(|s| s == "tunnel")
    }

    fn apps(&self) -> Result<Vec<App>> {
        for s in &self.sections {
            if s != "echo" && s != "tunnel" && !App::ALL.iter().any(|a| a.name() == s) {
                let known: Vec<&str> =
                    ["echo", "tunnel"].into_iter().chain(App::ALL.iter().map(|a| a.name())).collect();
                bail!("no bench section `{s}` (there are: {})", known.join(", "));
            }
        }
        Ok(App::ALL.into_iter().filter(|a| self.sections.iter().any(|s| s == a.name())).collect())
    }
}

/// Connections of the large-response, POST and h2load cases.
const EXTRA_CONNECTIONS: u32 = 16;
/// Connections of the 1 MiB POST case (each has a request in flight).
const POST_CONNECTIONS: u32 = 8;
/// Size of the large responses.
const LARGE_RESPONSE: usize = 64 << 10;
/// Size of the POST body.
const POST_BODY: usize = 1 << 20;
/// The dispatchers' ring and queue (bytes) per pool: room for the POST
/// case's bodies in flight at once.
const BENCH_RING_BYTES: u32 = 32 << 20;
const BENCH_QUEUE_BYTES: u32 = 24 << 20;
/// Largest body the kernel path copies itself in the bench (the 1 MiB
/// POST stays on the fast path).
const BENCH_MAX_FAST_BODY: usize = 2 << 20;

/// What a case sends.
#[derive(Clone, Debug)]
enum Load {
    /// wrk GETs of this path.
    Get(String),
    /// wrk POSTs of a body of this many bytes to /echo/post (echoed back).
    Post(usize),
    /// h2load --h1 GETs of /echo/bench.
    H2load,
}

/// One measured case: a load at a connection count.
#[derive(Clone, Debug)]
struct Case {
    label: String,
    conns: u32,
    load: Load,
}

fn cases(o: &Options) -> Vec<Case> {
    if !o.echo() {
        return Vec::new();
    }
    let mut v: Vec<Case> = o
        .connections
        .iter()
        .map(|&c| Case { label: "GET, small response".into(), conns: c, load: Load::Get("/echo/bench".into()) })
        .collect();
    if !o.small_only {
        v.push(Case {
            label: "GET, 64 KiB response".into(),
            conns: EXTRA_CONNECTIONS,
            load: Load::Get(format!("/echo/bytes/{LARGE_RESPONSE}")),
        });
        v.push(Case { label: "POST 1 MiB, echoed".into(), conns: POST_CONNECTIONS, load: Load::Post(POST_BODY) });
        v.push(Case { label: "h2load --h1, small response".into(), conns: EXTRA_CONNECTIONS, load: Load::H2load });
    }
    v
}

/// An application measured as its usual server serves it (the peer
/// setups) and as a dispatcher pool (the last setup, `fast`): its own
/// table, with the ratio of `fast` to each peer per round. A new app is a
/// variant here and an arm in each method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum App {
    /// nginx serving a directory itself (`root`, sendfile) vs the worker's
    /// `static` mode over the same directory.
    Static,
    /// The axum example app (examples/apps/axum) on its own port with
    /// `axum::serve` (hyper) vs the same app in a pool through
    /// `worker::serve`.
    Axum,
    /// The WSGI example app (examples/apps/python) under gunicorn, behind
    /// nginx's `proxy_pass` (upstream keep-alive) vs in a `proxy` pool;
    /// and gunicorn with no proxy at all (`direct`), the ceiling of both.
    Python,
    /// The PHP example (examples/apps/php) under php-fpm, behind nginx's
    /// `fastcgi_pass` vs in a `fastcgi` pool.
    Php,
}

/// Largest connection count the app sections run at (of `--connections`).
const APP_MAX_CONNECTIONS: u32 = 256;
/// The static section's large file.
const STATIC_LARGE: usize = 1 << 20;

impl App {
    const ALL: [App; 4] = [App::Static, App::Axum, App::Python, App::Php];

    fn name(self) -> &'static str {
        match self {
            App::Static => "static",
            App::Axum => "axum",
            App::Python => "python",
            App::Php => "php",
        }
    }

    /// Its setups, in report order; the last one is the dispatcher's.
    fn setups(self) -> &'static [&'static str] {
        match self {
            App::Static => &["nginx-1w", "nginx-auto", "fast-gate", "fast"],
            App::Axum => &["direct", "fast"],
            App::Python => &["direct", "nginx", "fast"],
            App::Php => &["nginx", "fast"],
        }
    }

    /// One sentence on what its setups are, for the report.
    fn describe(self) -> &'static str {
        match self {
            App::Static => "nginx serving the directory itself (`root`, `sendfile on`, `tcp_nopush on`, keep-alive, `access_log off`, no `open_file_cache`: its default) with 1 worker process (`nginx-1w`, as the pool has 1 worker) and with `worker_processes auto` (`nginx-auto`, one per core); fast = a dispatcher pool running `dispatcher-worker static DIR` over the same directory (its in-memory cache of files up to 1 MiB, one `fstatat` per request; larger files by `sendfile`); fast-gate = the same with the lease gate on (`lease_gate = true`), so fast/fast-gate is what the gate costs on this path.",
            App::Axum => "the axum example app (examples/apps/axum, one current-thread tokio runtime): direct = served by `axum::serve` (hyper) on its own port; fast = the same binary in a dispatcher pool, through `worker::serve` (kernel path, direct responses).",
            App::Python => "the WSGI example app (examples/apps/python) under gunicorn (`-k gthread --workers 2 --threads 8`, so it keeps connections alive): direct = wrk straight at gunicorn, no proxy (what no proxy in front of it can pass on these cores); nginx = `worker_processes auto` with `proxy_pass` to it, upstream `keepalive 256`, and the forwarding fields a proxy pool sets (`X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded`, as gunicorn's deployment guide has nginx set the first two), so gunicorn gets the same request from both; fast = a `proxy` pool whose worker starts the same gunicorn command on its own port and forwards to it (hyper's pooled client).",
            App::Php => "the PHP example (examples/apps/php) under php-fpm with 8 children (`pm = static`) on a Unix socket: nginx = `worker_processes auto` with `fastcgi_pass` to a php-fpm of its own (a new FastCGI connection per request, nginx's default: its `fastcgi_keep_conn` with php-fpm needs as many children as kept connections across workers); fast = a `fastcgi` pool whose worker starts php-fpm with the same settings (`--php-fpm --children 8`, connections kept, one per child).",
        }
    }

    /// Its cases: (label, path, large); the large ones are left out by
    /// `--small-only`.
    fn paths(self) -> &'static [(&'static str, &'static str, bool)] {
        match self {
            App::Static => &[("demo page (index.html, 544 B)", "/", false), ("1 MiB file", "/1m.bin", true)],
            App::Axum => &[("text, GET /", "/", false), ("JSON, GET /api/items", "/api/items", false)],
            App::Python => &[("text, GET /", "/", false), ("64 KiB, GET /bytes/65536", "/bytes/65536", true)],
            App::Php => {
                &[("PHP page, GET /", "/", false), ("64 KiB, GET /download.php?kib=64", "/download.php?kib=64", true)]
            }
        }
    }

    /// Starts its setups' servers (in `dir`, with what they serve); their
    /// ports in [`App::setups`] order.
    fn start(self, bin: &Path, root: &Path, dir: &Path, procs: &mut Procs) -> Result<Vec<u16>> {
        match self {
            App::Static => {
                let site = static_site(root, dir)?;
                let ports: Vec<u16> = self.setups().iter().map(|_| free_port()).collect();
                procs.0.push(start_nginx_static(dir, "1w", "1", ports[0], &site)?);
                wait_port(ports[0], "nginx (static, 1 worker)")?;
                procs.0.push(start_nginx_static(dir, "auto", "auto", ports[1], &site)?);
                wait_port(ports[1], "nginx (static, auto)")?;
                for (i, (name, gate)) in [(2, ("static-gate", true)), (3, ("static", false))] {
                    let cfg = format!(
                        "listen = \"127.0.0.1:{}\"\ninstance = \"bench-{name}\"\n[fast_path]\nlease_gate = {gate}\n[[pool]]\nname = \"static\"\nroutes = [\"*/\"]\ncommand = \"dispatcher-worker\"\nargs = [\"static\", \"{}\"]\n",
                        ports[i],
                        site.display()
                    );
                    procs.0.push(spawn_dispatcher(bin, dir, name, &cfg, "warn")?);
                    wait_port(ports[i], "dispatcher (static)")?;
                }
                Ok(ports)
            }
            App::Axum => {
                let ports: Vec<u16> = self.setups().iter().map(|_| free_port()).collect();
                procs.0.push(
                    Command::new(bin.join("axum-example"))
                        .args(["--listen", &format!("127.0.0.1:{}", ports[0])])
                        .env("RUST_LOG", "warn")
                        .stdout(Stdio::null())
                        .spawn()
                        .context("starting axum-example --listen")?,
                );
                wait_port(ports[0], "axum (direct)")?;
                let cfg = format!(
                    "listen = \"127.0.0.1:{}\"\ninstance = \"bench-axum\"\n[[pool]]\nname = \"axum\"\nroutes = [\"*/\"]\ncommand = \"axum-example\"\n",
                    ports[1]
                );
                procs.0.push(spawn_dispatcher(bin, dir, "axum", &cfg, "warn")?);
                wait_port(ports[1], "dispatcher (axum)")?;
                Ok(ports)
            }
            App::Python => {
                let app = dir.join("python-app");
                fs::create_dir_all(&app)?;
                fs::copy(root.join("examples/apps/python/app.py"), app.join("app.py"))
                    .context("copying examples/apps/python/app.py")?;
                let ok = Command::new("chmod").args(["-R", "a+rX"]).arg(dir).status()?;
                anyhow::ensure!(ok.success(), "chmod -R a+rX {}", dir.display());
                let gunicorn_port = free_port();
                // `direct` is nginx's gunicorn itself.
                let ports = vec![gunicorn_port, free_port(), free_port()];
                let app_dir = app.display().to_string();
                let gunicorn = |bind: &str| -> Vec<String> {
                    ["gunicorn", "--chdir", &app_dir, "-b", bind, "-k", "gthread", "--workers", "2", "--threads", "8"]
                        .iter()
                        .map(|s| s.to_string())
                        .chain(["--keep-alive", "75", "--log-level", "warning", "app:app"].map(String::from))
                        .collect()
                };
                let direct = gunicorn(&format!("127.0.0.1:{gunicorn_port}"));
                procs.0.push(
                    Command::new(&direct[0])
                        .args(&direct[1..])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .context("starting gunicorn")?,
                );
                wait_port(gunicorn_port, "gunicorn")?;
                let ngx = dir.join("nginx-python");
                fs::create_dir_all(&ngx)?;
                procs.0.push(start_nginx(&ngx, ports[1], gunicorn_port, true)?);
                wait_port(ports[1], "nginx (python)")?;
                let args: Vec<String> = ["proxy".to_string(), "--".to_string()]
                    .into_iter()
                    .chain(gunicorn("127.0.0.1:$PORT"))
                    .map(|a| format!("{a:?}"))
                    .collect();
                let cfg = format!(
                    "listen = \"127.0.0.1:{}\"\ninstance = \"bench-python\"\n[[pool]]\nname = \"python\"\nroutes = [\"*/\"]\ncommand = \"dispatcher-worker\"\nargs = [{}]\nstart_mode = \"always-running\"\n",
                    ports[2],
                    args.join(", ")
                );
                procs.0.push(spawn_dispatcher(bin, dir, "python", &cfg, "warn")?);
                wait_port(ports[2], "dispatcher (python)")?;
                Ok(ports)
            }
            App::Php => {
                let app = dir.join("php-app");
                fs::create_dir_all(&app)?;
                for e in fs::read_dir(root.join("examples/apps/php")).context("examples/apps/php")? {
                    let e = e?;
                    fs::copy(e.path(), app.join(e.file_name()))?;
                }
                let ok = Command::new("chmod").args(["-R", "a+rX"]).arg(dir).status()?;
                anyhow::ensure!(ok.success(), "chmod -R a+rX {}", dir.display());
                let ports: Vec<u16> = self.setups().iter().map(|_| free_port()).collect();
                let ngx = dir.join("nginx-php");
                fs::create_dir_all(&ngx)?;
                let sock = ngx.join("php-fpm.sock");
                procs.0.push(start_php_fpm(&ngx, &sock, PHP_CHILDREN)?);
                let t0 = std::time::Instant::now();
                while !sock.exists() {
                    anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "php-fpm (for nginx) made no socket");
                    std::thread::sleep(Duration::from_millis(20));
                }
                procs.0.push(start_nginx_fastcgi(&ngx, ports[0], &sock, &app)?);
                wait_port(ports[0], "nginx (php)")?;
                let cfg = format!(
                    "listen = \"127.0.0.1:{}\"\ninstance = \"bench-php\"\n[[pool]]\nname = \"php\"\nroutes = [\"*/\"]\ncommand = \"dispatcher-worker\"\nargs = [\"fastcgi\", \"--root\", {:?}, \"--php-fpm\", \"--children\", \"{PHP_CHILDREN}\"]\nstart_mode = \"always-running\"\n",
                    ports[1],
                    app.display().to_string()
                );
                procs.0.push(spawn_dispatcher(bin, dir, "php", &cfg, "warn")?);
                wait_port(ports[1], "dispatcher (php)")?;
                Ok(ports)
            }
        }
    }
}

/// One measured case of an app: a path at a connection count.
#[derive(Clone, Debug)]
struct AppCase {
    app: App,
    label: &'static str,
    conns: u32,
    path: &'static str,
}

fn app_cases(o: &Options, apps: &[App]) -> Vec<AppCase> {
    let mut v = Vec::new();
    for &app in apps {
        for &(label, path, large) in app.paths() {
            if large && o.small_only {
                continue;
            }
            for &conns in o.connections.iter().filter(|&&c| c <= APP_MAX_CONNECTIONS) {
                v.push(AppCase { app, label, conns, path });
            }
        }
    }
    v
}

/// The static section's directory: the demo site's files and a 1 MiB file,
/// dated an hour back (the worker keeps in memory only files older than a
/// couple of seconds), readable by the workers' user.
fn static_site(root: &Path, dir: &Path) -> Result<PathBuf> {
    let site = dir.join("site");
    fs::create_dir_all(&site)?;
    for f in ["index.html", "style.css"] {
        fs::copy(root.join("demo/static").join(f), site.join(f)).with_context(|| format!("copying demo/static/{f}"))?;
    }
    fs::write(site.join("1m.bin"), (0..STATIC_LARGE).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>())?;
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    for f in ["index.html", "style.css", "1m.bin"] {
        fs::File::options().write(true).open(site.join(f))?.set_modified(old)?;
    }
    Ok(site)
}

fn start_nginx_static(dir: &Path, name: &str, workers: &str, port: u16, site: &Path) -> Result<Child> {
    let d = dir.join(format!("nginx-static-{name}"));
    fs::create_dir_all(&d)?;
    let conf = format!(
        r#"worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    types {{ text/html html; text/css css; application/octet-stream bin; }}
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {site};
    }}
}}
"#,
        d = d.display(),
        site = site.display()
    );
    run_nginx(&d, &conf, "error.log", "starting nginx (static)")
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: signalling our own children.
            unsafe { libc_kill(c.id() as i32) };
        }
        for c in &mut self.0 {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

unsafe fn libc_kill(pid: i32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on port {port}")
}

#[derive(Clone, Debug, Default)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// Whole-system CPU seconds (from /proc/stat) per 100k requests.
    cpu_per_100k: f64,
}

/// Busy CPU seconds of the whole system so far (/proc/stat).
fn system_busy_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = f.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).take(8).sum();
    busy as f64 / 100.0
}

/// Peak resident memory (VmHWM, KiB) of `pid` and all its descendants.
fn peak_rss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut stack = vec![pid];
    let mut seen = std::collections::HashSet::new();
    while let Some(p) = stack.pop() {
        if !seen.insert(p) {
            continue;
        }
        if let Ok(st) = fs::read_to_string(format!("/proc/{p}/status")) {
            total += st
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
        stack.extend(children(p));
    }
    total
}

fn parse_latency(s: &str) -> f64 {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1_000_000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mul
}

fn measure(port: u16, case: &Case, seconds: u32, dir: &Path) -> Result<Sample> {
    match &case.load {
        Load::Get(path) => wrk(port, case.conns, seconds, path, None),
        Load::Post(n) => {
            let script = dir.join("post.lua");
            fs::write(
                &script,
                format!("wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", {n})\nwrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n"),
            )?;
            wrk(port, case.conns, seconds, "/echo/post", Some(&script))
        }
        Load::H2load => h2load(port, case.conns, seconds),
    }
}

fn wrk(port: u16, conns: u32, seconds: u32, path: &str, script: Option<&Path>) -> Result<Sample> {
    let threads = conns.min(2).to_string();
    let cpu0 = system_busy_seconds();
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", &threads, "-c", &conns.to_string(), "-d", &format!("{seconds}s"), "--latency"]);
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    let out = cmd.arg(format!("http://127.0.0.1:{port}{path}")).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut s = Sample::default();
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("50%") {
            s.p50_us = parse_latency(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            s.p99_us = parse_latency(v);
        } else if l.starts_with("Non-2xx") || l.starts_with("Socket errors") {
            s.errors += l.split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse::<u64>().ok()).sum::<u64>();
        }
    }
    if s.rps == 0.0 {
        bail!("wrk printed no throughput:\n{text}");
    }
    s.cpu_per_100k = (system_busy_seconds() - cpu0) / (s.rps * seconds as f64) * 100_000.0;
    Ok(s)
}

/// `h2load --h1` for `seconds`; it reports mean latency, kept in `p50_us`
/// (and marked so in the table), no percentiles.
fn h2load(port: u16, conns: u32, seconds: u32) -> Result<Sample> {
    let cpu0 = system_busy_seconds();
    let out = Command::new("h2load")
        .args(["--h1", "-t", &conns.min(2).to_string(), "-c", &conns.to_string(), "-D", &seconds.to_string()])
        .arg(format!("http://127.0.0.1:{port}/echo/bench"))
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut s = Sample { p99_us: f64::NAN, ..Default::default() };
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("finished in") {
            // "finished in 5.00s, 123456.70 req/s, 12.34MB/s"
            s.rps = rest
                .split(',')
                .nth(1)
                .and_then(|x| x.trim().strip_suffix("req/s"))
                .and_then(|x| x.trim().parse().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = l.strip_prefix("requests:") {
            // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            for part in rest.split(',') {
                let mut w = part.split_whitespace();
                let (Some(n), Some(what)) = (w.next(), w.next()) else { continue };
                if matches!(what, "failed" | "errored" | "timeout") {
                    s.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        } else if let Some(rest) = l.strip_prefix("time for request:") {
            // min max mean sd +/-sd
            s.p50_us = rest.split_whitespace().nth(2).map(parse_latency).unwrap_or(f64::NAN);
        }
    }
    if s.rps == 0.0 {
        bail!("h2load printed no throughput:\n{text}");
    }
    s.cpu_per_100k = (system_busy_seconds() - cpu0) / (s.rps * seconds as f64) * 100_000.0;
    Ok(s)
}

/// (median, min, max); NaN (a figure a tool does not report) sorts last.
fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// How an echo setup's dispatcher runs: the kernel path, direct
/// responses (leases), the lease gate, and routes added to its table.
struct Paths {
    fast: bool,
    direct: bool,
    gate: bool,
    extra_routes: usize,
}

fn start_dispatcher(bin: &Path, dir: &Path, name: &str, port: u16, paths: Paths) -> Result<Child> {
    let Paths { fast, direct, gate, extra_routes } = paths;
    let mut routes = String::from("\"*/\"");
    for i in 0..extra_routes {
        let _ = write!(routes, ", \"h{i}.bench/p{i}/\"");
    }
    let cfg = format!(
        "listen = \"127.0.0.1:{port}\"\ninstance = \"bench-{name}\"\n[fast_path]\nenabled = {fast}\ndirect_responses = {direct}\nlease_gate = {gate}\nmax_body = {BENCH_MAX_FAST_BODY}\n[[pool]]\nname = \"echo\"\nroutes = [{routes}]\ncommand = \"dispatcher-worker\"\nargs = [\"echo\"]\nring_bytes = {BENCH_RING_BYTES}\nqueue_bytes = {BENCH_QUEUE_BYTES}\n"
    );
    spawn_dispatcher(bin, dir, name, &cfg, "warn")
}

/// Starts `dispatcher serve` with configuration `cfg`, written to
/// `dir/<name>.toml`; its log goes to `dir/<name>.log`.
fn spawn_dispatcher(bin: &Path, dir: &Path, name: &str, cfg: &str, log_level: &str) -> Result<Child> {
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, cfg)?;
    let log = fs::File::create(dir.join(format!("{name}.log")))?;
    Command::new(bin.join("dispatcher"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", log_level)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting the dispatcher ({name})"))
}

/// Starts nginx in the foreground with `conf`, written to DIR/nginx.conf,
/// logging its errors to DIR/`log`.
fn run_nginx(dir: &Path, conf: &str, log: &str, what: &str) -> Result<Child> {
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    Command::new("nginx")
        .args(["-e", &dir.join(log).display().to_string(), "-c"])
        .arg(&path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context(what.to_string())
}

/// php-fpm's children in the php section, on both sides.
const PHP_CHILDREN: usize = 8;

/// A php-fpm for nginx, configured as the `fastcgi` pool configures its
/// own (`worker::fastcgi::php_fpm`), on `sock`.
fn start_php_fpm(dir: &Path, sock: &Path, children: usize) -> Result<Child> {
    let conf = dir.join("php-fpm.conf");
    fs::write(
        &conf,
        format!(
            "[global]\nerror_log = {log}\ndaemonize = no\n[nginx]\nlisten = {sock}\nlisten.mode = 0666\npm = static\npm.max_children = {children}\nclear_env = no\ncatch_workers_output = yes\n",
            log = dir.join("php-fpm.log").display(),
            sock = sock.display(),
        ),
    )?;
    let fpm = fs::read_dir("/usr/sbin")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("php-fpm")))
        .max()
        .context("no php-fpm in /usr/sbin")?;
    Command::new(&fpm)
        .args(["--nodaemonize", "--allow-to-run-as-root", "--fpm-config"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", fpm.display()))
}

/// The start of an nginx configuration of the bench's: `worker_processes
/// auto`, its files in `dir`, no access log; the `http` block left open.
fn nginx_head(dir: &Path) -> String {
    format!(
        r#"worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;"#,
        dir = dir.display()
    )
}

/// nginx in front of php-fpm: the usual PHP location (`fastcgi_params`,
/// SCRIPT_FILENAME from the root), on `port`.
fn start_nginx_fastcgi(dir: &Path, port: u16, sock: &Path, root: &Path) -> Result<Child> {
    let conf = format!(
        r#"{head}
    fastcgi_buffers 16 16k;
    server {{
        listen 127.0.0.1:{port} reuseport;
        keepalive_requests 1000000;
        root {root};
        index index.php;
        location ~ [^/]\.php(/|$) {{
            fastcgi_split_path_info ^(.+?\.php)(/.*)$;
            try_files $fastcgi_script_name =404;
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_param PATH_INFO $fastcgi_path_info;
            fastcgi_pass unix:{sock};
        }}
    }}
}}
"#,
        head = nginx_head(dir),
        root = root.display(),
        sock = sock.display(),
    );
    run_nginx(dir, &conf, "nginx-error.log", "starting nginx")
}

/// nginx proxying to `upstream` with keep-alive; `forwarded`: with the
/// fields a proxy pool adds to each request (for a like-for-like app
/// comparison: gunicorn parses each field, a fifth of its time per request
/// for these three on the text page).
fn start_nginx(dir: &Path, port: u16, upstream: u16, forwarded: bool) -> Result<Child> {
    let fields = if forwarded {
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n            proxy_set_header X-Forwarded-Proto $scheme;\n            proxy_set_header Forwarded \"for=$remote_addr;host=\\\"$http_host\\\";proto=$scheme\";"
    } else {
        ""
    };
    let conf = format!(
        r#"worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    # Bodies and responses of the POST and 64 KiB cases in memory, not in
    # temporary files.
    client_max_body_size 8m;
    client_body_buffer_size 2m;
    proxy_buffer_size 16k;
    proxy_buffers 128 16k;
    proxy_busy_buffers_size 64k;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream standalone {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://standalone;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            {fields}
        }}
    }}
}}
"#,
        dir = dir.display()
    );
    run_nginx(dir, &conf, "nginx-error.log", "starting nginx")
}

/// Runs the benchmark and writes the results.
pub fn run(bin: &Path, root: &Path, o: &Options) -> Result<PathBuf> {
    let apps = o.apps()?;
    let cases = cases(o);
    let app_cases = app_cases(o, &apps);
    if cases.is_empty() && app_cases.is_empty() && !o.tunnel() {
        bail!("nothing to measure (the app sections run at --connections counts up to {APP_MAX_CONNECTIONS})");
    }
    let dir = std::env::temp_dir().join(format!("dispatcher-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let mut procs = Procs(Vec::new());
    let ports = if cases.is_empty() { Vec::new() } else { start_echo_setups(bin, &dir, &mut procs)? };
    if !ports.is_empty() {
        conformance(bin, root, ports[1], ports[2])?;
    }
    // Each app's ports, and where its processes (one per setup) start in `procs`.
    let mut app_ports = Vec::new();
    let mut app_procs = Vec::new();
    for app in &apps {
        app_procs.push(procs.0.len());
        app_ports.push(app.start(bin, root, &dir, &mut procs)?);
    }
    let tunnel_ports = if o.tunnel() { tunnel::start(bin, &dir, &mut procs)? } else { Vec::new() };
    std::thread::sleep(Duration::from_secs(1));

    // samples[case][setup][round]
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); SETUPS.len()]; cases.len()];
    let mut app_samples: Vec<Vec<Vec<Sample>>> =
        app_cases.iter().map(|c| vec![Vec::new(); c.app.setups().len()]).collect();
    // tunnel_samples[setup][round]
    let mut tunnel_samples: Vec<Vec<tunnel::Sample>> = vec![Vec::new(); tunnel_ports.len()];
    let per_round =
        cases.len() * SETUPS.len() + app_cases.iter().map(|c| c.app.setups().len()).sum::<usize>() + tunnel_ports.len();
    let total = per_round as u32 * o.rounds;
    let mut k = 0;
    for round in 0..o.rounds {
        for (ci, case) in cases.iter().enumerate() {
            for (si, setup) in SETUPS.iter().enumerate() {
                k += 1;
                println!(
                    "[xtask] bench {k}/{total}: round {} {setup}: {} c={} {}s",
                    round + 1,
                    case.label,
                    case.conns,
                    o.seconds
                );
                let s = measure(ports[si], case, o.seconds, &dir)?;
                samples[ci][si].push(s);
            }
        }
        for (ci, case) in app_cases.iter().enumerate() {
            let ai = apps.iter().position(|a| *a == case.app).expect("an app of the run");
            for (si, setup) in case.app.setups().iter().enumerate() {
                k += 1;
                println!(
                    "[xtask] bench {k}/{total}: round {} {} {setup}: {} c={} {}s",
                    round + 1,
                    case.app.name(),
                    case.label,
                    case.conns,
                    o.seconds
                );
                let s = wrk(app_ports[ai][si], case.conns, o.seconds, case.path, None)?;
                app_samples[ci][si].push(s);
            }
        }
        for (si, port) in tunnel_ports.iter().enumerate() {
            k += 1;
            let setup = tunnel::SETUPS[si];
            println!(
                "[xtask] bench {k}/{total}: round {} tunnel {setup}: {} tunnels {}s",
                round + 1,
                tunnel::CONNECTIONS,
                o.seconds
            );
            tunnel_samples[si].push(tunnel::measure(*port, o.seconds).with_context(|| format!("tunnel {setup}"))?);
        }
    }
    let rss: Vec<u64> = procs.0.iter().map(|c| peak_rss_kib(c.id())).collect();
    drop(procs);
    let echo_rss = &rss[..ports.len()];
    let app_rss: Vec<&[u64]> = apps.iter().zip(&app_procs).map(|(a, &i)| &rss[i..i + a.setups().len()]).collect();
    let long = o.echo() && !o.small_only;
    let cold = if long { Some(cold_start(bin, &dir)?) } else { None };
    let recycle = if long { Some(recycle_under_load(bin, &dir, o.seconds)?) } else { None };
    let _ = fs::remove_dir_all(&dir);
    let apps = AppResults { apps: &apps, cases: &app_cases, samples: &app_samples, rss: &app_rss };
    let tunnel = (!tunnel_samples.is_empty()).then_some(&tunnel_samples[..]);
    write_results(root, o, &cases, &samples, echo_rss, &apps, tunnel, cold.as_ref(), recycle.as_ref())
}

/// The conformance suite (`tests::conformance`) against nginx and the
/// dispatcher in front of the same echo backend, one verdict rule for both:
/// `bench/results/conformance.md`.
fn conformance(bin: &Path, root: &Path, nginx: u16, fast: u16) -> Result<()> {
    println!("[xtask] bench: conformance suite against nginx and the dispatcher");
    let out = Command::new(bin.join("conformance"))
        .args([format!("nginx={nginx}"), format!("dispatcher={fast}")])
        .output()
        .context("running the conformance suite (target/release/conformance)")?;
    if !out.status.success() {
        bail!("the conformance suite failed to run: {}", String::from_utf8_lossy(&out.stderr));
    }
    let table = String::from_utf8_lossy(&out.stdout);
    let md = format!(
        "# Conformance: RFC 9112/9110 cases, nginx and the dispatcher\n\n\
         `cargo xtask bench` (echo section): each case's bytes, then a well-formed `GET /follow`, on a fresh \
         connection; nginx proxies to the standalone echo worker, the dispatcher serves it as a pool. \
         The cases and rules are `tests/src/conformance.rs`.\n\n{table}"
    );
    let dir = root.join("bench/results");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("conformance.md"), &md)?;
    print!("{table}");
    Ok(())
}

/// Starts the echo section's setups ([`SETUPS`]); their ports.
fn start_echo_setups(bin: &Path, dir: &Path, procs: &mut Procs) -> Result<Vec<u16>> {
    let ports: Vec<u16> = SETUPS.iter().map(|_| free_port()).collect();
    procs.0.push(
        Command::new(bin.join("dispatcher-worker"))
            .args(["--listen", &format!("127.0.0.1:{}", ports[0]), "echo"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting the standalone worker")?,
    );
    wait_port(ports[0], "standalone worker")?;
    procs.0.push(start_nginx(dir, ports[1], ports[0], false)?);
    wait_port(ports[1], "nginx")?;
    procs.0.push(start_dispatcher(
        bin,
        dir,
        "fast",
        ports[2],
        Paths { fast: true, direct: true, gate: false, extra_routes: 0 },
    )?);
    wait_port(ports[2], "dispatcher (fast)")?;
    procs.0.push(start_dispatcher(
        bin,
        dir,
        "relay",
        ports[3],
        Paths { fast: true, direct: false, gate: false, extra_routes: 0 },
    )?);
    wait_port(ports[3], "dispatcher (relay)")?;
    procs.0.push(start_dispatcher(
        bin,
        dir,
        "slow",
        ports[4],
        Paths { fast: false, direct: false, gate: false, extra_routes: 0 },
    )?);
    wait_port(ports[4], "dispatcher (slow)")?;
    procs.0.push(start_dispatcher(
        bin,
        dir,
        "fast100k",
        ports[FAST_100K],
        Paths { fast: true, direct: true, gate: false, extra_routes: EXTRA_ROUTES },
    )?);
    wait_port(ports[FAST_100K], "dispatcher (fast, 100k routes)")?;
    procs.0.push(start_dispatcher(
        bin,
        dir,
        "fastgate",
        ports[FAST_GATE],
        Paths { fast: true, direct: true, gate: true, extra_routes: 0 },
    )?);
    wait_port(ports[FAST_GATE], "dispatcher (fast, lease gate)")?;
    Ok(ports)
}

/// What the app sections measured.
struct AppResults<'a> {
    apps: &'a [App],
    cases: &'a [AppCase],
    /// [case][setup][round]
    samples: &'a [Vec<Vec<Sample>>],
    /// Peak RSS per app, per setup.
    rss: &'a [&'a [u64]],
}

/// Requests per worker in the recycling-under-load run.
const RECYCLE_EVERY: u64 = 50_000;
/// Connections of the recycling-under-load run.
const RECYCLE_CONNECTIONS: u32 = 16;

/// wrk against a pool whose worker is recycled every [`RECYCLE_EVERY`]
/// requests: throughput, p99 and errors across the recycles.
struct Recycle {
    sample: Sample,
    recycles: usize,
    seconds: u32,
}

fn recycle_under_load(bin: &Path, dir: &Path, seconds: u32) -> Result<Recycle> {
    let port = free_port();
    let cfg = format!(
        "listen = \"127.0.0.1:{port}\"\ninstance = \"bench-recycle\"\n[[pool]]\nname = \"echo\"\nroutes = [\"*/\"]\ncommand = \"dispatcher-worker\"\nargs = [\"echo\"]\nstart_mode = \"always-running\"\nrecycle_requests = {RECYCLE_EVERY}\n"
    );
    // At info: the workers' recycles are counted in its log.
    let d = spawn_dispatcher(bin, dir, "recycle", &cfg, "info")?;
    let log_path = dir.join("recycle.log");
    let _guard = Procs(vec![d]);
    wait_port(port, "dispatcher (recycling)")?;
    let seconds = seconds * 2;
    println!("[xtask] bench recycling under load: c={RECYCLE_CONNECTIONS} {seconds}s, a recycle every {RECYCLE_EVERY} requests");
    let sample = wrk(port, RECYCLE_CONNECTIONS, seconds, "/echo/bench", None)?;
    let recycles = fs::read_to_string(&log_path).unwrap_or_default().matches("recycled: no more requests").count();
    Ok(Recycle { sample, recycles, seconds })
}

/// First-request latencies of an on-demand pool, each after its worker
/// idled out, and warm latencies of the request right after, in µs.
struct Cold {
    cold_us: Vec<f64>,
    warm_us: Vec<f64>,
}

/// Cold starts measured.
const COLD_SAMPLES: usize = 5;
/// Idle time-out of the cold-start pool.
const COLD_IDLE_SECS: u64 = 1;

fn cold_start(bin: &Path, dir: &Path) -> Result<Cold> {
    let port = free_port();
    let cfg = format!(
        "listen = \"127.0.0.1:{port}\"\ninstance = \"bench-cold\"\n[[pool]]\nname = \"echo\"\nroutes = [\"*/\"]\ncommand = \"dispatcher-worker\"\nargs = [\"echo\"]\nstart_mode = \"on-demand\"\nidle_timeout_secs = {COLD_IDLE_SECS}\n"
    );
    let d = spawn_dispatcher(bin, dir, "cold", &cfg, "warn")?;
    let pid = d.id();
    let _guard = Procs(vec![d]);
    wait_port(port, "dispatcher (cold start)")?;
    let mut c = Cold { cold_us: Vec::new(), warm_us: Vec::new() };
    for i in 0..COLD_SAMPLES {
        println!("[xtask] bench cold start {}/{COLD_SAMPLES}", i + 1);
        let t = Instant::now();
        while !children(pid).is_empty() {
            if t.elapsed() > Duration::from_secs(COLD_IDLE_SECS + 20) {
                bail!("the cold-start pool's worker did not idle out");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.cold_us.push(timed_get(&mut s)?);
        c.warm_us.push(timed_get(&mut s)?);
    }
    Ok(c)
}

/// The processes whose parent is `pid` (from /proc/<pid>/stat).
fn children(pid: u32) -> Vec<u32> {
    let ppid = |child: u32| {
        fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok()))
    };
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&c| ppid(c) == Some(pid))
        .collect()
}

/// One keep-alive GET on `s`; its latency in µs.
fn timed_get(s: &mut TcpStream) -> Result<f64> {
    use std::io::{Read, Write};
    let t = Instant::now();
    s.write_all(b"GET /echo/cold HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("the connection closed during the cold-start request");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                if !head.starts_with("http/1.1 200") {
                    bail!("cold-start request: {}", head.lines().next().unwrap_or(""));
                }
                return Ok(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
}

fn uname() -> String {
    Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The echo section's table, route-table scaling and memory.
fn write_echo(
    md: &mut String,
    json: &mut Vec<String>,
    cases: &[Case],
    samples: &[Vec<Vec<Sample>>],
    rss: &[u64],
) -> Result<()> {
    writeln!(md, "## Echo\n")?;
    writeln!(md, "The same echo worker behind every setup. Setups: standalone = the worker serving HTTP itself; nginx = nginx proxying to it (upstream keep-alive); fast = the dispatcher's kernel path with direct responses; relay = the kernel path with responses relayed by the dispatcher; slow = everything through the dispatcher's user space; fast-100k = fast with 100,000 more routes; fast-gate = fast with the lease gate (`lease_gate = true`: an sk_msg program checks who writes into each client socket).\n")?;
    writeln!(md, "| case | connections | setup | req/s | p50 µs | p99 µs | CPU s / 100k req | errors | fast/nginx | fast/standalone |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for (ci, case) in cases.iter().enumerate() {
        let c = case.conns;
        let label = &case.label;
        // Pairwise ratios within each round.
        let ratio = |a: usize, b: usize| -> (f64, f64, f64) {
            median(samples[ci][a].iter().zip(&samples[ci][b]).map(|(x, y)| x.rps / y.rps).collect())
        };
        let (fn_med, fn_min, fn_max) = ratio(2, 1);
        let (fd_med, fd_min, fd_max) = ratio(2, 0);
        for (si, setup) in SETUPS.iter().enumerate() {
            let s = &samples[ci][si];
            let rps = median(s.iter().map(|x| x.rps).collect());
            let p50 = median(s.iter().map(|x| x.p50_us).collect());
            let p99 = median(s.iter().map(|x| x.p99_us).collect());
            let errors: u64 = s.iter().map(|x| x.errors).sum();
            let cpu = median(s.iter().map(|x| x.cpu_per_100k).collect());
            let ratios = if *setup == "fast" {
                format!("{fn_med:.2} ({fn_min:.2}–{fn_max:.2}) | {fd_med:.2} ({fd_min:.2}–{fd_max:.2})")
            } else {
                " | ".to_string()
            };
            let (p50s, p99s) = match case.load {
                Load::H2load => (format!("mean {:.0}", p50.0), "—".to_string()),
                _ => (format!("{:.0}", p50.0), format!("{:.0}", p99.0)),
            };
            writeln!(
                md,
                "| {label} | {c} | {setup} | {:.0} ({:.0}–{:.0}) | {p50s} | {p99s} | {:.2} | {errors} | {ratios} |",
                rps.0, rps.1, rps.2, cpu.0
            )?;
            let num = |v: f64| if v.is_finite() { format!("{v:.1}") } else { "null".into() };
            json.push(format!(
                "{{\"case\":\"{label}\",\"connections\":{c},\"setup\":\"{setup}\",\"rps\":{:.1},\"rps_min\":{:.1},\"rps_max\":{:.1},\"p50_us\":{},\"p99_us\":{},\"cpu_s_per_100k\":{:.3},\"errors\":{errors}}}",
                rps.0, rps.1, rps.2, num(p50.0), num(p99.0), cpu.0
            ));
        }
    }
    // Route-table scaling: 100k extra routes vs the plain fast path, per round.
    writeln!(md)?;
    for (ci, case) in cases.iter().enumerate().filter(|(_, c)| matches!(&c.load, Load::Get(p) if p == "/echo/bench")) {
        let c = case.conns;
        let r = median(samples[ci][FAST_100K].iter().zip(&samples[ci][2]).map(|(x, y)| x.rps / y.rps).collect());
        writeln!(
            md,
            "Route-table scaling at {c} connections: 100,001 vs 1 route, throughput ratio {:.2} ({:.2}–{:.2}).",
            r.0, r.1, r.2
        )?;
    }
    // The lease gate's cost: fast-gate vs fast (gate off), per round.
    writeln!(md)?;
    for (ci, case) in cases.iter().enumerate() {
        let r = median(samples[ci][FAST_GATE].iter().zip(&samples[ci][2]).map(|(x, y)| x.rps / y.rps).collect());
        writeln!(
            md,
            "Lease gate, {} at {} connections: throughput with it / without it {:.2} ({:.2}–{:.2}).",
            case.label, case.conns, r.0, r.1, r.2
        )?;
    }
    writeln!(md, "\nPeak RSS (VmHWM, process and its children, KiB): {}. The dispatcher setups' figures include the workers' mappings of their 32 MiB rings (mapped twice by the kernel's ring layout).", SETUPS.iter().zip(rss).map(|(s, r)| format!("{s} {r}")).collect::<Vec<_>>().join(", "))?;
    Ok(())
}

/// An app section's table: every setup per case, and on the dispatcher's
/// row its ratio to each peer.
fn write_app(md: &mut String, json: &mut Vec<String>, app: App, r: &AppResults, ai: usize) -> Result<()> {
    let setups = app.setups();
    let (peers, fast) = (&setups[..setups.len() - 1], setups.len() - 1);
    writeln!(md, "\n## App: {}\n\n{}\n", app.name(), app.describe())?;
    let ratio_heads: String = peers.iter().map(|p| format!(" {}/{p} |", setups[fast])).collect();
    writeln!(md, "| case | connections | setup | req/s | p50 µs | p99 µs | CPU s / 100k req | errors |{ratio_heads}")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|{}", "---|".repeat(peers.len()))?;
    for (ci, case) in r.cases.iter().enumerate().filter(|(_, c)| c.app == app) {
        let samples = &r.samples[ci];
        // The dispatcher over each peer, round by round.
        let ratios: Vec<(f64, f64, f64)> = (0..peers.len())
            .map(|pi| median(samples[fast].iter().zip(&samples[pi]).map(|(x, y)| x.rps / y.rps).collect()))
            .collect();
        for (si, setup) in setups.iter().enumerate() {
            let s = &samples[si];
            let rps = median(s.iter().map(|x| x.rps).collect());
            let p50 = median(s.iter().map(|x| x.p50_us).collect()).0;
            let p99 = median(s.iter().map(|x| x.p99_us).collect()).0;
            let cpu = median(s.iter().map(|x| x.cpu_per_100k).collect()).0;
            let errors: u64 = s.iter().map(|x| x.errors).sum();
            let cells: String = if si == fast {
                ratios.iter().map(|(m, lo, hi)| format!(" {m:.2} ({lo:.2}–{hi:.2}) |")).collect()
            } else {
                " |".repeat(peers.len())
            };
            writeln!(
                md,
                "| {} | {} | {setup} | {:.0} ({:.0}–{:.0}) | {p50:.0} | {p99:.0} | {cpu:.2} | {errors} |{cells}",
                case.label, case.conns, rps.0, rps.1, rps.2
            )?;
            let ratio_json: Vec<String> = if si == fast {
                peers
                    .iter()
                    .zip(&ratios)
                    .map(|(p, (m, lo, hi))| {
                        format!("{{\"over\":\"{p}\",\"median\":{m:.3},\"min\":{lo:.3},\"max\":{hi:.3}}}")
                    })
                    .collect()
            } else {
                Vec::new()
            };
            json.push(format!(
                "{{\"app\":\"{}\",\"case\":\"{}\",\"path\":\"{}\",\"connections\":{},\"setup\":\"{setup}\",\"rps\":{:.1},\"rps_min\":{:.1},\"rps_max\":{:.1},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"cpu_s_per_100k\":{cpu:.3},\"errors\":{errors},\"ratios\":[{}]}}",
                app.name(),
                case.label,
                case.path,
                case.conns,
                rps.0,
                rps.1,
                rps.2,
                ratio_json.join(",")
            ));
        }
    }
    // With the app measured on its own, how much any proxy could pass nginx
    // by (the proxy and the app share these cores).
    if let (Some(d), Some(n)) = (setups.iter().position(|s| *s == "direct"), setups.iter().position(|s| *s == "nginx"))
    {
        let lines: Vec<String> = r
            .cases
            .iter()
            .enumerate()
            .filter(|(_, c)| c.app == app)
            .map(|(ci, c)| {
                let s = &r.samples[ci];
                let (m, lo, hi) = median(s[d].iter().zip(&s[n]).map(|(x, y)| x.rps / y.rps).collect());
                format!("{} at {}: {m:.2} ({lo:.2}–{hi:.2})", c.label, c.conns)
            })
            .collect();
        writeln!(md, "\nThe ceiling, direct/nginx (no proxy over nginx): {}.", lines.join("; "))?;
    }
    writeln!(
        md,
        "\nPeak RSS (VmHWM, process and its children, KiB): {}.",
        setups.iter().zip(r.rss[ai]).map(|(s, r)| format!("{s} {r}")).collect::<Vec<_>>().join(", ")
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_results(
    root: &Path,
    o: &Options,
    cases: &[Case],
    samples: &[Vec<Vec<Sample>>],
    rss: &[u64],
    apps: &AppResults,
    tunnel: Option<&[Vec<tunnel::Sample>]>,
    cold: Option<&Cold>,
    recycle: Option<&Recycle>,
) -> Result<PathBuf> {
    let out = root.join("bench/results");
    fs::create_dir_all(&out)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = uname();
    let mut md = String::new();
    let mut json = Vec::new();
    writeln!(md, "# dispatcher benchmark\n")?;
    writeln!(md, "Machine: {cores} cores, Linux {kernel}. Keep-alive connections; {} interleaved rounds of {} s per case and setup; median (min–max); ratios are taken within each round, then their median (min–max).\n", o.rounds, o.seconds)?;
    if !cases.is_empty() {
        write_echo(&mut md, &mut json, cases, samples, rss)?;
    }
    if let Some(c) = cold {
        let (cm, clo, chi) = median(c.cold_us.clone());
        let (wm, wlo, whi) = median(c.warm_us.clone());
        writeln!(
            md,
            "\nCold start of an on-demand pool (first request after its worker idled out, new connection; {} samples): {:.0} µs ({:.0}–{:.0}); the next request on the same connection: {:.0} µs ({:.0}–{:.0}).",
            c.cold_us.len(), cm, clo, chi, wm, wlo, whi
        )?;
        json.push(format!("{{\"case\":\"cold start\",\"cold_us\":{cm:.1},\"cold_us_min\":{clo:.1},\"cold_us_max\":{chi:.1},\"warm_us\":{wm:.1}}}"));
    }
    if let Some(r) = recycle {
        let s = &r.sample;
        writeln!(
            md,
            "\nRecycling under load (wrk, {RECYCLE_CONNECTIONS} connections, {} s, the worker recycled every {RECYCLE_EVERY} requests): {} recycles, {} errors, {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs.",
            r.seconds, r.recycles, s.errors, s.rps, s.p50_us, s.p99_us
        )?;
        json.push(format!(
            "{{\"case\":\"recycling under load\",\"recycles\":{},\"errors\":{},\"rps\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1}}}",
            r.recycles, s.errors, s.rps, s.p50_us, s.p99_us
        ));
    }
    // The app sections after the echo section's figures (cold start and
    // recycling are the echo pool's).
    for (ai, app) in apps.apps.iter().enumerate() {
        write_app(&mut md, &mut json, *app, apps, ai)?;
    }
    if let Some(t) = tunnel {
        tunnel::write(&mut md, &mut json, t, o.seconds)?;
    }
    // A run of some sections only (`--only`) writes beside the full run's
    // results instead of over them.
    let stem = match cases.is_empty() || apps.apps.len() < App::ALL.len() || tunnel.is_none() {
        false => "results".to_string(),
        true => format!("results-{}", o.sections.join("-")),
    };
    fs::write(out.join(format!("{stem}.md")), &md)?;
    fs::write(
        out.join(format!("{stem}.json")),
        format!(
            "{{\"cores\":{cores},\"kernel\":\"{kernel}\",\"rounds\":{},\"seconds\":{},\"results\":[{}]}}\n",
            o.rounds,
            o.seconds,
            json.join(",")
        ),
    )?;
    if !cases.is_empty() {
        fs::write(out.join("throughput.svg"), chart(cases, samples, cores, &kernel))?;
    }
    print!("{md}");
    Ok(out)
}

/// A grouped bar chart of median throughput per connection count.
fn chart(cases: &[Case], samples: &[Vec<Vec<Sample>>], cores: usize, kernel: &str) -> String {
    let colors = ["#4c72b0", "#dd8452", "#55a868", "#937860", "#c44e52", "#8172b3", "#64b5cd"];
    let (w, h, left, bottom, top) = (720.0, 400.0, 70.0, 50.0, 40.0);
    let max = samples
        .iter()
        .flat_map(|c| c.iter().map(|s| median(s.iter().map(|x| x.rps).collect()).0))
        .fold(1.0f64, f64::max)
        * 1.1;
    let group_w = (w - left - 20.0) / cases.len() as f64;
    let bar_w = group_w / (SETUPS.len() as f64 + 1.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"20\" font-size=\"14\">Median requests/s (wrk, echo) — {cores} cores, Linux {kernel}</text>\n"
    );
    for (ci, case) in cases.iter().enumerate() {
        let gx = left + ci as f64 * group_w;
        for (si, _) in SETUPS.iter().enumerate() {
            let v = median(samples[ci][si].iter().map(|x| x.rps).collect()).0;
            let bh = (h - bottom - top) * v / max;
            let x = gx + (si as f64 + 0.5) * bar_w;
            let y = h - bottom - bh;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/>",
                bar_w * 0.9,
                colors[si]
            );
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{:.0}k</text>",
                x + bar_w * 0.45,
                y - 3.0,
                v / 1000.0
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}, c={}</text>",
            gx + group_w / 2.0,
            h - bottom + 18.0,
            case.label,
            case.conns
        );
    }
    for (si, s) in SETUPS.iter().enumerate() {
        let x = left + si as f64 * 105.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{s}</text>",
            h - 22.0,
            colors[si],
            x + 16.0,
            h - 12.0
        );
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - 20.0,
        h - bottom
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_nan_without_panicking() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        let (m, lo, hi) = median(vec![f64::NAN, f64::NAN, f64::NAN]);
        assert!(m.is_nan() && lo.is_nan() && hi.is_nan());
    }
}
