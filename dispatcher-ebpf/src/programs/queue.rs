//! Queueing framed requests on a pool's ring, and the counters.
//!
//! A pool owns one ring per worker slot. A request head goes to the slot
//! with the least queued data, so a slow worker does not collect a backlog
//! while a sibling idles; its body records follow it to the same slot.
//! A queue over its limit is never a silent drop: the request is handed to
//! the slow path, which answers 503.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::{
        bpf_ringbuf_discard, bpf_ringbuf_output, bpf_ringbuf_query, bpf_ringbuf_reserve, bpf_ringbuf_submit,
        bpf_skb_load_bytes,
    },
    programs::SkBuffContext,
};
use dispatcher_ebpf::abi::{
    reason, BodyRecord, ConnState, Event, RecordHeader, BODY_CHUNK, EVENT_DEMAND, HEAD_MAX, MAX_POOLS, MAX_RINGS,
    RECORD_BODY, RECORD_HEAD, RECORD_HEADER_LEN, RECORD_WAKE, REC_LAST, RING_AWAKE_NO, RING_AWAKE_NO_WORKER,
    RING_AWAKE_YES, UNROUTED,
};

use crate::maps::{events, handoffs, pool_stats, pools, ring_awake, rings};

/// Web-garden slots a pool may have (bounds the shortest-queue scan).
pub const MAX_GARDEN: u32 = 8;

/// Bytes of ring space per record besides its data: the ring's own 8-byte
/// header, rounded up to 8.
const RING_OVERHEAD: u64 = 8 + 8;

#[inline(always)]
fn ring_ptr(index: u32) -> Option<*mut c_void> {
    rings.get(index).map(|r| r as *const _ as *mut c_void)
}

/// Ring `index`'s awake flag (one lookup per request: the same pointer
/// serves the look before the commit and the one after it).
#[inline(always)]
fn awake_flag(index: u32) -> Option<*mut u32> {
    ring_awake.get_value_ptr_mut(index, &0)
}

/// Reads the flag. A plain read is enough for the second look, after a
/// commit: the ring's commit is an `xchg` inside the helper, which the
/// kernel's memory model makes fully ordered, so this load cannot be
/// performed before the record is visible.
#[inline(always)]
fn read_awake(flag: Option<*mut u32>) -> u32 {
    match flag {
        // SAFETY: an aligned u32 in map memory.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => RING_AWAKE_NO,
    }
}

/// Commit flags for a record: no wake-up while the slot's worker is
/// awake. Returns them and whether they suppressed the wake-up.
#[inline(always)]
fn commit_flags(flag: Option<*mut u32>) -> (u64, bool) {
    if read_awake(flag) == RING_AWAKE_YES {
        (BPF_RB_NO_WAKEUP as u64, true)
    } else {
        (0, false)
    }
}

/// After a commit: if the slot has no worker, ask for one (the dispatcher
/// sets the flag, then looks at the ring: one of the two sees the other);
/// after a commit without wake-up, if the worker went to sleep meanwhile,
/// wake it (it may have looked at the ring before the commit).
#[inline(always)]
fn after_commit(ring: *mut c_void, index: u32, flag: Option<*mut u32>, suppressed: bool) {
    let now = read_awake(flag);
    if now == RING_AWAKE_NO_WORKER {
        let _ = events.output(Event { cookie: 0, kind: EVENT_DEMAND, ring: index }, 0);
    } else if suppressed && now == RING_AWAKE_NO {
        let mut wake = RecordHeader { kind: RECORD_WAKE, ..RecordHeader::default() };
        // SAFETY: ring buffer map; a stack record of constant size.
        unsafe {
            bpf_ringbuf_output(
                ring,
                &mut wake as *mut _ as *mut c_void,
                RECORD_HEADER_LEN as u64,
                BPF_RB_FORCE_WAKEUP as u64,
            )
        };
    }
}

