//! Serving a pool with any `tower::Service` over `http` types: an
//! unchanged axum `Router`, a `tower-http` stack, a hyper service.
//!
//! [`serve`] pulls requests as [`http::Request<Body>`] (handed out at their
//! head, the body streamed, see [`crate::Body`]), runs the service on each
//! in its own task (many in flight per worker) and writes the
//! `http::Response<B>` for any `http_body::Body` `B`:
//!
//! - a body that is complete as soon as it is polled (a `String`, `Json`,
//!   `Full`: most API answers) goes out whole with a `Content-Length`, on
//!   the direct path when the worker holds the connection's lease;
//! - otherwise it is streamed through the dispatcher in parts
//!   (`answer::StreamTx`, with flow control): with a `Content-Length` when
//!   the body knows its length, chunked to HTTP/1.1 clients (trailers
//!   included), close-delimited to HTTP/1.0 clients.
//!
//! ```no_run
//! # async fn run() -> Result<(), worker::Error> {
//! # let app = tower::service_fn(|_req: http::Request<worker::Body>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hi")))
//! # });
//! // `app` is e.g. an `axum::Router` (with its state applied).
//! worker::serve(app).await
//! # }
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, StatusCode, Version};
use http_body::{Body as HttpBody, Frame};
use tower_service::Service;

use crate::encode::{self, Framing};
use crate::request::MAX_HEADERS;
use crate::upgrade::{OnUpgrade, UpgradeError, Upgraded};
use crate::{
    answer::{Outbound, Wire},
    pull::reassembly::Raw,
    Body, Error, Worker,
};

/// The error type a service may return (answered 500).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body that is complete when first polled is collected up to this many
/// bytes and sent whole; past that it is streamed.
const WHOLE_MAX: usize = 1 << 20;
/// A body that says it is at most this long is waited for and sent whole,
/// even when it is not all there at first (a proxied app's answer arrives
/// a moment after its head): as one response it goes straight into a
/// leased socket instead of through the dispatcher part by part, as
/// nginx buffers a proxied answer. Streaming those through the
/// dispatcher held a proxy pool to 0.50× nginx at 16 connections.
const AWAIT_WHOLE_MAX: u64 = 64 << 10;
/// A streamed response's parts are at most about this big (frames that are
/// ready at once are coalesced up to it).
const PART_BYTES: usize = 64 << 10;

/// What a request's answer needs to know besides its response.
pub(crate) struct Meta {
    pub(crate) conn: u64,
    pub(crate) seq: u32,
    pub(crate) close: bool,
    pub(crate) from_kernel: bool,
    pub(crate) head_only: bool,
    pub(crate) http10: bool,
    pub(crate) raw_head: Bytes,
    pub(crate) received: Instant,
    /// The other end of the request's [`OnUpgrade`], if it has one.
    pub(crate) upgrade: Option<UpgradeTx>,
}

type UpgradeTx = tokio::sync::oneshot::Sender<Result<Upgraded, UpgradeError>>;

/// Identifies the request a handler is serving (in its extensions): the
/// dispatcher's connection id (socket cookie) and the request's number on
/// that connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestId {
    pub conn: u64,
    pub seq: u32,
}

/// The client's address (in a request's extensions, when the dispatcher
/// knows it: IPv4 clients). With the `axum` feature the request also has
/// axum's `ConnectInfo<SocketAddr>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// Serves the pool this process was started for with `service` until the
/// worker is recycled, idles out or gets SIGTERM (it then finishes the
/// requests it took, hands its connections back and returns `Ok`). Call it
/// inside a tokio runtime, current-thread or multi-thread.
pub async fn serve<S, B>(service: S) -> Result<(), Error>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_worker(Worker::from_env()?, service).await
}

