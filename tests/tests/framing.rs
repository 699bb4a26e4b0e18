//! Framing across segments: bodies, heads split byte by byte, several
//! requests in one write, malformed input.

use std::{io::Write, thread, time::Duration};

use tests::{checksum, Dispatcher, PoolDef};

/// Size of the large POST.
const BIG_BODY: usize = 1 << 20;

/// Pools `a`, `b` and `root`, where the test can run (`None` skips it).
fn echo_pools(extra: &str) -> Option<Dispatcher> {
    Dispatcher::start_if_privileged(
        &[PoolDef::echo("a", &["*/a"]), PoolDef::echo("b", &["*/b"]), PoolDef::echo("root", &["*/"])],
        extra,
    )
}

fn body_of_echo(body: &[u8]) -> &[u8] {
    let at = body.windows(4).position(|w| w == b"\r\n\r\n").expect("echo head") + 4;
    &body[at..]
}

fn big_body() -> Vec<u8> {
    (0..BIG_BODY).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
}

fn post_big(d: &Dispatcher) {
    let body = big_body();
    let mut c = d.connect();
    c.send(format!("POST /a/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    c.send(&body);
    let r = c.read_response();
    assert_eq!((r.status, r.pool()), (200, "a"));
    assert_eq!(r.header("x-echo-body-length"), Some(BIG_BODY.to_string().as_str()));
    let got = body_of_echo(&r.body);
    assert_eq!(got.len(), body.len());
    assert_eq!(checksum(got), checksum(&body));
    // And the connection goes on.
    c.get_from("x", "/b", "b");
}

#[test]
fn one_mib_post_through_the_slow_path() {
    let Some(d) = echo_pools("") else { return };
    post_big(&d);
    assert!(d.stats()["handoffs"]["body_too_large"].as_u64().unwrap() >= 1);
}

#[test]
fn one_mib_post_through_the_kernel() {
    let Some(d) = echo_pools(&format!("[fast_path]\nmax_body = {}\n", 2 * BIG_BODY)) else { return };
    post_big(&d);
    assert_eq!(d.pool_stat("a", "slow_parsed"), 0, "{}", d.stats());
    assert_eq!(d.pool_stat("a", "fast_body_bytes"), BIG_BODY as u64, "{}", d.stats());
}

#[test]
fn a_request_written_one_byte_at_a_time() {
    let Some(d) = echo_pools("") else { return };
    let mut c = d.connect();
    let req = b"POST /b/slowly HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    for b in req {
        c.stream.write_all(&[*b]).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    let r = c.read_response();
    assert_eq!((r.status, r.pool()), (200, "b"));
    assert_eq!(body_of_echo(&r.body), b"hello");
    assert_eq!(d.pool_stat("b", "slow_parsed"), 0, "split heads are framed in the kernel");
}

#[test]
fn two_requests_for_different_pools_in_one_write() {
    let Some(d) = echo_pools("") else { return };
    let mut c = d.connect();
    c.send(b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /b/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyzGET /3 HTTP/1.1\r\nHost: x\r\n\r\n");
    let r1 = c.read_response();
    let r2 = c.read_response();
    let r3 = c.read_response();
    assert_eq!((r1.status, r1.pool()), (200, "a"));
    assert_eq!((r2.status, r2.pool()), (200, "b"));
    assert_eq!(body_of_echo(&r2.body), b"xyz");
    assert_eq!((r3.status, r3.pool()), (200, "root"));
    assert_eq!(r1.header("x-echo-path"), Some("/a/1"));
}

#[test]
fn malformed_request_gets_400_and_only_its_connection_closes() {
    let Some(d) = echo_pools("") else { return };
    let mut good = d.connect();
    assert_eq!(good.get("x", "/a").status, 200);

    for garbage in [
        &b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    ] {
        let mut bad = d.connect();
        bad.send(garbage);
        let r = bad.read_response();
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(garbage));
        assert!(bad.is_closed(), "the bad connection must be closed");
        // The good connection is unaffected.
        good.get_from("x", "/b", "b");
    }
}

#[test]
fn connection_close_is_honoured() {
    let Some(d) = echo_pools("") else { return };
    let mut c = d.connect();
    c.send(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let r = c.read_response();
    assert_eq!((r.status, r.pool()), (200, "a"));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed());
}

#[test]
fn an_incomplete_head_gets_408_and_an_idle_connection_is_closed() {
    let Some(d) = echo_pools("[limits]\nheader_timeout_secs = 1\nkeepalive_timeout_secs = 2\n") else { return };
    // A head that never completes (held in the kernel's per-connection buffer).
    let mut c = d.connect();
    c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n");
    let t0 = std::time::Instant::now();
    let r = c.read_response();
    assert_eq!(r.status, 408);
    assert!(c.is_closed());
    assert!(t0.elapsed() < Duration::from_secs(10), "408 took {:?}", t0.elapsed());
    // An idle keep-alive connection is closed after its time-out, quietly.
    let mut idle = d.connect();
    assert_eq!(idle.get("x", "/a").status, 200);
    assert!(idle.try_read_response().is_none(), "expected a quiet close");
}

/// More pipelined requests in one write than the verdict's tail-call budget
/// (about 32 per segment).
const PIPELINED: usize = 48;

#[test]
fn many_pipelined_requests_in_one_write_are_all_answered_in_order() {
    let Some(d) = echo_pools("") else { return };
    let mut c = d.connect();
    let pool = |i: usize| if i.is_multiple_of(2) { "a" } else { "b" };
    let mut batch = Vec::new();
    for i in 0..PIPELINED {
        batch.extend_from_slice(format!("GET /{}/{i} HTTP/1.1\r\nHost: x\r\n\r\n", pool(i)).as_bytes());
    }
    c.send(&batch);
    for i in 0..PIPELINED {
        let pool = pool(i);
        let r = c.read_response();
        assert_eq!((r.status, r.pool()), (200, pool), "request {i}");
        assert_eq!(r.header("x-echo-path"), Some(format!("/{pool}/{i}").as_str()));
    }
    // The kernel framed what its budget allowed and handed over the rest.
    let stats = d.stats();
    let both =
        |field: &str| stats["pools"]["a"][field].as_u64().unwrap() + stats["pools"]["b"][field].as_u64().unwrap();
    let (fast, slow) = (both("fast_requests"), both("slow_parsed"));
    assert_eq!(fast + slow, PIPELINED as u64, "{stats}");
    assert!(fast >= 30, "{stats}");
    if slow > 0 {
        assert!(stats["handoffs"]["too_many_steps"].as_u64().unwrap() >= 1, "{stats}");
    }
}
