//! The kernel's framing state per connection (`conn_state`, keyed by
//! socket cookie): where the slow path takes over after a hand-off, and
//! whether a connection is mid-request. Read and forgotten by the
//! connection tasks with raw map calls on a fd of their own, so the
//! request path takes no lock.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{anyhow, Result};
use aya::maps::{Map, MapData};
use dispatcher_ebpf::abi::{ConnState, LeaseHolder};

use super::sys::{delete_elem, lookup_boxed, update_elem};

/// The `conn_state` map, `paused` (connections the verdict hands to user
/// space at their next head), and `lease_holder` (who the lease gate lets
/// write into each socket) when the gate is on.
pub struct ConnTable {
    map: MapData,
    paused: MapData,
    holder: Option<MapData>,
}

impl ConnTable {
    pub(super) fn new(map: Map, paused: Map, holder: Option<Map>) -> Result<ConnTable> {
        let holder = match holder {
            None => None,
            Some(Map::SkStorage(m)) => Some(m),
            Some(_) => return Err(anyhow!("map `lease_holder` has an unexpected type")),
        };
        match (map, paused) {
            (Map::HashMap(map), Map::HashMap(paused)) => Ok(ConnTable { map, paused, holder }),
            _ => Err(anyhow!("map `conn_state` or `paused` has an unexpected type")),
        }
    }

    /// Lets process `tgid` (a lease holder; 0: nobody but the dispatcher)
    /// write into the socket `fd` of connection `cookie`, when the lease
    /// gate is on. False if the gate could not be told: the lease must
    /// not go out then (the holder's writes would be refused).
    pub fn let_write(&self, fd: impl AsRawFd, cookie: u64, tgid: u32) -> bool {
        let Some(h) = &self.holder else { return true };
        let v = LeaseHolder { cookie, tgid, _pad: 0 };
        match update_elem(h.fd().as_fd().as_raw_fd(), &fd.as_raw_fd(), &v) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(conn = cookie, tgid, "could not tell the lease gate who may write: {e}");
                false
            }
        }
    }

    /// Whether the lease gate is on.
    pub fn gated(&self) -> bool {
        self.holder.is_some()
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
