//! `proxy` pools: the pool's application is any HTTP/1.1 server (gunicorn,
//! uvicorn, `node server.js`, a Go binary), unchanged. The worker starts it
//! as its child, with a loopback listening socket it inherits the systemd
//! way (fd 3, `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`), with a free
//! loopback port in `PORT` (and `$PORT` in its arguments replaced by it),
//! or with a Unix socket path in `SOCKET` (and for `$SOCKET`),
//! waits until it accepts connections, then serves the pool with
//! [`crate::serve`], forwarding each request over a pool of keep-alive
//! connections (hyper's HTTP/1 client connections, pooled here) and
//! streaming bodies both ways.
//!
//! The app's process is started and stopped by [`crate::app`]. What a
//! dead app had taken is answered 502 by the dispatcher (the worker's
//! trace of taken requests); what is still queued waits for the restart.

use std::{
    collections::VecDeque,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::app::{Addr, Listen};
pub use crate::app::{AppError, Socket};
use crate::{BoxError, ClientAddr};

/// The app a proxy pool runs.
#[derive(Clone, Debug)]
pub struct App {
    /// Its program and arguments (`$PORT` and `$SOCKET` in them are
    /// replaced).
    pub command: Vec<String>,
    pub socket: Socket,
    /// How long it may take to accept its first connection.
    pub start_timeout: Duration,
    /// Connections to it at most (so requests in flight at most).
    pub max_connections: usize,
    /// An upgraded connection (WebSocket) with nothing either way this
    /// long is closed; `None`: never.
    pub tunnel_idle: Option<Duration>,
}

/// Starts `app`, waits for it to listen, serves the pool through it until
/// the worker is done (idle, recycled, SIGTERM) or the app exits.
pub async fn run(app: App) -> Result<(), AppError> {
    let running = crate::app::start(&app.command, Listen::choose(app.socket)?, app.start_timeout).await?;
    let pool = Arc::new(AppPool::new(running.addr.clone(), app.max_connections));
    let forward = Forward { pool, tunnel_idle: app.tunnel_idle };
    crate::app::serve_while(running, crate::serve(forward)).await
}

/// The response body a proxy pool sends: the app's, or its own error.
type ProxyBody = BoxBody<Bytes, BoxError>;

/// Keep-alive connections to the app. A connection is opened only for a
/// request about to be sent on it, never ahead: hyper's pooled client
/// opens one while it waits for an idle one and parks it unused, and a
/// threaded app (gunicorn's gthread) then has a thread blocked reading
/// it; at 256 clients that stalled the pool (131 req/s against 6,000 at
/// 128). At most `max` at once; a request waits for one beyond that.
///
/// Idle connections are taken oldest first, so every one of them carries
/// requests in turn. Newest first (a stack) sent all of a 16-client load
/// to the 16 connections last used, and once a 256-client load had
/// opened 64, those were all one gunicorn process's: its GIL then held
/// the pool to half its throughput (2,500 req/s against 4,600 behind
/// nginx), the other process idle.
struct AppPool {
    addr: Addr,
    idle: Mutex<VecDeque<SendRequest<crate::Body>>>,
    permits: Arc<Semaphore>,
}

impl AppPool {
    fn new(addr: Addr, max: usize) -> AppPool {
        AppPool { addr, idle: Mutex::new(VecDeque::new()), permits: Arc::new(Semaphore::new(max.max(1))) }
    }

    /// Sends `req` on an idle connection or a new one; the response's body
    /// gives the connection back once read to its end.
    async fn send(self: &Arc<Self>, req: Request<crate::Body>) -> Result<Response<PooledBody>, BoxError> {
        let permit = self.permits.clone().acquire_owned().await?;
        let mut conn = loop {
            let next = self.idle.lock().unwrap().pop_front();
            let Some(mut c) = next else {
                break self.connect().await?;
            };
            if c.ready().await.is_ok() {
                break c;
            }
        };
        let mut resp = conn.send_request(req).await?;
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            // The connection is the tunnel's now, outside the pool (and
            // its count: tunnels do not starve the pool's requests).
            let up = hyper::upgrade::on(&mut resp);
            let (mut parts, body) = resp.into_parts();
            parts.extensions.insert(AppUpgrade(Arc::new(Mutex::new(Some(up)))));
            return Ok(Response::from_parts(parts, PooledBody { inner: body, back: None, done: false }));
        }
        let (parts, body) = resp.into_parts();
        let back = Some((conn, self.clone(), permit));
        Ok(Response::from_parts(parts, PooledBody { inner: body, back, done: false }))
    }

    async fn connect(&self) -> Result<SendRequest<crate::Body>, BoxError> {
        let io = match &self.addr {
            // Kept as a TcpStream so that a tunnel can take the socket out
            // of hyper after a 101 (to splice it in the kernel).
            Addr::Tcp(_) => AppStream::Tcp(self.addr.connect_tcp().await?),
            Addr::Unix(_) => AppStream::Other(self.addr.connect().await?),
        };
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
        let addr = self.addr.to_string();
        tokio::spawn(async move {
            conn.with_upgrades().await.map_err(|e| tracing::debug!(%addr, "a connection to the app ended: {e}"))
        });
        Ok(send)
    }
}

