//! The supervisor's transitions, driven by hand: events in, actions and
//! states out, on a clock the test moves.

use super::*;

const SEC: Duration = Duration::from_secs(1);
const STARTUP_LIMIT: Duration = Duration::from_secs(10);
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

fn policy(start: StartMode) -> Policy {
    Policy::bare(start, STARTUP_LIMIT, SHUTDOWN_LIMIT)
}

fn always() -> Policy {
    policy(StartMode::AlwaysRunning)
}

/// A supervisor under test: its machine, the request counts and the clock.
struct Sup {
    m: Machine,
    req: Requests,
    now: Instant,
    last_pid: u32,
}

impl Sup {
    fn new(policy: Policy) -> Sup {
        Sup::with(policy, Requests::default())
    }

    /// One that begins with the counts `req` already there.
    fn with(policy: Policy, req: Requests) -> Sup {
        let now = Instant::now();
        Sup { m: Machine::new(policy, &req, now), req, now, last_pid: 100 }
    }

    fn on(&mut self, e: Event) -> Vec<Action> {
        self.m.on(e, &self.req, self.now)
    }

    fn later(&mut self, d: Duration) -> &mut Sup {
        self.now += d;
        self
    }

    fn state(&self) -> State {
        *self.m.state()
    }

    /// From `Restarting` or `WaitingForDemand`: a worker is spawned
    /// (`waiting`: requests wait on the slot).
    fn start(&mut self, waiting: bool) -> Worker {
        assert_eq!(self.on(Event::Wake), [Action::Vacate], "{:?}", self.state());
        assert_eq!(self.on(Event::Vacated { waiting }), [Action::Spawn], "{:?}", self.state());
        self.last_pid += 1;
        let w = Worker { pid: self.last_pid, started: self.now, start_consumed: 0 };
        assert_eq!(self.on(Event::Spawned(w)), []);
        assert_eq!(self.state(), State::Starting { worker: w });
        w
    }

    /// A started worker, seen pulling.
    fn running(&mut self) -> Worker {
        let w = self.start(true);
        assert_eq!(self.tick(true, 0, false), []);
        assert!(matches!(self.state(), State::Running { .. }), "{:?}", self.state());
        w
    }

    fn tick(&mut self, ready: bool, consumed: u64, queued: bool) -> Vec<Action> {
        self.on(Event::Tick { progress: Progress { ready, consumed, queued }, private_kib: None })
    }

    /// A worker started now crashes after `ran`.
    fn crash_after(&mut self, ran: Duration) -> Vec<Action> {
        self.start(true);
        self.later(ran).on(Event::Exited { crashed: true })
    }

    /// The delay before the next start, when restarting.
    fn delay(&self) -> Duration {
        match self.state() {
            State::Restarting { at } => at - self.now,
            s => panic!("not restarting: {s:?}"),
        }
    }

    /// The operator stops the pool, as `PoolLink::request_halt` asks.
    fn request_halt(&mut self) {
        self.req.halt_start_mark = self.req.starts;
        self.req.halts += 1;
    }
}

fn restarting(delay: Duration) -> [Action; 2] {
    [Action::Exited { crashed: true }, Action::Note(Note::Restarting { delay })]
}

fn stopped_by_the_operator(with_worker: bool) -> Vec<Action> {
    let mut a = vec![Action::Note(Note::PoolStopped(StopCause::Operator))];
    if with_worker {
        a.extend([Action::Terminate, Action::Exited { crashed: false }]);
    }
    a.push(Action::StopPool(StopCause::Operator));
    a
}

#[test]
fn an_always_running_pool_starts_a_worker_at_once() {
    let mut s = Sup::new(always());
    assert_eq!(s.on(Event::Look), []);
    assert_eq!(s.on(Event::Wake), [Action::Vacate]);
    assert_eq!(s.on(Event::Vacated { waiting: false }), [Action::Spawn]);
}

#[test]
fn an_on_demand_pool_waits_for_a_request_on_its_slot() {
    let mut s = Sup::new(policy(StartMode::OnDemand));
    assert_eq!(s.on(Event::Wake), [Action::Vacate]);
    assert_eq!(s.on(Event::Vacated { waiting: false }), [Action::Note(Note::WaitingForDemand)]);
    assert_eq!(s.state(), State::WaitingForDemand);
    // A wake-up with nothing on the ring (a stale demand, the recheck)
    // keeps it waiting, and says so only once.
    assert_eq!(s.on(Event::Wake), [Action::Vacate]);
    assert_eq!(s.on(Event::Vacated { waiting: false }), []);
    assert_eq!(s.state(), State::WaitingForDemand);
    s.start(true);
}

