//! The process model (WAS): on-demand start from a kernel event, idle
//! time-out, always-running pools, and rapid-fail protection with a CLI
//! start, observed on real processes.

use std::{
    os::unix::fs::PermissionsExt,
    process::Command,
    time::{Duration, Instant},
};

use tests::{
    bin_dir, join_all, on_connections, privileged, signal, wait_until, Dispatcher, PoolDef, TempDir, START_TIMEOUT,
};

/// Idle time-out of the idle test's pool.
const IDLE_SECS: u64 = 1;
/// How long an idle worker may take to be gone (time-out plus slack).
const IDLE_EXIT_LIMIT: Duration = Duration::from_secs(15);
/// Crashes that stop the rapid-fail test's pool.
const MAX_CRASHES: u32 = 3;
/// How long a change (a stop, a start) may take to show.
const SETTLE: Duration = Duration::from_secs(15);
/// Header bytes that send a request through the slow path.
const LONG_HEADER: usize = 6000;

/// Writes an executable shell script `name` into `dir`: its path, for a
/// pool's `command`.
fn script(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.path.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[test]
fn an_on_demand_pool_has_no_worker_until_its_first_request() {
    let Some(d) = Dispatcher::one_pool("") else { return };
    assert!(d.wait_log(SETTLE, |l| l.contains("no worker; waiting for a request")), "{}", d.log());
    assert!(d.workers().is_empty(), "a worker runs before any request: {:?}", d.workers());
    // The request waits on the ring while the kernel's demand event starts
    // a worker.
    let t0 = Instant::now();
    let r = d.connect().get_echoed("/first");
    eprintln!("cold start: first request answered in {:?}", t0.elapsed());
    assert_eq!(d.workers(), vec![r.worker_pid()]);
}

#[test]
fn a_slow_path_request_also_starts_an_on_demand_worker() {
    let Some(d) = Dispatcher::one_pool("") else { return };
    assert!(d.wait_log(SETTLE, |l| l.contains("no worker; waiting for a request")));
    let long = "v".repeat(LONG_HEADER);
    let mut c = d.connect();
    c.send(format!("GET /long HTTP/1.1\r\nHost: x\r\nX-Long: {long}\r\n\r\n").as_bytes());
    let r = c.read_response();
    assert_eq!((r.status, r.header("x-echo-path")), (200, Some("/long")));
}

#[test]
fn an_always_running_pool_starts_at_once() {
    let Some(d) = Dispatcher::one_pool("start_mode = \"always-running\"") else { return };
    assert!(d.wait_log(START_TIMEOUT, |l| l.contains("worker started")), "{}", d.log());
    assert_eq!(d.workers().len(), 1);
}

#[test]
fn an_idle_worker_exits_and_the_next_request_starts_another_on_the_same_connection() {
    let Some(d) = Dispatcher::one_pool(&format!("idle_timeout_secs = {IDLE_SECS}")) else { return };
    let mut c = d.connect();
    // A few requests, so the worker holds the connection's lease.
    let first = c.get("x", "/a").worker_pid();
    for i in 0..5 {
        assert_eq!(c.get("x", &format!("/b{i}")).worker_pid(), first);
    }
    // It exits on its own (the supervisor sees it stop pulling, or exit).
    assert!(
        d.wait_log(IDLE_EXIT_LIMIT, |l| l.contains("worker exited cleanly") || l.contains("worker exited (finished)")),
        "{}",
        d.log()
    );
    wait_until(IDLE_EXIT_LIMIT, Duration::from_millis(20), || d.workers().is_empty());
    assert!(d.workers().is_empty(), "{:?}", d.workers());
    assert!(!d.log().contains("did not finish within the shutdown time limit"), "{}", d.log());
    // It gave the connection back before exiting: the connection goes on.
    let r = c.get_echoed("/after-idle");
    assert_ne!(r.worker_pid(), first);
}

#[test]
fn rapid_fail_stops_the_pool_and_the_cli_starts_it_again() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new(&format!("rapid{}", std::process::id()));
    let marker = dir.path.join("fail");
    std::fs::write(&marker, "").unwrap();
    // Exits at once while the marker exists, else runs the real worker.
    let script_path =
        script(&dir, "flaky-worker", "#!/bin/sh\n[ -e \"$FAIL_MARKER\" ] && exit 3\nexec \"$REAL_WORKER\" \"$@\"\n");
    let extra = format!(
        "start_mode = \"always-running\"\nrapid_fail_max_crashes = {MAX_CRASHES}\nrapid_fail_interval_secs = 60\nenv = {{ FAIL_MARKER = {:?}, REAL_WORKER = {:?} }}",
        marker.display().to_string(),
        bin_dir().join("dispatcher-worker").display().to_string()
    );
    let def = PoolDef { extra: &extra, command: Some(&script_path), ..PoolDef::echo("p", &["*/"]) };
    let d = Dispatcher::start(&[def], "");
    assert!(d.wait_log(SETTLE, |l| l.contains("pool stopped")), "{}", d.log());
    assert!(d.log().contains("rapid-fail protection"), "{}", d.log());

    let r = d.connect().get("x", "/while-stopped");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(String::from_utf8_lossy(&r.body).contains("stopped"), "{}", String::from_utf8_lossy(&r.body));

    // Fixed; started again from the CLI.
    std::fs::remove_file(&marker).unwrap();
    let out = Command::new(bin_dir().join("dispatcher"))
        .args(["pool", "start", "p", "--instance", &d.instance])
        .output()
        .expect("running dispatcher pool start");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("starting"), "{}", String::from_utf8_lossy(&out.stdout));
    let mut status = 0;
    let started = wait_until(SETTLE, Duration::from_millis(100), || {
        status = d.connect().get("x", "/after-start").status;
        status == 200
    });
    assert!(started, "still {status} after the start: {}", d.log());
}

