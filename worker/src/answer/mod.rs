//! Where a worker's responses go: straight into the client's socket when
//! the worker holds a lease on the connection, through the dispatcher
//! otherwise (the protocol is described in [`crate::proto`]).
//!
//! The direct path is the reason leases exist: without one, every response
//! costs the dispatcher a read from the control socket and a write to the
//! client, which measured as more CPU per request than the worker itself
//! spends (docs/performance.md).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, OnceLock},
};

use bytes::Bytes;
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::mpsc,
};

use crate::progress::{Loose, ProgressMap};
use crate::proto::{self, DecodeError, LeaseMsg, WorkerFrame, LEASE_MSG_LEN, MAX_FRAME, NO_ENTRY};

/// The response router one worker's [`Responder`](crate::Responder)s share.
pub(crate) struct Outbound {
    ctl: mpsc::UnboundedSender<Bytes>,
    /// The dispatcher gave us a lease socket, so asking makes sense.
    leases: bool,
    conns: Mutex<HashMap<u64, Entry>>,
    /// The lease socket, also read synchronously (see `respond`).
    lease_sock: OnceLock<Arc<OwnedFd>>,
    /// Where leased connections' progress is traced for the dispatcher.
    progress: Option<Arc<ProgressMap>>,
    /// Held while a lease message is received and handled.
    lease_order: Mutex<()>,
    /// Kernel requests taken and not answered yet on connections without
    /// a lease, in shared memory (merged into a lease's trace when one is
    /// granted, whatever the lease state was when they were taken).
    pub(crate) loose: Option<Arc<Loose>>,
    /// Access-log records not sent yet (None: no access log).
    access_log: OnceLock<Arc<Mutex<Vec<u8>>>>,
    /// Counters not sent yet (see `WorkerFrame::Stats`).
    stats: Arc<[std::sync::atomic::AtomicU64; proto::STATS_WORDS]>,
    stats_task: OnceLock<()>,
}

/// How often the counters go to the dispatcher (when they moved).
const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Access-log records are sent when this many bytes are waiting...
const LOG_BATCH: usize = 32 * 1024;
/// ...or this long after the first of them.
const LOG_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

enum Entry {
    /// Asked for a lease with response `at`. `sent_after`: a later
    /// response already went through the dispatcher, so a grant has to be
    /// given back unused (the dispatcher may not have written it yet).
    Asked {
        at: u32,
        sent_after: bool,
    },
    Leased(Lease),
}

/// A connection this worker writes to itself.
struct Lease {
    gen: u32,
    /// Its progress entry (the trace the dispatcher reads if we die).
    trace: Option<(Arc<ProgressMap>, u32)>,
    /// Bytes of the complete responses written under this lease.
    complete_bytes: u64,
    sock: Arc<Sock>,
    /// The next response to write; everything before it is in the socket
    /// or in `backlog`.
    next: u32,
    /// Responses accepted in order but not yet (fully) in the socket
    /// because its send buffer is full: (seq, bytes still to write, whole
    /// length).
    backlog: VecDeque<(u32, Bytes, usize)>,
    /// Responses that finished before an earlier one: seq → (bytes, close).
    queued: BTreeMap<u32, (Bytes, bool)>,
    /// A task waits for the socket to become writable.
    flushing: bool,
    /// The client is gone: what is left is dropped.
    dead: bool,
}

/// The client's socket, as passed by the dispatcher.
struct Sock {
    /// Registered with the reactor only once the send buffer fills up.
    /// Declared before `fd` so it deregisters before the fd closes.
    waiter: OnceLock<AsyncFd<RawFd>>,
    fd: OwnedFd,
}

impl Sock {
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

