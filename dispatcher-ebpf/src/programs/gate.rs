//! The lease gate (sk_msg on `conns`): only the dispatcher and the
//! current lease holder may write into a client socket.
//!
//! A worker that holds a lease has its own descriptor of the client's
//! socket (passed with the grant), and nothing in the socket layer takes
//! it back when the lease moves on: a compromised worker could keep it
//! and write into a connection that is no longer its own. HTTP.sys never
//! hands w3wp the connection at all; here the kernel checks every
//! `sendmsg`, `sendfile` and `splice` into the socket instead: the
//! writer's process (`bpf_get_current_pid_tgid`) must be the dispatcher
//! (`Config::dispatcher_tgid`) or the holder the dispatcher recorded in
//! the socket's `lease_holder` storage. Anything else is dropped (the
//! writer gets EACCES), counted, and reported on `events` so that the
//! dispatcher closes the connection: after one drop verdict the kernel
//! refuses every later write on that socket without asking the program
//! again (see ../shared/DESIGN.md), so the connection cannot go on.
//!
//! No kernel thread writes into these sockets (nothing redirects into
//! them), so the check needs no exception for one.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::{bpf_get_current_pid_tgid, generated::bpf_sk_storage_get},
    macros::sk_msg,
    programs::SkMsgContext,
};
use dispatcher_ebpf::abi::{gate, Event, LeaseHolder, EVENT_WRITE_REFUSED};

use crate::{
    maps::{config, events, gate_stats, lease_holder},
    queue::atomic_add,
};

#[sk_msg]
pub fn lease_gate(ctx: SkMsgContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if config.get(0).is_some_and(|c| c.dispatcher_tgid == tgid) {
        return SK_PASS;
    }
    // SAFETY: the context is the kernel's sk_msg_md; `sk` is its socket
    // (checked for null below).
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    let mut cookie = 0;
    if !sk.is_null() {
        let map = core::ptr::from_ref(&lease_holder).cast_mut().cast::<c_void>();
        // SAFETY: a socket storage lookup (no create) on the message's own
        // socket; the value is a LeaseHolder or null.
        let h = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) } as *const LeaseHolder;
        if !h.is_null() {
            // SAFETY: non-null storage of the map's value type.
            let h = unsafe { &*h };
            if h.tgid != 0 && h.tgid == tgid {
                return SK_PASS;
            }
            cookie = h.cookie;
        }
    }
    count(gate::REFUSED, 1);
    count(gate::REFUSED_BYTES, ctx.size() as u64);
    if cookie != 0 {
        let _ = events.output(Event { cookie, kind: EVENT_WRITE_REFUSED, ring: tgid }, 0);
    }
    SK_DROP
}

fn count(what: u32, n: u64) {
    if let Some(c) = gate_stats.get_ptr_mut(what) {
        // SAFETY: a per-CPU counter of this map.
        unsafe { atomic_add(c, n) };
    }
}
