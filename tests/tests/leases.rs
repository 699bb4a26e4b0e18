//! Direct responses: once the dispatcher has written a worker's first
//! response on a connection, it passes the worker the socket (a lease) and
//! the worker writes the connection's responses itself. Whoever else has
//! something to write (another pool, the slow path, a time-out, the client
//! closing) makes the dispatcher take the lease back first, so responses
//! stay in request order whatever mix of writers a connection has.
//!
//! Who holds the socket is read from the kernel: the server side's inode in
//! /proc/net/tcp against the worker's /proc/<pid>/fd.

use std::{
    io::Write,
    net::Shutdown,
    time::{Duration, Instant},
};

use tests::{signal, wait_until, Client, Dispatcher, PoolDef};

/// How long a lease change (grant, give-back, close) may take to show.
const SETTLE: Duration = Duration::from_secs(5);
/// Requests pipelined in one write across two pools.
const PIPELINED: usize = 24;
/// Rounds of the pipelined mix (each starts from a leased connection).
const ROUNDS: usize = 5;
/// Requests [`leased`] makes at most before the worker must hold the socket.
const LEASE_TRIES: usize = 10;
/// The slow handler's time in the 502 test, and how long the test waits
/// for the worker to have taken the request.
const SLOW_MS: u64 = 5000;
const TAKE_MS: u64 = 300;
/// Header bytes that push a request past the kernel's head limit.
const LONG_HEADER: usize = 6000;

/// The inode of the server side of the connection from client port
/// `client_port` to `server_port` (from /proc/net/tcp).
fn server_inode(server_port: u16, client_port: u16) -> Option<u64> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    for line in tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
        if port(f[1]) == Some(server_port) && port(f[2]) == Some(client_port) {
            return f[9].parse().ok().filter(|i| *i != 0);
        }
    }
    None
}

/// Whether process `pid` has socket `inode` open.
fn holds(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    dir.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want))
}

/// Waits up to [`SETTLE`] for `cond`.
fn eventually(cond: impl FnMut() -> bool) -> bool {
    wait_until(SETTLE, Duration::from_millis(20), cond)
}

/// A GET answered by `pool` for `path`.
fn get_ok(c: &mut Client, path: &str, pool: &str) -> u32 {
    let r = c.get("x", path);
    assert_eq!((r.status, r.pool(), r.header("x-echo-path")), (200, pool, Some(path)), "{r:?}");
    r.worker_pid()
}

/// Requests on `c` to pool `a` until its worker holds the socket (the
/// first grant can lose a race with the client's next request; the worker
/// then asks again). Returns the worker's pid and the socket's inode.
fn leased(d: &Dispatcher, c: &mut Client) -> (u32, u64) {
    let mut pid = 0;
    let mut inode = 0;
    for i in 0..LEASE_TRIES {
        pid = get_ok(c, &format!("/a/lease{i}"), "a");
        // Known once the dispatcher accepted the connection (it has).
        inode = server_inode(d.port, c.stream.local_addr().unwrap().port()).expect("connection in /proc/net/tcp");
        if wait_until(Duration::from_millis(200), Duration::from_millis(10), || holds(pid, inode)) {
            return (pid, inode);
        }
    }
    panic!("worker {pid} never got socket {inode} in {LEASE_TRIES} requests:\n{}", d.log());
}

/// Pools `a` and `b`, where the test can run (`None` skips it).
fn two_pools(extra: &str) -> Option<Dispatcher> {
    Dispatcher::start_if_privileged(&[PoolDef::echo("a", &["*/a/"]), PoolDef::echo("b", &["*/b/"])], extra)
}

/// [`two_pools`] and a connection leased to pool `a`'s worker: the
/// dispatcher, the connection, the worker's pid and the socket's inode.
fn leased_connection(extra: &str) -> Option<(Dispatcher, Client, u32, u64)> {
    let d = two_pools(extra)?;
    let mut c = d.connect();
    let (pid, inode) = leased(&d, &mut c);
    Some((d, c, pid, inode))
}