/// [`serve`] over a worker made some other way (e.g. [`Worker::from_fds`]).
pub async fn serve_worker<S, B>(mut w: Worker, service: S) -> Result<(), Error>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    w.pull.stream_bodies();
    let pid = std::process::id();
    let pool = w.pool().to_string();
    tracing::info!(pool = %pool, pid, "worker ready (tower service)");
    let out = w.responder.out.clone();
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(Error::Control)?;
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        while handlers.try_join_next().is_some() {}
        let got = tokio::select! {
            r = w.pull.next() => r,
            _ = sigterm.recv() => {
                tracing::info!(pool = %pool, pid, "SIGTERM; finishing the requests taken");
                w.stop_pulling();
                continue;
            }
        };
        let pulled = match got {
            Ok(p) => p,
            Err(Error::Closed) => return Ok(()),
            Err(e @ (Error::Idle | Error::Recycle)) => {
                while handlers.join_next().await.is_some() {}
                tracing::info!(pool = %pool, pid, "{e}; exiting");
                w.finish().await;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let (conn, seq) = (pulled.raw.conn, pulled.raw.seq);
        let body = match pulled.body {
            Some((rx, len)) => Body::streamed(rx, len, out.clone(), conn, seq),
            None => Body::full(pulled.raw.body.clone()),
        };
        let Some((mut meta, req)) = to_http(pulled.raw, body, out.can_tunnel()) else {
            out.reject(conn, seq);
            continue;
        };
        w.pull.handed_out();
        let mut svc = service.clone();
        let out = out.clone();
        let mut handle = Box::pin(async move {
            let ready: Result<(), BoxError> = std::future::poll_fn(|cx| svc.poll_ready(cx)).await.map_err(Into::into);
            let resp = match ready {
                Ok(()) => svc.call(req).await.map_err(Into::into),
                Err(e) => Err(e),
            };
            match resp {
                Ok(r) => send(&out, &mut meta, r).await,
                Err(e) => {
                    let e: BoxError = e;
                    tracing::error!(conn, seq, "the service failed: {e}");
                    let r = http::Response::builder()
                        .status(StatusCode::INTERNAL_SERVER_ERROR)
                        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                        .body(http_body_util::Full::new(Bytes::from_static(b"internal server error\n")))
                        .expect("a valid response");
                    send(&out, &mut meta, r).await
                }
            }
        });
        // Most handlers answer without waiting for anything: run the
        // request here once, and make it a task (an allocation and a trip
        // through the scheduler) only if it has to wait. Its first poll
        // registered this loop's waker, which at worst wakes the loop once
        // for nothing.
        let done = std::future::poll_fn(|cx| Poll::Ready(handle.as_mut().poll(cx).is_ready())).await;
        if !done {
            handlers.spawn(handle);
        }
    }
}

/// The request as `http` types, or None if its head does not parse.
fn to_http(raw: Raw, body: Body, can_tunnel: bool) -> Option<(Meta, http::Request<Body>)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut p = httparse::Request::new(&mut headers);
    if !matches!(p.parse(&raw.head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let method = http::Method::from_bytes(p.method?.as_bytes()).ok()?;
    let http10 = p.version == Some(0);
    let mut b = http::Request::builder().method(method.clone()).uri(p.path?).version(if http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    });
    let map = b.headers_mut()?;
    map.reserve(p.headers.len());
    for h in p.headers.iter() {
        let name = header::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = header::HeaderValue::from_bytes(h.value).ok()?;
        map.append(name, value);
    }
    b = b.extension(RequestId { conn: raw.conn, seq: raw.seq });
    if let Some(addr) = raw.peer {
        b = b.extension(ClientAddr(addr));
        // What `axum::serve(..).into_make_service_with_connect_info()`
        // gives a handler, so one that extracts it runs unchanged.
        #[cfg(feature = "axum")]
        {
            b = b.extension(axum::extract::ConnectInfo(addr));
        }
    }
    let mut upgrade = None;
    if raw.upgrade && can_tunnel {
        let (on, tx) = OnUpgrade::new(raw.splice);
        b = b.extension(on);
        upgrade = Some(tx);
    }
    let req = b.body(body).ok()?;
    let meta = Meta {
        upgrade,
        conn: raw.conn,
        seq: raw.seq,
        close: raw.close,
        from_kernel: raw.from_kernel,
        head_only: method == http::Method::HEAD,
        http10,
        raw_head: raw.head,
        received: Instant::now(),
    };
    Some((meta, req))
}

