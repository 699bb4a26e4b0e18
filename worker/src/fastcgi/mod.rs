//! `fastcgi` pools: PHP (php-fpm, `php-cgi -b`) or any FastCGI responder
//! behind a pool. The worker pulls requests from the pool's queue as any
//! worker does, finds the script each runs ([`cgi::Site`]), and sends it
//! to the app as a FastCGI request over a Unix or TCP connection: the
//! CGI/1.1 parameters, the body streamed as `FCGI_STDIN`, while it reads
//! the answer's `FCGI_STDOUT` (a CGI header section, then the body,
//! streamed back) and logs its `FCGI_STDERR`.
//!
//! The app is php-fpm started with a configuration the worker writes
//! ([`php_fpm`]), a command (`php-cgi -b $SOCKET`) started like a proxy
//! pool's app ([`crate::app`]), or one already running at an address.
//!
//! Connections are kept open between requests (`FCGI_KEEP_CONN`) only
//! when the app has a process for each one the worker may open: a php-fpm
//! child stays bound to its connection while it is open, so more kept
//! connections than children leave requests queued behind idle ones. The
//! worker knows that of the php-fpm it starts (`children`); for another
//! app `--keep-conn` says so.

pub mod cgi;
pub mod php_fpm;
pub mod record;

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf},
    sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore},
};

use crate::app::{Addr, AppError, Io, Listen, Socket};
use crate::BoxError;
use cgi::{Refusal, Site};
use record::Ended;

/// Where a FastCGI pool's app comes from.
#[derive(Clone, Debug)]
pub enum Backend {
    /// php-fpm, started with a configuration written for it.
    PhpFpm(php_fpm::PhpFpm),
    /// A command started like a proxy pool's app (`php-cgi -b $SOCKET`).
    Command { command: Vec<String>, socket: Socket },
    /// An app already listening there (`unix:/run/php/php8.2-fpm.sock`).
    Connect(Addr),
}

/// A FastCGI pool's worker.
#[derive(Clone, Debug)]
pub struct FastCgi {
    pub site: Site,
    pub backend: Backend,
    /// How long a started app may take to accept its first connection.
    pub start_timeout: Duration,
    /// Connections to the app at most; `None`: php-fpm's children, or 16.
    pub max_connections: Option<usize>,
    /// Keep connections open between requests (always with
    /// [`Backend::PhpFpm`]).
    pub keep_conn: bool,
}

/// Starts the app if the pool runs one, then serves the pool through it
/// until the worker is done or the app exits.
pub async fn run(cfg: FastCgi) -> Result<(), AppError> {
    let site = Arc::new(cfg.site);
    let (command, listen, max, keep, _conf) = match cfg.backend {
        Backend::Connect(addr) => {
            if !addr.accepts().await {
                tracing::warn!(%addr, "the FastCGI app does not accept connections (yet): its requests get 502 until it does");
            }
            let max = cfg.max_connections.unwrap_or(16).max(1);
            tracing::info!(%addr, root = %site.root().display(), max, keep_conn = cfg.keep_conn, "FastCGI pool");
            let conns = Arc::new(Conns::new(addr, max, cfg.keep_conn));
            return crate::serve(Gateway { site, conns }).await.map_err(AppError::from);
        }
        Backend::Command { command, socket } => {
            (command, Listen::choose(socket)?, cfg.max_connections.unwrap_or(16).max(1), cfg.keep_conn, None)
        }
        Backend::PhpFpm(fpm) => {
            let p = fpm.prepare().map_err(|e| AppError::Spawn("php-fpm".into(), std::io::Error::other(e)))?;
            // Not more connections than children (see the module's doc).
            let children = fpm.children.max(1);
            let max = cfg.max_connections.unwrap_or(children).clamp(1, children);
            (p.command, p.listen, max, true, Some(p.files))
        }
    };
    let running = crate::app::start(&command, listen, cfg.start_timeout).await?;
    tracing::info!(addr = %running.addr, root = %site.root().display(), max, keep_conn = keep, "FastCGI pool");
    let conns = Arc::new(Conns::new(running.addr.clone(), max, keep));
    crate::app::serve_while(running, crate::serve(Gateway { site, conns })).await
}

/// One connection to the app.
struct Conn {
    rd: BufReader<ReadHalf<Box<dyn Io>>>,
    wr: WriteHalf<Box<dyn Io>>,
}

/// Connections to the app: at most `permits` at once, kept between
/// requests when `keep`.
struct Conns {
    addr: Addr,
    keep: bool,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
}

impl Conns {
    fn new(addr: Addr, max: usize, keep: bool) -> Conns {
        Conns { addr, keep, idle: Mutex::new(Vec::new()), permits: Arc::new(Semaphore::new(max)) }
    }