    /// Writes as much of `b` as the socket takes now.
    fn send(&self, b: &[u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < b.len() {
            // SAFETY: valid buffer; MSG_NOSIGNAL so a closed peer is EPIPE,
            // not a signal.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    b[done..].as_ptr().cast(),
                    b.len() - done,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
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
    fn push(&mut self, seq: u32, bytes: Bytes) -> bool {
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
                Ok(n) => self.backlog.push_back((seq, bytes.slice(n..), len)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.backlog.push_back((seq, bytes, len)),
                Err(_) => {
                    self.dead = true;
                    return false;
                }
            }
        } else {
            self.backlog.push_back((seq, bytes, len));
        }
        !std::mem::replace(&mut self.flushing, true)
    }

    /// Writes the backlog out as far as the socket takes it; true once it
    /// is empty.
    fn drain(&mut self) -> bool {
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
                    self.backlog.pop_front();
                    self.written(s, l);
                }
                Ok(n) => {
                    *b = b.slice(n..);
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => {
                    self.dead = true;
                    self.backlog.clear();
                }
            }
        }
    }
}

impl Outbound {
    pub(crate) fn new(ctl: mpsc::UnboundedSender<Bytes>, leases: bool, progress: Option<ProgressMap>) -> Self {
        let progress = progress.map(Arc::new);
        Outbound {
            ctl,
            leases,
            conns: Mutex::new(HashMap::new()),
            lease_sock: OnceLock::new(),
            loose: progress.as_ref().map(|p| Arc::new(Loose::new(p.clone()))),
            progress,
            access_log: OnceLock::new(),
            stats: Arc::new(std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0))),
            stats_task: OnceLock::new(),
            lease_order: Mutex::new(()),
        }
    }

    /// Request `seq` of `conn` was taken from the queue: trace it (so the
    /// dispatcher can answer 502 for it if we die before answering).
    pub(crate) fn taken(&self, conn: u64, seq: u32) {
        let Some(loose) = &self.loose else { return };
        let bit = 1u64 << (seq % 64);
        // Under `conns`, so a grant cannot slip between the state looked at
        // and the record made (lock order: conns, then unanswered).
        let mut map = self.conns.lock().unwrap();
        match map.get_mut(&conn) {
            Some(Entry::Leased(l)) => {
                if let Some(e) = l.trace.as_ref().and_then(|(map, i)| map.entry(*i)) {
                    e.in_flight.fetch_or(bit, std::sync::atomic::Ordering::Release);
                    e.taken.fetch_max(seq.wrapping_add(1), std::sync::atomic::Ordering::Release);
                }
            }
            _ => loose.taken(conn, seq),
        }
    }

    /// Sends response `seq` on `conn`. `from_kernel`: the request came
    /// from the ring (the slow path's responses always go through the
    /// dispatcher, which revoked the lease when it took the connection).
    pub(crate) fn respond(
        self: &Arc<Self>,
        conn: u64,
        seq: u32,
        bytes: Vec<u8>,
        close: bool,
        from_kernel: bool,
    ) -> bool {
        let mut map = self.conns.lock().unwrap();
        if from_kernel && matches!(map.get(&conn), Some(Entry::Asked { .. })) {
            // The dispatcher sends a grant before the client can have sent
            // this request, but the ring may have woken us first.
            drop(map);
            self.poll_leases();
            map = self.conns.lock().unwrap();
        }
        match map.get_mut(&conn) {
            Some(Entry::Leased(l)) => {
                if from_kernel && seq >= l.next {
                    l.queued.insert(seq, (Bytes::from(bytes), close));
                    self.advance(&mut map, conn);
                    return true;
                }
                if seq >= l.next {
                    self.release(&mut map, conn);
                }
                self.via_ctl(conn, seq, &bytes, close, false)
            }
            Some(Entry::Asked { at, sent_after, .. }) => {
                if seq > *at {
                    *sent_after = true;
                }
                self.via_ctl(conn, seq, &bytes, close, false)
            }
            None => {
                let ask = self.leases && from_kernel && !close;
                if ask {
                    map.insert(conn, Entry::Asked { at: seq, sent_after: false });
                }
                self.via_ctl(conn, seq, &bytes, close, ask)
            }
        }
    }

    /// Gives every lease back (the worker is about to exit).
    pub(crate) fn release_all(&self) {
        let mut map = self.conns.lock().unwrap();
        let leased: Vec<u64> = map.iter().filter(|(_, e)| matches!(e, Entry::Leased(_))).map(|(c, _)| *c).collect();
        for c in leased {
            self.release(&mut map, c);
        }
        map.clear();
    }

    /// Reports each answered request to the dispatcher's access log, in
    /// batches (one frame per [`LOG_BATCH`] bytes or [`LOG_FLUSH`]).
    pub(crate) fn enable_access_log(&self) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        if self.access_log.set(buf.clone()).is_ok() {
            let ctl = self.ctl.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(LOG_FLUSH);
                loop {
                    tick.tick().await;
                    if !send_log(&ctl, &buf) {
                        return;
                    }
                }
            });
        }
    }

    /// Counts an answer (status class, handling time) for the metrics.
    pub(crate) fn count(&self, status: u16, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats_task.get_or_init(|| {
            let (ctl, stats) = (self.ctl.clone(), self.stats.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(STATS_EVERY);
                while !ctl.is_closed() {
                    tick.tick().await;
                    send_stats(&ctl, &stats);
                }
            });
        });
        let class = ((status / 100) as usize).clamp(1, 5) - 1;
        self.stats[class].fetch_add(1, Relaxed);
        let us = took.as_micros() as u64;
        let b = proto::LATENCY_BUCKETS_US.iter().position(|l| us <= *l).unwrap_or(proto::LATENCY_BUCKETS_US.len());
        self.stats[5 + b].fetch_add(1, Relaxed);
        self.stats[proto::STATS_WORDS - 1].fetch_add(us, Relaxed);
    }

    /// Adds request `req`'s access-log record (answered `status` with a
    /// body of `bytes`).
    pub(crate) fn log(&self, req: &crate::Request, status: u16, bytes: usize) {
        let Some(buf) = self.access_log.get() else { return };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let mut b = buf.lock().unwrap();
        b.extend_from_slice(
            format!("{}\t{now}\t{status}\t{bytes}\t{}\t", req.conn, req.received.elapsed().as_micros()).as_bytes(),
        );
        proto::log_field(&mut b, req.request_line());
        for h in ["referer", "user-agent"] {
            b.push(b'\t');
            match req.header(h) {
                Some(v) => proto::log_field(&mut b, v),
                None => b.push(b'-'),
            }
        }
        b.push(b'\n');
        if b.len() >= LOG_BATCH {
            drop(b);
            send_log(&self.ctl, buf);
        }
    }

    /// Tells the dispatcher this worker reads no more requests.
    pub(crate) fn send_stopped(&self) {
        let _ = self.ctl.send(frame(WorkerFrame::Stopped, &[]));
    }

    /// Queues the control writer's end marker (see `proto::write_batched`).
    pub(crate) fn end_ctl(&self) {
        send_stats(&self.ctl, &self.stats);
        if let Some(buf) = self.access_log.get() {
            send_log(&self.ctl, buf);
        }
        let _ = self.ctl.send(Bytes::new());
    }

    /// Writes the queued responses that are next in order.
    fn advance(self: &Arc<Self>, map: &mut HashMap<u64, Entry>, conn: u64) {
        let Some(Entry::Leased(l)) = map.get_mut(&conn) else { return };
        let mut flusher = false;
        let mut give_back = false;
        while let Some((bytes, close)) = l.queued.remove(&l.next) {
            if close {
                // The dispatcher closes connections: it writes this one.
                l.queued.insert(l.next, (bytes, close));
                give_back = true;
                break;
            }
            flusher |= l.push(l.next, bytes);
            l.next = l.next.wrapping_add(1);
        }
        if flusher {
            self.spawn_flusher(conn, l.gen, l.sock.clone());
        }
        if give_back {
            self.release(map, conn);
        }
    }

    /// Gives `conn`'s lease back: a release frame saying where the direct
    /// writes stopped, then whatever was not written yet, through the
    /// dispatcher.
    fn release(&self, map: &mut HashMap<u64, Entry>, conn: u64) {
        let Some(Entry::Leased(l)) = map.remove(&conn) else { return };
        // The dispatcher lets go of the lease's trace with the release:
        // what is taken and not answered is traced as loose from here on
        // (before the frames below, whose writing clears it).
        if let (Some(loose), Some(e)) = (&self.loose, l.trace.as_ref().and_then(|(m, i)| m.entry(*i))) {
            let t = e.read();
            for back in (1..=64u32.min(t.taken)).rev() {
                let seq = t.taken - back;
                if t.in_flight & (1u64 << (seq % 64)) != 0 {
                    loose.taken(conn, seq);
                }
            }
        }
        let first = l.backlog.front().map_or(l.next, |(s, _, _)| *s);
        let _ = self.ctl.send(frame(WorkerFrame::Release { conn, seq: first, lease: l.gen }, &[]));
        for (seq, rest, _) in l.backlog {
            self.via_ctl(conn, seq, &rest, false, false);
        }
        for (seq, (bytes, close)) in l.queued {
            self.via_ctl(conn, seq, &bytes, close, false);
        }
    }

    fn spawn_flusher(self: &Arc<Self>, conn: u64, gen: u32, sock: Arc<Sock>) {
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

    fn with_lease<R>(&self, conn: u64, gen: u32, f: impl FnOnce(&mut Lease) -> R) -> Option<R> {
        match self.conns.lock().unwrap().get_mut(&conn) {
            Some(Entry::Leased(l)) if l.gen == gen => Some(f(l)),
            _ => None,
        }
    }

    /// Sends a response through the dispatcher, in frames of at most
    /// [`MAX_FRAME`] bytes. False when the control socket is gone.
    pub(crate) fn via_ctl(&self, conn: u64, seq: u32, bytes: &[u8], close: bool, ask: bool) -> bool {
        let n = bytes.len().div_ceil(MAX_FRAME).max(1);
        let chunks: Box<dyn Iterator<Item = &[u8]>> =
            if bytes.is_empty() { Box::new(std::iter::once(&[][..])) } else { Box::new(bytes.chunks(MAX_FRAME)) };
        for (i, chunk) in chunks.enumerate() {
            let last = i + 1 == n;
            let f = WorkerFrame::Response { conn, seq, last, close: last && close, want_lease: last && ask };
            if self.ctl.send(frame(f, chunk)).is_err() {
                return false;
            }
        }
        true
    }

    /// Handles one message from the dispatcher's lease socket.
    fn on_lease(self: &Arc<Self>, m: LeaseMsg, fd: Option<OwnedFd>) {
        let mut map = self.conns.lock().unwrap();
        let conn = m.conn();
        tracing::debug!(
            msg = ?m,
            fd = fd.is_some(),
            state = map.get(&conn).map(|e| match e {
                Entry::Asked { sent_after, .. } =>
                    if *sent_after {
                        "asked-sent-after"
                    } else {
                        "asked"
                    },
                Entry::Leased(_) => "leased",
            }),
            "lease message"
        );
        match m {
            LeaseMsg::Grant { conn, from, gen, entry } => {
                let usable = matches!(map.get(&conn), Some(Entry::Asked { sent_after: false, .. }));
                match fd {
                    Some(fd) if usable => {
                        // Moved into the lease's trace from here on.
                        let (taken, in_flight) = self.loose.as_ref().map_or((0, 0), |l| l.take_out(conn));
                        let sock = Arc::new(Sock { waiter: OnceLock::new(), fd });
                        let trace = match (&self.progress, entry) {
                            (Some(map), entry) if entry != NO_ENTRY => {
                                // Fresh (a lease on another connection may
                                // have used this entry until its FORGET,
                                // handled before this grant), plus what is
                                // taken and not answered on this one.
                                map.reset(entry, conn, from);
                                if let Some(e) = map.entry(entry) {
                                    e.in_flight.fetch_or(in_flight, std::sync::atomic::Ordering::Release);
                                    e.taken.fetch_max(taken, std::sync::atomic::Ordering::Release);
                                }
                                Some((map.clone(), entry))
                            }
                            _ => None,
                        };
                        let l = Lease {
                            gen,
                            trace,
                            complete_bytes: 0,
                            sock,
                            next: from,
                            backlog: VecDeque::new(),
                            queued: BTreeMap::new(),
                            flushing: false,
                            dead: false,
                        };
                        map.insert(conn, Entry::Leased(l));
                    }
                    _ => {
                        // Stale or unusable: give it back untouched.
                        if matches!(map.get(&conn), Some(Entry::Asked { .. })) {
                            map.remove(&conn);
                        }
                        let _ = self.ctl.send(frame(WorkerFrame::Release { conn, seq: from, lease: gen }, &[]));
                    }
                }
            }
            LeaseMsg::Deny { conn, .. } => {
                if matches!(map.get(&conn), Some(Entry::Asked { .. })) {
                    map.remove(&conn);
                }
            }
            LeaseMsg::Revoke { conn, gen } => {
                if matches!(map.get(&conn), Some(Entry::Leased(l)) if l.gen == gen) {
                    self.release(&mut map, conn);
                }
            }
            LeaseMsg::Forget { conn } => {
                map.remove(&conn);
                if let Some(l) = &self.loose {
                    l.take_out(conn);
                }
            }
        }
    }

    /// Handles the lease messages already waiting, without blocking.
    fn poll_leases(self: &Arc<Self>) {
        let Some(fd) = self.lease_sock.get() else { return };
        // Receive and handle as one step, here and in the reader task:
        // lease messages must be handled in the order they were sent.
        let _order = self.lease_order.lock().unwrap();
        while let Ok(Some((m, f))) = recv_lease(fd.as_raw_fd()) {
            self.on_lease(m, f);
        }
    }

    /// Reads the lease socket until the dispatcher closes it.
    pub(crate) fn spawn_lease_reader(self: &Arc<Self>, fd: OwnedFd) -> io::Result<()> {
        set_nonblocking(&fd)?;
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
                        Ok(Some((m, fd))) => {
                            out.on_lease(m, fd);
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
fn recv_lease(fd: RawFd) -> io::Result<Option<(LeaseMsg, Option<OwnedFd>)>> {
    loop {
        let Some((m, passed)) = recv_lease_raw(fd)? else { return Ok(None) };
        match m {
            Ok(m) => return Ok(Some((m, passed))),
            Err(e @ DecodeError::UnknownKind { .. }) => tracing::warn!("lease socket: {e}"),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// A lease socket packet: its message, decoded, and the fd it carried.
type Packet = (Result<LeaseMsg, DecodeError>, Option<OwnedFd>);

/// One lease socket packet. `None` at end of stream.
fn recv_lease_raw(fd: RawFd) -> io::Result<Option<Packet>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; LEASE_MSG_LEN];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
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
    Ok(Some((LeaseMsg::decode(&buf[..n]), passed)))
}

/// Sends the waiting access-log records as one frame; false once the
/// control socket is gone.
fn send_log(ctl: &mpsc::UnboundedSender<Bytes>, buf: &Mutex<Vec<u8>>) -> bool {
    let data = std::mem::take(&mut *buf.lock().unwrap());
    if data.is_empty() {
        return !ctl.is_closed();
    }
    ctl.send(frame(WorkerFrame::Log, &data)).is_ok()
}

/// Sends the counters that moved since the last frame.
fn send_stats(ctl: &mpsc::UnboundedSender<Bytes>, stats: &[std::sync::atomic::AtomicU64; proto::STATS_WORDS]) {
    let words: Vec<u64> = stats.iter().map(|w| w.swap(0, std::sync::atomic::Ordering::Relaxed)).collect();
    if words.iter().all(|w| *w == 0) {
        return;
    }
    let data: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let _ = ctl.send(frame(WorkerFrame::Stats, &data));
}

/// Frame `f` with `data` following, as it goes into the control socket.
fn frame(f: WorkerFrame, data: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(proto::FRAME_HEADER_LEN + data.len());
    b.extend_from_slice(&f.encode(data.len() as u32).to_bytes());
    b.extend_from_slice(data);
    Bytes::from(b)
}
