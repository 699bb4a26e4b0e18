//! Route-table keys.
//!
//! The route table is an LPM trie keyed by (host hash, path bytes). A route
//! `host/prefix` becomes one or two entries whose prefix length covers the
//! whole host hash and the prefix bytes, so a lookup returns the longest
//! route prefix of the request path for that host. The segment-boundary
//! rule (`/app` matches `/app` and `/app/x` but not `/apple`) is encoded in
//! the entries: `/app` is stored as `/app\0` (exact; request keys end their
//! path with a 0 byte) and `/app/` (everything below). A prefix that already
//! ends with `/` is stored once.
//!
//! Lookups try the request's host first and then [`WILDCARD_HOST`], so an
//! explicit host beats `*` and `*` still serves paths the explicit host
//! does not route.
//!
//! One builder serves everyone: the verdict program fills its key in place
//! with [`set_path`] and looks it up with [`lookup`]; the dispatcher's slow
//! path and the host tests build the same bytes with [`request_key`] (which
//! calls [`set_path`]) and look up with the same [`lookup`]; route entries
//! ([`route_keys`]) are request keys of the prefix.

use crate::abi::{LpmKey, PATH_KEY_MAX, ROUTE_KEY_LEN, WILDCARD_HOST};

/// Bits of route-key data that the host hash takes.
pub const HOST_BITS: u32 = 64;

/// Longest route prefix, in bytes (one byte of the key stays for the
/// terminator).
pub const MAX_ROUTE_PREFIX: usize = PATH_KEY_MAX - 1;

/// A route-table key: prefix length in bits, and the data. The ABI's
/// [`LpmKey`], so the verdict program builds its key in place (in its
/// connection state: map memory, not the small BPF stack) with the same
/// functions user space and the tests use.
pub type RouteKey = LpmKey;

/// Writes the path part of a request's key: the scanner's path bytes
/// (`path`, zero after the path), and a 0 byte after them if the path
/// (`path_len` bytes, which may exceed the key) ended within the key; sets
/// the prefix length to cover the host hash and those bytes.
///
/// The verdict program runs this on its map-resident key: the copy has a
/// constant length and the terminator's index is masked into the key, so
/// the verifier sees every access in range.
#[inline(always)]
pub fn set_path(key: &mut RouteKey, path: &[u8; PATH_KEY_MAX], path_len: u32) {
    key.data[8..].copy_from_slice(path);
    let n = if (path_len as usize) < PATH_KEY_MAX { path_len as usize } else { PATH_KEY_MAX };
    let mut bytes = n;
    if n < PATH_KEY_MAX {
        // ROUTE_KEY_LEN is a power of two and 8 + n < ROUTE_KEY_LEN: the
        // mask changes nothing but shows the verifier the bound.
        key.data[(8 + n) & (ROUTE_KEY_LEN - 1)] = 0;
        bytes = n + 1;
    }
    key.prefix_len = HOST_BITS + 8 * bytes as u32;
}

/// Writes the host part of a key (the path part and length are kept).
#[inline(always)]
pub fn set_host(key: &mut RouteKey, host_hash: u64) {
    key.data[..8].copy_from_slice(&host_hash.to_le_bytes());
}

/// Looks a request up the way the kernel does: with its host, then (if
/// that found nothing, or the request named no host) with
/// [`WILDCARD_HOST`]. `key` holds the request's path part ([`set_path`]);
/// its host part is rewritten. `get` is one table lookup.
#[inline(always)]
pub fn lookup<V>(key: &mut RouteKey, host_hash: u64, mut get: impl FnMut(&RouteKey) -> Option<V>) -> Option<V> {
    if host_hash != WILDCARD_HOST {
        set_host(key, host_hash);
        if let Some(v) = get(key) {
            return Some(v);
        }
    }
    set_host(key, WILDCARD_HOST);
    get(key)
}

/// The key a request is looked up with: host hash, path bytes (up to `?`;
/// the first `PATH_KEY_MAX` of them), and a 0 byte if the path ended
/// within the key. The same bytes the verdict program builds from its
/// scanner with [`set_path`].
pub fn request_key(host_hash: u64, path: &[u8]) -> RouteKey {
    let n = path.len().min(PATH_KEY_MAX);
    let mut bytes = [0u8; PATH_KEY_MAX];
    bytes[..n].copy_from_slice(&path[..n]);
    let mut key = RouteKey { prefix_len: 0, data: [0; ROUTE_KEY_LEN] };
    set_host(&mut key, host_hash);
    set_path(&mut key, &bytes, n as u32);
    key
}

/// Why a route prefix cannot be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// The prefix does not start with `/`.
    NotAbsolute,
    /// The prefix is longer than [`MAX_ROUTE_PREFIX`].
    TooLong,
    /// The prefix contains a byte that cannot appear in a request path
    /// the kernel routes (`?`, `#`, `%`, a control byte or a space), or
    /// a `//` or dot segment.
    BadByte,
}

/// The trie entries for route `host_hash` + `prefix` (one or two keys).
pub fn route_keys(host_hash: u64, prefix: &[u8]) -> Result<([RouteKey; 2], usize), RouteError> {
    if prefix.first() != Some(&b'/') {
        return Err(RouteError::NotAbsolute);
    }
    if prefix.len() > MAX_ROUTE_PREFIX {
        return Err(RouteError::TooLong);
    }
    let mut prev = 0u8;
    for &b in prefix {
        if !(0x21..=0x7e).contains(&b) || matches!(b, b'?' | b'#' | b'%' | b'\\') {
            return Err(RouteError::BadByte);
        }
        if prev == b'/' && (b == b'/' || b == b'.') {
            return Err(RouteError::BadByte);
        }
        prev = b;
    }
    // The request key of the prefix itself: exact (prefix, terminator).
    let exact = request_key(host_hash, prefix);
    let n = prefix.len();
    if prefix.ends_with(b"/") {
        // Everything below: the prefix bytes without the terminator.
        let below = RouteKey { prefix_len: exact.prefix_len - 8, ..exact };
        return Ok(([below, below], 1));
    }
    // Everything below `prefix/`: the terminator's place holds the `/`.
    let mut children = exact;
    children.data[8 + n] = b'/';
    Ok(([exact, children], 2))
}
