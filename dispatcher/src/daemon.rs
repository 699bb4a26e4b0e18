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

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;

use crate::{
    access_log::AccessLog,
    admin,
    bpf::Kernel,
    config::{ConfigSource, RUN_DIR},
    conn::{self, LocalAnswers, Parking},
    deliver::Conns,
    pool::{self, Registry},
};

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

    let (kernel, maps) = Kernel::load(&cfg)?;
    tracing::info!(pins = %kernel.pin_dir().display(), "BPF programs loaded and attached");

    // Each part is handed what it uses (see main.rs for the layers).
    let conns = Arc::new(Conns::default());
    let parking = Parking::start(conns.clone()).context("making the parked connections' epoll set")?;
    let access_log = match &cfg.access_log {
        Some(p) => Some(AccessLog::open(p, cfg.access_log_max_bytes)?),
        None => None,
    };
    let counters = Arc::new(maps.counters);
    let pools = Arc::new(Registry::new(
        run_dir.clone(),
        pool::registry::Parts {
            ctx: Arc::new(pool::Context {
                rings: Mutex::new(maps.rings),
                conns: conns.clone(),
                access_log: access_log.clone(),
                leases: cfg.direct_responses,
                listen: cfg.listen,
            }),
            counters: counters.clone(),
            routes: maps.routes,
            guard: Arc::new(Mutex::new(maps.guard)),
            source,
            config: cfg.clone(),
        },
    ));
    let local = Arc::new(LocalAnswers::default());
    let conn_table = Arc::new(maps.conns);
    conns.set_pauser(crate::deliver::Pauser {
        table: conn_table.clone(),
        max_bytes: cfg.max_pending_bytes,
        max_frames: 4 * cfg.max_pipelined,
    });
    let timeouts = Arc::new(conn::Timeouts::default());
    let splice = maps.tunnels.map(|t| Arc::new(crate::splice::Splicer::new(t, conn_table.clone())));
    let conn_ctx = Arc::new(conn::Context {
        limits: conn::Limits::of(&cfg),
        conn_state: conn_table.clone(),
        routes: maps.lookup,
        counters: counters.clone(),
        pools: pools.clone(),
        conns: conns.clone(),
        parking,
        access_log: access_log.clone(),
        local: local.clone(),
        timeouts: timeouts.clone(),
        splice: splice.clone(),
    });
    let admin_ctx = Arc::new(admin::Context {
        instance: cfg.instance.clone(),
        listen: cfg.listen,
        started: std::time::Instant::now(),
        pin_dir: kernel.pin_dir().to_path_buf(),
        attached: maps.attached,
        pools: pools.clone(),
        counters,
        conns: conns.clone(),
        local,
        timeouts,
    });

    let started = pools.apply(&cfg).await;
    let listener = started.and_then(|_| listen(cfg.listen).with_context(|| format!("listening on {}", cfg.listen)));
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            pools.stop_all().await;
            return Err(e);
        }
    };
    watch_events(maps.events, conns.clone(), pools.clone(), splice)?;
    admin::control::listen(&run_dir, admin_ctx.clone())?;
    if let Some(addr) = cfg.metrics {
        admin::metrics::listen(addr, admin_ctx).await?;
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
                let cookie = match crate::tcp::socket_cookie(stream.as_raw_fd()) {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!("SO_COOKIE: {e}"); continue; }
                };
                if access_log.is_some() {
                    conns.set_peer(cookie, peer);
                }
                let (rx, backlog) = conns.register(cookie);
                tokio::spawn(conn::serve(conn_ctx.clone(), stream, cookie, rx, backlog));
            }
            _ = expire.tick() => conns.expire(),
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; shutting down"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM; shutting down"); break; }
            _ = sighup.recv() => {
                tracing::info!(config = %pools.source(), "SIGHUP; reloading the configuration");
                let pools = pools.clone();
                tokio::spawn(async move { let _ = pools.reload().await; });
            }
        }
    }
    drop(listener);
    // In-flight requests get `drain_secs` to finish; the workers still
    // running then are killed (each Child is kill-on-drop) as the
    // process exits.
    let drain = Duration::from_secs(cfg.drain_secs);
    if tokio::time::timeout(drain, pools.stop_all()).await.is_err() {
        tracing::warn!(
            drain_secs = cfg.drain_secs,
            "in-flight requests did not finish within the drain limit; killing the workers"
        );
    }
    // Connection tasks still hold the maps, so remove the pins explicitly;
    // the programs detach when this process's fds close.
    kernel.unpin();

    Ok(())
}

/// Wakes the connection of each cookie the verdict program puts on the
/// `events` ring, and the supervisor of each slot it raises a demand on.
fn watch_events(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    conns: Arc<Conns>,
    pools: Arc<Registry>,
    splice: Option<Arc<crate::splice::Splicer>>,
) -> Result<()> {
    use dispatcher_ebpf::abi::{Event, EVENT_DEMAND, EVENT_HANDOFF, EVENT_TUNNEL, EVENT_WRITE_REFUSED};
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
                    EVENT_WRITE_REFUSED => conns.write_refused(e.cookie, e.ring),
                    EVENT_TUNNEL => {
                        if let Some(s) = &splice {
                            s.wake(e.cookie);
                        }
                    }
                    EVENT_DEMAND => {
                        let ring = e.ring as usize;
                        if let Some(p) = pools.for_ring(ring) {
                            p.slots[ring - p.first_ring].signals.demand.notify_one();
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