#[test]
fn pool_start_names_an_unknown_pool() {
    let Some(d) = Dispatcher::one_pool("") else { return };
    let out = Command::new(bin_dir().join("dispatcher"))
        .args(["pool", "start", "nosuch", "--instance", &d.instance])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no pool named `nosuch`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_worker_that_stops_pulling_is_replaced_and_its_queue_served() {
    let Some(d) = Dispatcher::one_pool("ping_interval_secs = 1\nping_response_limit_secs = 2") else { return };
    let hung = d.connect().get("x", "/before").worker_pid();
    // A hung worker: alive, not pulling.
    signal(hung, libc::SIGSTOP);
    // Queued on the ring while nobody pulls; the replacement answers it.
    let r = d.connect().get_echoed("/while-hung");
    assert_ne!(r.worker_pid(), hung);
    assert!(d.log().contains("stopped pulling its queue"), "{}", d.log());
}

#[test]
fn a_worker_that_never_starts_pulling_is_killed_at_the_startup_limit() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new(&format!("startup{}", std::process::id()));
    let script_path = script(&dir, "never-ready", "#!/bin/sh\nexec sleep 600\n");
    let def = PoolDef {
        extra: "start_mode = \"always-running\"\nstartup_time_limit_secs = 1",
        command: Some(&script_path),
        ..PoolDef::echo("p", &["*/"])
    };
    let d = Dispatcher::start(&[def], "");
    assert!(d.wait_log(SETTLE, |l| l.contains("did not start pulling requests in time")), "{}", d.log());
}

#[test]
fn a_worker_cannot_open_another_pools_pinned_ring() {
    let pools = [PoolDef::echo("a", &["*/a/"]), PoolDef::echo("b", &["*/b/"])];
    let Some(d) = Dispatcher::start_if_privileged(&pools, "") else { return };
    let ring = d.pin_dir().join("ring_b");
    assert!(ring.exists(), "no pinned ring at {}", ring.display());
    // As the user pool `a`'s worker runs as.
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "head", "-c", "1"])
        .arg(&ring)
        .output()
        .expect("running runuser");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Requests per client thread in the recycling test.
const RECYCLE_LOAD: usize = 250;
/// Client threads in the recycling test.
const RECYCLE_CLIENTS: usize = 4;
/// Requests after which the recycling test's worker is replaced.
const RECYCLE_EVERY: usize = 40;

