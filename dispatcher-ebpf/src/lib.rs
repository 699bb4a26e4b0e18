//! What the kernel side shares with user space, and what the dispatcher
//! shares with its workers.
//!
//! Everything here is `no_std`, allocation-free and written so the BPF
//! verifier accepts it: [`abi`] holds the `#[repr(C)]` map keys, values and
//! ring records; [`scan`] is the incremental HTTP/1.x head scanner the
//! verdict program runs one byte at a time; [`route`] builds route-table
//! keys; [`limits`] holds the sizes and sentinels they all use. The same
//! code runs in the kernel and in the host tests, so what the tests check
//! is what the kernel does.
//!
//! The dispatcher–worker contract lives here too, so that both sides (and
//! the tests) read it from one place: [`wire`] is what goes over a worker's
//! control and lease sockets, [`launch`] how a worker finds its handles,
//! and [`plain`] the one byte (de)serialisation of the `#[repr(C)]`
//! headers. The `std` feature adds what needs `std` ([`launch::Handles`]).
#![no_std]

#[cfg(any(feature = "std", test))]
extern crate std;

pub mod abi;
#[cfg(feature = "std")]
pub mod fuzzing;
pub mod launch;
pub mod limits;
pub mod plain;
pub mod route;
pub mod scan;
pub mod wire;