    /// An idle connection the app has not closed, or a new one.
    async fn get(&self) -> std::io::Result<Conn> {
        loop {
            let next = self.idle.lock().unwrap().pop();
            let Some(mut c) = next else { break };
            // Readable between requests means closed (or out of step).
            if !ready_now(&mut c.rd).await {
                return Ok(c);
            }
        }
        let (rd, wr) = tokio::io::split(self.addr.connect().await?);
        Ok(Conn { rd: BufReader::with_capacity(64 << 10, rd), wr })
    }

    fn put(&self, c: Conn) {
        if self.keep {
            self.idle.lock().unwrap().push(c);
        }
    }
}

/// Whether `rd` has something to read (or its end, or an error) without
/// waiting.
async fn ready_now(rd: &mut BufReader<ReadHalf<Box<dyn Io>>>) -> bool {
    if !rd.buffer().is_empty() {
        return true;
    }
    tokio::select! {
        biased;
        _ = rd.fill_buf() => true,
        _ = std::future::ready(()) => false,
    }
}

/// Serves the pool's requests through the app.
#[derive(Clone)]
struct Gateway {
    site: Arc<Site>,
    conns: Arc<Conns>,
}

impl tower_service::Service<Request<crate::Body>> for Gateway {
    type Response = Response<Answer>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Answer>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<crate::Body>) -> Self::Future {
        let g = self.clone();
        Box::pin(async move { Ok(g.answer(req).await) })
    }
}

/// A chunked request body is held until it is complete (FastCGI needs its
/// CONTENT_LENGTH first), in memory up to this much, past it in a file.
const SPOOL_IN_MEMORY: usize = 1 << 20;
/// An answer that is all there within this many bytes goes out whole
/// (with a Content-Length, straight into a leased socket); a longer or
/// slower one is streamed.
const WHOLE_MAX: usize = 64 << 10;

/// What the request's body is sent from.
enum Stdin {
    /// As it arrives (it has a Content-Length).
    Stream(crate::Body),
    /// Held in memory.
    Held(Vec<Bytes>),
    /// Held in an unnamed temporary file.
    File(tokio::fs::File),
}

/// The head of the app's answer, and its body's start.
struct AnswerHead {
    head: cgi::Head,
    first: Bytes,
    /// The body is all in `first`.
    complete: bool,
}

/// Why the app gave no answer: the status the client gets, and the log's
/// reason.
type Failure = (StatusCode, String);

impl Gateway {
    async fn answer(&self, req: Request<crate::Body>) -> Response<Answer> {
        let script = match self.site.resolve(req.uri().path()) {
            Ok(s) => s,
            Err(Refusal::NotFound) => return plain(StatusCode::NOT_FOUND, "404 Not Found\n"),
            Err(Refusal::BadPath) => return plain(StatusCode::BAD_REQUEST, "400 Bad Request: bad path\n"),
        };
        let (parts, body) = req.into_parts();
        let declared = parts.headers.contains_key(header::CONTENT_LENGTH);
        let (length, stdin) = match hold(body).await {
            Ok((n, s)) => ((n > 0 || declared || !matches!(s, Stdin::Stream(_))).then_some(n), s),
            Err((status, why)) => {
                tracing::info!("request body: {why}");
                return plain(status, "the request body could not be read\n");
            }
        };
        let mut begin = BytesMut::with_capacity(2048);
        record::put_begin(&mut begin, self.conns.keep);
        record::put_stream(&mut begin, record::PARAMS, &self.site.params(&parts, &script, length));
        record::put_end(&mut begin, record::PARAMS);
        let permit = self.conns.permits.clone().acquire_owned().await.expect("the semaphore stays open");
        let conn = match self.conns.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(addr = %self.conns.addr, "connecting to the FastCGI app: {e}");
                return plain(StatusCode::BAD_GATEWAY, "502 Bad Gateway: the app did not answer\n");
            }
        };
        let (head_tx, head_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(8);
        let name = String::from_utf8_lossy(&script.name).into_owned();
        tokio::spawn(exchange(conn, begin, stdin, head_tx, tx, self.conns.clone(), permit, name.clone()));
        match head_rx.await {
            Ok(Ok(a)) => {
                let body = match a.complete {
                    true => Answer { first: Some(a.first), rx: None, left: None },
                    false => Answer {
                        left: a.head.length.map(|n| n.saturating_sub(a.first.len() as u64)),
                        first: Some(a.first),
                        rx: Some(rx),
                    },
                };
                let mut r = Response::new(body);
                *r.status_mut() = a.head.status;
                *r.headers_mut() = a.head.headers;
                r
            }
            Ok(Err((status, why))) => {
                tracing::warn!(script = %name, "the FastCGI app's answer: {why}");
                plain(status, "the app did not answer\n")
            }
            Err(_) => plain(StatusCode::BAD_GATEWAY, "502 Bad Gateway: the app did not answer\n"),
        }
    }
}

