//! Reassembles requests from records (head, then body chunks), which may
//! interleave across connections and arrive from the ring or the control
//! socket. Bodies are either collected (a request is handed out whole) or,
//! with [`Reassembly::streaming`], handed out with their head and fed to a
//! [`crate::Body`] chunk by chunk.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use dispatcher_ebpf::abi::{
    RecordHeader, LENGTH_UNKNOWN, REC_CLOSE, REC_LAST, REC_SLOW, REC_SPLICE, REC_TRAILERS, REC_UPGRADE,
};
use dispatcher_ebpf::wire::RecordKind;
use tokio::sync::mpsc;

use crate::body::{Piece, PieceTx};

/// A request whose records all arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw {
    pub conn: u64,
    pub seq: u32,
    pub head: Bytes,
    pub body: Bytes,
    /// The client asked to close after this request.
    pub close: bool,
    /// Framed by the kernel (false: by the dispatcher's slow path).
    pub from_kernel: bool,
    /// The client's address, when the head record carried it.
    pub peer: Option<std::net::SocketAddr>,
    /// An upgrade request the dispatcher holds the connection for
    /// (`REC_UPGRADE`): a 101 makes the connection this worker's.
    pub upgrade: bool,
    /// With `upgrade`: the dispatcher can splice the connection with an
    /// app's TCP socket in the kernel (`REC_SPLICE`).
    pub splice: bool,
}

/// The client address a head record carries.
fn peer_of(hdr: &RecordHeader) -> Option<std::net::SocketAddr> {
    (hdr.peer_ip4 != 0).then(|| {
        let ip = std::net::Ipv4Addr::from(hdr.peer_ip4.to_ne_bytes());
        std::net::SocketAddr::from((ip, hdr.peer_port))
    })
}

/// What a record completed.
#[derive(Debug)]
pub enum Done {
    Request(Raw),
    /// (Streaming mode) a head whose body follows through the receiver;
    /// `Raw::body` is empty and the `u64` is the announced length.
    Streaming(Raw, mpsc::UnboundedReceiver<Piece>, u64),
    /// (Streaming mode) body bytes the dispatcher forwarded for a body
    /// nobody reads any more: acknowledge them (they are dropped).
    Unread {
        conn: u64,
        seq: u32,
        len: u64,
    },
    /// The records were inconsistent (a body longer than announced, a body
    /// without a head): answer 400 and close.
    Invalid {
        conn: u64,
        seq: u32,
    },
}

struct Partial {
    head: Bytes,
    body: BytesMut,
    expected: u64,
    from_kernel: bool,
    peer: Option<std::net::SocketAddr>,
    /// Streaming mode: where the body goes (None once its reader is gone).
    tx: Option<PieceTx>,
    /// Streaming mode: body bytes received so far.
    got: u64,
    streamed: bool,
}

/// The reassembler; one per worker.
#[derive(Default)]
pub struct Reassembly {
    partial: HashMap<(u64, u32), Partial>,
    /// Connections aborted lately (cookies are never reused): records of
    /// theirs still on the ring behind the abort are dropped.
    aborted: std::collections::HashSet<u64>,
    aborted_order: std::collections::VecDeque<u64>,
    /// Hand requests out at their head, bodies streamed.
    stream: bool,
}

/// Aborted connections remembered.
const ABORTED_KEPT: usize = 4096;

impl Reassembly {
    /// A reassembler that hands each request out with its head and streams
    /// its body (see [`Done::Streaming`]).
    pub fn streaming() -> Reassembly {
        Reassembly { stream: true, ..Default::default() }
    }

    /// Whether bodies are streamed.
    pub fn streams(&self) -> bool {
        self.stream
    }

    /// Connection `conn` was aborted (its records are dropped).
    pub fn is_aborted(&self, conn: u64) -> bool {
        self.aborted.contains(&conn)
    }

