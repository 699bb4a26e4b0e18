//! `fastcgi` pools with real PHP: the scripts of examples/apps/php under
//! php-fpm, started by the pool's worker (`dispatcher-worker fastcgi
//! --php-fpm`) or already running (`--connect unix:...`), and a command
//! (`-- php-fpm ...`) started like a proxy pool's app: CGI parameters,
//! statuses, redirects, the scripts' stderr in the log, paths that must
//! not run a script, 10 MiB up (with a Content-Length and chunked) and
//! down (streamed and with a length), php-fpm killed under load and
//! restarted; and one configuration routing by host and by prefix across
//! a proxy pool, a FastCGI pool and a native pool.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tests::{wait_until, Dispatcher, PoolDef, TempDir};

const TEN_MIB: usize = 10 << 20;

/// The example scripts (under `sub`, if given), copied where the workers
/// (`nobody`) can read them.
fn php_dir(name: &str, sub: &str) -> TempDir {
    let d = TempDir::new(&format!("{name}{}", std::process::id()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/apps/php");
    let dst = d.path.join(sub);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    // A directory named like an image, with a script-looking path under
    // it: `/up/evil.jpg/x.php` must not run anything.
    std::fs::create_dir_all(dst.join("up/evil.jpg")).unwrap();
    std::fs::write(dst.join("up/evil.jpg/x.txt"), "not a script").unwrap();
    d.make_readable();
    d
}

fn root(d: &TempDir) -> String {
    d.path.display().to_string()
}

fn start(dir: &TempDir) -> Option<Dispatcher> {
    let r = root(dir);
    let args = ["fastcgi", "--root", &r, "--php-fpm", "--children", "4"];
    Dispatcher::start_if_privileged(&[PoolDef::worker("php", &["*/"], &args)], "[limits]\nmax_body = 104857600\n")
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

fn md5(data: &[u8]) -> String {
    let mut c = Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("md5sum");
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// `curl` with these arguments against `path`; (status, body).
fn curl(d: &Dispatcher, args: &[&str], path: &str) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("http://127.0.0.1:{}{path}", d.port))
        .output()
        .expect("curl");
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').expect("curl's status line");
    let status = String::from_utf8_lossy(&body[nl + 1..]).trim().parse().unwrap_or(0);
    body.truncate(nl);
    (status, body)
}

#[test]
fn php_scripts_run_with_their_cgi_parameters() {
    let dir = php_dir("fcgi-params-", "");
    let Some(d) = start(&dir) else { return };
    let mut c = d.connect();
    let r = c.get("x", "/");
    assert_eq!(r.status, 200, "{r:?}\n{}", d.log());
    assert!(String::from_utf8_lossy(&r.body).contains("Hello, world, from PHP"), "{r:?}");
    // The same keep-alive connection, a script with PATH_INFO and a query.
    c.send(b"GET /server.php/extra/path?a=1&b=two HTTP/1.1\r\nHost: shop.example:8080\r\nX-Test: yes\r\nX_Test: sneaky\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200, "{r:?}");
    let v = json(&r.body);
    let root = std::fs::canonicalize(&dir.path).unwrap();
    assert_eq!(v["SCRIPT_NAME"], "/server.php", "{v}");
    assert_eq!(v["SCRIPT_FILENAME"], root.join("server.php").display().to_string(), "{v}");
    assert_eq!(v["PATH_INFO"], "/extra/path", "{v}");
    assert_eq!(v["QUERY_STRING"], "a=1&b=two", "{v}");
    assert_eq!(v["REQUEST_URI"], "/server.php/extra/path?a=1&b=two", "{v}");
    assert_eq!(v["GET"]["b"], "two", "{v}");
    assert_eq!(v["REMOTE_ADDR"], "127.0.0.1", "{v}");
    // The name from Host, the address and port where the client connected.
    assert_eq!(v["SERVER_NAME"], "shop.example", "{v}");
    assert_eq!(
        (v["SERVER_ADDR"].as_str(), v["SERVER_PORT"].as_str()),
        (Some("127.0.0.1"), Some(&*d.port.to_string())),
        "{v}"
    );
    // `X_Test` would pass for `X-Test`: dropped, as nginx does.
    assert_eq!(v["HTTP_X_TEST"], "yes", "{v}");
    assert_eq!(v["HTTP_COOKIE"], "a=1; b=2", "{v}");
    assert_eq!(v["GATEWAY_INTERFACE"], "CGI/1.1", "{v}");
    // A form post reaches $_POST.
    let form = "name=dispatcher&n=42";
    c.send(
        format!("POST /server.php HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}", form.len())
            .as_bytes(),
    );
    let r = c.read_response();
    let v = json(&r.body);
    assert_eq!((v["REQUEST_METHOD"].as_str(), v["POST"]["n"].as_str()), (Some("POST"), Some("42")), "{v}");
    assert_eq!(v["CONTENT_LENGTH"], form.len().to_string(), "{v}");
    // Statuses and fields a script sets; a redirect; its stderr is logged.
    let r = c.get("x", "/status.php?code=418&log=a-line-for-the-log");
    assert_eq!((r.status, r.header("x-from")), (418, Some("php")), "{r:?}");
    assert!(d.wait_log(Duration::from_secs(5), |l| l.contains("a-line-for-the-log")), "{}", d.log());
    let r = c.get("x", "/status.php?to=/elsewhere");
    assert_eq!((r.status, r.header("location")), (302, Some("/elsewhere")), "{r:?}");
    // What names no script is 404 from the worker, never run.
    for path in ["/nope.php", "/style.css", "/up/evil.jpg/x.php", "/up/"] {
        assert_eq!(c.get("x", path).status, 404, "{path}");
    }
    // Out of the root, a NUL, an encoded slash: 400.
    for path in ["/../etc/passwd", "/%2e%2e/server.php", "/server.php%00.txt", "/a%2fb.php"] {
        let mut c = d.connect();
        let r = c.get("x", path);
        assert_eq!(r.status, 400, "{path}: {r:?}");
    }
    assert_eq!(c.get("x", "/index.php?name=again").status, 200);
}

#[test]
fn ten_mib_go_up_and_down_through_a_fastcgi_pool() {
    let dir = php_dir("fcgi-big-", "");
    let Some(d) = start(&dir) else { return };
    let data: Vec<u8> = (0..TEN_MIB as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let want = md5(&data);
    let file = dir.path.join("up.bin");
    std::fs::write(&file, &data).unwrap();
    let at = format!("@{}", file.display());
    // With a Content-Length (streamed to the script as it arrives), then
    // chunked (held until complete, for its CONTENT_LENGTH).
    for extra in [&[][..], &["-H", "Transfer-Encoding: chunked"][..]] {
        let mut args = vec!["--data-binary", &at, "-H", "Content-Type: application/octet-stream"];
        args.extend_from_slice(extra);
        let (status, body) = curl(&d, &args, "/upload.php");
        assert_eq!(status, 200, "{extra:?}: {}\n{}", String::from_utf8_lossy(&body), d.log());
        let v = json(&body);
        assert_eq!((v["bytes"].as_u64(), v["md5"].as_str()), (Some(TEN_MIB as u64), Some(want.as_str())), "{extra:?}");
    }
    // Down: streamed without a length (chunked to the client), then with
    // the script's Content-Length.
    let pattern: Vec<u8> = b"0123456789abcdef".repeat(TEN_MIB / 16);
    for q in ["mib=10", "mib=10&length=1"] {
        let (status, body) = curl(&d, &["-D", "/dev/stderr"], &format!("/download.php?{q}"));
        assert_eq!(status, 200, "{q}");
        assert_eq!(body.len(), TEN_MIB, "{q}");
        assert!(body == pattern, "{q}: the download's bytes differ");
    }
}

/// php-fpm's master: the worker's child.
fn php_fpm_pid(worker: u32) -> Option<u32> {
    tests::children(worker).first().copied()
}

#[test]
fn php_fpm_killed_under_load_fails_only_what_it_had_taken() {
    let dir = php_dir("fcgi-kill-", "");
    let Some(d) = start(&dir) else { return };
    assert_eq!(d.connect().get("x", "/").status, 200, "{}", d.log());
    let worker = d.workers()[0];
    let fpm = php_fpm_pid(worker).expect("php-fpm is the worker's child");
    let fpm_children = tests::children(fpm);
    assert_eq!(fpm_children.len(), 4, "php-fpm's children");
    let clients = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let threads = tests::load_until(&d, clients, "/server.php", stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    tests::signal(fpm, libc::SIGKILL);
    assert!(
        d.wait_log(Duration::from_secs(10), |l| l.contains("the app `") && l.contains("exited")),
        "the worker did not notice: {}",
        d.log()
    );
    // Served again by a new worker and php-fpm, under the same load.
    let t0 = Instant::now();
    let served = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        d.workers().first().is_some_and(|w| *w != worker) && d.connect().get("x", "/").status == 200
    });
    assert!(served, "not served again within {:?}: {}", t0.elapsed(), d.log());
    // The old php-fpm's children (they outlive their master) are gone.
    let left: Vec<u32> = fpm_children.iter().copied().filter(|&p| tests::alive(p)).collect();
    assert!(left.is_empty(), "php-fpm children {left:?} outlived their master");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<[u32; 3]> = tests::join_all(threads, "a load client");
    let ok: u32 = seen.iter().map(|s| s[0]).sum();
    let failed: u32 = seen.iter().map(|s| s[1]).sum();
    let other: u32 = seen.iter().map(|s| s[2]).sum();
    // At most what was in flight (a request per client) fails, with 502.
    assert!(ok > 0 && other == 0 && failed <= clients as u32, "200: {ok}, 502: {failed}, other: {other}\n{}", d.log());
}

/// A php-fpm started by the test, as one a system runs.
struct OwnFpm {
    child: std::process::Child,
    sock: PathBuf,
    _dir: TempDir,
}

impl OwnFpm {
    fn start() -> OwnFpm {
        let dir = TempDir::new(&format!("fcgi-own-fpm-{}", std::process::id()));
        let sock = dir.path.join("fpm.sock");
        let conf = dir.path.join("fpm.conf");
        std::fs::write(
            &conf,
            format!(
                "[global]\nerror_log = {}\ndaemonize = no\n[www]\nlisten = {}\nlisten.mode = 0666\npm = static\npm.max_children = 2\n",
                dir.path.join("fpm.log").display(),
                sock.display()
            ),
        )
        .unwrap();
        let bin = php_fpm_binary();
        let child = Command::new(&bin)
            .args(["--nodaemonize", "--allow-to-run-as-root", "--fpm-config"])
            .arg(&conf)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        assert!(wait_until(Duration::from_secs(10), Duration::from_millis(20), || sock.exists()), "php-fpm: no socket");
        dir.make_readable();
        OwnFpm { child, sock, _dir: dir }
    }
}

impl Drop for OwnFpm {
    fn drop(&mut self) {
        // SIGTERM: php-fpm's master stops its children (SIGKILL would
        // leave them).
        tests::signal(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}

fn php_fpm_binary() -> PathBuf {
    let found = std::fs::read_dir("/usr/sbin")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("php-fpm")))
        .max();
    found.expect("php-fpm is installed (cargo xtask test installs it)")
}

#[test]
fn a_running_php_fpm_and_a_command_serve_pools_too() {
    if !tests::privileged() {
        return;
    }
    let dir = php_dir("fcgi-connect-", "");
    let fpm = OwnFpm::start();
    let r = root(&dir);
    let connect = format!("unix:{}", fpm.sock.display());
    // The command: php-fpm again, with a configuration naming $SOCKET
    // (php-fpm expands environment variables in it).
    let conf = dir.path.join("cmd-fpm.conf");
    std::fs::write(
        &conf,
        "[global]\nerror_log = /dev/null\ndaemonize = no\n[cmd]\nlisten = ${SOCKET}\npm = static\npm.max_children = 2\n",
    )
    .unwrap();
    dir.make_readable();
    let bin = php_fpm_binary().display().to_string();
    let conf = conf.display().to_string();
    let connect_args = ["fastcgi", "--root", &r, "--connect", &connect];
    let command_args = [
        "fastcgi",
        "--root",
        &r,
        "--keep-conn",
        "--max-connections",
        "2",
        "--",
        &bin,
        "--nodaemonize",
        "--allow-to-run-as-root",
        "--fpm-config",
        &conf,
    ];
    let Some(d) = Dispatcher::start_if_privileged(
        &[
            PoolDef::worker("running", &["running.example/"], &connect_args),
            PoolDef::worker("cmd", &["*/"], &command_args),
        ],
        "",
    ) else {
        return;
    };
    for host in ["running.example", "other.example"] {
        let mut c = d.connect();
        for _ in 0..3 {
            let r = c.get(host, "/server.php");
            assert_eq!(r.status, 200, "{host}: {r:?}\n{}", d.log());
            assert_eq!(json(&r.body)["HTTP_HOST"], host);
        }
    }
    // The one the test runs got the `running` pool's requests.
    let fpm_children = tests::children(fpm.child.id());
    assert!(!fpm_children.is_empty(), "the test's php-fpm has no children");
    assert!(d.log().contains(&format!("addr={connect}")), "{}", d.log());
}

#[test]
fn one_configuration_routes_to_proxy_fastcgi_and_native_pools() {
    let php = php_dir("fcgi-mixed-php-", "php");
    let py = TempDir::new(&format!("fcgi-mixed-py-{}", std::process::id()));
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/apps/python/app.py");
    std::fs::copy(&app, py.path.join("app.py")).unwrap();
    py.make_readable();
    let (php_root, py_dir) = (root(&php), root(&py));
    let php_args = ["fastcgi", "--root", &php_root, "--php-fpm", "--children", "2"];
    let py_args = ["proxy", "--", "gunicorn", "--chdir", &py_dir, "-b", "127.0.0.1:$PORT", "app:app"];
    let Some(d) = Dispatcher::start_if_privileged(
        &[
            PoolDef::echo("native", &["*/"]),
            PoolDef::worker("php", &["*/php/"], &php_args),
            PoolDef::worker("py", &["py.example/"], &py_args),
        ],
        "",
    ) else {
        return;
    };
    let mut c = d.connect();
    // By prefix: /php/ runs the scripts under ROOT/php.
    let r = c.get("any.example", "/php/server.php/x");
    assert_eq!(r.status, 200, "{r:?}\n{}", d.log());
    let v = json(&r.body);
    assert_eq!((v["SCRIPT_NAME"].as_str(), v["PATH_INFO"].as_str()), (Some("/php/server.php"), Some("/x")), "{v}");
    // By host, the WSGI app, whatever the path (even /php/).
    let r = c.get("py.example", "/");
    assert!(r.status == 200 && String::from_utf8_lossy(&r.body).contains("WSGI app"), "{r:?}");
    let r = c.get("py.example", "/php/server.php");
    assert_eq!(r.status, 404, "gunicorn's 404: {r:?}");
    // Everything else: the native echo pool, on the same connection.
    c.get_from("any.example", "/elsewhere", "native");
    c.get_from("py.example.org", "/phpx", "native");
    let r = c.get("any.example", "/php/");
    assert!(String::from_utf8_lossy(&r.body).contains("from PHP"), "{r:?}");
}

#[test]
fn php_fpm_idles_out_with_its_worker_and_cold_starts_again() {
    let dir = php_dir("fcgi-idle-", "");
    let r = root(&dir);
    let args = ["fastcgi", "--root", &r, "--php-fpm", "--children", "2"];
    let Some(d) = Dispatcher::start_if_privileged(
        &[PoolDef { extra: "idle_timeout_secs = 1\n", ..PoolDef::worker("php", &["*/"], &args) }],
        "",
    ) else {
        return;
    };
    // Cold start: the first request starts the worker and php-fpm.
    let t0 = Instant::now();
    let first = json(&d.connect().get("x", "/server.php").body)["pid"].as_u64();
    let cold = t0.elapsed();
    assert!(first.is_some(), "{}", d.log());
    let worker = d.workers()[0];
    let fpm = php_fpm_pid(worker).expect("php-fpm is the worker's child");
    let mut family = tests::children(fpm);
    family.push(fpm);
    // Idle: the worker exits, and php-fpm and its children with it.
    let gone = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        !tests::alive(worker) && family.iter().all(|&p| !tests::alive(p))
    });
    assert!(gone, "worker {worker} and php-fpm {family:?} still there after the idle time-out\n{}", d.log());
    // And a new request starts them again.
    let again = json(&d.connect().get("x", "/server.php").body)["pid"].as_u64();
    assert!(again.is_some() && again != first, "{again:?} after {first:?}");
    eprintln!("cold start (worker + php-fpm + first request): {cold:?}");
}
