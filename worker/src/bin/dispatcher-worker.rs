//! The ready worker: pulls requests from its pool's queue and answers them
//! by echoing them back or by serving files from a directory.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use worker::{files::StaticFiles, Request, Response, Worker};

/// A dispatcher worker. Started by the dispatcher with its pool's queue
/// handles (DISPATCHER_RING_FD, DISPATCHER_CTL_FD); not useful on its own.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Add `X-Dispatcher-Pool: <pool>` and `X-Dispatcher-Worker: <pid>` to
    /// every response, to see which pool and process answered.
    #[arg(long)]
    pool_header: bool,
    /// Serve HTTP on this address standalone instead of pulling from a
    /// dispatcher pool (the benchmarks' no-dispatch baseline).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Clone)]
enum Mode {
    /// Answer 200 with the request echoed back: the request line, the
    /// headers as received, a blank line, then the body. A path ending in
    /// `/bytes/N` is answered with N bytes instead (at most 64 MiB; the
    /// benchmarks' large responses); a path containing `/delay/MS/` is
    /// answered after MS milliseconds (at most 60 s; a slow application).
    Echo,
    /// Serve the files under DIR (GET and HEAD; a directory serves its
    /// index.html): ETag and Last-Modified with 304, one Range with 206
    /// or 416, precompressed .br/.gz siblings, small files from memory
    /// (see `worker::files`).
    Static {
        /// Directory to serve.
        dir: PathBuf,
        /// A Cache-Control value for every file (e.g. "public, max-age=3600").
        #[arg(long, value_name = "VALUE")]
        cache_control: Option<String>,
    },
    /// Start COMMAND (any HTTP/1.1 server: gunicorn, node, a Go binary) and
    /// forward the pool's requests to it over keep-alive connections on
    /// loopback (see `worker::proxy`). It listens where --socket says;
    /// `$PORT` in its arguments is replaced by the port. The app and this
    /// worker stop together.
    ///
    /// Example: proxy -- gunicorn -b 127.0.0.1:$PORT app:app
    Proxy {
        /// `port`: a free loopback port in PORT (HOST=127.0.0.1) for the
        /// app to bind; `fds`: a listening loopback socket as fd 3, systemd
        /// style (LISTEN_FDS=1, LISTEN_PID, LISTEN_FDNAMES=http); `unix`: a
        /// Unix socket path in SOCKET (and for `$SOCKET` in the arguments).
        #[arg(long, value_enum, default_value = "port")]
        socket: SocketArg,
        /// Seconds the app may take to accept its first connection.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        start_timeout: u64,
        /// Keep-alive connections to the app at most (requests beyond
        /// that many in flight wait for one). 256, as many as nginx's
        /// usual upstream `keepalive`: against gunicorn's threads 64 got
        /// a fifth less through at 256 clients.
        #[arg(long, default_value_t = 256, value_name = "N")]
        max_connections: usize,
        /// Seconds an upgraded connection (WebSocket) may pass nothing
        /// either way before both sides are closed (nginx's
        /// proxy_read_timeout for one; 0: never).
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        tunnel_idle_timeout: u64,
        /// Threads forwarding requests (default: one per CPU this process
        /// may run on; 1: all on the main thread, as the other modes). On
        /// 2 cores in front of gunicorn, two gave 0.98–0.99× nginx's
        /// throughput at 256 clients and 0.85–0.94× at 16; one gave
        /// 0.87–0.94× and 0.72–0.88× (two runs each).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        threads: Option<u16>,
        /// The app's program and arguments.
        #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Run PHP (or any FastCGI responder) for the pool: each request runs
    /// the script its path names under --root (`/a.php/x` runs a.php with
    /// PATH_INFO /x; a directory runs its --index), sent over FastCGI with
    /// the CGI/1.1 parameters (see `worker::fastcgi`). The app is php-fpm
    /// started for the pool (--php-fpm), a COMMAND started like a proxy
    /// pool's (`-- php-cgi -b $SOCKET`), or one already running
    /// (--connect).
    ///
    /// Example: fastcgi --root /srv/www --php-fpm --children 8
    Fastcgi {
        /// The document root: a request's script is ROOT + its path.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The script a path naming a directory runs.
        #[arg(long, default_value = "index.php", value_name = "FILE")]
        index: String,
        /// The script a path that names no script runs (a front
        /// controller: nginx's `try_files $uri $uri/ /index.php`); without
        /// it such a path is 404.
        #[arg(long, value_name = "PATH")]
        front_controller: Option<String>,
        /// Start php-fpm for this pool, with a configuration of its own:
        /// --children processes on a Unix socket, logging to the
        /// dispatcher's log.
        #[arg(long)]
        php_fpm: bool,
        /// php-fpm's program; default `php-fpm` or the newest php-fpmX.Y
        /// in PATH, /usr/sbin or /usr/local/sbin.
        #[arg(long, value_name = "PROGRAM", requires = "php_fpm")]
        php_fpm_program: Option<PathBuf>,
        /// php-fpm's children (`pm = static`): the scripts run at once.
        #[arg(long, default_value_t = 8, value_name = "N")]
        children: usize,
        /// A php.ini setting for php-fpm's scripts (`php_admin_value`),
        /// e.g. `memory_limit=256M`; repeatable.
        #[arg(long = "php-ini", value_name = "NAME=VALUE", value_parser = name_value)]
        php_ini: Vec<(String, String)>,
        /// A FastCGI app already listening: unix:PATH or [tcp:]IP:PORT
        /// (e.g. unix:/run/php/php8.2-fpm.sock).
        #[arg(long, value_name = "ADDR", conflicts_with = "php_fpm")]
        connect: Option<worker::app::Addr>,
        /// Where a COMMAND listens: `unix` (a path in SOCKET and for
        /// `$SOCKET`), `port` (PORT, `$PORT`) or `fds` (fd 3).
        #[arg(long, value_enum, default_value = "unix")]
        socket: SocketArg,
        /// Seconds a started app may take to accept its first connection.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        start_timeout: u64,
        /// Connections to the app at most (requests beyond wait); default
        /// php-fpm's --children (never more), else 16.
        #[arg(long, value_name = "N")]
        max_connections: Option<usize>,
        /// Keep connections to a COMMAND or --connect app open between
        /// requests (FCGI_KEEP_CONN). Only when it has at least
        /// --max-connections processes: each holds its connection while it
        /// is open. Always on with --php-fpm.
        #[arg(long)]
        keep_conn: bool,
        /// A parameter every request gets (after the CGI ones, so it can
        /// replace one), e.g. `APP_ENV=production`; repeatable.
        #[arg(long = "param", value_name = "NAME=VALUE", value_parser = name_value)]
        params: Vec<(String, String)>,
        /// The app's program and arguments (`php-cgi -b $SOCKET`).
        #[arg(trailing_var_arg = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

fn name_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, v)) if !n.is_empty() => Ok((n.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

impl SocketArg {
    fn socket(self) -> worker::app::Socket {
        match self {
            SocketArg::Port => worker::app::Socket::Port,
            SocketArg::Fds => worker::app::Socket::Fds,
            SocketArg::Unix => worker::app::Socket::Unix,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum SocketArg {
    Port,
    Fds,
    Unix,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let rt = match runtime_threads(&cli.mode) {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        // The pull loop stays on this thread (`block_on`), the forwarding
        // runs on the others: spawning it onto them too measured a few
        // percent less.
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    rt.block_on(run(cli))
}

/// Threads the worker's runtime gets. A proxy pool's worker shares the
/// cores with its app: on one thread it was preempted by gunicorn's
/// threads 0.3 times per request (nginx's workers 0.02), and two threads
/// got a tenth more through, for a quarter more of the worker's own CPU
/// per request (docs/design.md, "Proxy pools"). The built-in handlers
/// answer in microseconds and are fastest on one (a web garden scales them).
fn runtime_threads(mode: &Mode) -> usize {
    match mode {
        Mode::Proxy { threads: Some(n), .. } => usize::from(*n),
        Mode::Proxy { threads: None, .. } => std::thread::available_parallelism().map_or(1, |n| n.get()),
        _ => 1,
    }
}

/// What answers the requests, made once from the mode.
#[derive(Clone)]
enum Handler {
    Echo,
    Static(Arc<StaticFiles>),
}

impl Handler {
    fn new(mode: &Mode) -> Result<Handler> {
        Ok(match mode {
            Mode::Proxy { .. } | Mode::Fastcgi { .. } => unreachable!("served by worker::proxy and worker::fastcgi"),
            Mode::Echo => Handler::Echo,
            Mode::Static { dir, cache_control } => Handler::Static(Arc::new(
                StaticFiles::new(dir, cache_control.clone())
                    .with_context(|| format!("static root {}", dir.display()))?,
            )),
        })
    }
}

async fn handle(h: Handler, req: Request) -> Response {
    match h {
        Handler::Echo => {
            // A slow application, for tests and benchmarks.
            if let Some(ms) = segment_after(req.path(), "/delay/") {
                tokio::time::sleep(std::time::Duration::from_millis(ms.min(MAX_DELAY_MS))).await;
            }
            echo(&req)
        }
        Handler::Static(files) => files.serve(&req),
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Mode::Proxy { socket, start_timeout, max_connections, tunnel_idle_timeout, command, .. } = &cli.mode {
        anyhow::ensure!(cli.listen.is_none(), "--listen: a proxy pool's app has its own port");
        let app = worker::proxy::App {
            command: command.clone(),
            socket: socket.socket(),
            start_timeout: std::time::Duration::from_secs(*start_timeout),
            max_connections: *max_connections,
            tunnel_idle: (*tunnel_idle_timeout > 0).then(|| std::time::Duration::from_secs(*tunnel_idle_timeout)),
        };
        worker::proxy::run(app).await?;
        return Ok(());
    }
    if let Mode::Fastcgi {
        root,
        index,
        front_controller,
        php_fpm,
        php_fpm_program,
        children,
        php_ini,
        connect,
        socket,
        start_timeout,
        max_connections,
        keep_conn,
        params,
        command,
    } = &cli.mode
    {
        use worker::fastcgi::{cgi::Site, php_fpm::PhpFpm, Backend, FastCgi};
        anyhow::ensure!(cli.listen.is_none(), "--listen: a FastCGI pool is served from the dispatcher only");
        let backend = match (*php_fpm, connect, command.is_empty()) {
            (true, None, true) => {
                Backend::PhpFpm(PhpFpm { program: php_fpm_program.clone(), children: *children, ini: php_ini.clone() })
            }
            (false, Some(a), true) => Backend::Connect(a.clone()),
            (false, None, false) => Backend::Command { command: command.clone(), socket: socket.socket() },
            (false, None, true) => anyhow::bail!("fastcgi: say which app: --php-fpm, --connect ADDR or -- COMMAND"),
            _ => anyhow::bail!("fastcgi: --php-fpm, --connect and a COMMAND exclude each other"),
        };
        anyhow::ensure!(
            php_ini.is_empty() || matches!(backend, Backend::PhpFpm(_)),
            "fastcgi: --php-ini is for --php-fpm (another app has its own php.ini)"
        );
        let site = Site::new(root, index.clone(), front_controller.clone(), params.clone())
            .with_context(|| format!("fastcgi --root {}", root.display()))?;
        let cfg = FastCgi {
            site,
            backend,
            start_timeout: std::time::Duration::from_secs(*start_timeout),
            max_connections: *max_connections,
            keep_conn: *keep_conn,
        };
        worker::fastcgi::run(cfg).await?;
        return Ok(());
    }
    if let Some(addr) = cli.listen {
        tracing::info!(%addr, pid = std::process::id(), "serving standalone");
        let h = Handler::new(&cli.mode)?;
        worker::standalone::serve(addr, move |req| handle(h.clone(), req)).await?;
        return Ok(());
    }
    let handler = Handler::new(&cli.mode)?;
    let mut w = Worker::from_env()?;
    let pid = std::process::id();
    let mode_name = match &cli.mode {
        Mode::Proxy { .. } | Mode::Fastcgi { .. } => unreachable!("handled above"),
        Mode::Echo => "echo".to_string(),
        Mode::Static { dir, .. } => format!("static {}", dir.display()),
    };
    tracing::info!(pool = w.pool(), mode = %mode_name, pid, "worker ready");
    let pool = w.pool().to_string();
    let responder = w.responder();
    // Requests being handled; an idle exit waits for them.
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // SIGTERM: stop pulling, finish what was taken, exit cleanly.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut terminated = false;
    loop {
        let got = tokio::select! {
            r = w.receive() => r,
            _ = sigterm.recv() => {
                tracing::info!(pool = %pool, pid, "SIGTERM; finishing the requests taken");
                terminated = true;
                w.stop_pulling();
                continue;
            }
        };
        let req = match got {
            Ok(r) => r,
            Err(worker::Error::Closed) => return Ok(()),
            Err(e @ (worker::Error::Idle | worker::Error::Recycle)) => {
                // Let the handlers in flight answer first.
                while busy.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                match terminated {
                    true => tracing::info!(pool = %pool, pid, "stopped; exiting"),
                    false => tracing::info!(pool = %pool, pid, "{e}; exiting"),
                }
                w.finish().await;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let handler = handler.clone();
        let responder = responder.clone();
        let pool = pool.clone();
        let tag = cli.pool_header;
        let busy = busy.clone();
        busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let mut resp = handle(handler, req.clone()).await;
            if tag {
                resp = resp.header("X-Dispatcher-Pool", pool).header("X-Dispatcher-Worker", pid.to_string());
            }
            let _ = responder.respond(&req, resp).await;
            busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

/// Longest `/delay/MS` wait.
const MAX_DELAY_MS: u64 = 60_000;

/// The number in `path` right after `marker` (`/delay/250/x` → 250).
fn segment_after(path: &str, marker: &str) -> Option<u64> {
    let (_, rest) = path.split_once(marker)?;
    rest.split('/').next()?.parse().ok()
}

/// Largest `/bytes/N` answer.
const MAX_SIZED_REPLY: usize = 64 << 20;

fn echo(req: &Request) -> Response {
    if let Some(n) = req.path().rsplit_once("/bytes/").and_then(|(_, n)| n.parse::<usize>().ok()) {
        if n > MAX_SIZED_REPLY {
            return Response::text(413, "at most 64 MiB\n");
        }
        return Response::new(200).header("Content-Type", "application/octet-stream").body(vec![b'x'; n]);
    }
    let mut body = Vec::with_capacity(req.raw_head.len() + req.body.len());
    body.extend_from_slice(&req.raw_head);
    body.extend_from_slice(&req.body);
    Response::new(200)
        .header("Content-Type", "application/octet-stream")
        .header("X-Echo-Method", req.method.clone())
        .header("X-Echo-Path", req.path().to_string())
        .header("X-Echo-Host", req.host().unwrap_or("").to_string())
        .header("X-Echo-Body-Length", req.body.len().to_string())
        .body(body)
}
