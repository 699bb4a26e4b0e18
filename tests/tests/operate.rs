//! The operator's commands against a live instance (`dispatcher status`,
//! `pools`, `routes`, `queues`, `stop`, `start`, `recycle`), in table and
//! JSON form, with their effect observed over HTTP.

use std::time::{Duration, Instant};

use tests::{wait_until, Dispatcher, PoolDef};

const SETTLE: Duration = Duration::from_secs(15);
/// How often a test asks again while it waits for a change.
const STEP: Duration = Duration::from_millis(20);

/// Whether `GET path` gets a 200 within [`SETTLE`] (asking every `step`).
fn serves(d: &Dispatcher, path: &str, step: Duration) -> bool {
    wait_until(SETTLE, step, || d.connect().get("x", path).status == 200)
}

fn json(d: &Dispatcher, cmd: &str) -> serde_json::Value {
    let (ok, out) = d.cli(&[cmd, "--json"]);
    assert!(ok, "dispatcher {cmd} --json: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("dispatcher {cmd} --json: {e}: {out}"))
}

/// Pools `api` (always running) and `web`, where the test can run (`None`
/// skips it).
fn two_pools() -> Option<Dispatcher> {
    Dispatcher::start_if_privileged(
        &[
            PoolDef { extra: "start_mode = \"always-running\"", ..PoolDef::echo("api", &["api.example/v1/", "*/api"]) },
            PoolDef::echo("web", &["*/"]),
        ],
        "",
    )
}

#[test]
fn status_pools_routes_and_queues_describe_the_running_instance() {
    let Some(d) = two_pools() else { return };
    let api_pid = d.connect().get_from("api.example", "/v1/x", "api").worker_pid();

    let status = json(&d, "status");
    assert_eq!(status["pid"].as_u64(), Some(d.pid() as u64));
    let progs: Vec<&str> = status["programs"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(progs.contains(&"classify") && progs.contains(&"track_conn"), "{status}");
    let (ok, table) = d.cli(&["status"]);
    assert!(ok && table.contains("PROGRAM") && table.contains("sk_skb stream verdict"), "{table}");

    let pools = json(&d, "pools");
    let api = pools.as_array().unwrap().iter().find(|p| p["name"] == "api").expect("pool api");
    assert_eq!(api["state"], "running");
    assert_eq!(api["slots"][0]["pid"].as_u64(), Some(api_pid as u64));
    assert!(api["requests"]["kernel"].as_u64().unwrap() >= 1, "{api}");
    let (ok, table) = d.cli(&["pools"]);
    assert!(ok && table.lines().any(|l| l.starts_with("api") && l.contains(&api_pid.to_string())), "{table}");

    // Match order: the explicit host first, then the longest prefix.
    let routes = json(&d, "routes");
    let order: Vec<String> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}{}", r["host"].as_str().unwrap(), r["prefix"].as_str().unwrap()))
        .collect();
    assert_eq!(order, ["api.example/v1/", "*/api", "*/"]);
    let (ok, table) = d.cli(&["routes"]);
    assert!(ok && table.contains("api.example") && table.contains("PREFIX"), "{table}");

    let queues = json(&d, "queues");
    assert_eq!(queues.as_array().unwrap().len(), 2);
    let (ok, table) = d.cli(&["queues"]);
    assert!(ok && table.contains("QUEUED BYTES"), "{table}");

    let (ok, out) = d.cli(&["stop", "nope"]);
    assert!(!ok && out.contains("no pool named `nope`"), "{out}");
}

#[test]
fn stop_start_and_recycle_act_on_a_pool() {
    let Some(d) = two_pools() else { return };
    let first = d.connect().get("x", "/api/1").worker_pid();

    let (ok, out) = d.cli(&["recycle", "api"]);
    assert!(ok, "{out}");
    let replaced = wait_until(SETTLE, STEP, || {
        let r = d.connect().get("x", "/api/2");
        assert_eq!(r.status, 200, "a request failed during the recycle");
        r.worker_pid() != first
    });
    assert!(replaced, "recycle did not replace the worker: {}", d.log());

    let (ok, out) = d.cli(&["stop", "api"]);
    assert!(ok, "{out}");
    let stopped = wait_until(SETTLE, STEP, || {
        let r = d.connect().get("x", "/api/3");
        let stopped = r.status == 503;
        if stopped {
            assert!(r.header("retry-after").is_some());
        }
        stopped
    });
    assert!(stopped, "stop did not stop the pool: {}", d.log());
    assert_eq!(json(&d, "pools")[0]["state"], "stopped");
    // The other pool serves on.
    assert_eq!(d.connect().get("x", "/other").pool(), "web");

    let (ok, out) = d.cli(&["start", "api"]);
    assert!(ok, "{out}");
    assert!(serves(&d, "/api/4", STEP), "start did not start the pool: {}", d.log());
}

#[test]
fn the_access_log_has_a_line_per_request_with_its_status_and_bytes() {
    let pools = [PoolDef::echo("app", &["*/app/"])];
    let Some(d) = Dispatcher::start_if_privileged(&pools, "[log]\naccess = \"access.log\"") else { return };
    let log = d.config.parent().unwrap().join("access.log");
    let mut c = d.connect();
    let mut expect = Vec::new();
    for i in 0..5 {
        let path = format!("/app/{i}");
        c.send(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: access-test/{i}\r\nReferer: http://ref/{i}\r\n\r\n")
                .as_bytes(),
        );
        let r = c.read_response();
        assert_eq!(r.status, 200);
        expect.push(format!("\"GET {path} HTTP/1.1\" 200 {} \"http://ref/{i}\" \"access-test/{i}\"", r.body.len()));
    }
    let r = d.connect().get("x", "/elsewhere");
    assert_eq!(r.status, 404);
    expect.push(format!("\"GET /elsewhere HTTP/1.1\" 404 {}", r.body.len()));
    let t0 = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if expect.iter().all(|e| text.contains(e.as_str())) || t0.elapsed() > SETTLE {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for e in &expect {
        assert!(text.lines().filter(|l| l.contains(e.as_str())).count() == 1, "no single line with {e} in:\n{text}");
    }
    assert_eq!(text.lines().count(), expect.len(), "{text}");
    for l in text.lines() {
        assert!(l.starts_with("127.0.0.1 - - ["), "{l}");
    }
}

/// `GET /metrics` on `addr`: the samples (name with labels → value),
/// after checking every line is Prometheus text (a HELP/TYPE comment, or a
/// sample of a metric whose TYPE came before).
fn scrape(port: u16) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/plain; version=0.0.4"), "{head}");
    let mut typed = std::collections::BTreeSet::new();
    let mut samples = std::collections::BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| typed.contains(*b)))
            .unwrap_or(name);
        assert!(typed.contains(base), "sample before its TYPE: {line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
        }
        samples.insert(series.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value: {line}")));
    }
    samples
}

