//! `dispatcher serve`: load the programs, start the pools' workers, accept
//! connections, and clean up on Ctrl-C / SIGTERM.

use std::{
    fs,
    io::Write,
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::TcpListener;

use crate::{
    config::{Config, ConfigSource},
    connection,
    conns::Conns,
    control,
    kernel::Kernel,
    parking::Parking,
    registry::{self, Registry},
};

/// Run-time state directory (instance lock, pool names, demo files).
pub const RUN_DIR: &str = "/run/dispatcher";

/// What every connection task shares.
pub struct Shared {
    pub cfg: Config,
    pub kernel: Mutex<Kernel>,
    pub conns: Arc<Conns>,
    /// The running pools (see `registry`).
    pub pools: Registry,
    /// Where a reload reads the configuration again.
    pub source: ConfigSource,
    /// When it started serving.
    pub started: std::time::Instant,
    /// The access log, if one is kept.
    pub access_log: Option<crate::access_log::AccessLog>,
    /// Answers the dispatcher wrote itself, by status class (1xx..5xx).
    pub local_responses: [std::sync::atomic::AtomicU64; 5],
    /// Where leased connections wait (out of tokio's poller).
    pub parking: Arc<Parking>,
}

/// The demo site built into the binary (`@demo-static` in the demo config).
const DEMO_FILES: &[(&str, &[u8])] = &[
    ("index.html", include_bytes!("../../demo/static/index.html")),
    ("style.css", include_bytes!("../../demo/static/style.css")),
];

pub async fn serve(source: ConfigSource) -> Result<()> {
    let cfg = source.load()?;
    let run_dir = Path::new(RUN_DIR).join(&cfg.instance);
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    fs::set_permissions(RUN_DIR, fs::Permissions::from_mode(0o755)).ok();
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o755)).ok();
    let _lock = lock_instance(&run_dir, &cfg.instance)?;
    // Ours now (we hold the lock): removed however serve ends, a failed
    // start-up included.
    let _run_dir = RemoveOnDrop(run_dir.clone());

    let mut kernel = Kernel::load(&cfg)?;
    let events = kernel.take_events()?;
    tracing::info!(pins = %kernel.pin_dir().display(), "BPF programs loaded and attached");

    let conns = Arc::new(Conns::default());
    let parking = Parking::start(conns.clone()).context("making the parked connections' epoll set")?;
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        kernel: Mutex::new(kernel),
        conns: conns.clone(),
        pools: Registry::new(run_dir.clone()),
        source,
        parking,
        started: std::time::Instant::now(),
        access_log: match &cfg.access_log {
            Some(p) => Some(crate::access_log::AccessLog::open(p, cfg.access_log_max_bytes)?),
            None => None,
        },
        local_responses: Default::default(),
    });
    let started = registry::apply(&shared, &cfg).await;
    let listener = started.and_then(|_| listen(cfg.listen).with_context(|| format!("listening on {}", cfg.listen)));
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            stop_all(&shared).await;
            return Err(e);
        }
    };
    watch_events(events, shared.clone())?;
    control::listen(&run_dir, shared.clone())?;
    if let Some(addr) = cfg.metrics {
        crate::metrics::listen(addr, shared.clone()).await?;
    }

    tracing::info!(listen = %cfg.listen, pools = cfg.pools.len(), "dispatcher ready");
    println!(
        "dispatcher listening on http://{} (instance `{}`, {} pools); Ctrl-C to stop",
        cfg.listen,
        cfg.instance,
        cfg.pools.len()
    );
    let _ = std::io::stdout().flush();

    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut expire = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let cookie = match socket_cookie(&stream) {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!("SO_COOKIE: {e}"); continue; }
                };
                if shared.access_log.is_some() {
                    shared.conns.set_peer(cookie, peer);
                }
                let rx = shared.conns.register(cookie);
                tokio::spawn(connection::serve(shared.clone(), stream, cookie, rx));
            }
            _ = expire.tick() => shared.conns.expire(),
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; shutting down"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM; shutting down"); break; }
            _ = sighup.recv() => {
                tracing::info!(config = %shared.source, "SIGHUP; reloading the configuration");
                let shared = shared.clone();
                tokio::spawn(async move { let _ = reload(&shared).await; });
            }
        }
    }
    drop(listener);
    stop_all(&shared).await;
    // Connection tasks still hold the shared state, so remove the pins
    // explicitly; the programs detach when this process's fds close.
    shared.kernel.lock().unwrap_or_else(|e| e.into_inner()).unpin();

    Ok(())
}

