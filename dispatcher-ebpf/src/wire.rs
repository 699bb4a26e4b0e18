//! What the dispatcher and one of its workers say to each other: the
//! records on the worker's control socket, the frames it answers with, and
//! the messages on its lease socket. Each message has one encoder and one
//! decoder here, used by both sides; a decoder rejects a kind it does not
//! know with a [`DecodeError`] the reader can log.
//!
//! **Control socket** (a Unix stream socket the worker inherits; the
//! `launch` module says where).
//!
//! Dispatcher → worker: requests the dispatcher's slow path framed, as
//! [`RecordHeader`] + `len` bytes, exactly like ring records but with
//! [`REC_SLOW`](crate::abi::REC_SLOW) set (and `len` not limited to a ring
//! record's size). A record of kind [`RecordKind::Abort`] (no data) tells
//! the worker the connection is gone: drop its partial requests and stop
//! its streamed responses. A record of kind [`RecordKind::Written`] says
//! how many bytes of a streamed response's part reached the client.
//!
//! Worker → dispatcher: [`FrameHeader`] + `len` bytes, what the frame is
//! given by [`WorkerFrame`]. Responses are raw HTTP/1.1 (status line,
//! headers, body); a response may be sent in several frames, the one with
//! `last` ends it, and the dispatcher writes responses to the client in
//! `seq` order per connection. A *streamed* response's frames carry
//! [`RESP_STREAM`]: each is answered with a `Written` record once written,
//! and the worker keeps only a window of them unwritten (flow control for
//! responses of unknown length). The other frames are reports: a lease
//! release, request body bytes the application read (the dispatcher's
//! upload window, [`WorkerFrame::BodyRead`]), the worker's stop, its
//! counters and its access-log records.
//! Neither side accepts a frame longer than [`MAX_FRAME`].
//!
//! **Leases** (the direct response path). A worker may write a
//! connection's responses straight into the client's socket instead of
//! sending them through the dispatcher. It asks with `want_lease` on a
//! response; once the dispatcher has written that response it answers on
//! the *lease socket* (a `SOCK_SEQPACKET` pair, one [`LeaseMsg`] per
//! packet): a grant carries the connection's socket (SCM_RIGHTS) and the
//! first sequence number the worker now writes. While a worker holds a
//! lease it writes that connection's responses itself, strictly in `seq`
//! order; anything it cannot write in order (a gap, a response that closes
//! the connection, a slow-path request) makes it give the lease back first
//! with a [`WorkerFrame::Release`] on the control socket, so the dispatcher
//! knows where the worker stopped before it writes anything itself. The
//! dispatcher revokes a lease when some other party (another pool, its slow
//! path, a time-out) has something to write on the connection.
//!
//! The bytes: every header is `#[repr(C)]` in native byte order (both ends
//! run on one host), written and read by [`plain`]. A
//! worker frame's kind is a set of `RESP_*` bits in
//! [`FrameHeader::flags`]; a lease message's kind is a number (`LEASE_*`).

use core::fmt;

use crate::abi::{RecordHeader, RECORD_ABORT, RECORD_BODY, RECORD_HEAD, RECORD_WAKE, RECORD_WRITTEN};
use crate::plain::{self, Plain};

/// Largest frame either side accepts on the control socket.
pub const MAX_FRAME: usize = 1 << 20;

