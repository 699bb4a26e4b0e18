//! One client connection: writes responses back in request order, and
//! runs the slow path for whatever the kernel handed over.
//!
//! On the fast path nothing reaches this task but responses: the kernel
//! queues the requests on the pools' rings and drops the segments. The
//! socket only becomes readable when the kernel hands the connection over
//! (SK_PASS) or the client closes; the hand-off point is read once from the
//! connection's `ConnState`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use dispatcher_ebpf::abi::{
    reason, RecordHeader, MODE_BODY, MODE_HEAD, MODE_SLOW, RECORD_BODY, RECORD_HEAD, REC_CLOSE, REC_LAST, REC_SLOW,
};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::mpsc};
use tracing::Instrument;
use worker::proto::{MAX_FRAME, RECORD_ABORT};

use crate::{
    kernel::Routed,
    pools::Frame,
    serve::Shared,
    slow::{Event, SlowParser},
};

/// How often an idle connection checks its oldest request's age.
const TICK: Duration = Duration::from_secs(1);
/// How often an idle connection looks at the kernel's state.
const RECHECK: Duration = Duration::from_secs(5);
/// Bytes read from the socket at a time on the slow path.
const READ_CHUNK: usize = 64 * 1024;

/// Serves connection `cookie` until it closes.
pub async fn serve(shared: Arc<Shared>, stream: TcpStream, cookie: u64, rx: mpsc::UnboundedReceiver<Frame>) {
    let peer = stream.peer_addr().ok();
    let span = tracing::debug_span!("conn", id = cookie, peer = ?peer);
    let mut c = Conn {
        shared: shared.clone(),
        cookie,
        stream,
        next: 0,
        pending: BTreeMap::new(),
        slow: None,
        sent: HashMap::new(),
        last_progress: Instant::now(),
        next_check: Instant::now(),
        kernel_seen: (0, 0, 0),
    };
    c.run(rx).instrument(span).await;
    c.cleanup();
}

/// Where the body of the request being parsed goes.
enum BodyTo {
    Pool { pool: u32, seq: u32, close: bool },
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
    stream: TcpStream,
    /// Sequence number of the next response to write.
    next: u32,
    /// Responses (or parts) waiting for earlier ones.
    pending: BTreeMap<u32, Vec<Frame>>,
    slow: Option<Slow>,
    /// Slow-path requests sent to pools and not yet answered: seq →
    /// (pool, bytes), for the queue accounting and aborts.
    sent: HashMap<u32, (u32, u64)>,
    /// Last time bytes moved on the connection (either way).
    last_progress: Instant,
    /// When the time-outs next look at the kernel's state.
    next_check: Instant,
    /// (seq, head_len, body_left) of the kernel's state at the last look.
    kernel_seen: (u32, u32, u64),
}

enum Flow {
    Continue,
    Close,
}

