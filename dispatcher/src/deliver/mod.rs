//! Where a worker's output meets the connection tasks: which task a
//! response frame (or a lease release) goes to, and the dispatcher's end
//! of each worker's lease socket (`lease`).
//!
//! A fast-path request can be framed by the kernel, served by a worker
//! and answered before `accept()` has even returned the connection here,
//! so a response for an unknown connection is kept for a while
//! ([`EARLY_TTL`]) and handed over when the connection registers.

mod lease;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use bytes::Bytes;

pub use lease::{lease_socket, LeaseTx};

/// What a connection task is told.
#[derive(Debug)]
pub enum ToConn {
    /// A response frame (or a lease release) from a worker.
    Frame(Frame),
    /// Look at the socket: the kernel handed the connection to user space,
    /// or the peer closed while the connection was parked.
    Wake,
    /// The worker holding lease `gen` (trace entry `entry`) died without
    /// giving it back.
    LeaseLost { gen: u32, entry: u32 },
    /// A worker died having taken requests of this connection (it held no
    /// lease on it) and not answered them: one past the last it took, and
    /// bit `seq % 64` of each unanswered one.
    Lost { taken: u32, in_flight: u64 },
    /// The worker's application read `len` more bytes of the body of
    /// request `seq` that the slow path forwarded (its upload window).
    BodyRead { seq: u32, len: u32 },
    /// The control channel `gen` of worker slot `slot` of pool `pool` (the
    /// address of its `PoolLink`: a reload's new pool of the same index
    /// starts its generations again) is gone (its worker died or exited):
    /// slow-path requests sent over it and not answered never will be
    /// (see `pool::link::Ctl`).
    ChannelGone { pool: usize, slot: usize, gen: u64 },
    /// The lease gate refused a write into the connection's socket by
    /// process `pid` (neither the dispatcher nor the lease holder): the
    /// socket takes no more writes.
    WriteRefused { pid: u32 },
}

/// How long a response for a not-yet-registered connection is kept.
pub const EARLY_TTL: Duration = Duration::from_secs(10);
/// Most connections with early frames kept at once (as many as the kernel
/// tracks: the `conns` sockhash size).
pub const EARLY_MAX: usize = 65536;

/// A connection's answers handed to its task and not yet taken by it:
/// while the task waits for the client to read (its write blocks), they
/// pile up here; past the limits the kernel is told to stop framing the
/// connection ([`Pauser`]), so the client's own socket pushes back.
#[derive(Default)]
pub struct Backlog {
    bytes: AtomicU64,
    frames: AtomicU64,
    paused: AtomicBool,
}

impl Backlog {
    /// The task took a frame of `len` bytes.
    pub fn taken(&self, len: usize) {
        self.bytes.fetch_sub(len as u64, Ordering::Relaxed);
        self.frames.fetch_sub(1, Ordering::Relaxed);
    }

    fn added(&self, len: usize) -> (u64, u64) {
        (
            self.bytes.fetch_add(len as u64, Ordering::Relaxed) + len as u64,
            self.frames.fetch_add(1, Ordering::Relaxed) + 1,
        )
    }
}

/// Pauses a connection in the kernel when its backlog passes the limits.
pub struct Pauser {
    pub table: Arc<crate::bpf::ConnTable>,
    /// `limits.max_pending_bytes`.
    pub max_bytes: u64,
    /// Frames past which the connection is paused (a response is at least
    /// one; streamed ones are bounded by their credit).
    pub max_frames: u64,
}

struct Live {
    tx: mpsc::UnboundedSender<ToConn>,
    backlog: Arc<Backlog>,
}

/// The registry.
#[derive(Default)]
pub struct Conns {
    live: Mutex<HashMap<u64, Live>>,
    pauser: OnceLock<Pauser>,
    /// Each connection's client address (kept [`EARLY_TTL`] after it
    /// closes, for access-log records that arrive late).
    peers: Mutex<HashMap<u64, (std::net::SocketAddr, Option<Instant>)>>,
    early: Mutex<HashMap<u64, (Instant, Vec<Frame>)>>,
}

