//! The supervisor's driver: it waits for what the slot's [`State`] waits
//! for, turns what it sees (a worker's exit, a tick with the queue's
//! progress, a wake-up) into an [`Event`] for the slot's [`Machine`], and
//! carries out the [`Action`]s it answers with. What to do is decided
//! there; here is only how.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    sync::{watch, Mutex, OwnedMutexGuard},
    task::JoinHandle,
    time::Interval,
};

use crate::{
    env,
    policy::{Policy, StartMode},
    signals::Signals,
    slot::Slot,
    spawn::spawn,
    state::{Action, Event, Kill, Machine, Note, State, StopCause, Worker},
    Error, WorkerSpec, MIN_BACKOFF,
};

/// How often a workerless slot looks at its ring anyway.
const DEMAND_RECHECK: Duration = Duration::from_secs(1);

/// Granularity of the start-up check when pings are off.
const STARTUP_CHECK: Duration = Duration::from_millis(500);

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
    let current: Arc<Mutex<Option<Running>>> = Default::default();
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
                let pid = current.try_lock().ok().and_then(|c| c.as_ref().map(|r| r.worker.pid));
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
    worker: Worker,
}

/// One supervisor's run (until it ends or panics).
struct Driver<S> {
    spec: WorkerSpec,
    policy: Policy,
    slot: S,
    signals: Signals,
    stop: watch::Receiver<bool>,
    /// The dispatcher stops this supervisor (its stop changed, or its
    /// sender is gone).
    stopping: bool,
    machine: Machine,
    /// The worker, in the cell that outlives a panic.
    current: OwnedMutexGuard<Option<Running>>,
    /// The checks of the current worker (made with each worker).
    tick: Option<Interval>,
    /// Workers that stopped pulling and are finishing what they took.
    draining: Vec<JoinHandle<()>>,
}

async fn run(
    spec: WorkerSpec,
    policy: Policy,
    slot: impl Slot,
    signals: Signals,
    stop: watch::Receiver<bool>,
    current: Arc<Mutex<Option<Running>>>,
) {
    let mut current = current.lock_owned().await;
    // Operator stops asked for before this supervisor ran are not its.
    let machine = Machine::new(policy.clone(), &signals.requests(false), Instant::now());
    // A worker a panicked supervisor left, if it still runs.
    if current.as_mut().is_some_and(|r| !matches!(r.child.try_wait(), Ok(None))) {
        *current = None;
    }
    let mut d = Driver {
        spec,
        policy,
        slot,
        signals,
        stop,
        stopping: false,
        machine,
        current,
        tick: None,
        draining: Vec::new(),
    };
    if let Some(worker) = d.current.as_ref().map(|r| r.worker) {
        tracing::info!(pool = %d.spec.pool, pid = worker.pid, "taking over the running worker");
        d.slot.adopted(worker.pid);
        d.tick = Some(d.checks());
        d.feed(Event::Adopted(worker)).await;
    }
    while *d.machine.state() != State::ShutDown {
        d.draining.retain(|t| !t.is_finished());
        d.feed(Event::Look).await;
        if *d.machine.state() == State::ShutDown {
            break;
        }
        let event = d.wait().await;
        d.feed(event).await;
    }
    for t in d.draining {
        // Each bounded by its shutdown limit.
        let _ = t.await;
    }
}

impl<S: Slot> Driver<S> {
    /// Hands `event` to the machine and carries out its answer, with the
    /// events its actions answer with (a vacated slot, a spawned worker).
    async fn feed(&mut self, event: Event) {
        let mut next = Some(event);
        while let Some(event) = next.take() {
            let requests = self.signals.requests(self.stopping || *self.stop.borrow());
            for action in self.machine.on(event, &requests, Instant::now()) {
                if let Some(answer) = self.carry_out(action).await {
                    next = Some(answer);
                }
            }
        }
    }

    /// The checks of a new worker (its start-up, health and recycling).
    fn checks(&self) -> Interval {
        tokio::time::interval(self.policy.ping.map_or(STARTUP_CHECK, |p| p.0.min(STARTUP_CHECK)))
    }

