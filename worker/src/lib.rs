//! The worker side of dispatcher: pull requests from your pool's queue,
//! answer them.
//!
//! A worker process inherits two handles from its parent (see
//! [`proto`]): the pool's BPF ring buffer, where the kernel queues the
//! requests it framed, and a control socket, where the dispatcher sends the
//! requests it framed itself and where responses go. No BPF privilege is
//! needed to consume a ring whose fd you were given.
//!
//! ```no_run
//! # async fn run() -> Result<(), worker::Error> {
//! let mut w = worker::Worker::from_env()?;
//! let responder = w.responder();
//! loop {
//!     let req = w.receive().await?;
//!     responder.respond(&req, worker::Response::text(200, "hello\n")).await?;
//! }
//! # }
//! ```

mod awake;
pub mod direct;
mod outbound;
pub mod progress;
pub mod proto;
pub mod reassembly;
pub mod request;
pub mod response;

use std::{
    collections::VecDeque,
    os::fd::{FromRawFd, OwnedFd},
};

use aya::maps::{Map, MapData, RingBuf};
use bytes::Bytes;
use dispatcher_ebpf::abi::{RecordHeader, RECORD_HEADER_LEN};
use dispatcher_ebpf::launch::env;
use dispatcher_ebpf::wire::RecordKind;
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt},
    net::UnixStream,
    sync::mpsc,
};

use outbound::Outbound;
use proto::{BATCH_BYTES, MAX_FRAME};
use reassembly::{Done, Raw, Reassembly};
pub use request::Request;
pub use response::Response;

/// What can go wrong for a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("environment variable {var}: {why}")]
    Env { var: &'static str, why: String },
    #[error("ring buffer fd {fd}: {source}")]
    Ring { fd: i32, source: aya::maps::MapError },
    #[error("control socket: {0}")]
    Control(#[source] std::io::Error),
    #[error("the dispatcher closed the control socket")]
    Closed,
    #[error("request {conn}/{seq}: malformed head")]
    BadHead { conn: u64, seq: u32 },
    /// No request for the pool's idle time-out: the worker should finish
    /// what it is doing, call [`Worker::finish`] and exit with status 0 (the
    /// next request starts a new worker).
    #[error("no request for the idle time-out")]
    Idle,
    /// The worker stopped pulling (its request count for recycling was
    /// reached, or [`Worker::stop_pulling`] was called) and has handed out
    /// every request it took from its queue: finish the handlers in
    /// flight, call [`Worker::finish`], exit with status 0. What is still
    /// queued is served by the next worker.
    #[error("recycled: no more requests for this worker")]
    Recycle,
}

/// The handles a worker is started with (the launch contract's type: what
/// the process manager passes is what the worker takes).
pub use dispatcher_ebpf::launch::Handles;

/// A worker's connection to its pool.
pub struct Worker {
    pool: String,
    ring: Option<AsyncFd<RingBuf<MapData>>>,
    /// The ring's awake flag, if the dispatcher passed one.
    awake: Option<awake::Awake>,
    /// `receive` found the ring empty and yielded once already.
    yielded: bool,
    /// `receive` gives [`Error::Idle`] after this long without a request.
    idle: Option<std::time::Duration>,
    /// Requests handed out so far, and the count that recycles the worker.
    served: u64,
    recycle_after: Option<u64>,
    /// No new requests from the queue; finish the ones taken.
    draining: bool,
    /// The control socket's writer (flushed by [`Worker::finish`]).
    writer: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    frames: mpsc::Receiver<(RecordHeader, Vec<u8>)>,
    reassembly: Reassembly,
    ready: VecDeque<Raw>,
    responder: Responder,
}

/// Sends responses; cloneable, so requests can be handled concurrently.
#[derive(Clone)]
pub struct Responder {
    out: std::sync::Arc<Outbound>,
}

fn env_fd(var: &'static str) -> Result<Option<OwnedFd>, Error> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(v) => {
            let fd: i32 =
                v.parse().map_err(|_| Error::Env { var, why: format!("`{v}` is not a file descriptor number") })?;
            // SAFETY: fcntl F_GETFD only checks that the fd is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(Error::Env { var, why: format!("fd {fd} is not open") });
            }
            // SAFETY: the parent handed us this fd to own.
            Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
        }
    }
}

