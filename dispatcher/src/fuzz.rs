//! Fuzz targets (bolero) for the dispatcher's parsers of client and
//! operator input: the slow path's framer (heads and chunked bodies), a
//! differential target comparing its framing with the kernel scanner's and
//! with httparse on the same bytes, and the configuration loader. Each runs
//! for `FUZZ_SECS` (default 5) under `cargo test` after replaying its
//! checked-in corpus (`src/__fuzz__/<target>/corpus`); random inputs both
//! run as they are and edit a well-formed seed (`mutate`), so they reach
//! past the first byte a parser refuses.

use std::time::Duration;

use dispatcher_ebpf::scan::{scan, Step};

use crate::http::{Event, SlowParser};

fn budget() -> Duration {
    Duration::from_secs(std::env::var("FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5))
}

const SEEDS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /echo/x?q=1 HTTP/1.1\r\nHost: Example.COM.:8080\r\nAccept: */*\r\n\r\nGET /b HTTP/1.1\r\nHost: b\r\n\r\n",
    b"POST /up HTTP/1.1\r\nhost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://other.example/x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
    b"GET /a%2e%2e/b HTTP/1.0\r\n\r\n",
];

fn mutate(input: &[u8]) -> Vec<u8> {
    dispatcher_ebpf::fuzzing::mutate(SEEDS, input)
}

/// Everything the framer makes of `wire` fed in pieces cut at `cuts`.
fn frame(wire: &[u8], cuts: &[usize]) -> Vec<Event> {
    let mut p = SlowParser::new(1 << 20);
    let mut out = Vec::new();
    let mut at = 0;
    for &c in cuts.iter().chain(std::iter::once(&wire.len())) {
        let c = c.clamp(at, wire.len());
        out.extend(p.feed(&wire[at..c]));
        at = c;
        if p.is_done() {
            break;
        }
    }
    // Body bytes may come in other pieces; compare them joined.
    let mut joined: Vec<Event> = Vec::new();
    for e in out {
        match (joined.last_mut(), e) {
            (Some(Event::Body { data, last: false }), Event::Body { data: more, last }) => {
                let mut d = data.to_vec();
                d.extend_from_slice(&more);
                *joined.last_mut().unwrap() = Event::Body { data: d.into(), last };
            }
            (_, e) => joined.push(e),
        }
    }
    joined
}

/// The framer never panics and frames the same however the bytes are cut
/// into reads (a request split across segments is the normal case): the
/// same heads, body bytes, trailers and errors.
#[test]
fn fuzz_slow_parser() {
    bolero::check!().with_test_time(budget()).for_each(|input: &[u8]| {
        for wire in [input.to_vec(), mutate(input)] {
            let whole = frame(&wire, &[]);
            let n = wire.len().max(1);
            let cuts = [input.first().map_or(0, |&b| b as usize % n), n / 2, n.saturating_sub(1)];
            let mut sorted = cuts;
            sorted.sort_unstable();
            assert_eq!(frame(&wire, &sorted), whole, "{:?}", String::from_utf8_lossy(&wire));
            let bytewise: Vec<usize> = (1..wire.len().min(200)).collect();
            if wire.len() < 200 {
                assert_eq!(frame(&wire, &bytewise), whole, "byte by byte: {:?}", String::from_utf8_lossy(&wire));
            }
        }
    });
}

/// Whatever head the kernel frames, the slow path frames identically
/// (length, Content-Length, host); whatever the slow path accepts as an
/// origin-form HTTP/1.0 or 1.1 head, httparse accepts with the same length
/// (the slow path is at least as strict as httparse, never looser).
#[test]
fn fuzz_differential_framing() {
    bolero::check!().with_test_time(budget()).for_each(|input: &[u8]| {
        for wire in [input.to_vec(), mutate(input)] {
            let mut p = SlowParser::new(1 << 20);
            let events = p.feed(&wire);
            let head = match events.first() {
                Some(Event::Head(h)) => Some(h),
                _ => None,
            };
            let (r, s) = scan(&wire);
            if r == Step::Done {
                let h = head.unwrap_or_else(|| {
                    panic!("kernel framed, slow path: {events:?} for {:?}", String::from_utf8_lossy(&wire))
                });
                assert_eq!(h.bytes.len(), s.end as usize, "{:?}", String::from_utf8_lossy(&wire));
                assert_eq!(h.content_length, s.content_length);
                let hash =
                    h.host.as_deref().map_or(dispatcher_ebpf::limits::WILDCARD_HOST, dispatcher_ebpf::scan::host_hash);
                assert_eq!(hash, s.host_hash);
            }
            if let Some(h) = head {
                let origin = wire.split(|&b| b == b' ').nth(1).is_some_and(|t| t.starts_with(b"/"));
                let line_end = wire.iter().position(|&b| b == b'\n').unwrap_or(0);
                let line = &wire[..line_end];
                let known = line.ends_with(b"HTTP/1.1\r") || line.ends_with(b"HTTP/1.0\r");
                if origin && known && h.content_length != dispatcher_ebpf::abi::LENGTH_UNKNOWN {
                    let mut headers = [httparse::EMPTY_HEADER; 64];
                    let mut req = httparse::Request::new(&mut headers);
                    match req.parse(&wire) {
                        Ok(httparse::Status::Complete(n)) => assert_eq!(n, h.bytes.len()),
                        other => panic!(
                            "slow path accepted what httparse did not: {other:?} {:?}",
                            String::from_utf8_lossy(&wire)
                        ),
                    }
                }
            }
        }
    });
}

/// The configuration loader never panics on any text: a configuration or a
/// clear error that names the file.
#[test]
fn fuzz_config() {
    const SEED: &str = "listen = \"127.0.0.1:8080\"\ninstance = \"fuzz\"\n[limits]\nmax_body = 1024\n[[pool]]\nname = \"a\"\nroutes = [\"*/\", \"h.example/x\"]\ncommand = \"dispatcher-worker\"\nargs = [\"echo\"]\n";
    bolero::check!().with_test_time(budget()).for_each(|input: &[u8]| {
        let edited = dispatcher_ebpf::fuzzing::mutate(&[SEED.as_bytes()], input);
        for text in [String::from_utf8_lossy(input), String::from_utf8_lossy(&edited)] {
            if let Err(e) = crate::config::Config::parse(&text, "fuzz.toml", std::env::temp_dir()) {
                assert!(e.to_string().contains("fuzz.toml"), "{e}");
            }
        }
    });
}
