//! Helpers for the end-to-end tests: start the real `dispatcher` binary
//! with a test configuration, talk HTTP/1.1 to it over real sockets, read
//! its counters, and clean up even when a test fails.
//!
//! The tests need root (they load BPF programs). Without root they say so
//! and pass as skipped, except under `CI=true`, where they fail.

pub mod conformance;
pub mod soak;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// How long a dispatcher may take to load its programs and start workers.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket read timeout of the test client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Response header the demo workers add with their pool's name.
pub const POOL_HEADER: &str = "x-dispatcher-pool";

/// True when the test can run; otherwise explains why not, and fails
/// under CI (where every test must really run).
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let msg = "this test loads BPF programs and needs root (CAP_BPF + CAP_NET_ADMIN); run `cargo xtask test` as root";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    false
}

/// Where the built binaries are (`cargo xtask test` sets DISPATCHER_BIN_DIR).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DISPATCHER_BIN_DIR") {
        return PathBuf::from(d);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target");
    for p in ["release", "debug"] {
        if root.join(p).join("dispatcher").exists() {
            return root.join(p);
        }
    }
    panic!("no dispatcher binary found; build with `cargo xtask build` or run `cargo xtask test`");
}

/// Asks `cond` every `step` until it holds (true) or `limit` has passed
/// (false): what the daemon does shows after a while, not at once. It asks
/// once more when the time is up, so a slow last step does not count as a
/// failure.
pub fn wait_until(limit: Duration, step: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(step);
    }
}

/// Sends signal `sig` to process `pid`, which must exist (a worker of the
/// test's dispatcher, or the dispatcher itself).
#[track_caller]
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory preconditions; the tests signal only
    // processes they started.
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

/// Runs `work(k, client)` for k in 0..n, each on its own thread with its
/// own keep-alive connection to `d`, all at once; [`join_all`] collects
/// what they return.
pub fn on_connections<T, F>(d: &Dispatcher, n: usize, work: F) -> Vec<std::thread::JoinHandle<T>>
where
    T: Send + 'static,
    F: Fn(usize, Client) -> T + Send + Sync + 'static,
{
    let work = std::sync::Arc::new(work);
    (0..n)
        .map(|k| {
            let (c, work) = (d.connect(), work.clone());
            std::thread::spawn(move || work(k, c))
        })
        .collect()
}

/// Waits for the threads of [`on_connections`]: what each returned, in
/// order; a thread that panicked (a failed check) fails the test with
/// `what`.
pub fn join_all<T>(threads: Vec<std::thread::JoinHandle<T>>, what: &str) -> Vec<T> {
    threads.into_iter().map(|t| t.join().expect(what)).collect()
}

/// `clients` threads sending `GET path` on their own keep-alive
/// connections until `stop` (at most 20,000 requests each); each returns
/// its (200s, 502s, other statuses or broken connections), reconnecting
/// after a 502 or a break.
pub fn load_until(
    d: &Dispatcher,
    clients: usize,
    path: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<[u32; 3]>> {
    let port = d.port;
    (0..clients)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = [0u32; 3];
                let mut c = Client::connect(port);
                // Bounded: at most this many requests.
                for _ in 0..20_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
                    match c.try_read_response() {
                        Some(r) if r.status == 200 => seen[0] += 1,
                        Some(r) if r.status == 502 => {
                            seen[1] += 1;
                            c = Client::connect(port);
                        }
                        other => {
                            eprintln!("unexpected: {:?}", other.map(|r| r.status));
                            seen[2] += 1;
                            c = Client::connect(port);
                        }
                    }
                }
                seen
            })
        })
        .collect()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running dispatcher, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Dispatcher {
    pub port: u16,
    pub instance: String,
    child: Child,
    _dir: TempDir,
    /// Its configuration file (see [`Dispatcher::rewrite`]).
    pub config: PathBuf,
    /// The network namespace it runs in, if not the test's.
    netns: Option<String>,
}

/// A pool line for [`Dispatcher::start`]: name, routes, worker args.
pub struct PoolDef<'a> {
    pub name: &'a str,
    pub routes: &'a [&'a str],
    pub args: &'a [&'a str],
    /// More TOML lines for the pool's table.
    pub extra: &'a str,
    /// The worker command (default `dispatcher-worker`).
    pub command: Option<&'a str>,
}

