//! Fuzz targets (bolero) for what the kernel and the dispatcher decode
//! from bytes another party wrote: request heads (the scanner, as the
//! verdict runs it), the records and frames on a worker's control socket
//! (a worker is not trusted) and lease messages. Each runs for
//! `FUZZ_SECS` (default 5) under `cargo test`, after replaying its checked-in
//! corpus (`tests/__fuzz__/<target>/corpus`); `cargo bolero test` runs
//! the same targets coverage-guided where a libFuzzer toolchain exists.

use std::time::Duration;

use dispatcher_ebpf::{
    abi::RecordHeader,
    fuzzing::mutate,
    scan::{scan, Step},
    wire::{FrameHeader, LeaseMsg, WorkerFrame, FRAME_HEADER_LEN},
};

/// Well-formed heads the mutations start from.
const SEEDS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /echo/x?q=1 HTTP/1.1\r\nHost: Example.COM.:8080\r\nAccept: */*\r\n\r\n",
    b"POST /up HTTP/1.1\r\nhost: a\r\nContent-Length:  42 \r\nConnection: close\r\n\r\n",
    b"GET /a/b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: h.example\r\nContent-Length: 7\r\nX-Long: abcdefghijklmnopqrstuvwxyz\r\n\r\n",
];

fn budget() -> Duration {
    Duration::from_secs(std::env::var("FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5))
}

/// The scanner never panics, and what it frames is inside its input: the
/// head ends within the bytes fed, the route key is a prefix of the path,
/// and feeding the same bytes again gives the same answer.
#[test]
fn fuzz_scanner() {
    bolero::check!().with_test_time(budget()).for_each(|input: &[u8]| {
        for head in [input.to_vec(), mutate(SEEDS, input)] {
            let (r, s) = scan(&head);
            if r == Step::Done {
                assert!(s.end as usize <= head.len() && s.end >= 4);
                assert!(s.path_key().len() <= s.path_len as usize);
                assert_eq!(&head[s.end as usize - 4..s.end as usize], b"\r\n\r\n");
            }
            assert_eq!(scan(&head), (r, s), "deterministic");
        }
    });
}

/// Control-socket frames from a worker: any bytes decode to a frame or an
/// error, never a panic, and a decoded frame encodes back to a header that
/// decodes to the same frame.
#[test]
fn fuzz_worker_frames() {
    bolero::check!().with_test_time(budget()).for_each(|input: &[u8]| {
        let Some(h) = FrameHeader::from_bytes(input) else {
            assert!(input.len() < FRAME_HEADER_LEN);
            return;
        };
        if let Ok(f) = WorkerFrame::decode(&h) {
            let again = WorkerFrame::decode(&f.encode(h.len)).expect("a re-encoded frame decodes");
            assert_eq!(format!("{again:?}"), format!("{f:?}"));
        }
    });
}

/// Record headers (ring and control socket) and lease messages.
#[test]
fn fuzz_records_and_lease_messages() {
    bolero::check!().with_test_time(budget()).for_each(|input: &[u8]| {
        if let Some(r) = RecordHeader::from_bytes(input) {
            let _ = r.record_kind();
            assert_eq!(RecordHeader::from_bytes(&r.to_bytes()).map(|x| x.to_bytes()), Some(r.to_bytes()));
        }
        if let Ok(m) = LeaseMsg::decode(input) {
            assert_eq!(LeaseMsg::decode(&m.encode()), Ok(m));
        }
    });
}
