//! One client connection: writes responses back in request order, and
//! runs the slow path for whatever the kernel handed over.
//!
//! On the fast path nothing reaches this task but responses: the kernel
//! queues the requests on the pools' rings and drops the segments. The
//! socket only becomes readable when the kernel hands the connection over
//! (SK_PASS) or the client closes; the hand-off point is read once from the
//! connection's `ConnState`.
//!
//! Once it has written a worker's first response on the connection, this
//! task may also leave the responses to that worker: it passes the worker
//! the socket (a *lease*, protocol in `worker::proto`) and writes nothing
//! more until the lease is back. It takes the lease back (revokes it) as
//! soon as somebody else has something to write (another pool's response,
//! its own error answer, the slow path), the connection idles long enough
//! for a time-out to be due, or the client closes its side. While the
//! lease is out the socket is parked outside tokio's poller (see
//! `parking`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use dispatcher_ebpf::abi::{
    reason, RecordHeader, MODE_BODY, MODE_HEAD, MODE_SLOW, RECORD_BODY, RECORD_HEAD, REC_CLOSE, REC_LAST, REC_SLOW,
};
use dispatcher_ebpf::wire::{LeaseMsg, MAX_FRAME, NO_ENTRY};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::mpsc};
use tracing::Instrument;

use crate::{
    conns::ToConn,
    kernel::Routed,
    pools::{Frame, LeaseTx, PoolLink},
    serve::Shared,
    slow::{Event, SlowParser},
};

/// How often an idle connection checks its oldest request's age.
const TICK: Duration = Duration::from_secs(1);
/// How often an idle connection looks at the kernel's state.
const RECHECK: Duration = Duration::from_secs(5);
/// Bytes read from the socket at a time on the slow path.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read before the connection is known to need user-space reads.
const PROBE_READ: usize = 2048;

/// Serves connection `cookie` until it closes.
pub async fn serve(shared: Arc<Shared>, stream: TcpStream, cookie: u64, rx: mpsc::UnboundedReceiver<ToConn>) {
    let peer = stream.peer_addr().ok();
    let span = tracing::debug_span!("conn", id = cookie, peer = ?peer);
    let mut c = Conn {
        shared: shared.clone(),
        cookie,
        sock: Sock::Polled(stream),
        next: 0,
        pending: BTreeMap::new(),
        slow: None,
        sent: HashMap::new(),
        last_progress: Instant::now(),
        next_check: Instant::now(),
        kernel_seen: (0, 0, 0),
        lease: None,
        lease_gen: 0,
        lease_peers: Vec::new(),
        eof: false,
        woken: false,
        written: 0,
        request_line: Vec::new(),
    };
    c.run(rx).instrument(span).await;
    c.cleanup();
}

/// Where the body of the request being parsed goes.
enum BodyTo {
    /// To `link`'s worker slot `slot` (local), which has the head.
    Pool {
        link: Arc<PoolLink>,
        slot: usize,
        seq: u32,
        close: bool,
    },
    Discard,
}

struct Slow {
    parser: SlowParser,
    /// Sequence number of the next request the parser completes.
    seq: u32,
    /// Socket bytes still to skip (the kernel consumed them).
    skip: usize,
    /// The kernel found the first request's pool queue full.
    first_queue_full: bool,
    /// Body bytes of a kernel-framed request still to forward (the ring
    /// filled up mid-body).
    body_left: u64,
    body_to: BodyTo,
}

