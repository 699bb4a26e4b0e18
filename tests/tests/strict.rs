//! Strict framing against the real dispatcher (RFC 9112 and RFC 9110
//! MUSTs where parsers differ): each malformed request gets its status
//! and the end of its connection, with a pipelined request behind it
//! never answered; the well-formed oddities are served as the RFCs say.

use std::time::{Duration, Instant};

use tests::{Dispatcher, PoolDef};

fn echo_pool() -> Option<Dispatcher> {
    Dispatcher::start_if_privileged(&[PoolDef::echo("root", &["*/"]), PoolDef::echo("other", &["other.example/"])], "")
}

const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

/// Sends `wire` then a pipelined request; expects `status` within 2 s,
/// then the connection's end with nothing else on it.
fn refused(d: &Dispatcher, wire: &[u8], status: u16) {
    let mut c = d.connect();
    let mut all = wire.to_vec();
    all.extend_from_slice(SMUGGLED);
    c.send(&all);
    let t0 = Instant::now();
    let r = c.read_response();
    assert_eq!(r.status, status, "{:?}: {}", String::from_utf8_lossy(wire), String::from_utf8_lossy(&r.body));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?} took {:?}", String::from_utf8_lossy(wire), t0.elapsed());
    let rest = c.rest_until_closed();
    assert!(
        rest.is_empty(),
        "{:?}: after the error: {:?}",
        String::from_utf8_lossy(wire),
        String::from_utf8_lossy(&rest)
    );
}

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut w = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    w.extend_from_slice(body);
    w
}

#[test]
fn chunk_size_lines_are_exactly_hex_digits() {
    let Some(d) = echo_pool() else { return };
    // The `+` sign (Rust's from_str_radix takes it) and the rest of the
    // leniencies a front proxy may not share.
    for size in [&b"+3"[..], b"-3", b"0x3", b" 3", b"3 ", b"00000000000000003"] {
        let mut body = size.to_vec();
        body.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
        refused(&d, &chunked(&body), 400);
    }
    // Well-formed extensions are accepted and ignored.
    let mut c = d.connect();
    c.send(&chunked(b"3 ; a=b ; c=\"x;y\"\r\nabc\r\n0\r\n\r\n"));
    let r = c.read_response();
    assert_eq!((r.status, r.header("x-echo-body-length")), (200, Some("3")));
}

/// A bare CR or LF in a chunk-size line or a trailer: before the fix, a
/// request smuggled behind a malformed chunk line was answered on its own
/// (a desync), and a bare LF left the client waiting for a CRLF.
#[test]
fn bare_cr_or_lf_in_chunked_framing_is_a_400_at_once() {
    let Some(d) = echo_pool() else { return };
    for body in [
        &b"3;ext\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"3;a\rb\r\nabc\r\n0\r\n\r\n",
        b"3\nabc\r\n0\r\n\r\n",
        b"0\r\nX: 1\n\r\n",
        b"0\r\nX: a\rb\r\n\r\n",
        b"0\r\n X: folded\r\n\r\n",
        b"0\n\r\n",
    ] {
        refused(&d, &chunked(body), 400);
    }
    // A lone LF with nothing after it is refused as it arrives.
    let mut c = d.connect();
    c.send(&chunked(b"3;x\n"));
    let t0 = Instant::now();
    assert_eq!(c.read_response().status, 400);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn host_must_be_one_valid_authority() {
    let Some(d) = echo_pool() else { return };
    for host in ["a b", "a, b", "a/path", "", "u@a", "a..b", "[::1", "a:99999x"] {
        refused(&d, format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(), 400);
    }
    refused(&d, b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400);
    // Valid forms are served: a port, an IPv6 literal, a trailing dot.
    let mut c = d.connect();
    for host in ["a:8080", "[::1]:80", "other.example.", "127.0.0.1"] {
        let r = c.get(host, "/");
        assert_eq!(r.status, 200, "{host}");
        assert_eq!(r.header("x-echo-host"), Some(host));
    }
}

/// RFC 9112 §3.2.2: an absolute-form target's authority is the host (the
/// Host field is ignored), and the worker gets the request as an origin
/// server expects it: origin-form, with that authority as Host.
#[test]
fn absolute_form_is_routed_and_forwarded_by_its_authority() {
    let Some(d) = echo_pool() else { return };
    let mut c = d.connect();
    c.send(b"GET http://other.example/x?q=1 HTTP/1.1\r\nHost: a\r\n\r\n");
    let r = c.read_response();
    assert_eq!((r.status, r.pool()), (200, "other"));
    assert_eq!(r.header("x-echo-host"), Some("other.example"));
    assert_eq!(r.header("x-echo-path"), Some("/x"));
    let head = String::from_utf8_lossy(&r.body);
    assert!(head.starts_with("GET /x?q=1 HTTP/1.1\r\n"), "{head}");
    assert!(!head.contains("Host: a\r\n"), "{head}");
    refused(&d, b"GET http://u@other.example/ HTTP/1.1\r\nHost: a\r\n\r\n", 400);
}

#[test]
fn versions_and_expectations() {
    let Some(d) = echo_pool() else { return };
    // HTTP/1.2 is served as 1.1 (RFC 9112 §2.3); HTTP/2.0 on this port is 505.
    let mut c = d.connect();
    c.send(b"GET /v HTTP/1.2\r\nHost: x\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).starts_with("GET /v HTTP/1.1\r\n"));
    assert_eq!(c.get("x", "/again").status, 200, "1.1 semantics: kept alive");
    refused(&d, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505);
    // No 1xx to an HTTP/1.0 client (RFC 9110 §15.2): its Expect is ignored.
    let mut c = d.connect();
    c.send(b"POST /e HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
    std::thread::sleep(Duration::from_millis(300));
    c.send(b"hi");
    let all = String::from_utf8_lossy(&c.rest_until_closed()).to_string();
    assert!(all.starts_with("HTTP/1.1 200 "), "the first status line must be the final one: {all}");
    assert!(all.to_ascii_lowercase().contains("x-echo-body-length: 2\r\n"), "{all}");
}

#[test]
fn a_long_target_is_414_whatever_limit_it_reaches() {
    let Some(d) = echo_pool() else { return };
    for len in [9 * 1024, 100 * 1024] {
        let target = "a".repeat(len);
        refused(&d, format!("GET /{target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(), 414);
    }
}