/// Ring space `body` bytes of body take.
#[inline(always)]
fn body_space(body: u64) -> u64 {
    let records = body.div_ceil(BODY_CHUNK as u64);
    records * (core::mem::size_of::<BodyRecord>() as u64 + RING_OVERHEAD)
}

/// Queues the head in `st.rec` (its first `end` data bytes) for `pool`.
/// Returns the ring it went to, or the hand-off reason.
#[inline(always)]
pub fn push_head(
    st: &mut ConnState,
    cookie: u64,
    pool: u32,
    end: u32,
    content_length: u64,
    flags: u8,
) -> Result<u32, u32> {
    if pool >= MAX_POOLS {
        return Err(reason::NO_RING);
    }
    let Some(info) = pools.get(pool) else { return Err(reason::NO_RING) };
    let slots = info.slots;
    if slots == 0 {
        return Err(reason::NO_RING);
    }
    // Shortest queue among the pool's slots, looked at from the
    // connection's own slot on: ties (idle workers drain their rings to
    // empty) keep a connection on one worker and spread connections over
    // the web garden.
    let home = (cookie % slots as u64) as u32;
    let mut best = info.first_ring;
    let mut best_q = u64::MAX;
    // The chosen slot's real depth (best_q may include the scale-out
    // penalty, which steers the choice but is no queued data).
    let mut best_depth = 0u64;
    let mut i = 0;
    while i < MAX_GARDEN {
        if i >= slots {
            break;
        }
        let k = home + i;
        let index = info.first_ring + if k >= slots { k - slots } else { k };
        if index >= MAX_RINGS {
            break;
        }
        if let Some(r) = ring_ptr(index) {
            // SAFETY: `r` is a ring buffer map.
            let depth = unsafe { bpf_ringbuf_query(r, BPF_RB_AVAIL_DATA as u64) };
            let mut q = depth;
            if slots > 1 && read_awake(awake_flag(index)) == RING_AWAKE_NO_WORKER {
                q += info.scale_out_bytes as u64;
            }
            if q < best_q {
                best_q = q;
                best_depth = depth;
                best = index;
            }
        }
        i += 1;
    }
    let Some(ring) = ring_ptr(best) else { return Err(reason::NO_RING) };
    let need = RECORD_HEADER_LEN as u64 + end as u64 + RING_OVERHEAD + body_space(content_length);
    if best_depth.saturating_add(need) > info.queue_bytes as u64 {
        count_queue_full(pool);
        return Err(reason::QUEUE_FULL);
    }
    st.rec.hdr = RecordHeader {
        conn: cookie,
        seq: st.seq,
        len: end,
        content_length,
        kind: RECORD_HEAD,
        flags,
        peer_port: st.peer_port as u16,
        peer_ip4: st.peer_ip4,
    };
    let size = RECORD_HEADER_LEN as u64 + end as u64;
    if size > (RECORD_HEADER_LEN + HEAD_MAX) as u64 {
        return Err(reason::INTERNAL);
    }
    let flag = awake_flag(best);
    let (flags, suppressed) = commit_flags(flag);
    // SAFETY: `st.rec` is at least `size` bytes of map memory.
    let ret = unsafe { bpf_ringbuf_output(ring, &mut st.rec as *mut _ as *mut c_void, size, flags) };
    if ret != 0 {
        count_queue_full(pool);
        return Err(reason::QUEUE_FULL);
    }
    after_commit(ring, best, flag, suppressed);
    if let Some(c) = pool_stats.get_ptr_mut(pool) {
        // SAFETY: per-CPU value.
        unsafe { atomic_add(&mut (*c).fast_requests, 1) };
    }
    Ok(best)
}

/// Body records one invocation writes at most (the program tail-calls
/// itself for more).
const MAX_BODY_RECORDS: u32 = 32;

