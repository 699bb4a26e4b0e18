//! The binary interface between the BPF programs, the dispatcher and the
//! workers: map keys and values, ring records, counters.
//!
//! Every type is `#[repr(C)]`, has no padding the kernel could leave
//! uninitialised, and is `Copy`, so user space can read and write it as
//! plain bytes. Sizes are fixed: changing one is an ABI change for the
//! dispatcher, the worker library and the programs at once. What the
//! dispatcher and a worker say to each other over their sockets is in the
//! `wire` module, which builds on these records.

use crate::plain::{self, Plain};
use crate::scan::Scanner;
// Part of the ABI, defined in a leaf module because the scanner uses them too.
pub use crate::limits::{MAX_CONTENT_LENGTH, PATH_KEY_MAX, WILDCARD_HOST};

/// Head bytes the kernel frames itself. A request head (request line,
/// headers and the blank line) longer than this takes the slow path.
/// A power of two so indices can be masked for the verifier.
pub const HEAD_MAX: usize = 4096;

/// Body bytes carried by one ring record.
pub const BODY_CHUNK: usize = 4096;

/// Rings: one per worker slot of a pool (per (pool, worker) pair), indexed
/// globally in `rings` and `ring_awake`. Pools are numbered from 0.
pub const MAX_RINGS: u32 = 64;

/// Pools the route table can name.
pub const MAX_POOLS: u32 = 64;

/// Entries the route table holds (a route takes one, or two when its
/// prefix does not end with `/`).
pub const MAX_ROUTE_ENTRIES: u32 = 1 << 18;

/// Bytes of route-key data: a 64-bit host hash, then the path bytes.
pub const ROUTE_KEY_LEN: usize = 8 + PATH_KEY_MAX;

/// [`RecordHeader::content_length`] of a head whose body the client sent
/// chunked (control socket only: the kernel hands chunked bodies to the
/// slow path): the body records follow de-chunked, and the one with
/// `REC_LAST` ends it.
pub const LENGTH_UNKNOWN: u64 = u64::MAX;

/// Kind of a [`RecordHeader`]: the record carries the request head.
pub const RECORD_HEAD: u8 = 1;
/// Kind of a [`RecordHeader`]: the record carries body bytes.
pub const RECORD_BODY: u8 = 2;
/// Kind of a [`RecordHeader`], only on a worker's control socket
/// (dispatcher → worker; no data): connection `conn` closed, forget its
/// partial requests.
pub const RECORD_ABORT: u8 = 3;
/// Kind of a [`RecordHeader`]: no request data; written only to wake a
/// worker that went to sleep while a record was being queued without a
/// wake-up (see `RING_AWAKE_*`). Consumers skip it.
pub const RECORD_WAKE: u8 = 4;
/// Kind of a [`RecordHeader`], only on a worker's control socket
/// (dispatcher → worker; no data): `content_length` bytes of a streamed
/// response to request `seq` on `conn` were written to the client (the
/// worker's send window for it opens by that much).
pub const RECORD_WRITTEN: u8 = 5;

/// Value of a slot's `ring_awake` flag while its worker is draining the
/// ring: records are queued without a wake-up (no irq_work interrupt per
/// record). The worker stores [`RING_AWAKE_NO`] before it sleeps and then
/// looks at the ring once more; a producer that read "awake" re-reads the
/// flag after its commit and, if the worker went to sleep meanwhile,
/// queues a [`RECORD_WAKE`] with a forced wake-up. Either the worker sees
/// the record or the producer sees the flag: no wake-up is lost.
pub const RING_AWAKE_YES: u32 = 1;
/// See [`RING_AWAKE_YES`].
pub const RING_AWAKE_NO: u32 = 0;
/// The slot has no running worker (the dispatcher sets it): a head queued
/// there also raises an [`EVENT_DEMAND`], which starts one (on-demand
/// start without polling).
pub const RING_AWAKE_NO_WORKER: u32 = 2;

/// One record of the `events` ring (kernel → dispatcher).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The connection's socket cookie ([`EVENT_HANDOFF`]).
    pub cookie: u64,
    /// `EVENT_*`.
    pub kind: u32,
    /// The ring ([`EVENT_DEMAND`]).
    pub ring: u32,
}

/// The verdict handed connection `cookie` to user space.
pub const EVENT_HANDOFF: u32 = 1;
/// A request was queued on `slot`, which has no worker.
pub const EVENT_DEMAND: u32 = 2;

