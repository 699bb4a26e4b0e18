//! The slow path of one connection: once the kernel hands the connection
//! over (or never tracked it), its bytes are read here, framed by the
//! user-space parser, routed with the kernel's table and sent to the
//! pool's workers over their control channels; the dispatcher's own
//! answers (404, 503, 4xx) take their place in the response order.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use dispatcher_ebpf::abi::{
    reason, RecordHeader, LENGTH_UNKNOWN, MODE_SLOW, RECORD_BODY, RECORD_HEAD, REC_CLOSE, REC_LAST, REC_SLOW,
    REC_SPLICE, REC_TRAILERS, REC_UPGRADE,
};
use dispatcher_ebpf::wire::MAX_FRAME;

use super::{Conn, Flow};
use crate::{
    bpf::Routed,
    http::{Event, SlowParser},
    pool::PoolLink,
};

/// Where the body of the request being parsed goes.
pub(super) enum BodyTo {
    /// To `link`'s worker slot `slot` (local), which has the head: the
    /// worker of control channel generation `gen` (`pool::link::Ctl`), or
    /// whichever worker takes the slot's ring (`None`: the head went
    /// through the kernel).
    Pool {
        link: Arc<PoolLink>,
        slot: usize,
        gen: Option<u64>,
        seq: u32,
        close: bool,
        /// Body bytes still to come ([`LENGTH_UNKNOWN`] if chunked).
        left: u64,
    },
    Discard,
}

pub(super) struct Slow {
    pub(super) parser: SlowParser,
    /// The upgrade request the connection is held for (the parser holds
    /// what follows it until its answer).
    pub(super) upgrade: Option<u32>,
    /// Sequence number of the next request the parser completes.
    pub(super) seq: u32,
    /// Socket bytes still to skip (the kernel consumed them).
    pub(super) skip: usize,
    /// The kernel found the first request's pool queue full.
    pub(super) first_queue_full: bool,
    /// Body bytes of a kernel-framed request still to forward (the ring
    /// filled up mid-body).
    pub(super) body_left: u64,
    pub(super) body_to: BodyTo,
    /// Body bytes forwarded to the worker that its application has not
    /// read yet; the socket is not read while this is at
    /// [`UPLOAD_WINDOW`].
    pub(super) unread: u64,
    /// When the first bytes of the head being received arrived (the
    /// header time-out counts from there).
    pub(super) head_since: Option<Instant>,
    /// When the body being received began (or the client was last waited
    /// for because the application was not reading), and its bytes since.
    pub(super) body_since: Option<Instant>,
    pub(super) body_got: u64,
}

/// Body bytes forwarded to a worker and not yet read by its application
/// past which the dispatcher stops reading the client (TCP pushes back):
/// a 1 GiB upload to a slow application holds at most this much here and
/// in the worker.
pub(super) const UPLOAD_WINDOW: u64 = 1 << 20;

impl Slow {
    /// Whether the socket may be read (the upload window is open).
    pub(super) fn may_read(&self) -> bool {
        // Held after an upgrade request: at most what a tunnel takes along.
        self.unread < UPLOAD_WINDOW && self.parser.held() < dispatcher_ebpf::wire::TUNNEL_MAX_EARLY
    }

    /// The worker read `len` more bytes of request `seq`'s body.
    pub(super) fn body_read(&mut self, seq: u32, len: u32) {
        if matches!(self.body_to, BodyTo::Pool { seq: s, .. } if s == seq) {
            self.unread = self.unread.saturating_sub(len as u64);
        }
    }

    /// The body being forwarded ended (or goes nowhere from now on).
    fn body_done(&mut self) {
        self.body_to = BodyTo::Discard;
        self.unread = 0;
        self.body_since = None;
    }

    fn body_started(&mut self) {
        self.body_since = Some(Instant::now());
        self.body_got = 0;
    }

