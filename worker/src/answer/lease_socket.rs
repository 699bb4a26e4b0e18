//! Reading the dispatcher's lease socket: one message per packet, a
//! grant with the client's socket attached, handled in the order sent
//! (by a reader task, and synchronously before a response that may have
//! raced its grant).

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::Arc,
};

use tokio::io::{unix::AsyncFd, Interest};

use super::Outbound;
use crate::proto::{DecodeError, LeaseMsg, LEASE_MSG_LEN};
use bytes::Bytes;

impl Outbound {
    /// Handles the lease messages already waiting, without blocking.
    pub(super) fn poll_leases(self: &Arc<Self>) {
        let Some(fd) = self.lease_sock.get() else { return };
        // Receive and handle as one step, here and in the reader task:
        // lease messages must be handled in the order they were sent.
        let _order = self.lease_order.lock().unwrap();
        while let Ok(Some((m, f, early))) = recv_lease(fd.as_raw_fd()) {
            self.on_message(m, f, early);
        }
    }

    fn on_message(self: &Arc<Self>, m: LeaseMsg, fd: Option<OwnedFd>, early: Bytes) {
        match m {
            LeaseMsg::Tunnel { conn } => self.tunnel_arrived(conn, fd, early),
            m => self.on_lease(m, fd),
        }
    }

    /// Reads the lease socket until the dispatcher closes it.
    pub(super) fn spawn_lease_reader(self: &Arc<Self>, fd: OwnedFd) -> io::Result<()> {
        set_nonblocking(&fd)?;
        // Hello: the kernel attaches this process's credentials, and the
        // dispatcher grants leases only once it knows who to let write
        // into a leased socket (its lease gate checks the writer).
        // SAFETY: send(2) of a constant buffer on a socket we own.
        if unsafe { libc::send(fd.as_raw_fd(), b"hello".as_ptr().cast(), 5, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }
            < 0
        {
            tracing::warn!("lease socket hello: {}", io::Error::last_os_error());
        }
        let fd = Arc::new(fd);
        let _ = self.lease_sock.set(fd.clone());
        // SAFETY: the fd stays open while the AsyncFd (holding an Arc) lives.
        let afd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        let out = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok(mut ready) = afd.readable().await else { return };
                loop {
                    let order = out.lease_order.lock().unwrap();
                    match recv_lease(afd.get_ref().as_raw_fd()) {
                        Ok(Some((m, fd, early))) => {
                            out.on_message(m, fd, early);
                            drop(order);
                        }
                        Ok(None) => return,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            ready.clear_ready();
                            break;
                        }
                        Err(e) => {
                            tracing::warn!("lease socket: {e}");
                            return;
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One lease message and the fd it carries. `None` at end of stream. A
/// message of a kind this worker does not know is logged and skipped.
fn recv_lease(fd: RawFd) -> io::Result<Option<(LeaseMsg, Option<OwnedFd>, Bytes)>> {
    loop {
        let Some((m, passed, early)) = recv_lease_raw(fd)? else { return Ok(None) };
        match m {
            Ok(m) => return Ok(Some((m, passed, early))),
            Err(e @ DecodeError::UnknownKind { .. }) => tracing::warn!("lease socket: {e}"),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// A lease socket packet: its message, decoded, the fd it carried, and
/// what followed the record (a tunnel's early bytes).
type Packet = (Result<LeaseMsg, DecodeError>, Option<OwnedFd>, Bytes);

/// One lease socket packet. `None` at end of stream.
fn recv_lease_raw(fd: RawFd) -> io::Result<Option<Packet>> {
    thread_local! {
        // Only a tunnel's message is longer than a record; its early bytes
        // land here (one buffer per thread, not one per message: a grant
        // or denial follows most responses).
        static MORE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; crate::proto::TUNNEL_MAX_EARLY]);
    }
    MORE.with(|more| recv_into(fd, &mut more.borrow_mut()))
}

fn recv_into(fd: RawFd, more: &mut [u8]) -> io::Result<Option<Packet>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; LEASE_MSG_LEN];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(&mut buf), io::IoSliceMut::new(more)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT)
        .map_err(io::Error::from)?;
    let n = msg.bytes;
    // Out of descriptors: the kernel dropped the socket (the grant is then
    // given back as unusable).
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let mut passed = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for f in fds {
                // SAFETY: the kernel just installed this fd for us.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                if passed.is_none() {
                    passed = Some(owned);
                }
            }
        }
    }
    if n == 0 {
        return Ok(None);
    }
    if truncated {
        tracing::warn!("a connection passed to this worker was lost (out of file descriptors?)");
    }
    let early = match n > LEASE_MSG_LEN {
        true => Bytes::copy_from_slice(&more[..n - LEASE_MSG_LEN]),
        false => Bytes::new(),
    };
    Ok(Some((LeaseMsg::decode(&buf[..n.min(LEASE_MSG_LEN)]), passed, early)))
}