/// Why bytes could not be read as a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the message's fixed size.
    Short { what: &'static str, len: usize, need: usize },
    /// A kind this side does not know (a broken or newer peer).
    UnknownKind { what: &'static str, kind: u32 },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short { what, len, need } => write!(f, "short {what}: {len} bytes of {need}"),
            DecodeError::UnknownKind { what, kind } => write!(f, "{what} of unknown kind {kind:#x}"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// What a request record carries: the typed form of
/// [`RecordHeader::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// The request head (`len` bytes).
    Head = RECORD_HEAD,
    /// Body bytes of the request.
    Body = RECORD_BODY,
    /// Control socket only: the connection closed, forget its partial
    /// requests (no data).
    Abort = RECORD_ABORT,
    /// Ring only: nothing but a wake-up (see `abi::RING_AWAKE_YES`);
    /// consumers skip it.
    Wake = RECORD_WAKE,
    /// Control socket only: bytes of a streamed response were written to
    /// the client (`content_length` of them; no data).
    Written = RECORD_WRITTEN,
}

impl RecordKind {
    /// The kind's byte in [`RecordHeader::kind`].
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The kind of byte `k`.
    pub fn decode(k: u8) -> Result<RecordKind, DecodeError> {
        match k {
            RECORD_HEAD => Ok(RecordKind::Head),
            RECORD_BODY => Ok(RecordKind::Body),
            RECORD_ABORT => Ok(RecordKind::Abort),
            RECORD_WAKE => Ok(RecordKind::Wake),
            RECORD_WRITTEN => Ok(RecordKind::Written),
            k => Err(DecodeError::UnknownKind { what: "record", kind: k as u32 }),
        }
    }
}

impl RecordHeader {
    /// The record's kind, typed.
    pub fn record_kind(&self) -> Result<RecordKind, DecodeError> {
        RecordKind::decode(self.kind)
    }

    /// The abort record for connection `conn` (dispatcher → worker).
    pub fn abort(conn: u64) -> RecordHeader {
        RecordHeader { conn, kind: RecordKind::Abort.code(), ..Default::default() }
    }

    /// The record telling a worker that `bytes` of its streamed response
    /// to `seq` on `conn` are in the client's socket (dispatcher → worker).
    pub fn written(conn: u64, seq: u32, bytes: u64) -> RecordHeader {
        RecordHeader { conn, seq, content_length: bytes, kind: RecordKind::Written.code(), ..Default::default() }
    }
}

/// Response frame bit: this frame ends the response.
pub const RESP_LAST: u32 = 1;
/// Response frame bit: close the connection after this response.
pub const RESP_CLOSE: u32 = 2;
/// Response frame bit (on the last frame): the worker asks for a lease on
/// the connection once this response is written.
pub const RESP_WANT_LEASE: u32 = 4;
/// Kind bit: a lease release (see [`WorkerFrame::Release`]).
pub const RESP_RELEASE: u32 = 8;
/// Kind bit: access-log records (see [`WorkerFrame::Log`]).
pub const RESP_LOG: u32 = 16;
/// Kind bit: the worker's counters (see [`WorkerFrame::Stats`]).
pub const RESP_STATS: u32 = 32;
/// Kind bit: the worker stopped pulling (see [`WorkerFrame::Stopped`]).
pub const RESP_STOPPED: u32 = 64;
/// Kind bit: request body bytes read (see [`WorkerFrame::BodyRead`]).
pub const RESP_BODY_READ: u32 = 128;
/// Response frame bit: the response is streamed and the worker sends its
/// next parts only as earlier ones are written to the client: answer each
/// frame, once written, with a `RecordKind::Written` record.
pub const RESP_STREAM: u32 = 256;

/// Response flag: the response is a `101 Switching Protocols` to an
/// upgrade the dispatcher held the connection for (`REC_UPGRADE`): once
/// it is written, the connection is the worker's ([`LeaseMsg::Tunnel`]).
pub const RESP_UPGRADE: u32 = 512;
/// Kind bit: a leased connection's client does not read its answers (see
/// [`WorkerFrame::Backlogged`]).
pub const RESP_BACKLOGGED: u32 = 1024;
/// The bits a response frame may carry; a frame with any other bit is a
/// report, and a report carries exactly one bit.
const RESPONSE_BITS: u32 = RESP_LAST | RESP_CLOSE | RESP_WANT_LEASE | RESP_STREAM | RESP_UPGRADE;

/// Upper bounds (µs) of the handling-time buckets of [`WorkerFrame::Stats`].
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];
/// Words in a [`WorkerFrame::Stats`] frame's data.
pub const STATS_WORDS: usize = 5 + LATENCY_BUCKETS_US.len() + 1 + 1;

/// Header of every frame a worker sends on its control socket; `len` data
/// bytes follow. [`WorkerFrame`] says what the frame is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameHeader {
    /// The connection (0 on a report that is not about one).
    pub conn: u64,
    /// The response's request number on it.
    pub seq: u32,
    /// Data bytes that follow.
    pub len: u32,
    /// `RESP_*` bits.
    pub flags: u32,
    /// The lease generation, on a release.
    pub lease: u32,
}

/// Bytes of a [`FrameHeader`].
pub const FRAME_HEADER_LEN: usize = core::mem::size_of::<FrameHeader>();
const _: () = assert!(FRAME_HEADER_LEN == 24);

