//! HTTP/1.1 upgrades through a pool: a WebSocket echo (the `/ws` route of
//! examples/apps/node/server.js) in a `proxy` pool, from a raw client:
//! the 101, messages both ways (one sent with the request, before the
//! 101), a tunnel left quiet past the dispatcher's time-outs and the pool's
//! idle time-out, each side closing; the tunnel spliced in the kernel
//! (sockmap redirects), or copied by the worker when splicing is off; and
//! upgrades that are declined (the connection goes on as HTTP).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use tests::{Dispatcher, PoolDef, TempDir};

/// The Node example, copied where the workers can read it (a directory per
/// test: they run at once).
fn node_dir(test: &str) -> TempDir {
    let d = TempDir::new(&format!("ws-{test}-{}", std::process::id()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/apps/node/server.js");
    std::fs::copy(&src, d.path.join("server.js")).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
    d.make_readable();
    d
}

/// A node pool (and an echo pool under /echo/), with `extra` TOML for the
/// node pool's table and `top` for the file's.
fn start(dir: &TempDir, extra: &str, top: &str) -> Option<Dispatcher> {
    let script = dir.path.join("server.js").display().to_string();
    Dispatcher::start_if_privileged(
        &[
            PoolDef {
                name: "node",
                routes: &["*/"],
                args: &["proxy", "--socket", "fds", "--", "node", &script],
                extra,
                command: None,
            },
            PoolDef::echo("echo", &["*/echo/"]),
        ],
        top,
    )
}

const UPGRADE: &str =
    "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A client frame (masked, as RFC 6455 wants from clients).
fn frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | op];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one server frame: (opcode, payload).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("a frame's head");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).expect("a frame's payload");
    (h[0] & 0x0f, p)
}

/// Sends the upgrade (and `early`, in the same write) and reads the 101's
/// head.
fn upgrade(d: &Dispatcher, early: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = UPGRADE.as_bytes().to_vec();
    req.extend_from_slice(early);
    s.write_all(&req).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).expect("the answer's head"), 1, "closed: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    (s, String::from_utf8_lossy(&head).to_string())
}

fn is_eof(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0)) || matches!(s.read(&mut b), Ok(0))
}

/// Bytes of spliced tunnels the kernel redirected (`dispatcher stats`).
fn redirected(d: &Dispatcher) -> u64 {
    d.stats()["tunnels"]["redirected_bytes"].as_u64().unwrap_or(0)
}

#[test]
fn a_websocket_echo_goes_through_a_proxy_pool_and_the_client_closes_it() {
    echo_and_close("echo", "");
}

#[test]
fn a_websocket_echo_copied_by_the_worker_when_splicing_is_off() {
    echo_and_close("copied", "[fast_path]\ntunnel_splice = false\n");
}

fn echo_and_close(test: &str, top: &str) {
    let spliced = top.is_empty();
    let dir = node_dir(test);
    let Some(d) = start(&dir, "", top) else { return };
    // A first message sent with the request, before the 101 (the
    // dispatcher hands it over with the connection).
    let (mut s, head) = upgrade(&d, &frame(1, b"early"));
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}\n{}", d.log());
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket") && lower.contains("connection: upgrade"), "{head}");
    // RFC 6455's own example key and its accept value.
    assert!(lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    assert_eq!(read_frame(&mut s), (1, b"early".to_vec()));
    // 24 MiB goes past a spliced tunnel's in-flight limit (4 MiB) each
    // way: the dispatcher forwards what the kernel passes up then, in
    // order with what the kernel redirected.
    for n in [5usize, 300, 70_000, 1 << 20, 24 << 20] {
        let msg: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        s.write_all(&frame(2, &msg)).unwrap();
        let (op, got) = read_frame(&mut s);
        assert_eq!((op, got.len()), (2, n));
        assert!(got == msg, "a {n}-byte message came back different");
    }
    // Both ways through the kernel (the 1 MiB message there and back), or
    // not at all.
    let r = redirected(&d);
    if spliced {
        assert!(r >= 2 << 20, "the kernel redirected only {r} bytes: {}\n{}", d.stats(), d.log());
        let passed = d.stats()["tunnels"]["passed_bytes"].as_u64().unwrap_or(0);
        assert!(passed > 0, "the kernel never passed bytes up past the in-flight limit: {}", d.stats());
    } else {
        assert_eq!(r, 0, "{}", d.stats());
    }
    // The client closes: the app answers the close and ends; the client
    // sees the end.
    s.write_all(&frame(8, &[3, 232])).unwrap();
    assert_eq!(read_frame(&mut s).0, 8);
    assert!(is_eof(&mut s), "the tunnel did not end after the close");
    // The dispatcher is fine and serves HTTP as before.
    assert_eq!(d.connect().get("x", "/").status, 200);
}

#[test]
fn a_quiet_tunnel_outlives_the_time_outs_and_the_app_closing_ends_it() {
    let dir = node_dir("quiet");
    let top = "[limits]\nkeepalive_timeout_secs = 1\nresponse_timeout_secs = 1\nheader_timeout_secs = 1\n";
    let Some(d) = start(&dir, "idle_timeout_secs = 1\n", top) else { return };
    let (mut s, head) = upgrade(&d, b"");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}\n{}", d.log());
    // Quiet for three times every time-out: the tunnel stays (spliced in
    // the kernel, it does not need the worker, which may idle out).
    std::thread::sleep(Duration::from_secs(3));
    s.write_all(&frame(1, b"still there?")).unwrap();
    assert_eq!(read_frame(&mut s), (1, b"still there?".to_vec()), "{}", d.log());
    // The app closes: the client gets its close, then the end.
    s.write_all(&frame(1, b"bye")).unwrap();
    assert_eq!(read_frame(&mut s).0, 8);
    assert!(is_eof(&mut s), "the tunnel did not end when the app closed");
}

