//! The kernel's framing state per connection (`conn_state`, keyed by
//! socket cookie): where the slow path takes over after a hand-off, and
//! whether a connection is mid-request. Read and forgotten by the
//! connection tasks with raw map calls on a fd of their own, so the
//! request path takes no lock.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{anyhow, Result};
use aya::maps::{Map, MapData};
use dispatcher_ebpf::abi::ConnState;

use super::sys::{delete_elem, lookup_boxed, update_elem};

/// The `conn_state` map, and `paused` (connections the verdict hands
/// to user space at their next head).
pub struct ConnTable {
    map: MapData,
    paused: MapData,
}

impl ConnTable {
    pub(super) fn new(map: Map, paused: Map) -> Result<ConnTable> {
        match (map, paused) {
            (Map::HashMap(map), Map::HashMap(paused)) => Ok(ConnTable { map, paused }),
            _ => Err(anyhow!("map `conn_state` or `paused` has an unexpected type")),
        }
    }

    /// Stops the kernel framing connection `cookie`: its next head goes
    /// to user space (which then reads only as fast as the client reads
    /// its answers).
    pub fn pause(&self, cookie: u64) {
        if let Err(e) = update_elem(self.paused.fd().as_fd().as_raw_fd(), &cookie, &1u32) {
            tracing::warn!(conn = cookie, "could not pause the connection in the kernel: {e}");
        }
    }

    /// The framing state of connection `cookie`, if the kernel tracks it.
    pub fn get(&self, cookie: u64) -> Option<Box<ConnState>> {
        lookup_boxed::<u64, ConnState>(self.map.fd().as_fd().as_raw_fd(), &cookie)
    }

    /// Forgets connection `cookie` (it closed).
    pub fn forget(&self, cookie: u64) {
        let _ = delete_elem(self.map.fd().as_fd().as_raw_fd(), &cookie);
        let _ = delete_elem(self.paused.fd().as_fd().as_raw_fd(), &cookie);
    }
}
