//! The operator's commands against a live instance (`dispatcher status`,
//! `pools`, `routes`, `queues`, `stop`, `start`, `recycle`), in table and
//! JSON form, with their effect observed over HTTP.

use std::time::{Duration, Instant};

use tests::{privileged, Dispatcher, PoolDef};

const SETTLE: Duration = Duration::from_secs(15);

fn worker_pid(r: &tests::Response) -> u32 {
    r.header("x-dispatcher-worker").expect("worker pid header").parse().unwrap()
}

fn json(d: &Dispatcher, cmd: &str) -> serde_json::Value {
    let (ok, out) = d.cli(&[cmd, "--json"]);
    assert!(ok, "dispatcher {cmd} --json: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("dispatcher {cmd} --json: {e}: {out}"))
}

fn two_pools() -> Dispatcher {
    Dispatcher::start(
        &[
            PoolDef { extra: "start_mode = \"always-running\"", ..PoolDef::echo("api", &["api.example/v1/", "*/api"]) },
            PoolDef::echo("web", &["*/"]),
        ],
        "",
    )
}

#[test]
fn status_pools_routes_and_queues_describe_the_running_instance() {
    if !privileged() {
        return;
    }
    let d = two_pools();
    let r = d.connect().get("api.example", "/v1/x");
    assert_eq!((r.status, r.pool()), (200, "api"));
    let api_pid = worker_pid(&r);

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
    let order: Vec<String> = routes.as_array().unwrap().iter().map(|r| format!("{}{}", r["host"].as_str().unwrap(), r["prefix"].as_str().unwrap())).collect();
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
    if !privileged() {
        return;
    }
    let d = two_pools();
    let first = worker_pid(&d.connect().get("x", "/api/1"));

    let (ok, out) = d.cli(&["recycle", "api"]);
    assert!(ok, "{out}");
    let t0 = Instant::now();
    loop {
        let r = d.connect().get("x", "/api/2");
        assert_eq!(r.status, 200, "a request failed during the recycle");
        if worker_pid(&r) != first {
            break;
        }
        assert!(t0.elapsed() < SETTLE, "recycle did not replace the worker: {}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    let (ok, out) = d.cli(&["stop", "api"]);
    assert!(ok, "{out}");
    let t0 = Instant::now();
    loop {
        let r = d.connect().get("x", "/api/3");
        if r.status == 503 {
            assert!(r.header("retry-after").is_some());
            break;
        }
        assert!(t0.elapsed() < SETTLE, "stop did not stop the pool: {}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(json(&d, "pools")[0]["state"], "stopped");
    // The other pool serves on.
    assert_eq!(d.connect().get("x", "/other").pool(), "web");

    let (ok, out) = d.cli(&["start", "api"]);
    assert!(ok, "{out}");
    let t0 = Instant::now();
    while d.connect().get("x", "/api/4").status != 200 {
        assert!(t0.elapsed() < SETTLE, "start did not start the pool: {}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_access_log_has_a_line_per_request_with_its_status_and_bytes() {
    if !privileged() {
        return;
    }
    let d = Dispatcher::start(&[PoolDef::echo("app", &["*/app/"])], "[log]\naccess = \"access.log\"");
    let log = d.config.parent().unwrap().join("access.log");
    let mut c = d.connect();
    let mut expect = Vec::new();
    for i in 0..5 {
        let path = format!("/app/{i}");
        c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: access-test/{i}\r\nReferer: http://ref/{i}\r\n\r\n").as_bytes());
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
