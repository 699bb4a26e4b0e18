//! The supervisor's decisions, as a pure state machine.
//!
//! [`Machine`] is what one slot's supervisor knows: the [`State`] it is in
//! (named after WAS's and IIS's states where they have one), the restart
//! back-off, the recent crashes, and the operator requests it has met.
//! [`Machine::on`] turns an [`Event`] (what the driver saw: a worker's
//! exit, a tick with the queue's progress, a wake-up) into [`Action`]s for
//! the driver (`supervise`) to carry out, in order. It does no
//! I/O, starts no process and reads no clock: the time and the operator's
//! request counts come with each event, so each decision is tested on its
//! own (the tests at the end).
//!
//! Operator requests are counts (see [`crate::Signals`]); a request is one
//! whose count the machine has not met yet. Their wake-up reaches only
//! whoever waits at that moment, so the driver also has the machine look
//! at them before every wait ([`Event::Look`]).

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::{
    policy::{Policy, StartMode},
    slot::Progress,
    HEALTHY_AFTER, MAX_BACKOFF, MIN_BACKOFF,
};

/// The requests a supervisor acts on, as counted when an event is handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// The dispatcher is stopping the supervisor (shutdown, or its pool
    /// retires).
    pub shutdown: bool,
    /// Operator stops asked for.
    pub halts: u64,
    /// The start count when the last stop was asked for.
    pub halt_start_mark: u64,
    /// Operator starts asked for.
    pub starts: u64,
    /// Operator recycles asked for.
    pub recycles: u64,
}

/// A worker process, as the machine knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    pub pid: u32,
    /// When it was started (start-up limit, recycling interval, back-off
    /// reset).
    pub started: Instant,
    /// The ring's consumer position when it started: a worker that moved
    /// it has started, even if it stopped pulling before a tick saw it
    /// pulling.
    pub start_consumed: u64,
}

/// Why a pool is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// Rapid-fail protection: `crashes` crashes within `within`.
    RapidFail { crashes: u32, within: Duration },
    /// An operator stop (`dispatcher stop`).
    Operator,
}

impl StopCause {
    /// Why pool `pool` is stopped, as its 503s and the log say it.
    pub fn why(&self, pool: &str) -> String {
        match self {
            StopCause::RapidFail { crashes, within } => format!(
                "{crashes} crashes within {} s (rapid-fail protection); `dispatcher pool start {pool}` starts it again",
                within.as_secs()
            ),
            StopCause::Operator => format!("stopped by the operator; `dispatcher start {pool}` starts it again"),
        }
    }
}

/// Where a supervisor is. Every state but [`State::Stopped`] and
/// [`State::ShutDown`] is left for `Stopped(Operator)` on an operator
/// stop, and every state for `ShutDown` when the dispatcher stops the
/// supervisor (its worker, if any, is terminated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No worker; the next one is started at `at`: at once when the
    /// supervisor begins and after a clean exit (idle, recycled, stopped
    /// pulling), after the back-off following a crash. Left at `at`, or
    /// earlier when an operator request wakes the supervisor, once the slot
    /// is marked workerless ([`Action::Vacate`]): for `WaitingForDemand`
    /// (on demand, no request waits), else a worker is spawned
    /// (`Starting`).
    Restarting { at: Instant },
    /// On demand, no worker: the slot is marked workerless, so the next
    /// request raises a demand. Left when a request is found waiting (at a
    /// demand, or at the periodic recheck): a worker is spawned.
    WaitingForDemand,
    /// A worker runs but has not started pulling (it has not changed the
    /// slot's awake flag yet). Left for `Running` when it pulls; for
    /// `Recycling`; when it exits (crash or not); when it is killed for
    /// not pulling within the start-up limit (a crash); or when it is
    /// seen to have stopped pulling already (it consumed and marked the
    /// slot workerless).
    Starting { worker: Worker },
    /// The worker pulls requests, and its health is checked: `last` is
    /// the consumer position the previous check saw, `stuck_since` since
    /// when a non-empty queue has not moved. Left when it exits; when it
    /// is killed for a queue stuck past the ping limit (a crash); for
    /// `Recycling`; or when it stops pulling (it marked the slot
    /// workerless: it drains aside while the next one starts, which is
    /// overlapped recycling).
    Running { worker: Worker, last: Option<u64>, stuck_since: Option<Instant> },
    /// The worker was asked to stop (SIGTERM) at `since` and finishes what
    /// it took; `ready`: it had started pulling. Left when it stops pulling
    /// (it drains aside, the next starts), when it exits, or when it is
    /// killed at the shutdown limit (a crash).
    Recycling { worker: Worker, since: Instant, ready: bool },
    /// The pool is stopped (its requests get 503) until an operator start
    /// whose count passes `starts` (the count when the stop was decided,
    /// or for an operator stop when it was asked for): then `Restarting`
    /// at once, with the crash count and back-off reset.
    Stopped { cause: StopCause, starts: u64 },
    /// The supervisor ends. Final.
    ShutDown,
}

