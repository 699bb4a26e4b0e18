//! Reassembles requests from records (head, then body chunks), which may
//! interleave across connections and arrive from the ring or the control
//! socket.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use dispatcher_ebpf::abi::{RecordHeader, REC_CLOSE, REC_LAST, REC_SLOW};
use dispatcher_ebpf::wire::RecordKind;

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
}

/// What a record completed.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    Request(Raw),
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
}

/// The reassembler; one per worker.
#[derive(Default)]
pub struct Reassembly {
    partial: HashMap<(u64, u32), Partial>,
    /// Connections aborted lately (cookies are never reused): records of
    /// theirs still on the ring behind the abort are dropped.
    aborted: std::collections::HashSet<u64>,
    aborted_order: std::collections::VecDeque<u64>,
}

/// Aborted connections remembered.
const ABORTED_KEPT: usize = 4096;

impl Reassembly {
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
                if hdr.flags & REC_LAST != 0 && hdr.content_length == 0 {
                    self.partial.remove(&key);
                    return Some(Done::Request(Raw {
                        conn: hdr.conn,
                        seq: hdr.seq,
                        head,
                        body: Bytes::new(),
                        close: hdr.flags & REC_CLOSE != 0,
                        from_kernel,
                    }));
                }
                // Reserve at most what one ring's worth could carry up front;
                // the rest grows as records come.
                let cap = hdr.content_length.min(1 << 20) as usize;
                self.partial.insert(
                    key,
                    Partial { head, body: BytesMut::with_capacity(cap), expected: hdr.content_length, from_kernel },
                );
                None
            }
            Ok(RecordKind::Body) => {
                let Some(p) = self.partial.get_mut(&key) else {
                    return Some(Done::Invalid { conn: hdr.conn, seq: hdr.seq });
                };
                if p.body.len() as u64 + data.len() as u64 > p.expected {
                    self.partial.remove(&key);
                    return Some(Done::Invalid { conn: hdr.conn, seq: hdr.seq });
                }
                p.body.extend_from_slice(data);
                if hdr.flags & REC_LAST == 0 {
                    return None;
                }
                let p = self.partial.remove(&key).unwrap();
                if p.body.len() as u64 != p.expected {
                    return Some(Done::Invalid { conn: hdr.conn, seq: hdr.seq });
                }
                Some(Done::Request(Raw {
                    conn: hdr.conn,
                    seq: hdr.seq,
                    head: p.head,
                    body: p.body.freeze(),
                    close: hdr.flags & REC_CLOSE != 0,
                    from_kernel: p.from_kernel,
                }))
            }
            // Wake-ups carry nothing; a kind we do not know is skipped.
            Ok(RecordKind::Wake) | Err(_) => None,
        }
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

    fn hdr(conn: u64, seq: u32, kind: u8, flags: u8, len: usize, cl: u64) -> RecordHeader {
        RecordHeader { conn, seq, len: len as u32, content_length: cl, kind, flags, pool: 0, _pad: 0 }
    }

    #[test]
    fn interleaved_connections_and_split_bodies() {
        let mut r = Reassembly::default();
        assert_eq!(r.push(&hdr(1, 0, RECORD_HEAD, 0, 3, 6), b"H1\n"), None);
        assert_eq!(r.push(&hdr(2, 0, RECORD_HEAD, 0, 3, 2), b"H2\n"), None);
        assert_eq!(r.push(&hdr(1, 0, RECORD_BODY, 0, 3, 6), b"abc"), None);
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
        assert_eq!(r.push(&hdr(1, 0, RECORD_BODY, 0, 3, 0), b"abc"), Some(Done::Invalid { conn: 1, seq: 0 }));
        assert_eq!(r.push(&hdr(9, 4, RECORD_BODY, REC_LAST, 1, 0), b"a"), Some(Done::Invalid { conn: 9, seq: 4 }));
        r.push(&hdr(1, 1, RECORD_HEAD, 0, 1, 2), b"H");
        r.push(&hdr(1, 1, RECORD_ABORT, 0, 0, 0), b"");
        assert_eq!(r.pending(), 0);
    }
}
