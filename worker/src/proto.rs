//! The control channel between the dispatcher and one worker: a Unix
//! stream socket the worker inherits (fd number in `DISPATCHER_CTL_FD`).
//!
//! Dispatcher → worker: requests the dispatcher's slow path framed, as
//! [`RecordHeader`] + `len` bytes, exactly like ring records but with
//! [`REC_SLOW`](dispatcher_ebpf::abi::REC_SLOW) set (and `len` not limited
//! to a ring record's size). A record of kind [`RECORD_ABORT`] tells the
//! worker the connection is gone: drop its partial requests.
//!
//! Worker → dispatcher: responses, as [`ResponseHeader`] + `len` bytes of
//! raw HTTP/1.1 response (status line, headers, body). A response may be
//! sent in several frames; the one with [`RESP_LAST`] ends it. The
//! dispatcher writes responses to the client in `seq` order per connection.
//!
//! **Leases** (the direct response path). A worker may write a
//! connection's responses straight into the client's socket instead of
//! sending them through the dispatcher. It asks with [`RESP_WANT_LEASE`] on
//! a response; once the dispatcher has written that response it answers on
//! the *lease socket* (a `SOCK_SEQPACKET` pair, fd in `DISPATCHER_LEASE_FD`)
//! with a [`LeaseMsg`]: a grant carries the connection's socket (SCM_RIGHTS)
//! and the first sequence number the worker now writes. While a worker holds
//! a lease it writes that connection's responses itself, strictly in `seq`
//! order; anything it cannot write in order (a gap, a response that closes
//! the connection, a slow-path request) makes it give the lease back first
//! with a [`RESP_RELEASE`] frame on the control socket, so the dispatcher
//! knows where the worker stopped before it writes anything itself. The
//! dispatcher revokes a lease when some other party (another pool, its slow
//! path, a time-out) has something to write on the connection.

pub use dispatcher_ebpf::abi::{
    RecordHeader, RECORD_BODY, RECORD_HEAD, RECORD_HEADER_LEN, REC_CLOSE, REC_LAST, REC_SLOW,
};

/// Record kind (dispatcher → worker): connection `conn` closed; forget its
/// partial requests.
pub const RECORD_ABORT: u8 = 3;

/// Response flag: this frame ends the response.
pub const RESP_LAST: u32 = 1;
/// Response flag: close the connection after this response.
pub const RESP_CLOSE: u32 = 2;
/// Response flag (on the last frame): the worker asks for a lease on the
/// connection once this response is written.
pub const RESP_WANT_LEASE: u32 = 4;
/// A lease release (no data): the worker wrote every response before
/// `seq` and none from `seq` on; `lease` names the lease given back.
pub const RESP_RELEASE: u32 = 8;
/// Not a response: access-log records of requests the worker answered
/// (conn and seq 0), one per line, tab-separated: connection cookie,
/// time answered (Unix ms), status, body bytes, handling time (µs),
/// request line, Referer, User-Agent; fields escaped by [`log_field`].
pub const RESP_LOG: u32 = 16;

/// Not a response: the worker's counters since its last such frame (conn
/// and seq 0), [`STATS_WORDS`] little-endian u64: responses by status
/// class (1xx..5xx), then handling time (take to answer) per bucket of
/// [`LATENCY_BUCKETS_US`] plus one over the last, then the sum in µs.
pub const RESP_STATS: u32 = 32;
/// Not a response: the worker stopped pulling (recycled, stopped or
/// idle) and reads no more requests from the control socket; the
/// dispatcher sends later ones to the next worker.
pub const RESP_STOPPED: u32 = 64;

/// Upper bounds (µs) of the handling-time buckets.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];
/// Words in a [`RESP_STATS`] frame.
pub const STATS_WORDS: usize = 5 + LATENCY_BUCKETS_US.len() + 1 + 1;

/// A request's text for an access-log record: printable ASCII kept, `"`,
/// `\` and anything else as `\xHH` (no tab, newline or quote survives).
pub fn log_field(out: &mut Vec<u8>, b: &[u8]) {
    for &c in b {
        if (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\' {
            out.push(c);
        } else {
            out.extend_from_slice(format!("\\x{c:02x}").as_bytes());
        }
    }
}

/// Header of a response frame on the control socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseHeader {
    pub conn: u64,
    pub seq: u32,
    /// Response bytes that follow.
    pub len: u32,
    /// `RESP_*` bits.
    pub flags: u32,
    /// The lease generation, on a [`RESP_RELEASE`] frame.
    pub lease: u32,
}