/// Record flag: this record completes the request.
pub const REC_LAST: u8 = 1;
/// Record flag: the client asked to close the connection after this
/// request (`Connection: close`, or HTTP/1.0 without keep-alive).
pub const REC_CLOSE: u8 = 2;
/// Record flag: the request was framed by the dispatcher's slow path.
pub const REC_SLOW: u8 = 4;
/// Record flag (a body record of a chunked body, from the slow path): the
/// data is the body's trailer section (field lines, each ending in CRLF),
/// not body bytes.
pub const REC_TRAILERS: u8 = 8;
/// Head record flag: an upgrade request (`Connection: upgrade`, `Upgrade`,
/// no body) the dispatcher holds the connection for: a `101` to it
/// (sent with `RESP_UPGRADE`) makes the connection the worker's; any other
/// answer lets the connection go on as HTTP.
pub const REC_UPGRADE: u8 = 16;
/// Head record flag, with `REC_UPGRADE`: the dispatcher can splice the
/// connection in the kernel after a 101 (see `TunnelCtl`); a worker whose
/// app answers on a TCP socket sends that socket back with the 101
/// (`wire::LeaseMsg::Splice`) instead of taking the client's.
pub const REC_SPLICE: u8 = 32;

/// Header of every request record, in a ring or on a worker's control
/// socket. `len` data bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// The connection: its socket cookie.
    pub conn: u64,
    /// Request number on the connection, from 0. Responses are written back
    /// in this order.
    pub seq: u32,
    /// Data bytes that follow the header.
    pub len: u32,
    /// On a head record: the body length the request announced, or
    /// [`LENGTH_UNKNOWN`] for a body the client sent chunked. On a body
    /// record: the body bytes still to come before this record's (its
    /// offset from the end), so the worker can tell a record out of order
    /// from the next one; [`LENGTH_UNKNOWN`] for a chunked body.
    pub content_length: u64,
    /// A `RECORD_*` kind (typed: `wire::RecordKind`).
    pub kind: u8,
    /// `REC_*` bits.
    pub flags: u8,
    /// On a head record: the client's port (0: unknown).
    pub peer_port: u16,
    /// On a head record: the client's IPv4 address, its octets in order
    /// (network byte order; 0: unknown).
    pub peer_ip4: u32,
}

pub const RECORD_HEADER_LEN: usize = core::mem::size_of::<RecordHeader>();
const _: () = assert!(RECORD_HEADER_LEN == 32);

// SAFETY: repr(C), Copy, no padding (size asserted above), any bit pattern.
unsafe impl Plain for RecordHeader {}

impl RecordHeader {
    /// The header as the bytes that precede a record's data.
    pub fn to_bytes(&self) -> [u8; RECORD_HEADER_LEN] {
        plain::to_bytes(self)
    }

    /// Reads a header from the start of `b` (any alignment).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        plain::from_bytes(b)
    }
}

/// A record whose data is a request head.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HeadRecord {
    pub hdr: RecordHeader,
    pub data: [u8; HEAD_MAX],
}

/// A record whose data is (part of) a request body.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BodyRecord {
    pub hdr: RecordHeader,
    pub data: [u8; BODY_CHUNK],
}

/// Connection mode: the kernel is looking for the next request head.
pub const MODE_HEAD: u32 = 0;
/// Connection mode: the kernel is copying the body of request `seq`.
pub const MODE_BODY: u32 = 1;
/// Connection mode: user space owns the byte stream from the hand-off point.
pub const MODE_SLOW: u32 = 2;
/// Connection mode: the client asked to close; later bytes are discarded.
pub const MODE_DRAIN: u32 = 3;

/// Why the kernel handed a connection to the slow path (index into
/// the `HANDOFFS` counters).
pub mod reason {
    /// The head is longer than [`super::HEAD_MAX`].
    pub const HEAD_TOO_LARGE: u32 = 1;
    /// The scanner met something it does not frame itself (see
    /// [`crate::scan::slow`]).
    pub const UNSUPPORTED: u32 = 2;
    /// Content-Length above the configured fast-path body limit.
    pub const BODY_TOO_LARGE: u32 = 3;
    /// The pool's queue is full: the slow path answers 503.
    pub const QUEUE_FULL: u32 = 4;
    /// No route matched: the slow path answers 404.
    pub const NO_ROUTE: u32 = 5;
    /// The pool has no ring (misconfiguration, or a ring lookup failed).
    pub const NO_RING: u32 = 6;
    /// More requests in one segment than the program's tail-call budget.
    pub const TOO_MANY_STEPS: u32 = 7;
    /// The ring filled up while a body was being copied.
    pub const RING_FULL_MID_BODY: u32 = 8;
    /// A helper failed (reading the segment, allocating state).
    pub const INTERNAL: u32 = 9;
    /// User space paused the connection (`paused`): its client has too
    /// many answers it has not read; the next head goes to user space,
    /// which stops reading until the client catches up.
    pub const PAUSED: u32 = 10;
    /// Number of reasons, for sizing the counters array.
    pub const COUNT: u32 = 11;

