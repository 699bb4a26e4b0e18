//! The programs' maps. Names are lower case so `bpftool map show` lists
//! them readably; user space finds them by these names.
#![allow(non_upper_case_globals)]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{
        Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, SkStorage, SockHash,
    },
    macros::btf_map,
};
use dispatcher_ebpf::abi::{
    gate, reason, retrans, tunnel, verdict, Config, ConnState, Event, GuardConfig, LeaseHolder, PoolCounters, PoolInfo,
    RateState, RouteKeyData, RouteValue, SlowCounters, TunnelCtl, TunnelSeen, GUARD_MAX_CIDRS, GUARD_MAX_SOURCES,
    MAX_POOLS, MAX_RINGS, MAX_ROUTE_ENTRIES,
};

/// Connections accepted on the listening port, keyed by socket cookie.
/// The stream verdict program is attached to this map.
#[btf_map]
pub static conns: SockHash<u64, 65536> = SockHash::new();

/// The app's sockets of spliced tunnels, keyed by socket cookie (put in
/// by the dispatcher after a 101); the `tunnel` verdict is attached here.
#[btf_map]
pub static tunnels: SockHash<u64, 65536> = SockHash::new();

/// How each socket of a spliced tunnel is steered (see `abi::TunnelCtl`),
/// by socket cookie; written by the dispatcher.
#[btf_map]
pub static tunnel_ctl: HashMap<u64, TunnelCtl, 65536, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// The `tunnel` verdict's counters per app socket, by socket cookie.
#[btf_map]
pub static tunnel_seen: HashMap<u64, TunnelSeen, 65536, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Spliced tunnels' counters, by `abi::tunnel`.
#[btf_map]
pub static tunnel_stats: PerCpuArray<u64, { tunnel::COUNT as usize }> = PerCpuArray::new();

/// Per-connection framing state, keyed by socket cookie. Created by the
/// sockops program when the connection is established, deleted by the
/// dispatcher when it closes.
#[btf_map]
pub static conn_state: HashMap<u64, ConnState, 65536, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Connections user space paused, keyed by socket cookie: a client that
/// pipelines and does not read its answers. The verdict hands such a
/// connection to user space at its next head instead of framing on
/// (which would take the client's bytes, so TCP never pushed back).
#[btf_map]
pub static paused: HashMap<u64, u32, 65536, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Who may write into each client socket besides the dispatcher (see
/// `gate.rs`); keyed by the socket, set by the dispatcher with the
/// socket's fd.
#[btf_map]
pub static lease_holder: SkStorage<LeaseHolder> = SkStorage::new();

/// The lease gate's counters, by `abi::gate`.
#[btf_map]
pub static gate_stats: PerCpuArray<u64, { gate::COUNT as usize }> = PerCpuArray::new();

/// One all-zero `ConnState`: the value new connections start from (too
/// large to build on the BPF stack).
#[btf_map]
pub static zero_state: Array<ConnState, 1> = Array::new();

/// Host + path prefix → pool.
#[btf_map]
pub static routes: LpmTrie<RouteKeyData, RouteValue, { MAX_ROUTE_ENTRIES as usize }> = LpmTrie::new();

/// Pool → its ring slots and queue limit.
#[btf_map]
pub static pools: Array<PoolInfo, { MAX_POOLS as usize }> = Array::new();

/// Ring slot → the ring buffer its worker consumes. The inner rings are
/// created by the dispatcher, one per slot; the size here is the template's.
#[btf_map]
pub static rings: ArrayOfMaps<RingBuf<u8, { 1 << 22 }>, { MAX_RINGS as usize }> = ArrayOfMaps::new();

/// Ring slot → its worker's awake flag (one mmapable u32 per slot, the
/// worker holding only its own; see `abi::RING_AWAKE_YES`).
#[btf_map]
pub static ring_awake: ArrayOfMaps<Array<u32, 1, { BPF_F_MMAPABLE as usize }>, { MAX_RINGS as usize }> =
    ArrayOfMaps::new();

/// Global settings, index 0.
#[btf_map]
pub static config: Array<Config, 1> = Array::new();

/// Per-pool kernel counters; the last entry counts unrouted requests.
#[btf_map]
pub static pool_stats: PerCpuArray<PoolCounters, { MAX_POOLS as usize + 1 }> = PerCpuArray::new();

/// Hand-offs to the slow path, by `reason`.
#[btf_map]
pub static handoffs: PerCpuArray<u64, { reason::COUNT as usize }> = PerCpuArray::new();

/// Retransmitted segments with bytes already received, by
/// `abi::retrans` (see `retrans.rs`).
#[btf_map]
pub static retrans_stats: PerCpuArray<u64, { retrans::COUNT as usize }> = PerCpuArray::new();

/// Per-pool slow-path counters, written by the dispatcher.
#[btf_map]
pub static slow_stats: Array<SlowCounters, { MAX_POOLS as usize + 1 }> = Array::new();

/// Kernel → dispatcher events (`abi::Event`): connections just handed to
/// user space (the dispatcher stops polling a connection whose responses a
/// worker writes, since every received segment would wake it, even those
/// the kernel drops), and requests queued on a slot without a worker.
/// Sized for a burst: every head queued while a worker starts raises a
/// demand (24 bytes each with the ring's header), and a full ring would
/// drop hand-off events too.
#[btf_map]
pub static events: RingBuf<Event, { 1 << 20 }> = RingBuf::new();

/// The verdict program's continuation, tail-called once per request
/// after the first in a segment.
#[btf_map]
pub static steps: ProgramArray<1> = ProgramArray::new();

/// XDP guard: sources denied (IPv4, IPv6), by CIDR.
#[btf_map]
pub static guard_deny_v4: LpmTrie<[u8; 4], u8, { GUARD_MAX_CIDRS as usize }> = LpmTrie::new();
#[btf_map]
pub static guard_deny_v6: LpmTrie<[u8; 16], u8, { GUARD_MAX_CIDRS as usize }> = LpmTrie::new();
/// XDP guard: sources allowed, when the list is not empty.
#[btf_map]
pub static guard_allow_v4: LpmTrie<[u8; 4], u8, { GUARD_MAX_CIDRS as usize }> = LpmTrie::new();
#[btf_map]
pub static guard_allow_v6: LpmTrie<[u8; 16], u8, { GUARD_MAX_CIDRS as usize }> = LpmTrie::new();
/// XDP guard settings (entry 0).
#[btf_map]
pub static guard_config: Array<GuardConfig, 1> = Array::new();
/// XDP guard: each recent source's new-connection token bucket.
#[btf_map]
pub static guard_rate: LruHashMap<[u8; 16], RateState, { GUARD_MAX_SOURCES as usize }> = LruHashMap::new();
/// XDP guard: each source's open connections to the port (sockops keeps
/// it; only while `max_connections` is set).
#[btf_map]
pub static guard_conns: HashMap<[u8; 16], u64, { GUARD_MAX_SOURCES as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();
/// XDP guard: packets by verdict (`abi::verdict`), per CPU.
#[btf_map]
pub static guard_stats: PerCpuArray<u64, { verdict::COUNT as usize }> = PerCpuArray::new();