/// Raises the soft open-files limit to the hard one.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

impl Worker {
    /// The handles the dispatcher's process manager passes.
    pub fn from_env() -> Result<Worker, Error> {
        // Every leased connection is a descriptor here.
        raise_fd_limit();
        let ctl = env_fd(env::CTL_FD)?
            .ok_or(Error::Env { var: env::CTL_FD, why: "not set (is this started by the dispatcher?)".into() })?;
        let ring = env_fd(env::RING_FD)?;
        let lease = env_fd(env::LEASE_FD)?;
        let awake = env_fd(env::AWAKE_FD)?;
        let progress = env_fd(env::PROGRESS_FD)?;
        let pool = std::env::var(env::POOL).unwrap_or_else(|_| "default".into());
        let idle = match std::env::var(env::IDLE_TIMEOUT_SECS) {
            Err(_) => None,
            Ok(v) => Some(std::time::Duration::from_secs(v.parse().map_err(|_| Error::Env {
                var: env::IDLE_TIMEOUT_SECS,
                why: format!("`{v}` is not a number of seconds"),
            })?)),
        };
        let recycle_after = match std::env::var(env::RECYCLE_REQUESTS) {
            Err(_) => None,
            Ok(v) => Some(v.parse::<u64>().map_err(|_| Error::Env {
                var: env::RECYCLE_REQUESTS,
                why: format!("`{v}` is not a request count"),
            })?),
        };
        let mut w = Worker::from_fds(Handles { ring, ctl, lease, awake, progress }, pool)?;
        if std::env::var_os(env::ACCESS_LOG).is_some_and(|v| v == "1") {
            w.responder.out.enable_access_log();
        }
        w.idle = idle.filter(|d| !d.is_zero());
        w.recycle_after = recycle_after.filter(|n| *n > 0);
        Ok(w)
    }

    /// A worker over explicit handles. Must be called inside a tokio
    /// runtime.
    pub fn from_fds(h: Handles, pool: String) -> Result<Worker, Error> {
        let Handles { ring, ctl, lease, awake, progress } = h;
        let progress = match progress {
            Some(fd) => Some(
                progress::ProgressMap::map(fd)
                    .map_err(|e| Error::Env { var: env::PROGRESS_FD, why: format!("cannot map it: {e}") })?,
            ),
            None => None,
        };
        let awake = match awake {
            Some(fd) => Some(
                awake::Awake::map(fd)
                    .map_err(|e| Error::Env { var: env::AWAKE_FD, why: format!("cannot map the flag: {e}") })?,
            ),
            None => None,
        };
        if let Some(a) = &awake {
            // Pulling from now on: this is also how activation sees that
            // the worker started.
            a.set_awake();
        }
        let ring = match ring {
            Some(fd) => {
                use std::os::fd::AsRawFd;
                let raw = fd.as_raw_fd();
                let data = MapData::from_fd(fd).map_err(|source| Error::Ring { fd: raw, source })?;
                let rb = RingBuf::try_from(Map::RingBuf(data)).map_err(|source| Error::Ring { fd: raw, source })?;
                // SAFETY: the RingBuf owns the fd for as long as the AsyncFd lives.
                Some(unsafe { AsyncFd::register(rb) }.map_err(|e| Error::Control(e.into()))?)
            }
            None => None,
        };
        let std = std::os::unix::net::UnixStream::from(ctl);
        std.set_nonblocking(true).map_err(Error::Control)?;
        let (rd, wr) = UnixStream::from_std(std).map_err(Error::Control)?.into_split();
        let mut rd = tokio::io::BufReader::with_capacity(BATCH_BYTES, rd);
        let (ftx, frames) = mpsc::channel(1024);
        // A reader task makes the control socket a cancel-safe stream.
        tokio::spawn(async move {
            let mut h = [0u8; RECORD_HEADER_LEN];
            loop {
                if rd.read_exact(&mut h).await.is_err() {
                    return;
                }
                let hdr = RecordHeader::from_bytes(&h).expect("header length");
                if hdr.len as usize > MAX_FRAME {
                    tracing::error!(len = hdr.len, "oversized record on the control socket");
                    return;
                }
                let mut data = vec![0u8; hdr.len as usize];
                if rd.read_exact(&mut data).await.is_err() || ftx.send((hdr, data)).await.is_err() {
                    return;
                }
            }
        });
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let out = std::sync::Arc::new(Outbound::new(tx, lease.is_some(), progress));
        // A request counts as answered once its response is in the socket.
        let loose = out.loose.clone();
        let writer = tokio::spawn(proto::write_batched(wr, rx, move |b| {
            if let Some(l) = &loose {
                l.written(b)
            }
        }));
        if let Some(fd) = lease {
            out.spawn_lease_reader(fd).map_err(Error::Control)?;
        }
        Ok(Worker {
            pool,
            ring,
            awake,
            yielded: false,
            idle: None,
            served: 0,
            recycle_after: None,
            draining: false,
            writer: Some(writer),
            frames,
            reassembly: Reassembly::default(),
            ready: VecDeque::new(),
            responder: Responder { out },
        })
    }

