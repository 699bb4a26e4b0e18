//! Tracks connections accepted on the dispatcher's port.
//!
//! Inserting sockets from user space after `accept()` would race with the
//! client: a request that arrived before the insert sits in the socket's
//! queue where the verdict program never sees it. The sockops callback for
//! a passively established connection runs inside the handshake, before any
//! data of the connection is processed, so every byte passes the verdict.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG},
    helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::maps::{config, conn_state, conns, guard_config, guard_conns, zero_state};

/// `BPF_TCP_CLOSE` (the state a closed socket reaches).
const TCP_CLOSE: u32 = 7;
const AF_INET: u32 = 2;

/// Reads a context field with one load at its constant offset (the
/// verifier refuses loads through a context pointer LLVM has moved).
macro_rules! field {
    ($ctx:expr, $($f:tt)+) => {
        // SAFETY: a field of the program's context.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx.ops).$($f)+)) }
    };
}

/// The peer's address as the guard keys it (IPv4-mapped), for an IPv4
/// connection (the listener is IPv4 only; others are not counted).
#[inline(always)]
fn peer(ctx: &SockOpsContext) -> Option<[u8; 16]> {
    if field!(ctx, family) != AF_INET {
        return None;
    }
    Some(crate::guard::v4_mapped(field!(ctx, remote_ip4).to_ne_bytes()))
}

/// Counts the guard's open connections per source, when it limits them:
/// +1 at establishment (asking for state callbacks), -1 at close.
#[inline(always)]
fn count_connection(ctx: &SockOpsContext, op: u32) {
    if op == BPF_SOCK_OPS_STATE_CB {
        // SAFETY: args is the union's array in a state callback.
        if field!(ctx, __bindgen_anon_1.args[1]) != TCP_CLOSE {
            return;
        }
        let Some(key) = peer(ctx) else { return };
        if let Some(c) = guard_conns.get_ptr_mut(key) {
            // SAFETY: a value of the map; the last close removes it.
            unsafe {
                if *c <= 1 {
                    let _ = guard_conns.remove(key);
                } else {
                    // Minus one (BPF has an atomic add, no subtract).
                    crate::queue::atomic_add(c, u64::MAX);
                }
            }
        }
        return;
    }
    let Some(g) = guard_config.get(0) else { return };
    if g.max_connections == 0 || field!(ctx, local_port) != g.port {
        return;
    }
    let Some(key) = peer(ctx) else { return };
    match guard_conns.get_ptr_mut(key) {
        // SAFETY: a value of the map.
        Some(c) => unsafe { crate::queue::atomic_add(c, 1) },
        None => {
            let _ = guard_conns.insert(key, 1, 0);
        }
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[sock_ops]
pub fn track_conn(ctx: SockOpsContext) -> u32 {
    let op = field!(ctx, op);
    if op == BPF_SOCK_OPS_STATE_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        count_connection(&ctx, op);
    }
    if op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    let Some(cfg) = config.get(0) else { return 1 };
    if cfg.enabled == 0 || ctx.local_port() != cfg.listen_port {
        return 1;
    }
    // SAFETY: `ops` is the program's context.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let Some(zero) = zero_state.get(0) else { return 1 };
    // The state first: the verdict program treats a socket without state
    // as one user space owns from its first byte.
    if conn_state.insert(cookie, zero, BPF_NOEXIST as u64).is_err() {
        return 1;
    }
    // Where the client's byte stream starts, so even its first data
    // segment is checked for old bytes (see `retrans`).
    // And who the client is, for the head records (`worker::ClientAddr`).
    if let Some(st) = conn_state.get_ptr_mut(cookie) {
        let rcv_nxt = field!(ctx, rcv_nxt);
        let ip4 = field!(ctx, remote_ip4);
        // Network byte order in the context's u32, the port in its first
        // two bytes.
        let port = u32::from_be(field!(ctx, remote_port));
        // SAFETY: the value just inserted; this callback owns the socket.
        unsafe {
            (*st).tcp_next = rcv_nxt;
            (*st).tcp_known = 1;
            (*st).peer_ip4 = ip4;
            (*st).peer_port = port;
        }
    }
    // SAFETY: `ops` is a valid bpf_sock_ops for this callback.
    if conns.update(&mut cookie, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64).is_err() {
        let _ = conn_state.remove(cookie);
    }
    1
}