#[test]
fn recycling_by_request_count_under_load_fails_no_request() {
    let Some(d) = Dispatcher::one_pool(&format!("recycle_requests = {RECYCLE_EVERY}")) else { return };
    let threads = on_connections(&d, RECYCLE_CLIENTS, |t, mut c| {
        (0..RECYCLE_LOAD).map(|i| c.get_echoed(&format!("/t{t}/{i}")).worker_pid()).collect::<Vec<_>>()
    });
    let pids: std::collections::BTreeSet<u32> =
        join_all(threads, "a client saw a failed request").into_iter().flatten().collect();
    let total = RECYCLE_CLIENTS * RECYCLE_LOAD;
    // Each worker serves at most RECYCLE_EVERY requests (plus what it had
    // already taken when it reached the count).
    assert!(pids.len() >= total / (2 * RECYCLE_EVERY), "only {} workers served {total} requests", pids.len());
    assert!(d.log().contains("recycled"), "{}", d.log());
}

/// How long the overlap test's slow request keeps the old worker busy.
const OVERLAP_SLOW_MS: u64 = 3000;

#[test]
fn a_recycled_worker_finishing_a_slow_request_overlaps_its_successor() {
    let Some(d) = Dispatcher::one_pool("recycle_requests = 2\nstart_mode = \"always-running\"") else { return };
    // Request 1: taken by the first worker, answered late.
    let mut slow = d.connect();
    slow.send(format!("GET /delay/{OVERLAP_SLOW_MS}/slow HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    std::thread::sleep(Duration::from_millis(300));
    let old = d.workers();
    assert_eq!(old.len(), 1, "{old:?}");
    // Request 2: its count is reached; it stops pulling.
    let r = d.connect().get("x", "/second");
    assert_eq!((r.status, r.worker_pid()), (200, old[0]));
    // Request 3: answered by the next worker while the old one still
    // works on request 1.
    let t0 = Instant::now();
    let r = d.connect().get("x", "/third");
    assert_eq!(r.status, 200);
    assert_ne!(r.worker_pid(), old[0], "the recycled worker answered after its count");
    assert!(
        t0.elapsed() < Duration::from_millis(OVERLAP_SLOW_MS / 2),
        "the next worker waited for the old one to exit"
    );
    assert!(d.workers().contains(&old[0]), "the old worker is gone before its slow request was answered");
    let r = slow.read_response();
    assert_eq!((r.status, r.worker_pid()), (200, old[0]));
    assert!(d.wait_log(SETTLE, |l| l.contains("worker exited (finished)")), "{}", d.log());
}

#[test]
fn recycling_by_interval_replaces_the_worker_without_failures() {
    let Some(d) = Dispatcher::one_pool("recycle_interval_secs = 1") else { return };
    let mut c = d.connect();
    let first = c.get("x", "/first").worker_pid();
    let t0 = Instant::now();
    let mut last = first;
    while last == first {
        assert!(t0.elapsed() < SETTLE, "the worker was not recycled: {}", d.log());
        let r = c.get("x", "/again");
        assert_eq!(r.status, 200);
        last = r.worker_pid();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log().contains("recycling interval passed"), "{}", d.log());
}

/// Client threads and requests per thread in the kill -9 test, and after
/// how many answered requests the worker is killed.
const KILL_CLIENTS: usize = 8;
const KILL_LOAD: usize = 200;
const KILL_AFTER: usize = 300;

#[test]
fn kill_9_of_a_busy_worker_fails_only_what_it_had_taken_with_502() {
    kill_9_under_load("");
}

#[test]
fn kill_9_of_a_busy_worker_fails_only_what_it_had_taken_with_502_without_leases() {
    kill_9_under_load("[fast_path]\ndirect_responses = false\n");
}

fn kill_9_under_load(extra: &str) {
    use std::sync::{
        atomic::{AtomicU32, AtomicUsize, Ordering},
        Arc,
    };
    let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::echo("p", &["*/"])], extra) else { return };
    let answered = Arc::new(AtomicUsize::new(0));
    let seen_pid = Arc::new(AtomicU32::new(0));
    let (answered_by, seen_by) = (answered.clone(), seen_pid.clone());
    let threads = on_connections(&d, KILL_CLIENTS, move |t, mut c| {
        let (mut bad_gateway, mut pids) = (0, std::collections::BTreeSet::new());
        for i in 0..KILL_LOAD {
            let path = format!("/t{t}/{i}");
            c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
            let r = c.try_read_response().unwrap_or_else(|| panic!("connection {t} closed at request {i}"));
            match r.status {
                200 => {
                    assert_eq!(r.header("x-echo-path"), Some(path.as_str()));
                    let pid = r.worker_pid();
                    seen_by.store(pid, Ordering::Relaxed);
                    pids.insert(pid);
                }
                502 => bad_gateway += 1,
                s => panic!("request {path}: status {s}"),
            }
            answered_by.fetch_add(1, Ordering::Relaxed);
        }
        (bad_gateway, pids)
    });
    let going = wait_until(SETTLE, Duration::from_millis(1), || answered.load(Ordering::Relaxed) >= KILL_AFTER);
    assert!(going, "the load did not get going");
    signal(seen_pid.load(Ordering::Relaxed), libc::SIGKILL);
    let (mut bad_gateway, mut pids) = (0, std::collections::BTreeSet::new());
    for (b, p) in join_all(threads, "a client saw a closed connection or a wrong answer") {
        bad_gateway += b;
        pids.extend(p);
    }
    // At most one request in flight per connection, so at most that many
    // were taken by the dead worker; everything else was answered.
    assert!(bad_gateway <= KILL_CLIENTS, "{bad_gateway} requests failed");
    assert!(pids.len() >= 2, "no replacement answered: {pids:?}");
    eprintln!("kill -9 under load: {bad_gateway} of {} requests got 502", KILL_CLIENTS * KILL_LOAD);
}

