//! The XDP guard: judges TCP packets to the service port by their source
//! before the stack spends anything on them (IIS's IP and domain
//! restrictions and dynamic IP restrictions).
//!
//! Order: deny list (drop), allow list when it is not empty (drop if the
//! source is not on it), then, for a SYN, the source's new-connection
//! token bucket (drop over the rate). Anything the parser cannot read with
//! certainty (non-IP, non-TCP, a non-first fragment, an IPv6 extension
//! header chain longer than it follows, a malformed header) passes: the
//! stack sees it as before, so the guard never misjudges a packet.

use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext};
use dispatcher_ebpf::abi::{verdict, GuardConfig, RateState};

use crate::maps::{
    guard_allow_v4, guard_allow_v6, guard_config, guard_conns, guard_deny_v4, guard_deny_v6, guard_rate, guard_stats,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
/// IPv6 extension headers the parser walks through (hop-by-hop, routing,
/// destination options), and the fragment header.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_FRAGMENT: u8 = 44;
/// Extension headers followed before giving up (and passing).
const MAX_EXT_HEADERS: usize = 4;
/// VLAN tags (802.1Q / 802.1ad) skipped.
const MAX_VLAN_TAGS: usize = 2;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// One SYN in the token bucket's units (see `RateState`).
const TOKEN: u64 = 1_000_000_000;

/// The source and the TCP header of a packet worth judging.
struct Tcp {
    /// IPv4-mapped for IPv4 (`::ffff:a.b.c.d`), the rate-table key.
    src: [u8; 16],
    v4: bool,
    dport: u16,
    flags: u8,
}

#[xdp]
pub fn guard(ctx: XdpContext) -> u32 {
    let (v, action) = judge(&ctx);
    if let Some(c) = guard_stats.get_ptr_mut(v) {
        // SAFETY: a per-CPU counter.
        unsafe { *c += 1 };
    }
    action
}

fn judge(ctx: &XdpContext) -> (u32, u32) {
    let Some(cfg) = guard_config.get(0) else { return (verdict::PASSED, xdp_action::XDP_PASS) };
    let Some(t) = parse(ctx) else { return (verdict::PASSED, xdp_action::XDP_PASS) };
    if cfg.port == 0 || t.dport as u32 != cfg.port {
        return (verdict::PASSED, xdp_action::XDP_PASS);
    }
    let (denied, allowed) = if t.v4 {
        let key = Key::new(32, [t.src[12], t.src[13], t.src[14], t.src[15]]);
        (guard_deny_v4.get(&key).is_some(), cfg.allow_v4 == 0 || guard_allow_v4.get(&key).is_some())
    } else {
        let key = Key::new(128, t.src);
        (guard_deny_v6.get(&key).is_some(), cfg.allow_v6 == 0 || guard_allow_v6.get(&key).is_some())
    };
    if denied {
        return (verdict::DENIED, xdp_action::XDP_DROP);
    }
    if !allowed {
        return (verdict::NOT_ALLOWED, xdp_action::XDP_DROP);
    }
    if t.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        if cfg.max_connections > 0 {
            // SAFETY: a value of the map, read once.
            let open = guard_conns.get_ptr(t.src).map_or(0, |c| unsafe { core::ptr::read_volatile(c) });
            if open >= cfg.max_connections as u64 {
                return (verdict::TOO_MANY_CONNECTIONS, xdp_action::XDP_DROP);
            }
        }
        if cfg.syn_rate > 0 && !take_token(&t.src, cfg) {
            return (verdict::RATE_LIMITED, xdp_action::XDP_DROP);
        }
    }
    (verdict::ALLOWED, xdp_action::XDP_PASS)
}

