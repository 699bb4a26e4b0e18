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

use crate::abi::{RouteKeyData, PATH_KEY_MAX, ROUTE_KEY_LEN, WILDCARD_HOST};

/// Bits of route-key data that the host hash takes.
pub const HOST_BITS: u32 = 64;

/// Longest route prefix, in bytes (one byte of the key stays for the
/// terminator).
pub const MAX_ROUTE_PREFIX: usize = PATH_KEY_MAX - 1;

/// A route-table key: prefix length in bits, and the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteKey {
    pub prefix_len: u32,
    pub data: RouteKeyData,
}

/// The key a request is looked up with: host hash, path bytes (up to `?`),
/// and a 0 byte if the path ended within the key.
pub fn request_key(host_hash: u64, path: &[u8]) -> RouteKey {
    let mut data = [0u8; ROUTE_KEY_LEN];
    data[..8].copy_from_slice(&host_hash.to_le_bytes());
    let n = path.len().min(PATH_KEY_MAX);
    data[8..8 + n].copy_from_slice(&path[..n]);
    // data[8 + n] is already 0: the terminator.
    let bytes = if n < PATH_KEY_MAX { n + 1 } else { n };
    RouteKey { prefix_len: HOST_BITS + 8 * bytes as u32, data }
}

/// The request key with the host replaced by `*`.
pub fn wildcard(key: &RouteKey) -> RouteKey {
    let mut k = *key;
    k.data[..8].copy_from_slice(&WILDCARD_HOST.to_le_bytes());
    k
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
    let mut base = [0u8; ROUTE_KEY_LEN];
    base[..8].copy_from_slice(&host_hash.to_le_bytes());
    base[8..8 + prefix.len()].copy_from_slice(prefix);
    let n = prefix.len();
    let below = RouteKey { prefix_len: HOST_BITS + 8 * n as u32, data: base };
    if prefix.ends_with(b"/") {
        return Ok(([below, below], 1));
    }
    // Exact: the prefix then the terminator (already 0 in `base`).
    let exact = RouteKey { prefix_len: HOST_BITS + 8 * (n as u32 + 1), data: base };
    let mut sub = base;
    sub[8 + n] = b'/';
    let children = RouteKey { prefix_len: HOST_BITS + 8 * (n as u32 + 1), data: sub };
    Ok(([exact, children], 2))
}
