//! Plain-bytes (de)serialisation of the `#[repr(C)]` headers that cross a
//! socket or a ring: the one place that turns such a header into bytes and
//! back (the ring's record header and the control and lease sockets'
//! headers implement [`Plain`]).
//!
//! A header is written as its in-memory bytes (native byte order: both
//! ends run on the same host) and read back from any alignment.

/// A header that is its bytes: `#[repr(C)]`, `Copy`, no padding, and valid
/// for every bit pattern.
///
/// # Safety
///
/// Implement it only for types that are all of the above; [`to_bytes`]
/// reads every byte of the value and [`from_bytes`] makes a value of any
/// bytes.
pub unsafe trait Plain: Copy {}

/// `v` as the bytes that go on the wire. `N` is the type's size, checked
/// when the call is compiled.
pub fn to_bytes<T: Plain, const N: usize>(v: &T) -> [u8; N] {
    const { assert!(N == core::mem::size_of::<T>()) };
    // SAFETY: T has no padding (Plain), so all N bytes are initialised,
    // and N is its size (asserted above).
    unsafe { core::mem::transmute_copy(v) }
}

/// Reads a `T` from the start of `b` (any alignment); `None` when `b` is
/// shorter than a `T`.
pub fn from_bytes<T: Plain>(b: &[u8]) -> Option<T> {
    if b.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: every bit pattern is a valid T (Plain); the length was
    // checked; read_unaligned takes any alignment.
    Some(unsafe { core::ptr::read_unaligned(b.as_ptr() as *const T) })
}