/// SIGKILLs of the upload test's worker.
const UPLOAD_KILLS: u32 = 6;

/// Slow-path uploads (each body past what the kernel queues) while the
/// worker is SIGKILLed again and again: each gets its own body back or a
/// 502, and none waits for the client's time-out. A head sent into the
/// control socket as the worker died used to be lost without a word: the
/// client waited (the soak found it).
#[test]
fn kill_9_during_slow_path_uploads_answers_each_or_502_and_never_hangs() {
    use std::io::Write;
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    let pool = PoolDef { extra: "rapid_fail_max_crashes = 0", ..PoolDef::echo("p", &["*/"]) };
    let Some(d) = Dispatcher::start_if_privileged(&[pool], "") else { return };
    let stop = Arc::new(AtomicBool::new(false));
    let port = d.port;
    let clients: Vec<_> = (0..4u64)
        .map(|k| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut bad_gateway) = (0u32, 0u32);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body: Vec<u8> = (0..256 * 1024u64).map(|i| ((i * 7 + n + k) % 251) as u8).collect();
                    let path = format!("/up/{k}/{n}");
                    let mut c = tests::Client::connect(port);
                    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
                    if c.stream.write_all(head.as_bytes()).and_then(|_| c.stream.write_all(&body)).is_err() {
                        continue;
                    }
                    // A read time-out panics the thread: the test fails.
                    let Some(r) = c.try_read_response() else { continue };
                    match r.status {
                        200 => {
                            assert_eq!(r.header("x-echo-path"), Some(path.as_str()));
                            assert!(r.body.ends_with(&body), "{path}: another body came back");
                            ok += 1;
                        }
                        502 => bad_gateway += 1,
                        s => panic!("{path}: status {s}"),
                    }
                }
                (ok, bad_gateway)
            })
        })
        .collect();
    // Six kills in a row: the restart back-off doubles from 200 ms, so the
    // last replacement comes 6.4 s after the last kill, well inside the
    // clients' read time-out (a seventh would make it 12.8 s).
    let mut kills = 0;
    let t0 = Instant::now();
    while kills < UPLOAD_KILLS && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(600));
        if let Some(&w) = d.workers().first() {
            signal(w, libc::SIGKILL);
            kills += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut bad_gateway) = (0, 0);
    for (o, b) in join_all(clients, "an upload got no answer in time, or a wrong one") {
        ok += o;
        bad_gateway += b;
    }
    eprintln!("uploads under kill -9: {ok} answered, {bad_gateway} got 502, {kills} kills");
    assert!(kills >= 4 && ok > 0, "{kills} kills, {ok} answers");
}

#[test]
fn min_processes_of_a_web_garden_run_from_the_start() {
    // A name with `-`, which kernel object names cannot carry.
    let def = PoolDef { extra: "max_processes = 2\nmin_processes = 2", ..PoolDef::echo("web-garden", &["*/"]) };
    let Some(d) = Dispatcher::start_if_privileged(&[def], "") else { return };
    assert!(d.wait_log(START_TIMEOUT, |l| l.matches("worker started").count() == 2), "{}", d.log());
    assert_eq!(d.workers().len(), 2, "{:?}", d.workers());
    assert!(d.pin_dir().join("ring_web-garden@1").exists());
}