/// What the driver saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Before every wait, and when a wake-up has nothing else to tell:
    /// look at the requests.
    Look,
    /// The state's wait is over (`Restarting`: the back-off passed or an
    /// operator request cut it short; `WaitingForDemand`: a demand, an
    /// operator request or the periodic recheck). Elsewhere as `Look`.
    Wake,
    /// The answer to [`Action::Vacate`]: whether requests wait.
    Vacated { waiting: bool },
    /// The answer to [`Action::Spawn`]: the worker started...
    Spawned(Worker),
    /// ...or could not be started (counted as a crash).
    SpawnFailed,
    /// The supervisor began with a running worker a panicked one left.
    Adopted(Worker),
    /// The worker exited (`crashed`: not with status 0).
    Exited { crashed: bool },
    /// A request met the slot marked workerless while the worker runs.
    Demand(Progress),
    /// The periodic check of the worker: its queue's progress, and its
    /// private memory (KiB) when the policy recycles on it.
    Tick { progress: Progress, private_kib: Option<u64> },
}

/// Why a worker is killed (SIGKILL); each counts as a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// It did not start pulling within the start-up limit.
    StartupLimit,
    /// Its non-empty queue did not move for the ping response limit.
    Unresponsive,
    /// Asked to stop, it was not gone within the shutdown limit.
    ShutdownLimit,
}

/// Why a worker is recycled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recycle {
    Operator,
    Interval,
    /// Its private memory (`kib`) passed `limit` KiB.
    Memory {
        kib: u64,
        limit: u64,
    },
}

impl std::fmt::Display for Recycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recycle::Operator => write!(f, "asked by the operator"),
            Recycle::Interval => write!(f, "its recycling interval passed"),
            Recycle::Memory { kib, limit } => write!(f, "its private memory ({kib} KiB) passed {limit} KiB"),
        }
    }
}

/// A line for the log, for a decision that has no action of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Note {
    /// The slot waits for a request.
    WaitingForDemand,
    /// After a crash, the next worker starts in `delay`.
    Restarting { delay: Duration },
    /// The pool stops (said before the worker is stopped).
    PoolStopped(StopCause),
}

/// What the driver is to do, in the order given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Note(Note),
    /// Mark the slot workerless (`Slot::vacate`) and answer with
    /// [`Event::Vacated`].
    Vacate,
    /// Start a worker (fresh handles, `Slot::started`) and answer with
    /// [`Event::Spawned`] or [`Event::SpawnFailed`].
    Spawn,
    /// Ask the worker to stop (SIGTERM): it finishes what it took.
    Recycle(Recycle),
    /// Kill the worker (SIGKILL) and reap it.
    Kill(Kill),
    /// Stop the worker: SIGTERM, SIGKILL after the shutdown limit.
    Terminate,
    /// Hand the worker, which stopped pulling, to a task that waits (up
    /// to the shutdown limit) for it to finish what it took.
    Drain,
    /// Tell the slot its worker is gone (`Slot::exited`).
    Exited {
        crashed: bool,
    },
    /// Mark the pool stopped (`Slot::stopped(true, why)`).
    StopPool(StopCause),
    /// Mark the pool running again (`Slot::stopped(false, ..)`).
    StartPool,
}

/// How a worker went.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gone {
    Exited {
        crashed: bool,
    },
    Killed,
    /// It stopped pulling and drains aside.
    HandedOff,
}

/// One slot's supervisor: its state and what it counts.
#[derive(Debug)]
pub struct Machine {
    policy: Policy,
    state: State,
    /// The operator stop count met.
    halts: u64,
    /// The recycle count the current worker has met.
    recycles: u64,
    /// The next restart delay after a crash.
    backoff: Duration,
    /// Crash times within the rapid-fail interval.
    crashes: VecDeque<Instant>,
}