// SAFETY: repr(C), Copy, no padding (size asserted above), any bit pattern.
unsafe impl Plain for FrameHeader {}

impl FrameHeader {
    /// The header as the bytes that precede the frame's data.
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_LEN] {
        plain::to_bytes(self)
    }

    /// Reads a header from the start of `b` (any alignment).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        plain::from_bytes(b)
    }
}

/// What one worker → dispatcher frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerFrame {
    /// (Part of) the response to request `seq` on `conn`; the data is
    /// response bytes.
    Response {
        conn: u64,
        seq: u32,
        /// This frame ends the response.
        last: bool,
        /// Close the connection after it.
        close: bool,
        /// (On the last frame) the worker asks for a lease on the
        /// connection once this response is written.
        want_lease: bool,
        /// Answer the frame with a `Written` record once it is in the
        /// client's socket (the worker's flow control for streamed
        /// responses).
        stream: bool,
        /// (On the last frame of a 101) hand the connection over once it
        /// is written ([`RESP_UPGRADE`]).
        upgrade: bool,
    },
    /// A lease given back (no data): the worker wrote every response
    /// before `seq` and none from `seq` on; `lease` is the generation given
    /// back.
    Release { conn: u64, seq: u32, lease: u32 },
    /// The worker stopped pulling (recycled, stopped or idle) and reads no
    /// more requests from the control socket; the dispatcher sends later
    /// ones to the next worker. No data.
    Stopped,
    /// The worker's counters since its last such frame: [`STATS_WORDS`]
    /// little-endian u64, responses by status class (1xx..5xx), then
    /// handling time (take to answer) per bucket of [`LATENCY_BUCKETS_US`]
    /// plus one over the last, then the sum in µs.
    Stats,
    /// The worker's application read `len` more body bytes of request
    /// `seq` on `conn` that the dispatcher forwarded over the control
    /// socket (in the frame's `lease` field; no data): the dispatcher reads
    /// the client's socket only while what it forwarded and was not read
    /// yet is under its window, so a large upload waits in TCP, not in
    /// memory.
    BodyRead { conn: u64, seq: u32, len: u32 },
    /// The client of leased connection `conn` does not read its answers:
    /// the worker holds past its limit of them unwritten (no data). The
    /// dispatcher pauses the connection in the kernel (`paused`), so its
    /// requests stop arriving until the client reads.
    Backlogged { conn: u64 },
    /// Access-log records of requests the worker answered, one per line,
    /// tab-separated: connection cookie, time answered (Unix ms), status,
    /// body bytes, handling time (µs), request line, Referer, User-Agent;
    /// the text fields escaped (printable ASCII but `"` and `\` kept, the
    /// rest as `\xHH`).
    Log,
}

impl WorkerFrame {
    /// The header of this frame with `len` data bytes following.
    pub fn encode(&self, len: u32) -> FrameHeader {
        let (conn, seq, flags, lease) = match *self {
            WorkerFrame::Response { conn, seq, last, close, want_lease, stream, upgrade } => {
                let bit = |on: bool, b: u32| if on { b } else { 0 };
                let flags = bit(last, RESP_LAST)
                    | bit(close, RESP_CLOSE)
                    | bit(want_lease, RESP_WANT_LEASE)
                    | bit(stream, RESP_STREAM)
                    | bit(upgrade, RESP_UPGRADE);
                (conn, seq, flags, 0)
            }
            WorkerFrame::BodyRead { conn, seq, len: n } => (conn, seq, RESP_BODY_READ, n),
            WorkerFrame::Release { conn, seq, lease } => (conn, seq, RESP_RELEASE, lease),
            WorkerFrame::Stopped => (0, 0, RESP_STOPPED, 0),
            WorkerFrame::Stats => (0, 0, RESP_STATS, 0),
            WorkerFrame::Log => (0, 0, RESP_LOG, 0),
            WorkerFrame::Backlogged { conn } => (conn, 0, RESP_BACKLOGGED, 0),
        };
        FrameHeader { conn, seq, len, flags, lease }
    }