#[test]
fn the_metrics_endpoint_is_prometheus_text_and_its_counters_move() {
    let port = tests::free_port();
    let admin = format!("[admin]\nmetrics = \"127.0.0.1:{port}\"");
    let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::echo("p", &["*/app/"])], &admin) else { return };
    let kernel = "dispatcher_requests_total{pool=\"p\",path=\"kernel\"}";
    let ok = "dispatcher_responses_total{pool=\"p\",class=\"2xx\"}";
    let count = "dispatcher_handling_seconds_count{pool=\"p\"}";
    let before = scrape(port);
    let mut c = d.connect();
    for i in 0..5 {
        assert_eq!(c.get("x", &format!("/app/{i}")).status, 200);
    }
    assert_eq!(d.connect().get("x", "/nothing").status, 404);
    // Workers report every second.
    let t0 = Instant::now();
    let after = loop {
        let m = scrape(port);
        if m[ok] >= before[ok] + 5.0 || t0.elapsed() > SETTLE {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(after[kernel], before[kernel] + 5.0, "{after:?}");
    assert!(after[ok] >= before[ok] + 5.0 && after[count] >= before[count] + 5.0, "{after:?}");
    assert_eq!(
        after["dispatcher_local_responses_total{class=\"4xx\"}"],
        before["dispatcher_local_responses_total{class=\"4xx\"}"] + 1.0
    );
    assert_eq!(after["dispatcher_workers{pool=\"p\"}"], 1.0);
    assert!(after.contains_key("dispatcher_guard_packets_total{verdict=\"passed\"}"));
}

#[test]
fn a_start_right_after_a_stop_is_not_lost() {
    let Some(d) = two_pools() else { return };
    assert_eq!(d.connect().get("x", "/api/1").status, 200);
    // The worker takes a while to stop (it is busy): the start comes in
    // meanwhile.
    let mut slow = d.connect();
    slow.send(b"GET /api/delay/1000/x HTTP/1.1\r\nHost: x\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.cli(&["stop", "api"]).0);
    assert!(d.cli(&["start", "api"]).0);
    assert_eq!(slow.read_response().status, 200);
    assert!(serves(&d, "/api/2", Duration::from_millis(50)), "the pool stayed stopped after stop + start: {}", d.log());
}

#[test]
fn a_client_gone_mid_upload_does_not_hold_up_a_recycle() {
    let Some(d) = Dispatcher::one_pool("start_mode = \"always-running\"\nshutdown_time_limit_secs = 60") else {
        return;
    };
    let first = d.connect().get("x", "/one").worker_pid();
    // A body the kernel copies to the worker, cut short by the client.
    let mut c = d.connect();
    c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n");
    c.send(&[b'x'; 1000]);
    std::thread::sleep(Duration::from_millis(200));
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.cli(&["recycle", "p"]).0);
    let replaced = wait_until(SETTLE, Duration::from_millis(50), || {
        let r = d.connect().get("x", "/two");
        assert_eq!(r.status, 200);
        r.worker_pid() != first
    });
    assert!(replaced, "the worker never stopped pulling: {}", d.log());
    // It finished on its own, not at the shutdown limit.
    assert!(
        d.wait_log(SETTLE, |l| l.contains("worker exited (finished)") || l.contains("worker exited cleanly")),
        "{}",
        d.log()
    );
    assert!(!d.log().contains("did not finish within the shutdown time limit"), "{}", d.log());
}

/// `bpftool -j map dump` of `d`'s pinned `route_names` map.
fn dump_route_names(d: &Dispatcher) -> std::process::Output {
    std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(d.pin_dir().join("route_names"))
        .output()
        .expect("running bpftool")
}

#[test]
fn bpftool_prints_the_routes_readably() {
    let Some(d) = two_pools() else { return };
    let out = dump_route_names(&d);
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let mut rows: Vec<(u64, String, String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let f = &e["formatted"];
            let s = |k: &str| f["value"][k].as_str().unwrap_or_else(|| panic!("no {k} in {e}")).to_string();
            (f["key"].as_u64().unwrap(), s("host"), s("prefix"), s("pool"))
        })
        .collect();
    rows.sort();
    let rows: Vec<(String, String, String)> = rows.into_iter().map(|(_, h, p, n)| (h, p, n)).collect();
    let want = [("api.example", "/v1/", "api"), ("*", "/api", "api"), ("*", "/", "web")];
    assert_eq!(rows, want.map(|(h, p, n)| (h.to_string(), p.to_string(), n.to_string())));
    // A reload rewrites it.
    d.rewrite(&[PoolDef::echo("web", &["*/", "*/new/"])], "");
    assert!(d.reload().0);
    let out = dump_route_names(&d);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"/new/\"") && !text.contains("api.example"), "{text}");
}