    /// Name of a reason, for the CLI and logs.
    pub fn name(r: u32) -> &'static str {
        match r {
            HEAD_TOO_LARGE => "head_too_large",
            UNSUPPORTED => "unsupported",
            BODY_TOO_LARGE => "body_too_large",
            QUEUE_FULL => "queue_full",
            NO_ROUTE => "no_route",
            NO_RING => "no_ring",
            TOO_MANY_STEPS => "too_many_steps",
            RING_FULL_MID_BODY => "ring_full_mid_body",
            INTERNAL => "internal",
            PAUSED => "paused",
            _ => "none",
        }
    }
}

/// Per-connection framing state, keyed by socket cookie in `CONN_STATE`.
///
/// The kernel writes it; user space reads it once when a connection is
/// handed to the slow path, and deletes it when the connection closes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnState {
    /// `MODE_*`.
    pub mode: u32,
    /// Sequence number of the request being framed (= requests framed so far).
    pub seq: u32,
    /// Ring of the request whose body is being copied.
    pub ring: u32,
    /// Pool of that request.
    pub pool: u32,
    /// Head bytes of the current request buffered in `rec.data`.
    pub head_len: u32,
    /// MODE_SLOW: bytes at the start of the first passed segment that the
    /// kernel already consumed; user space skips them.
    pub handoff_skip: u32,
    /// MODE_SLOW: bytes of `rec.data` that precede the first passed
    /// segment; user space parses them before the socket's bytes.
    pub handoff_prefix: u32,
    /// MODE_SLOW: a `reason::*`.
    pub handoff_reason: u32,
    /// MODE_SLOW with QUEUE_FULL / NO_ROUTE: the pool the request routed to.
    pub handoff_pool: u32,
    /// Request flags (`REC_CLOSE`) of the request whose body is being copied.
    pub req_flags: u32,
    /// Offset in the segment being processed where the next step starts
    /// (kept across the verdict program's tail calls; per connection, not
    /// per CPU, because a verdict may be interrupted by another socket's).
    pub seg_off: u32,
    /// TCP sequence number one past the last byte the program has seen
    /// (valid once `tcp_known` is nonzero): a retransmitted segment that
    /// overlaps it has its old bytes trimmed (see `retrans`).
    pub tcp_next: u32,
    pub tcp_known: u32,
    /// The client's address (as in `RecordHeader`), set by the sockops
    /// program; copied into each head record.
    pub peer_ip4: u32,
    pub peer_port: u32,
    pub _pad: u32,
    /// Body bytes of request `seq` still to copy.
    pub body_left: u64,
    /// When (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) the current head's first
    /// bytes or the current body began: the header time-out counts from
    /// the first byte of a head, not from the last (a drip-fed head is cut
    /// at the limit), and a body's rate is its bytes over this age.
    pub since_ns: u64,
    /// MODE_SLOW: bytes the verdict passed to user space since the
    /// hand-off (its segment included). User space has read all of them
    /// when its own count of bytes read is this: only then may a tunnel
    /// redirect the next segment past it (see `TunnelCtl`).
    pub slow_passed: u64,
    /// Bytes the verdict redirected into the tunnel's other socket.
    pub tun_redirected: u64,
    /// Scanner state for the head being framed.
    pub scan: Scanner,
    /// The head being assembled, laid out as the ring record it becomes.
    pub rec: HeadRecord,
    /// Route lookup key of the request being routed.
    pub key: LpmKey,
    /// Room after `rec.data` so a copy of up to `HEAD_MAX` bytes at any
    /// offset below `HEAD_MAX` stays inside the value, which is what the
    /// verifier can check.
    pub spill: [u8; HEAD_MAX],
}

/// A route: which pool serves matching requests.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteValue {
    pub pool: u32,
    pub _pad: u32,
}

/// A route-table key as the LPM trie takes it: prefix length in bits,
/// then the data.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LpmKey {
    pub prefix_len: u32,
    pub data: RouteKeyData,
}

/// Data part of a route-table (LPM trie) key: host hash (little endian),
/// then path bytes, then a 0 byte when the path ended inside the key.
pub type RouteKeyData = [u8; ROUTE_KEY_LEN];