    /// Feeds one record; returns the request it completed, if any.
    pub fn push(&mut self, hdr: &RecordHeader, data: &[u8]) -> Option<Done> {
        let key = (hdr.conn, hdr.seq);
        match hdr.record_kind() {
            Ok(RecordKind::Abort) => {
                self.partial.retain(|(c, _), _| *c != hdr.conn);
                if self.aborted.insert(hdr.conn) {
                    self.aborted_order.push_back(hdr.conn);
                    if self.aborted_order.len() > ABORTED_KEPT {
                        let old = self.aborted_order.pop_front().expect("non-empty");
                        self.aborted.remove(&old);
                    }
                }
                None
            }
            _ if self.aborted.contains(&hdr.conn) => None,
            Ok(RecordKind::Head) => {
                let from_kernel = hdr.flags & REC_SLOW == 0;
                let head = Bytes::copy_from_slice(data);
                let raw = |head| Raw {
                    conn: hdr.conn,
                    seq: hdr.seq,
                    head,
                    body: Bytes::new(),
                    close: hdr.flags & REC_CLOSE != 0,
                    from_kernel,
                    peer: peer_of(hdr),
                    upgrade: hdr.flags & REC_UPGRADE != 0,
                    splice: hdr.flags & REC_SPLICE != 0,
                };
                if hdr.flags & REC_LAST != 0 && hdr.content_length == 0 {
                    self.partial.remove(&key);
                    return Some(Done::Request(raw(head)));
                }
                if self.stream {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let p = Partial {
                        head: Bytes::new(),
                        body: BytesMut::new(),
                        expected: hdr.content_length,
                        from_kernel,
                        peer: None,
                        tx: Some(tx),
                        got: 0,
                        streamed: true,
                    };
                    self.partial.insert(key, p);
                    return Some(Done::Streaming(raw(head), rx, hdr.content_length));
                }
                // Reserve at most what one ring's worth could carry up front;
                // the rest grows as records come.
                let cap = hdr.content_length.min(1 << 20) as usize;
                let p = Partial {
                    head,
                    body: BytesMut::with_capacity(cap),
                    expected: hdr.content_length,
                    from_kernel,
                    peer: peer_of(hdr),
                    tx: None,
                    got: 0,
                    streamed: false,
                };
                self.partial.insert(key, p);
                None
            }
            Ok(RecordKind::Body) => {
                let Some(p) = self.partial.get_mut(&key) else {
                    return Some(Done::Invalid { conn: hdr.conn, seq: hdr.seq });
                };
                if hdr.flags & REC_TRAILERS != 0 {
                    // A chunked body's trailer section: to a streamed
                    // body's reader (a collected body has nowhere to put it).
                    if let Some(tx) = &p.tx {
                        let _ = tx.send(Piece::Trailers(Bytes::copy_from_slice(data)));
                    }
                    return None;
                }
                // Each record says how much of the body is still to come:
                // one taken out of order (from the ring and the control
                // socket both) is refused, not spliced in at the wrong place.
                let got = if p.streamed { p.got } else { p.body.len() as u64 };
                if p.expected != LENGTH_UNKNOWN && hdr.content_length != p.expected.wrapping_sub(got) {
                    let p = self.partial.remove(&key).expect("present");
                    if let Some(tx) = p.tx {
                        let _ = tx.send(Piece::Fail("the body's records came out of order"));
                    }
                    tracing::error!(
                        conn = hdr.conn,
                        seq = hdr.seq,
                        at = got,
                        says = hdr.content_length,
                        expected = p.expected,
                        "a body record out of order"
                    );
                    return Some(Done::Invalid { conn: hdr.conn, seq: hdr.seq });
                }
                if p.streamed {
                    return self.stream_body(hdr, data);
                }
                if p.body.len() as u64 + data.len() as u64 > p.expected {
                    self.partial.remove(&key);
                    return Some(Done::Invalid { conn: hdr.conn, seq: hdr.seq });
                }
                p.body.extend_from_slice(data);
                if hdr.flags & REC_LAST == 0 {
                    return None;
                }
                let p = self.partial.remove(&key).unwrap();
                if p.expected != LENGTH_UNKNOWN && p.body.len() as u64 != p.expected {
                    return Some(Done::Invalid { conn: hdr.conn, seq: hdr.seq });
                }
                Some(Done::Request(Raw {
                    conn: hdr.conn,
                    seq: hdr.seq,
                    head: p.head,
                    body: p.body.freeze(),
                    close: hdr.flags & REC_CLOSE != 0,
                    from_kernel: p.from_kernel,
                    peer: p.peer,
                    upgrade: false,
                    splice: false,
                }))
            }
            // Wake-ups carry nothing; a kind we do not know is skipped.
            Ok(RecordKind::Wake) | Ok(RecordKind::Written) | Err(_) => None,
        }
    }

