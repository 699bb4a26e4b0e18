//! Spliced tunnels: after a `101 Switching Protocols` from a proxy pool's
//! app, the client's socket and the app's are joined in the kernel (the
//! stream verdicts redirect each one's segments into the other; see
//! `programs/tunnel.rs`), and a task here only watches them.
//!
//! The task moves bytes itself only when the kernel passes them up: those
//! the client or the app had sent before the sockets were joined, and
//! those past a tunnel's in-flight limit. It forwards them once every
//! byte the kernel redirected that way has reached the other socket's
//! send queue (counted with `TCP_INFO`), then tells the kernel how far it
//! got, so the order of the bytes holds whoever moved them. It also
//! carries each side's end of stream to the other (a redirect carries no
//! FIN), and closes the tunnel when both have ended, when either breaks,
//! or after the idle time-out.
//!
//! Sockets here are never polled for input (the kernel would wake the
//! task for every redirected segment): an epoll set watches for the peer
//! closing (`EPOLLRDHUP`), the verdict reports passed bytes on `events`,
//! and each direction looks at its drain every millisecond while bytes
//! flow (to move the in-flight limit on), every second when they do not.

use std::{
    collections::HashMap,
    io::{self, Write},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use dispatcher_ebpf::abi::TunnelCtl;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::Notify,
};

use crate::bpf::{ConnTable, TunnelTable};

/// Most bytes of one direction the kernel may have redirected and not yet
/// put into the other socket's send queue (its backlog is not bounded
/// otherwise). Four BDPs of loopback at 10 Gbit/s and 100 µs.
const IN_FLIGHT: u64 = 4 << 20;
/// How long passed bytes wait for the kernel's redirected ones to drain
/// into the other socket before the tunnel is given up.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Looks at a busy direction's drain this often, and at an idle one's
/// at least this often.
const LOOK_MIN: Duration = Duration::from_millis(1);
const LOOK_MAX: Duration = Duration::from_secs(1);
/// The in-flight limit moves in steps of at least this (a map update).
const LIMIT_STEP: u64 = 256 << 10;

/// Starts and tracks spliced tunnels.
pub struct Splicer {
    table: TunnelTable,
    conn_state: Arc<ConnTable>,
    /// Socket cookie (either side) → its tunnel's task.
    tasks: Mutex<HashMap<u64, Arc<Notify>>>,
    /// Tunnels open, and spliced since the start.
    pub open: AtomicU64,
    pub total: AtomicU64,
}

impl Splicer {
    pub fn new(table: TunnelTable, conn_state: Arc<ConnTable>) -> Splicer {
        Splicer { table, conn_state, tasks: Mutex::default(), open: AtomicU64::new(0), total: AtomicU64::new(0) }
    }

    /// The kernel passed bytes up on socket `cookie`.
    pub fn wake(&self, cookie: u64) {
        if let Some(n) = self.tasks.lock().unwrap().get(&cookie) {
            n.notify_one();
        }
    }