#[test]
fn the_access_log_rotates_at_its_size_limit() {
    // About 90 bytes a line: one rotation in 8 lines (one old file is kept).
    let log = "[log]\naccess = \"access.log\"\naccess_max_bytes = 600";
    let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::echo("app", &["*/"])], log) else { return };
    let dir = d.config.parent().unwrap().to_path_buf();
    let mut c = d.connect();
    for i in 0..8 {
        assert_eq!(c.get("x", &format!("/r{i}")).status, 200);
        // Separate batches (the worker sends its records every 100 ms).
        std::thread::sleep(Duration::from_millis(150));
    }
    let t0 = Instant::now();
    let all = loop {
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
        let all = read("access.log.1") + &read("access.log");
        if (0..8).all(|i| all.contains(&format!("GET /r{i} "))) || t0.elapsed() > SETTLE {
            break all;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(dir.join("access.log.1").exists(), "not rotated:\n{all}");
    for i in 0..8 {
        assert!(all.contains(&format!("GET /r{i} ")), "line {i} lost across the rotation:\n{all}");
    }
    assert!(std::fs::metadata(dir.join("access.log")).unwrap().len() < 600);
}

/// `dispatcher stats | head`, and the like: a reader that goes away ends
/// the command quietly (SIGPIPE), not with a panic on the closed pipe.
#[test]
fn a_command_piped_into_a_reader_that_leaves_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let Some(d) = two_pools() else { return };
    for cmd in ["stats", "status", "pools", "routes"] {
        let mut child = std::process::Command::new(tests::bin_dir().join("dispatcher"))
            .args([cmd, "--instance", &d.instance])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the first write.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "dispatcher {cmd}: {stderr}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "dispatcher {cmd}: {:?} {stderr}",
            out.status
        );
    }
}
