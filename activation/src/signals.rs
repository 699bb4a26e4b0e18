//! What wakes a supervisor besides its worker: demand events, operator
//! requests (counted, so that none is lost to a wake-up nobody waited
//! for) and fault injection.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tokio::sync::Notify;

use crate::state::Requests;

/// What wakes a supervisor besides its worker exiting.
#[derive(Clone, Default)]
pub struct Signals {
    /// A request was queued on the slot while it had no worker.
    pub demand: Arc<Notify>,
    /// An operator asked to start the (stopped) pool again: the count of
    /// such requests, and its wake-up.
    pub start: Arc<Notify>,
    pub start_requests: Arc<AtomicU64>,
    /// Fault injection for tests: the supervisor panics when this is
    /// notified while it watches a worker (the dispatcher wires it up only
    /// with `DISPATCHER_FAULTS=1`).
    pub fault: Arc<Notify>,
    /// Operator requests, counted (shared by a pool's slots): stop the
    /// pool (its requests get 503 until a start), recycle its workers.
    /// `ops` wakes the supervisors to look at the counts.
    pub halt_requests: Arc<AtomicU64>,
    /// The start count when the last stop was asked for: a start asked
    /// for after it (even before a supervisor saw the stop) starts the
    /// pool again.
    pub halt_start_mark: Arc<AtomicU64>,
    pub recycle_requests: Arc<AtomicU64>,
    pub ops: Arc<Notify>,
}

impl Signals {
    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }

    /// The request counts as they are now, for the state machine;
    /// `shutdown`: the dispatcher is stopping the supervisor.
    pub(crate) fn requests(&self, shutdown: bool) -> Requests {
        // The stop count before its mark: a stop asked for stores its mark
        // first, so a stop seen here comes with its own mark (or a later).
        let halts = Self::count(&self.halt_requests);
        let halt_start_mark = Self::count(&self.halt_start_mark);
        let starts = Self::count(&self.start_requests);
        let recycles = Self::count(&self.recycle_requests);
        Requests { shutdown, halts, halt_start_mark, starts, recycles }
    }
}
