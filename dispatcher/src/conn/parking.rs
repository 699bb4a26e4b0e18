//! Where a connection waits while a worker writes its responses.
//!
//! The stream verdict drops the segments it queues, but the kernel still
//! wakes every reader polling the socket for each one (the psock's
//! `data_ready` runs whatever the verdict), so a dispatcher that kept
//! polling a leased connection would wake once per request just to find
//! nothing to read: measured, a third of a core at 110k req/s.
//!
//! So a leased connection leaves tokio's poller and is *parked* here: in an
//! epoll set of its own that watches only for the peer closing
//! (`EPOLLRDHUP`, plus the always-reported `EPOLLHUP`/`EPOLLERR`), which a
//! data wake-up does not trigger. The other reason to look at the socket,
//! the kernel handing the connection to the slow path, arrives as an event
//! on the `handoff_events` ring. Either wakes the connection's task, which
//! takes the lease back and polls the socket itself again.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Arc,
};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::{unix::AsyncFd, Interest};

use crate::deliver::Conns;

/// Most events taken per `epoll_wait`.
const BATCH: usize = 256;

/// The parking epoll set.
pub struct Parking {
    epoll: AsyncFd<OwnedFd>,
}

/// The set as nix sees it (borrowing our fd).
fn set(fd: &OwnedFd) -> std::mem::ManuallyDrop<Epoll> {
    // SAFETY: the Epoll never drops (ManuallyDrop), so the fd stays ours.
    std::mem::ManuallyDrop::new(Epoll(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd.as_raw_fd()) }))
}

impl Parking {
    /// Makes the set and the task that wakes connections from it.
    pub fn start(conns: Arc<Conns>) -> io::Result<Arc<Parking>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        // SAFETY: the AsyncFd owns the epoll fd for as long as it is registered.
        let p = Arc::new(Parking { epoll: unsafe { AsyncFd::register_with_interest(epoll.0, Interest::READABLE) }? });
        let watcher = p.clone();
        tokio::spawn(async move {
            let mut events = vec![EpollEvent::empty(); BATCH];
            loop {
                let Ok(mut ready) = watcher.epoll.readable().await else { return };
                match set(watcher.epoll.get_ref()).wait(&mut events, EpollTimeout::ZERO) {
                    Ok(0) => ready.clear_ready(),
                    Ok(n) => {
                        for e in &events[..n] {
                            conns.wake(e.data());
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::error!("parked connections' epoll: {e}");
                        return;
                    }
                }
            }
        });
        Ok(p)
    }

    /// Watches `sock` (connection `cookie`) for the peer closing.
    pub fn park(&self, sock: impl AsFd, cookie: u64) -> io::Result<()> {
        let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        set(self.epoll.get_ref()).add(sock, EpollEvent::new(flags, cookie)).map_err(io::Error::from)
    }

    /// Stops watching `sock`. Must happen before the dispatcher closes it:
    /// a worker's copy keeps the socket, and so this registration, alive.
    pub fn unpark(&self, sock: impl AsFd) {
        if let Err(e) = set(self.epoll.get_ref()).delete(sock.as_fd()) {
            tracing::warn!(fd = sock.as_fd().as_raw_fd(), "unparking a connection: {e}");
        }
    }
}
