//! The dispatcher's side of the pools: what a configuration's pools
//! become at run time ([`Registry`], also reloads), one pool and its
//! worker slots ([`PoolLink`]), a slot as activation drives it (`slot`),
//! and a worker's control channel (`channel`).
//!
//! Where a worker is started: [`Registry::apply`] starts one supervisor
//! per slot (`slot::supervise`), and activation starts the process with
//! the handles `slot` makes for it.

mod channel;
mod launch;
mod link;
pub mod registry;
mod slot;

use std::sync::{Arc, Mutex};

pub use link::{PoolLink, SlotLink};
pub use registry::Registry;

use crate::{access_log::AccessLog, bpf::Rings, deliver::Conns};

/// What the pools use of the rest of the dispatcher.
pub struct Context {
    /// The rings, awake flags and pool entries in the kernel.
    pub rings: Mutex<Rings>,
    /// Where a worker's frames go.
    pub conns: Arc<Conns>,
    /// Workers report the requests they answer (when a log is kept).
    pub access_log: Option<AccessLog>,
    /// Workers get a lease socket (`fast_path.direct_responses`).
    pub leases: bool,
    /// Where clients connect: workers get it in `DISPATCHER_LISTEN` (a
    /// FastCGI pool's SERVER_ADDR and SERVER_PORT).
    pub listen: std::net::SocketAddr,
}
