//! The dispatcher's end of a worker's lease socket: grants (with the
//! client's socket, by SCM_RIGHTS), denials, revocations and forgets, and
//! which leases are out, so that a worker's death reaches every
//! connection it held. The protocol is in `dispatcher_ebpf::wire`.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::{atomic::Ordering, Arc, Mutex},
};

use anyhow::{Context, Result};
use dispatcher_ebpf::wire::{LeaseMsg, LEASE_MSG_LEN, NO_ENTRY};
use tokio::io::{unix::AsyncFd, Interest};

use super::{Conns, Frame};

/// The dispatcher's end of one worker's lease socket: grants (with the
/// connection's socket), denials, revocations and forgets, in order.
///
/// A message is sent at once when nothing is queued ahead of it, so a
/// grant is in the worker's socket before the client can have read the
/// response that preceded it and sent its next request (which the worker
/// should already write itself); a full socket queues the rest for a
/// writer task.
#[derive(Debug)]
pub struct LeaseTx {
    sock: AsyncFd<OwnedFd>,
    /// The worker's trace of its leased connections (see
    /// `worker::progress`), read after it dies.
    progress: Arc<worker::progress::ProgressMap>,
    /// Messages not sent yet (the front one is the next to go), and the
    /// connections with a lease out (told when the worker dies).
    queue: Mutex<LeaseQueue>,
    wake: tokio::sync::Notify,
    /// The worker is gone (its control or lease socket closed), and with
    /// it whatever it held.
    dead: std::sync::atomic::AtomicBool,
    /// The worker's process id, from the credentials the kernel attached
    /// to its hello on the lease socket (not the pid activation started:
    /// a pool's command may be a wrapper that runs the worker as its
    /// child). 0 until then; no lease is granted before it is known,
    /// since the lease gate lets only this process write.
    pid: std::sync::atomic::AtomicU32,
}

#[derive(Debug, Default)]
struct LeaseQueue {
    msgs: std::collections::VecDeque<(LeaseMsg, Option<OwnedFd>, bytes::Bytes)>,
    /// Connection → (generation, trace entry) of the lease it has out
    /// with this worker.
    granted: std::collections::HashMap<u64, (u32, u32)>,
    /// Trace entries given back, and the next never used.
    free: Vec<u32>,
    next_entry: u32,
}