/// Takes one SYN's token from `src`'s bucket; false when it is empty.
/// CPUs update a bucket without a lock: two SYNs of one source at the same
/// instant on two CPUs may both pass on the last token, which errs on the
/// side of letting traffic in.
fn take_token(src: &[u8; 16], cfg: &GuardConfig) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    let cap = cfg.syn_burst.max(1) as u64 * TOKEN;
    let Some(st) = guard_rate.get_ptr_mut(src) else {
        // A new source starts with a full bucket, less this SYN.
        let _ = guard_rate.insert(src, RateState { tokens: cap - TOKEN, last_ns: now }, 0);
        return true;
    };
    // SAFETY: a value of the LRU map; see above for concurrent updates.
    let st = unsafe { &mut *st };
    // Refill for no longer than an empty bucket takes to fill: the
    // product stays below `cap` (no overflow), and a long-idle source
    // gets its whole burst back.
    let rate = cfg.syn_rate as u64;
    let elapsed = now.saturating_sub(st.last_ns).min(cap / rate + 1);
    // elapsed × rate <= cap + rate: no overflow.
    let tokens = (st.tokens.min(cap) + elapsed * rate).min(cap);
    st.last_ns = now;
    if tokens < TOKEN {
        st.tokens = tokens;
        return false;
    }
    st.tokens = tokens - TOKEN;
    true
}

/// The guard's key for IPv4 address `a`: its IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`), so one table serves both families. The sockops
/// program counts a source's connections in `guard_conns` under this key
/// and this program reads them back with it, so both build it here.
#[inline(always)]
pub(crate) fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[10] = 0xff;
    k[11] = 0xff;
    k[12..].copy_from_slice(&a);
    k
}

/// A pointer to a `T` at `off` bytes into the packet, if it is all there.
#[inline(always)]
fn at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

/// The `N` bytes at `off`, copied out with one bounds check (one check
/// per read keeps each packet pointer the verifier sees checked: LLVM
/// merges separate small reads into pointers it did not check).
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    // SAFETY: bounds checked by `at`; a byte array has no alignment.
    at::<[u8; N]>(ctx, off).map(|p| unsafe { *p })
}

fn parse(ctx: &XdpContext) -> Option<Tcp> {
    let eth: [u8; ETH_HLEN] = bytes(ctx, 0)?;
    let mut proto = u16::from_be_bytes([eth[12], eth[13]]);
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let tag: [u8; 4] = bytes(ctx, off)?;
        proto = u16::from_be_bytes([tag[2], tag[3]]);
        off += 4;
    }
    match proto {
        ETH_P_IP => parse_v4(ctx, off),
        ETH_P_IPV6 => parse_v6(ctx, off),
        _ => None,
    }
}

/// Destination port and flags of the TCP header at `off`.
#[inline(always)]
fn tcp(ctx: &XdpContext, off: usize) -> Option<(u16, u8)> {
    let t: [u8; 14] = bytes(ctx, off)?;
    Some((u16::from_be_bytes([t[2], t[3]]), t[13]))
}

fn parse_v4(ctx: &XdpContext, off: usize) -> Option<Tcp> {
    let ip: [u8; 20] = bytes(ctx, off)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_TCP {
        return None;
    }
    // A later fragment has no TCP header to judge.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return None;
    }
    let src = v4_mapped([ip[12], ip[13], ip[14], ip[15]]);
    // Options included: ihl is 20..=60.
    let (dport, flags) = tcp(ctx, off + (ihl & 0x3c))?;
    Some(Tcp { src, v4: true, dport, flags })
}

fn parse_v6(ctx: &XdpContext, off: usize) -> Option<Tcp> {
    let ip: [u8; 40] = bytes(ctx, off)?;
    if ip[0] >> 4 != 6 {
        return None;
    }
    let mut next = ip[6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    let mut h = off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => break,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let e: [u8; 2] = bytes(ctx, h)?;
                next = e[0];
                h += ((e[1] as usize + 1) * 8) & 0x7f8;
            }
            NEXTHDR_FRAGMENT => {
                let e: [u8; 4] = bytes(ctx, h)?;
                if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = e[0];
                h += 8;
            }
            _ => return None,
        }
    }
    if next != IPPROTO_TCP {
        return None;
    }
    let (dport, flags) = tcp(ctx, h)?;
    Some(Tcp { src, v4: false, dport, flags })
}