#[test]
fn a_worker_runs_once_it_pulls() {
    let mut s = Sup::new(always());
    let w = s.start(false);
    assert_eq!(s.later(SEC).tick(false, 0, true), []);
    assert_eq!(s.state(), State::Starting { worker: w });
    assert_eq!(s.later(SEC).tick(true, 0, true), []);
    assert_eq!(s.state(), State::Running { worker: w, last: None, stuck_since: None });
}

#[test]
fn an_idle_exit_goes_back_to_waiting_for_demand() {
    let mut s = Sup::new(policy(StartMode::OnDemand));
    s.running();
    assert_eq!(s.later(60 * SEC).on(Event::Exited { crashed: false }), [Action::Exited { crashed: false }]);
    assert_eq!(s.state(), State::Restarting { at: s.now });
    assert_eq!(s.on(Event::Wake), [Action::Vacate]);
    assert_eq!(s.on(Event::Vacated { waiting: false }), [Action::Note(Note::WaitingForDemand)]);
    assert_eq!(s.state(), State::WaitingForDemand);
}

#[test]
fn a_worker_that_stops_pulling_drains_while_the_next_starts() {
    // (state reached, the progress seen, handed off)
    let cases: [(bool, Progress, bool); 5] = [
        // Pulling, then the slot marked workerless: it stopped.
        (true, Progress { ready: false, consumed: 5, queued: true }, true),
        // Still pulling: a stale demand.
        (true, Progress { ready: true, consumed: 5, queued: true }, false),
        // Never seen pulling, but it consumed: it started and stopped.
        (false, Progress { ready: false, consumed: 5, queued: false }, true),
        // Never seen pulling, nothing consumed: still starting.
        (false, Progress { ready: false, consumed: 0, queued: true }, false),
        // Starting, now pulling.
        (false, Progress { ready: true, consumed: 0, queued: true }, false),
    ];
    for (ready, progress, handed_off) in cases {
        for by_tick in [false, true] {
            let mut s = Sup::new(policy(StartMode::OnDemand));
            if ready {
                s.running();
            } else {
                s.start(true);
            }
            let event = if by_tick { Event::Tick { progress, private_kib: None } } else { Event::Demand(progress) };
            let actions = s.later(SEC).on(event);
            let case = format!("ready {ready}, {progress:?}, by tick {by_tick}");
            if handed_off {
                assert_eq!(actions, [Action::Drain, Action::Exited { crashed: false }], "{case}");
                assert_eq!(s.state(), State::Restarting { at: s.now }, "{case}");
            } else {
                assert_eq!(actions, [], "{case}");
                assert!(s.m.worker().is_some(), "{case}: {:?}", s.state());
            }
        }
    }
}

#[test]
fn rapid_fail_stops_the_pool_after_max_crashes_within_the_interval_and_not_when_spread_out() {
    // (time each worker runs before it crashes, how many crashes stop the pool)
    let ms = Duration::from_millis;
    let cases: [(Duration, Option<usize>); 4] = [
        (SEC, Some(3)),
        // With the back-off (200 + 400 ms) between them, the first and the
        // third crash are exactly the interval apart: still within it.
        (ms(29_700), Some(3)),
        // A millisecond more, and no three are within the interval.
        (ms(29_701), None),
        (40 * SEC, None),
    ];
    for (ran, stops_at) in cases {
        let within = 60 * SEC;
        let mut s = Sup::new(Policy { rapid_fail: Some((3, within)), ..always() });
        let mut stopped = None;
        for n in 1..=10 {
            let actions = s.crash_after(ran);
            if let State::Stopped { cause, starts } = s.state() {
                assert_eq!(cause, StopCause::RapidFail { crashes: 3, within });
                assert_eq!(starts, 0);
                let stop = [Action::Note(Note::PoolStopped(cause)), Action::StopPool(cause)];
                assert_eq!(actions, [&[Action::Exited { crashed: true }][..], &stop].concat());
                stopped = Some(n);
                break;
            }
            assert_eq!(actions[0], Action::Exited { crashed: true });
            let delay = s.delay();
            s.later(delay);
        }
        assert_eq!(stopped, stops_at, "workers that ran {ran:?}");
    }
}