/// The app's response body; its connection goes back to the pool when the
/// body was read to its end (dropped early, the connection closes).
struct PooledBody {
    inner: Incoming,
    back: Option<(SendRequest<crate::Body>, Arc<AppPool>, OwnedSemaphorePermit)>,
    done: bool,
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.done = true;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some((conn, pool, _permit)) = self.back.take() {
            if self.done && !conn.is_closed() {
                pool.idle.lock().unwrap().push_back(conn);
            }
        }
    }
}

/// A connection to the app.
enum AppStream {
    Tcp(tokio::net::TcpStream),
    Other(Box<dyn crate::app::Io>),
}

impl tokio::io::AsyncRead for AppStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            AppStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            AppStream::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for AppStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            AppStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            AppStream::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            AppStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            AppStream::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            AppStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            AppStream::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The app's TCP socket out of its upgraded connection, with what hyper
/// had read past the 101, for the dispatcher to splice; `Err` gives the
/// connection back when that cannot be (not TCP, or too much read).
fn app_socket(
    up: hyper::upgrade::Upgraded,
    idle: Option<Duration>,
) -> Result<crate::upgrade::SpliceApp, Box<dyn crate::app::Io>> {
    let parts = match up.downcast::<hyper_util::rt::TokioIo<AppStream>>() {
        Ok(p) => p,
        Err(up) => return Err(Box::new(hyper_util::rt::TokioIo::new(up))),
    };
    let early = parts.read_buf;
    match parts.io.into_inner() {
        AppStream::Tcp(s) if early.len() <= crate::proto::TUNNEL_MAX_EARLY => match s.into_std() {
            Ok(s) => Ok(crate::upgrade::SpliceApp { fd: Arc::new(s.into()), early, idle }),
            Err(e) => {
                tracing::warn!("the app's socket could not leave the poller: {e}");
                Err(rebuild(AppStream::Other(Box::new(tokio::io::empty())), early))
            }
        },
        io => Err(rebuild(io, early)),
    }
}

/// An upgraded connection again, from its parts.
fn rebuild(io: AppStream, early: Bytes) -> Box<dyn crate::app::Io> {
    Box::new(Prefixed { early, io })
}

/// A stream that first yields `early`.
struct Prefixed {
    early: Bytes,
    io: AppStream,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The app's side of a 101, in its response's extensions.
#[derive(Clone)]
struct AppUpgrade(Arc<Mutex<Option<hyper::upgrade::OnUpgrade>>>);

/// Joins the client's upgraded connection and the app's, both ways: an
/// end of stream on one side shuts the other's write side, and the tunnel
/// ends when both have, when either breaks, or after `idle` with nothing
/// either way (both then close).
async fn tunnel(client: crate::upgrade::OnUpgrade, app: Box<dyn crate::app::Io>, idle: Option<Duration>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let client = match client.upgraded().await {
        Ok(c) => c,
        Err(e) => return tracing::warn!("upgrade: the client's connection: {e}"),
    };
    let (cr, cw) = tokio::io::split(client);
    let (ar, aw) = tokio::io::split(app);
    let moved = tokio::sync::Notify::new();
    let pump = |mut r: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                mut w: Box<dyn tokio::io::AsyncWrite + Send + Unpin>| {
        let moved = &moved;
        async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    return w.shutdown().await;
                }
                w.write_all(&buf[..n]).await?;
                moved.notify_one();
            }
        }
    };
    let up = pump(Box::new(cr), Box::new(aw));
    let down = pump(Box::new(ar), Box::new(cw));
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                if let Err(e) = r {
                    return tracing::debug!("tunnel broke (client to app): {e}");
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                if let Err(e) = r {
                    return tracing::debug!("tunnel broke (app to client): {e}");
                }
            }
            _ = moved.notified() => {}
            _ = tokio::time::sleep(idle.unwrap_or_default()), if idle.is_some() => {
                return tracing::info!("a tunnel idle for {:?} closed", idle.unwrap_or_default());
            }
        }
    }
    tracing::debug!("tunnel closed");
}

/// Forwards requests to the app.
#[derive(Clone)]
struct Forward {
    pool: Arc<AppPool>,
    /// A tunnel (after a 101) with nothing either way this long closes.
    tunnel_idle: Option<Duration>,
}