#[test]
fn a_tunnel_idle_past_its_time_out_is_closed() {
    let dir = node_dir("idle");
    let script = dir.path.join("server.js").display().to_string();
    let Some(d) = Dispatcher::start_if_privileged(
        &[PoolDef::worker(
            "node",
            &["*/"],
            &["proxy", "--socket", "fds", "--tunnel-idle-timeout", "1", "--", "node", &script],
        )],
        "",
    ) else {
        return;
    };
    let (mut s, head) = upgrade(&d, b"");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    // Traffic keeps it open...
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        s.write_all(&frame(1, b"ping")).unwrap();
        assert_eq!(read_frame(&mut s), (1, b"ping".to_vec()));
    }
    // ...silence ends it.
    let t0 = std::time::Instant::now();
    assert!(is_eof(&mut s), "still open after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(5), "closed only after {:?}", t0.elapsed());
    assert!(d.wait_log(Duration::from_secs(2), |l| l.contains("a tunnel idle for 1s closed")), "{}", d.log());
}

#[test]
fn an_upgrade_the_dispatcher_answers_itself_leaves_the_connection_to_http() {
    let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::echo("echo", &["*/echo/"])], "") else { return };
    let mut c = d.connect();
    // No route: the dispatcher's 404, then the next request is parsed.
    c.send(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nGET /echo/next HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.read_response().status, 404);
    let r = c.read_response();
    assert_eq!((r.status, r.header("x-echo-path")), (200, Some("/echo/next")), "{r:?}");
}

#[test]
fn a_declined_upgrade_leaves_the_connection_to_http() {
    let dir = node_dir("declined");
    let Some(d) = start(&dir, "", "") else { return };
    let mut c = d.connect();
    // The native echo pool does not upgrade: a 200, and the next request
    // on the connection is served.
    c.send(b"GET /echo/a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nGET /echo/b HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.read_response();
    assert_eq!((r.status, r.header("x-echo-path")), (200, Some("/echo/a")), "{r:?}");
    let r = c.read_response();
    assert_eq!((r.status, r.header("x-echo-path")), (200, Some("/echo/b")), "{r:?}");
    // The node app refuses an upgrade to another path (400): the
    // connection goes on.
    let mut c = d.connect();
    c.send(b"GET /headers HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 400, "{r:?}\n{}", d.log());
    let r = c.get("x", "/");
    assert_eq!(r.status, 200, "{r:?}");
}

/// A pool of `upgrade_echo` (tests/src/bin: 101 to anything, then every
/// byte back, no framing).
fn start_raw_echo(top: &str) -> Option<Dispatcher> {
    let app = tests::bin_dir().join("upgrade_echo").display().to_string();
    Dispatcher::start_if_privileged(&[PoolDef::worker("raw", &["*/"], &["proxy", "--", &app])], top)
}

/// Bulk both ways at once on several spliced tunnels: each client writes
/// while it reads the echo, so both directions run past the in-flight
/// limit together (one waiting for the other once stalled the tunnel at
/// 4 MiB); every byte comes back, in order.
#[test]
fn bulk_echoes_both_ways_at_once_through_spliced_tunnels() {
    let Some(d) = start_raw_echo("") else { return };
    const EACH: usize = 24 << 20;
    let port = d.port;
    let clients: Vec<_> = (0..3)
        .map(|k| {
            std::thread::spawn(move || {
                let mut s = raw_upgrade(port);
                let data: Vec<u8> = (0..EACH).map(|i| ((i * 13 + k * 7) % 251) as u8).collect();
                let mut w = s.try_clone().unwrap();
                let sent = data.clone();
                let writer = std::thread::spawn(move || {
                    for piece in sent.chunks(256 << 10) {
                        w.write_all(piece).unwrap();
                    }
                });
                let mut got = vec![0u8; EACH];
                s.read_exact(&mut got).expect("the whole echo");
                writer.join().unwrap();
                assert!(got == data, "tunnel {k}: the echo came back different");
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap_or_else(|_| panic!("a tunnel failed: {}\n{}", d.stats(), d.log()));
    }
    assert!(redirected(&d) >= 8 << 20, "the kernel redirected only {} bytes: {}", redirected(&d), d.stats());
}

/// A client that vanishes (reset) in the middle of a bulk echo, with the
/// app blocked writing into the tunnel: the app's connection is reset
/// too, not left to an orphaned socket nobody reads.
#[test]
fn a_client_reset_in_the_middle_of_a_spliced_echo_resets_the_app() {
    let Some(d) = start_raw_echo("") else { return };
    let mut s = raw_upgrade(d.port);
    // Written, never read: every queue on the way fills up.
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let piece = vec![7u8; 256 << 10];
    for _ in 0..128 {
        if s.write_all(&piece).is_err() {
            break;
        }
    }
    // Gone the hard way, as a killed client goes with unread bytes.
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt of a struct linger on our socket.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(s);
    assert!(
        d.wait_log(Duration::from_secs(10), |l| l.contains("upgrade_echo: a connection ended")),
        "the app's side of the tunnel is still open: {}",
        d.log()
    );
    // The dispatcher goes on: a new tunnel echoes.
    let mut s = raw_upgrade(d.port);
    s.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still here");
}

/// A tunnel to `upgrade_echo`, after its 101.
fn raw_upgrade(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /raw HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).expect("the answer's head"), 1, "closed: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "), "{}", String::from_utf8_lossy(&head));
    s
}