    /// What the frame with header `h` is.
    pub fn decode(h: &FrameHeader) -> Result<WorkerFrame, DecodeError> {
        let unknown = Err(DecodeError::UnknownKind { what: "worker frame", kind: h.flags });
        if h.flags & !RESPONSE_BITS == 0 {
            return Ok(WorkerFrame::Response {
                conn: h.conn,
                seq: h.seq,
                last: h.flags & RESP_LAST != 0,
                close: h.flags & RESP_CLOSE != 0,
                want_lease: h.flags & RESP_WANT_LEASE != 0,
                stream: h.flags & RESP_STREAM != 0,
                upgrade: h.flags & RESP_UPGRADE != 0,
            });
        }
        match h.flags {
            RESP_RELEASE => Ok(WorkerFrame::Release { conn: h.conn, seq: h.seq, lease: h.lease }),
            RESP_STOPPED => Ok(WorkerFrame::Stopped),
            RESP_BODY_READ => Ok(WorkerFrame::BodyRead { conn: h.conn, seq: h.seq, len: h.lease }),
            RESP_STATS => Ok(WorkerFrame::Stats),
            RESP_LOG => Ok(WorkerFrame::Log),
            RESP_BACKLOGGED => Ok(WorkerFrame::Backlogged { conn: h.conn }),
            _ => unknown,
        }
    }
}

/// Lease message kind: [`LeaseMsg::Grant`].
pub const LEASE_GRANT: u32 = 1;
/// Lease message kind: [`LeaseMsg::Deny`].
pub const LEASE_DENY: u32 = 2;
/// Lease message kind: [`LeaseMsg::Revoke`].
pub const LEASE_REVOKE: u32 = 3;
/// Lease message kind: [`LeaseMsg::Forget`].
pub const LEASE_FORGET: u32 = 4;
/// Lease message kind: [`LeaseMsg::Tunnel`].
pub const LEASE_TUNNEL: u32 = 5;
/// Worker → dispatcher: [`LeaseMsg::Splice`].
pub const LEASE_SPLICE: u32 = 6;
/// The most client bytes a [`LeaseMsg::Tunnel`] carries after its record.
pub const TUNNEL_MAX_EARLY: usize = 64 << 10;

/// [`LeaseMsg::Grant`]'s `entry` when the worker gets no progress entry.
pub const NO_ENTRY: u32 = u32::MAX;

/// A lease message's bytes (fields a kind does not use are 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct LeaseRecord {
    conn: u64,
    /// `LEASE_*`.
    kind: u32,
    from: u32,
    gen: u32,
    entry: u32,
}

/// Bytes of one lease message.
pub const LEASE_MSG_LEN: usize = core::mem::size_of::<LeaseRecord>();
const _: () = assert!(LEASE_MSG_LEN == 24);

// SAFETY: repr(C), Copy, no padding (size asserted above), any bit pattern.
unsafe impl Plain for LeaseRecord {}

/// One message on the lease socket (dispatcher → worker); a grant carries
/// the connection's socket as SCM_RIGHTS ancillary data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseMsg {
    /// Here is the connection's socket: write its responses from `from`
    /// on, under lease generation `gen` (per connection), tracing them in
    /// the worker's progress entry `entry` (or [`NO_ENTRY`]).
    Grant { conn: u64, from: u32, gen: u32, entry: u32 },
    /// No lease for this connection now (the worker may ask again later);
    /// `from` is the dispatcher's next response on it.
    Deny { conn: u64, from: u32 },
    /// Give lease `gen` back (with a release frame on the control socket).
    Revoke { conn: u64, gen: u32 },
    /// The connection is gone: drop whatever is kept for it.
    Forget { conn: u64 },
    /// The connection is the worker's from now on (it answered an upgrade
    /// with 101): its socket comes as SCM_RIGHTS, and the bytes the client
    /// sent after the upgrade request that the dispatcher had read follow
    /// the record in the same message (at most [`TUNNEL_MAX_EARLY`]).
    /// The dispatcher forgets the connection.
    Tunnel { conn: u64 },
    /// Worker → dispatcher, for an upgrade request marked `REC_SPLICE`:
    /// the answer to request `seq` is a 101, whose `head_len` bytes follow
    /// the record, then what the app sent after its 101 that the worker
    /// had read (at most [`TUNNEL_MAX_EARLY`]); the app's socket comes as
    /// SCM_RIGHTS. The dispatcher writes the 101 and joins the client's
    /// socket and the app's in the kernel; the worker keeps nothing. With
    /// nothing either way for `idle_secs` (0: never), the tunnel closes.
    Splice { conn: u64, seq: u32, head_len: u32, idle_secs: u32 },
}

