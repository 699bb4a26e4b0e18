//! A soak: mixed load against a running dispatcher while its workers are
//! killed, recycled and reloaded, checking that every well-formed request
//! got its own correct answer (or a deliberate 502/503), that no
//! connection saw another's answer, and that the dispatcher's memory and
//! descriptors are back near where they started.
//!
//! Run by `tests/tests/soak.rs` (one minute, in `cargo xtask test`) and
//! by `cargo xtask soak --minutes N`.

use std::{
    io::{Read, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{checksum, rss_kib, Client, Dispatcher, PoolDef};

/// What the soak saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Well-formed requests answered with their own correct answer.
    pub ok: u64,
    /// Deliberate failures: 502 (a worker died holding it), 503 (no worker
    /// yet, or a queue full), or a connection closed under it by a dying
    /// worker.
    pub deliberate: u64,
    /// Answers that were wrong: another request's, a bad status, a bad
    /// body. Must be empty.
    pub wrong: Vec<String>,
    /// Malformed requests answered 400 and closed.
    pub refused: u64,
    /// Clients that vanished mid-request.
    pub vanished: u64,
    /// Chaos events (worker kills, recycles, reloads).
    pub chaos: u64,
    /// The dispatcher's RSS (KiB) and open descriptors at the start and
    /// at the end (after the clients left).
    pub rss_kib: (u64, u64),
    pub fds: (u64, u64),
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// The pools a soak runs against: `a` (recycled every 2,000 requests) and
/// `b`, both echo workers. The chaos kills a worker every 7.5 s, which
/// rapid-fail protection (5 crashes in 5 min) would rightly answer by
/// stopping the pool, so it is off here.
pub fn pools() -> Vec<PoolDef<'static>> {
    vec![
        PoolDef { extra: "recycle_requests = 2000\nrapid_fail_max_crashes = 0", ..PoolDef::echo("a", &["*/a"]) },
        PoolDef { extra: "rapid_fail_max_crashes = 0", ..PoolDef::echo("b", &["*/"]) },
    ]
}

struct Tally {
    start: Instant,
    ok: AtomicU64,
    deliberate: AtomicU64,
    refused: AtomicU64,
    vanished: AtomicU64,
    wrong: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn wrong(&self, what: String) {
        let mut w = self.wrong.lock().unwrap();
        if w.len() < 50 {
            w.push(what);
        }
    }
}

impl Tally {
    fn new() -> Tally {
        Tally {
            start: Instant::now(),
            ok: AtomicU64::new(0),
            deliberate: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            vanished: AtomicU64::new(0),
            wrong: Default::default(),
        }
    }
}

/// Reads one answer, or `None` if the connection ended (a worker died
/// with it, which is deliberate). An answer that does not come within the
/// client's read time-out (or stops part way) is a hang, never
/// deliberate: it is counted as wrong, with when it began.
fn answer(t: &Tally, c: &mut Client, what: &str) -> Option<crate::Response> {
    let asked = t.start.elapsed();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.try_read_response())) {
        Ok(r) => r,
        Err(e) => {
            let why = e.downcast_ref::<String>().cloned().unwrap_or_default();
            t.wrong(format!("{what}: asked at {:.1} s, no answer in time ({why})", asked.as_secs_f64()));
            None
        }
    }
}

/// Judges the answer to `GET path` (the echo worker reports the path).
fn judge_get(t: &Tally, path: &str, r: Option<crate::Response>) -> bool {
    match r {
        None => {
            t.deliberate.fetch_add(1, Ordering::Relaxed);
            false
        }
        Some(r) if r.status == 502 || r.status == 503 => {
            t.deliberate.fetch_add(1, Ordering::Relaxed);
            r.header("connection") != Some("close")
        }
        Some(r) if r.status == 200 && r.header("x-echo-path") == Some(path) => {
            t.ok.fetch_add(1, Ordering::Relaxed);
            true
        }
        Some(r) => {
            t.wrong(format!("GET {path}: {} {:?}", r.status, r.header("x-echo-path")));
            false
        }
    }
}

