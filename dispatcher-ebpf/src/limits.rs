//! Sizes and sentinels that the head scanner, the route keys and the ABI
//! share. A module of its own so imports point one way (`abi` → `scan` →
//! `limits`); `abi` re-exports them, as they are part of the ABI.

/// Path bytes that take part in route matching. Longer paths are matched on
/// their first `PATH_KEY_MAX` bytes, which is exact because route prefixes
/// are limited to `PATH_KEY_MAX - 1` bytes.
pub const PATH_KEY_MAX: usize = 120;

/// Host hash that stands for "any host" (`*` in a route).
pub const WILDCARD_HOST: u64 = 0;

/// Largest Content-Length the scanner accepts before it hands the request
/// to the slow path (which answers 413 or streams it).
pub const MAX_CONTENT_LENGTH: u64 = 1 << 40;