impl LeaseMsg {
    /// The connection the message is about.
    pub fn conn(&self) -> u64 {
        match *self {
            LeaseMsg::Grant { conn, .. }
            | LeaseMsg::Deny { conn, .. }
            | LeaseMsg::Revoke { conn, .. }
            | LeaseMsg::Forget { conn }
            | LeaseMsg::Tunnel { conn }
            | LeaseMsg::Splice { conn, .. } => conn,
        }
    }

    /// The message's bytes.
    pub fn encode(&self) -> [u8; LEASE_MSG_LEN] {
        let r = match *self {
            LeaseMsg::Grant { conn, from, gen, entry } => LeaseRecord { conn, kind: LEASE_GRANT, from, gen, entry },
            LeaseMsg::Deny { conn, from } => LeaseRecord { conn, kind: LEASE_DENY, from, ..Default::default() },
            LeaseMsg::Revoke { conn, gen } => LeaseRecord { conn, kind: LEASE_REVOKE, gen, ..Default::default() },
            LeaseMsg::Forget { conn } => LeaseRecord { conn, kind: LEASE_FORGET, ..Default::default() },
            LeaseMsg::Tunnel { conn } => LeaseRecord { conn, kind: LEASE_TUNNEL, ..Default::default() },
            LeaseMsg::Splice { conn, seq, head_len, idle_secs } => {
                LeaseRecord { conn, kind: LEASE_SPLICE, from: seq, gen: head_len, entry: idle_secs }
            }
        };
        plain::to_bytes(&r)
    }