    /// Waits for what the current state waits for.
    async fn wait(&mut self) -> Event {
        let Driver { spec, policy, slot, signals, stop, stopping, machine, current, tick, .. } = self;
        match *machine.state() {
            State::Restarting { at } => {
                if at > Instant::now() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = stop.changed() => *stopping = true,
                        // An operator stop is not kept waiting for the back-off.
                        _ = signals.ops.notified() => {}
                    }
                }
                Event::Wake
            }
            State::WaitingForDemand => {
                tokio::select! {
                    _ = signals.demand.notified() => {}
                    // A demand event lost to a full event ring costs at
                    // most this long.
                    _ = tokio::time::sleep(DEMAND_RECHECK) => {}
                    _ = stop.changed() => *stopping = true,
                    _ = signals.ops.notified() => {}
                }
                // A demand left over from an earlier worker's time is
                // stale: only a request on the ring counts (`Vacate`).
                Event::Wake
            }
            State::Stopped { .. } => {
                tokio::select! {
                    _ = signals.start.notified() => {}
                    // The start signal wakes whoever waits at that moment;
                    // the count is what really tells.
                    _ = tokio::time::sleep(DEMAND_RECHECK) => {}
                    _ = stop.changed() => *stopping = true,
                }
                Event::Look
            }
            State::Starting { .. } | State::Running { .. } | State::Recycling { .. } => {
                let r = current.as_mut().expect("a running worker");
                let checks = tick.as_mut().expect("a running worker's checks");
                let pid = r.worker.pid;
                let event = tokio::select! {
                    status = r.child.wait() => Event::Exited { crashed: match status {
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
                    }},
                    _ = stop.changed() => {
                        *stopping = true;
                        Event::Look
                    }
                    // A request met the slot marked workerless: if it is
                    // this worker that marked it, it stopped pulling.
                    _ = signals.demand.notified() => Event::Demand(slot.progress()),
                    _ = signals.fault.notified() => panic!("fault injected: supervisor of pool `{}` panics", spec.pool),
                    // Operator requests are looked at before every wait.
                    _ = signals.ops.notified() => Event::Look,
                    _ = checks.tick() => {
                        let recycling = matches!(machine.state(), State::Recycling { .. });
                        let private_kib = policy.recycle_private_kib.filter(|_| !recycling).and_then(|_| private_kib(pid));
                        Event::Tick { progress: slot.progress(), private_kib }
                    }
                };
                if let Event::Exited { .. } = event {
                    **current = None;
                }
                event
            }
            State::ShutDown => Event::Look,
        }
    }

    /// Carries out `action`; some answer with an event.
    async fn carry_out(&mut self, action: Action) -> Option<Event> {
        let pool = &self.spec.pool;
        match action {
            Action::Note(Note::WaitingForDemand) => tracing::info!(pool = %pool, "no worker; waiting for a request"),
            Action::Note(Note::Restarting { delay }) => {
                tracing::info!(pool = %pool, delay_ms = delay.as_millis() as u64, "restarting worker")
            }
            Action::Note(Note::PoolStopped(cause)) => match cause {
                StopCause::Operator => tracing::warn!(pool = %pool, "pool stopped: {}", cause.why(pool)),
                StopCause::RapidFail { .. } => tracing::error!(pool = %pool, "pool stopped: {}", cause.why(pool)),
            },
            Action::Vacate => return Some(Event::Vacated { waiting: self.slot.vacate() }),
            Action::Spawn => return Some(self.spawn()),
            Action::Recycle(why) => {
                if let Some(r) = self.current.as_ref() {
                    tracing::info!(pool = %pool, pid = r.worker.pid, "recycling the worker: {why}");
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(r.worker.pid as i32, libc::SIGTERM) };
                }
            }
            Action::Kill(why) => {
                if let Some(mut r) = self.current.take() {
                    let pid = r.worker.pid;
                    match why {
                        Kill::StartupLimit => {
                            tracing::warn!(pool = %pool, pid, limit_s = self.policy.startup_limit.as_secs(), "worker did not start pulling requests in time; killing it")
                        }
                        Kill::Unresponsive => {
                            let limit_s = self.policy.ping.map_or(0, |p| p.1.as_secs());
                            tracing::warn!(pool = %pool, pid, limit_s, "worker stopped pulling its queue; killing it (its replacement serves the queue)")
                        }
                        Kill::ShutdownLimit => {
                            tracing::warn!(pool = %pool, pid, "worker did not finish within the shutdown time limit; killing it")
                        }
                    }
                    let _ = r.child.kill().await;
                }
            }
            Action::Terminate => {
                if let Some(mut r) = self.current.take() {
                    terminate(&mut r.child, r.worker.pid, self.policy.shutdown_limit).await;
                }
            }
            Action::Drain => {
                if let Some(r) = self.current.take() {
                    self.draining.push(drain(r.child, r.worker.pid, pool.clone(), self.policy.shutdown_limit));
                }
            }
            Action::Exited { crashed } => self.slot.exited(crashed),
            Action::StopPool(cause) => self.slot.stopped(true, &cause.why(pool)),
            Action::StartPool => {
                tracing::info!(pool = %pool, "pool started again");
                self.slot.stopped(false, "");
            }
        }
        None
    }

    /// Starts a worker with fresh handles into `current`.
    fn spawn(&mut self) -> Event {
        let started = Instant::now();
        // A worker that consumed from the ring has started, even if it
        // stopped before a tick saw it pulling.
        let start_consumed = self.slot.progress().consumed;
        let child = self
            .slot
            .handles()
            .map_err(|source| Error::Handles { pool: self.spec.pool.clone(), source })
            .and_then(|h| spawn(&self.spec, h));
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                tracing::error!("{e}");
                return Event::SpawnFailed;
            }
        };
        let pid = child.id().unwrap_or(0);
        tracing::info!(pool = %self.spec.pool, pid, "worker started");
        self.slot.started(pid);
        let worker = Worker { pid, started, start_consumed };
        *self.current = Some(Running { child, worker });
        self.tick = Some(self.checks());
        Event::Spawned(worker)
    }
}

/// Private (anonymous) resident memory of `pid`, KiB.
fn private_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("RssAnon:"))?.split_whitespace().next()?.parse().ok()
}

/// Waits for a worker that stopped pulling to finish what it took (and
/// exit), up to `limit`; then kills it.
fn drain(mut child: tokio::process::Child, pid: u32, pool: String, limit: Duration) -> JoinHandle<()> {
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

async fn terminate(child: &mut tokio::process::Child, pid: u32, grace: Duration) {
    if pid != 0 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests;
