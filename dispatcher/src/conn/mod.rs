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
//! the socket (a *lease*, protocol in `dispatcher_ebpf::wire`) and writes nothing
//! more until the lease is back. It takes the lease back (revokes it) as
//! soon as somebody else has something to write (another pool's response,
//! its own error answer, the slow path), the connection idles long enough
//! for a time-out to be due, or the client closes its side. While the
//! lease is out the socket is parked outside tokio's poller (see
//! `parking`).

mod lease;
mod order;
mod parking;
mod slow;
mod socket;
mod timers;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use dispatcher_ebpf::abi::MODE_SLOW;
use dispatcher_ebpf::wire::LeaseMsg;
use tokio::{net::TcpStream, sync::mpsc};
use tracing::Instrument;

pub use parking::Parking;
pub use timers::{Timeout, Timeouts};

use crate::{
    access_log::AccessLog,
    bpf::{ConnTable, Counters, RouteLookup},
    config::Config,
    deliver::{Conns, Frame, LeaseTx, ToConn},
    pool::{PoolLink, Registry},
};
use slow::Slow;

/// What every connection task uses of the rest of the dispatcher.
pub struct Context {
    pub limits: Limits,
    /// The kernel's framing state per connection.
    pub conn_state: Arc<ConnTable>,
    /// The route table, read.
    pub routes: RouteLookup,
    /// The slow path's counters.
    pub counters: Arc<Counters>,
    /// The running pools.
    pub pools: Arc<Registry>,
    /// Where this task registers for its frames.
    pub conns: Arc<Conns>,
    /// Where leased connections wait (out of tokio's poller).
    pub parking: Arc<Parking>,
    pub access_log: Option<AccessLog>,
    /// The dispatcher's own answers, counted.
    pub local: Arc<LocalAnswers>,
    /// Connections the time-outs ended, counted.
    pub timeouts: Arc<Timeouts>,
    /// Where upgraded connections are spliced with their app's socket
    /// (None: `fast_path.tunnel_splice` is off, or the lease gate is on).
    pub splice: Option<Arc<crate::splice::Splicer>>,
}

/// The limits a connection enforces (from `[limits]` and `[fast_path]`).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body: u64,
    pub response_timeout_secs: u64,
    pub header_timeout_secs: u64,
    pub keepalive_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub min_body_rate: u64,
    pub max_pipelined: u64,
    pub max_pending_bytes: u64,
    /// Workers may be granted leases (`fast_path.direct_responses`).
    pub direct_responses: bool,
}

impl Limits {
    pub fn of(cfg: &Config) -> Limits {
        Limits {
            max_body: cfg.max_body,
            response_timeout_secs: cfg.response_timeout_secs,
            header_timeout_secs: cfg.header_timeout_secs,
            keepalive_timeout_secs: cfg.keepalive_timeout_secs,
            body_timeout_secs: cfg.body_timeout_secs,
            min_body_rate: cfg.min_body_rate,
            max_pipelined: cfg.max_pipelined,
            max_pending_bytes: cfg.max_pending_bytes,
            direct_responses: cfg.direct_responses,
        }
    }
}

/// Answers the dispatcher wrote itself, by status class (1xx..5xx).
#[derive(Default)]
pub struct LocalAnswers([AtomicU64; 5]);

impl LocalAnswers {
    fn count(&self, status: u16) {
        self.0[((status / 100) as usize).clamp(1, 5) - 1].fetch_add(1, Ordering::Relaxed);
    }

    /// Answers of class `class`xx (1..=5).
    pub fn get(&self, class: usize) -> u64 {
        self.0[class - 1].load(Ordering::Relaxed)
    }
}

/// How often an idle connection checks its oldest request's age.
const TICK: Duration = Duration::from_secs(1);
/// How often an idle connection looks at the kernel's state.
const RECHECK: Duration = Duration::from_secs(5);
/// Bytes read from the socket at a time on the slow path.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read before the connection is known to need user-space reads.
const PROBE_READ: usize = 2048;