#[test]
fn a_keep_alive_connection_is_leased_to_its_worker_and_given_up_at_close() {
    let Some((_d, mut c, pid, inode)) = leased_connection("") else { return };
    // Written by the worker itself now.
    for i in 1..5 {
        assert_eq!(get_ok(&mut c, &format!("/a/{i}"), "a"), pid);
    }
    assert!(holds(pid, inode));
    drop(c);
    assert!(eventually(|| !holds(pid, inode)), "worker {pid} kept socket {inode} after the client closed");
}

#[test]
fn a_large_first_response_is_relayed_in_parts_and_still_earns_the_lease() {
    let Some(d) = two_pools("") else { return };
    // 3 MB through the dispatcher (paced parts, the last asking for the
    // lease), pipelined with a small one behind it.
    let mut c = d.connect();
    c.send(b"GET /a/bytes/3000000 HTTP/1.1\r\nHost: x\r\n\r\nGET /a/small HTTP/1.1\r\nHost: x\r\n\r\n");
    let big = c.read_response();
    assert_eq!((big.status, big.body.len()), (200, 3_000_000), "{:?}", big.headers);
    assert!(big.body.iter().all(|&b| b == b'x'));
    assert_eq!(c.read_response().header("x-echo-path"), Some("/a/small"));
    let (pid, inode) = leased(&d, &mut c);
    let big = c.get("x", "/a/bytes/3000000");
    assert_eq!((big.status, big.body.len(), big.worker_pid()), (200, 3_000_000, pid));
    assert!(holds(pid, inode));
}

#[test]
fn with_direct_responses_off_the_worker_never_holds_the_socket() {
    let Some(d) = two_pools("[fast_path]\ndirect_responses = false\n") else { return };
    let mut c = d.connect();
    let pid = get_ok(&mut c, "/a/0", "a");
    for i in 1..5 {
        get_ok(&mut c, &format!("/a/{i}"), "a");
    }
    let inode = server_inode(d.port, c.stream.local_addr().unwrap().port()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!holds(pid, inode));
}

#[test]
fn a_leased_connection_switching_pools_keeps_request_order() {
    let Some(d) = two_pools("") else { return };
    let mut c = d.connect();
    let mut n = 0;
    for _ in 0..ROUNDS {
        // Each round starts with the connection leased to `a`'s worker.
        leased(&d, &mut c);
        let mut batch = Vec::new();
        let mut want = Vec::new();
        for i in 0..PIPELINED {
            let pool = if i % 3 == 1 { "b" } else { "a" };
            let path = format!("/{pool}/{n}");
            batch.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
            want.push((pool, path));
            n += 1;
        }
        c.send(&batch);
        for (pool, path) in want {
            let r = c.read_response();
            assert_eq!((r.status, r.pool(), r.header("x-echo-path")), (200, pool, Some(path.as_str())), "{r:?}");
        }
    }
}

