//! Process manager for worker pools: the WAS part of dispatcher.
//!
//! A pool's worker is started with its queue handles (the pool's ring fd
//! and a control socket) at fixed fd numbers named in its environment, as
//! an unprivileged user when the dispatcher runs as root, and restarted
//! with a growing back-off when it exits. The caller makes fresh handles
//! for each start (a control socket cannot be reused across workers).
//!
//! [`supervise`] runs one worker slot the way WAS runs an application
//! pool: on-demand or always-running start, idle time-out (the worker exits
//! cleanly by itself), restart with back-off after a crash, and rapid-fail
//! protection. Requests queued while a slot has no worker stay on its ring
//! and are served by the next worker.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{process::Command, sync::watch};

/// The launch contract (env names, fd numbers, handles) lives with the
/// rest of the dispatcher–worker contract; these paths stay for callers.
pub use dispatcher_ebpf::launch::{env, Handles, AWAKE_FD, CTL_FD, LEASE_FD, PROGRESS_FD, RING_FD};

/// First restart delay; doubles per quick exit up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest restart delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long resets the back-off.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// How to start one pool's worker.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub pool: String,
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run as this user (name) when started by root; ignored otherwise.
    pub user: Option<String>,
    /// Run as this group (name) instead of the user's primary group.
    pub group: Option<String>,
}

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pool `{pool}`: user `{user}` does not exist")]
    NoSuchUser { pool: String, user: String },
    #[error("pool `{pool}`: group `{group}` does not exist")]
    NoSuchGroup { pool: String, group: String },
    #[error("pool `{pool}`: starting `{command}`: {source}")]
    Spawn { pool: String, command: String, source: std::io::Error },
    #[error("pool `{pool}`: making the worker's handles: {source}")]
    Handles {
        pool: String,
        #[source]
        source: anyhow::Error,
    },
    /// The operator stopped the pool while a start was pending.
    #[error("stopped by the operator")]
    Halted,
}

struct Ids {
    uid: u32,
    gid: u32,
}

fn lookup_user(name: &str) -> Option<Ids> {
    let u = nix::unistd::User::from_name(name).ok().flatten()?;
    Some(Ids { uid: u.uid.as_raw(), gid: u.gid.as_raw() })
}