/// Sends the 101 with `headers` through the dispatcher, which then hands
/// the connection over; `tx` gets it.
fn switch(out: &Arc<Outbound>, meta: &Meta, headers: &HeaderMap, tx: UpgradeTx) {
    let mut b = BytesMut::new();
    encode::switching(&mut b, headers);
    out.count(101, meta.received.elapsed());
    out.log_raw(meta.conn, meta.received, &meta.raw_head, 101, 0);
    let rx = out.expect_tunnel(meta.conn);
    if !out.switch(meta.conn, meta.seq, &b) {
        let _ = tx.send(Err(UpgradeError::Lost));
        return;
    }
    let open = out.tunnels_open.clone();
    tokio::spawn(async move {
        let r = match rx.await {
            Ok((fd, early)) => Upgraded::new(fd, early, open).map_err(UpgradeError::from),
            Err(_) => Err(UpgradeError::Lost),
        };
        let _ = tx.send(r);
    });
}

/// Sends the 101 with `headers`, the app's socket and what the app sent
/// after its 101 to the dispatcher, which joins that socket with the
/// client's in the kernel once the 101 is written.
fn splice(out: &Arc<Outbound>, meta: &Meta, headers: &HeaderMap, app: crate::upgrade::SpliceApp) {
    let mut b = BytesMut::new();
    encode::switching(&mut b, headers);
    out.count(101, meta.received.elapsed());
    out.log_raw(meta.conn, meta.received, &meta.raw_head, 101, 0);
    if let Err(e) = out.splice(meta.conn, meta.seq, &b, &app.early, app.fd, app.idle) {
        tracing::warn!(conn = meta.conn, "sending a tunnel to splice to the dispatcher: {e}");
    }
}

/// Polls `body` once: its next frame if one is ready now.
async fn poll_once<B: HttpBody + Unpin>(body: &mut B) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
    std::future::poll_fn(|cx: &mut Context<'_>| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
}