/// Queues up to `n` body bytes from segment offset `off` on the request's
/// slot, at most `MAX_BODY_RECORDS` records' worth. Returns how many were
/// queued, and whether the ring refused a record (full).
#[inline(always)]
pub fn push_body(ctx: &SkBuffContext, st: &mut ConnState, cookie: u64, off: u32, n: u32) -> (u32, bool) {
    let Some(ring) = ring_ptr(st.ring) else { return (0, true) };
    let mut done: u32 = 0;
    let mut failed = false;
    let mut i = 0;
    while i < MAX_BODY_RECORDS {
        if done >= n {
            break;
        }
        let left = n - done;
        let chunk = if left < BODY_CHUNK as u32 { left } else { BODY_CHUNK as u32 };
        if chunk == 0 {
            break;
        }
        // Same value for chunk in 1..=BODY_CHUNK, in a form whose range
        // the verifier can see.
        let chunk = crate::bounded(chunk, BODY_CHUNK as u32);
        // SAFETY: ring buffer map; fixed size the verifier can check.
        let rec = unsafe { bpf_ringbuf_reserve(ring, core::mem::size_of::<BodyRecord>() as u64, 0) } as *mut BodyRecord;
        if rec.is_null() {
            failed = true;
            break;
        }
        // SAFETY: `rec` is a reserved BodyRecord; chunk <= BODY_CHUNK.
        let ret = unsafe {
            bpf_skb_load_bytes(ctx.skb.skb as *const c_void, off + done, (*rec).data.as_mut_ptr() as *mut c_void, chunk)
        };
        if ret != 0 {
            unsafe { bpf_ringbuf_discard(rec as *mut c_void, 0) };
            failed = true;
            break;
        }
        let last = st.body_left == (done + chunk) as u64;
        let flags = if last { REC_LAST | st.req_flags as u8 } else { 0 };
        unsafe {
            (*rec).hdr = RecordHeader {
                conn: cookie,
                seq: st.seq,
                len: chunk,
                content_length: st.body_left - done as u64,
                kind: RECORD_BODY,
                flags,
                peer_port: 0,
                peer_ip4: 0,
            };
            // The ring's adaptive wake-up (wake when the consumer had caught
            // up), not the awake flag: a second path through this loop is
            // more than the verifier's budget allows. Still correct, since
            // each record on its own guarantees a sleeping worker is woken.
            bpf_ringbuf_submit(rec as *mut c_void, 0);
        }
        done += chunk;
        i += 1;
    }

    if st.pool < MAX_POOLS {
        if let Some(c) = pool_stats.get_ptr_mut(st.pool) {
            // SAFETY: per-CPU value.
            unsafe { atomic_add(&mut (*c).fast_body_bytes, done as u64) };
        }
    }
    (done, failed)
}

/// Adds to a per-CPU counter with an atomic add: a verdict running in
/// process context can be interrupted on its CPU by another one, so a
/// plain read-modify-write could lose counts.
#[inline(always)]
pub(crate) unsafe fn atomic_add(c: *mut u64, v: u64) {
    // SAFETY: `c` points to an aligned u64 in map memory.
    // The BPF target has no compare-and-swap, so `AtomicU64::fetch_add` is
    // not offered; the intrinsic lowers to BPF's atomic add.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(c, v) };
}

#[inline(always)]
fn count_queue_full(pool: u32) {
    if let Some(c) = pool_stats.get_ptr_mut(pool) {
        // SAFETY: per-CPU value.
        unsafe { atomic_add(&mut (*c).queue_full, 1) };
    }
}

/// Counts a hand-off by reason and, when known, by pool.
#[inline(always)]
pub fn count_handoff(why: u32, pool: u32) {
    if let Some(c) = handoffs.get_ptr_mut(why) {
        // SAFETY: per-CPU value.
        unsafe { atomic_add(&mut *c, 1) };
    }
    let p = if pool < MAX_POOLS { pool } else { UNROUTED };
    if let Some(c) = pool_stats.get_ptr_mut(p) {
        // SAFETY: per-CPU value.
        unsafe { atomic_add(&mut (*c).slow_handoffs, 1) };
    }
}
