//! Where a worker's responses go: straight into the client's socket when
//! the worker holds a lease on the connection, through the dispatcher
//! otherwise (the protocol is described in `dispatcher_ebpf::wire`).
//!
//! The direct path is the reason leases exist: without one, every response
//! costs the dispatcher a read from the control socket and a write to the
//! client, which measured as more CPU per request than the worker itself
//! spends (docs/performance.md).
//!
//! [`Outbound`] decides per response which way it goes. Its parts, one job
//! each: `lease` is the lease machine (asked, held, given back),
//! `lease_socket` reads the dispatcher's lease messages, `socket` writes
//! into a leased client's socket, `relay` frames what goes through the
//! dispatcher, `reports` batches access-log records and counters for it.

mod lease;
mod lease_socket;
mod relay;
mod reports;
mod socket;
mod stream;
mod wire;

pub(crate) use wire::Wire;

use std::{
    collections::HashMap,
    io,
    os::fd::OwnedFd,
    sync::{Arc, Mutex, OnceLock},
};

use bytes::Bytes;
use tokio::{net::unix::OwnedWriteHalf, sync::mpsc, task::JoinHandle};

use crate::progress::{Loose, ProgressMap};
use crate::proto::{self, WorkerFrame};
use crate::Response;
use lease::LeaseState;

/// The response router one worker's [`Responder`](crate::Responder)s share:
/// per connection, whether its responses go through the dispatcher or
/// straight into the client's socket.
pub(crate) struct Outbound {
    ctl: mpsc::UnboundedSender<Bytes>,
    /// The dispatcher gave us a lease socket, so asking makes sense.
    leases: bool,
    conns: Mutex<HashMap<u64, LeaseState>>,
    /// The lease socket, also read synchronously (see `respond`).
    lease_sock: OnceLock<Arc<OwnedFd>>,
    /// Where leased connections' progress is traced for the dispatcher.
    progress: Option<Arc<ProgressMap>>,
    /// Held while a lease message is received and handled.
    lease_order: Mutex<()>,
    /// Kernel requests taken and not answered yet on connections without
    /// a lease, in shared memory (merged into a lease's trace when one is
    /// granted, whatever the lease state was when they were taken).
    loose: Option<Arc<Loose>>,
    /// Access-log records not sent yet (None: no access log).
    access_log: OnceLock<Arc<Mutex<Vec<u8>>>>,
    /// Counters not sent yet (see `WorkerFrame::Stats`).
    stats: Arc<[std::sync::atomic::AtomicU64; proto::STATS_WORDS]>,
    stats_task: OnceLock<()>,
    /// Streamed responses in flight (see `stream`).
    streams: stream::Streams,
    /// Connections this worker answered an upgrade on with 101, waiting
    /// for the dispatcher to hand them over (`LeaseMsg::Tunnel`).
    tunnels: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<(OwnedFd, Bytes)>>>,
    /// Tunnels open now (the worker does not idle out while any is).
    pub(crate) tunnels_open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Outbound {
    /// The response side of a worker: frames go into the control socket's
    /// write half `wr` (the writer task is returned; it ends after
    /// [`Outbound::end_ctl`]), leases arrive on `lease` if the dispatcher
    /// grants them, and `progress` is where they are traced.
    pub(crate) fn start(
        wr: OwnedWriteHalf,
        lease: Option<OwnedFd>,
        progress: Option<ProgressMap>,
    ) -> io::Result<(Arc<Outbound>, JoinHandle<io::Result<()>>)> {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let out = Arc::new(Outbound::new(tx, lease.is_some(), progress));
        // A request counts as answered once its response is in the socket.
        let loose = out.loose.clone();
        let writer = tokio::spawn(proto::write_batched(wr, rx, move |b| {
            if let Some(l) = &loose {
                l.written(b)
            }
        }));
        if let Some(fd) = lease {
            out.spawn_lease_reader(fd)?;
        }
        Ok((out, writer))
    }

    fn new(ctl: mpsc::UnboundedSender<Bytes>, leases: bool, progress: Option<ProgressMap>) -> Self {
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
            streams: Default::default(),
            lease_order: Mutex::new(()),
            tunnels: Mutex::new(HashMap::new()),
            tunnels_open: Default::default(),
        }
    }