/// Where a pool's requests go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolInfo {
    /// The ring of the pool's slot 0 (slot k's is `first_ring + k`).
    pub first_ring: u32,
    /// Number of slots (workers) of the pool; 0 means the pool is stopped.
    pub slots: u32,
    /// Queue limit in bytes of queued records per slot; above it the
    /// request gets 503 from the slow path.
    pub queue_bytes: u32,
    /// Web garden: a slot without a worker counts as this many bytes more
    /// queued, so a new request goes to a running worker unless every
    /// running one has at least this much waiting (its queue grows), and
    /// only then starts another. 0: spread over all slots at once.
    pub scale_out_bytes: u32,
}

/// Global settings of the programs, in `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Largest Content-Length the kernel copies itself; larger bodies take
    /// the slow path.
    pub max_fast_body: u64,
    /// The dispatcher's listening port (host byte order); the sockops
    /// program only tracks connections accepted on it.
    pub listen_port: u32,
    /// Nonzero when the programs may take the fast path at all.
    pub enabled: u32,
    /// The dispatcher's process id (its tgid in the initial pid
    /// namespace): the lease gate lets it write into any client socket.
    pub dispatcher_tgid: u32,
    pub _pad: u32,
}

/// Who may write into a client socket besides the dispatcher: the value
/// of the `lease_holder` socket storage, set by the dispatcher when it
/// grants a lease (or hands an upgraded connection over) and cleared when
/// the lease comes back. A socket without one is the dispatcher's alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The connection's socket cookie (for the dispatcher's event when a
    /// write is refused: sk_msg programs cannot ask for the cookie).
    pub cookie: u64,
    /// The holder's process id; 0 while the lease is home.
    pub tgid: u32,
    pub _pad: u32,
}

/// The lease gate refused a write into connection `cookie`; `ring` holds
/// the writer's process id. The socket refuses every later write too (the
/// kernel keeps an sk_msg drop verdict for the socket), so the dispatcher
/// closes the connection.
pub const EVENT_WRITE_REFUSED: u32 = 3;

/// Bytes were passed to user space on a spliced socket (`cookie`): the
/// dispatcher reads them and forwards them itself, in order.
pub const EVENT_TUNNEL: u32 = 4;

/// How user space steers one socket of a spliced tunnel (`tunnel_ctl`,
/// keyed by the socket's cookie; written by the dispatcher only).
///
/// The verdict redirects a segment into the socket `peer` (in `tunnels`
/// for a client's socket, in `conns` for an app's) only when user space
/// has read and forwarded every byte passed to it before (`taken` equals
/// the program's count of passed bytes) and the redirected bytes stay
/// within `limit`; otherwise it passes the segment to user space.
/// Ordering: a passed byte is always older than a redirected one, and
/// user space forwards what it read only after the kernel's redirected
/// bytes have reached the peer's send queue. Memory: a redirect is queued
/// without limit in the kernel (it opens the sender's window at once), so
/// `limit` bounds what a tunnel can have in flight there; past it the
/// bytes wait in the receive queue, whose window closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelCtl {
    pub peer: u64,
    pub taken: u64,
    pub limit: u64,
}

/// The verdict's counters for an app's socket in `tunnels` (in
/// `tunnel_seen`, created zeroed by the dispatcher before the socket goes
/// into the map; written by the program only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelSeen {
    /// Bytes passed to user space.
    pub passed: u64,
    /// Bytes redirected into the client's socket.
    pub redirected: u64,
    /// As in `ConnState` (retransmitted bytes are trimmed here too).
    pub tcp_next: u32,
    pub tcp_known: u32,
}

