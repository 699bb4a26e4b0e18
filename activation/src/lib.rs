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

use std::{path::PathBuf, time::Duration};

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