/// Serves connection `cookie` until it closes.
pub async fn serve(
    ctx: Arc<Context>,
    stream: TcpStream,
    cookie: u64,
    rx: mpsc::UnboundedReceiver<ToConn>,
    backlog: Arc<crate::deliver::Backlog>,
) {
    let peer = stream.peer_addr().ok();
    let span = tracing::debug_span!("conn", id = cookie, peer = ?peer);
    let mut c = Conn {
        ctx,
        cookie,
        peer,
        sock: Sock::Polled(stream),
        next: 0,
        pending: BTreeMap::new(),
        slow: None,
        sent: HashMap::new(),
        last_progress: Instant::now(),
        next_check: Instant::now(),
        kernel_seen: (0, 0),
        lease: lease::Lease::Home,
        lease_gen: 0,
        lease_peers: Vec::new(),
        stream_peers: Vec::new(),
        eof: false,
        woken: false,
        written: 0,
        request_line: Vec::new(),
        handed_over: false,
        read: 0,
        resume_due: false,
        deferred: std::collections::VecDeque::new(),
        replay_due: false,
        send_behind: None,
        backlog,
    };
    c.run(rx).instrument(span).await;
    c.cleanup();
}

struct Conn {
    ctx: Arc<Context>,
    cookie: u64,
    /// The client's address (for the slow path's head records).
    peer: Option<std::net::SocketAddr>,
    sock: Sock,
    /// Sequence number of the next response to write.
    next: u32,
    /// Responses (or parts) waiting for earlier ones.
    pending: BTreeMap<u32, Vec<Frame>>,
    slow: Option<Slow>,
    /// Slow-path requests sent to pools and not yet answered, for the
    /// queue accounting, aborts and a worker's death.
    sent: HashMap<u32, Sent>,
    /// Last time bytes moved on the connection (either way).
    last_progress: Instant,
    /// When the time-outs next look at the kernel's state.
    next_check: Instant,
    /// (seq, body_left) of the kernel's state at the last look (head bytes
    /// are not progress: a head has its time-out from its first byte).
    kernel_seen: (u32, u64),
    /// A worker holds the connection: it writes responses from `next` on.
    lease: lease::Lease<Arc<LeaseTx>>,
    /// Generation of the last lease granted.
    lease_gen: u32,
    /// Every lease socket that asked about this connection (told to
    /// forget it when it closes).
    lease_peers: Vec<Arc<LeaseTx>>,
    /// Every worker that streamed a response here (told when the
    /// connection closes, so it stops waiting for its parts to be written).
    stream_peers: Vec<crate::deliver::Credit>,
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
    /// The connection went to a worker after a 101 (an upgrade): it is
    /// not closed here, and its kernel state stays (the verdict program
    /// still trims retransmitted bytes off its segments).
    handed_over: bool,
    /// Bytes read from the socket (all after the kernel's hand-off: the
    /// kernel counts the same to splice a tunnel, see `abi::TunnelCtl`).
    read: u64,
    /// An upgrade was declined: the parser's held bytes are parsed next.
    resume_due: bool,
    /// Parsed events held back: a request that waits for this
    /// connection's earlier ones to leave its pool's queue, and what
    /// followed it. Nothing more is read meanwhile.
    deferred: std::collections::VecDeque<crate::http::Event>,
    /// A response was written: the deferred events may go on.
    replay_due: bool,
    /// Since when the socket has refused bytes, and `written` then (the
    /// client's read rate is judged from there).
    send_behind: Option<(Instant, u64)>,
    /// Frames handed to this task and not taken yet (see `deliver`).
    backlog: Arc<crate::deliver::Backlog>,
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

enum Flow {
    Continue,
    Close,
}

/// Where a slow-path request went: its pool, its slot and the generation
/// of the slot's control channel (`pool::link::Ctl::gen`), and its bytes
/// counted against the pool's queue.
struct Sent {
    link: Arc<PoolLink>,
    bytes: u64,
    slot: usize,
    gen: u64,
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
                }, if !self.eof && self.slow.as_ref().is_none_or(|s| !s.parser.is_done() && s.may_read()) && !self.backlogged() => {
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
                            self.read += n as u64;
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
                            self.backlog.taken(f.data.len());
                            if let Flow::Close = self.on_frame(f).await { return; }
                        }
                        Some(ToConn::LeaseLost { gen, entry }) => {
                            if self.lease.holds(gen) {
                                if let Flow::Close = self.lease_lost(gen, entry).await { return; }
                                if let Flow::Close = self.flush().await { return; }
                            }
                        }
                        Some(ToConn::Lost { taken, in_flight }) => {
                            if let Flow::Close = self.requests_lost(taken, in_flight).await { return; }
                        }
                        Some(ToConn::WriteRefused { pid }) => {
                            // A worker kept the socket after its lease (or
                            // someone got hold of it): nothing it wrote
                            // reached the client, and the kernel now
                            // refuses every write on this socket.
                            tracing::warn!(conn = self.cookie, pid, "the lease gate refused a write into this connection by a process that does not hold it; closing the connection");
                            return;
                        }
                        Some(ToConn::ChannelGone { pool, slot, gen }) => {
                            if let Flow::Close = self.channel_gone(pool, slot, gen).await { return; }
                        }
                        Some(ToConn::BodyRead { seq, len }) => {
                            if let Some(s) = &mut self.slow {
                                s.body_read(seq, len);
                            }
                        }
                        Some(ToConn::Wake) => {
                            tracing::debug!(conn = self.cookie, leased = !self.lease.is_home(), "woken (hand-off or peer closed)");
                            self.woken = true;
                            // Bytes to read or the peer closed: the socket
                            // is ours to poll again once the lease is back.
                            self.revoke();
                            if self.lease.is_home() {
                                self.unpark();
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    if let Flow::Close = self.check_timers().await { return; }
                }
            }
            if std::mem::take(&mut self.replay_due) {
                while let Some(ev) = self.deferred.pop_front() {
                    let left = self.deferred.len();
                    if let Flow::Close = self.on_event(ev).await {
                        return;
                    }
                    if self.deferred.len() > left {
                        // Deferred again: until the next response.
                        break;
                    }
                }
            }
            if std::mem::take(&mut self.resume_due) {
                let events = self.slow.as_mut().map(|s| s.parser.resume()).unwrap_or_default();
                for ev in events {
                    if let Flow::Close = self.on_event(ev).await {
                        return;
                    }
                }
            }
            if self.eof && self.lease.is_home() {
                // The client left: once what it sent in full is answered,
                // end. A request whose body was still arriving never will
                // be complete: it is dropped (cleanup tells its worker)
                // rather than left to the response time-out, which wrote
                // a 504 to a dead socket a minute later.
                let outstanding = self.outstanding();
                let mid_body = self.slow.as_ref().is_some_and(|s| s.body_in_progress());
                if outstanding == 0 || (outstanding == 1 && mid_body) {
                    if mid_body {
                        tracing::debug!(conn = self.cookie, "the client left in the middle of a request body");
                    }
                    return;
                }
            }
        }
    }

    /// Whether reading the socket waits: events are held back, or the
    /// client has too many answers it has not read (pipelined requests it
    /// does not read the answers of). Only the slow path reads; the kernel
    /// path is paused in the kernel (see `pause`).
    fn backlogged(&self) -> bool {
        if !self.deferred.is_empty() {
            return true;
        }
        let Some(s) = &self.slow else { return false };
        let lim = &self.ctx.limits;
        if (s.seq.saturating_sub(self.next)) as u64 >= lim.max_pipelined {
            return true;
        }
        !self.pending.is_empty()
            && self.pending.values().flatten().map(|f| f.data.len() as u64).sum::<u64>() >= lim.max_pending_bytes
    }

    fn cleanup(&mut self) {
        // A request body the kernel was copying to a worker stops short:
        // tell its pool's workers, or the partial request would keep a
        // recycling worker from ever stopping.
        let mid_body = self.ctx.conn_state.get(self.cookie).filter(|st| st.mode != MODE_SLOW && st.body_left > 0);
        if let Some(link) = mid_body.and_then(|st| self.ctx.pools.get(st.pool)) {
            link.abort(self.cookie);
        }
        if let Sock::Parked(s) = &self.sock {
            self.ctx.parking.unpark(s);
        }
        if let (true, false, Some(fd)) = (self.lease_gen > 0, self.handed_over, self.sock.fd()) {
            // A worker may still hold a copy of the socket: end the
            // connection itself, not just our descriptor.
            let _ = nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&fd), nix::sys::socket::Shutdown::Both);
        }
        if let Some(to) = self.lease.take() {
            to.settled(self.cookie);
        }
        for p in self.lease_peers.drain(..) {
            p.send(LeaseMsg::Forget { conn: self.cookie }, None);
        }
        for p in self.stream_peers.drain(..) {
            p.abort(self.cookie);
        }
        let mut aborted: HashMap<u32, Arc<PoolLink>> = HashMap::new();
        for (_, s) in self.sent.drain() {
            s.link.release(s.bytes);
            aborted.insert(s.link.index, s.link);
        }
        for link in aborted.values() {
            link.abort(self.cookie);
        }
        self.ctx.conns.unregister(self.cookie);
        if !self.handed_over {
            self.ctx.conn_state.forget(self.cookie);
        }
    }
}