pub const RESPONSE_HEADER_LEN: usize = core::mem::size_of::<ResponseHeader>();

/// Largest frame either side accepts on the control socket.
pub const MAX_FRAME: usize = 1 << 20;

/// The environment variables a worker is started with (defined by the
/// process manager, which sets them).
pub use activation::env::{
    ACCESS_LOG as ENV_ACCESS_LOG, AWAKE_FD as ENV_AWAKE_FD, CTL_FD as ENV_CTL_FD,
    IDLE_TIMEOUT_SECS as ENV_IDLE_TIMEOUT_SECS, LEASE_FD as ENV_LEASE_FD, POOL as ENV_POOL,
    PROGRESS_FD as ENV_PROGRESS_FD, RECYCLE_REQUESTS as ENV_RECYCLE_REQUESTS, RING_FD as ENV_RING_FD,
};

impl ResponseHeader {
    pub fn to_bytes(&self) -> [u8; RESPONSE_HEADER_LEN] {
        // SAFETY: repr(C), no padding.
        unsafe { core::mem::transmute_copy(self) }
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < RESPONSE_HEADER_LEN {
            return None;
        }
        // SAFETY: every bit pattern is valid; unaligned read.
        Some(unsafe { core::ptr::read_unaligned(b.as_ptr() as *const ResponseHeader) })
    }
}

const _: () = assert!(RESPONSE_HEADER_LEN == 24);

/// Bytes a control-socket end buffers per read, and batches per write.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Writes everything sent on `rx` to `wr`, one `write` per wake-up for all
/// that was queued meanwhile (both ends of the control socket use it: the
/// per-frame syscall was the dispatcher's main cost), calling `written`
/// with each batch once the socket has it. Ends when `rx` closes or a
/// write fails, returning the error.
pub async fn write_batched<W: tokio::io::AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
    mut written: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut batch = Vec::new();
    while let Some(b) = rx.recv().await {
        // An empty message (no frame is empty) ends the writer once what
        // was queued before it is written.
        let mut end = b.is_empty();
        batch.clear();
        batch.extend_from_slice(&b);
        while !end {
            let Ok(more) = rx.try_recv() else { break };
            end = more.is_empty();
            batch.extend_from_slice(&more);
            if batch.len() >= BATCH_BYTES {
                break;
            }
        }
        if !batch.is_empty() {
            wr.write_all(&batch).await?;
            written(&batch);
        }
        if end {
            wr.flush().await?;
            return Ok(());
        }
    }
    Ok(())
}

/// Lease message kinds (dispatcher → worker, on the lease socket).
pub mod lease {
    /// Here is the connection's socket; write its responses from `from` on.
    pub const GRANT: u32 = 1;
    /// No lease for this connection now (the worker may ask again later).
    pub const DENY: u32 = 2;
    /// Give lease `gen` back (with a release frame on the control socket).
    pub const REVOKE: u32 = 3;
    /// The connection is gone: drop whatever is kept for it.
    pub const FORGET: u32 = 4;
}

/// One message on the lease socket; a grant carries the socket as
/// SCM_RIGHTS ancillary data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseMsg {
    pub conn: u64,
    /// A [`lease`] kind.
    pub kind: u32,
    /// GRANT: the first response the worker writes itself.
    pub from: u32,
    /// GRANT, REVOKE: the lease generation (per connection).
    pub gen: u32,
    /// GRANT: the worker's progress entry for this lease
    /// (`crate::progress`), or [`NO_SLOT`].
    pub slot: u32,
}

/// `LeaseMsg::slot` when there is no progress entry.
pub const NO_SLOT: u32 = u32::MAX;

pub const LEASE_MSG_LEN: usize = core::mem::size_of::<LeaseMsg>();
const _: () = assert!(LEASE_MSG_LEN == 24);

impl LeaseMsg {
    pub fn to_bytes(&self) -> [u8; LEASE_MSG_LEN] {
        // SAFETY: repr(C), no padding.
        unsafe { core::mem::transmute_copy(self) }
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < LEASE_MSG_LEN {
            return None;
        }
        // SAFETY: every bit pattern is valid; unaligned read.
        Some(unsafe { core::ptr::read_unaligned(b.as_ptr() as *const LeaseMsg) })
    }
}