struct Conn {
    shared: Arc<Shared>,
    cookie: u64,
    sock: Sock,
    /// Sequence number of the next response to write.
    next: u32,
    /// Responses (or parts) waiting for earlier ones.
    pending: BTreeMap<u32, Vec<Frame>>,
    slow: Option<Slow>,
    /// Slow-path requests sent to pools and not yet answered: seq →
    /// (pool, bytes), for the queue accounting and aborts.
    sent: HashMap<u32, (Arc<PoolLink>, u64)>,
    /// Last time bytes moved on the connection (either way).
    last_progress: Instant,
    /// When the time-outs next look at the kernel's state.
    next_check: Instant,
    /// (seq, head_len, body_left) of the kernel's state at the last look.
    kernel_seen: (u32, u32, u64),
    /// A worker holds the connection: it writes responses from `next` on.
    lease: Option<Held>,
    /// Generation of the last lease granted.
    lease_gen: u32,
    /// Every lease socket that asked about this connection (told to
    /// forget it when it closes).
    lease_peers: Vec<Arc<LeaseTx>>,
    /// The client closed its side.
    eof: bool,
    /// Woken for the socket and not read it since: no lease until then.
    woken: bool,
    /// Bytes this task wrote to the socket (to tell, when a lease holder
    /// dies, whether it wrote anything).
    written: u64,
    /// The head of the last request the slow path parsed (for the access
    /// log's lines of the dispatcher's own answers).
    request_line: Vec<u8>,
}

/// The client's socket.
enum Sock {
    /// In tokio's poller.
    Polled(TcpStream),
    /// Out of it while a worker holds the lease (see `parking`).
    Parked(std::net::TcpStream),
    /// Lost moving between the two (the connection closes).
    Gone,
}

impl Sock {
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            Sock::Polled(s) => Some(s.as_fd()),
            Sock::Parked(s) => Some(s.as_fd()),
            Sock::Gone => None,
        }
    }
}

/// A lease out on the connection.
struct Held {
    gen: u32,
    to: Arc<LeaseTx>,
    /// Asked back at this time; waiting for the worker's release.
    revoked: Option<Instant>,
}

enum Flow {
    Continue,
    Close,
}