/// The body as it will be sent, and its length.
async fn hold(mut body: crate::Body) -> Result<(u64, Stdin), Failure> {
    if let Some(n) = body.size_hint().exact() {
        return Ok((n, Stdin::Stream(body)));
    }
    use tokio::io::AsyncSeekExt;
    let mut held = Vec::new();
    let mut len = 0usize;
    let mut file: Option<tokio::fs::File> = None;
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        let Ok(d) = f.into_data() else { continue };
        len += d.len();
        match &mut file {
            Some(f) => f.write_all(&d).await.map_err(spool_error)?,
            None => {
                held.push(d);
                if len > SPOOL_IN_MEMORY {
                    let mut f = tokio::fs::File::from_std(unnamed_file().map_err(spool_error)?);
                    for d in held.drain(..) {
                        f.write_all(&d).await.map_err(spool_error)?;
                    }
                    file = Some(f);
                }
            }
        }
    }
    Ok(match file {
        Some(mut f) => {
            f.seek(std::io::SeekFrom::Start(0)).await.map_err(spool_error)?;
            (len as u64, Stdin::File(f))
        }
        None => (len as u64, Stdin::Held(held)),
    })
}

fn spool_error(e: std::io::Error) -> Failure {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("holding it in a temporary file: {e}"))
}

/// A file in the temporary directory with no name: gone with its last
/// descriptor, whatever happens to the worker.
fn unnamed_file() -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(std::env::temp_dir())
}

/// Why sending the request stopped.
enum WriteEnd {
    /// The client's body failed: the request cannot complete.
    Client(String),
    /// The app stopped reading (it may still answer).
    App(std::io::Error),
}

/// One request on `conn`: the request written while its answer is read.
/// The head goes to `head_tx`, the rest of a streamed body to `tx`; the
/// connection goes back to the pool only after a complete exchange.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    conn: Conn,
    begin: BytesMut,
    stdin: Stdin,
    head_tx: oneshot::Sender<Result<AnswerHead, Failure>>,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    conns: Arc<Conns>,
    _permit: OwnedSemaphorePermit,
    script: String,
) {
    let Conn { mut rd, mut wr } = conn;
    let mut head_tx = Some(head_tx);
    let (read, wrote) = {
        let write = std::pin::pin!(send(&mut wr, begin, stdin));
        let read = std::pin::pin!(receive(&mut rd, &mut head_tx, &tx, &script));
        let mut write = write;
        let mut read = read;
        let mut wrote: Option<Result<(), ()>> = None;
        let read = loop {
            tokio::select! {
                w = &mut write, if wrote.is_none() => match w {
                    Ok(()) => wrote = Some(Ok(())),
                    Err(WriteEnd::Client(why)) => break Err((StatusCode::BAD_REQUEST, format!("the request body failed: {why}"))),
                    Err(WriteEnd::App(e)) => {
                        // It may have answered without reading it all.
                        tracing::debug!(%script, "the app stopped reading the request: {e}");
                        wrote = Some(Err(()));
                    }
                },
                r = &mut read => break r,
            }
        };
        (read, wrote)
    };
    match read {
        Ok(()) if wrote == Some(Ok(())) => conns.put(Conn { rd, wr }),
        Ok(()) => {}
        Err(f) => match head_tx.take() {
            Some(t) => {
                let _ = t.send(Err(f));
            }
            None => {
                tracing::warn!(%script, "the FastCGI app's answer broke off: {}", f.1);
                let _ = tx.send(Err(f.1.into())).await;
            }
        },
    }
}

/// Writes the request: `begin` (BEGIN_REQUEST and the parameters), then
/// the body as FCGI_STDIN.
async fn send(wr: &mut WriteHalf<Box<dyn Io>>, mut buf: BytesMut, stdin: Stdin) -> Result<(), WriteEnd> {
    use tokio::io::AsyncReadExt;
    let app = WriteEnd::App;
    match stdin {
        Stdin::Held(parts) => {
            for p in parts {
                record::put_stream(&mut buf, record::STDIN, &p);
            }
        }
        Stdin::Stream(mut body) => {
            while let Some(f) = body.frame().await {
                let f = f.map_err(|e| WriteEnd::Client(e.to_string()))?;
                let Ok(d) = f.into_data() else { continue };
                record::put_stream(&mut buf, record::STDIN, &d);
                if buf.len() >= 16 << 10 {
                    wr.write_all(&buf).await.map_err(app)?;
                    buf.clear();
                }
            }
        }
        Stdin::File(mut f) => {
            let mut chunk = vec![0u8; record::MAX_CONTENT];
            loop {
                let n = f.read(&mut chunk).await.map_err(|e| WriteEnd::Client(format!("its temporary file: {e}")))?;
                if n == 0 {
                    break;
                }
                record::put_stream(&mut buf, record::STDIN, &chunk[..n]);
                wr.write_all(&buf).await.map_err(app)?;
                buf.clear();
            }
        }
    }
    record::put_end(&mut buf, record::STDIN);
    wr.write_all(&buf).await.map_err(app)?;
    wr.flush().await.map_err(app)
}