    /// Reads a message from the start of `b`.
    pub fn decode(b: &[u8]) -> Result<LeaseMsg, DecodeError> {
        let r: LeaseRecord = plain::from_bytes(b).ok_or(DecodeError::Short {
            what: "lease message",
            len: b.len(),
            need: LEASE_MSG_LEN,
        })?;
        let LeaseRecord { conn, kind, from, gen, entry } = r;
        match kind {
            LEASE_GRANT => Ok(LeaseMsg::Grant { conn, from, gen, entry }),
            LEASE_DENY => Ok(LeaseMsg::Deny { conn, from }),
            LEASE_REVOKE => Ok(LeaseMsg::Revoke { conn, gen }),
            LEASE_FORGET => Ok(LeaseMsg::Forget { conn }),
            LEASE_TUNNEL => Ok(LeaseMsg::Tunnel { conn }),
            LEASE_SPLICE => Ok(LeaseMsg::Splice { conn, seq: from, head_len: gen, idle_secs: entry }),
            kind => Err(DecodeError::UnknownKind { what: "lease message", kind }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header's bytes, built field by field the way the old code laid
    /// them out (native order).
    fn frame_bytes(conn: u64, seq: u32, len: u32, flags: u32, lease: u32) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..8].copy_from_slice(&conn.to_ne_bytes());
        b[8..12].copy_from_slice(&seq.to_ne_bytes());
        b[12..16].copy_from_slice(&len.to_ne_bytes());
        b[16..20].copy_from_slice(&flags.to_ne_bytes());
        b[20..24].copy_from_slice(&lease.to_ne_bytes());
        b
    }

    fn resp(conn: u64, seq: u32, last: bool, close: bool, want_lease: bool, stream: bool) -> WorkerFrame {
        WorkerFrame::Response { conn, seq, last, close, want_lease, stream, upgrade: false }
    }

    #[test]
    fn worker_frames_round_trip_with_the_same_bytes_as_before() {
        let cases = [
            (resp(7, 3, true, false, true, false), 10, 7, 3, 1 | 4, 0),
            (resp(7, 3, false, false, false, false), 9, 7, 3, 0, 0),
            (resp(1, 0, true, true, false, false), 0, 1, 0, 1 | 2, 0),
            (resp(1, 0, false, false, false, true), 5, 1, 0, 256, 0),
            (WorkerFrame::BodyRead { conn: 3, seq: 1, len: 65536 }, 0, 3, 1, 128, 65536),
            (WorkerFrame::Backlogged { conn: 4 }, 0, 4, 0, 1024, 0),
            (WorkerFrame::Release { conn: 9, seq: 12, lease: 4 }, 0, 9, 12, 8, 4),
            (WorkerFrame::Stopped, 0, 0, 0, 64, 0),
            (WorkerFrame::Stats, 8 * STATS_WORDS as u32, 0, 0, 32, 0),
            (WorkerFrame::Log, 5, 0, 0, 16, 0),
        ];
        for (f, len, conn, seq, flags, lease) in cases {
            let bytes = f.encode(len).to_bytes();
            assert_eq!(bytes, frame_bytes(conn, seq, len, flags, lease), "{f:?}");
            let h = FrameHeader::from_bytes(&bytes).unwrap();
            assert_eq!(h.len, len);
            assert_eq!(WorkerFrame::decode(&h), Ok(f));
        }
    }

    #[test]
    fn worker_frames_of_unknown_kinds_are_rejected() {
        for flags in [2048, 1 << 31, RESP_STATS | RESP_LOG, RESP_RELEASE | RESP_LAST, RESP_STOPPED | RESP_WANT_LEASE] {
            let h = FrameHeader { flags, ..Default::default() };
            assert_eq!(WorkerFrame::decode(&h), Err(DecodeError::UnknownKind { what: "worker frame", kind: flags }));
        }
        assert!(FrameHeader::from_bytes(&[0; FRAME_HEADER_LEN - 1]).is_none());
    }

    #[test]
    fn lease_messages_round_trip_with_the_same_bytes_as_before() {
        let cases = [
            (LeaseMsg::Grant { conn: 5, from: 2, gen: 3, entry: 17 }, [1, 2, 3, 17]),
            (LeaseMsg::Grant { conn: 5, from: 2, gen: 3, entry: NO_ENTRY }, [1, 2, 3, u32::MAX]),
            (LeaseMsg::Deny { conn: 5, from: 8 }, [2, 8, 0, 0]),
            (LeaseMsg::Revoke { conn: 5, gen: 6 }, [3, 0, 6, 0]),
            (LeaseMsg::Forget { conn: 5 }, [4, 0, 0, 0]),
            (LeaseMsg::Tunnel { conn: 5 }, [5, 0, 0, 0]),
            (LeaseMsg::Splice { conn: 5, seq: 7, head_len: 130, idle_secs: 600 }, [6, 7, 130, 600]),
        ];
        for (m, words) in cases {
            let mut want = [0u8; LEASE_MSG_LEN];
            want[..8].copy_from_slice(&5u64.to_ne_bytes());
            for (i, w) in words.iter().enumerate() {
                want[8 + 4 * i..12 + 4 * i].copy_from_slice(&w.to_ne_bytes());
            }
            assert_eq!(m.encode(), want, "{m:?}");
            assert_eq!(LeaseMsg::decode(&want), Ok(m));
            assert_eq!(m.conn(), 5);
        }
    }

    #[test]
    fn lease_messages_of_unknown_kinds_or_short_are_rejected() {
        let mut b = LeaseMsg::Forget { conn: 1 }.encode();
        b[8..12].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(LeaseMsg::decode(&b), Err(DecodeError::UnknownKind { what: "lease message", kind: 9 }));
        b[8..12].copy_from_slice(&0u32.to_ne_bytes());
        assert!(LeaseMsg::decode(&b).is_err());
        assert_eq!(
            LeaseMsg::decode(&b[..10]),
            Err(DecodeError::Short { what: "lease message", len: 10, need: LEASE_MSG_LEN })
        );
    }

    #[test]
    fn record_kinds_round_trip_and_unknown_ones_are_rejected() {
        for k in [RecordKind::Head, RecordKind::Body, RecordKind::Abort, RecordKind::Wake, RecordKind::Written] {
            assert_eq!(RecordKind::decode(k.code()), Ok(k));
        }
        assert_eq!((RECORD_HEAD, RECORD_BODY, RECORD_ABORT, RECORD_WAKE, RECORD_WRITTEN), (1, 2, 3, 4, 5));
        for k in [0u8, 6, 255] {
            assert_eq!(RecordKind::decode(k), Err(DecodeError::UnknownKind { what: "record", kind: k as u32 }));
        }
        let a = RecordHeader::abort(42);
        let back = RecordHeader::from_bytes(&a.to_bytes()).unwrap();
        assert_eq!((back.conn, back.record_kind(), back.len, back.flags), (42, Ok(RecordKind::Abort), 0, 0));
        let w = RecordHeader::from_bytes(&RecordHeader::written(7, 3, 65536).to_bytes()).unwrap();
        assert_eq!(
            (w.conn, w.seq, w.record_kind(), w.content_length, w.len),
            (7, 3, Ok(RecordKind::Written), 65536, 0)
        );
    }
}