    /// Joins connection `cookie` (its socket `client`, of which user space
    /// has read `client_read` bytes since the kernel handed it over) with
    /// the app's socket `app`, after writing `to_app` (what the client
    /// sent after its upgrade request) to the app. The 101 and what the
    /// app sent after it are in the client's socket already. With nothing
    /// either way for `idle` (the pool's `--tunnel-idle-timeout`), it closes.
    pub fn start(
        self: &Arc<Self>,
        cookie: u64,
        client: std::net::TcpStream,
        app: OwnedFd,
        to_app: Bytes,
        client_read: u64,
        idle: Option<Duration>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            me.open.fetch_add(1, Ordering::Relaxed);
            me.total.fetch_add(1, Ordering::Relaxed);
            let app = std::net::TcpStream::from(app);
            let app_cookie = socket_cookie(&app).unwrap_or(0);
            match me.run(cookie, client, app_cookie, app, to_app, client_read, idle).await {
                Ok(()) => tracing::debug!(conn = cookie, "spliced tunnel closed"),
                Err(e) => tracing::info!(conn = cookie, "spliced tunnel closed: {e}"),
            }
            {
                let mut t = me.tasks.lock().unwrap();
                t.remove(&cookie);
                t.remove(&app_cookie);
            }
            me.table.unsteer(cookie);
            me.table.remove_app(app_cookie);
            me.conn_state.forget(cookie);
            me.open.fetch_sub(1, Ordering::Relaxed);
        });
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        cookie: u64,
        client: std::net::TcpStream,
        app_cookie: u64,
        app: std::net::TcpStream,
        to_app: Bytes,
        client_read: u64,
        idle: Option<Duration>,
    ) -> io::Result<()> {
        if app_cookie == 0 {
            return Err(io::Error::other("the app's socket has no cookie (not a TCP socket?)"));
        }
        client.set_nonblocking(true)?;
        app.set_nonblocking(true)?;
        // Written into only: registered for EPOLLOUT alone, so the data
        // the kernel redirects does not wake this task.
        // SAFETY: each AsyncFd owns its socket while registered.
        let client = unsafe { AsyncFd::register_with_interest(client, Interest::WRITABLE) }?;
        let app = unsafe { AsyncFd::register_with_interest(app, Interest::WRITABLE) }?;
        write_all(&app, &to_app).await?;
        // One epoll set per direction, for its source's end of stream.
        let client_hup = hup_watch(client.get_ref())?;
        let app_hup = hup_watch(app.get_ref())?;
        // A wake-up per source socket: the kernel passed bytes up on it.
        let (up_notify, down_notify) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        {
            let mut t = self.tasks.lock().unwrap();
            t.insert(cookie, up_notify.clone());
            t.insert(app_cookie, down_notify.clone());
        }
        let mut up = Way {
            src_cookie: cookie,
            peer_cookie: app_cookie,
            from_client: true,
            base: socket_written(app.get_ref())?,
            written: 0,
            taken: client_read,
            done: false,
            limit: IN_FLIGHT,
        };
        let mut down = Way {
            src_cookie: app_cookie,
            peer_cookie: cookie,
            from_client: false,
            base: socket_written(client.get_ref())?,
            written: 0,
            taken: 0,
            done: false,
            limit: IN_FLIGHT,
        };
        // The app's socket first: the client's segments are redirected
        // into it as soon as the client's are steered.
        let ctl = TunnelCtl { peer: cookie, taken: 0, limit: IN_FLIGHT };
        self.table.add_app(app.get_ref().as_fd(), app_cookie, ctl)?;
        self.table.steer(cookie, TunnelCtl { peer: app_cookie, taken: client_read, limit: IN_FLIGHT })?;
        // What the app sent before its socket was joined waits in its
        // receive queue for a segment to come: a change of SO_RCVLOWAT
        // makes TCP run the verdict over it now (tcp_set_rcvlowat →
        // tcp_data_ready).
        let one: libc::c_int = 1;
        // SAFETY: setsockopt of an int.
        if unsafe {
            libc::setsockopt(
                app.get_ref().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        tracing::debug!(conn = cookie, app = app_cookie, "tunnel spliced in the kernel");
        // The two directions go on independently: one waiting for its
        // destination to drain must not hold the other up. (In one loop,
        // an echo app blocked writing into a full receive queue that only
        // the other direction empties stopped taking input, and the tunnel
        // stalled at the in-flight limit.)
        let both = async {
            tokio::try_join!(
                self.way(&mut up, &client, &app, &client_hup, &up_notify),
                self.way(&mut down, &app, &client, &app_hup, &down_notify),
            )
        };
        // Idle: nothing written into either socket (by the kernel's
        // redirects or by this task) for `idle`.
        let idle_out = async {
            let Some(idle) = idle else { return std::future::pending().await };
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut moved = (0u64, Instant::now());
            loop {
                tick.tick().await;
                let now = socket_written(client.get_ref())? + socket_written(app.get_ref())?;
                if now != moved.0 {
                    moved = (now, Instant::now());
                } else if moved.1.elapsed() >= idle {
                    return io::Result::Ok(());
                }
            }
        };
        let r = tokio::select! {
            r = both => r.map(|_| ()),
            r = idle_out => {
                if r.is_ok() {
                    tracing::info!(conn = cookie, spliced = true, "a tunnel idle for {:?} closed", idle.unwrap_or_default());
                }
                r
            }
        };
        if r.is_err() {
            // One side broke: reset both. Closed gently, a socket whose
            // unread bytes sat in the kernel's redirect queues sent a FIN
            // and stayed, orphaned, with an echo app blocked writing into
            // it and nobody reading either (found by killing a client in
            // the middle of a bulk echo).
            abort(client.get_ref());
            abort(app.get_ref());
        }
        r
    }

    /// One direction, `src` to `dst`, until its end of stream has been
    /// passed on: forwards what the kernel passes up, woken by `notify`
    /// (the verdict's event), by `src`'s peer closing (`hup`), or by a
    /// look at how far the redirected bytes drained, to move the in-flight
    /// limit on before the kernel reaches it: every millisecond while
    /// bytes flow, backing off to a second when they do not. (A sender
    /// that outruns its reader meets the limit all the same: see
    /// docs/design.md, "Spliced tunnels", on what that costs.)
    async fn way(
        &self,
        way: &mut Way,
        src: &AsyncFd<std::net::TcpStream>,
        dst: &AsyncFd<std::net::TcpStream>,
        hup: &AsyncFd<OwnedFd>,
        notify: &Notify,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        let (mut look, mut seen) = (LOOK_MIN, u64::MAX);
        loop {
            self.forward(way, src, dst, &mut buf).await?;
            if way.done {
                return Ok(());
            }
            let redirected = self.redirected(way);
            if redirected != seen {
                seen = redirected;
                look = LOOK_MIN;
                self.move_limit(way, dst)?;
            } else {
                look = (look * 2).min(LOOK_MAX);
            }
            tokio::select! {
                g = hup.readable() => {
                    let mut g = g?;
                    let set = std::mem::ManuallyDrop::new(Epoll(unsafe {
                        // SAFETY: ManuallyDrop: the fd stays the AsyncFd's.
                        std::os::fd::FromRawFd::from_raw_fd(hup.get_ref().as_raw_fd())
                    }));
                    let mut ev = [EpollEvent::empty(); 1];
                    if set.wait(&mut ev, EpollTimeout::ZERO).map_err(io::Error::from)? == 0 {
                        g.clear_ready();
                    }
                }
                _ = notify.notified() => {}
                _ = tokio::time::sleep(look) => {}
            }
        }
    }

    /// Lets the kernel redirect up to IN_FLIGHT bytes past those of `way`
    /// already in `dst`'s send queue.
    fn move_limit(&self, way: &mut Way, dst: &AsyncFd<std::net::TcpStream>) -> io::Result<()> {
        let drained = socket_written(dst.get_ref())?.saturating_sub(way.base + way.written);
        let limit = drained + IN_FLIGHT;
        if limit >= way.limit + LIMIT_STEP {
            self.table.steer(way.src_cookie, TunnelCtl { peer: way.peer_cookie, taken: way.taken, limit })?;
            way.limit = limit;
        }
        Ok(())
    }

    /// Bytes the kernel redirected from `way`'s source so far.
    fn redirected(&self, way: &Way) -> u64 {
        if way.from_client {
            self.conn_state.get(way.src_cookie).map_or(0, |st| st.tun_redirected)
        } else {
            self.table.seen(way.src_cookie).map_or(0, |s| s.redirected)
        }
    }

    /// Forwards what the kernel passed up on `way`'s source (`src`) to
    /// `dst`, and its end of stream.
    async fn forward(
        &self,
        way: &mut Way,
        src: &AsyncFd<std::net::TcpStream>,
        dst: &AsyncFd<std::net::TcpStream>,
        buf: &mut [u8],
    ) -> io::Result<()> {
        while !way.done {
            // SAFETY: recv(2) into our buffer.
            let n = unsafe {
                libc::recv(src.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::WouldBlock { Ok(()) } else { Err(e) };
            }
            self.drained(way, dst).await?;
            if n == 0 {
                // A redirect carries no FIN: pass the end of stream on.
                let _ = nix::sys::socket::shutdown(dst.get_ref().as_raw_fd(), nix::sys::socket::Shutdown::Write);
                way.done = true;
                return Ok(());
            }
            let n = n as usize;
            write_all(dst, &buf[..n]).await?;
            way.written += n as u64;
            way.taken += n as u64;
            // Redirects go on from here, with room for IN_FLIGHT more.
            let limit = self.redirected(way) + IN_FLIGHT;
            self.table.steer(way.src_cookie, TunnelCtl { peer: way.peer_cookie, taken: way.taken, limit })?;
            way.limit = limit;
        }
        Ok(())
    }

    /// Waits until every byte the kernel redirected along `way` is in
    /// `dst`'s send queue (so what this task writes next comes after it).
    async fn drained(&self, way: &Way, dst: &AsyncFd<std::net::TcpStream>) -> io::Result<()> {
        let since = Instant::now();
        loop {
            let want = way.base + way.written + self.redirected(way);
            if socket_written(dst.get_ref())? >= want {
                return Ok(());
            }
            if since.elapsed() > DRAIN_LIMIT {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the other side took nothing for 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// One direction of a tunnel.
struct Way {
    /// The socket bytes come from, and the one they go to.
    src_cookie: u64,
    peer_cookie: u64,
    /// From the client's socket (its counters are in `ConnState`).
    from_client: bool,
    /// Bytes in the destination's send queue before the splice.
    base: u64,
    /// Bytes this task wrote into the destination since.
    written: u64,
    /// Bytes user space has read from the source and forwarded, counted
    /// from where the kernel counts its passed bytes.
    taken: u64,
    /// The source ended (its FIN passed on).
    done: bool,
    /// The in-flight limit last given to the kernel.
    limit: u64,
}

/// Makes closing `s` reset the connection (SO_LINGER on, time 0).
fn abort(s: &std::net::TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt of a struct linger; a failure leaves a gentle close.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// An epoll set that is readable once `s`'s peer has closed
/// (`EPOLLRDHUP`, edge-triggered: never for data).
fn hup_watch(s: &std::net::TcpStream) -> io::Result<AsyncFd<OwnedFd>> {
    let set = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
    set.add(s, EpollEvent::new(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET, 0)).map_err(io::Error::from)?;
    // SAFETY: the AsyncFd owns the set while it is registered.
    Ok(unsafe { AsyncFd::register_with_interest(set.0, Interest::READABLE) }?)
}

async fn write_all(s: &AsyncFd<std::net::TcpStream>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = s.async_io(Interest::WRITABLE, |s| (&*s).write(data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// Bytes written into a TCP socket by anyone since it opened (see
/// `tcp::socket_written`).
fn socket_written(s: &std::net::TcpStream) -> io::Result<u64> {
    crate::tcp::socket_written(s.as_raw_fd())
}

fn socket_cookie(s: &impl AsRawFd) -> io::Result<u64> {
    crate::tcp::socket_cookie(s.as_raw_fd())
}
