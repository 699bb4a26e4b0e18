//! The dispatcher's side of a worker slot, as a supervisor sees it: the
//! handles a new worker gets, the queue's progress, and the callbacks
//! that tell the dispatcher what became of the slot's worker.

use crate::Handles;

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
    /// Rapid-fail protection or the operator stopped the pool (`true`,
    /// saying `why`) or it was started again (`false`).
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
