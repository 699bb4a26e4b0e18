//! The stream verdict: frames HTTP/1.x requests out of a connection's
//! segments and queues them on their pool's ring.
//!
//! Runs in "verdict-only" mode (no stream parser; see DESIGN.md): it sees
//! each received segment once, bytes at offset 0, and decides the whole
//! segment. SK_DROP after everything in it was queued (or buffered as a
//! partial head); SK_PASS hands the connection to user space from a point
//! recorded in `ConnState` (`handoff_skip` bytes of this segment already
//! consumed, `handoff_prefix` buffered head bytes to prepend).
//!
//! One invocation handles one step: a head, or a run of body bytes. When a
//! segment holds more, the program tail-calls itself (`steps[0]`) with the
//! segment offset in the connection's state, so the verifier sees one request's
//! worth of code and a segment may carry up to 32 pipelined requests.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_loop, bpf_skb_load_bytes},
    macros::stream_verdict,
    programs::SkBuffContext,
};
use dispatcher_ebpf::{
    abi::{
        reason, ConnState, Event, LpmKey, RouteKeyData, EVENT_HANDOFF, HEAD_MAX, MODE_BODY, MODE_DRAIN, MODE_HEAD,
        MODE_SLOW, REC_CLOSE, REC_LAST, UNROUTED,
    },
    route,
    scan::{Scanner, Step},
};

use crate::{
    maps::{config, conn_state, events, paused, routes, steps},
    queue, retrans, tunnel,
};

/// Result of one step.
enum Next {
    /// Continue at this segment offset.
    At(u32),
    /// Hand the connection to user space from segment offset `skip`.
    Handoff { reason: u32, pool: u32, skip: u32 },
}

#[stream_verdict]
pub fn classify(ctx: SkBuffContext) -> u32 {
    run(&ctx, true)
}

/// The same program, reached by tail call for the next step of a segment.
#[stream_verdict]
pub fn classify_step(ctx: SkBuffContext) -> u32 {
    run(&ctx, false)
}

#[inline(always)]
fn run(ctx: &SkBuffContext, first: bool) -> u32 {
    let skb = ctx.skb.skb;
    let cookie = unsafe { bpf_get_socket_cookie(skb as *mut c_void) };
    let Some(st) = conn_state.get_ptr_mut(cookie) else {
        // Not created by the sockops program: user space owns the
        // connection from its first byte.
        return SK_PASS;
    };
    // SAFETY: hash value of this connection; segments of one connection
    // are processed one at a time (the socket is locked).
    let st = unsafe { &mut *st };
    if first {
        st.seg_off = match retrans::trim_old(ctx, &mut st.tcp_known, &mut st.tcp_next) {
            retrans::Fresh::From(skip) => skip,
            // All seen before (and passed on or consumed then).
            retrans::Fresh::Nothing => return SK_DROP,
        };
    }
    let len = ctx.len();
    let off = st.seg_off;
    if off >= len {
        return SK_DROP;
    }
    let next = match st.mode {
        MODE_HEAD => head_step(ctx, st, cookie, off, len),
        MODE_BODY => body_step(ctx, st, cookie, off, len),
        MODE_DRAIN => return SK_DROP,
        // User space's (counted), or a spliced tunnel's.
        _ => return tunnel::steer(ctx, cookie, &mut st.slow_passed, &mut st.tun_redirected, tunnel::Peer::App),
    };
    match next {
        Next::At(off) => {
            if off >= len {
                return SK_DROP;
            }
            st.seg_off = off;
            // SAFETY: steps[0] holds classify_step, a program of this type.
            unsafe { steps.tail_call(ctx, 0) };
            // The tail-call budget is spent: user space takes the rest.
            handoff(st, cookie, reason::TOO_MANY_STEPS, UNROUTED, off, 0, len)
        }
        Next::Handoff { reason, pool, skip } => {
            let prefix = st.head_len;
            handoff(st, cookie, reason, pool, skip, prefix, len)
        }
    }
}

/// Gives the connection to user space from segment offset `skip`, after
/// `prefix` buffered head bytes; the segment (`len` bytes) is passed whole.
#[inline(always)]
fn handoff(st: &mut ConnState, cookie: u64, why: u32, pool: u32, skip: u32, prefix: u32, len: u32) -> u32 {
    st.mode = MODE_SLOW;
    st.slow_passed = len as u64;
    st.handoff_skip = skip;
    st.handoff_prefix = prefix;
    st.handoff_reason = why;
    st.handoff_pool = pool;
    queue::count_handoff(why, pool);
    // Lost only if the dispatcher stopped reading the ring; it then finds
    // the hand-off at its next idle check of the connection.
    let _ = events.output(Event { cookie, kind: EVENT_HANDOFF, ring: 0 }, 0);
    SK_PASS
}

/// Context of the scanner loop; lives on the stack because `bpf_loop`
/// wants its context there.
#[repr(C)]
struct LoopCtx {
    st: *mut ConnState,
    start: u32,
    result: u32,
}

const LOOP_MORE: u32 = 0;
const LOOP_DONE: u32 = 1;
const LOOP_SLOW: u32 = 2;

/// Scans one buffered head byte; `bpf_loop` callback, so the verifier
/// checks it once rather than once per byte.
#[inline(never)]
extern "C" fn scan_byte(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's LoopCtx; `st` was checked non-null.
    let c = unsafe { &mut *(ctx as *mut LoopCtx) };
    let st = unsafe { &mut *c.st };
    let idx = (c.start as usize + i as usize) & (HEAD_MAX - 1);
    let b = st.rec.data[idx];
    match st.scan.step(b, idx as u32) {
        Step::More => 0,
        Step::Done => {
            c.result = LOOP_DONE;
            1
        }
        Step::Slow(_) => {
            c.result = LOOP_SLOW;
            1
        }
    }
}

