//! The driver on real processes (`/bin/sh`, run as the current user) and
//! a fake slot that records what it is told, in order.

use std::{
    fs::File,
    os::fd::OwnedFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
};

use super::*;
use crate::{Handles, Progress};

/// How long a step may take on a loaded machine (the steps take well
/// under a second; nothing is timed).
const PATIENCE: Duration = Duration::from_secs(30);

/// A slot callback.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Started(u32),
    Adopted(u32),
    Exited(bool),
    Stopped(bool, String),
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    /// What `vacate` answers: requests wait.
    waiting: Arc<AtomicBool>,
    vacated: Arc<AtomicU64>,
}

impl Slot for Fake {
    fn handles(&mut self) -> anyhow::Result<Handles> {
        let ctl = OwnedFd::from(File::open("/dev/null")?);
        Ok(Handles { ring: None, ctl, lease: None, awake: None, progress: None })
    }
    fn vacate(&mut self) -> bool {
        self.vacated.fetch_add(1, SeqCst);
        self.waiting.load(SeqCst)
    }
    fn stopped(&mut self, stopped: bool, why: &str) {
        self.seen.lock().unwrap().push(Seen::Stopped(stopped, why.to_string()));
    }
    fn progress(&mut self) -> Progress {
        Progress::default()
    }
    fn started(&mut self, pid: u32) {
        self.seen.lock().unwrap().push(Seen::Started(pid));
    }
    fn adopted(&mut self, pid: u32) {
        self.seen.lock().unwrap().push(Seen::Adopted(pid));
    }
    fn exited(&mut self, crashed: bool) {
        self.seen.lock().unwrap().push(Seen::Exited(crashed));
    }
}

impl Fake {
    /// The callbacks, once there are at least `n` (or `PATIENCE` passed).
    async fn wait_for(&self, n: usize) -> Vec<Seen> {
        let t0 = Instant::now();
        loop {
            let seen = self.seen.lock().unwrap().clone();
            if seen.len() >= n || t0.elapsed() > PATIENCE {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The operator's requests, as `PoolLink` in the dispatcher asks them.
fn request_halt(s: &Signals) {
    s.halt_start_mark.store(s.start_requests.load(SeqCst), SeqCst);
    s.halt_requests.fetch_add(1, SeqCst);
    s.ops.notify_waiters();
}

fn request_start(s: &Signals) {
    s.start_requests.fetch_add(1, SeqCst);
    s.start.notify_waiters();
}

fn spec(script: &str) -> WorkerSpec {
    WorkerSpec {
        pool: "p".into(),
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: Vec::new(),
        user: None,
        group: None,
    }
}

fn policy(start: StartMode) -> Policy {
    Policy::bare(start, Duration::from_secs(600), Duration::from_secs(10))
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

async fn shut_down(stop: watch::Sender<bool>, supervisor: JoinHandle<()>) {
    stop.send(true).unwrap();
    tokio::time::timeout(PATIENCE, supervisor).await.expect("the supervisor ends").unwrap();
}

#[tokio::test]
async fn a_crashing_worker_is_restarted_until_rapid_fail_stops_the_pool_and_a_start_runs_it_again() {
    let slot = Fake::default();
    let signals = Signals::default();
    let (stop, rx) = watch::channel(false);
    let policy = Policy { rapid_fail: Some((2, Duration::from_secs(600))), ..policy(StartMode::AlwaysRunning) };
    let sup = tokio::spawn(supervise(spec("exit 1"), policy, slot.clone(), signals.clone(), rx));

    let seen = slot.wait_for(5).await;
    let [Seen::Started(a), Seen::Exited(true), Seen::Started(b), Seen::Exited(true), Seen::Stopped(true, why)] =
        &seen[..]
    else {
        panic!("{seen:?}")
    };
    assert!(*a != 0 && a != b, "{seen:?}");
    assert!(why.contains("2 crashes within 600 s (rapid-fail protection)"), "{why}");

    request_start(&signals);
    let seen = slot.wait_for(8).await;
    assert!(matches!(&seen[5..8], [Seen::Stopped(false, _), Seen::Started(_), Seen::Exited(true)]), "{seen:?}");
    shut_down(stop, sup).await;
}

#[tokio::test]
async fn an_on_demand_worker_starts_at_a_request_an_operator_stop_ends_it_and_a_start_runs_another() {
    let slot = Fake::default();
    let signals = Signals::default();
    let (stop, rx) = watch::channel(false);
    let sup =
        tokio::spawn(supervise(spec("exec sleep 600"), policy(StartMode::OnDemand), slot.clone(), signals.clone(), rx));

    // No request: the slot is looked at, and no worker starts.
    let t0 = Instant::now();
    while slot.vacated.load(SeqCst) == 0 && t0.elapsed() < PATIENCE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(slot.vacated.load(SeqCst) > 0);
    assert_eq!(slot.wait_for(0).await, []);
    slot.waiting.store(true, SeqCst);
    signals.demand.notify_one();
    let seen = slot.wait_for(1).await;
    let [Seen::Started(first)] = seen[..] else { panic!("{seen:?}") };
    assert!(alive(first));

    request_halt(&signals);
    let seen = slot.wait_for(3).await;
    let why = "stopped by the operator; `dispatcher start p` starts it again".to_string();
    assert_eq!(seen[1..], [Seen::Exited(false), Seen::Stopped(true, why)]);
    assert!(!alive(first), "the worker outlived the stop");

    request_start(&signals);
    let seen = slot.wait_for(5).await;
    let [_, _, _, Seen::Stopped(false, _), Seen::Started(second)] = seen[..] else { panic!("{seen:?}") };
    assert!(alive(second));

    // At shutdown the worker is stopped, and the slot told nothing more.
    shut_down(stop, sup).await;
    assert!(!alive(second), "the worker outlived the supervisor");
    assert_eq!(slot.wait_for(0).await.len(), 5);
}

#[tokio::test]
async fn a_new_supervisor_adopts_the_worker_a_panicked_one_left() {
    let slot = Fake::default();
    let signals = Signals::default();
    let (stop, rx) = watch::channel(false);
    let sup = tokio::spawn(supervise(
        spec("exec sleep 600"),
        policy(StartMode::AlwaysRunning),
        slot.clone(),
        signals.clone(),
        rx,
    ));
    let seen = slot.wait_for(1).await;
    let [Seen::Started(pid)] = seen[..] else { panic!("{seen:?}") };

    signals.fault.notify_one();
    let seen = slot.wait_for(2).await;
    assert_eq!(seen, [Seen::Started(pid), Seen::Adopted(pid)]);
    assert!(alive(pid), "the worker did not survive its supervisor's panic");
    shut_down(stop, sup).await;
    assert!(!alive(pid));
}
