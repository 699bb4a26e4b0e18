//! Writing responses straight into a leased client's socket: as much as
//! the socket takes at once, the rest from a flusher task as it drains,
//! each response traced in the lease's progress entry before and after it
//! goes out (so the dispatcher can tell, if the worker dies, whether the
//! stream stopped between two responses).

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, OnceLock},
};

use tokio::io::{unix::AsyncFd, Interest};

use super::lease::Lease;
use super::wire::Wire;
use super::Outbound;

/// The client's socket, as passed by the dispatcher.
pub(super) struct Sock {
    /// Registered with the reactor only once the send buffer fills up.
    /// Declared before `fd` so it deregisters before the fd closes.
    waiter: OnceLock<AsyncFd<RawFd>>,
    fd: OwnedFd,
}

impl Sock {
    pub(super) fn new(fd: OwnedFd) -> Sock {
        // `sendfile` has no MSG_DONTWAIT: the socket itself must not block
        // (the dispatcher's tokio socket shares this flag already).
        // SAFETY: fcntl on an open descriptor.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 && fl & libc::O_NONBLOCK == 0 {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        Sock { waiter: OnceLock::new(), fd }
    }

    fn waiter(&self) -> io::Result<&AsyncFd<RawFd>> {
        if let Some(w) = self.waiter.get() {
            return Ok(w);
        }
        // SAFETY: `waiter` drops before `fd` closes (field order).
        let w = unsafe { AsyncFd::register_with_interest(self.fd.as_raw_fd(), Interest::WRITABLE) }?;
        // Only the lease's single flusher task gets here.
        let _ = self.waiter.set(w);
        Ok(self.waiter.get().expect("just set"))
    }

    /// Writes as much of `w` as the socket takes now: head and body in
    /// one vectored send, or, for a body that is a file's, the head (with
    /// `MSG_MORE`) and then `sendfile` from the file. At 256 connections a
    /// 1 MiB file copied into each socket ran at 0.74× nginx's rate, which
    /// sends the page cache's pages instead (docs/performance.md).
    fn send(&self, w: &Wire) -> io::Result<usize> {
        let total = w.len();
        let mut done = 0;
        while done < total {
            let mut rest = w.clone();
            rest.advance(done);
            if let Some((file, at, len)) = rest.file_part() {
                let mut off = at as libc::off_t;
                // SAFETY: both descriptors are open; `off` is ours.
                let n = unsafe { libc::sendfile(self.fd.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
                match n {
                    0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file got shorter")),
                    n if n > 0 => {
                        done += n as usize;
                        continue;
                    }
                    _ => {}
                }
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if done > 0 => return Ok(done),
                    _ => return Err(e),
                }
            }
            let parts = rest.parts();
            let parts = if rest.has_file() { [parts[0], &[][..]] } else { parts };
            let more = if rest.has_file() { libc::MSG_MORE } else { 0 };
            let mut iov: Vec<libc::iovec> = parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
                .collect();
            // SAFETY: a zeroed msghdr is valid; it points at `iov`, whose
            // buffers outlive the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len() as _;
            // SAFETY: valid msghdr; MSG_NOSIGNAL so a closed peer is EPIPE,
            // not a signal.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | more) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if done > 0 => return Ok(done),
                    _ => return Err(e),
                }
            }
            done += n as usize;
        }
        Ok(done)
    }
}

impl Lease {
    /// Response `seq` (`len` bytes) is about to go into the socket.
    fn writing(&self, seq: u32, len: usize) {
        if let Some((map, i)) = &self.trace {
            if let Some(e) = map.entry(*i) {
                e.record(seq, self.complete_bytes, len as u32);
            }
        }
    }

    /// Response `seq` (`len` bytes) is wholly in the socket.
    fn written(&mut self, seq: u32, len: usize) {
        self.complete_bytes += len as u64;
        if let Some((map, i)) = &self.trace {
            if let Some(e) = map.entry(*i) {
                e.record(seq.wrapping_add(1), self.complete_bytes, 0);
                e.in_flight.fetch_and(!(1u64 << (seq % 64)), std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// Takes response `seq` (the next in order). True when a flusher has
    /// to be started.
    pub(super) fn push(&mut self, seq: u32, bytes: Wire) -> bool {
        if self.dead {
            return false;
        }
        let len = bytes.len();
        if self.backlog.is_empty() {
            self.writing(seq, len);
            match self.sock.send(&bytes) {
                Ok(n) if n == len => {
                    self.written(seq, len);
                    return false;
                }
                Ok(n) => {
                    let mut rest = bytes;
                    rest.advance(n);
                    self.backlog_bytes += rest.len();
                    self.backlog.push_back((seq, rest, len));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.backlog_bytes += len;
                    self.backlog.push_back((seq, bytes, len));
                }
                Err(_) => {
                    self.dead = true;
                    return false;
                }
            }
        } else {
            self.backlog_bytes += len;
            self.backlog.push_back((seq, bytes, len));
        }
        !std::mem::replace(&mut self.flushing, true)
    }

    /// Writes the backlog out as far as the socket takes it; true once it
    /// is empty.
    pub(super) fn drain(&mut self) -> bool {
        loop {
            let Some((s, b, l)) = self.backlog.front() else { return true };
            let (s, l, fresh) = (*s, *l, b.len() == *l);
            if fresh {
                // Nothing of it is out yet.
                self.writing(s, l);
            }
            let Some((_, b, _)) = self.backlog.front_mut() else { return true };
            match self.sock.send(b) {
                Ok(n) if n == b.len() => {
                    self.backlog_bytes -= n;
                    self.backlog.pop_front();
                    self.written(s, l);
                }
                Ok(n) => {
                    self.backlog_bytes -= n;
                    b.advance(n);
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => {
                    self.dead = true;
                    self.backlog.clear();
                    self.backlog_bytes = 0;
                }
            }
        }
    }
}

impl Outbound {
    pub(super) fn spawn_flusher(self: &Arc<Self>, conn: u64, gen: u32, sock: Arc<Sock>) {
        let out = self.clone();
        tokio::spawn(async move {
            let waiter = match sock.waiter() {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(conn, "cannot wait for the client's socket: {e}");
                    out.with_lease(conn, gen, |l| {
                        l.dead = true;
                        l.backlog.clear();
                    });
                    return;
                }
            };
            loop {
                let Ok(mut ready) = waiter.writable().await else { return };
                let done = out
                    .with_lease(conn, gen, |l| {
                        let empty = l.drain();
                        if empty {
                            l.flushing = false;
                        }
                        empty
                    })
                    .unwrap_or(true);
                if done {
                    return;
                }
                ready.clear_ready();
            }
        });
    }
}