impl<'a> PoolDef<'a> {
    /// A pool running `dispatcher-worker ARGS`.
    pub fn worker(name: &'a str, routes: &'a [&'a str], args: &'a [&'a str]) -> Self {
        PoolDef { name, routes, args, extra: "", command: None }
    }

    pub fn echo(name: &'a str, routes: &'a [&'a str]) -> Self {
        PoolDef { name, routes, args: &["--pool-header", "echo"], extra: "", command: None }
    }
}

impl Dispatcher {
    /// Starts a dispatcher with these pools and extra top-level TOML.
    pub fn start(pools: &[PoolDef], extra: &str) -> Dispatcher {
        Self::start_with(pools, extra, None, &[])
    }

    /// [`Dispatcher::start`] where the test can run ([`privileged`]);
    /// `None` where it cannot, and the test is then skipped (most tests
    /// begin so: `let Some(d) = ... else { return };`).
    pub fn start_if_privileged(pools: &[PoolDef], extra: &str) -> Option<Dispatcher> {
        privileged().then(|| Self::start(pools, extra))
    }

    /// One echo pool `p` that serves every request (`*/`), with more TOML
    /// lines for its table, where the test can run (as
    /// [`Dispatcher::start_if_privileged`]).
    pub fn one_pool(pool_extra: &str) -> Option<Dispatcher> {
        Self::start_if_privileged(&[PoolDef { extra: pool_extra, ..PoolDef::echo("p", &["*/"]) }], "")
    }

    /// Starts a dispatcher inside network namespace `netns` (joined with
    /// `nsenter`, so mounts stay the host's), with more `serve` arguments.
    pub fn start_with(pools: &[PoolDef], extra: &str, netns: Option<&str>, args: &[&str]) -> Dispatcher {
        let port = free_port();
        let instance = format!("test{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = TempDir::new(&instance);
        let cfg_path = dir.path.join("dispatcher.toml");
        std::fs::write(&cfg_path, config_text(port, &instance, pools, extra)).unwrap();
        let log = std::fs::File::create(dir.path.join("dispatcher.log")).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(bin_dir().join("dispatcher"));
                c
            }
            None => Command::new(bin_dir().join("dispatcher")),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(&cfg_path)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            // Lets tests make parts fail on purpose (see `control.rs`).
            .env("DISPATCHER_FAULTS", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting dispatcher");
        let mut d = Dispatcher { port, instance, child, _dir: dir, config: cfg_path, netns: netns.map(str::to_string) };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("dispatcher exited during start-up ({st}):\n{}", self.log());
            }
            // Pools start on demand by default: ready means listening.
            if self.log().contains("dispatcher ready")
                && (self.netns.is_some() || TcpStream::connect(("127.0.0.1", self.port)).is_ok())
            {
                return;
            }
            if t0.elapsed() > START_TIMEOUT {
                panic!("dispatcher did not start within {START_TIMEOUT:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Replaces its configuration file (same listen address and instance)
    /// with these pools; [`Dispatcher::reload`] applies it.
    pub fn rewrite(&self, pools: &[PoolDef], extra: &str) {
        std::fs::write(&self.config, config_text(self.port, &self.instance, pools, extra)).unwrap();
    }

    /// `dispatcher reload` for this instance: whether it succeeded, and
    /// what it printed (stdout, then stderr).
    pub fn reload(&self) -> (bool, String) {
        let out = Command::new(bin_dir().join("dispatcher"))
            .args(["reload", "--instance", &self.instance])
            .output()
            .expect("running dispatcher reload");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// One command on its control socket (see `dispatcher/src/control.rs`);
    /// the answer line.
    pub fn control(&self, cmd: &str) -> String {
        use std::io::BufRead;
        let mut s = std::os::unix::net::UnixStream::connect(format!("/run/dispatcher/{}/control", self.instance))
            .expect("control socket");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(&s).read_line(&mut answer).expect("control answer");
        answer.trim().to_string()
    }

    /// Runs `dispatcher ARGS --instance <its instance>`: success, and
    /// what it printed (stdout, then stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(bin_dir().join("dispatcher"))
            .args(args)
            .args(["--instance", &self.instance])
            .output()
            .expect("running the dispatcher CLI");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    /// Sends it SIGHUP (reload).
    pub fn sighup(&self) {
        // SAFETY: signalling our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }

    /// The dispatcher's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path.join("dispatcher.log")).unwrap_or_default()
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.port)
    }

    /// `dispatcher stats` for this instance, as JSON.
    pub fn stats(&self) -> serde_json::Value {
        let out = Command::new(bin_dir().join("dispatcher"))
            .args(["stats", "--instance", &self.instance])
            .output()
            .expect("running dispatcher stats");
        assert!(out.status.success(), "dispatcher stats failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("stats JSON")
    }

    /// A counter of a pool from [`Dispatcher::stats`].
    pub fn pool_stat(&self, pool: &str, field: &str) -> u64 {
        self.stats()["pools"][pool][field].as_u64().unwrap_or_else(|| panic!("no {pool}.{field} in stats"))
    }

    /// The dispatcher's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Worker processes the dispatcher runs now (its children).
    pub fn workers(&self) -> Vec<u32> {
        children(self.child.id())
    }

    /// Waits up to `limit` for `cond` on the log; false on time-out.
    pub fn wait_log(&self, limit: Duration, cond: impl Fn(&str) -> bool) -> bool {
        wait_until(limit, Duration::from_millis(50), || cond(&self.log()))
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.instance)
    }

    /// Stops it with SIGTERM and waits; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        // SAFETY: signalling our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        // Its workers (and their apps) are waited for too: one still
        // exiting can write into the run directory after it is removed,
        // which left a `/run/dispatcher/test…` behind after a clean run.
        let mut family = descendants(self.child.id());
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        family.retain(|&p| alive(p));
        if !wait_until(Duration::from_secs(5), Duration::from_millis(20), || family.iter().all(|&p| !alive(p))) {
            for &p in &family {
                // SAFETY: kill(2); a process gone meanwhile is fine.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            wait_until(Duration::from_secs(2), Duration::from_millis(20), || family.iter().all(|&p| !alive(p)));
        }
        // Whatever happened (a test may kill it with SIGKILL, which skips
        // its own clean-up), leave no pins and no run directory behind.
        let _ = std::fs::remove_dir_all(self.pin_dir());
        let _ = std::fs::remove_dir_all(PathBuf::from("/run/dispatcher").join(&self.instance));
        if std::thread::panicking() {
            eprintln!("--- dispatcher log ---\n{}", self.log());
        }
    }
}

/// State and parent of process `pid` (the fields after the command's
/// closing parenthesis in `/proc/PID/stat`), if it exists.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat.rsplit_once(')')?.1.split_whitespace();
    let state = f.next()?.chars().next()?;
    Some((state, f.next()?.parse().ok()?))
}

/// Whether process `pid` runs (exists and is no zombie).
pub fn alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|(s, _)| s != 'Z')
}

/// The live children of process `ppid`.
pub fn children(ppid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&pid| proc_state(pid).is_some_and(|(s, pp)| pp == ppid && s != 'Z'))
        .collect()
}

/// Every process below `pid` (children, theirs, ...).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// The TOML [`Dispatcher::start`] writes.
fn config_text(port: u16, instance: &str, pools: &[PoolDef], extra: &str) -> String {
    let mut cfg = format!("listen = \"127.0.0.1:{port}\"\ninstance = \"{instance}\"\n{extra}\n");
    for p in pools {
        let q = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        cfg.push_str(&format!(
            "[[pool]]\nname = {:?}\nroutes = [{}]\ncommand = {:?}\nargs = [{}]\n{}\n",
            p.name,
            q(p.routes),
            p.command.unwrap_or("dispatcher-worker"),
            q(p.args),
            p.extra
        ));
    }
    cfg
}

/// A temporary directory, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("dispatcher-{name}"));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    /// A directory for a static pool holding `files` (path under it,
    /// contents), readable by the worker.
    pub fn site(name: &str, files: &[(&str, &str)]) -> TempDir {
        let d = TempDir::new(name);
        for (p, text) in files {
            let p = d.path.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d.make_readable();
        d
    }

    /// The worker runs as `nobody`: lets it read everything in here.
    pub fn make_readable(&self) {
        let ok = std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(&self.path).status().unwrap();
        assert!(ok.success(), "chmod -R a+rX {}", self.path.display());
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A parsed response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The pool that answered (from the demo workers' header).
    pub fn pool(&self) -> &str {
        self.header(POOL_HEADER).unwrap_or("<none>")
    }

    /// The process id of the worker that answered (from the demo workers'
    /// header).
    pub fn worker_pid(&self) -> u32 {
        self.header("x-dispatcher-worker").expect("worker pid header").parse().unwrap()
    }
}

/// A keep-alive HTTP/1.1 client on one connection.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client { stream, buf: Vec::new() }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).expect("writing request");
    }

    /// `GET path` with `Host: host`.
    pub fn get(&mut self, host: &str, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: dispatcher-tests\r\n\r\n").as_bytes());
        self.read_response()
    }

    /// `GET path` with `Host: host`, which `pool` must answer with 200.
    #[track_caller]
    pub fn get_from(&mut self, host: &str, path: &str, pool: &str) -> Response {
        let r = self.get(host, path);
        assert_eq!((r.status, r.pool()), (200, pool), "GET {host}{path}: {r:?}");
        r
    }

    /// `GET path` with `Host: x`, which must be answered with 200 by an
    /// echo worker that saw `path`.
    #[track_caller]
    pub fn get_echoed(&mut self, path: &str) -> Response {
        let r = self.get("x", path);
        assert_eq!((r.status, r.header("x-echo-path")), (200, Some(path)), "GET {path}: {r:?}");
        r
    }

    /// Reads one response (Content-Length framed).
    pub fn read_response(&mut self) -> Response {
        self.try_read_response().expect("reading response")
    }

    /// Reads one response; `None` if the server closed first.
    pub fn try_read_response(&mut self) -> Option<Response> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = r.parse(&self.buf) {
                let status = r.code.unwrap();
                let hs: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).to_string()))
                    .collect();
                let len: usize = hs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if status == 100 {
                    self.buf.drain(..n);
                    continue;
                }
                if self.buf.len() >= n + len {
                    let body = self.buf[n..n + len].to_vec();
                    self.buf.drain(..n + len);
                    return Some(Response { status, headers: hs, body });
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) => panic!("reading response: {e} (have {} bytes)", self.buf.len()),
            }
        }
    }

    /// The rest of the connection until the server ends it (EOF or a
    /// reset), with whatever was buffered and not yet taken as a response;
    /// panics if it is still open after the read time-out.
    pub fn rest_until_closed(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return out,
                Ok(k) => out.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
                Err(e) => panic!("the connection is still open: {e} (have {} bytes)", out.len()),
            }
        }
    }

    /// What arrives until the server closes the connection or sends
    /// nothing for `quiet`.
    pub fn rest_until_quiet(&mut self, quiet: Duration) -> Vec<u8> {
        self.stream.set_read_timeout(Some(quiet)).unwrap();
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 65536];
        while let Ok(k @ 1..) = self.stream.read(&mut chunk) {
            out.extend_from_slice(&chunk[..k]);
        }
        self.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        out
    }

    /// Whether the server closed the connection (reads EOF within the
    /// timeout, after any buffered bytes).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
            || matches!(self.stream.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

/// Resident memory (VmRSS) of process `pid` now, in KiB (0 if gone).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// Peak resident memory (VmHWM) of process `pid`, in KiB (0 if gone).
pub fn peak_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// FNV-1a 64 of some bytes (the tests' checksum).
pub fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &x in b {
        h = (h ^ x as u64).wrapping_mul(0x100000001b3);
    }
    h
}

