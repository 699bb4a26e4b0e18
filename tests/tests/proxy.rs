//! `proxy` pools with a real app: examples/apps/python/app.py under
//! gunicorn, started by the pool's worker (`dispatcher-worker proxy --
//! gunicorn ...`), with `PORT`, with a systemd-style listening socket and
//! with a Unix socket path;
//! forwarding fields set and hop-by-hop fields dropped; a 10 MiB upload
//! (with a Content-Length and chunked) and download; the app killed and
//! restarted, and killed under load; an app that never listens; and
//! examples/apps/node/server.js under node the same way.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tests::{wait_until, Dispatcher, PoolDef, TempDir};

/// Bytes of the upload and the download.
const TEN_MIB: usize = 10 << 20;

/// The example app, copied where the workers (`nobody`) can read it.
fn app_dir(name: &str) -> TempDir {
    let d = TempDir::new(&format!("{name}{}", std::process::id()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/apps/python/app.py");
    std::fs::copy(&src, d.path.join("app.py")).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
    d.make_readable();
    d
}

fn start(dir: &TempDir, socket: &str) -> Option<Dispatcher> {
    let dir = dir.path.display().to_string();
    let port_args: &[&str] = match socket {
        "port" => &["-b", "127.0.0.1:$PORT"],
        "unix" => &["-b", "unix:$SOCKET"],
        _ => &[],
    };
    let mut args: Vec<&str> = vec!["proxy", "--socket", socket, "--", "gunicorn", "--chdir", &dir];
    args.extend_from_slice(port_args);
    args.extend_from_slice(&["--workers", "2", "app:app"]);
    Dispatcher::start_if_privileged(&[PoolDef::worker("py", &["*/"], &args)], "[limits]\nmax_body = 104857600\n")
}

fn sha256(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("sha256sum");
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// Reads one response whose body has a Content-Length; (status line, body).
fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).expect("reading the answer");
        assert!(n > 0, "closed before the head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).expect("reading the body");
        assert!(n > 0, "closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    (head.lines().next().unwrap_or("").to_string(), buf[head_end..head_end + len].to_vec())
}

/// POSTs `data` to the app's /upload with a Content-Length, from a raw
/// client; the connection (kept alive) and the app's JSON answer.
fn upload(port: u16, data: &[u8]) -> (TcpStream, serde_json::Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", data.len()).as_bytes())
        .unwrap();
    s.write_all(data).unwrap();
    let (status, body) = read_response(&mut s);
    assert!(status.contains(" 200 "), "{status}");
    (s, json(&body))
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

#[test]
fn a_gunicorn_app_is_started_and_proxied_with_forwarding_fields() {
    for socket in ["port", "fds", "unix"] {
        let dir = app_dir(&format!("proxy-{socket}-"));
        let Some(d) = start(&dir, socket) else { return };
        let mut c = d.connect();
        let r = c.get("x", "/");
        assert_eq!(r.status, 200, "{socket}: {r:?}\n{}", d.log());
        assert!(String::from_utf8_lossy(&r.body).contains("WSGI app"), "{r:?}");
        // Hop-by-hop fields stay here; forwarding fields are added.
        c.send(b"GET /headers HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\n");
        let r = c.read_response();
        assert_eq!(r.status, 200, "{r:?}");
        let h = json(&r.body);
        for gone in ["x-secret", "keep-alive", "connection"] {
            assert!(h.get(gone).is_none(), "{socket}: {gone} reached the app: {h}");
        }
        assert_eq!(h["x-kept"], "yes", "{h}");
        assert_eq!(h["host"], "shop.example", "{h}");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
        assert_eq!(h["x-forwarded-proto"], "http", "{h}");
        assert_eq!(h["forwarded"], "for=127.0.0.1;host=\"shop.example\";proto=http", "{h}");
        // The same keep-alive connection goes on working.
        assert_eq!(c.get("x", "/nothing").status, 404);
        if socket == "fds" {
            assert!(d.log().contains("socket=Fds"), "{}", d.log());
        }
        if socket == "unix" {
            assert!(d.log().contains("addr=unix:/"), "{}", d.log());
        }
    }
}

#[test]
fn ten_mib_go_up_and_down_through_a_proxy_pool() {
    let dir = app_dir("proxy-big-");
    let Some(d) = start(&dir, "port") else { return };
    let data: Vec<u8> = (0..TEN_MIB as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let want = sha256(&data);
    // With a Content-Length, from a raw client.
    let (mut s, v) = upload(d.port, &data);
    assert_eq!((v["bytes"].as_u64(), v["sha256"].as_str()), (Some(TEN_MIB as u64), Some(want.as_str())), "{v}");
    // Chunked, from curl.
    let file = dir.path.join("up.bin");
    std::fs::write(&file, &data).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-H", "Transfer-Encoding: chunked", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg(format!("http://127.0.0.1:{}/upload", d.port))
        .output()
        .unwrap();
    let v = json(&out.stdout);
    assert_eq!((v["bytes"].as_u64(), v["sha256"].as_str()), (Some(TEN_MIB as u64), Some(want.as_str())), "{v}");
    // Down: the app's 10 MiB arrive whole and in order.
    s.write_all(format!("GET /bytes/{TEN_MIB} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let (status, body) = read_response(&mut s);
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body.len(), TEN_MIB);
    assert!(body.iter().enumerate().all(|(i, &b)| b == ((i % 65536) % 251) as u8), "the download's bytes differ");
}

/// The app's main process: the worker's child.
fn app_pid(worker: u32) -> Option<u32> {
    tests::children(worker).first().copied()
}

#[test]
fn a_killed_app_is_restarted_and_serves_again() {
    let dir = app_dir("proxy-kill-");
    let Some(d) = start(&dir, "port") else { return };
    let mut c = d.connect();
    assert_eq!(c.get("x", "/").status, 200);
    let worker = d.workers()[0];
    let app = app_pid(worker).expect("the app is the worker's child");
    tests::signal(app, libc::SIGKILL);
    assert!(
        d.wait_log(Duration::from_secs(10), |l| l.contains("the app `gunicorn` exited")),
        "the worker did not notice: {}",
        d.log()
    );
    // A new worker starts a new app; requests are served again.
    let t0 = Instant::now();
    let served = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let mut c = d.connect();
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        c.try_read_response().is_some_and(|r| r.status == 200)
    });
    assert!(served, "not served again within {:?}: {}", t0.elapsed(), d.log());
    let now = d.workers();
    assert!(now.len() == 1 && now[0] != worker, "workers {now:?}, the old one was {worker}");
}

#[test]
fn an_app_that_never_listens_is_reported() {
    let Some(d) = Dispatcher::start_if_privileged(
        &[PoolDef::worker("mute", &["*/"], &["proxy", "--start-timeout", "1", "--", "sleep", "30"])],
        "",
    ) else {
        return;
    };
    let mut c = d.connect();
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        d.wait_log(Duration::from_secs(15), |l| l.contains("did not accept connections on 127.0.0.1:")),
        "{}",
        d.log()
    );
}

#[test]
fn the_app_goes_when_the_dispatcher_dies() {
    let dir = app_dir("proxy-orphan-");
    let Some(d) = start(&dir, "port") else { return };
    assert_eq!(d.connect().get("x", "/").status, 200);
    let worker = d.workers()[0];
    let app = app_pid(worker).expect("the app is the worker's child");
    // The worker sees its control socket close and ends, and the app with
    // it: the app holds none of the worker's sockets open.
    tests::signal(d.pid(), libc::SIGKILL);
    let alive = tests::alive;
    let gone = wait_until(Duration::from_secs(15), Duration::from_millis(100), || !alive(worker) && !alive(app));
    assert!(gone, "worker {worker} alive: {}, app {app} alive: {}", alive(worker), alive(app));
}

#[test]
fn gunicorn_killed_under_load_fails_only_what_it_had_taken() {
    let dir = app_dir("proxy-load-");
    let Some(d) = start(&dir, "port") else { return };
    assert_eq!(d.connect().get("x", "/").status, 200);
    let worker = d.workers()[0];
    let app = app_pid(worker).expect("the app is the worker's child");
    let clients = 8;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads = tests::load_until(&d, clients, "/", stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    tests::signal(app, libc::SIGKILL);
    let served = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        d.workers().first().is_some_and(|w| *w != worker) && d.connect().get("x", "/").status == 200
    });
    assert!(served, "not served again: {}", d.log());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen: Vec<[u32; 3]> = tests::join_all(threads, "a load client");
    let (ok, failed, other) = seen.iter().fold((0, 0, 0), |a, s| (a.0 + s[0], a.1 + s[1], a.2 + s[2]));
    // At most what was in flight (a request per client) fails, with 502.
    assert!(ok > 0 && other == 0 && failed <= clients as u32, "200: {ok}, 502: {failed}, other: {other}\n{}", d.log());
}

/// The Node example app, copied where the workers can read it.
fn node_dir(name: &str) -> TempDir {
    let d = TempDir::new(&format!("{name}{}", std::process::id()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/apps/node/server.js");
    std::fs::copy(&src, d.path.join("server.js")).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
    d.make_readable();
    d
}

#[test]
fn a_node_app_is_started_with_a_socket_and_proxied_both_ways() {
    let dir = node_dir("proxy-node-");
    let script = dir.path.join("server.js").display().to_string();
    let Some(d) = Dispatcher::start_if_privileged(
        &[PoolDef::worker("node", &["*/"], &["proxy", "--socket", "fds", "--", "node", &script])],
        "[limits]\nmax_body = 104857600\n",
    ) else {
        return;
    };
    let mut c = d.connect();
    let r = c.get("node.example", "/");
    assert_eq!(r.status, 200, "{r:?}\n{}", d.log());
    assert!(String::from_utf8_lossy(&r.body).contains("Hello from Node"), "{r:?}");
    let h = json(&c.get("node.example", "/headers").body);
    assert_eq!((h["host"].as_str(), h["x-forwarded-for"].as_str()), (Some("node.example"), Some("127.0.0.1")), "{h}");
    // 10 MiB up with a Content-Length, and down chunked (node streams it).
    let data: Vec<u8> = (0..TEN_MIB as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let (_, v) = upload(d.port, &data);
    assert_eq!(
        (v["bytes"].as_u64(), v["sha256"].as_str()),
        (Some(TEN_MIB as u64), Some(sha256(&data).as_str())),
        "{v}"
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .arg(format!("http://127.0.0.1:{}/bytes/{TEN_MIB}", d.port))
        .output()
        .unwrap();
    assert_eq!(out.stdout.len(), TEN_MIB, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.iter().enumerate().all(|(i, &b)| b == ((i % 65536) % 251) as u8), "the download's bytes differ");
    // A plain GET of the WebSocket route says what it wants.
    assert_eq!(c.get("x", "/ws").status, 426);
}

/// A proxy pool of gunicorn (on `PORT`) with more TOML for its table.
fn start_with(dir: &TempDir, extra: &str) -> Option<Dispatcher> {
    let dir = dir.path.display().to_string();
    let args = ["proxy", "--", "gunicorn", "--chdir", &dir, "-b", "127.0.0.1:$PORT", "--workers", "1", "app:app"];
    Dispatcher::start_if_privileged(&[PoolDef { extra, ..PoolDef::worker("py", &["*/"], &args) }], "")
}

#[test]
fn a_recycled_worker_takes_its_app_along_and_no_request_fails() {
    let dir = app_dir("proxy-recycle-");
    let Some(d) = start_with(&dir, "recycle_requests = 10\n") else { return };
    let mut pids = std::collections::BTreeSet::new();
    let mut apps = std::collections::BTreeSet::new();
    for i in 0..35 {
        let mut c = d.connect();
        let r = c.get("x", "/pid");
        assert_eq!(r.status, 200, "request {i}: {r:?}\n{}", d.log());
        pids.insert(String::from_utf8_lossy(&r.body).to_string());
        for w in d.workers() {
            apps.extend(app_pid(w));
        }
    }
    // 35 requests, a new worker (and gunicorn) every 10: four of each.
    assert!(pids.len() >= 3, "gunicorn worker pids seen: {pids:?}\n{}", d.log());
    // Only the current worker's app is left.
    let now: Vec<u32> = d.workers().iter().filter_map(|&w| app_pid(w)).collect();
    let gone = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        apps.iter().all(|a| now.contains(a) || !tests::alive(*a))
    });
    assert!(gone, "apps {apps:?}, current {now:?}: an old one outlived its worker");
}

#[test]
fn a_web_garden_runs_an_app_per_worker() {
    let dir = app_dir("proxy-garden-");
    let Some(d) = start_with(&dir, "max_processes = 2\nmin_processes = 2\n") else { return };
    let two = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let w = d.workers();
        w.len() == 2 && w.iter().all(|&w| app_pid(w).is_some())
    });
    assert!(two, "workers {:?}\n{}", d.workers(), d.log());
    // Each worker started its own gunicorn, on its own port.
    let apps: Vec<u32> = d.workers().iter().filter_map(|&w| app_pid(w)).collect();
    assert_ne!(apps[0], apps[1]);
    let both = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        d.log().matches("app accepts connections").count() >= 2
    });
    assert!(both, "{}", d.log());
    for _ in 0..10 {
        assert_eq!(d.connect().get("x", "/").status, 200);
    }
}