impl tower_service::Service<Request<crate::Body>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<crate::Body>) -> Self::Future {
        let pool = self.pool.clone();
        let idle = self.tunnel_idle;
        Box::pin(async move {
            let client_up = req.extensions().get::<crate::upgrade::OnUpgrade>().cloned();
            let upgrade = client_up.is_some().then(|| req.headers().get(header::UPGRADE).cloned()).flatten();
            let mut req = to_app(req, &pool.addr)?;
            if let Some(proto) = &upgrade {
                // The one hop-by-hop field pair that goes on: the app is
                // asked to upgrade, as the client asked.
                req.headers_mut().insert(header::UPGRADE, proto.clone());
                req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
            Ok(match pool.send(req).await {
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    let app_up = parts.extensions.remove::<AppUpgrade>().and_then(|u| u.0.lock().unwrap().take());
                    let proto = parts.headers.get(header::UPGRADE).cloned();
                    strip_hop_by_hop(&mut parts.headers);
                    match (app_up, client_up) {
                        (Some(app), Some(client)) => {
                            if let Some(p) = proto {
                                parts.headers.insert(header::UPGRADE, p);
                            }
                            match app.await {
                                Ok(app) => {
                                    // Spliced in the kernel if it can be,
                                    // else copied here.
                                    let app = if client.can_splice() {
                                        app_socket(app, idle)
                                    } else {
                                        Err(Box::new(hyper_util::rt::TokioIo::new(app)) as Box<dyn crate::app::Io>)
                                    };
                                    match app {
                                        Ok(s) => {
                                            parts.extensions.insert(s);
                                        }
                                        Err(app) => {
                                            tokio::spawn(tunnel(client, app, idle));
                                        }
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(addr = %pool.addr, "upgrade: the app's connection: {e}");
                                    parts.status = http::StatusCode::BAD_GATEWAY;
                                }
                            }
                        }
                        (Some(_), None) => {
                            // A 101 to a request that did not ask for it.
                            tracing::warn!(addr = %pool.addr, "the app switched protocols unasked; 502");
                            parts.status = http::StatusCode::BAD_GATEWAY;
                        }
                        _ => {}
                    }
                    Response::from_parts(parts, body.map_err(BoxError::from).boxed())
                }
                Err(e) => {
                    tracing::warn!(addr = %pool.addr, "forwarding to the app: {e}");
                    let msg = Bytes::from_static(b"502 Bad Gateway: the app did not answer\n");
                    let mut r = Response::new(Full::new(msg).map_err(BoxError::from).boxed());
                    *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
                    r
                }
            })
        })
    }
}

/// The request as the app gets it: an absolute URI to its port, the
/// client's hop-by-hop headers gone, `X-Forwarded-*` and `Forwarded` set.
fn to_app(req: Request<crate::Body>, addr: &Addr) -> Result<Request<crate::Body>, BoxError> {
    let (mut parts, body) = req.into_parts();
    // Origin form on our own connection; the client's Host stays.
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    parts.uri = Uri::try_from(pq)?;
    if !parts.headers.contains_key(header::HOST) {
        let host = match addr {
            Addr::Tcp(a) => a.to_string(),
            Addr::Unix(_) => "localhost".to_string(),
        };
        parts.headers.insert(header::HOST, HeaderValue::from_str(&host)?);
    }
    // The app speaks HTTP/1.1 to us whatever the client spoke.
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    let client = parts.extensions.get::<ClientAddr>().map(|a| a.0);
    add_forwarded(&mut parts.headers, client);
    Ok(Request::from_parts(parts, body))
}

/// RFC 9110 §7.6.1: `Connection` and the fields it names, and the other
/// hop-by-hop fields, are not forwarded.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "trailer"] {
        h.remove(n);
    }
}

fn add_forwarded(h: &mut HeaderMap, client: Option<SocketAddr>) {
    let ip = client.map(|a| a.ip().to_string());
    if let Some(ip) = &ip {
        let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.clone(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let mut fwd = format!("for={}", ip.as_deref().unwrap_or("unknown"));
    if let Some(host) = h.get(header::HOST).and_then(|v| v.to_str().ok()) {
        if host.bytes().all(|b| b.is_ascii_graphic()) && !host.contains('"') {
            fwd.push_str(&format!(";host=\"{host}\""));
        }
    }
    fwd.push_str(";proto=http");
    if let Ok(v) = HeaderValue::from_str(&fwd) {
        h.append(header::FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_go_and_forwarding_fields_come() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("host", HeaderValue::from_static("example.org"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        strip_hop_by_hop(&mut h);
        add_forwarded(&mut h, Some("192.0.2.7:5555".parse().unwrap()));
        for gone in ["connection", "x-secret", "keep-alive", "te"] {
            assert!(h.get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["forwarded"], "for=192.0.2.7;host=\"example.org\";proto=http");
        assert_eq!(h["host"], "example.org");
    }
}