/// Starts one worker process with `handles`.
pub fn spawn(spec: &WorkerSpec, handles: Handles) -> Result<tokio::process::Child, Error> {
    let mut ids = match (&spec.user, nix::unistd::geteuid().is_root()) {
        (Some(u), true) => {
            Some(lookup_user(u).ok_or_else(|| Error::NoSuchUser { pool: spec.pool.clone(), user: u.clone() })?)
        }
        _ => None,
    };
    if let (Some(ids), Some(g)) = (ids.as_mut(), &spec.group) {
        let grp = nix::unistd::Group::from_name(g).ok().flatten();
        ids.gid = grp.ok_or_else(|| Error::NoSuchGroup { pool: spec.pool.clone(), group: g.clone() })?.gid.as_raw();
    }
    let mut cmd = Command::new(&spec.command);
    cmd.args(&spec.args)
        .env(env::POOL, &spec.pool)
        .env(env::CTL_FD, CTL_FD.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if handles.ring.is_some() {
        cmd.env(env::RING_FD, RING_FD.to_string());
    } else {
        cmd.env_remove(env::RING_FD);
    }
    for (present, var, fd) in [
        (handles.lease.is_some(), env::LEASE_FD, LEASE_FD),
        (handles.awake.is_some(), env::AWAKE_FD, AWAKE_FD),
        (handles.progress.is_some(), env::PROGRESS_FD, PROGRESS_FD),
    ] {
        if present {
            cmd.env(var, fd.to_string());
        } else {
            cmd.env_remove(var);
        }
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    // (handle, fixed number) pairs; -1: absent. A plain array: nothing
    // may allocate between fork and exec.
    let raw = |f: &Option<OwnedFd>| f.as_ref().map_or(-1, |f| f.as_raw_fd());
    let moves: [(i32, i32); 5] = [
        (raw(&handles.ring), RING_FD),
        (handles.ctl.as_raw_fd(), CTL_FD),
        (raw(&handles.lease), LEASE_FD),
        (raw(&handles.awake), AWAKE_FD),
        (raw(&handles.progress), PROGRESS_FD),
    ];
    let user = spec.user.as_ref().map(|u| CString::new(u.as_str()).unwrap_or_default());
    // SAFETY: only async-signal-safe calls (dup2, fcntl, setgroups,
    // setgid, setuid, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Move the handles to their fixed numbers; dup2 clears CLOEXEC.
            // All go to scratch numbers first, so that no dup2 overwrites
            // a handle still to be moved.
            let mut scratch = [-1i32; 5];
            for (i, (fd, _)) in moves.iter().enumerate() {
                if *fd >= 0 {
                    scratch[i] = libc::fcntl(*fd, libc::F_DUPFD, 64);
                    if scratch[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            for (i, (_, target)) in moves.iter().enumerate() {
                if scratch[i] >= 0 {
                    if libc::dup2(scratch[i], *target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(scratch[i]);
                }
            }
            // Its own process group: a Ctrl-C at the terminal reaches the
            // dispatcher, which then stops the workers in order.
            libc::setpgid(0, 0);
            // Die with the dispatcher rather than outlive it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if let (Some(ids), Some(user)) = (&ids, &user) {
                if libc::initgroups(user.as_ptr(), ids.gid) != 0
                    || libc::setgid(ids.gid) != 0
                    || libc::setuid(ids.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        pool: spec.pool.clone(),
        command: spec.command.display().to_string(),
        source,
    })?;
    // The child has its copies; ours close when `handles` drops here.
    drop(handles);
    Ok(child)
}

/// When a pool's worker starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// At the first request (the kernel raises a demand event), and again
    /// at the first request after the worker idled out or crashed.
    OnDemand,
    /// At once, and again whenever it exits.
    AlwaysRunning,
}

/// How a pool's worker is run (WAS's application-pool settings).
#[derive(Clone, Debug)]
pub struct Policy {
    pub start: StartMode,
    /// Passed to the worker, which exits cleanly after this long without a
    /// request (on-demand pools only).
    pub idle_timeout: Option<Duration>,
    /// Rapid-fail protection: this many crashes within the interval stop
    /// the pool until it is started again.
    pub rapid_fail: Option<(u32, Duration)>,
    /// Health check: every `.0`, look at the worker's queue; a worker that
    /// took nothing from a non-empty queue for `.1` is killed and replaced.
    pub ping: Option<(Duration, Duration)>,
    /// A worker that has not started pulling requests after this long is
    /// killed (and counts as a crash).
    pub startup_limit: Duration,
    /// Time a worker gets between SIGTERM and SIGKILL when it is stopped.
    pub shutdown_limit: Duration,
    /// Recycling: the worker stops after this many requests (it counts
    /// them itself)...
    pub recycle_requests: Option<u64>,
    /// ...or is asked to stop (SIGTERM: it finishes what it took) after
    /// this long, or once its private memory passes this many KiB. The
    /// next worker starts as soon as the old one stops pulling (it marks
    /// its slot workerless), while the old one still answers what it took
    /// (overlapped recycling); requests wait on the ring meanwhile, none
    /// is lost.
    pub recycle_interval: Option<Duration>,
    pub recycle_private_kib: Option<u64>,
}

/// Private (anonymous) resident memory of `pid`, KiB.
fn private_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("RssAnon:"))?.split_whitespace().next()?.parse().ok()
}

/// What a supervisor sees of its worker's queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The worker has started pulling (it changed the slot's awake flag).
    pub ready: bool,
    /// How far the worker has consumed its ring (bytes).
    pub consumed: u64,
    /// Requests are waiting on the ring.
    pub queued: bool,
}

/// The dispatcher's side of one worker slot, as the supervisor needs it.
pub trait Slot: Send + 'static {
    /// Fresh handles for a new worker.
    fn handles(&mut self) -> anyhow::Result<Handles>;
    /// The slot has no worker from now on: requests queued later raise a
    /// demand. Returns whether requests are waiting already.
    fn vacate(&mut self) -> bool;
    /// Rapid-fail protection stopped the pool (`true`) or it was started
    /// again (`false`).
    fn stopped(&mut self, stopped: bool, why: &str);
    /// The worker's progress on its queue.
    fn progress(&mut self) -> Progress;
    /// Worker `pid` was started on the slot.
    fn started(&mut self, _pid: u32) {}
    /// A new supervisor took over running worker `pid` (see `supervise`).
    fn adopted(&mut self, _pid: u32) {}
    /// The slot's worker is gone (`crashed`: not a clean exit).
    fn exited(&mut self, _crashed: bool) {}
}