    /// Stops taking requests from the queue (a graceful stop, e.g. on
    /// SIGTERM): `receive` hands out what was taken, then gives
    /// [`Error::Recycle`].
    pub fn stop_pulling(&mut self) {
        self.draining = true;
    }

    /// Ends the worker's part: gives back every connection it writes to
    /// (so the dispatcher answers their next requests) and waits until
    /// everything sent to the dispatcher is written. Call it before exiting.
    pub async fn finish(mut self) {
        self.responder.out.release_all();
        self.responder.out.end_ctl();
        if let Some(w) = self.writer.take() {
            let _ = w.await;
        }
    }

    /// The pool this worker serves.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// A handle to answer requests with.
    pub fn responder(&self) -> Responder {
        self.responder.clone()
    }

    /// The next complete request, from the ring or the control socket.
    /// Malformed requests are answered (400) here and never returned.
    pub async fn receive(&mut self) -> Result<Request, Error> {
        loop {
            while let Some(raw) = self.ready.pop_front() {
                let (conn, seq) = (raw.conn, raw.seq);
                match Request::parse(raw) {
                    Ok(r) => {
                        self.served += 1;
                        if self.recycle_after.is_some_and(|n| self.served >= n) {
                            self.draining = true;
                        }
                        return Ok(r);
                    }
                    Err(_) => self.responder.reject(conn, seq),
                }
            }
            if self.draining && self.reassembly.pending() == 0 {
                // Slow-path requests already sent to us are ours too.
                if let Ok((hdr, data)) = self.frames.try_recv() {
                    self.push(&hdr, &data);
                    continue;
                }
                self.stopped();
                return Err(Error::Recycle);
            }
            if self.drain_ring() {
                continue;
            }
            if self.awake.is_some() && !std::mem::replace(&mut self.yielded, true) {
                // Let the handlers of what was just received run (and
                // answer) before going to sleep; requests that arrive
                // meanwhile are queued without waking us.
                tokio::task::yield_now().await;
                continue;
            }
            self.yielded = false;
            if let Some(a) = &self.awake {
                // Records queued from here on wake us; one that was queued
                // without a wake-up before this point is seen here.
                a.set_asleep();
                if self.drain_ring() {
                    if let Some(a) = &self.awake {
                        a.set_awake();
                    }
                    continue;
                }
            }
            let has_ring = self.ring.is_some();
            let ring = self.ring.as_mut();
            let idle = self.idle;
            tokio::select! {
                _ = async { tokio::time::sleep(idle.unwrap_or_default()).await }, if idle.is_some() => {
                    if self.ready.is_empty() && !self.drain_ring() {
                        self.stopped();
                        return Err(Error::Idle);
                    }
                }
                g = async { ring.unwrap().readable_mut().await }, if has_ring => {
                    let mut g = g.map_err(Error::Control)?;
                    g.clear_ready();
                }
                f = self.frames.recv() => {
                    let Some((hdr, data)) = f else { return Err(Error::Closed) };
                    self.push(&hdr, &data);
                }
            }
            if let Some(a) = &self.awake {
                a.set_awake();
            }
        }
    }

