//! The kernel's side of spliced tunnels (see `programs/tunnel.rs`): the
//! app's sockets in `tunnels`, how each socket of a tunnel is steered
//! (`tunnel_ctl`), and the verdict's counters for the app's sockets
//! (`tunnel_seen`; a client's are in its `ConnState`). Owned by the
//! dispatcher's splice tasks.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use anyhow::{anyhow, Result};
use aya::maps::{Map, MapData};
use dispatcher_ebpf::abi::{TunnelCtl, TunnelSeen};

use super::sys::{delete_elem, lookup_boxed, update_elem};

/// `tunnels`, `tunnel_ctl` and `tunnel_seen`.
pub struct TunnelTable {
    sockets: MapData,
    ctl: MapData,
    seen: MapData,
}

impl TunnelTable {
    pub(super) fn new(sockets: Map, ctl: Map, seen: Map) -> Result<TunnelTable> {
        match (sockets, ctl, seen) {
            (Map::SockHash(sockets), Map::HashMap(ctl), Map::HashMap(seen)) => Ok(TunnelTable { sockets, ctl, seen }),
            _ => Err(anyhow!("map `tunnels`, `tunnel_ctl` or `tunnel_seen` has an unexpected type")),
        }
    }

    /// Puts the app's socket `fd` (cookie `cookie`) under the `tunnel`
    /// verdict, steered by `ctl` from its first segment on.
    pub fn add_app(&self, fd: BorrowedFd<'_>, cookie: u64, ctl: TunnelCtl) -> std::io::Result<()> {
        update_elem(self.seen.fd().as_fd().as_raw_fd(), &cookie, &TunnelSeen::default())?;
        self.steer(cookie, ctl)?;
        // The socket's fd is the value a sockhash update takes.
        update_elem(self.sockets.fd().as_fd().as_raw_fd(), &cookie, &(fd.as_raw_fd() as u32))
    }

    /// Sets how socket `cookie`'s segments are steered.
    pub fn steer(&self, cookie: u64, ctl: TunnelCtl) -> std::io::Result<()> {
        update_elem(self.ctl.fd().as_fd().as_raw_fd(), &cookie, &ctl)
    }

    /// The verdict's counters for app socket `cookie`.
    pub fn seen(&self, cookie: u64) -> Option<TunnelSeen> {
        lookup_boxed::<u64, TunnelSeen>(self.seen.fd().as_fd().as_raw_fd(), &cookie).map(|b| *b)
    }

    /// Stops steering socket `cookie` (its segments go to user space).
    pub fn unsteer(&self, cookie: u64) {
        let _ = delete_elem(self.ctl.fd().as_fd().as_raw_fd(), &cookie);
    }

    /// Forgets app socket `cookie` (the kernel also drops a socket from
    /// `tunnels` when it closes).
    pub fn remove_app(&self, cookie: u64) {
        self.unsteer(cookie);
        let _ = delete_elem(self.sockets.fd().as_fd().as_raw_fd(), &cookie);
        let _ = delete_elem(self.seen.fd().as_fd().as_raw_fd(), &cookie);
    }
}