/// Connections the web-garden test opens (spread over its slots by the
/// kernel, from each connection's own slot).
const GARDEN_CONNECTIONS: usize = 8;

#[test]
fn a_web_garden_spreads_connections_over_its_workers() {
    // Spread at once: a slot without a worker is not held back.
    let Some(d) = Dispatcher::one_pool("max_processes = 2\nscale_out_queue_bytes = 0") else { return };
    let mut clients: Vec<_> = (0..GARDEN_CONNECTIONS).map(|_| d.connect()).collect();
    let mut pids = std::collections::BTreeSet::new();
    for (i, c) in clients.iter_mut().enumerate() {
        for j in 0..3 {
            pids.insert(c.get_echoed(&format!("/c{i}/{j}")).worker_pid());
        }
    }
    assert_eq!(pids.len(), 2, "the garden's two workers did not both serve: {pids:?}\n{}", d.log());
    assert_eq!(d.workers().len(), 2);
}

#[test]
fn a_panicking_supervisor_leaves_its_worker_serving_and_comes_back() {
    let Some(d) = Dispatcher::one_pool("start_mode = \"always-running\"") else { return };
    let mut c = d.connect();
    let first = c.get("x", "/before").worker_pid();
    let answer = d.control("fault supervisor-panic p");
    assert!(answer.starts_with("ok"), "{answer}");
    assert!(d.wait_log(SETTLE, |l| l.contains("the supervisor panicked")), "{}", d.log());
    // The worker served on, through the panic and its aftermath.
    for i in 0..20 {
        let r = c.get("x", &format!("/during/{i}"));
        assert_eq!((r.status, r.worker_pid()), (200, first));
    }
    assert!(d.wait_log(SETTLE, |l| l.contains("taking over the running worker")), "{}", d.log());
    // The new supervisor watches it: a crash is replaced as before.
    signal(first, libc::SIGKILL);
    let replaced = wait_until(SETTLE, Duration::from_millis(50), || {
        let r = d.connect().get("x", "/after");
        r.status == 200 && r.worker_pid() != first
    });
    assert!(replaced, "no replacement after the supervisor came back: {}", d.log());
    assert_eq!(d.workers().len(), 1, "{:?}", d.workers());
}

/// The scale-out threshold of the scale-out test, and the requests it
/// queues behind a stopped worker (more than the threshold's worth).
const SCALE_OUT_BYTES: usize = 1024;
const SCALE_OUT_REQUESTS: usize = 24;

#[test]
fn a_web_garden_starts_its_next_worker_only_when_the_queue_grows() {
    let extra = format!("max_processes = 2\nscale_out_queue_bytes = {SCALE_OUT_BYTES}");
    let Some(d) = Dispatcher::one_pool(&extra) else { return };
    // Keeping up: one worker serves every connection.
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..GARDEN_CONNECTIONS {
        let r = d.connect().get("x", &format!("/c{i}"));
        assert_eq!(r.status, 200);
        pids.insert(r.worker_pid());
    }
    assert_eq!(pids.len(), 1, "a second worker started while the first kept up: {pids:?}");
    let first = *pids.iter().next().unwrap();
    assert_eq!(d.workers(), vec![first]);
    // Not keeping up: its queue grows past the threshold, and the next
    // requests start and reach a second worker.
    signal(first, libc::SIGSTOP);
    let mut waiting: Vec<_> = (0..SCALE_OUT_REQUESTS)
        .map(|i| {
            let mut c = d.connect();
            c.send(format!("GET /q{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
            c
        })
        .collect();
    wait_until(SETTLE, Duration::from_millis(20), || d.workers().len() >= 2);
    let second = d.workers().into_iter().find(|p| *p != first);
    signal(first, libc::SIGCONT);
    let second = second.unwrap_or_else(|| panic!("no second worker while the first was stopped: {}", d.log()));
    let mut by = std::collections::BTreeMap::<u32, usize>::new();
    for c in &mut waiting {
        let r = c.read_response();
        assert_eq!(r.status, 200);
        *by.entry(r.worker_pid()).or_default() += 1;
    }
    assert!(by.get(&second).is_some_and(|n| *n > 0), "the second worker served none: {by:?}");
    assert!(by.get(&first).is_some_and(|n| *n > 0), "the first worker's queue was not kept for it: {by:?}");
}
