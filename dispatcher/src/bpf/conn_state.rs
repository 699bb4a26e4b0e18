//! The kernel's framing state per connection (`conn_state`, keyed by
//! socket cookie): where the slow path takes over after a hand-off, and
//! whether a connection is mid-request. Read and forgotten by the
//! connection tasks with raw map calls on a fd of their own, so the
//! request path takes no lock.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{anyhow, Result};
use aya::maps::{Map, MapData};
use dispatcher_ebpf::abi::ConnState;

use super::sys::{delete_elem, lookup_boxed};

/// The `conn_state` map.
pub struct ConnTable {
    map: MapData,
}

impl ConnTable {
    pub(super) fn new(map: Map) -> Result<ConnTable> {
        match map {
            Map::HashMap(map) => Ok(ConnTable { map }),
            _ => Err(anyhow!("map `conn_state` has an unexpected type")),
        }
    }

    /// The framing state of connection `cookie`, if the kernel tracks it.
    pub fn get(&self, cookie: u64) -> Option<Box<ConnState>> {
        lookup_boxed::<u64, ConnState>(self.map.fd().as_fd().as_raw_fd(), &cookie)
    }

    /// Forgets connection `cookie` (it closed).
    pub fn forget(&self, cookie: u64) {
        let _ = delete_elem(self.map.fd().as_fd().as_raw_fd(), &cookie);
    }
}
