//! Old bytes in a received segment: trimmed before anything reads it.
//!
//! TCP queues a retransmitted segment that starts before what it already
//! received (`seq < rcv_nxt < end_seq`, "partial packet" in
//! `tcp_data_queue`) whole; `tcp_recvmsg` skips the old bytes by offset,
//! but the verdict-only sockmap path (`tcp_read_skb`) hands the whole
//! segment to the program and, on SK_PASS, to the socket's reader. Without
//! this, the overlap reached the application twice: one 65,483-byte
//! segment repeated inside a 256 MiB upload on loopback, about one run in
//! ten (the sender's segments reorder across CPUs, and its fast
//! retransmits are re-cut), and a pipelined request could be framed twice.
//!
//! The segment's sequence numbers are in `TCP_SKB_CB(skb)` (the first
//! words of `skb->cb`), read with `bpf_probe_read_kernel`; they are
//! trusted only when `end_seq - seq` is the segment's length (plus one for
//! a FIN), so a kernel with another `sk_buff` layout turns the check off
//! (counted as `NO_SEQ`) instead of cutting good bytes.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_probe_read_kernel, bpf_skb_adjust_room},
    programs::SkBuffContext,
};
use dispatcher_ebpf::abi::retrans;

use crate::{maps::retrans_stats, queue::atomic_add};

/// Offset of `cb` in `struct sk_buff` (x86_64 and arm64, 4.x to 6.18:
/// after the list pointers, `sk` and `tstamp`).
const SKB_CB: usize = 40;

/// Largest trim `bpf_skb_adjust_room` does in one call on an sk_skb.
const TRIM_STEP: u32 = 0xfff;

/// What is left of a segment once its old bytes are gone.
pub enum Fresh {
    /// New bytes from segment offset 0 (after any trim), or from `skip`
    /// if the trim failed part way.
    From(u32),
    /// Nothing new in it.
    Nothing,
}

/// Trims the bytes of the segment the program saw before; remembers how
/// far the connection's byte stream has been seen (`tcp_next`, valid once
/// `tcp_known` is nonzero; the fields of `ConnState` or `TunnelSeen`).
#[inline(always)]
pub fn trim_old(ctx: &SkBuffContext, tcp_known: &mut u32, tcp_next: &mut u32) -> Fresh {
    let skb = ctx.skb.skb;
    let len = ctx.len();
    let mut seqs = [0u32; 2];
    // SAFETY: reads 8 bytes of the socket buffer behind the context into
    // the stack; the helper fails cleanly on a bad address.
    let r = unsafe {
        bpf_probe_read_kernel(
            seqs.as_mut_ptr() as *mut c_void,
            8,
            (skb as *const u8).wrapping_add(SKB_CB) as *const c_void,
        )
    };
    let [seq, end_seq] = seqs;
    let span = end_seq.wrapping_sub(seq);
    if r != 0 || (span != len && span != len.wrapping_add(1)) {
        count(retrans::NO_SEQ, 1);
        return Fresh::From(0);
    }
    let end = seq.wrapping_add(len);
    if *tcp_known == 0 {
        *tcp_known = 1;
        *tcp_next = end;
        return Fresh::From(0);
    }
    let old = tcp_next.wrapping_sub(seq) as i32;
    if (end.wrapping_sub(*tcp_next) as i32) > 0 {
        *tcp_next = end;
    }
    if old <= 0 {
        return Fresh::From(0);
    }
    let old = old as u32;
    if old >= len {
        count(retrans::DROPPED, 1);
        return Fresh::Nothing;
    }
    let mut left = old;
    let mut i = 0;
    while i < 17 && left > 0 {
        let n = if left < TRIM_STEP { left } else { TRIM_STEP };
        // SAFETY: the context is this program's socket buffer.
        if unsafe { bpf_skb_adjust_room(skb, -(n as i32), 0, 0) } != 0 {
            break;
        }
        left -= n;
        i += 1;
    }
    if left > 0 {
        count(retrans::UNTRIMMED, 1);
    } else {
        count(retrans::TRIMMED, 1);
    }
    count(retrans::TRIMMED_BYTES, (old - left) as u64);
    Fresh::From(left)
}

#[inline(always)]
fn count(what: u32, n: u64) {
    if let Some(c) = retrans_stats.get_ptr_mut(what) {
        // SAFETY: per-CPU value.
        unsafe { atomic_add(c, n) };
    }
}