#[test]
fn a_slow_path_request_on_a_leased_connection_is_answered_in_order() {
    let Some((d, mut c, ..)) = leased_connection("") else { return };
    // Fast, slow (head too long for the kernel), fast: one write.
    let long = "v".repeat(LONG_HEADER);
    let batch = format!(
        "GET /a/2 HTTP/1.1\r\nHost: x\r\n\r\nGET /b/3 HTTP/1.1\r\nHost: x\r\nX-Long: {long}\r\n\r\nGET /a/4 HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    c.send(batch.as_bytes());
    for (pool, path) in [("a", "/a/2"), ("b", "/b/3"), ("a", "/a/4")] {
        let r = c.read_response();
        assert_eq!((r.status, r.pool(), r.header("x-echo-path")), (200, pool, Some(path)), "{r:?}");
    }
    get_ok(&mut c, "/a/5", "a");
    let stats = d.stats();
    assert!(stats["handoffs"]["head_too_large"].as_u64().unwrap() >= 1, "{stats}");
}

#[test]
fn a_half_closed_leased_connection_gets_its_answer_then_closes() {
    let Some((_d, mut c, pid, inode)) = leased_connection("") else { return };
    c.stream.write_all(b"GET /a/last HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    c.stream.shutdown(Shutdown::Write).unwrap();
    let r = c.read_response();
    assert_eq!((r.status, r.header("x-echo-path")), (200, Some("/a/last")));
    assert!(c.is_closed(), "the dispatcher kept a half-closed connection open");
    assert!(eventually(|| !holds(pid, inode)));
}

#[test]
fn an_idle_leased_connection_is_closed_at_the_keep_alive_timeout() {
    let limits = "[limits]\nheader_timeout_secs = 1\nresponse_timeout_secs = 1\nkeepalive_timeout_secs = 2\n";
    let Some((_d, mut c, pid, inode)) = leased_connection(limits) else { return };
    let t0 = Instant::now();
    assert!(c.is_closed(), "an idle leased connection stayed open");
    assert!(t0.elapsed() < tests::IO_TIMEOUT);
    assert!(eventually(|| !holds(pid, inode)));
}

/// Kills the worker that holds `c`'s lease (`pid`) and checks that the
/// connection goes on, answered by its replacement.
fn kill_holder_then_go_on(c: &mut Client, pid: u32) {
    signal(pid, libc::SIGKILL);
    let r = c.get_echoed("/a/after");
    assert_ne!(r.worker_pid(), pid);
}

#[test]
fn a_lease_holder_that_dies_before_writing_leaves_a_usable_connection() {
    let Some((_d, mut c, pid, _)) = leased_connection("") else { return };
    // Nothing was written under the lease, so the dispatcher takes the
    // connection back where the lease began; the restarted worker answers.
    kill_holder_then_go_on(&mut c, pid);
}

#[test]
fn a_lease_holder_that_dies_after_writing_leaves_the_connection_usable() {
    let Some((_d, mut c, pid, _)) = leased_connection("") else { return };
    assert_eq!(get_ok(&mut c, "/a/direct", "a"), pid);
    // Its trace shows the stream between two responses: the connection
    // goes on, answered by the replacement.
    kill_holder_then_go_on(&mut c, pid);
}

/// Sends `c` a slow request for pool `a`; `worker` says which process took
/// it (once one has). Kills that worker while it works: the request must get
/// a 502 at once, the connection must go on, and the log must say `why`.
/// `what` names the case in the messages.
fn kill_while_taken(d: &Dispatcher, c: &mut Client, worker: impl FnOnce() -> u32, why: &str, what: &str) {
    c.send(format!("GET /a/delay/{SLOW_MS}/x HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let pid = worker();
    std::thread::sleep(Duration::from_millis(TAKE_MS));
    signal(pid, libc::SIGKILL);
    let t0 = Instant::now();
    let r = c.read_response();
    assert_eq!(r.status, 502, "{what}: {r:?}");
    assert!(t0.elapsed() < Duration::from_millis(SLOW_MS), "{what}: the 502 waited for the slow handler's time");
    let r = c.get("x", "/a/next");
    assert_eq!((r.status, r.header("x-echo-path")), (200, Some("/a/next")), "{what}");
    assert!(d.log().contains(why), "{what}: {}", d.log());
}

#[test]
fn a_request_the_dead_worker_had_taken_gets_502_and_the_connection_goes_on() {
    let Some((d, mut c, pid, _)) = leased_connection("") else { return };
    // Taken by the worker, which then dies before answering.
    kill_while_taken(&d, &mut c, || pid, "going on from its last response", "a leased connection");
}

#[test]
fn a_request_taken_on_a_connection_without_a_lease_gets_502_when_its_worker_dies() {
    for extra in ["[fast_path]\ndirect_responses = false\n", ""] {
        let Some(d) = two_pools(extra) else { return };
        // With leases on, a connection's first request is answered
        // through the dispatcher: the worker holds no lease while it works.
        let mut c = d.connect();
        if !extra.is_empty() {
            get_ok(&mut c, "/a/0", "a");
        }
        let why = "the worker died while handling this request";
        kill_while_taken(&d, &mut c, || eventually_worker(&d), why, &format!("{extra:?}"));
    }
}

/// The one worker `d` runs, once it runs.
fn eventually_worker(d: &Dispatcher) -> u32 {
    let mut w = Vec::new();
    assert!(eventually(|| {
        w = d.workers();
        w.len() == 1
    }));
    w[0]
}

/// The lease gate (sk_msg on `conns`): a worker that kept a duplicate of a
/// leased socket writes into it after its lease came back. With the gate
/// on, the kernel refuses the write (EACCES), nothing reaches the client,
/// the attempt is counted and the dispatcher closes the connection; with
/// it off, the forged response reaches the client, which is what the gate
/// is for.
#[test]
fn a_worker_that_kept_a_leased_socket_cannot_write_into_it_after_the_lease_came_back() {
    let Some(strike) = strike_after_release("[fast_path]\nlease_gate = true\n") else { return };
    assert!(!strike.report.is_empty(), "the hostile worker kept no socket");
    for line in strike.report.lines() {
        assert!(line.ends_with(" err 13"), "a forged write was not refused with EACCES: {line}");
    }
    assert!(
        strike.rest.is_empty(),
        "the client got bytes after its last answer: {:?}",
        String::from_utf8_lossy(&strike.rest)
    );
    let stats = strike.d.stats();
    assert!(stats["lease_gate"]["refused"].as_u64().unwrap() >= 1, "{stats}");
    assert!(strike.d.log().contains("lease gate refused a write"), "{}", strike.d.log());
}

#[test]
fn without_the_lease_gate_a_kept_socket_lets_a_worker_forge_answers() {
    // The default (the gate costs too much on large files to be on).
    let Some(strike) = strike_after_release("") else { return };
    assert!(strike.report.lines().any(|l| l.contains(" ok ")), "{}", strike.report);
    assert!(String::from_utf8_lossy(&strike.rest).contains("INJECTED"), "{:?}", String::from_utf8_lossy(&strike.rest));
}

/// What [`strike_after_release`] saw.
struct Strike {
    d: Dispatcher,
    /// The hostile worker's outcome per kept socket.
    report: String,
    /// What the client read after its last answer, until the connection
    /// closed or went quiet.
    rest: Vec<u8>,
    _dir: tests::TempDir,
}

/// A connection leased to `hostile_worker` (tests/src/bin), which keeps a
/// duplicate of the socket; the lease taken back for good by a slow-path
/// request; then the worker's forged write.
fn strike_after_release(extra: &str) -> Option<Strike> {
    if !tests::privileged() {
        return None;
    }
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = tests::TempDir::new(&format!("hostile{}x{n}", std::process::id()));
    // The worker runs unprivileged: it reads the trigger and writes its
    // report here.
    std::fs::set_permissions(&dir.path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let (trigger, report) = (dir.path.join("strike"), dir.path.join("report"));
    let command = tests::bin_dir().join("hostile_worker").display().to_string();
    let env = format!("env = {{ HOSTILE_TRIGGER = {:?}, HOSTILE_REPORT = {:?} }}", trigger.display(), report.display());
    let pool = PoolDef { name: "h", routes: &["*/"], args: &[], extra: &env, command: Some(&command) };
    let d = Dispatcher::start(&[pool], extra);
    let mut c = d.connect();
    let port = c.stream.local_addr().unwrap().port();
    let mut leased = false;
    for i in 0..LEASE_TRIES {
        let r = c.get("x", &format!("/{i}"));
        assert_eq!((r.status, String::from_utf8_lossy(&r.body).to_string()), (200, format!("ok /{i}")));
        let inode = server_inode(d.port, port).expect("connection in /proc/net/tcp");
        let worker = d.workers().first().copied().unwrap_or(0);
        if wait_until(Duration::from_millis(200), Duration::from_millis(10), || holds(worker, inode)) {
            leased = true;
            break;
        }
    }
    assert!(leased, "the hostile worker never got the socket:\n{}", d.log());
    // Its thread looks every 2 ms; then the lease comes back for good
    // (user space takes a connection whose head the kernel cannot frame).
    std::thread::sleep(Duration::from_millis(100));
    let long = "v".repeat(LONG_HEADER);
    c.send(format!("GET /slow HTTP/1.1\r\nHost: x\r\nX-Long: {long}\r\n\r\n").as_bytes());
    let r = c.read_response();
    assert_eq!((r.status, String::from_utf8_lossy(&r.body).to_string()), (200, "ok /slow".to_string()));
    std::fs::write(&trigger, b"").unwrap();
    assert!(eventually(|| report.exists()), "the hostile worker did not strike:\n{}", d.log());
    std::thread::sleep(Duration::from_millis(50));
    let report = std::fs::read_to_string(&report).unwrap();
    // A refused write closes the connection; an accepted one is read,
    // then the connection is quiet.
    let rest = c.rest_until_quiet(Duration::from_secs(2));
    Some(Strike { d, report, rest, _dir: dir })
}
