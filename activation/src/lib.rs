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
//!
//! Layout: `spawn` starts one worker process with its handles as its
//! user; `policy` is how a pool's worker is run; `state` is the
//! supervisor's state machine, every decision and no I/O; `supervise` is
//! its driver, which turns the slot's I/O into the machine's events and
//! carries out its actions; `slot` and `signals` are what the dispatcher
//! gives it. This file holds what they share: the launch contract (the
//! worker's environment, fd numbers and handles), the restart limits, the
//! worker's spec and the errors.

use std::{os::fd::OwnedFd, path::PathBuf, time::Duration};

/// The environment a worker is started with (the worker library reads
/// the same names).
pub mod env {
    /// The inherited ring buffer fd.
    pub const RING_FD: &str = "DISPATCHER_RING_FD";
    /// The inherited control socket fd.
    pub const CTL_FD: &str = "DISPATCHER_CTL_FD";
    /// The inherited lease socket fd (absent: the dispatcher writes every
    /// response itself).
    pub const LEASE_FD: &str = "DISPATCHER_LEASE_FD";
    /// The inherited awake-flag fd of the ring (absent: every record wakes
    /// the worker).
    pub const AWAKE_FD: &str = "DISPATCHER_AWAKE_FD";
    /// The inherited progress map fd (a memfd; absent: no trace).
    pub const PROGRESS_FD: &str = "DISPATCHER_PROGRESS_FD";
    /// The idle time-out in seconds (absent: none).
    pub const IDLE_TIMEOUT_SECS: &str = "DISPATCHER_IDLE_TIMEOUT_SECS";
    /// The request count after which the worker stops pulling and exits
    /// (recycling; absent: never).
    pub const RECYCLE_REQUESTS: &str = "DISPATCHER_RECYCLE_REQUESTS";
    /// The pool's name.
    pub const POOL: &str = "DISPATCHER_POOL";
    /// Set (to 1) when the dispatcher keeps an access log: the worker
    /// reports each request it answers (see `worker::proto::RESP_LOG`).
    pub const ACCESS_LOG: &str = "DISPATCHER_ACCESS_LOG";
}

/// Fd number the worker finds its ring at.
pub const RING_FD: i32 = 3;
/// Fd number the worker finds its control socket at.
pub const CTL_FD: i32 = 4;
/// Fd number the worker finds its lease socket at (when it has one).
pub const LEASE_FD: i32 = 5;
/// Fd number the worker finds its ring's awake flag at (when it has one).
pub const AWAKE_FD: i32 = 6;
/// Fd number the worker finds its progress map at (when it has one).
pub const PROGRESS_FD: i32 = 7;
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

/// What a worker inherits.
pub struct Handles {
    /// The pool's ring buffer (a BPF map fd), if the pool has one.
    pub ring: Option<OwnedFd>,
    /// The worker's end of its control socket.
    pub ctl: OwnedFd,
    /// The worker's end of its lease socket (connections it may write to
    /// directly arrive there), if the dispatcher grants leases.
    pub lease: Option<OwnedFd>,
    /// The ring's awake flag (an mmapable BPF array), if the ring has one.
    pub awake: Option<OwnedFd>,
    /// The progress map of leased connections (a memfd), with leases.
    pub progress: Option<OwnedFd>,
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
}

mod policy;
mod signals;
mod slot;
mod spawn;
mod state;
mod supervise;

pub use policy::{Policy, StartMode};
pub use signals::Signals;
pub use slot::{Progress, Slot};
pub use spawn::spawn;
pub use supervise::supervise;