impl Machine {
    /// A supervisor beginning at `now` with no worker (see
    /// [`Event::Adopted`] for one it takes over). Operator stops asked
    /// for before it (counted in `requests`) are not its.
    pub fn new(policy: Policy, requests: &Requests, now: Instant) -> Self {
        Machine {
            policy,
            state: State::Restarting { at: now },
            halts: requests.halts,
            recycles: requests.recycles,
            backoff: MIN_BACKOFF,
            crashes: VecDeque::new(),
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Handles `event`, seen at `now` with the request counts `requests`.
    pub fn on(&mut self, event: Event, requests: &Requests, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state == State::ShutDown {
            return out;
        }
        match event {
            Event::Look => {
                self.look(requests, now, &mut out);
            }
            Event::Wake => {
                if self.look(requests, now, &mut out)
                    && matches!(self.state, State::Restarting { .. } | State::WaitingForDemand)
                {
                    out.push(Action::Vacate);
                }
            }
            Event::Vacated { waiting } => self.vacated(waiting, &mut out),
            // A fresh worker meets every recycle asked for before it.
            Event::Spawned(worker) | Event::Adopted(worker) => {
                self.recycles = requests.recycles;
                self.state = State::Starting { worker };
            }
            Event::SpawnFailed => {
                if requests.shutdown {
                    self.state = State::ShutDown;
                } else {
                    self.crashed(now, requests, now, &mut out);
                }
            }
            Event::Exited { crashed } => self.gone(Gone::Exited { crashed }, requests, now, &mut out),
            Event::Demand(progress) => {
                if self.stopped_pulling(&progress) {
                    self.hand_off(requests, now, &mut out);
                }
            }
            Event::Tick { progress, private_kib } => self.tick(progress, private_kib, requests, now, &mut out),
        }
        out
    }

    /// The slot is marked workerless; `waiting`: requests wait on it.
    fn vacated(&mut self, waiting: bool, out: &mut Vec<Action>) {
        if !matches!(self.state, State::Restarting { .. } | State::WaitingForDemand) {
            return;
        }
        if self.policy.start == StartMode::AlwaysRunning || waiting {
            out.push(Action::Spawn);
        } else if self.state != State::WaitingForDemand {
            out.push(Action::Note(Note::WaitingForDemand));
            self.state = State::WaitingForDemand;
        }
    }

    /// The worker and whether it has started pulling, if there is one.
    fn worker(&self) -> Option<(Worker, bool)> {
        match self.state {
            State::Starting { worker } => Some((worker, false)),
            State::Running { worker, .. } => Some((worker, true)),
            State::Recycling { worker, ready, .. } => Some((worker, ready)),
            _ => None,
        }
    }

    /// Looks at the requests; false when one of them changed the state
    /// (the event needs nothing more).
    fn look(&mut self, requests: &Requests, now: Instant, out: &mut Vec<Action>) -> bool {
        if requests.shutdown {
            if self.worker().is_some() {
                out.push(Action::Terminate);
            }
            self.state = State::ShutDown;
            return false;
        }
        if let State::Stopped { starts, .. } = self.state {
            if requests.starts == starts {
                return true;
            }
            out.push(Action::StartPool);
            self.crashes.clear();
            self.backoff = MIN_BACKOFF;
            self.state = State::Restarting { at: now };
            return false;
        }
        if requests.halts != self.halts {
            self.halt(requests, out);
            return false;
        }
        if requests.recycles != self.recycles && matches!(self.state, State::Starting { .. } | State::Running { .. }) {
            self.recycles = requests.recycles;
            self.recycle(Recycle::Operator, now, out);
        }
        true
    }

    fn halt(&mut self, requests: &Requests, out: &mut Vec<Action>) {
        self.halts = requests.halts;
        let cause = StopCause::Operator;
        out.push(Action::Note(Note::PoolStopped(cause)));
        // The worker first (it may be reading its ring), then the slot is
        // stopped and what is left on the ring answered 503.
        if self.worker().is_some() {
            out.extend([Action::Terminate, Action::Exited { crashed: false }]);
        }
        out.push(Action::StopPool(cause));
        // A start asked for after the stop request counts, even one made
        // before this supervisor saw the stop.
        self.state = State::Stopped { cause, starts: requests.halt_start_mark };
    }

    fn recycle(&mut self, why: Recycle, now: Instant, out: &mut Vec<Action>) {
        let (worker, ready) = match self.state {
            State::Starting { worker } => (worker, false),
            State::Running { worker, .. } => (worker, true),
            _ => return,
        };
        out.push(Action::Recycle(why));
        self.state = State::Recycling { worker, since: now, ready };
    }

    /// The worker stopped pulling: it had started (it pulled, or moved the
    /// consumer) and the slot is marked workerless again, which only the
    /// worker does once it takes nothing more.
    fn stopped_pulling(&self, p: &Progress) -> bool {
        self.worker().is_some_and(|(w, ready)| (ready || p.consumed != w.start_consumed) && !p.ready)
    }

    /// Its successor may start while the worker answers what it took.
    fn hand_off(&mut self, requests: &Requests, now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Drain);
        self.gone(Gone::HandedOff, requests, now, out);
    }

    fn tick(
        &mut self,
        p: Progress,
        private_kib: Option<u64>,
        requests: &Requests,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some((worker, _)) = self.worker() else { return };
        let age = now.saturating_duration_since(worker.started);
        if let State::Recycling { since, .. } = self.state {
            if now.saturating_duration_since(since) >= self.policy.shutdown_limit {
                out.push(Action::Kill(Kill::ShutdownLimit));
                return self.gone(Gone::Killed, requests, now, out);
            }
        } else {
            let why = if self.policy.recycle_interval.is_some_and(|t| age >= t) {
                Some(Recycle::Interval)
            } else {
                self.policy
                    .recycle_private_kib
                    .and_then(|limit| private_kib.filter(|k| *k > limit).map(|kib| Recycle::Memory { kib, limit }))
            };
            if let Some(why) = why {
                self.recycle(why, now, out);
            }
        }
        if self.stopped_pulling(&p) {
            return self.hand_off(requests, now, out);
        }
        match self.state {
            State::Starting { worker } if p.ready => {
                self.state = State::Running { worker, last: None, stuck_since: None };
            }
            State::Recycling { worker, since, ready: false } if p.ready => {
                self.state = State::Recycling { worker, since, ready: true };
            }
            State::Starting { .. } | State::Recycling { ready: false, .. } if age >= self.policy.startup_limit => {
                out.push(Action::Kill(Kill::StartupLimit));
                self.gone(Gone::Killed, requests, now, out);
            }
            // Health: a recycling worker stops pulling on purpose.
            State::Running { ref mut last, ref mut stuck_since, .. } => {
                let Some((_, limit)) = self.policy.ping else { return };
                if p.queued && *last == Some(p.consumed) {
                    let since = *stuck_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= limit {
                        out.push(Action::Kill(Kill::Unresponsive));
                        return self.gone(Gone::Killed, requests, now, out);
                    }
                } else {
                    *stuck_since = None;
                }
                *last = Some(p.consumed);
            }
            _ => {}
        }
    }

    /// The worker is gone (exited, killed, or draining aside).
    fn gone(&mut self, how: Gone, requests: &Requests, now: Instant, out: &mut Vec<Action>) {
        let Some((worker, _)) = self.worker() else { return };
        let crashed = match how {
            Gone::Exited { crashed } => crashed,
            Gone::Killed => true,
            Gone::HandedOff => false,
        };
        self.state = State::Restarting { at: now };
        if how != Gone::HandedOff && requests.halts != self.halts {
            // An operator stop seen as the worker ends takes over (a
            // shutdown before it): the slot hears of the exit (or
            // `dispatcher pools` would list the dead pid until the next
            // start), then that the pool stopped; the exit does not count
            // towards rapid-fail protection.
            out.push(Action::Exited { crashed });
            self.look(requests, now, out);
            return;
        }
        out.push(Action::Exited { crashed });
        if requests.shutdown {
            self.state = State::ShutDown;
        } else if crashed {
            self.crashed(worker.started, requests, now, out);
        } else {
            self.backoff = MIN_BACKOFF;
        }
    }

    /// A crash of the worker started at `started`: rapid-fail protection
    /// stops the pool, or the next worker starts after the back-off.
    fn crashed(&mut self, started: Instant, requests: &Requests, now: Instant, out: &mut Vec<Action>) {
        if let Some((max, within)) = self.policy.rapid_fail {
            self.crashes.push_back(now);
            while self.crashes.front().is_some_and(|t| now.saturating_duration_since(*t) > within) {
                self.crashes.pop_front();
            }
            if self.crashes.len() as u32 >= max {
                let cause = StopCause::RapidFail { crashes: self.crashes.len() as u32, within };
                out.extend([Action::Note(Note::PoolStopped(cause)), Action::StopPool(cause)]);
                // A start asked for before this stop (a stale one) does not count.
                self.state = State::Stopped { cause, starts: requests.starts };
                return;
            }
        }
        if now.saturating_duration_since(started) >= HEALTHY_AFTER {
            self.backoff = MIN_BACKOFF;
        }
        out.push(Action::Note(Note::Restarting { delay: self.backoff }));
        self.state = State::Restarting { at: now + self.backoff };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests;
