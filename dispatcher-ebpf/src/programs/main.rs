//! The BPF programs of dispatcher.
//!
//! - `connect::track_conn` (sockops): puts each connection accepted on the
//!   listening port into the `conns` sockhash, at handshake time.
//! - `classify::classify` (sk_skb stream verdict on `conns`): frames HTTP
//!   requests, routes them, queues them on their pool's ring.
//! - `queue`: ring selection, record writes, counters.
//! - `retrans`: trims the old bytes of a retransmitted segment that
//!   overlaps what TCP already delivered.
//! - `gate::lease_gate` (sk_msg on `conns`): lets only the dispatcher and
//!   the current lease holder write into a client socket.
//! - `guard::guard` (XDP, on the interface when one is configured): drops
//!   packets to the service port from denied sources or over a source's
//!   new-connection rate, before the TCP stack.
//! - `tunnel::tunnel` (sk_skb stream verdict on `tunnels`) and
//!   `tunnel::steer` (called by `classify`): splice a tunnel's two sockets
//!   after a 101.
//! - `maps`: every map, with the names `bpftool` shows.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// Atomic adds on the BPF target (see queue::atomic_add).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics), allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod classify;
#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod gate;
#[cfg(target_arch = "bpf")]
mod guard;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod queue;
#[cfg(target_arch = "bpf")]
mod retrans;
#[cfg(target_arch = "bpf")]
mod tunnel;

/// Returns `n` (which must be in `1..=max`, `max` a power of two) in a
/// form whose range `1..=max` the verifier can see. The black box keeps
/// LLVM from folding the arithmetic away using what it knows of `n`.
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub(crate) fn bounded(n: u32, max: u32) -> u32 {
    ((core::hint::black_box(n).wrapping_sub(1)) & (max - 1)) + 1
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
