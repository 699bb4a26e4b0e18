//! A request body as an [`http_body::Body`]: whole when it arrived with
//! its head, streamed otherwise, chunk by chunk as its records come off the
//! ring or the control socket.
//!
//! A streamed body is what keeps a large upload out of memory: the
//! dispatcher forwards slow-path body bytes only while what it sent and the
//! application has not read is under its window (`conn::slow::UPLOAD_WINDOW`
//! in the dispatcher), and this type is where "read" happens: the bytes a
//! handler takes are acknowledged with `WorkerFrame::BodyRead` frames, in
//! batches of [`ACK_EVERY`]. A body dropped unread is drained and
//! acknowledged, so the upload keeps moving (and is thrown away) instead of
//! stalling the connection.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

use crate::answer::Outbound;

/// Body bytes read between two acknowledgements to the dispatcher (a
/// sixteenth of its window, so it never waits on an acknowledgement).
pub(crate) const ACK_EVERY: u64 = 64 << 10;

/// What went wrong with a request body: the client went away or sent
/// records that do not add up to what its head announced.
#[derive(Debug, Clone, thiserror::Error)]
#[error("request body: {0}")]
pub struct BodyError(&'static str);

/// One step of a streamed body, from the reassembly to the handler.
#[derive(Debug)]
pub(crate) enum Piece {
    /// Body bytes; `slow`: forwarded by the dispatcher (acknowledged).
    Data(Bytes, bool),
    /// The body's trailer section (field lines, each ending in CRLF),
    /// before its `End`.
    Trailers(Bytes),
    /// The body is complete.
    End,
    /// The body stops here, incomplete.
    Fail(&'static str),
}

/// The reassembly's end of a streamed body.
pub(crate) type PieceTx = mpsc::UnboundedSender<Piece>;

/// The body of a request a worker serves with [`crate::serve`].
pub struct Body {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(Stream),
}

struct Stream {
    rx: mpsc::UnboundedReceiver<Piece>,
    /// Bytes still to come, as the head announced (`LENGTH_UNKNOWN`:
    /// chunked).
    left: u64,
    done: bool,
    ack: Ack,
}

/// Acknowledges read body bytes to the dispatcher, in batches.
struct Ack {
    out: Arc<Outbound>,
    conn: u64,
    seq: u32,
    pending: u64,
}

impl Ack {
    fn read(&mut self, n: u64) {
        self.pending += n;
        if self.pending >= ACK_EVERY {
            self.flush();
        }
    }

    fn flush(&mut self) {
        while self.pending > 0 {
            let n = self.pending.min(u32::MAX as u64);
            self.out.body_read(self.conn, self.seq, n as u32);
            self.pending -= n;
        }
    }
}

impl Body {
    /// A body that is all here.
    pub fn full(b: Bytes) -> Body {
        Body { kind: Kind::Full((!b.is_empty()).then_some(b)) }
    }

    /// No body.
    pub fn empty() -> Body {
        Body::full(Bytes::new())
    }

    /// A body of `length` bytes that arrives through `rx`.
    pub(crate) fn streamed(
        rx: mpsc::UnboundedReceiver<Piece>,
        length: u64,
        out: Arc<Outbound>,
        conn: u64,
        seq: u32,
    ) -> Body {
        Body { kind: Kind::Stream(Stream { rx, left: length, done: false, ack: Ack { out, conn, seq, pending: 0 } }) }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => {
                if s.done {
                    return Poll::Ready(None);
                }
                match s.rx.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Piece::Data(b, slow))) => {
                        if s.left != dispatcher_ebpf::abi::LENGTH_UNKNOWN {
                            s.left = s.left.saturating_sub(b.len() as u64);
                        }
                        if slow {
                            s.ack.read(b.len() as u64);
                        }
                        Poll::Ready(Some(Ok(Frame::data(b))))
                    }
                    Poll::Ready(Some(Piece::Trailers(t))) => match trailer_map(&t) {
                        Some(map) => Poll::Ready(Some(Ok(Frame::trailers(map)))),
                        None => {
                            s.done = true;
                            Poll::Ready(Some(Err(BodyError("malformed trailer fields"))))
                        }
                    },
                    Poll::Ready(Some(Piece::End)) => {
                        s.done = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Piece::Fail(why))) => {
                        s.done = true;
                        Poll::Ready(Some(Err(BodyError(why))))
                    }
                    Poll::Ready(None) => {
                        s.done = true;
                        Poll::Ready(Some(Err(BodyError("the connection closed before the body was complete"))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s) => s.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(s) if s.done => SizeHint::with_exact(0),
            // Sent chunked: no length known until the end.
            Kind::Stream(s) if s.left == dispatcher_ebpf::abi::LENGTH_UNKNOWN => SizeHint::default(),
            Kind::Stream(s) => SizeHint::with_exact(s.left),
        }
    }
}

/// The trailer fields of `section` (field lines, each ending in CRLF; the
/// dispatcher checked their syntax).
fn trailer_map(section: &[u8]) -> Option<http::HeaderMap> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut wire = section.to_vec();
    wire.extend_from_slice(b"\r\n");
    let httparse::Status::Complete((_, parsed)) = httparse::parse_headers(&wire, &mut fields).ok()? else {
        return None;
    };
    let mut map = http::HeaderMap::new();
    for f in parsed {
        let name = http::HeaderName::from_bytes(f.name.as_bytes()).ok()?;
        map.append(name, http::HeaderValue::from_bytes(f.value).ok()?);
    }
    Some(map)
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Dropped unread: what was forwarded and not read is acknowledged,
        // or the dispatcher's window for this upload never opens again.
        // Closing first makes the reassembly's later sends fail, so it
        // acknowledges those itself (`Done::Unread`).
        self.rx.close();
        while let Ok(p) = self.rx.try_recv() {
            if let Piece::Data(b, true) = p {
                self.ack.pending += b.len() as u64;
            }
        }
        self.ack.flush();
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full(b) => write!(f, "Body::Full({} bytes)", b.as_ref().map_or(0, |b| b.len())),
            Kind::Stream(s) => write!(f, "Body::Stream({} bytes to come)", s.left),
        }
    }
}