#[test]
fn the_back_off_doubles_up_to_its_cap_and_resets_after_a_healthy_run_or_a_clean_exit() {
    let ms = Duration::from_millis;
    // (how long the worker ran, the delay before the next)
    let table = [
        (SEC, ms(200)),
        (SEC, ms(400)),
        (SEC, ms(800)),
        (SEC, ms(1600)),
        (SEC, ms(3200)),
        (SEC, ms(6400)),
        (SEC, ms(12800)),
        (SEC, ms(25600)),
        (SEC, MAX_BACKOFF),
        (SEC, MAX_BACKOFF),
        // Ran long enough to count as healthy: back to the first delay.
        (HEALTHY_AFTER, MIN_BACKOFF),
        (SEC, ms(400)),
        (HEALTHY_AFTER - ms(1), ms(800)),
    ];
    let mut s = Sup::new(always());
    for (i, (ran, delay)) in table.into_iter().enumerate() {
        assert_eq!(s.crash_after(ran), restarting(delay), "crash {i}");
        assert_eq!(s.delay(), delay, "crash {i}");
        s.later(delay);
    }
    // A clean exit resets it too.
    s.start(true);
    assert_eq!(s.later(SEC).on(Event::Exited { crashed: false }), [Action::Exited { crashed: false }]);
    assert_eq!(s.delay(), Duration::ZERO);
    assert_eq!(s.crash_after(SEC), restarting(MIN_BACKOFF));
}

#[test]
fn a_worker_that_cannot_be_started_counts_as_a_crash() {
    let within = 60 * SEC;
    let mut s = Sup::new(Policy { rapid_fail: Some((2, within)), ..always() });
    for (n, expected) in [
        vec![Action::Note(Note::Restarting { delay: MIN_BACKOFF })],
        vec![
            Action::Note(Note::PoolStopped(StopCause::RapidFail { crashes: 2, within })),
            Action::StopPool(StopCause::RapidFail { crashes: 2, within }),
        ],
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(s.on(Event::Wake), [Action::Vacate]);
        assert_eq!(s.on(Event::Vacated { waiting: false }), [Action::Spawn]);
        assert_eq!(s.on(Event::SpawnFailed), expected, "failure {n}");
        s.later(SEC);
    }
}

#[test]
fn a_worker_that_does_not_pull_within_the_startup_limit_is_killed_as_a_crash() {
    let mut s = Sup::new(always());
    s.start(true);
    assert_eq!(s.later(STARTUP_LIMIT - SEC).tick(false, 0, true), []);
    let mut killed = vec![Action::Kill(Kill::StartupLimit)];
    killed.extend(restarting(MIN_BACKOFF));
    assert_eq!(s.later(SEC).tick(false, 0, true), killed);
}

#[test]
fn a_worker_whose_queue_stands_still_past_the_ping_limit_is_killed_and_one_that_moves_is_not() {
    let limit = 5 * SEC;
    let ping = Policy { ping: Some((SEC, limit)), ..always() };
    // (consumer positions at each tick, whether there is a queue, killed)
    let stuck = [7; 12];
    let moving: Vec<u64> = (0..12).collect();
    let cases: [(&[u64], bool, bool); 3] = [(&stuck, true, true), (&moving, true, false), (&stuck, false, false)];
    for (positions, queued, killed) in cases {
        let mut s = Sup::new(ping.clone());
        s.running();
        let mut kill_tick = None;
        for (i, consumed) in positions.iter().enumerate() {
            let actions = s.later(SEC).tick(true, *consumed, queued);
            if !actions.is_empty() {
                assert_eq!(actions[..2], [Action::Kill(Kill::Unresponsive), Action::Exited { crashed: true }]);
                kill_tick = Some(i);
                break;
            }
        }
        // The second tick sees it stand still first; `limit` later it is killed.
        let expected = killed.then_some(1 + limit.as_secs() as usize);
        assert_eq!(kill_tick, expected, "{positions:?} queued {queued}");
    }
    // Without pings, a stuck queue is left alone.
    let mut s = Sup::new(always());
    s.running();
    for _ in 0..20 {
        assert_eq!(s.later(SEC).tick(true, 7, true), []);
    }
}

#[test]
fn an_operator_stop_ends_the_worker_then_stops_the_pool_until_a_start() {
    let mut s = Sup::new(always());
    s.running();
    s.request_halt();
    assert_eq!(s.on(Event::Look), stopped_by_the_operator(true));
    assert_eq!(s.state(), State::Stopped { cause: StopCause::Operator, starts: 0 });
    for _ in 0..3 {
        assert_eq!(s.later(SEC).on(Event::Look), []);
    }
    s.req.starts += 1;
    assert_eq!(s.on(Event::Look), [Action::StartPool]);
    assert_eq!(s.state(), State::Restarting { at: s.now });
    s.start(false);
}