impl Conn {
    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<ToConn>) {
        // Allocated on the first read: on the fast path most connections
        // never read anything in user space.
        let mut buf = Vec::new();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                r = async {
                    match &self.sock {
                        Sock::Polled(s) => s.readable().await,
                        _ => std::future::pending().await,
                    }
                }, if !self.eof && !self.slow.as_ref().is_some_and(|s| s.parser.is_done()) => {
                    if r.is_err() { return; }
                    // The kernel wakes this task for segments the verdict
                    // dropped too: look with a small stack buffer until
                    // there is real data, so idle fast-path connections
                    // hold no read buffer (4,096 of them held 256 MiB).
                    let mut probe = [0u8; PROBE_READ];
                    let into: &mut [u8] = if buf.is_empty() { &mut probe } else { &mut buf };
                    let Sock::Polled(stream) = &self.sock else { continue };
                    self.woken = false;
                    match stream.try_read(into) {
                        Ok(0) => {
                            self.eof = true;
                            // What is still owed is known only once the
                            // worker says where it stopped.
                            self.revoke();
                        }
                        Ok(n) => {
                            self.last_progress = Instant::now();
                            let data = if buf.is_empty() { probe[..n].to_vec() } else { buf[..n].to_vec() };
                            if buf.is_empty() {
                                // User space reads this connection now.
                                buf.resize(READ_CHUNK, 0);
                            }
                            if let Flow::Close = self.on_bytes(&data).await { return; }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                m = rx.recv() => {
                    match m {
                        None => return,
                        Some(ToConn::Frame(f)) => {
                            if let Flow::Close = self.on_frame(f).await { return; }
                        }
                        Some(ToConn::LeaseLost { gen, slot }) => {
                            if self.lease.as_ref().is_some_and(|l| l.gen == gen) {
                                if let Flow::Close = self.lease_lost(slot).await { return; }
                                if let Flow::Close = self.flush().await { return; }
                            }
                        }
                        Some(ToConn::Lost { taken, in_flight }) => {
                            if let Flow::Close = self.requests_lost(taken, in_flight).await { return; }
                        }
                        Some(ToConn::Wake) => {
                            tracing::debug!(conn = self.cookie, leased = self.lease.is_some(), "woken (hand-off or peer closed)");
                            self.woken = true;
                            // Bytes to read or the peer closed: the socket
                            // is ours to poll again once the lease is back.
                            self.revoke();
                            if self.lease.is_none() {
                                self.unpark();
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    if let Flow::Close = self.check_timers().await { return; }
                }
            }
            if self.eof && self.lease.is_none() && self.outstanding() == 0 {
                return;
            }
        }
    }

    /// Enforces the response, header and keep-alive time-outs. Runs every
    /// TICK but looks at the kernel's state only once nothing happened on
    /// the connection for the shortest of them, so idle connections cost
    /// nothing.
    async fn check_timers(&mut self) -> Flow {
        let cfg = &self.shared.cfg;
        let idle = self.last_progress.elapsed();
        let header = Duration::from_secs(cfg.header_timeout_secs);
        if idle < header.min(Duration::from_secs(cfg.response_timeout_secs)) {
            return Flow::Continue;
        }
        if let Some(l) = &self.lease {
            if l.revoked.is_some_and(|t| t.elapsed() >= Duration::from_secs(cfg.response_timeout_secs)) {
                // A worker that neither answers nor gives the connection
                // back: nothing can be written on it in order any more.
                tracing::warn!(
                    conn = self.cookie,
                    "the lease holder did not give the connection back in time; closing it"
                );
                return Flow::Close;
            }
            // The worker's writes are not seen here: ask where it is
            // before judging the connection idle or late.
            self.revoke();
            return Flow::Continue;
        }
        if Instant::now() < self.next_check {
            return Flow::Continue;
        }
        self.next_check = Instant::now() + RECHECK.min(header);
        let (received, partial_head) = match &self.slow {
            Some(s) => (s.seq, !s.parser.is_idle() || s.body_left > 0),
            None => match self.shared.kernel.lock().unwrap().conn_state(self.cookie) {
                Some(st) => {
                    // The kernel consumed bytes since the last look: the
                    // client is making progress.
                    let seen = (st.seq, st.head_len, st.body_left);
                    if seen != self.kernel_seen {
                        self.kernel_seen = seen;
                        self.last_progress = Instant::now();
                        return Flow::Continue;
                    }
                    (st.seq, st.mode == MODE_HEAD && st.head_len > 0 || st.mode == MODE_BODY)
                }
                None => (0, false),
            },
        };
        if received > self.next {
            if idle >= Duration::from_secs(cfg.response_timeout_secs) {
                tracing::warn!(conn = self.cookie, seq = self.next, "no response in time; answering 504");
                let r = local_response(504, "the worker did not answer in time", true, false);
                self.note_local(504, &r);
                self.write(&r).await;
                return Flow::Close;
            }
            return Flow::Continue;
        }
        if partial_head && idle >= header {
            tracing::debug!(conn = self.cookie, "request not received in time; answering 408");
            let r = local_response(408, "the request did not arrive in time", true, false);
            self.note_local(408, &r);
            self.write(&r).await;
            return Flow::Close;
        }
        if !partial_head && idle >= Duration::from_secs(cfg.keepalive_timeout_secs) {
            return Flow::Close;
        }
        Flow::Continue
    }

    /// Requests received (by the kernel or the slow path) and not yet
    /// answered.
    fn outstanding(&self) -> u32 {
        let received = match &self.slow {
            Some(s) => s.seq,
            None => self.shared.kernel.lock().unwrap().conn_state(self.cookie).map_or(0, |st| st.seq),
        };
        received.saturating_sub(self.next)
    }

    async fn on_frame(&mut self, f: Frame) -> Flow {
        if let Some(gen) = f.release {
            return self.on_release(gen, f.seq).await;
        }
        if let Some(a) = &f.ask {
            self.lease_peers.retain(|p| !p.is_closed());
            if !self.lease_peers.iter().any(|p| Arc::ptr_eq(p, a)) {
                self.lease_peers.push(a.clone());
            }
        }
        if f.seq < self.next {
            if let Some(a) = f.ask {
                // Stale: still answer the ask, or the worker never asks again.
                a.send(LeaseMsg::Deny { conn: self.cookie, from: self.next }, None);
            }
            return Flow::Continue;
        }
        // Somebody other than the lease holder has a response to write
        // (or the holder sent one around its lease): take the lease back.
        self.revoke();
        self.pending.entry(f.seq).or_default().push(f);
        self.flush().await
    }

    /// The worker gave lease `gen` back, having written everything before
    /// `seq`.
    async fn on_release(&mut self, gen: u32, seq: u32) -> Flow {
        let Some(l) = self.lease.take_if(|l| l.gen == gen) else {
            tracing::debug!(conn = self.cookie, gen, seq, "stale release");
            return Flow::Continue;
        };
        tracing::debug!(conn = self.cookie, gen, seq, "lease released");
        l.to.settled(self.cookie);
        self.unpark();
        // The worker's writes count as written from here on (a later
        // holder's death is judged against this).
        if let Sock::Polled(stream) = &self.sock {
            if let Ok(n) = socket_written(stream) {
                self.written = n;
            }
        }
        if seq > self.next {
            // Slow-path requests are never answered under a lease, so
            // nothing in `sent` is settled by this; drop stale frames.
            self.next = seq;
            self.pending = self.pending.split_off(&seq);
        }
        self.flush().await
    }

    /// The worker holding the lease died without giving it back. Its
    /// trace (`worker::progress`) says how far it wrote; if the socket took
    /// exactly that, the stream stopped between two responses: the
    /// connection goes on, and the requests the worker had taken and not
    /// answered get 502. Otherwise part of a response is out, and the
    /// connection has to close.
    async fn lease_lost(&mut self, slot: u32) -> Flow {
        let Some(l) = self.lease.take() else { return Flow::Continue };
        l.to.settled(self.cookie);
        let t = l.to.trace(self.cookie, slot).unwrap_or(worker::progress::Trace {
            next: self.next,
            taken: self.next,
            complete_bytes: 0,
            pending: 0,
            in_flight: 0,
        });
        self.unpark();
        let Sock::Polled(stream) = &self.sock else { return Flow::Close };
        let n = match socket_written(stream) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(conn = self.cookie, "the worker holding the connection died; closing it ({e})");
                return Flow::Close;
            }
        };
        // Between two responses: before the one it was writing, or (killed
        // before it could note it) just after it.
        let next = if n == self.written + t.complete_bytes {
            t.next
        } else if t.pending > 0 && n == self.written + t.complete_bytes + t.pending as u64 {
            t.next.wrapping_add(1)
        } else {
            tracing::warn!(
                conn = self.cookie,
                "the worker holding the connection died in the middle of a response; closing it"
            );
            return Flow::Close;
        };
        let taken = t.taken.max(next);
        self.written = n;
        if next > self.next {
            self.next = next;
            self.pending = self.pending.split_off(&next);
        }
        tracing::warn!(
            conn = self.cookie,
            next,
            taken,
            "the worker holding the connection died; going on from its last response"
        );
        for seq in next..taken {
            let in_flight = taken - seq <= 64 && t.in_flight & (1u64 << (seq % 64)) != 0;
            if !in_flight || self.pending.get(&seq).is_some_and(|f| !f.is_empty()) {
                continue;
            }
            if let Flow::Close =
                self.answer(seq, 502, "the worker died while handling this request", false, false, false).await
            {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// A worker died with requests of this connection taken and not
    /// answered (it held no lease on it; see `worker::progress::Loose`):
    /// each gets 502, unless its whole response arrived after all.
    async fn requests_lost(&mut self, taken: u32, in_flight: u64) -> Flow {
        for back in (1..=64u32.min(taken)).rev() {
            let seq = taken - back;
            if in_flight & (1u64 << (seq % 64)) == 0 || seq < self.next {
                continue;
            }
            match self.pending.get(&seq) {
                Some(f) if f.iter().any(|f| f.last) => continue,
                // Part of its response is already in the socket: nothing
                // can follow it.
                Some(f) if f.is_empty() || (seq == self.next && self.lease.is_none()) => {
                    tracing::warn!(
                        conn = self.cookie,
                        seq,
                        "the worker died in the middle of a response; closing the connection"
                    );
                    return Flow::Close;
                }
                Some(_) => {
                    self.pending.remove(&seq);
                }
                None => {}
            }
            tracing::warn!(conn = self.cookie, seq, "the worker died while handling this request; answering 502");
            if let Flow::Close =
                self.answer(seq, 502, "the worker died while handling this request", false, false, false).await
            {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Asks the lease holder, if any, to give the connection back.
    fn revoke(&mut self) {
        if let Some(l) = &mut self.lease {
            if l.revoked.is_none() {
                tracing::debug!(conn = self.cookie, gen = l.gen, "revoking the lease");
                l.revoked = Some(Instant::now());
                l.to.send(LeaseMsg::Revoke { conn: self.cookie, gen: l.gen }, None);
            }
        }
    }

    /// Answers a worker's request for a lease, made with the response just
    /// written: granted when the connection has nothing else to write and
    /// nobody else is expected to write on it.
    fn answer_ask(&mut self, to: Arc<LeaseTx>) {
        // Not while the socket has something for user space: a hand-off
        // (its wake-up may already be spent on revoking a lease that this
        // grant would replace) or the peer's close.
        let grant = self.shared.cfg.direct_responses
            && self.lease.is_none()
            && self.slow.is_none()
            && self.pending.is_empty()
            && !self.eof
            && !self.woken
            && !self.shared.kernel.lock().unwrap().conn_state(self.cookie).is_some_and(|st| st.mode == MODE_SLOW);
        let fd = if grant { self.sock.fd().and_then(dup_fd) } else { None };
        let Some(fd) = fd else {
            to.send(LeaseMsg::Deny { conn: self.cookie, from: self.next }, None);
            return;
        };
        self.lease_gen = self.lease_gen.wrapping_add(1);
        let msg = LeaseMsg::Grant { conn: self.cookie, from: self.next, gen: self.lease_gen, entry: NO_ENTRY };
        if to.send(msg, Some(fd)) {
            tracing::debug!(conn = self.cookie, gen = self.lease_gen, from = self.next, "lease granted");
            self.lease = Some(Held { gen: self.lease_gen, to, revoked: None });
            self.park();
        }
    }

    /// Takes the socket out of tokio's poller while a worker writes to it.
    fn park(&mut self) {
        let Sock::Polled(_) = self.sock else { return };
        let Sock::Polled(s) = std::mem::replace(&mut self.sock, Sock::Gone) else { unreachable!() };
        match s.into_std() {
            Ok(std) => match self.shared.parking.park(&std, self.cookie) {
                Ok(()) => self.sock = Sock::Parked(std),
                Err(e) => {
                    tracing::warn!(conn = self.cookie, "parking a connection: {e}");
                    self.sock = TcpStream::from_std(std).map_or(Sock::Gone, Sock::Polled);
                }
            },
            Err(e) => tracing::warn!(conn = self.cookie, "taking a connection out of the poller: {e}"),
        }
    }

    /// Puts a parked socket back into tokio's poller.
    fn unpark(&mut self) {
        let Sock::Parked(_) = self.sock else { return };
        let Sock::Parked(std) = std::mem::replace(&mut self.sock, Sock::Gone) else { unreachable!() };
        self.shared.parking.unpark(&std);
        match TcpStream::from_std(std) {
            Ok(s) => self.sock = Sock::Polled(s),
            Err(e) => tracing::warn!(conn = self.cookie, "putting a connection back in the poller: {e}"),
        }
    }

    /// Writes all of `data` (the socket must not be leased). False when
    /// the connection is unusable.
    async fn write(&mut self, data: &[u8]) -> bool {
        self.unpark();
        let Sock::Polled(s) = &mut self.sock else { return false };
        if s.write_all(data).await.is_err() {
            return false;
        }
        self.written += data.len() as u64;
        true
    }

    /// Writes every response that is next in order.
    async fn flush(&mut self) -> Flow {
        while self.lease.is_none() {
            let Some(frames) = self.pending.get_mut(&self.next) else { break };
            let frames = std::mem::take(frames);
            let mut done = None;
            for f in frames {
                if !self.write(&f.data).await {
                    return Flow::Close;
                }
                self.last_progress = Instant::now();
                if f.last {
                    done = Some((f.close, f.ask));
                    break;
                }
            }
            let Some((close, ask)) = done else { break };
            self.pending.remove(&self.next);
            if let Some((link, bytes)) = self.sent.remove(&self.next) {
                link.release(bytes);
            }
            self.next += 1;
            if close {
                if let Sock::Polled(s) = &mut self.sock {
                    let _ = s.shutdown().await;
                }
                return Flow::Close;
            }
            if let Some(to) = ask {
                self.answer_ask(to);
            }
        }
        Flow::Continue
    }

    /// Queues a response the dispatcher makes itself.
    async fn answer(
        &mut self,
        seq: u32,
        status: u16,
        why: &str,
        close: bool,
        retry_after: bool,
        head_only: bool,
    ) -> Flow {
        let mut data = local_response(status, why, close, retry_after);
        if head_only {
            let end = data.windows(4).position(|w| w == b"\r\n\r\n").map_or(data.len(), |p| p + 4);
            data.truncate(end);
        }
        let data = Bytes::from(data);
        self.note_local(status, &data);
        self.shared.kernel.lock().unwrap().count_slow(None, 0, 1);
        self.on_frame(Frame::whole(seq, data, close)).await
    }

    /// Counts (metrics) and logs (access log) an answer of the
    /// dispatcher's own.
    fn note_local(&mut self, status: u16, data: &[u8]) {
        self.shared.local_responses[((status / 100) as usize).clamp(1, 5) - 1].fetch_add(1, Ordering::Relaxed);
        if let Some(log) = &self.shared.access_log {
            let body = data.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| data.len() - p - 4);
            log.local(self.shared.conns.peer(self.cookie), &std::mem::take(&mut self.request_line), status, body);
        }
    }

    fn start_slow(&mut self) -> Option<Vec<u8>> {
        let max_body = self.shared.cfg.max_body;
        let st = self.shared.kernel.lock().unwrap().conn_state(self.cookie);
        let Some(st) = st else {
            // Not tracked by the kernel: ours from the first byte.
            self.slow = Some(Slow {
                parser: SlowParser::new(max_body),
                seq: 0,
                skip: 0,
                first_queue_full: false,
                body_left: 0,
                body_to: BodyTo::Discard,
            });
            return Some(Vec::new());
        };
        if st.mode != MODE_SLOW {
            tracing::error!(conn = self.cookie, mode = st.mode, "bytes reached user space without a hand-off");
            return None;
        }
        let why = st.handoff_reason;
        tracing::debug!(
            conn = self.cookie,
            reason = reason::name(why),
            seq = st.seq,
            skip = st.handoff_skip,
            prefix = st.handoff_prefix,
            "slow path takes over"
        );
        let prefix_len = (st.handoff_prefix as usize).min(st.rec.data.len());
        let prefix = st.rec.data[..prefix_len].to_vec();
        let mut s = Slow {
            parser: SlowParser::new(max_body),
            seq: st.seq,
            skip: st.handoff_skip as usize,
            first_queue_full: why == reason::QUEUE_FULL,
            body_left: 0,
            body_to: BodyTo::Discard,
        };
        if st.body_left > 0 {
            // Handed over mid-body (the ring filled up, or the segment used
            // up the tail-call budget): the head and part of the body are
            // in the worker's ring; the rest goes over its control socket.
            s.body_left = st.body_left;
            // The head went through the kernel to ring slot `st.slot`.
            if let Some(link) = self.shared.pools.get(st.pool) {
                let slot = (st.slot as usize).saturating_sub(link.first_slot);
                s.body_to = BodyTo::Pool { link, slot, seq: st.seq, close: st.req_flags != 0 };
            }
            s.seq = st.seq + 1;
        }
        self.slow = Some(s);
        Some(prefix)
    }

    async fn on_bytes(&mut self, data: &[u8]) -> Flow {
        let mut input: Vec<u8>;
        let mut data = data;
        if self.slow.is_none() {
            // User space takes the connection for good: so do its writes.
            self.revoke();
            let Some(prefix) = self.start_slow() else { return Flow::Close };
            let s = self.slow.as_mut().unwrap();
            let skip = s.skip.min(data.len());
            s.skip -= skip;
            input = prefix;
            input.extend_from_slice(&data[skip..]);
            data = &input[..];
        } else {
            let s = self.slow.as_mut().unwrap();
            if s.skip > 0 {
                let skip = s.skip.min(data.len());
                s.skip -= skip;
                data = &data[skip..];
            }
        }
        // A body the kernel started.
        let s = self.slow.as_mut().unwrap();
        if s.body_left > 0 {
            let n = (s.body_left as usize).min(data.len());
            s.body_left -= n as u64;
            let last = s.body_left == 0;
            if let BodyTo::Pool { link, slot, seq, close } = &s.body_to {
                forward_body(self.cookie, link, *slot, *seq, &data[..n], last, *close);
            }
            data = &data[n..];
            if !last {
                return Flow::Continue;
            }
            self.slow.as_mut().unwrap().body_to = BodyTo::Discard;
        }
        let events = self.slow.as_mut().unwrap().parser.feed(data);
        for ev in events {
            if let Flow::Close = self.on_event(ev).await {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    async fn on_event(&mut self, ev: Event) -> Flow {
        match ev {
            Event::Head(h) => {
                if self.shared.access_log.is_some() {
                    self.request_line = h.bytes.to_vec();
                }
                let s = self.slow.as_mut().unwrap();
                let seq = s.seq;
                s.seq += 1;
                s.body_to = BodyTo::Discard;
                let queue_full = std::mem::take(&mut s.first_queue_full);
                let routed = self.shared.kernel.lock().unwrap().route(h.host.as_deref(), &h.route_path);
                let pool = match routed {
                    Routed::NoRoute => {
                        return self
                            .answer(seq, 404, "no route matches this host and path", h.close, false, h.method == "HEAD")
                            .await
                    }
                    Routed::Pool(p) => p,
                };
                let Some(link) = self.shared.pools.get(pool) else {
                    return self
                        .answer(seq, 503, "the pool is being reconfigured", h.close, true, h.method == "HEAD")
                        .await;
                };
                let size = h.bytes.len() as u64 + h.content_length;
                if let Some(why) = link.stopped() {
                    let why = format!("pool `{}` is stopped: {why}", link.name);
                    return self.answer(seq, 503, &why, h.close, true, h.method == "HEAD").await;
                }
                if queue_full || link.inflight.load(Ordering::Relaxed) + size > link.queue_bytes.max(size) {
                    return self.answer(seq, 503, "the pool's queue is full", h.close, true, h.method == "HEAD").await;
                }
                if h.expect_continue && self.next == seq && self.pending.is_empty() && self.lease.is_none() {
                    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
                    self.write(CONTINUE).await;
                }
                link.inflight.fetch_add(size, Ordering::Relaxed);
                self.sent.insert(seq, (link.clone(), size));
                let close = h.close;
                let mut flags = REC_SLOW;
                if close {
                    flags |= REC_CLOSE;
                }
                if h.content_length == 0 {
                    flags |= REC_LAST;
                }
                let hdr = RecordHeader {
                    conn: self.cookie,
                    seq,
                    len: h.bytes.len() as u32,
                    content_length: h.content_length,
                    kind: RECORD_HEAD,
                    flags,
                    pool: pool as u16,
                    _pad: 0,
                };
                let slot = link.send_head(hdr, &h.bytes);
                self.shared.kernel.lock().unwrap().count_slow(Some(pool), 1, 0);
                if h.content_length > 0 {
                    self.slow.as_mut().unwrap().body_to = BodyTo::Pool { link, slot, seq, close };
                }
                Flow::Continue
            }
            Event::Body { data, last } => {
                if let BodyTo::Pool { link, slot, seq, close } = &self.slow.as_ref().unwrap().body_to {
                    forward_body(self.cookie, link, *slot, *seq, &data, last, *close);
                }
                Flow::Continue
            }
            Event::Error { status, why } => {
                let seq = {
                    let s = self.slow.as_mut().unwrap();
                    s.seq += 1;
                    s.seq - 1
                };
                tracing::debug!(conn = self.cookie, status, why, "rejecting request");
                self.answer(seq, status, why, true, false, false).await
            }
        }
    }

    fn cleanup(&mut self) {
        // A request body the kernel was copying to a worker stops short:
        // tell its pool's workers, or the partial request would keep a
        // recycling worker from ever stopping.
        let mid_body = self
            .shared
            .kernel
            .lock()
            .unwrap()
            .conn_state(self.cookie)
            .filter(|st| st.mode != MODE_SLOW && st.body_left > 0);
        if let Some(link) = mid_body.and_then(|st| self.shared.pools.get(st.pool)) {
            link.abort(self.cookie);
        }
        if let Sock::Parked(s) = &self.sock {
            self.shared.parking.unpark(s);
        }
        if let (true, Some(fd)) = (self.lease_gen > 0, self.sock.fd()) {
            // A worker may still hold a copy of the socket: end the
            // connection itself, not just our descriptor.
            let _ = nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&fd), nix::sys::socket::Shutdown::Both);
        }
        if let Some(l) = self.lease.take() {
            l.to.settled(self.cookie);
        }
        for p in self.lease_peers.drain(..) {
            p.send(LeaseMsg::Forget { conn: self.cookie }, None);
        }
        let mut aborted: HashMap<u32, Arc<PoolLink>> = HashMap::new();
        for (_, (link, bytes)) in self.sent.drain() {
            link.release(bytes);
            aborted.insert(link.index, link);
        }
        for link in aborted.values() {
            link.abort(self.cookie);
        }
        self.shared.conns.unregister(self.cookie);
        self.shared.kernel.lock().unwrap().forget_conn(self.cookie);
    }
}

/// Bytes written into a TCP socket by anyone since it opened: acknowledged
/// plus still queued, read until no ACK moved them in between.
fn socket_written(stream: &TcpStream) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    /// `struct tcp_info` up to `tcpi_bytes_acked` (linux/tcp.h).
    #[repr(C)]
    #[derive(Default)]
    struct TcpInfoHead {
        _u8s: [u8; 8],
        _u32s: [u32; 24],
        _pacing: [u64; 2],
        bytes_acked: u64,
    }
    let fd = stream.as_raw_fd();
    let outq = || {
        let mut q: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int.
        match unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut q) } {
            0 => Ok(q as u64),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    for _ in 0..8 {
        let before = outq()?;
        let mut info = TcpInfoHead::default();
        let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes of tcp_info.
        if unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info as *mut _ as *mut _, &mut len) }
            != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if (len as usize) < std::mem::size_of::<TcpInfoHead>() {
            return Err(std::io::Error::other("tcp_info without tcpi_bytes_acked"));
        }
        if outq()? == before {
            return Ok(info.bytes_acked + before);
        }
    }
    Err(std::io::Error::other("the send queue kept moving"))
}

/// A duplicate of the connection's socket to pass to a worker (the
/// original stays with this task).
fn dup_fd(fd: std::os::fd::BorrowedFd<'_>) -> Option<std::os::fd::OwnedFd> {
    fd.try_clone_to_owned().map_err(|e| tracing::warn!("dup of a client socket: {e}")).ok()
}

fn body_header(conn: u64, seq: u32, len: u32, pool: u32, last: bool, close: bool) -> RecordHeader {
    let mut flags = REC_SLOW;
    if last {
        flags |= REC_LAST;
        if close {
            flags |= REC_CLOSE;
        }
    }
    RecordHeader { conn, seq, len, content_length: 0, kind: RECORD_BODY, flags, pool: pool as u16, _pad: 0 }
}

/// A response the dispatcher itself sends (errors).
pub fn local_response(status: u16, why: &str, close: bool, retry_after: bool) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("{status} {reason}: {why}\n");
    let mut r = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        body.len()
    );
    if retry_after {
        r.push_str("Retry-After: 1\r\n");
    }
    if close {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    r.push_str(&body);
    r.into_bytes()
}

/// Sends body bytes of request `seq` to the worker slot that has its head.
fn forward_body(cookie: u64, link: &PoolLink, slot: usize, seq: u32, data: &[u8], last: bool, close: bool) {
    let pool = link.index;
    let max = MAX_FRAME - 64;
    let mut chunks = data.chunks(max).peekable();
    if data.is_empty() && last {
        let hdr = body_header(cookie, seq, 0, pool, last, close);
        link.send_record(slot, hdr, &[]);
    }
    while let Some(c) = chunks.next() {
        let end = last && chunks.peek().is_none();
        link.send_record(slot, body_header(cookie, seq, c.len() as u32, pool, end, close), c);
    }
}
