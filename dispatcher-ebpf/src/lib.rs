//! What the kernel side shares with user space.
//!
//! Everything here is `no_std`, allocation-free and written so the BPF
//! verifier accepts it: [`abi`] holds the `#[repr(C)]` map keys, values and
//! ring records; [`scan`] is the incremental HTTP/1.x head scanner the
//! verdict program runs one byte at a time; [`route`] builds route-table
//! keys; [`limits`] holds the sizes and sentinels they all use. The same code runs in the kernel and in the host tests, so what the
//! tests check is what the kernel does.
#![no_std]

pub mod abi;
pub mod limits;
pub mod route;
pub mod scan;