#[inline(always)]
fn head_step(ctx: &SkBuffContext, st: &mut ConnState, cookie: u64, off: u32, len: u32) -> Next {
    let old = st.head_len;
    // A head begins on a connection whose client reads too slowly: one map
    // lookup per request (an empty hash), the price of bounded memory.
    // SAFETY: a read of a hash value that is never written in place.
    if old == 0 && unsafe { paused.get(cookie) }.is_some() {
        return Next::Handoff { reason: reason::PAUSED, pool: UNROUTED, skip: off };
    }
    if old as usize >= HEAD_MAX {
        return Next::Handoff { reason: reason::HEAD_TOO_LARGE, pool: UNROUTED, skip: off };
    }
    let room = HEAD_MAX as u32 - old;
    let avail = len - off;
    let n = if avail < room { avail } else { room };
    if n == 0 {
        return Next::Handoff { reason: reason::INTERNAL, pool: UNROUTED, skip: off };
    }
    // Same value for n in 1..=HEAD_MAX, in a form whose range the verifier
    // can see.
    let n = crate::bounded(n, HEAD_MAX as u32);
    let at = (old as usize) & (HEAD_MAX - 1);
    // SAFETY: at < HEAD_MAX and n <= HEAD_MAX, and `spill` follows
    // `rec.data`, so the destination stays inside the map value.
    let ret = unsafe {
        bpf_skb_load_bytes(ctx.skb.skb as *const c_void, off, st.rec.data.as_mut_ptr().add(at) as *mut c_void, n)
    };
    if ret != 0 {
        return Next::Handoff { reason: reason::INTERNAL, pool: UNROUTED, skip: off };
    }
    if old == 0 {
        st.scan = Scanner::new();
        // SAFETY: a helper every program type may call.
        st.since_ns = unsafe { bpf_ktime_get_ns() };
    }
    let mut lc = LoopCtx { st: st as *mut ConnState, start: old, result: LOOP_MORE };
    // SAFETY: scan_byte matches the callback signature bpf_loop expects.
    unsafe {
        bpf_loop(n, scan_byte as *mut c_void, &mut lc as *mut LoopCtx as *mut c_void, 0);
    }
    match lc.result {
        LOOP_DONE => {}
        LOOP_SLOW => return Next::Handoff { reason: reason::UNSUPPORTED, pool: UNROUTED, skip: off },
        _ => {
            if old + n >= HEAD_MAX as u32 {
                return Next::Handoff { reason: reason::HEAD_TOO_LARGE, pool: UNROUTED, skip: off };
            }
            // The head continues in a later segment.
            st.head_len = old + n;
            return Next::At(off + n);
        }
    }
    let end = st.scan.end;
    if end <= old || end as usize > HEAD_MAX {
        return Next::Handoff { reason: reason::INTERNAL, pool: UNROUTED, skip: off };
    }
    let cl = st.scan.content_length;
    let Some(cfg) = config.get(0) else {
        return Next::Handoff { reason: reason::INTERNAL, pool: UNROUTED, skip: off };
    };
    if cl > cfg.max_fast_body {
        return Next::Handoff { reason: reason::BODY_TOO_LARGE, pool: UNROUTED, skip: off };
    }
    let Some(pool) = find_pool(st) else {
        return Next::Handoff { reason: reason::NO_ROUTE, pool: UNROUTED, skip: off };
    };
    let close = if st.scan.wants_close() { REC_CLOSE } else { 0 };
    let flags = close | if cl == 0 { REC_LAST } else { 0 };
    let ring = match queue::push_head(st, cookie, pool, end, cl, flags) {
        Ok(ring) => ring,
        Err(why) => return Next::Handoff { reason: why, pool, skip: off },
    };
    let consumed = end - old;
    st.head_len = 0;
    if cl > 0 {
        st.mode = MODE_BODY;
        st.body_left = cl;
        // SAFETY: as above.
        st.since_ns = unsafe { bpf_ktime_get_ns() };
        st.ring = ring;
        st.pool = pool;
        st.req_flags = close as u32;
    } else {
        finish_request(st, close as u32);
    }
    Next::At(off + consumed)
}

#[inline(always)]
fn finish_request(st: &mut ConnState, close: u32) {
    st.seq += 1;
    st.mode = if close != 0 { MODE_DRAIN } else { MODE_HEAD };
}

/// Looks the scanned request up in the route table: its host, then `*`.
#[inline(always)]
fn find_pool(st: &mut ConnState) -> Option<u32> {
    route::set_path(&mut st.key, &st.scan.path, st.scan.path_len);
    route::lookup(&mut st.key, st.scan.host_hash, |key| {
        // SAFETY: LpmKey has the layout of aya's (packed) Key<RouteKeyData>.
        let key = unsafe { &*(key as *const LpmKey as *const Key<RouteKeyData>) };
        routes.get(key).map(|v| v.pool)
    })
}

#[inline(always)]
fn body_step(ctx: &SkBuffContext, st: &mut ConnState, cookie: u64, off: u32, len: u32) -> Next {
    let avail = (len - off) as u64;
    let n = if st.body_left < avail { st.body_left as u32 } else { avail as u32 };
    let (done, failed) = queue::push_body(ctx, st, cookie, off, n);
    st.body_left -= done as u64;
    if failed {
        return Next::Handoff { reason: reason::RING_FULL_MID_BODY, pool: st.pool, skip: off + done };
    }
    if st.body_left == 0 {
        let close = st.req_flags;
        finish_request(st, close);
    }
    Next::At(off + done)
}