/// Counters of spliced tunnels (`tunnel_stats`), by index.
pub mod tunnel {
    /// Segments redirected from one socket of a tunnel into the other.
    pub const REDIRECTED: u32 = 0;
    pub const REDIRECTED_BYTES: u32 = 1;
    /// Segments passed to user space instead (before the tunnel caught up,
    /// or past its in-flight limit).
    pub const PASSED: u32 = 2;
    pub const PASSED_BYTES: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Counters of the lease gate (`gate_stats`), by index.
pub mod gate {
    /// Writes refused: neither the dispatcher nor the lease holder.
    pub const REFUSED: u32 = 0;
    /// Bytes in them.
    pub const REFUSED_BYTES: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Per-pool counters kept by the kernel, one per-CPU entry per pool.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounters {
    /// Requests framed and queued by the kernel.
    pub fast_requests: u64,
    /// Body bytes queued by the kernel.
    pub fast_body_bytes: u64,
    /// Requests the kernel found the pool's queue full for.
    pub queue_full: u64,
    /// Connections handed to the slow path while routed to this pool.
    pub slow_handoffs: u64,
}

/// Per-pool counters kept by the dispatcher's slow path, written by user
/// space into the `SLOW_STATS` array so `bpftool` shows both sides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlowCounters {
    /// Requests parsed in user space (httparse) and sent to the pool.
    pub parsed_requests: u64,
    /// Requests answered with an error by the dispatcher itself.
    pub errors: u64,
}

/// Counters of the segments TCP delivered with bytes it had delivered
/// before (a retransmission that overlaps what arrived; see
/// `programs/retrans.rs`), indices in the per-CPU `retrans_stats` array.
pub mod retrans {
    /// Segments whose old leading bytes were trimmed.
    pub const TRIMMED: u32 = 0;
    /// Old bytes trimmed from them.
    pub const TRIMMED_BYTES: u32 = 1;
    /// Segments of old bytes only, dropped.
    pub const DROPPED: u32 = 2;
    /// Segments whose old bytes could not be trimmed (the trim failed for
    /// memory); their old bytes were skipped, or on the slow path passed.
    pub const UNTRIMMED: u32 = 3;
    /// Segments whose TCP sequence numbers could not be read (the check
    /// is off for them).
    pub const NO_SEQ: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// Index in `POOL_COUNTERS` / `SLOW_STATS` for requests that matched no
/// route.
pub const UNROUTED: u32 = MAX_POOLS;

/// What the XDP guard decided about a packet: the index of its counter in
/// `guard_stats` (per CPU).
pub mod verdict {
    /// Not judged: not TCP to the service port (or not IP at all).
    pub const PASSED: u32 = 0;
    /// TCP to the service port from a source the lists and limits let in.
    pub const ALLOWED: u32 = 1;
    /// The source is on the deny list: dropped.
    pub const DENIED: u32 = 2;
    /// The allow list is not empty and the source is not on it: dropped.
    pub const NOT_ALLOWED: u32 = 3;
    /// A SYN over the source's new-connection rate: dropped.
    pub const RATE_LIMITED: u32 = 4;
    /// A SYN from a source with its most open connections: dropped.
    pub const TOO_MANY_CONNECTIONS: u32 = 5;
    pub const COUNT: u32 = 6;

    /// Name of a verdict, for the CLI.
    pub fn name(v: u32) -> &'static str {
        match v {
            PASSED => "passed",
            ALLOWED => "allowed",
            DENIED => "denied",
            NOT_ALLOWED => "not_allowed",
            RATE_LIMITED => "rate_limited",
            TOO_MANY_CONNECTIONS => "too_many_connections",
            _ => "unknown",
        }
    }
}

/// Most CIDRs per list and address family in the guard's tries.
pub const GUARD_MAX_CIDRS: u32 = 4096;
/// Sources whose new-connection rate the guard tracks at once (LRU).
pub const GUARD_MAX_SOURCES: u32 = 65536;

/// The XDP guard's settings, in `guard_config[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// The service's TCP port (host order); other traffic passes.
    pub port: u32,
    /// Entries in the IPv4 / IPv6 allow lists (0: all allowed).
    pub allow_v4: u32,
    pub allow_v6: u32,
    /// New connections (SYNs) per second and source; 0: no limit.
    pub syn_rate: u32,
    /// SYNs a source may send at once above the rate.
    pub syn_burst: u32,
    /// Open connections a source may have to the port (counted by the
    /// sockops program in `guard_conns`); 0: no limit.
    pub max_connections: u32,
}

/// A source's new-connection token bucket (`guard_rate`, keyed by its
/// IPv6 address or IPv4-mapped address). Tokens are counted in units of
/// 1e-9 SYN so that the refill (rate × elapsed ns) stays in integers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub tokens: u64,
    pub last_ns: u64,
}

/// An LPM-trie key of the guard's lists: prefix length, then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr4 {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

/// See [`Cidr4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr6 {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and valid for any bit pattern.
    unsafe impl aya::Pod for RecordHeader {}
    unsafe impl aya::Pod for ConnState {}
    unsafe impl aya::Pod for RouteValue {}
    unsafe impl aya::Pod for PoolInfo {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for LeaseHolder {}
    unsafe impl aya::Pod for TunnelCtl {}
    unsafe impl aya::Pod for TunnelSeen {}
    unsafe impl aya::Pod for PoolCounters {}
    unsafe impl aya::Pod for SlowCounters {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for GuardConfig {}
    unsafe impl aya::Pod for RateState {}
}
