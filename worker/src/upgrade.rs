//! HTTP/1.1 upgrades (RFC 9110 §7.8: WebSocket, h2c...) for services run
//! by [`crate::serve`]: the connection becomes a two-way byte stream
//! between the client and the service once it answers `101 Switching
//! Protocols`.
//!
//! The dispatcher holds a connection whose request asks to upgrade (it
//! parses nothing after it). A request it holds so carries an
//! [`OnUpgrade`] in its extensions; a service that answers it with 101
//! then gets the client's connection from [`OnUpgrade::upgraded`]: the
//! dispatcher writes the 101 and passes the socket to the worker (on its
//! lease socket) with what the client had already sent after the request,
//! and forgets the connection, so its time-outs no longer apply. Any other
//! answer lets the connection go on as HTTP.

use std::{
    io,
    os::fd::OwnedFd,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// In the extensions of a request that asks to upgrade the connection,
/// when the worker can take it over. Resolves after the service's 101.
#[derive(Clone)]
pub struct OnUpgrade {
    rx: Arc<std::sync::Mutex<Option<Pending>>>,
    splice: bool,
}

/// Where the upgraded connection (or why there is none) arrives.
type Pending = oneshot::Receiver<Result<Upgraded, UpgradeError>>;

/// Why there is no upgraded connection.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the answer was not 101 Switching Protocols")]
    NotUpgraded,
    #[error("the connection was not handed over (the client or the dispatcher went away)")]
    Lost,
    #[error("OnUpgrade::upgraded was already called for this request")]
    Taken,
    #[error("the handed-over socket: {0}")]
    Io(#[from] io::Error),
}

impl OnUpgrade {
    /// A pending upgrade and its other end (kept by `serve`).
    pub(crate) fn new(splice: bool) -> (OnUpgrade, oneshot::Sender<Result<Upgraded, UpgradeError>>) {
        let (tx, rx) = oneshot::channel();
        (OnUpgrade { rx: Arc::new(std::sync::Mutex::new(Some(rx))), splice }, tx)
    }

    /// Whether the dispatcher can join the client's socket with an app's
    /// TCP socket in the kernel: a service that talks to the app over TCP
    /// puts [`SpliceApp`] in its 101's extensions instead of calling
    /// [`OnUpgrade::upgraded`].
    pub(crate) fn can_splice(&self) -> bool {
        self.splice
    }

    /// The client's connection, once the 101 is written and it is this
    /// worker's. Call it from a task of its own: it resolves only after the
    /// service has returned its response.
    pub async fn upgraded(self) -> Result<Upgraded, UpgradeError> {
        let rx = self.rx.lock().unwrap().take().ok_or(UpgradeError::Taken)?;
        rx.await.map_err(|_| UpgradeError::NotUpgraded)?
    }
}

/// In a 101's extensions (to a request whose [`OnUpgrade`] can splice):
/// the app's socket and what the app sent after its 101 that was already
/// read, for the dispatcher to join with the client's socket.
#[derive(Clone)]
pub(crate) struct SpliceApp {
    pub fd: Arc<OwnedFd>,
    pub early: Bytes,
    /// The tunnel closes after this long with nothing either way.
    pub idle: Option<std::time::Duration>,
}

/// The client's connection after a 101: what it sent early, then the
/// socket itself.
pub struct Upgraded {
    early: Bytes,
    sock: tokio::net::TcpStream,
    _open: Open,
}

/// Counts an open tunnel while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upgraded {
    pub(crate) fn new(fd: OwnedFd, early: Bytes, open: Arc<AtomicUsize>) -> io::Result<Upgraded> {
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true)?;
        let sock = tokio::net::TcpStream::from_std(std)?;
        open.fetch_add(1, Ordering::Relaxed);
        Ok(Upgraded { early, sock, _open: Open(open) })
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.sock).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.sock).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sock).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sock).poll_shutdown(cx)
    }
}

/// Whether `headers` ask to upgrade (`Connection: upgrade` and an
/// `Upgrade` field).
pub fn requested(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
        && headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}