impl LeaseTx {
    /// Sends `msg` (with `fd` passed along for a grant), or queues it.
    /// False when the worker is gone. A grant is recorded, so that if the
    /// worker dies before giving it back the connection hears of it
    /// (after everything the worker sent before dying).
    pub fn send(&self, mut msg: LeaseMsg, fd: Option<OwnedFd>) -> bool {
        let mut q = self.queue.lock().unwrap();
        if self.is_closed() {
            return false;
        }
        if let LeaseMsg::Grant { conn, from, gen, entry } = &mut msg {
            let e = match q.free.pop() {
                Some(s) => s,
                None if (q.next_entry as usize) < worker::progress::ENTRIES => {
                    q.next_entry += 1;
                    q.next_entry - 1
                }
                None => NO_ENTRY,
            };
            *entry = e;
            // Fresh before the worker sees it: a worker that dies without
            // reading the grant leaves this, not an earlier lease's trace.
            self.progress.reset(e, *conn, *from);
            q.granted.insert(*conn, (*gen, e));
        }
        if q.msgs.is_empty() {
            match send_lease(self.sock.get_ref(), &msg, fd.as_ref(), &[]) {
                // `fd` (our duplicate of the client's socket) closes here:
                // the worker has its own now.
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // The message did not go: a grant is not out.
                    tracing::debug!("lease socket: {e}");
                    if let LeaseMsg::Grant { conn, .. } = msg {
                        if let Some((_, e)) = q.granted.remove(&conn) {
                            if e != NO_ENTRY {
                                q.free.push(e);
                            }
                        }
                        return false;
                    }
                    return true;
                }
            }
        }
        q.msgs.push_back((msg, fd, bytes::Bytes::new()));
        self.wake.notify_one();
        true
    }

    /// Hands connection `conn` (its socket `fd`) over to the worker, with
    /// `early`, what the client sent after its upgrade request
    /// ([`LeaseMsg::Tunnel`]). False when the worker is gone.
    pub fn tunnel(&self, conn: u64, fd: OwnedFd, early: bytes::Bytes) -> bool {
        let mut q = self.queue.lock().unwrap();
        if self.is_closed() {
            return false;
        }
        let msg = LeaseMsg::Tunnel { conn };
        if q.msgs.is_empty() {
            match send_lease(self.sock.get_ref(), &msg, Some(&fd), &early) {
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!("lease socket: {e}");
                    return false;
                }
            }
        }
        q.msgs.push_back((msg, Some(fd), early));
        self.wake.notify_one();
        true
    }

    /// Connection `conn` has no lease out with this worker any more.
    pub fn settled(&self, conn: u64) {
        let mut q = self.queue.lock().unwrap();
        if let Some((_, e)) = q.granted.remove(&conn) {
            if e != NO_ENTRY {
                q.free.push(e);
            }
        }
    }

    /// What the (dead) worker traced for `conn`'s lease `gen`: (the next
    /// response it would have written, one past the last request it took,
    /// bytes of the complete responses it wrote).
    pub fn trace(&self, conn: u64, entry: u32) -> Option<worker::progress::Trace> {
        let e = self.progress.entry(entry)?;
        (e.conn.load(std::sync::atomic::Ordering::Acquire) == conn).then(|| e.read())
    }

    /// The worker exited (its control socket ended, after every frame it
    /// sent): the leases it still held are lost.
    pub fn mark_dead(&self, conns: &Conns) {
        let lost: Vec<(u64, (u32, u32))> = {
            let mut q = self.queue.lock().unwrap();
            self.dead.store(true, Ordering::Relaxed);
            q.msgs.clear();
            q.granted.drain().collect()
        };
        for (conn, (gen, entry)) in lost {
            conns.lease_lost(conn, gen, entry);
        }
        self.wake.notify_one();
    }

    /// The worker's process id (0: not known yet).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Reads what the worker sends on its lease socket until it closes:
    /// its hello first (any packet), whose sender's process id, checked by
    /// the kernel (`SO_PASSCRED`), is the one the lease gate will let
    /// write (only the first counts); then 101s to splice
    /// ([`LeaseMsg::Splice`]), each delivered to its connection.
    async fn read_worker(self: Arc<Self>, conns: Arc<Conns>) {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
        let mut buf = vec![0u8; LEASE_MSG_LEN + 4096 + dispatcher_ebpf::wire::TUNNEL_MAX_EARLY];
        loop {
            let Ok(mut g) = self.sock.readable().await else { return };
            let mut cmsg = nix::cmsg_space!(UnixCredentials, [std::os::fd::RawFd; 1]);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let r = recvmsg::<()>(
                self.sock.get_ref().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let (n, pid, fd) = match r {
                Ok(m) if m.bytes == 0 => return,
                Ok(m) => {
                    let (mut pid, mut fd) = (None, None);
                    for c in m.cmsgs().ok().into_iter().flatten() {
                        match c {
                            ControlMessageOwned::ScmCredentials(c) => pid = Some(c.pid()),
                            ControlMessageOwned::ScmRights(fds) => {
                                for f in fds {
                                    // SAFETY: the kernel just gave us this descriptor.
                                    let f = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(f) };
                                    fd.get_or_insert(f);
                                }
                            }
                            _ => {}
                        }
                    }
                    (m.bytes, pid, fd)
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    g.clear_ready();
                    continue;
                }
                Err(e) => {
                    tracing::debug!("lease socket read: {e}");
                    return;
                }
            };
            if self.pid() == 0 {
                if let Some(pid) = pid.filter(|&p| p > 0) {
                    self.pid.store(pid as u32, Ordering::Relaxed);
                    tracing::debug!(pid, "lease socket: the worker said hello");
                }
                continue;
            }
            match LeaseMsg::decode(&buf[..n]) {
                Ok(LeaseMsg::Splice { conn, seq, head_len, idle_secs }) => {
                    let rest = &buf[LEASE_MSG_LEN.min(n)..n];
                    let head_len = (head_len as usize).min(rest.len());
                    let (Some(app), true) = (fd, head_len > 0) else {
                        tracing::warn!(conn, "a splice from the worker without the app's socket or a 101; ignored");
                        continue;
                    };
                    let head = bytes::Bytes::copy_from_slice(&rest[..head_len]);
                    let early = bytes::Bytes::copy_from_slice(&rest[head_len..]);
                    let idle = (idle_secs > 0).then(|| std::time::Duration::from_secs(idle_secs.into()));
                    let splice = super::SpliceTo { app, early, idle };
                    let f = Frame {
                        seq,
                        data: head,
                        last: true,
                        close: false,
                        ask: None,
                        release: None,
                        credit: None,
                        tunnel: Some(super::Tunnel::Splice(splice)),
                    };
                    conns.deliver(conn, f);
                }
                Ok(m) => tracing::warn!("an unexpected message from the worker on its lease socket: {m:?}"),
                Err(e) => tracing::warn!("a message from the worker on its lease socket: {e}"),
            }
        }
    }

    /// The worker exited.
    pub fn is_closed(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// Sends what [`LeaseTx::send`] had to queue, as the socket drains.
    async fn write_queued(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            if self.is_closed() {
                // Drops our end of the socket once the last holder goes.
                return;
            }
            loop {
                let blocked = {
                    let mut q = self.queue.lock().unwrap();
                    let Some((msg, fd, more)) = q.msgs.front() else { break };
                    match send_lease(self.sock.get_ref(), msg, fd.as_ref(), more) {
                        Ok(()) => {
                            q.msgs.pop_front();
                            false
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                        Err(e) => {
                            tracing::debug!("lease socket: {e}");
                            q.msgs.clear();
                            return;
                        }
                    }
                };
                if blocked {
                    let Ok(mut g) = self.sock.writable().await else { return };
                    g.clear_ready();
                }
            }
        }
    }
}