#[test]
fn a_start_asked_for_right_after_the_stop_counts_even_before_the_supervisor_saw_the_stop() {
    let mut s = Sup::new(always());
    s.running();
    s.request_halt();
    s.req.starts += 1;
    assert_eq!(s.on(Event::Look), stopped_by_the_operator(true));
    assert_eq!(s.on(Event::Look), [Action::StartPool]);
}

#[test]
fn a_start_asked_for_before_the_stop_does_not_count() {
    let mut s = Sup::new(always());
    s.running();
    s.req.starts += 1;
    assert_eq!(s.on(Event::Look), []);
    s.request_halt();
    assert_eq!(s.on(Event::Look), stopped_by_the_operator(true));
    assert_eq!(s.on(Event::Look), []);
    assert!(matches!(s.state(), State::Stopped { .. }));
}

#[test]
fn operator_stops_asked_for_before_the_supervisor_ran_are_not_its() {
    let mut s = Sup::with(always(), Requests { halts: 3, halt_start_mark: 1, starts: 1, ..Requests::default() });
    assert_eq!(s.on(Event::Look), []);
    s.running();
    // Its own stops are.
    s.request_halt();
    assert_eq!(s.on(Event::Look), stopped_by_the_operator(true));
}

#[test]
fn an_operator_stop_without_a_worker_stops_the_pool_from_waiting_or_from_the_back_off() {
    let mut waiting = Sup::new(policy(StartMode::OnDemand));
    waiting.on(Event::Wake);
    waiting.on(Event::Vacated { waiting: false });
    let mut backing_off = Sup::new(always());
    backing_off.crash_after(SEC);
    for mut s in [waiting, backing_off] {
        s.request_halt();
        // Seen on the wake-up it caused, before the slot is looked at.
        assert_eq!(s.on(Event::Wake), stopped_by_the_operator(false));
        assert!(matches!(s.state(), State::Stopped { cause: StopCause::Operator, .. }));
    }
}

#[test]
fn a_start_after_rapid_fail_counts_only_if_asked_for_after_the_stop_and_clears_the_crashes() {
    let within = 60 * SEC;
    let mut s = Sup::new(Policy { rapid_fail: Some((2, within)), ..always() });
    s.req.starts = 4;
    s.crash_after(SEC);
    s.later(s.delay());
    s.crash_after(SEC);
    assert_eq!(s.state(), State::Stopped { cause: StopCause::RapidFail { crashes: 2, within }, starts: 4 });
    assert_eq!(s.on(Event::Look), []);
    s.req.starts += 1;
    assert_eq!(s.on(Event::Look), [Action::StartPool]);
    // The crash count starts over, and so does the back-off.
    assert_eq!(s.crash_after(SEC), restarting(MIN_BACKOFF));
    s.later(s.delay());
    assert!(matches!(
        s.crash_after(SEC)[..],
        [Action::Exited { crashed: true }, Action::Note(Note::PoolStopped(_)), _]
    ));
}

#[test]
fn an_operator_recycle_asks_the_worker_once_and_a_fresh_worker_meets_the_ones_asked_for_before_it() {
    let mut s = Sup::new(always());
    let w = s.running();
    s.req.recycles += 1;
    assert_eq!(s.on(Event::Look), [Action::Recycle(Recycle::Operator)]);
    assert_eq!(s.state(), State::Recycling { worker: w, since: s.now, ready: true });
    // Asked once, even when asked again meanwhile.
    s.req.recycles += 1;
    assert_eq!(s.on(Event::Look), []);
    // It stops pulling: it drains aside, the next starts at once.
    assert_eq!(s.later(SEC).on(Event::Demand(Progress::default())), [Action::Drain, Action::Exited { crashed: false }]);
    assert_eq!(s.delay(), Duration::ZERO);
    // The next one is not recycled by the requests made before it started.
    s.running();
    assert_eq!(s.on(Event::Look), []);
    s.req.recycles += 1;
    assert_eq!(s.on(Event::Look), [Action::Recycle(Recycle::Operator)]);
}