/// How often a workerless slot looks at its ring anyway.
const DEMAND_RECHECK: Duration = Duration::from_secs(1);

/// Granularity of the start-up check when pings are off.
const STARTUP_CHECK: Duration = Duration::from_millis(500);

/// What wakes a supervisor besides its worker exiting.
#[derive(Clone, Default)]
pub struct Signals {
    /// A request was queued on the slot while it had no worker.
    pub demand: std::sync::Arc<tokio::sync::Notify>,
    /// An operator asked to start the (stopped) pool again: the count of
    /// such requests, and its wake-up.
    pub start: std::sync::Arc<tokio::sync::Notify>,
    pub start_requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Fault injection for tests: the supervisor panics when this is
    /// notified while it watches a worker (the dispatcher wires it up only
    /// with `DISPATCHER_FAULTS=1`).
    pub fault: std::sync::Arc<tokio::sync::Notify>,
    /// Operator requests, counted (shared by a pool's slots): stop the
    /// pool (its requests get 503 until a start), recycle its workers.
    /// `ops` wakes the supervisors to look at the counts.
    pub halt_requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The start count when the last stop was asked for: a start asked
    /// for after it (even before a supervisor saw the stop) starts the
    /// pool again.
    pub halt_start_mark: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub recycle_requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub ops: std::sync::Arc<tokio::sync::Notify>,
}