/// Makes a lease socket pair and the writer task for our end.
pub fn lease_socket(
    progress: Arc<worker::progress::ProgressMap>,
    conns: Arc<Conns>,
) -> Result<(Arc<LeaseTx>, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .context("lease socketpair")?;
    let fl = nix::fcntl::fcntl(ours.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).context("F_GETFL")?;
    let fl = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(ours.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl)).context("F_SETFL")?;
    // The worker's hello arrives with its credentials (read_worker).
    nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::PassCred, &true).context("SO_PASSCRED")?;
    // SAFETY: the AsyncFd owns the fd for as long as it is registered.
    let sock = unsafe { AsyncFd::register_with_interest(ours, Interest::WRITABLE | Interest::READABLE) }?;
    let tx = Arc::new(LeaseTx {
        sock,
        progress,
        queue: Default::default(),
        wake: Default::default(),
        dead: Default::default(),
        pid: Default::default(),
    });
    tokio::spawn(tx.clone().write_queued());
    tokio::spawn(tx.clone().read_worker(conns));
    Ok((tx, theirs))
}

fn send_lease(sock: &OwnedFd, msg: &LeaseMsg, fd: Option<&OwnedFd>, more: &[u8]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let bytes = msg.encode();
    let iov = [io::IoSlice::new(&bytes), io::IoSlice::new(more)];
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage> = raw.as_ref().map(|r| ControlMessage::ScmRights(r)).into_iter().collect();
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(io::Error::from)
}