    /// The worker that request(s) `seqs` went to (pool `pool` (its
    /// `PoolLink`'s address), slot
    /// `slot`) is gone: a body still arriving for one of them is read from
    /// the client and dropped.
    pub(super) fn body_lost(&mut self, pool: usize, slot: usize, seqs: &[u32]) {
        if matches!(&self.body_to, BodyTo::Pool { link, slot: s, seq, .. }
            if Arc::as_ptr(link) as usize == pool && *s == slot && seqs.contains(seq))
        {
            self.body_to = BodyTo::Discard;
            self.unread = 0;
        }
    }

    /// Whether a request's body is arriving (the request is counted in
    /// `seq`): if the client leaves now, it never will be complete.
    pub(super) fn body_in_progress(&self) -> bool {
        self.body_left > 0 || matches!(self.body_to, BodyTo::Pool { .. })
    }
}

impl Conn {
    pub(super) fn start_slow(&mut self) -> Option<Vec<u8>> {
        let max_body = self.ctx.limits.max_body;
        let st = self.ctx.conn_state.get(self.cookie);
        let Some(st) = st else {
            // Not tracked by the kernel: ours from the first byte.
            self.slow = Some(Slow {
                parser: SlowParser::new(max_body),
                seq: 0,
                skip: 0,
                first_queue_full: false,
                body_left: 0,
                body_to: BodyTo::Discard,
                unread: 0,
                upgrade: None,
                head_since: None,
                body_since: None,
                body_got: 0,
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
            unread: 0,
            upgrade: None,
            head_since: None,
            body_since: None,
            body_got: 0,
        };
        if st.body_left > 0 {
            // Handed over mid-body (the ring filled up, or the segment used
            // up the tail-call budget): the head and part of the body are
            // in the worker's ring; the rest goes over its control socket.
            s.body_left = st.body_left;
            // The head went through the kernel to ring `st.ring`.
            if let Some(link) = self.ctx.pools.get(st.pool) {
                let slot = (st.ring as usize).saturating_sub(link.first_ring);
                let close = st.req_flags != 0;
                s.body_to = BodyTo::Pool { link, slot, gen: None, seq: st.seq, close, left: st.body_left };
            }
            s.seq = st.seq + 1;
            s.body_started();
        }
        self.slow = Some(s);
        Some(prefix)
    }

    pub(super) async fn on_bytes(&mut self, data: &[u8]) -> Flow {
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
        } else if let Some(s) = self.slow.as_mut().filter(|s| s.skip > 0) {
            let skip = s.skip.min(data.len());
            s.skip -= skip;
            data = &data[skip..];
        }
        // A body the kernel started.
        let s = self.slow.as_mut().unwrap();
        if s.body_left > 0 {
            let n = (s.body_left as usize).min(data.len());
            s.body_left -= n as u64;
            let last = s.body_left == 0;
            if let BodyTo::Pool { link, slot, gen, seq, close, left } = &mut s.body_to {
                forward_body(self.cookie, link, (*slot, *gen), *seq, &data[..n], last, *close, left);
                s.unread += n as u64;
            }
            s.body_got += n as u64;
            data = &data[n..];
            if !last {
                return Flow::Continue;
            }
            s.body_done();
        }
        let events = self.slow.as_mut().unwrap().parser.feed(data);
        for ev in events {
            if !self.deferred.is_empty() {
                // Behind a request that waits: in order, after it.
                self.deferred.push_back(ev);
                continue;
            }
            if let Flow::Close = self.on_event(ev).await {
                return Flow::Close;
            }
        }
        if let Some(s) = self.slow.as_mut() {
            if !s.parser.partial_head() {
                s.head_since = None;
            } else if s.head_since.is_none() {
                s.head_since = Some(Instant::now());
            }
        }
        Flow::Continue
    }

    pub(super) async fn on_event(&mut self, ev: Event) -> Flow {
        match ev {
            Event::Head(h) => {
                // One route lookup (map syscalls) serves both the wait
                // check and the dispatch below.
                let routed = self.ctx.routes.route(h.host.as_deref(), &h.route_path);
                if self.must_wait(&h, &routed) {
                    // This connection's own earlier requests fill the
                    // pool's queue (two pipelined 1 MiB uploads with a
                    // 2 MiB queue): the request waits for them, and the
                    // socket is not read meanwhile, instead of a 503.
                    self.deferred.push_front(Event::Head(h));
                    return Flow::Continue;
                }
                if self.ctx.access_log.is_some() {
                    self.request_line = h.bytes.to_vec();
                }
                let s = self.slow.as_mut().unwrap();
                let seq = s.seq;
                s.seq += 1;
                s.body_done();
                s.head_since = None;
                if h.content_length > 0 {
                    s.body_started();
                }
                if h.upgrade {
                    // Whoever answers it (a pool or this task's own 404 or
                    // 503), the parser resumes unless the answer is a 101.
                    s.upgrade = Some(seq);
                }
                let queue_full = std::mem::take(&mut s.first_queue_full);
                let pool = match routed {
                    Routed::NoRoute => {
                        return self
                            .answer(seq, 404, "no route matches this host and path", h.close, false, h.method == "HEAD")
                            .await
                    }
                    Routed::Pool(p) => p,
                };
                let Some(link) = self.ctx.pools.get(pool) else {
                    return self
                        .answer(seq, 503, "the pool is being reconfigured", h.close, true, h.method == "HEAD")
                        .await;
                };
                // A chunked body's length is not known: its head is what
                // the queue accounts for (the upload window bounds the rest).
                let announced = if h.content_length == LENGTH_UNKNOWN { 0 } else { h.content_length };
                let size = h.bytes.len() as u64 + announced;
                if let Some(why) = link.stopped() {
                    let why = format!("pool `{}` is stopped: {why}", link.name);
                    return self.answer(seq, 503, &why, h.close, true, h.method == "HEAD").await;
                }
                if queue_full || link.inflight.load(Ordering::Relaxed) + size > link.queue_bytes.max(size) {
                    return self.answer(seq, 503, "the pool's queue is full", h.close, true, h.method == "HEAD").await;
                }
                if h.expect_continue && self.next == seq && self.pending.is_empty() && self.lease.is_home() {
                    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
                    self.write(CONTINUE).await;
                }
                link.inflight.fetch_add(size, Ordering::Relaxed);
                let close = h.close;
                let mut flags = REC_SLOW;
                if close {
                    flags |= REC_CLOSE;
                }
                if h.content_length == 0 {
                    flags |= REC_LAST;
                }
                if h.upgrade {
                    flags |= REC_UPGRADE;
                    // The kernel can join the client's socket with an
                    // app's only if it tracks the connection.
                    if self.ctx.splice.is_some() && self.ctx.conn_state.get(self.cookie).is_some() {
                        flags |= REC_SPLICE;
                    }
                }
                let hdr = RecordHeader {
                    conn: self.cookie,
                    seq,
                    len: h.bytes.len() as u32,
                    content_length: h.content_length,
                    kind: RECORD_HEAD,
                    flags,
                    peer_port: self.peer.map_or(0, |a| a.port()),
                    peer_ip4: match self.peer {
                        Some(std::net::SocketAddr::V4(a)) => u32::from_ne_bytes(a.ip().octets()),
                        _ => 0,
                    },
                };
                let (slot, gen) = link.send_head(hdr, &h.bytes);
                self.sent.insert(seq, super::Sent { link: link.clone(), bytes: size, slot, gen });
                self.ctx.counters.count_slow(Some(pool), 1, 0);
                if h.content_length > 0 {
                    let left = h.content_length;
                    self.slow.as_mut().unwrap().body_to = BodyTo::Pool { link, slot, gen: Some(gen), seq, close, left };
                }
                Flow::Continue
            }
            Event::Body { data, last } => {
                let s = self.slow.as_mut().unwrap();
                s.body_got += data.len() as u64;
                if let BodyTo::Pool { link, slot, gen, seq, close, left } = &mut s.body_to {
                    forward_body(self.cookie, link, (*slot, *gen), *seq, &data, last, *close, left);
                    s.unread += data.len() as u64;
                }
                if last {
                    s.body_done();
                }
                Flow::Continue
            }
            Event::Trailers(t) => {
                let s = self.slow.as_mut().unwrap();
                if let BodyTo::Pool { link, slot, gen, seq, .. } = &s.body_to {
                    // Not body bytes: outside the upload window.
                    let mut hdr = body_header(self.cookie, *seq, t.len() as u32, false, false, LENGTH_UNKNOWN);
                    hdr.flags |= REC_TRAILERS;
                    link.send_follow(*slot, *gen, hdr, &t);
                }
                Flow::Continue
            }
            Event::Error { status, why } => {
                let s = self.slow.as_mut().unwrap();
                let seq = match std::mem::replace(&mut s.body_to, BodyTo::Discard) {
                    // Mid-body (a chunked body grew past `max_body`, or its
                    // framing broke): the worker has this request's head;
                    // it drops the request, and the answer is ours. Whichever
                    // of the two answers comes first is written; the
                    // connection closes after it.
                    BodyTo::Pool { link, seq, .. } => {
                        link.abort(self.cookie);
                        seq
                    }
                    BodyTo::Discard => {
                        s.seq += 1;
                        s.seq - 1
                    }
                };
                tracing::debug!(conn = self.cookie, status, why, "rejecting request");
                self.answer(seq, status, why, true, false, false).await
            }
        }
    }
}

impl Conn {
    /// Whether request `h` would find its pool's queue full only because
    /// of this connection's requests already in it.
    fn must_wait(&self, h: &crate::http::Head, routed: &Routed) -> bool {
        if self.sent.is_empty() || self.slow.as_ref().is_some_and(|s| s.first_queue_full) {
            return false;
        }
        let Routed::Pool(pool) = *routed else { return false };
        let Some(link) = self.ctx.pools.get(pool) else { return false };
        let mine: u64 = self.sent.values().filter(|s| s.link.index == link.index).map(|s| s.bytes).sum();
        if mine == 0 {
            return false;
        }
        let announced = if h.content_length == LENGTH_UNKNOWN { 0 } else { h.content_length };
        let size = h.bytes.len() as u64 + announced;
        link.inflight.load(Ordering::Relaxed) + size > link.queue_bytes.max(size)
    }
}

fn body_header(conn: u64, seq: u32, len: u32, last: bool, close: bool, left: u64) -> RecordHeader {
    let mut flags = REC_SLOW;
    if last {
        flags |= REC_LAST;
        if close {
            flags |= REC_CLOSE;
        }
    }
    RecordHeader { conn, seq, len, content_length: left, kind: RECORD_BODY, flags, peer_port: 0, peer_ip4: 0 }
}

/// Sends body bytes of request `seq` to the worker slot that has its head;
/// `left` (body bytes still to come, [`LENGTH_UNKNOWN`] if chunked) goes
/// down by what is sent.
#[allow(clippy::too_many_arguments)]
fn forward_body(
    cookie: u64,
    link: &PoolLink,
    (slot, gen): (usize, Option<u64>),
    seq: u32,
    data: &[u8],
    last: bool,
    close: bool,
    left: &mut u64,
) {
    let max = MAX_FRAME - 64;
    let mut chunks = data.chunks(max).peekable();
    if data.is_empty() && last {
        let hdr = body_header(cookie, seq, 0, last, close, *left);
        link.send_follow(slot, gen, hdr, &[]);
    }
    while let Some(c) = chunks.next() {
        let end = last && chunks.peek().is_none();
        link.send_follow(slot, gen, body_header(cookie, seq, c.len() as u32, end, close, *left), c);
        if *left != LENGTH_UNKNOWN {
            *left = left.saturating_sub(c.len() as u64);
        }
    }
}