    /// Whether connections can be handed to this worker (they come on the
    /// lease socket).
    pub(crate) fn can_tunnel(&self) -> bool {
        self.leases
    }

    /// Waits for `conn` to be handed over (after the 101 is sent).
    pub(crate) fn expect_tunnel(&self, conn: u64) -> tokio::sync::oneshot::Receiver<(OwnedFd, Bytes)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tunnels.lock().unwrap().insert(conn, tx);
        rx
    }

    /// The dispatcher handed `conn` over, with the client's early bytes.
    fn tunnel_arrived(&self, conn: u64, fd: Option<OwnedFd>, early: Bytes) {
        let waiting = self.tunnels.lock().unwrap().remove(&conn);
        match (waiting, fd) {
            (Some(tx), Some(fd)) => {
                let _ = tx.send((fd, early));
            }
            (None, _) => tracing::warn!(conn, "a connection handed over that no upgrade waits for; closed"),
            (Some(_), None) => tracing::warn!(conn, "an upgraded connection came without its socket"),
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
            Some(LeaseState::Leased(l)) => {
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
    pub(crate) fn respond(self: &Arc<Self>, conn: u64, seq: u32, bytes: Wire, close: bool, from_kernel: bool) -> bool {
        let mut map = self.conns.lock().unwrap();
        if from_kernel && matches!(map.get(&conn), Some(LeaseState::Asked { .. })) {
            // The dispatcher sends a grant before the client can have sent
            // this request, but the ring may have woken us first.
            drop(map);
            self.poll_leases();
            map = self.conns.lock().unwrap();
        }
        match map.get_mut(&conn) {
            Some(LeaseState::Leased(l)) => {
                if from_kernel && seq >= l.next {
                    l.queued.insert(seq, (bytes, close));
                    self.advance(&mut map, conn);
                    return true;
                }
                if seq >= l.next {
                    self.release(&mut map, conn);
                }
                self.relay(conn, seq, bytes, close, false)
            }
            Some(LeaseState::Asked { at, sent_after, .. }) => {
                if seq > *at {
                    *sent_after = true;
                }
                self.relay(conn, seq, bytes, close, false)
            }
            None => {
                let ask = self.leases && from_kernel && !close;
                if ask {
                    map.insert(conn, LeaseState::Asked { at: seq, sent_after: false });
                }
                self.relay(conn, seq, bytes, close, ask)
            }
        }
    }

    /// Answers a request the worker could not parse: 400, then close.
    pub(crate) fn reject(self: &Arc<Self>, conn: u64, seq: u32) {
        tracing::debug!(conn, seq, "malformed request");
        let r = Response::text(400, "malformed request\n").serialize(false, true);
        let _ = self.respond(conn, seq, r.into(), true, false);
    }

    /// The application read `len` more bytes of request `seq`'s body that
    /// the dispatcher forwarded (its upload window opens by that much).
    pub(crate) fn body_read(&self, conn: u64, seq: u32, len: u32) {
        let _ = self.ctl.send(relay::frame(WorkerFrame::BodyRead { conn, seq, len }, &[]));
    }

    /// Connection `conn` is gone (the dispatcher aborted it): nothing of
    /// it is owed any more.
    pub(crate) fn abandoned(&self, conn: u64) {
        if let Some(l) = &self.loose {
            l.take_out(conn);
        }
    }

    /// Gives every lease back (the worker is about to exit).
    pub(crate) fn release_all(&self) {
        let mut map = self.conns.lock().unwrap();
        let leased: Vec<u64> =
            map.iter().filter(|(_, e)| matches!(e, LeaseState::Leased(_))).map(|(c, _)| *c).collect();
        for c in leased {
            self.release(&mut map, c);
        }
        map.clear();
    }

    /// Sends what the reports hold, then queues the control writer's end
    /// marker (see `proto::write_batched`).
    pub(crate) fn end_ctl(&self) {
        self.flush_reports();
        let _ = self.ctl.send(Bytes::new());
    }
}