impl Conn {
    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Frame>) {
        // Allocated on the first read: on the fast path most connections
        // never read anything in user space.
        let mut buf = Vec::new();
        let mut eof = false;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                r = self.stream.readable(), if !eof && !self.slow.as_ref().is_some_and(|s| s.parser.is_done()) => {
                    if r.is_err() { return; }
                    if buf.is_empty() {
                        buf.resize(READ_CHUNK, 0);
                    }
                    match self.stream.try_read(&mut buf) {
                        Ok(0) => { eof = true; }
                        Ok(n) => {
                            self.last_progress = Instant::now();
                            let data = buf[..n].to_vec();
                            if let Flow::Close = self.on_bytes(&data).await { return; }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                f = rx.recv() => {
                    let Some(f) = f else { return };
                    if let Flow::Close = self.on_frame(f).await { return; }
                }
                _ = tick.tick() => {
                    if let Flow::Close = self.check_timers().await { return; }
                }
            }
            if eof && self.outstanding() == 0 {
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
                let _ = self.stream.write_all(&r).await;
                return Flow::Close;
            }
            return Flow::Continue;
        }
        if partial_head && idle >= header {
            tracing::debug!(conn = self.cookie, "request not received in time; answering 408");
            let r = local_response(408, "the request did not arrive in time", true, false);
            let _ = self.stream.write_all(&r).await;
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
        if f.seq < self.next {
            return Flow::Continue;
        }
        self.pending.entry(f.seq).or_default().push(f);
        self.flush().await
    }

    /// Writes every response that is next in order.
    async fn flush(&mut self) -> Flow {
        while let Some(frames) = self.pending.get_mut(&self.next) {
            let mut done = None;
            for f in frames.drain(..) {
                if self.stream.write_all(&f.data).await.is_err() {
                    return Flow::Close;
                }
                self.last_progress = Instant::now();
                if f.last {
                    done = Some(f.close);
                    break;
                }
            }
            let Some(close) = done else { break };
            self.pending.remove(&self.next);
            if let Some((pool, bytes)) = self.sent.remove(&self.next) {
                self.shared.pools[pool as usize].release(bytes);
            }
            self.next += 1;
            if close {
                let _ = self.stream.shutdown().await;
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Queues a response the dispatcher makes itself.
    async fn answer(&mut self, seq: u32, status: u16, why: &str, close: bool, retry_after: bool, head_only: bool) -> Flow {
        let mut data = local_response(status, why, close, retry_after);
        if head_only {
            let end = data.windows(4).position(|w| w == b"\r\n\r\n").map_or(data.len(), |p| p + 4);
            data.truncate(end);
        }
        let data = Bytes::from(data);
        self.shared.kernel.lock().unwrap().count_slow(None, 0, 1);
        self.on_frame(Frame { seq, data, last: true, close }).await
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
        tracing::debug!(conn = self.cookie, reason = reason::name(why), seq = st.seq, skip = st.handoff_skip, prefix = st.handoff_prefix, "slow path takes over");
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
            s.body_to = BodyTo::Pool { pool: st.pool, seq: st.seq, close: st.req_flags != 0 };
            s.seq = st.seq + 1;
        }
        self.slow = Some(s);
        Some(prefix)
    }

    async fn on_bytes(&mut self, data: &[u8]) -> Flow {
        let mut input: Vec<u8>;
        let mut data = data;
        if self.slow.is_none() {
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
            if let BodyTo::Pool { pool, seq, close } = s.body_to {
                self.forward_body(pool, seq, &data[..n], last, close);
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
                let s = self.slow.as_mut().unwrap();
                let seq = s.seq;
                s.seq += 1;
                s.body_to = BodyTo::Discard;
                let queue_full = std::mem::take(&mut s.first_queue_full);
                let routed = self.shared.kernel.lock().unwrap().route(h.host.as_deref(), &h.route_path);
                let pool = match routed {
                    Routed::NoRoute => {
                        return self.answer(seq, 404, "no route matches this host and path", h.close, false, h.method == "HEAD").await
                    }
                    Routed::Pool(p) => p,
                };
                let link = &self.shared.pools[pool as usize];
                let size = h.bytes.len() as u64 + h.content_length;
                if queue_full || !link.has_worker() || link.inflight.load(Ordering::Relaxed) + size > link.queue_bytes.max(size) {
                    return self.answer(seq, 503, "the pool's queue is full", h.close, true, h.method == "HEAD").await;
                }
                if h.expect_continue && self.next == seq && self.pending.is_empty() {
                    let _ = self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                }
                link.inflight.fetch_add(size, Ordering::Relaxed);
                self.sent.insert(seq, (pool, size));
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
                link.send_record(hdr, &h.bytes);
                self.shared.kernel.lock().unwrap().count_slow(Some(pool), 1, 0);
                if h.content_length > 0 {
                    self.slow.as_mut().unwrap().body_to = BodyTo::Pool { pool, seq, close };
                }
                Flow::Continue
            }
            Event::Body { data, last } => {
                if let BodyTo::Pool { pool, seq, close } = self.slow.as_ref().unwrap().body_to {
                    self.forward_body(pool, seq, &data, last, close);
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

    fn forward_body(&self, pool: u32, seq: u32, data: &[u8], last: bool, close: bool) {
        let link = &self.shared.pools[pool as usize];
        let max = MAX_FRAME - 64;
        let mut chunks = data.chunks(max).peekable();
        if data.is_empty() && last {
            let hdr = body_header(self.cookie, seq, 0, pool, last, close);
            link.send_record(hdr, &[]);
        }
        while let Some(c) = chunks.next() {
            let end = last && chunks.peek().is_none();
            link.send_record(body_header(self.cookie, seq, c.len() as u32, pool, end, close), c);
        }
    }

    fn cleanup(&mut self) {
        let mut aborted = std::collections::BTreeSet::new();
        for (_, (pool, bytes)) in self.sent.drain() {
            self.shared.pools[pool as usize].release(bytes);
            aborted.insert(pool);
        }
        for pool in aborted {
            let hdr = RecordHeader { conn: self.cookie, kind: RECORD_ABORT, ..Default::default() };
            self.shared.pools[pool as usize].send_record(hdr, &[]);
        }
        self.shared.conns.unregister(self.cookie);
        self.shared.kernel.lock().unwrap().forget_conn(self.cookie);
    }
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
    let mut r = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n", body.len());
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
