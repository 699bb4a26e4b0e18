//! A client that pipelines and does not read: the dispatcher stops reading
//! it (TCP pushes back) instead of holding every answer, and pipelined
//! uploads wait for each other instead of getting 503.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use tests::{checksum, rss_kib, Dispatcher, PoolDef};

/// The flood: up to 1,000,000 pipelined `GET`s on one connection
/// that reads nothing. Before, the dispatcher read them all and held an
/// answer for each (RSS 15 → 641 MB, never given back). Now it stops
/// reading at `max_pipelined` unanswered requests: the client's writes
/// block, the dispatcher's RSS grows by less than 32 MiB, and once the
/// client reads, every request it sent gets its answer, in order.
#[test]
fn a_client_that_pipelines_and_never_reads_is_pushed_back() {
    let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::echo("root", &["*/"])], "") else { return };
    let mut c = d.connect();
    assert_eq!(c.get("x", "/warm").status, 200);
    let before = rss_kib(d.pid());
    let req = b"GET /echo/x HTTP/1.1\r\nHost: x\r\n\r\n";
    let batch: Vec<u8> = req.iter().copied().cycle().take(req.len() * 1000).collect();
    c.stream.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sent = 0usize;
    let mut torn = false;
    let t0 = Instant::now();
    while sent < 1_000_000 && t0.elapsed() < Duration::from_secs(60) {
        match c.stream.write(&batch) {
            Ok(n) if n == batch.len() => sent += 1000,
            Ok(n) => {
                // Only whole requests count (a torn last one is never answered).
                sent += n / req.len();
                torn = n % req.len() != 0;
                break;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) => panic!("writing: {e}"),
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let grown = rss_kib(d.pid()).saturating_sub(before);
    eprintln!("sent {sent} requests before the writes blocked; the dispatcher grew by {grown} KiB");
    assert!(sent < 1_000_000, "the writes never blocked: the dispatcher read everything");
    assert!(grown < 32 * 1024, "the dispatcher grew by {grown} KiB");
    // Now read: every request sent is answered, in order, on this connection.
    c.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for i in 0..sent {
        let r = c.read_response();
        assert_eq!(r.status, 200, "answer {i} of {sent}");
    }
    if !torn {
        assert_eq!(c.get("x", "/after").status, 200);
    }
}

/// Two pipelined 1 MiB uploads with the default 2 MiB queue: the second
/// waits for the first instead of getting 503 "queue is full".
#[test]
fn pipelined_uploads_wait_for_each_other() {
    let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::echo("root", &["*/"])], "") else { return };
    let body: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut c = d.connect();
    let mut wire = Vec::new();
    for _ in 0..3 {
        wire.extend_from_slice(
            format!("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
        );
        wire.extend_from_slice(&body);
    }
    let writer = {
        let mut s = c.stream.try_clone().unwrap();
        std::thread::spawn(move || s.write_all(&wire).unwrap())
    };
    for i in 0..3 {
        let r = c.read_response();
        assert_eq!(r.status, 200, "upload {i}: {}", String::from_utf8_lossy(&r.body[..r.body.len().min(200)]));
        assert_eq!(r.header("x-echo-body-length"), Some("1048576"));
        let at = r.body.len() - body.len();
        assert_eq!(checksum(&r.body[at..]), checksum(&body), "upload {i}");
    }
    writer.join().unwrap();
}

/// The same flood paced so that each request arrives in its own segment:
/// the kernel frames every one (no hand-off for too many in a segment),
/// so it is the kernel that must stop taking them. The answers pile up in
/// the worker holding the lease (before: 477 MB after 200,000 requests
/// with 2 kB answers) or, without leases, in the dispatcher; past
/// `max_pending_bytes` the connection is paused in the kernel (`paused`,
/// hand-off reason `paused`), user space stops reading it, and the
/// client's writes block. Then every answer still arrives, in order.
#[test]
fn a_paced_flood_is_paused_in_the_kernel() {
    for direct in [true, false] {
        let extra = format!("[fast_path]\ndirect_responses = {direct}\n");
        let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::echo("root", &["*/"])], &extra) else { return };
        let mut c = d.connect();
        assert_eq!(c.get("x", "/warm").status, 200);
        let pids: Vec<u32> = std::iter::once(d.pid()).chain(d.workers()).collect();
        let before: u64 = pids.iter().map(|&p| rss_kib(p)).sum();
        c.stream.set_nodelay(true).unwrap();
        c.stream.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let req = b"GET /echo/bytes/2000 HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut sent = 0usize;
        let t0 = Instant::now();
        let blocked = loop {
            if t0.elapsed() > Duration::from_secs(30) {
                break false;
            }
            match c.stream.write(req) {
                Ok(n) if n == req.len() => sent += 1,
                Ok(_) => break true,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    break true
                }
                Err(e) => panic!("writing: {e}"),
            }
            if sent.is_multiple_of(10) {
                std::thread::sleep(Duration::from_micros(500));
            }
        };
        let grown = pids.iter().map(|&p| rss_kib(p)).sum::<u64>().saturating_sub(before);
        let stats = d.stats();
        eprintln!(
            "direct_responses = {direct}: {sent} requests in {:?}, blocked: {blocked}, grew {grown} KiB, hand-offs {}",
            t0.elapsed(),
            stats["handoffs"]
        );
        assert!(blocked, "direct_responses = {direct}: the writes never blocked in 30 s");
        assert!(grown < 32 * 1024, "direct_responses = {direct}: grew by {grown} KiB");
        let paused = stats["handoffs"]["paused"].as_u64().unwrap_or(0);
        let split = stats["handoffs"]["too_many_steps"].as_u64().unwrap_or(0);
        assert!(paused + split >= 1, "direct_responses = {direct}: {}", stats["handoffs"]);
        c.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        for i in 0..sent {
            let r = c.read_response();
            assert_eq!((r.status, r.body.len()), (200, 2000), "direct_responses = {direct}: answer {i} of {sent}");
        }
    }
}
