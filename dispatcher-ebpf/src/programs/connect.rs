//! Tracks connections accepted on the dispatcher's port.
//!
//! Inserting sockets from user space after `accept()` would race with the
//! client: a request that arrived before the insert sits in the socket's
//! queue where the verdict program never sees it. The sockops callback for
//! a passively established connection runs inside the handshake, before any
//! data of the connection is processed, so every byte passes the verdict.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::maps::{config, conn_state, conns, zero_state};

#[sock_ops]
pub fn track_conn(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
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
    // SAFETY: `ops` is a valid bpf_sock_ops for this callback.
    if conns.update(&mut cookie, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64).is_err() {
        let _ = conn_state.remove(cookie);
    }
    1
}