    /// Done with the ring for good (recycled, stopped or idle): later
    /// calls never look at it again, and the slot says so, so the next
    /// worker may start while this one answers what it took.
    fn stopped(&mut self) {
        self.draining = true;
        if let Some(a) = &self.awake {
            a.set_stopped();
        }
        self.responder.out.send_stopped();
    }

    fn push(&mut self, hdr: &RecordHeader, data: &[u8]) {
        deliver(&mut self.reassembly, &mut self.ready, &self.responder, hdr, data);
    }

    /// Takes every record the ring holds; true if there were any. Records
    /// are reassembled straight from ring memory (one copy).
    fn drain_ring(&mut self) -> bool {
        let Worker { ring, reassembly, ready, responder, draining, .. } = self;
        let Some(ring) = ring.as_mut() else { return false };
        let rb = ring.get_mut();
        let mut any = false;
        while let Some(item) = rb.next() {
            any = true;
            if let Some(hdr) = RecordHeader::from_bytes(&item) {
                let end = (RECORD_HEADER_LEN + hdr.len as usize).min(item.len());
                deliver(reassembly, ready, responder, &hdr, &item[RECORD_HEADER_LEN..end]);
            }
            drop(item);
            if *draining && reassembly.pending() == 0 {
                // Every request taken is whole: the rest is the next
                // worker's.
                break;
            }
        }
        any
    }
}

fn deliver(
    reassembly: &mut Reassembly,
    ready: &mut VecDeque<Raw>,
    responder: &Responder,
    hdr: &RecordHeader,
    data: &[u8],
) {
    let kind = hdr.record_kind();
    if kind == Ok(RecordKind::Abort) {
        // The connection is gone: nothing of it is owed any more.
        if let Some(l) = &responder.out.loose {
            l.take_out(hdr.conn);
        }
    } else if kind == Ok(RecordKind::Head)
        && hdr.flags & dispatcher_ebpf::abi::REC_SLOW == 0
        && !reassembly.is_aborted(hdr.conn)
    {
        // Ours from its head on (the rest of its body follows on this
        // ring, which the next worker would not know what to do with):
        // traced, so a crash answers it 502.
        responder.out.taken(hdr.conn, hdr.seq);
    }
    match reassembly.push(hdr, data) {
        Some(Done::Request(raw)) => ready.push_back(raw),
        Some(Done::Invalid { conn, seq }) => responder.reject(conn, seq),
        None => {}
    }
}

impl Responder {
    /// Sends `resp` as the answer to `req`: written straight to the client
    /// when this worker holds the connection's lease, through the
    /// dispatcher otherwise.
    pub async fn respond(&self, req: &Request, resp: Response) -> Result<(), Error> {
        let close = req.close || resp.close;
        let body = if req.method == "HEAD" { 0 } else { resp.body.len() };
        let bytes = resp.serialize(req.method == "HEAD", close);
        self.out.count(resp.status, req.received.elapsed());
        self.out.log(req, resp.status, body);
        if self.out.respond(req.conn, req.seq, bytes, close, req.from_kernel) {
            Ok(())
        } else {
            Err(Error::Closed)
        }
    }

    /// Answers a request the worker could not parse: 400, then close.
    fn reject(&self, conn: u64, seq: u32) {
        tracing::debug!(conn, seq, "malformed request");
        let r = Response::text(400, "malformed request\n").serialize(false, true);
        let _ = self.out.respond(conn, seq, r, true, false);
    }
}