impl Signals {
    fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs `spec`'s worker per `policy` until `stop` turns true: starts it
/// (at once or on demand), restarts it when it crashes (with back-off),
/// lets it idle out, stops the pool when it crashes too often, and stops
/// the worker (SIGTERM, then SIGKILL) at shutdown.
///
/// A panic in the supervisor (a bug in activation) stops neither the
/// worker nor the dispatcher: the worker keeps serving, and a new
/// supervisor takes it over (adopts the running process) after a short
/// pause, with fresh health and crash counts.
pub async fn supervise<S: Slot + Clone>(
    mut spec: WorkerSpec,
    policy: Policy,
    slot: S,
    signals: Signals,
    stop: watch::Receiver<bool>,
) {
    if let (StartMode::OnDemand, Some(t)) = (policy.start, policy.idle_timeout) {
        spec.env.push((env::IDLE_TIMEOUT_SECS.into(), t.as_secs().max(1).to_string()));
    }
    if let Some(n) = policy.recycle_requests {
        spec.env.push((env::RECYCLE_REQUESTS.into(), n.to_string()));
    }
    // The running worker outlives a supervisor that panics.
    let current: std::sync::Arc<tokio::sync::Mutex<Option<Running>>> = Default::default();
    loop {
        let run = tokio::spawn(run(
            spec.clone(),
            policy.clone(),
            slot.clone(),
            signals.clone(),
            stop.clone(),
            current.clone(),
        ));
        match run.await {
            Err(e) if e.is_panic() && !*stop.borrow() => {
                let pid = current.try_lock().ok().and_then(|c| c.as_ref().map(|r| r.pid));
                tracing::error!(pool = %spec.pool, worker = ?pid, "the supervisor panicked; its worker keeps serving; restarting the supervisor");
                tokio::time::sleep(MIN_BACKOFF).await;
            }
            _ => return,
        }
    }
}

/// A worker process a supervisor watches.
struct Running {
    child: tokio::process::Child,
    pid: u32,
    started: Instant,
    /// The ring's consumer position when it started.
    start_consumed: u64,
}

async fn run(
    spec: WorkerSpec,
    policy: Policy,
    mut slot: impl Slot,
    signals: Signals,
    mut stop: watch::Receiver<bool>,
    current: std::sync::Arc<tokio::sync::Mutex<Option<Running>>>,
) {
    let mut current = current.lock_owned().await;
    // Operator stops asked for before this supervisor ran are not its.
    let mut halts = Signals::count(&signals.halt_requests);
    let mut backoff = MIN_BACKOFF;
    let mut crashes: std::collections::VecDeque<Instant> = Default::default();
    // Workers that stopped pulling and are finishing what they took.
    let mut draining: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    loop {
        draining.retain(|d| !d.is_finished());
        if let Some(r) = current.as_mut() {
            if !matches!(r.child.try_wait(), Ok(None)) {
                *current = None;
            }
        }
        if *stop.borrow() {
            if let Some(r) = current.as_mut() {
                terminate(&mut r.child, r.pid, policy.shutdown_limit).await;
            }
            return finish_draining(draining).await;
        }
        if Signals::count(&signals.halt_requests) != halts {
            halts = Signals::count(&signals.halt_requests);
            let asked = Signals::count(&signals.halt_start_mark);
            let why = format!("stopped by the operator; `dispatcher start {}` starts it again", spec.pool);
            tracing::warn!(pool = %spec.pool, "pool stopped: {why}");
            // The worker first (it may be reading its ring), then the
            // slot is stopped and what is left on the ring answered 503.
            if let Some(r) = current.as_mut() {
                terminate(&mut r.child, r.pid, policy.shutdown_limit).await;
                *current = None;
                slot.exited(false);
            }
            if !stay_stopped(&spec, &mut slot, &signals, &mut stop, &why, asked).await {
                return finish_draining(draining).await;
            }
            crashes.clear();
            backoff = MIN_BACKOFF;
            continue;
        }
        if let Some(r) = current.as_ref() {
            tracing::info!(pool = %spec.pool, pid = r.pid, "taking over the running worker");
            slot.adopted(r.pid);
        } else if let Err(crash) = start(&spec, &policy, &mut slot, &signals, &mut stop, &mut current, halts).await {
            match crash {
                None => return finish_draining(draining).await,
                // The operator stopped the pool: seen at the loop's top.
                Some(Error::Halted) => continue,
                // Counted as a crash below.
                Some(e) => tracing::error!("{e}"),
            }
        }
        let (crashed, started) = match current.as_mut() {
            None => (true, Instant::now()),
            Some(r) => {
                let Running { child, pid, started, start_consumed } = r;
                let (pid, started, start_consumed) = (*pid, *started, *start_consumed);
                let mut hand_off = false;
                // A fresh worker meets every recycle asked for before it.
                let mut recycles = Signals::count(&signals.recycle_requests);
                let mut tick = tokio::time::interval(policy.ping.map_or(STARTUP_CHECK, |p| p.0.min(STARTUP_CHECK)));
                let mut recycling: Option<Instant> = None;
                let mut ready = false;
                let mut last = None;
                let mut stuck_since: Option<Instant> = None;
                let crashed = loop {
                    // Operator requests, looked at after whatever woke us
                    // (`ops`, or at worst the tick), so none is missed.
                    if Signals::count(&signals.halt_requests) != halts {
                        // Handled at the loop's top, worker included.
                        break false;
                    }
                    if Signals::count(&signals.recycle_requests) != recycles && recycling.is_none() {
                        recycles = Signals::count(&signals.recycle_requests);
                        tracing::info!(pool = %spec.pool, pid, "recycling the worker: asked by the operator");
                        recycling = Some(Instant::now());
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    }
                    tokio::select! {
                        status = child.wait() => break match status {
                            Ok(s) if s.success() => {
                                tracing::info!(pool = %spec.pool, pid, "worker exited cleanly (idle, recycled or stopped)");
                                false
                            }
                            Ok(s) => {
                                tracing::warn!(pool = %spec.pool, pid, status = %s, "worker exited");
                                true
                            }
                            Err(e) => {
                                tracing::warn!(pool = %spec.pool, pid, "waiting for worker: {e}");
                                true
                            }
                        },
                        _ = stop.changed() => {
                            terminate(child, pid, policy.shutdown_limit).await;
                            return finish_draining(draining).await;
                        }
                        // A request met the slot marked workerless: if it
                        // is this worker that marked it, it stopped pulling.
                        _ = signals.demand.notified() => {
                            let p = slot.progress();
                            if (ready || p.consumed != start_consumed) && !p.ready {
                                hand_off = true;
                                break false;
                            }
                        }
                        _ = signals.fault.notified() => panic!("fault injected: supervisor of pool `{}` panics", spec.pool),
                        _ = signals.ops.notified() => {}
                        _ = tick.tick() => {
                            if recycling.is_some_and(|t| t.elapsed() >= policy.shutdown_limit) {
                                tracing::warn!(pool = %spec.pool, pid, "worker did not finish within the shutdown time limit; killing it");
                                let _ = child.kill().await;
                                break true;
                            }
                            let why = if recycling.is_some() {
                                None
                            } else if policy.recycle_interval.is_some_and(|t| started.elapsed() >= t) {
                                Some("its recycling interval passed".to_string())
                            } else {
                                policy.recycle_private_kib.and_then(|limit| {
                                    private_kib(pid).filter(|k| *k > limit).map(|k| format!("its private memory ({k} KiB) passed {limit} KiB"))
                                })
                            };
                            if let Some(why) = why {
                                tracing::info!(pool = %spec.pool, pid, "recycling the worker: {why}");
                                recycling = Some(Instant::now());
                                // SAFETY: signalling our own child.
                                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                            }
                            let p = slot.progress();
                            if (ready || p.consumed != start_consumed) && !p.ready {
                                // It stopped pulling (recycling, idle, or
                                // SIGTERM) and marked the slot workerless:
                                // its successor may start while it answers
                                // what it took.
                                hand_off = true;
                                break false;
                            }
                            if !ready {
                                ready = p.ready;
                                if !ready && started.elapsed() >= policy.startup_limit {
                                    tracing::warn!(pool = %spec.pool, pid, limit_s = policy.startup_limit.as_secs(), "worker did not start pulling requests in time; killing it");
                                    let _ = child.kill().await;
                                    break true;
                                }
                                continue;
                            }
                            // A recycling worker stops pulling on purpose.
                            let Some((_, limit)) = policy.ping.filter(|_| recycling.is_none()) else { continue };
                            if p.queued && last == Some(p.consumed) {
                                let since = *stuck_since.get_or_insert_with(Instant::now);
                                if since.elapsed() >= limit {
                                    tracing::warn!(pool = %spec.pool, pid, limit_s = limit.as_secs(), "worker stopped pulling its queue; killing it (its replacement serves the queue)");
                                    let _ = child.kill().await;
                                    break true;
                                }
                            } else {
                                stuck_since = None;
                            }
                            last = Some(p.consumed);
                        }
                    }
                };
                if Signals::count(&signals.halt_requests) != halts && !hand_off {
                    // Stopped at the loop's top (still running).
                    continue;
                }
                if hand_off {
                    let r = current.take().expect("a running worker");
                    draining.push(drain(r.child, r.pid, spec.pool.clone(), policy.shutdown_limit));
                } else {
                    *current = None;
                }
                slot.exited(crashed);
                (crashed, started)
            }
        };
        if *stop.borrow() {
            return finish_draining(draining).await;
        }
        if !crashed {
            backoff = MIN_BACKOFF;
            continue;
        }
        if let Some((max, within)) = policy.rapid_fail {
            let now = Instant::now();
            crashes.push_back(now);
            while crashes.front().is_some_and(|t| now.duration_since(*t) > within) {
                crashes.pop_front();
            }
            if crashes.len() as u32 >= max {
                let why = format!(
                    "{} crashes within {} s (rapid-fail protection); `dispatcher pool start {}` starts it again",
                    crashes.len(),
                    within.as_secs(),
                    spec.pool
                );
                tracing::error!(pool = %spec.pool, "pool stopped: {why}");
                let asked = Signals::count(&signals.start_requests);
                if !stay_stopped(&spec, &mut slot, &signals, &mut stop, &why, asked).await {
                    return finish_draining(draining).await;
                }
                crashes.clear();
                backoff = MIN_BACKOFF;
                continue;
            }
        }
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = MIN_BACKOFF;
        }
        tracing::info!(pool = %spec.pool, delay_ms = backoff.as_millis() as u64, "restarting worker");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return finish_draining(draining).await,
            // An operator stop is not kept waiting for the back-off.
            _ = signals.ops.notified() => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Marks the slot stopped for `why` (its pool's requests get 503), waits
/// until someone asks to start it again, that is until the start count
/// passes `asked` (its value when the stop was decided: a stale wake-up
/// from an earlier start does not count), and marks it running. False if
/// the supervisor is stopped meanwhile.
async fn stay_stopped(
    spec: &WorkerSpec,
    slot: &mut impl Slot,
    signals: &Signals,
    stop: &mut watch::Receiver<bool>,
    why: &str,
    asked: u64,
) -> bool {
    slot.stopped(true, why);
    while Signals::count(&signals.start_requests) == asked {
        tokio::select! {
            _ = signals.start.notified() => {}
            // The start signal wakes whoever waits at that moment; the
            // count is what really tells.
            _ = tokio::time::sleep(DEMAND_RECHECK) => {}
            _ = stop.changed() => return false,
        }
    }
    tracing::info!(pool = %spec.pool, "pool started again");
    slot.stopped(false, "");
    true
}

/// Starts a worker (once a request waits, on demand) into `current`.
/// `Err(None)`: stopped while waiting; `Err(Some(e))`: it could not start.
async fn start(
    spec: &WorkerSpec,
    policy: &Policy,
    slot: &mut impl Slot,
    signals: &Signals,
    stop: &mut watch::Receiver<bool>,
    current: &mut Option<Running>,
    halts: u64,
) -> Result<(), Option<Error>> {
    // On demand: start when a request waits. Either way the slot is
    // marked workerless until the new worker starts pulling, which is
    // how its start-up is seen.
    let waiting = slot.vacate();
    if policy.start == StartMode::OnDemand && !waiting {
        tracing::info!(pool = %spec.pool, "no worker; waiting for a request");
        loop {
            tokio::select! {
                _ = signals.demand.notified() => {}
                // A demand event lost to a full event ring costs at
                // most this long.
                _ = tokio::time::sleep(DEMAND_RECHECK) => {}
                _ = stop.changed() => return Err(None),
                _ = signals.ops.notified() => {}
            }
            if Signals::count(&signals.halt_requests) != halts {
                return Err(Some(Error::Halted));
            }
            // A demand left over from an earlier worker's time is
            // stale: only a request on the ring counts.
            if slot.vacate() {
                break;
            }
        }
    }
    let started = Instant::now();
    // A worker that consumed from the ring has started, even if it
    // stopped before a tick saw it pulling.
    let start_consumed = slot.progress().consumed;
    let child = slot
        .handles()
        .map_err(|source| Error::Handles { pool: spec.pool.clone(), source })
        .and_then(|h| spawn(&spec, h));
    let child = child.map_err(Some)?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(pool = %spec.pool, pid, "worker started");
    slot.started(pid);
    *current = Some(Running { child, pid, started, start_consumed });
    Ok(())
}

/// Waits for a worker that stopped pulling to finish what it took (and
/// exit), up to `limit`; then kills it.
fn drain(mut child: tokio::process::Child, pid: u32, pool: String, limit: Duration) -> tokio::task::JoinHandle<()> {
    tracing::info!(pool = %pool, pid, "worker stopped pulling; the next one may start while it finishes");
    tokio::spawn(async move {
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(s)) if s.success() => tracing::info!(pool = %pool, pid, "worker exited (finished)"),
            Ok(Ok(s)) => tracing::warn!(pool = %pool, pid, status = %s, "worker exited after it stopped pulling"),
            Ok(Err(e)) => tracing::warn!(pool = %pool, pid, "waiting for worker: {e}"),
            Err(_) => {
                tracing::warn!(pool = %pool, pid, "worker did not finish within the shutdown time limit; killing it");
                let _ = child.kill().await;
            }
        }
    })
}

/// Waits for the draining workers (each bounded by its shutdown limit).
async fn finish_draining(draining: Vec<tokio::task::JoinHandle<()>>) {
    for d in draining {
        let _ = d.await;
    }
}

async fn terminate(child: &mut tokio::process::Child, pid: u32, grace: Duration) {
    if pid != 0 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}
