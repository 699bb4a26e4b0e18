//! How a pool's worker is run: WAS's application-pool settings.

use std::time::Duration;

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

#[cfg(test)]
impl Policy {
    /// A start mode and the start-up and shutdown limits, nothing else
    /// (no idle time-out, rapid-fail, ping or recycling): what the tests
    /// add to.
    pub(crate) fn bare(start: StartMode, startup_limit: Duration, shutdown_limit: Duration) -> Policy {
        Policy {
            start,
            idle_timeout: None,
            rapid_fail: None,
            ping: None,
            startup_limit,
            shutdown_limit,
            recycle_requests: None,
            recycle_interval: None,
            recycle_private_kib: None,
        }
    }
}
