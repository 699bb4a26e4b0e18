//! The launch contract: how a worker process finds what the process
//! manager (`activation`) started it with. Its handles are inherited at
//! fixed fd numbers, each named in an environment variable (absent: the
//! worker does without that handle), next to a few settings.
//!
//! The names and numbers are `no_std`; [`Handles`], which owns the
//! descriptors, needs the `std` feature.

/// The environment a worker is started with (the process manager sets
/// these names, the worker library reads them).
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
    /// The address clients connect to (`127.0.0.1:8080`).
    pub const LISTEN: &str = "DISPATCHER_LISTEN";
    /// Set (to 1) when the dispatcher keeps an access log: the worker
    /// reports each request it answers (`wire::WorkerFrame::Log`).
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

#[cfg(feature = "std")]
pub use handles::Handles;

#[cfg(feature = "std")]
mod handles {
    use std::os::fd::OwnedFd;

    /// What a worker inherits (what the process manager passes is what
    /// the worker library takes).
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
}
