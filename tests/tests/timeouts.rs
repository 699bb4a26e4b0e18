//! Time-outs that mean what they say, against the real dispatcher with
//! raw-socket clients: a drip-fed head is cut at the header limit counted
//! from its first byte, a silent connection at the same limit, a stalled or
//! too slow body with a 408, and a client that leaves mid-body frees its
//! connection at once (not a 504 to a dead socket a minute later), so
//! SIGTERM afterwards exits promptly.

use std::{
    io::Write,
    net::Shutdown,
    thread,
    time::{Duration, Instant},
};

use tests::{Client, Dispatcher, PoolDef};

const LIMITS: &str = "[limits]\nheader_timeout_secs = 2\nbody_timeout_secs = 2\nkeepalive_timeout_secs = 30\nresponse_timeout_secs = 30\nmin_body_rate = 150\n";

/// The dispatcher with short limits, and its metrics port.
fn start() -> Option<(Dispatcher, u16)> {
    let port = tests::free_port();
    let extra = format!("{LIMITS}[admin]\nmetrics = \"127.0.0.1:{port}\"\n");
    Dispatcher::start_if_privileged(&[PoolDef::echo("root", &["*/"])], &extra).map(|d| (d, port))
}

/// Writes `head` one byte every `every` until the server answers or closes
/// (or `limit` passes); returns the status it answered with (0: closed
/// without one) and when.
fn drip(c: &mut Client, head: &[u8], every: Duration, limit: Duration) -> (u16, Duration) {
    c.stream.set_nonblocking(false).unwrap();
    let t0 = Instant::now();
    for &b in head.iter().cycle() {
        if t0.elapsed() > limit || c.stream.write_all(&[b]).is_err() {
            break;
        }
        c.stream.set_read_timeout(Some(every)).unwrap();
        let mut peek = [0u8; 1];
        match c.stream.peek(&mut peek) {
            Ok(_) => break,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let at = t0.elapsed();
    c.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (c.try_read_response().map_or(0, |r| r.status), at)
}

/// `dispatcher_timeouts_total{kind}` from the metrics endpoint.
fn metric(port: u16, kind: &str) -> u64 {
    gauge(port, &format!("dispatcher_timeouts_total{{kind=\"{kind}\"}}"))
}

/// The sample `series` (name and labels) from the metrics endpoint.
fn gauge(port: u16, series: &str) -> u64 {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let needle = format!("{series} ");
    text.lines().find_map(|l| l.strip_prefix(&needle)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn a_drip_fed_head_is_cut_at_the_header_limit() {
    let Some((d, port)) = start() else { return };
    // Framed in the kernel (a plain head) and on the slow path (the
    // Transfer-Encoding field hands it over; the rest drips into user space).
    for (what, head) in [
        ("kernel", &b"GET /drip HTTP/1.1\r\nHost: x\r\nX-Drip: "[..]),
        ("slow path", b"POST /drip HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Drip: "),
    ] {
        let mut c = d.connect();
        let mut wire = head.to_vec();
        wire.extend(std::iter::repeat_n(b'a', 4096));
        let (status, at) = drip(&mut c, &wire, Duration::from_millis(300), Duration::from_secs(20));
        assert_eq!(status, 408, "{what}: after {at:?}");
        // 2 s from the first byte, looked at every 2 s (and each second).
        assert!(at >= Duration::from_millis(1900) && at < Duration::from_secs(6), "{what}: 408 after {at:?}");
        assert!(c.is_closed(), "{what}");
    }
    assert!(metric(port, "header") >= 2);
}

#[test]
fn a_connection_that_sends_nothing_is_closed_at_the_header_limit() {
    let Some((d, port)) = start() else { return };
    let mut c = d.connect();
    let t0 = Instant::now();
    c.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(c.is_closed());
    let at = t0.elapsed();
    // Not the 30 s keep-alive limit.
    assert!(at >= Duration::from_millis(1900) && at < Duration::from_secs(6), "closed after {at:?}");
    assert!(metric(port, "silent") >= 1);
    // After a request, the keep-alive limit applies instead.
    let mut c = d.connect();
    assert_eq!(c.get("x", "/a").status, 200);
    c.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(std::io::Read::read(&mut c.stream, &mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a kept-alive connection is not cut at the header limit"
    );
}

#[test]
fn a_stalled_body_gets_408_on_either_path() {
    let Some((d, port)) = start() else { return };
    // 5,000 of 100,000 bytes (over the kernel's body limit: the slow path),
    // and 100 of 5,000 (the kernel copies it).
    for (what, len, sent) in [("slow path", 100_000, 5000), ("kernel", 5000, 100)] {
        let mut c = d.connect();
        c.send(format!("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").as_bytes());
        c.send(&vec![b'b'; sent]);
        let t0 = Instant::now();
        let r = c.read_response();
        assert_eq!(r.status, 408, "{what}");
        assert!(t0.elapsed() < Duration::from_secs(6), "{what}: {:?}", t0.elapsed());
        assert!(c.is_closed(), "{what}");
    }
    // Stalled, or (the kernel's 100 bytes in 2 s) also under the rate.
    assert!(metric(port, "body_stalled") + metric(port, "body_too_slow") >= 2);
}

#[test]
fn a_body_slower_than_the_minimum_rate_gets_408() {
    let Some((d, port)) = start() else { return };
    let mut c = d.connect();
    c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
    // 40 B/s, never silent for long: only the rate catches it.
    let t0 = Instant::now();
    let mut status = 0;
    while t0.elapsed() < Duration::from_secs(15) {
        if c.stream.write_all(&[b'c'; 10]).is_err() {
            break;
        }
        c.stream.set_read_timeout(Some(Duration::from_millis(250))).unwrap();
        let mut peek = [0u8; 1];
        if c.stream.peek(&mut peek).is_ok() {
            c.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            status = c.try_read_response().map_or(0, |r| r.status);
            break;
        }
    }
    assert_eq!(status, 408, "after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    assert_eq!(metric(port, "body_too_slow"), 1);
}

/// The vanishing clients: `Content-Length: 100000`, 5,000 bytes,
/// then gone. Each connection ends within a second and nothing is written
/// to it; SIGTERM afterwards takes well under the drain limit.
#[test]
fn a_client_that_leaves_mid_body_is_freed_at_once() {
    let Some(mut d) = Dispatcher::start_if_privileged(
        &[PoolDef::echo("root", &["*/"])],
        "[limits]\nresponse_timeout_secs = 60\nbody_timeout_secs = 60\ndrain_secs = 5\n",
    ) else {
        return;
    };
    for (what, len, sent) in [("slow path", 100_000usize, 5000usize), ("kernel", 5000, 100)] {
        let clients: Vec<Client> = (0..20)
            .map(|_| {
                let mut c = d.connect();
                c.send(format!("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").as_bytes());
                c.send(&vec![b'v'; sent]);
                c
            })
            .collect();
        thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        for mut c in clients {
            c.stream.shutdown(Shutdown::Write).unwrap();
            let rest = c.rest_until_closed();
            assert!(rest.is_empty(), "{what}: {:?}", String::from_utf8_lossy(&rest));
        }
        assert!(t0.elapsed() < Duration::from_millis(1500), "{what}: 20 connections ended in {:?}", t0.elapsed());
    }
    // The worker was told: it serves on, and stops at once.
    assert_eq!(d.connect().get("x", "/after").status, 200);
    let t0 = Instant::now();
    assert!(d.stop(), "clean exit");
    assert!(t0.elapsed() < Duration::from_secs(3), "SIGTERM took {:?}", t0.elapsed());
}

/// A request the worker never finishes does not hold SIGTERM past the
/// drain limit.
#[test]
fn sigterm_waits_at_most_the_drain_limit() {
    let Some(mut d) = Dispatcher::start_if_privileged(&[PoolDef::echo("root", &["*/"])], "[limits]\ndrain_secs = 2\n")
    else {
        return;
    };
    let mut c = d.connect();
    // The echo worker's `/delay/MS` waits that long before answering.
    c.send(b"GET /delay/30000 HTTP/1.1\r\nHost: x\r\n\r\n");
    thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    d.stop();
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(5), "SIGTERM took {took:?}");
}

/// The slow reader: answers read one small piece a second. Once
/// the socket has refused bytes for `body_timeout_secs` and the client
/// took fewer than `min_body_rate` a second since, the connection is reset
/// (before, it stayed open indefinitely).
#[test]
fn a_client_reading_slower_than_the_minimum_rate_is_cut_off() {
    let Some((d, port)) = start() else { return };
    let mut c = d.connect();
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt with an int of its size on an open socket.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&c.stream),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &small as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    // A chunked request goes to the slow path, which then writes this
    // connection's answers itself: 8 MB of them.
    c.send(b"POST /echo/bytes/8000000 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    let t0 = Instant::now();
    let reader = thread::spawn(move || {
        // 100 bytes a second, for as long as the test looks.
        let mut b = [0u8; 50];
        while t0.elapsed() < Duration::from_secs(8) {
            match std::io::Read::read(&mut c.stream, &mut b) {
                Ok(0) | Err(_) => return,
                Ok(_) => thread::sleep(Duration::from_millis(500)),
            }
        }
    });
    // The reset reaches the client only after it has read what its
    // receive buffer holds (at this pace, a minute): the dispatcher's side
    // is what the test watches.
    assert!(
        tests::wait_until(Duration::from_secs(10), Duration::from_millis(100), || metric(port, "send_too_slow") == 1),
        "not cut off"
    );
    let at = t0.elapsed();
    assert!(at >= Duration::from_millis(1900) && at < Duration::from_secs(7), "cut off after {at:?}");
    assert!(
        tests::wait_until(Duration::from_secs(3), Duration::from_millis(50), || gauge(port, "dispatcher_connections")
            == 0),
        "the connection is still open"
    );
    reader.join().unwrap();
}