/// Reads the configuration again and applies it (SIGHUP, `dispatcher
/// reload`); the answer says what changed, or why nothing did.
pub async fn reload(shared: &Arc<Shared>) -> Result<registry::Summary> {
    let r = match shared.source.load() {
        Ok(cfg) => registry::apply(shared, &cfg).await,
        Err(e) => Err(e.into()),
    };
    match &r {
        Ok(s) => tracing::info!("configuration reloaded: {s}"),
        Err(e) => tracing::error!("configuration not reloaded: {e:#}"),
    }
    r
}

/// Stops every pool's workers (all at once; each within its shutdown
/// time limit).
async fn stop_all(shared: &Shared) {
    let links = shared.pools.all();
    for l in &links {
        let _ = l.stop.send(true);
    }
    for l in &links {
        registry::stop_pool(l).await;
    }
}

/// Wakes the connection of each cookie the verdict program puts on the
/// `events` ring, and the supervisor of each slot it raises a demand on.
fn watch_events(ring: aya::maps::RingBuf<aya::maps::MapData>, shared: Arc<Shared>) -> Result<()> {
    use dispatcher_ebpf::abi::{Event, EVENT_DEMAND, EVENT_HANDOFF};
    // SAFETY: the AsyncFd owns the ring (and its fd) while registered.
    let mut ring = unsafe { tokio::io::unix::AsyncFd::register(ring) }.context("polling `events`")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut g) = ring.readable_mut().await else { return };
            let rb = g.get_inner_mut();
            while let Some(item) = rb.next() {
                if item.len() < std::mem::size_of::<Event>() {
                    continue;
                }
                // SAFETY: an Event-sized record; any bit pattern is valid.
                let e: Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
                match e.kind {
                    EVENT_HANDOFF => shared.conns.wake(e.cookie),
                    EVENT_DEMAND => {
                        let slot = e.slot as usize;
                        if let Some(p) = shared.pools.for_slot(slot) {
                            p.slots[slot - p.first_slot].signals.demand.notify_one();
                        }
                    }
                    _ => {}
                }
            }
            g.clear_ready();
        }
    });
    Ok(())
}

/// Pending connections the listening socket holds before `accept` (the
/// kernel caps it at `net.core.somaxconn`). std's default of 128 overflowed
/// under 4,096 connecting clients: SYNs dropped, retried a second later.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

fn socket_cookie(s: &tokio::net::TcpStream) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 with its size.
    let r = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, &mut v as *mut u64 as *mut _, &mut len)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Removes a directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Holds an exclusive lock for the instance: a second dispatcher with the
/// same instance name would fight over the same pins.
fn lock_instance(run_dir: &Path, instance: &str) -> Result<fs::File> {
    let path = run_dir.join("lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an open file.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "instance `{instance}` is already running (lock {} is held); stop it or choose another `instance`",
            path.display()
        );
    }
    Ok(f)
}

/// Finds a worker command: a path is taken relative to the config's
/// directory; a bare name is looked for next to this binary, then in PATH.
pub fn resolve_command(cmd: &str, base: &Path) -> Result<PathBuf> {
    if cmd.contains('/') {
        let p = base.join(cmd);
        if p.exists() {
            return Ok(p);
        }
        bail!("worker command `{cmd}` not found (looked at {})", p.display());
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        let p = dir.join(cmd);
        if p.exists() {
            return Ok(p);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(cmd);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(anyhow!("worker command `{cmd}` not found next to the dispatcher binary or in PATH"))
}

pub fn materialize_demo(run_dir: &Path) -> Result<PathBuf> {
    let dir = run_dir.join("demo-static");
    fs::create_dir_all(&dir)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    for (name, data) in DEMO_FILES {
        let p = dir.join(name);
        fs::write(&p, data)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
    }
    Ok(dir)
}