/// The next frame of `body`, waiting for it.
async fn next_frame<B: HttpBody + Unpin>(body: &mut B) -> Option<Result<Frame<B::Data>, B::Error>> {
    std::future::poll_fn(|cx: &mut Context<'_>| Pin::new(&mut *body).poll_frame(cx)).await
}

/// Writes `resp` as the answer to the request `meta` describes.
pub(crate) async fn send<B>(out: &Arc<Outbound>, meta: &mut Meta, resp: http::Response<B>)
where
    B: HttpBody,
    B::Error: Into<BoxError>,
{
    use bytes::Buf;
    let (mut parts, body) = resp.into_parts();
    let status = parts.status;
    let upgrade = meta.upgrade.take();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        match (upgrade, parts.extensions.remove::<crate::upgrade::SpliceApp>()) {
            (Some(_), Some(app)) => splice(out, meta, &parts.headers, app),
            (Some(tx), None) => switch(out, meta, &parts.headers, tx),
            (None, _) => {
                tracing::error!(
                    conn = meta.conn,
                    seq = meta.seq,
                    "the service answered 101 to a request that cannot upgrade (no OnUpgrade in it); 500 instead"
                );
                let mut b = BytesMut::new();
                encode::head(&mut b, StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new(), Framing::Length(0), true);
                out.respond(meta.conn, meta.seq, b.freeze().into(), true, meta.from_kernel);
            }
        }
        return;
    }
    // Not upgraded: the service's OnUpgrade, if it waits, hears so.
    drop(upgrade);
    let mut close = meta.close || encode::wants_close(&parts.headers);
    out.count(status.as_u16(), meta.received.elapsed());
    let mut body = Box::pin(body);
    // The handler's own Content-Length first: a HEAD answer's body is empty
    // but its length field is what GET would send (axum sets it so).
    let known = encode::declared_length(&parts.headers).or_else(|| body.size_hint().exact());
    if meta.head_only || encode::bodiless(status) {
        let framing = match (encode::bodiless(status), known) {
            (true, _) => Framing::Bodiless,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::HeadUnknown,
        };
        let mut b = BytesMut::new();
        encode::head(&mut b, status, &parts.headers, framing, close);
        out.log_raw(meta.conn, meta.received, &meta.raw_head, status.as_u16(), 0);
        out.respond(meta.conn, meta.seq, b.freeze().into(), close, meta.from_kernel);
        return;
    }
    // What is ready at once: most answers are all here now.
    let mut collected = BytesMut::new();
    let mut trailers: Option<HeaderMap> = None;
    let mut ended = false;
    let mut failed = false;
    let await_whole = known.is_some_and(|n| n <= AWAIT_WHOLE_MAX);
    while collected.len() <= WHOLE_MAX {
        let next = match await_whole {
            true => Poll::Ready(next_frame(&mut body).await),
            false => poll_once(&mut body).await,
        };
        match next {
            Poll::Ready(Some(Ok(f))) => match f.into_data() {
                Ok(mut d) => {
                    while d.has_remaining() {
                        let c = d.chunk();
                        collected.extend_from_slice(c);
                        let n = c.len();
                        d.advance(n);
                    }
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        trailers.get_or_insert_with(HeaderMap::new).extend(t);
                    }
                }
            },
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                tracing::warn!(conn = meta.conn, seq = meta.seq, "response body failed: {e}");
                failed = true;
                break;
            }
            Poll::Ready(None) => {
                ended = true;
                break;
            }
            Poll::Pending => break,
        }
    }
    if failed && collected.is_empty() {
        // Nothing sent yet: a clean 500 instead.
        let mut b = BytesMut::new();
        let msg = b"internal server error\n";
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
        encode::head(&mut b, StatusCode::INTERNAL_SERVER_ERROR, &h, Framing::Length(msg.len() as u64), true);
        b.extend_from_slice(msg);
        out.log_raw(meta.conn, meta.received, &meta.raw_head, 500, msg.len());
        out.respond(meta.conn, meta.seq, b.freeze().into(), true, meta.from_kernel);
        return;
    }
    if ended && (trailers.is_none() || meta.http10) {
        let mut b = BytesMut::with_capacity(256);
        encode::head(&mut b, status, &parts.headers, Framing::Length(collected.len() as u64), close);
        out.log_raw(meta.conn, meta.received, &meta.raw_head, status.as_u16(), collected.len());
        // The body is not copied behind the head: one vectored send.
        let wire = Wire::new(b.freeze(), collected.freeze());
        out.respond(meta.conn, meta.seq, wire, close, meta.from_kernel);
        return;
    }
    // Streamed.
    let framing = match known {
        Some(n) => Framing::Length(n),
        None if !meta.http10 => Framing::Chunked,
        None => Framing::Close,
    };
    if framing == Framing::Close {
        close = true;
    }
    let mut tx = out.stream(meta.conn, meta.seq);
    let mut part = BytesMut::with_capacity(PART_BYTES + 256);
    encode::head(&mut part, status, &parts.headers, framing, close);
    let mut sent_body: u64 = 0;
    let add = |part: &mut BytesMut, d: &[u8], sent_body: &mut u64| {
        // A body longer than its declared length is cut there (and the
        // connection closed below).
        let d = match framing {
            Framing::Length(n) => &d[..d.len().min(n.saturating_sub(*sent_body) as usize)],
            _ => d,
        };
        *sent_body += d.len() as u64;
        encode::data(part, framing, d);
    };
    add(&mut part, &collected, &mut sent_body);
    drop(collected);
    let mut broken = failed;
    while !ended && !broken {
        // One frame, waiting if need be; then whatever else is ready.
        let mut first = true;
        while part.len() < PART_BYTES {
            let f = if first {
                first = false;
                match next_frame(&mut body).await {
                    Some(r) => Poll::Ready(Some(r)),
                    None => Poll::Ready(None),
                }
            } else {
                poll_once(&mut body).await
            };
            match f {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Ready(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    tracing::warn!(conn = meta.conn, seq = meta.seq, "response body failed mid-stream: {e}");
                    broken = true;
                    break;
                }
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(mut d) => {
                        while d.has_remaining() {
                            let c = d.chunk();
                            let n = c.len();
                            add(&mut part, c, &mut sent_body);
                            d.advance(n);
                        }
                    }
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            trailers.get_or_insert_with(HeaderMap::new).extend(t);
                        }
                    }
                },
            }
        }
        if !ended && !broken && !part.is_empty() {
            if !tx.send(&part, false, false).await {
                return;
            }
            part.clear();
        }
    }
    // The end: a body cut short (its error, or fewer bytes than declared)
    // can only be told to the client by closing without the end marker.
    let short = matches!(framing, Framing::Length(n) if sent_body != n);
    if broken || short {
        close = true;
    } else if framing == Framing::Chunked {
        encode::end_chunked(&mut part, trailers.as_ref());
    }
    out.log_raw(meta.conn, meta.received, &meta.raw_head, status.as_u16(), sent_body as usize);
    tx.send(&part, true, close).await;
}
