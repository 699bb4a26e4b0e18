//! The worker side of dispatcher: pull requests from your pool's queue,
//! answer them.
//!
//! A worker process inherits two handles from its parent (the launch
//! contract, `dispatcher_ebpf::launch`): the pool's BPF ring buffer, where
//! the kernel queues the requests it framed, and a control socket, where
//! the dispatcher sends the requests it framed itself and where responses
//! go (the protocol: [`proto`]). No BPF privilege is needed to consume a
//! ring whose fd you were given.
//!
//! This file is the public API ([`Worker`], [`Responder`], [`Request`],
//! [`Response`], [`Error`]); `pull` is where requests are taken (ring,
//! awake flag, control socket, reassembly) and `answer` where they are
//! answered (the lease machine, writes into a leased client's socket, the
//! relay through the dispatcher, reports).
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

mod answer;
pub mod app;
mod body;
pub mod date;
mod encode;
pub mod fastcgi;
pub mod files;
pub mod progress;
pub mod proto;
pub mod proxy;
mod pull;
pub mod request;
pub mod response;
mod service;
pub mod standalone;
pub mod upgrade;

use std::os::fd::{FromRawFd, OwnedFd};

use dispatcher_ebpf::launch::env;
use tokio::net::UnixStream;

use answer::Outbound;
pub use body::{Body, BodyError};
use pull::Puller;
pub use request::Request;
pub use response::{FileBody, Response};
pub use service::{serve, serve_worker, BoxError, ClientAddr, RequestId};

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
    /// Where its requests come from.
    pub(crate) pull: Puller,
    /// The control socket's writer (flushed by [`Worker::finish`]).
    writer: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub(crate) responder: Responder,
}

/// Sends responses; cloneable, so requests can be handled concurrently.
#[derive(Clone)]
pub struct Responder {
    pub(crate) out: std::sync::Arc<Outbound>,
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
        w.pull.idle = idle.filter(|d| !d.is_zero());
        w.pull.recycle_after = recycle_after.filter(|n| *n > 0);
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
                pull::Awake::map(fd)
                    .map_err(|e| Error::Env { var: env::AWAKE_FD, why: format!("cannot map the flag: {e}") })?,
            ),
            None => None,
        };
        if let Some(a) = &awake {
            // Pulling from now on: this is also how activation sees that
            // the worker started.
            a.set_awake();
        }
        let ring = ring.map(pull::Ring::open).transpose()?;
        let std = std::os::unix::net::UnixStream::from(ctl);
        std.set_nonblocking(true).map_err(Error::Control)?;
        let (rd, wr) = UnixStream::from_std(std).map_err(Error::Control)?.into_split();
        let (out, writer) = Outbound::start(wr, lease, progress).map_err(Error::Control)?;
        let frames = pull::spawn_reader(rd, out.clone());
        Ok(Worker {
            pool,
            pull: Puller::new(ring, awake, frames, out.clone()),
            writer: Some(writer),
            responder: Responder { out },
        })
    }

    /// Stops taking requests from the queue (a graceful stop, e.g. on
    /// SIGTERM): `receive` hands out what was taken, then gives
    /// [`Error::Recycle`].
    pub fn stop_pulling(&mut self) {
        self.pull.stop_pulling();
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
            let raw = self.pull.next().await?.raw;
            let (conn, seq) = (raw.conn, raw.seq);
            match Request::parse(raw) {
                Ok(r) => {
                    self.pull.handed_out();
                    return Ok(r);
                }
                Err(_) => self.responder.out.reject(conn, seq),
            }
        }
    }
}

impl Responder {
    /// Sends `resp` as the answer to `req`: written straight to the client
    /// when this worker holds the connection's lease, through the
    /// dispatcher otherwise.
    pub async fn respond(&self, req: &Request, resp: Response) -> Result<(), Error> {
        let close = req.close || resp.close;
        let head_only = req.method == "HEAD";
        let body = if head_only { 0 } else { resp.body_len() as usize };
        self.out.count(resp.status, req.received.elapsed());
        self.out.log(req, resp.status, body);
        // A file body stays in its file: `sendfile` on a leased socket,
        // read part by part through the dispatcher otherwise.
        let bytes = answer::Wire::of_response(&resp, head_only, close);
        if self.out.respond(req.conn, req.seq, bytes, close, req.from_kernel) {
            Ok(())
        } else {
            Err(Error::Closed)
        }
    }
}