/// Runs the soak for `length` against `d`; `log` gets a progress line
/// every 10 s.
pub fn run(d: &Dispatcher, length: Duration, log: impl Fn(&str) + Send + Sync) -> Report {
    let pid = d.pid();
    // Settle, then the baseline.
    assert_eq!(d.connect().get("x", "/a/warm").status, 200);
    assert_eq!(d.connect().get("x", "/warm").status, 200);
    thread::sleep(Duration::from_millis(300));
    let start = (rss_kib(pid), fds(pid));
    let t = Arc::new(Tally::new());
    let stop = Arc::new(AtomicBool::new(false));
    let port = d.port;
    let mut load = Vec::new();
    // Keep-alive clients, each on its own paths.
    for k in 0..4 {
        let (t, stop) = (t.clone(), stop.clone());
        load.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut c = Client::connect(port);
                loop {
                    n += 1;
                    let path = format!("/{}/k{k}/{n}", if n.is_multiple_of(2) { "a" } else { "b" });
                    if c.stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).is_err() {
                        t.deliberate.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    if !judge_get(&t, &path, answer(&t, &mut c, &path)) || stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
        }));
    }
    // Pipelined clients: 16 requests in one write, answers in order.
    for k in 0..2 {
        let (t, stop) = (t.clone(), stop.clone());
        load.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut c = Client::connect(port);
                let paths: Vec<String> = (0..16u32)
                    .map(|i| {
                        n += 1;
                        format!("/{}/p{k}/{n}/{i}", if i.is_multiple_of(3) { "a" } else { "b" })
                    })
                    .collect();
                let wire: String = paths.iter().map(|p| format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n")).collect();
                if c.stream.write_all(wire.as_bytes()).is_err() {
                    continue;
                }
                for p in &paths {
                    if !judge_get(&t, p, answer(&t, &mut c, p)) {
                        break;
                    }
                }
            }
        }));
    }
    // Large bodies, checked end to end.
    {
        let (t, stop) = (t.clone(), stop.clone());
        load.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body: Vec<u8> = (0..256 * 1024).map(|i: u64| ((i * 31 + n) % 251) as u8).collect();
                let mut c = Client::connect(port);
                let path = format!("/b/up/{n}");
                let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
                if c.stream.write_all(head.as_bytes()).is_err() || c.stream.write_all(&body).is_err() {
                    t.deliberate.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match answer(&t, &mut c, &format!("POST {path}")) {
                    Some(r) if r.status == 200 && r.body.len() >= body.len() => {
                        let got = &r.body[r.body.len() - body.len()..];
                        if checksum(got) == checksum(&body) && r.header("x-echo-path") == Some(path.as_str()) {
                            t.ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            t.wrong(format!("POST {path}: a different body came back"));
                        }
                    }
                    Some(r) if r.status == 502 || r.status == 503 => {
                        t.deliberate.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        t.deliberate.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(r) => t.wrong(format!("POST {path}: {} ({} bytes)", r.status, r.body.len())),
                }
            }
        }));
    }
    // Malformed and vanishing clients.
    {
        let (t, stop) = (t.clone(), stop.clone());
        load.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut c = Client::connect(port);
                if n.is_multiple_of(2) {
                    let _ = c
                        .stream
                        .write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n");
                    match answer(&t, &mut c, "malformed chunk") {
                        Some(r) if r.status == 400 => {
                            t.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        // No worker yet to take the head: answered before
                        // its body is read.
                        Some(r) if r.status == 503 => {
                            t.deliberate.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(r) => t.wrong(format!("malformed chunk: {}", r.status)),
                        None => t.wrong("malformed chunk: no answer".into()),
                    }
                } else {
                    let _ = c.stream.write_all(b"POST /a/v HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
                    let _ = c.stream.write_all(&[b'v'; 5000]);
                    drop(c);
                    t.vanished.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    // Chaos: kill a worker, recycle, reload, in turn.
    let mut chaos = 0u64;
    let t0 = Instant::now();
    let mut next_log = Duration::from_secs(10);
    while t0.elapsed() < length {
        thread::sleep(Duration::from_millis(2500));
        chaos += 1;
        match chaos % 3 {
            0 => {
                if let Some(&w) = d.workers().first() {
                    // SAFETY: kill(2) on the dispatcher's own child.
                    unsafe { libc::kill(w as i32, libc::SIGKILL) };
                }
            }
            1 => {
                let _ = d.cli(&["recycle", "b"]);
            }
            _ => d.sighup(),
        }
        if t0.elapsed() >= next_log {
            next_log += Duration::from_secs(10);
            log(&format!(
                "[soak] {:>4}s: {} ok, {} deliberate 502/503, {} refused, {} vanished, {} chaos, {} wrong",
                t0.elapsed().as_secs(),
                t.ok.load(Ordering::Relaxed),
                t.deliberate.load(Ordering::Relaxed),
                t.refused.load(Ordering::Relaxed),
                t.vanished.load(Ordering::Relaxed),
                chaos,
                t.wrong.lock().unwrap().len()
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in load {
        let _ = h.join();
    }
    // The clients are gone: wait for the dispatcher to let go of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && fds(pid) > start.1 + 8 {
        thread::sleep(Duration::from_millis(100));
    }
    // A last request after the storm.
    let mut c = Client::connect(port);
    let mut last = String::new();
    let _ = c.stream.write_all(b"GET /b/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let _ = c.stream.read_to_string(&mut last);
    if !last.starts_with("HTTP/1.1 200") {
        t.wrong(format!("the request after the soak: {:?}", last.lines().next()));
    }
    let wrong = std::mem::take(&mut *t.wrong.lock().unwrap());
    Report {
        ok: t.ok.load(Ordering::Relaxed),
        deliberate: t.deliberate.load(Ordering::Relaxed),
        wrong,
        refused: t.refused.load(Ordering::Relaxed),
        vanished: t.vanished.load(Ordering::Relaxed),
        chaos,
        rss_kib: (start.0, rss_kib(pid)),
        fds: (start.1, fds(pid)),
    }
}