impl Conns {
    /// Registers connection `cookie`; returns its frame receiver, with any
    /// frames that arrived before it.
    /// Records connection `cookie`'s client address.
    pub fn set_peer(&self, cookie: u64, peer: std::net::SocketAddr) {
        self.peers.lock().unwrap().insert(cookie, (peer, None));
    }

    /// Connection `cookie`'s client address.
    pub fn peer(&self, cookie: u64) -> Option<std::net::SocketAddr> {
        self.peers.lock().unwrap().get(&cookie).map(|p| p.0)
    }

    /// Where backlogged connections are paused (set once, at start).
    pub fn set_pauser(&self, p: Pauser) {
        let _ = self.pauser.set(p);
    }

    pub fn register(&self, cookie: u64) -> (mpsc::UnboundedReceiver<ToConn>, Arc<Backlog>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        let mut live = self.live.lock().unwrap();
        if let Some((_, frames)) = self.early.lock().unwrap().remove(&cookie) {
            for f in frames {
                backlog.added(f.data.len());
                let _ = tx.send(ToConn::Frame(f));
            }
        }
        live.insert(cookie, Live { tx, backlog: backlog.clone() });
        (rx, backlog)
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    pub fn unregister(&self, cookie: u64) {
        self.live.lock().unwrap().remove(&cookie);
        self.early.lock().unwrap().remove(&cookie);
        if let Some(p) = self.peers.lock().unwrap().get_mut(&cookie) {
            p.1 = Some(Instant::now());
        }
    }

    /// Hands a response frame to its connection.
    pub fn deliver(&self, cookie: u64, frame: Frame) {
        let live = self.live.lock().unwrap();
        if let Some(l) = live.get(&cookie) {
            let (bytes, frames) = l.backlog.added(frame.data.len());
            let _ = l.tx.send(ToConn::Frame(frame));
            if let Some(p) = self.pauser.get() {
                if (bytes > p.max_bytes || frames > p.max_frames) && !l.backlog.paused.swap(true, Ordering::Relaxed) {
                    tracing::debug!(conn = cookie, bytes, frames, "the client is not reading its answers: pausing it");
                    p.table.pause(cookie);
                }
            }
            return;
        }
        let mut early = self.early.lock().unwrap();
        if early.len() >= EARLY_MAX && !early.contains_key(&cookie) {
            let now = Instant::now();
            early.retain(|_, (t, _)| now.duration_since(*t) < EARLY_TTL);
            if early.len() >= EARLY_MAX {
                tracing::warn!(conn = cookie, "too many responses for unknown connections; dropping one");
                return;
            }
        }
        early.entry(cookie).or_insert_with(|| (Instant::now(), Vec::new())).1.push(frame);
    }

    /// Pauses connection `cookie` in the kernel (its leased worker holds
    /// too many answers its client has not read), once.
    pub fn pause(&self, cookie: u64) {
        let live = self.live.lock().unwrap();
        let (Some(l), Some(p)) = (live.get(&cookie), self.pauser.get()) else { return };
        if !l.backlog.paused.swap(true, Ordering::Relaxed) {
            tracing::debug!(conn = cookie, "the leased worker's client is not reading its answers: pausing it");
            p.table.pause(cookie);
        }
    }

    /// Wakes connection `cookie`'s task (unknown connections are ignored:
    /// a task looks at its socket when it starts anyway).
    pub fn wake(&self, cookie: u64) {
        if let Some(l) = self.live.lock().unwrap().get(&cookie) {
            let _ = l.tx.send(ToConn::Wake);
        }
    }

    /// Tells connection `cookie` its lease `gen` is lost.
    pub fn lease_lost(&self, cookie: u64, gen: u32, entry: u32) {
        if let Some(l) = self.live.lock().unwrap().get(&cookie) {
            let _ = l.tx.send(ToConn::LeaseLost { gen, entry });
        }
    }

    /// Tells connection `cookie` a dead worker did not answer some of its
    /// requests (see [`ToConn::Lost`]).
    pub fn lost(&self, cookie: u64, taken: u32, in_flight: u64) {
        if let Some(l) = self.live.lock().unwrap().get(&cookie) {
            let _ = l.tx.send(ToConn::Lost { taken, in_flight });
        }
    }

    /// Tells connection `cookie` the lease gate refused process `pid`'s
    /// write into it.
    pub fn write_refused(&self, cookie: u64, pid: u32) {
        if let Some(l) = self.live.lock().unwrap().get(&cookie) {
            let _ = l.tx.send(ToConn::WriteRefused { pid });
        }
    }

    /// Tells every connection that control channel `gen` of pool `pool`'s
    /// slot `slot` is gone. Rare (a worker's end), so a broadcast rather
    /// than a per-request index of who sent what where.
    pub fn channel_gone(&self, pool: usize, slot: usize, gen: u64) {
        for l in self.live.lock().unwrap().values() {
            let _ = l.tx.send(ToConn::ChannelGone { pool, slot, gen });
        }
    }

    /// Tells connection `cookie` a worker read `len` more body bytes of
    /// its request `seq`.
    pub fn body_read(&self, cookie: u64, seq: u32, len: u32) {
        if let Some(l) = self.live.lock().unwrap().get(&cookie) {
            let _ = l.tx.send(ToConn::BodyRead { seq, len });
        }
    }

    /// Drops early frames older than [`EARLY_TTL`] (their connection
    /// closed before it was accepted).
    pub fn expire(&self) {
        let now = Instant::now();
        self.early.lock().unwrap().retain(|_, (t, _)| now.duration_since(*t) < EARLY_TTL);
        self.peers.lock().unwrap().retain(|_, (_, closed)| closed.is_none_or(|t| now.duration_since(t) < EARLY_TTL));
    }
}

/// A frame of a response, on its way to a connection.
#[derive(Debug)]
pub struct Frame {
    pub seq: u32,
    pub data: Bytes,
    pub last: bool,
    pub close: bool,
    /// The worker asks for a lease on the connection once this response
    /// is written; the answer goes to this lease socket.
    pub ask: Option<Arc<LeaseTx>>,
    /// Not a response: the worker gives lease `gen` back, having written
    /// every response before `seq` (and possibly a prefix of `seq`, whose
    /// rest follows as ordinary frames).
    pub release: Option<u32>,
    /// A streamed response's part: once it is written, a
    /// `RecordKind::Written` record goes to the worker's control socket
    /// here (the worker sends more only as parts are written).
    pub credit: Option<Credit>,
    /// (On the last frame of a 101 to an upgrade request) where the
    /// connection goes once it is written.
    pub tunnel: Option<Tunnel>,
}

/// Where an upgraded connection goes after its 101.
#[derive(Debug)]
pub enum Tunnel {
    /// To this worker's lease socket (`LeaseMsg::Tunnel`).
    Worker(Arc<LeaseTx>),
    /// Into the kernel, joined with the app's socket the worker sent.
    Splice(SpliceTo),
}

/// The app's side of a tunnel to splice: its socket, and what it sent
/// after its 101 that the worker had read (for the client first).
#[derive(Debug)]
pub struct SpliceTo {
    pub app: std::os::fd::OwnedFd,
    pub early: Bytes,
    /// The pool's tunnel idle time-out.
    pub idle: Option<std::time::Duration>,
}

/// Where a streamed response's write acknowledgements go: the control
/// socket of the worker that streams it.
#[derive(Clone, Debug)]
pub struct Credit(pub mpsc::UnboundedSender<Bytes>);

impl Credit {
    /// `bytes` of response `seq` on `conn` are in the client's socket.
    pub fn written(&self, conn: u64, seq: u32, bytes: u64) {
        let r = dispatcher_ebpf::abi::RecordHeader::written(conn, seq, bytes);
        let _ = self.0.send(Bytes::copy_from_slice(&r.to_bytes()));
    }

    /// The connection is gone: the worker stops streaming to it.
    pub fn abort(&self, conn: u64) {
        let r = dispatcher_ebpf::abi::RecordHeader::abort(conn);
        let _ = self.0.send(Bytes::copy_from_slice(&r.to_bytes()));
    }

    /// Whether both go to the same worker.
    pub fn same(&self, other: &Credit) -> bool {
        self.0.same_channel(&other.0)
    }
}

impl Frame {
    /// A whole response the dispatcher writes.
    pub fn whole(seq: u32, data: Bytes, close: bool) -> Frame {
        Frame { seq, data, last: true, close, ask: None, release: None, credit: None, tunnel: None }
    }
}