/// A network namespace pair for tests: `srv` (the dispatcher's side,
/// 10.77.N.1/24 on `veth` and loopback up) and `cli` (clients, with
/// addresses 10.77.N.2 and 10.77.N.3 on the peer). Removed on drop, with
/// the veth pair, whatever happened.
pub struct Netns {
    pub srv: String,
    pub cli: String,
    /// The server side's interface (in `srv`).
    pub veth: String,
    pub server: std::net::Ipv4Addr,
    pub clients: [std::net::Ipv4Addr; 2],
}

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command (an `ip` set-up step), panicking with its output.
pub fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    pub fn new() -> Netns {
        let n = NETNS_SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        // A subnet per test in this process (tests run in parallel).
        let net = 10 + (std::process::id() % 200 + n * 7) % 240;
        let ns = Netns {
            srv: format!("dsp-srv-{id}"),
            cli: format!("dsp-cli-{id}"),
            veth: format!("dg{id}a"),
            server: std::net::Ipv4Addr::new(10, 77, net as u8, 1),
            clients: [std::net::Ipv4Addr::new(10, 77, net as u8, 2), std::net::Ipv4Addr::new(10, 77, net as u8, 3)],
        };
        let peer = format!("dg{id}b");
        run(&["ip", "netns", "add", &ns.srv]);
        run(&["ip", "netns", "add", &ns.cli]);
        run(&[
            "ip", "link", "add", &ns.veth, "netns", &ns.srv, "type", "veth", "peer", "name", &peer, "netns", &ns.cli,
        ]);
        run(&["ip", "-n", &ns.srv, "addr", "add", &format!("{}/24", ns.server), "dev", &ns.veth]);
        for c in ns.clients {
            run(&["ip", "-n", &ns.cli, "addr", "add", &format!("{c}/24"), "dev", &peer]);
        }
        for (n, dev) in [(&ns.srv, ns.veth.as_str()), (&ns.cli, peer.as_str())] {
            run(&["ip", "-n", n, "link", "set", dev, "up"]);
            run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// `curl` from client address `from` to `path` on the server's `port`:
    /// the HTTP status, or 0 when no connection was made in `timeout`.
    pub fn curl(&self, from: std::net::Ipv4Addr, port: u16, path: &str, timeout: Duration) -> u16 {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.cli))
            .args(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", &from.to_string()])
            .args([
                "--connect-timeout",
                &format!("{:.3}", timeout.as_secs_f64()),
                "--max-time",
                &format!("{:.3}", timeout.as_secs_f64() * 4.0),
            ])
            .arg(format!("http://{}:{port}{path}", self.server))
            .output()
            .expect("running curl");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }

    /// `ip link show` of the server's interface.
    pub fn link_show(&self) -> String {
        let out =
            Command::new("ip").args(["-n", &self.srv, "link", "show", &self.veth]).output().expect("ip link show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth in it, and so its peer.
        for n in [&self.srv, &self.cli] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}