    /// A body record of a streamed request.
    fn stream_body(&mut self, hdr: &RecordHeader, data: &[u8]) -> Option<Done> {
        let key = (hdr.conn, hdr.seq);
        let p = self.partial.get_mut(&key).expect("looked up by the caller");
        let (conn, seq) = key;
        let slow = hdr.flags & REC_SLOW != 0;
        p.got += data.len() as u64;
        let last = hdr.flags & REC_LAST != 0;
        let unknown = p.expected == LENGTH_UNKNOWN;
        if !unknown && (p.got > p.expected || (last && p.got != p.expected)) {
            let p = self.partial.remove(&key).expect("present");
            if let Some(tx) = p.tx {
                let _ = tx.send(Piece::Fail("the body does not match its Content-Length"));
            }
            return Some(Done::Invalid { conn, seq });
        }
        let mut unread = 0;
        if !data.is_empty() {
            let sent = p.tx.as_ref().is_some_and(|tx| tx.send(Piece::Data(Bytes::copy_from_slice(data), slow)).is_ok());
            if !sent {
                p.tx = None;
                if slow {
                    unread = data.len() as u64;
                }
            }
        }
        if last {
            let p = self.partial.remove(&key).expect("present");
            if let Some(tx) = p.tx {
                let _ = tx.send(Piece::End);
            }
        }
        (unread > 0).then_some(Done::Unread { conn, seq, len: unread })
    }

    /// Requests waiting for more records.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatcher_ebpf::abi::{RECORD_ABORT, RECORD_BODY, RECORD_HEAD};
    use tokio::sync::mpsc;

    fn hdr(conn: u64, seq: u32, kind: u8, flags: u8, len: usize, cl: u64) -> RecordHeader {
        RecordHeader { conn, seq, len: len as u32, content_length: cl, kind, flags, peer_port: 0, peer_ip4: 0 }
    }

    #[test]
    fn interleaved_connections_and_split_bodies() {
        let mut r = Reassembly::default();
        assert!(r.push(&hdr(1, 0, RECORD_HEAD, 0, 3, 6), b"H1\n").is_none());
        assert!(r.push(&hdr(2, 0, RECORD_HEAD, 0, 3, 2), b"H2\n").is_none());
        assert!(r.push(&hdr(1, 0, RECORD_BODY, 0, 3, 6), b"abc").is_none());
        let d2 = r.push(&hdr(2, 0, RECORD_BODY, REC_LAST | REC_CLOSE, 2, 2), b"xy").unwrap();
        let Done::Request(q2) = d2 else { panic!() };
        assert_eq!((&q2.body[..], q2.close, q2.from_kernel), (&b"xy"[..], true, true));
        let Done::Request(q1) = r.push(&hdr(1, 0, RECORD_BODY, REC_LAST, 3, 3), b"def").unwrap() else { panic!() };
        assert_eq!(&q1.body[..], b"abcdef");
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn bodies_longer_than_announced_and_orphans_are_invalid() {
        let mut r = Reassembly::default();
        r.push(&hdr(1, 0, RECORD_HEAD, REC_SLOW, 1, 2), b"H");
        assert!(matches!(r.push(&hdr(1, 0, RECORD_BODY, 0, 3, 0), b"abc"), Some(Done::Invalid { conn: 1, seq: 0 })));
        assert!(matches!(
            r.push(&hdr(9, 4, RECORD_BODY, REC_LAST, 1, 0), b"a"),
            Some(Done::Invalid { conn: 9, seq: 4 })
        ));
        r.push(&hdr(1, 1, RECORD_HEAD, 0, 1, 2), b"H");
        r.push(&hdr(1, 1, RECORD_ABORT, 0, 0, 0), b"");
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn streamed_bodies_are_handed_out_at_the_head_and_checked() {
        let mut r = Reassembly::streaming();
        let Some(Done::Streaming(raw, mut rx, 5)) = r.push(&hdr(1, 0, RECORD_HEAD, 0, 2, 5), b"H1") else { panic!() };
        assert_eq!((&raw.head[..], raw.body.len()), (&b"H1"[..], 0));
        assert!(r.push(&hdr(1, 0, RECORD_BODY, REC_SLOW, 2, 5), b"ab").is_none());
        assert!(r.push(&hdr(1, 0, RECORD_BODY, REC_LAST, 3, 3), b"cde").is_none());
        assert!(matches!(rx.try_recv(), Ok(Piece::Data(b, true)) if &b[..] == b"ab"));
        assert!(matches!(rx.try_recv(), Ok(Piece::Data(b, false)) if &b[..] == b"cde"));
        assert!(matches!(rx.try_recv(), Ok(Piece::End)));
        assert_eq!(r.pending(), 0);
        // Too long: the body fails, the request is invalid.
        let Some(Done::Streaming(_, mut rx, 1)) = r.push(&hdr(2, 0, RECORD_HEAD, 0, 1, 1), b"H") else { panic!() };
        assert!(matches!(
            r.push(&hdr(2, 0, RECORD_BODY, REC_SLOW, 2, 1), b"ab"),
            Some(Done::Invalid { conn: 2, seq: 0 })
        ));
        assert!(matches!(rx.try_recv(), Ok(Piece::Fail(_))));
        // Its reader is gone: forwarded bytes come back as unread (to be
        // acknowledged), kernel bytes are just dropped.
        let Some(Done::Streaming(_, rx, 6)) = r.push(&hdr(3, 0, RECORD_HEAD, 0, 1, 6), b"H") else { panic!() };
        drop(rx);
        assert!(r.push(&hdr(3, 0, RECORD_BODY, 0, 2, 6), b"ab").is_none());
        assert!(matches!(
            r.push(&hdr(3, 0, RECORD_BODY, REC_SLOW, 2, 4), b"cd"),
            Some(Done::Unread { conn: 3, seq: 0, len: 2 })
        ));
        assert!(matches!(
            r.push(&hdr(3, 0, RECORD_BODY, REC_SLOW | REC_LAST, 2, 2), b"ef"),
            Some(Done::Unread { len: 2, .. })
        ));
        // An abort ends a body short: its reader sees the channel close.
        let Some(Done::Streaming(_, mut rx, 4)) = r.push(&hdr(4, 0, RECORD_HEAD, 0, 1, 4), b"H") else { panic!() };
        r.push(&hdr(4, 0, RECORD_ABORT, 0, 0, 0), b"");
        assert!(matches!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)));
    }