/// Reads the answer to its FCGI_END_REQUEST.
async fn receive(
    rd: &mut BufReader<ReadHalf<Box<dyn Io>>>,
    head_tx: &mut Option<oneshot::Sender<Result<AnswerHead, Failure>>>,
    tx: &mpsc::Sender<Result<Bytes, BoxError>>,
    script: &str,
) -> Result<(), Failure> {
    let bad = |why: String| (StatusCode::BAD_GATEWAY, why);
    // The header section so far, until it is complete.
    let mut out = BytesMut::new();
    // The head and the body's start, until they go to `head_tx`.
    let mut head: Option<cgi::Head> = None;
    let mut first = BytesMut::new();
    loop {
        let rec = record::read(rd).await.map_err(|e| bad(format!("reading it: {e}")))?;
        if rec.id != record::REQUEST_ID {
            return Err(bad(format!("a record for request {} on a connection of request 1", rec.id)));
        }
        match rec.kind {
            record::STDOUT if head_tx.is_none() => {
                if !rec.content.is_empty() && tx.send(Ok(rec.content)).await.is_err() {
                    return Err(bad("the client went away".into()));
                }
            }
            record::STDOUT if head.is_some() => first.extend_from_slice(&rec.content),
            record::STDOUT => {
                out.extend_from_slice(&rec.content);
                if let Some((h, n)) = cgi::parse_head(&out).map_err(bad)? {
                    first.extend_from_slice(&out[n..]);
                    out = BytesMut::new();
                    head = Some(h);
                }
            }
            record::STDERR => {
                for line in String::from_utf8_lossy(&rec.content).lines().filter(|l| !l.trim().is_empty()) {
                    tracing::warn!(target: "app", %script, "{line}");
                }
            }
            record::END_REQUEST => {
                let (status, how) = record::end_request(&rec.content).map_err(|e| bad(e.to_string()))?;
                match how {
                    Ended::Complete => {}
                    Ended::Overloaded => return Err((StatusCode::SERVICE_UNAVAILABLE, "the app is overloaded".into())),
                    other => return Err(bad(format!("it ended the request: {other:?} (exit status {status})"))),
                }
                let Some(t) = head_tx.take() else { return Ok(()) };
                let Some(head) = head else {
                    return Err(bad(match out.is_empty() {
                        true => "it wrote nothing".into(),
                        false => "its header section has no end".into(),
                    }));
                };
                let _ = t.send(Ok(AnswerHead { head, first: first.freeze(), complete: true }));
                return Ok(());
            }
            other => return Err(bad(format!("an unexpected record of type {other}"))),
        }
        // The head goes when no more of the answer is there at once (or
        // enough is): a slow script's first output is not held back.
        if head.is_some() && (first.len() >= WHOLE_MAX || !ready_now(rd).await) {
            let (Some(t), Some(head)) = (head_tx.take(), head.take()) else { unreachable!("checked") };
            let first = std::mem::take(&mut first).freeze();
            if t.send(Ok(AnswerHead { head, first, complete: false })).is_err() {
                return Err(bad("the client went away".into()));
            }
        }
    }
}

/// A short answer of the worker's own.
fn plain(status: StatusCode, text: &'static str) -> Response<Answer> {
    let mut r = Response::new(Answer { first: Some(Bytes::from_static(text.as_bytes())), rx: None, left: None });
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The answer's body: what came with its head, then the rest as the app
/// writes it.
pub struct Answer {
    first: Option<Bytes>,
    rx: Option<mpsc::Receiver<Result<Bytes, BoxError>>>,
    /// Bytes still to come after `first`, when the app said how many.
    left: Option<u64>,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = self.first.take() {
            if !b.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
        }
        let Some(rx) = &mut self.rx else { return Poll::Ready(None) };
        match rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(b))) => {
                if let Some(left) = &mut self.left {
                    if b.len() as u64 > *left {
                        self.rx = None;
                        return Poll::Ready(Some(Err("the app wrote more than its Content-Length".into())));
                    }
                    *left -= b.len() as u64;
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.rx = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.rx = None;
                match self.left {
                    Some(n) if n > 0 => Poll::Ready(Some(Err("the app wrote less than its Content-Length".into()))),
                    _ => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rx.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let first = self.first.as_ref().map_or(0, |b| b.len() as u64);
        match (&self.rx, self.left) {
            (None, _) => SizeHint::with_exact(first),
            (Some(_), Some(n)) => SizeHint::with_exact(first + n),
            (Some(_), None) => SizeHint::default(),
        }
    }
}
