//! Spliced tunnels: after a `101 Switching Protocols`, the bytes of the
//! client's socket go straight into the app's socket and back, redirected
//! by the stream verdicts (`classify` for the client's socket in `conns`,
//! `tunnel` for the app's in `tunnels`) instead of being copied through
//! user space twice each way.
//!
//! A segment is redirected only when user space has forwarded everything
//! the verdict passed to it before (`TunnelCtl::taken` equals the count
//! of passed bytes) and the tunnel's in-flight limit allows; otherwise it
//! is passed to user space, which forwards it itself once the kernel's
//! redirected bytes have reached the other socket's send queue. So bytes
//! arrive in order whoever moves them, and the kernel never holds more
//! than `limit` of a tunnel's bytes outside a socket's buffers (a
//! redirected segment opens the sender's TCP window at once).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::generated::bpf_get_socket_cookie,
    macros::stream_verdict,
    programs::SkBuffContext,
};
use dispatcher_ebpf::abi::{tunnel as counter, Event, EVENT_TUNNEL};

use crate::{
    maps::{conns, events, tunnel_ctl, tunnel_seen, tunnel_stats, tunnels},
    queue::atomic_add,
    retrans,
};

/// Which map the other socket of the tunnel is in.
pub enum Peer {
    /// An app's socket, in `tunnels` (the segment is a client's).
    App,
    /// A client's socket, in `conns` (the segment is an app's).
    Client,
}

/// The stream verdict of the app's sockets in `tunnels`.
#[stream_verdict]
pub fn tunnel(ctx: SkBuffContext) -> u32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let Some(seen) = tunnel_seen.get_ptr_mut(cookie) else {
        return SK_PASS;
    };
    // SAFETY: this socket's value; its segments are processed one at a
    // time (the socket is locked).
    let seen = unsafe { &mut *seen };
    if let retrans::Fresh::Nothing = retrans::trim_old(&ctx, &mut seen.tcp_known, &mut seen.tcp_next) {
        return SK_DROP;
    }
    steer(&ctx, cookie, &mut seen.passed, &mut seen.redirected, Peer::Client)
}

/// Redirects the segment into the tunnel's other socket, or passes it to
/// user space, counting it in `passed` or `redirected` (the socket's
/// counters, kept by the program). A socket that is not a tunnel's passes
/// everything.
#[inline(always)]
pub fn steer(ctx: &SkBuffContext, cookie: u64, passed: &mut u64, redirected: &mut u64, peer: Peer) -> u32 {
    let len = ctx.len() as u64;
    // SAFETY: a read of a hash value that user space replaces whole.
    if let Some(ctl) = unsafe { tunnel_ctl.get(cookie) } {
        if *passed == ctl.taken && *redirected + len <= ctl.limit {
            let key = ctl.peer;
            let r = match peer {
                Peer::App => tunnels.redirect_skb(ctx, key, 0),
                Peer::Client => conns.redirect_skb(ctx, key, 0),
            };
            if r == SK_PASS as i64 {
                *redirected += len;
                count(counter::REDIRECTED, 1);
                count(counter::REDIRECTED_BYTES, len);
                return SK_PASS;
            }
            // The other socket is gone (closed): user space finds out.
        }
        count(counter::PASSED, 1);
        count(counter::PASSED_BYTES, len);
        *passed += len;
        // Lost only if the dispatcher stopped reading the ring; it also
        // looks at a tunnel's sockets every second.
        let _ = events.output(Event { cookie, kind: EVENT_TUNNEL, ring: 0 }, 0);
        return SK_PASS;
    }
    *passed += len;
    SK_PASS
}

#[inline(always)]
fn count(what: u32, n: u64) {
    if let Some(c) = tunnel_stats.get_ptr_mut(what) {
        // SAFETY: a per-CPU counter of this map.
        unsafe { atomic_add(c, n) };
    }
}