    #[test]
    fn a_body_record_out_of_order_is_refused() {
        // The kernel's records of a body and the slow path's that follow
        // them, taken in the wrong order: refused, in both modes.
        let mut r = Reassembly::default();
        r.push(&hdr(1, 0, RECORD_HEAD, 0, 1, 6), b"H");
        assert!(r.push(&hdr(1, 0, RECORD_BODY, 0, 2, 6), b"ab").is_none());
        assert!(matches!(
            r.push(&hdr(1, 0, RECORD_BODY, REC_SLOW | REC_LAST, 2, 2), b"ef"),
            Some(Done::Invalid { conn: 1, seq: 0 })
        ));
        assert_eq!(r.pending(), 0);
        let mut r = Reassembly::streaming();
        let Some(Done::Streaming(_, mut rx, 4)) = r.push(&hdr(2, 0, RECORD_HEAD, 0, 1, 4), b"H") else { panic!() };
        assert!(matches!(r.push(&hdr(2, 0, RECORD_BODY, REC_SLOW, 2, 2), b"cd"), Some(Done::Invalid { .. })));
        assert!(matches!(rx.try_recv(), Ok(Piece::Fail(_))));
    }

    #[test]
    fn bodies_of_unknown_length_end_with_their_last_record() {
        use dispatcher_ebpf::abi::LENGTH_UNKNOWN;
        let mut r = Reassembly::default();
        assert!(r.push(&hdr(1, 0, RECORD_HEAD, REC_SLOW, 1, LENGTH_UNKNOWN), b"H").is_none());
        assert!(r.push(&hdr(1, 0, RECORD_BODY, REC_SLOW, 3, 0), b"abc").is_none());
        let Some(Done::Request(q)) = r.push(&hdr(1, 0, RECORD_BODY, REC_SLOW | REC_LAST, 0, 0), b"") else { panic!() };
        assert_eq!(&q.body[..], b"abc");
        let mut r = Reassembly::streaming();
        let Some(Done::Streaming(_, mut rx, LENGTH_UNKNOWN)) =
            r.push(&hdr(2, 0, RECORD_HEAD, REC_SLOW, 1, LENGTH_UNKNOWN), b"H")
        else {
            panic!()
        };
        assert!(r.push(&hdr(2, 0, RECORD_BODY, REC_SLOW, 2, 0), b"de").is_none());
        assert!(r.push(&hdr(2, 0, RECORD_BODY, REC_SLOW | REC_LAST, 0, 0), b"").is_none());
        assert!(matches!(rx.try_recv(), Ok(Piece::Data(b, true)) if &b[..] == b"de"));
        assert!(matches!(rx.try_recv(), Ok(Piece::End)));
        assert_eq!(r.pending(), 0);
    }
}
