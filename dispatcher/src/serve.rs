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
use tokio::{net::TcpListener, sync::watch};

use crate::{
    config::Config,
    conns::Conns,
    connection,
    control,
    kernel::Kernel,
    parking::Parking,
    pools::{self, PoolLink},
};

/// Run-time state directory (instance lock, pool names, demo files).
pub const RUN_DIR: &str = "/run/dispatcher";

/// What every connection task shares.
pub struct Shared {
    pub cfg: Config,
    pub kernel: Mutex<Kernel>,
    pub conns: Arc<Conns>,
    pub pools: Vec<Arc<PoolLink>>,
    /// Where leased connections wait (out of tokio's poller).
    pub parking: Arc<Parking>,
}

/// The demo site built into the binary (`@demo-static` in the demo config).
const DEMO_FILES: &[(&str, &[u8])] = &[
    ("index.html", include_bytes!("../../demo/static/index.html")),
    ("style.css", include_bytes!("../../demo/static/style.css")),
];

pub async fn serve(cfg: Config) -> Result<()> {
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
    fs::write(run_dir.join("pools"), cfg.pools.iter().map(|p| format!("{}\n", p.name)).collect::<String>())?;

    let listener = listen(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;

    let conns = Arc::new(Conns::default());
    let pools: Vec<Arc<PoolLink>> =
        cfg.pools.iter().enumerate().map(|(i, p)| Arc::new(PoolLink::new(p, cfg.first_slot(i)))).collect();
    let parking = Parking::start(conns.clone()).context("making the parked connections' epoll set")?;
    watch_events(events, conns.clone(), pools.clone())?;
    let shared = Arc::new(Shared { cfg: cfg.clone(), kernel: Mutex::new(kernel), conns: conns.clone(), pools, parking });
    control::listen(&run_dir, shared.clone())?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let shutdown_limit = Duration::from_secs(cfg.pools.iter().map(|p| p.shutdown_time_limit_secs).max().unwrap_or(0));
    let mut supervisors = Vec::new();
    for (i, p) in cfg.pools.iter().enumerate() {
        let command = resolve_command(&p.command, &cfg.base_dir)?;
        let args = p
            .args
            .iter()
            .map(|a| {
                if a == "@demo-static" {
                    materialize_demo(&run_dir).map(|d| d.display().to_string())
                } else {
                    Ok(a.clone())
                }
            })
            .collect::<Result<Vec<_>>>()?;
        for local in 0..p.max_processes as usize {
            supervisors.push(pools::supervise(i, local, shared.clone(), p, command.clone(), args.clone(), stop_rx.clone()));
        }
    }

    tracing::info!(listen = %cfg.listen, pools = cfg.pools.len(), "dispatcher ready");
    println!("dispatcher listening on http://{} (instance `{}`, {} pools); Ctrl-C to stop", cfg.listen, cfg.instance, cfg.pools.len());
    let _ = std::io::stdout().flush();

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut expire = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, _) = match r {
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
                let rx = shared.conns.register(cookie);
                tokio::spawn(connection::serve(shared.clone(), stream, cookie, rx));
            }
            _ = expire.tick() => shared.conns.expire(),
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; shutting down"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM; shutting down"); break; }
        }
    }
    let _ = stop_tx.send(true);
    for s in supervisors {
        let _ = tokio::time::timeout(shutdown_limit + Duration::from_secs(1), s).await;
    }
    drop(listener);
    // Connection tasks still hold the shared state, so remove the pins
    // explicitly; the programs detach when this process's fds close.
    shared.kernel.lock().unwrap_or_else(|e| e.into_inner()).unpin();

    Ok(())
}

/// Wakes the connection of each cookie the verdict program puts on the
/// `handoff_events` ring.
fn watch_events(ring: aya::maps::RingBuf<aya::maps::MapData>, conns: Arc<Conns>, pools: Vec<Arc<PoolLink>>) -> Result<()> {
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
                    EVENT_HANDOFF => conns.wake(e.cookie),
                    EVENT_DEMAND => {
                        let slot = e.slot as usize;
                        if let Some(p) = pools.iter().find(|p| (p.first_slot..p.first_slot + p.slots.len()).contains(&slot)) {
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
    let r = unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, &mut v as *mut u64 as *mut _, &mut len) };
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
    let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an open file.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("instance `{instance}` is already running (lock {} is held); stop it or choose another `instance`", path.display());
    }
    Ok(f)
}

/// Finds a worker command: a path is taken relative to the config's
/// directory; a bare name is looked for next to this binary, then in PATH.
fn resolve_command(cmd: &str, base: &Path) -> Result<PathBuf> {
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

fn materialize_demo(run_dir: &Path) -> Result<PathBuf> {
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