#[test]
fn a_worker_is_recycled_after_its_interval_or_past_its_private_memory() {
    let interval = 60 * SEC;
    let mut s = Sup::new(Policy { recycle_interval: Some(interval), ..always() });
    s.running();
    assert_eq!(s.later(interval - 2 * SEC).tick(true, 0, false), []);
    assert_eq!(s.later(SEC).tick(true, 0, false), []);
    assert_eq!(s.later(SEC).tick(true, 0, false), [Action::Recycle(Recycle::Interval)]);
    // Asked once.
    assert_eq!(s.later(SEC).tick(true, 0, false), []);

    let mut s = Sup::new(Policy { recycle_private_kib: Some(1000), ..always() });
    s.running();
    let memory = |kib| Event::Tick { progress: Progress { ready: true, ..Progress::default() }, private_kib: kib };
    assert_eq!(s.on(memory(None)), []);
    assert_eq!(s.on(memory(Some(1000))), []);
    assert_eq!(s.on(memory(Some(1001))), [Action::Recycle(Recycle::Memory { kib: 1001, limit: 1000 })]);
}

#[test]
fn a_recycling_worker_is_not_pinged_and_is_killed_at_the_shutdown_limit() {
    let mut s = Sup::new(Policy { ping: Some((SEC, SEC)), ..always() });
    s.running();
    s.req.recycles += 1;
    s.on(Event::Look);
    for _ in 1..SHUTDOWN_LIMIT.as_secs() {
        assert_eq!(s.later(SEC).tick(true, 7, true), []);
    }
    let mut killed = vec![Action::Kill(Kill::ShutdownLimit)];
    killed.extend(restarting(MIN_BACKOFF));
    assert_eq!(s.later(SEC).tick(true, 7, true), killed);
}

#[test]
fn a_recycled_worker_that_exits_cleanly_is_replaced_at_once() {
    let mut s = Sup::new(always());
    s.start(true);
    // Recycled before it pulled: the start-up limit still holds, and it is
    // seen pulling.
    s.req.recycles += 1;
    s.on(Event::Look);
    let w = s.m.worker().unwrap().0;
    assert_eq!(s.later(SEC).tick(true, 0, false), []);
    assert_eq!(s.state(), State::Recycling { worker: w, since: s.now - SEC, ready: true });
    assert_eq!(s.on(Event::Exited { crashed: false }), [Action::Exited { crashed: false }]);
    assert_eq!(s.delay(), Duration::ZERO);
}

#[test]
fn a_shutdown_terminates_the_worker_and_ends_the_supervisor() {
    let mut s = Sup::new(always());
    s.running();
    s.req.shutdown = true;
    assert_eq!(s.on(Event::Look), [Action::Terminate]);
    assert_eq!(s.state(), State::ShutDown);
    assert_eq!(s.on(Event::Exited { crashed: true }), []);
    assert_eq!(s.on(Event::Wake), []);

    // Without a worker there is nothing to terminate.
    let mut s = Sup::new(always());
    s.request_halt();
    s.on(Event::Look);
    s.req.shutdown = true;
    assert_eq!(s.on(Event::Look), []);
    assert_eq!(s.state(), State::ShutDown);

    // An exit seen as the supervisor stops is still told to the slot.
    let mut s = Sup::new(Policy { rapid_fail: Some((1, SEC)), ..always() });
    s.running();
    s.req.shutdown = true;
    assert_eq!(s.on(Event::Exited { crashed: true }), [Action::Exited { crashed: true }]);
    assert_eq!(s.state(), State::ShutDown);
}

#[test]
fn an_exit_seen_with_an_operator_stop_pending_is_told_then_the_pool_stops() {
    let mut s = Sup::new(Policy { rapid_fail: Some((1, SEC)), ..always() });
    s.running();
    s.request_halt();
    let mut want = vec![Action::Exited { crashed: true }];
    want.extend(stopped_by_the_operator(false));
    // Not a rapid-fail stop, although one crash would be enough for one.
    assert_eq!(s.on(Event::Exited { crashed: true }), want);
    assert!(matches!(s.state(), State::Stopped { cause: StopCause::Operator, .. }));
}

#[test]
fn an_adopted_worker_is_watched_like_a_started_one() {
    let mut s = Sup::with(always(), Requests { recycles: 2, ..Requests::default() });
    let w = Worker { pid: 7, started: s.now - 3600 * SEC, start_consumed: 40 };
    assert_eq!(s.on(Event::Adopted(w)), []);
    assert_eq!(s.state(), State::Starting { worker: w });
    // It is pulling already, and the recycles asked for before it are met.
    assert_eq!(s.tick(true, 90, false), []);
    assert!(matches!(s.state(), State::Running { .. }));
    assert_eq!(s.on(Event::Look), []);
    // It ran long: its crash restarts at the first delay.
    assert_eq!(s.on(Event::Exited { crashed: true }), restarting(MIN_BACKOFF));
}
