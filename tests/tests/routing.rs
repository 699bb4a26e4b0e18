//! Requests land in the right pool: by path prefix (segment boundaries),
//! by host (an explicit host beats `*`), over keep-alive connections, and
//! on the kernel's fast path.

use tests::{join_all, on_connections, Dispatcher, PoolDef};

/// Connections and requests of the keep-alive load check.
const CONNECTIONS: usize = 10;
const REQUESTS_PER_CONNECTION: usize = 100;

/// Pools by path and by host, and a `*/` one, where the test can run
/// (`None` skips it).
fn four_pools() -> Option<Dispatcher> {
    Dispatcher::start_if_privileged(
        &[
            PoolDef::echo("app", &["*/app"]),
            PoolDef::echo("files", &["*/files/"]),
            PoolDef::echo("one", &["one.test/"]),
            PoolDef::echo("two", &["two.test/", "two.test/app"]),
            PoolDef::echo("root", &["*/"]),
        ],
        "",
    )
}

/// (host, path, pool that must answer)
const CASES: &[(&str, &str, &str)] = &[
    ("x.test", "/", "root"),
    ("x.test", "/app", "app"),
    ("x.test", "/app?q=1", "app"),
    ("x.test", "/app/", "app"),
    ("x.test", "/app/deep/er", "app"),
    ("x.test", "/apple", "root"),
    ("x.test", "/files", "root"),
    ("x.test", "/files/a.txt", "files"),
    ("ONE.test", "/app", "one"),
    ("one.test.", "/files/x", "one"),
    ("two.test:80", "/anything", "two"),
    ("two.test", "/app/x", "two"),
];

#[test]
fn routes_by_prefix_and_host_on_the_fast_path() {
    let Some(d) = four_pools() else { return };
    let mut c = d.connect();
    for (host, path, pool) in CASES {
        let r = c.get(host, path);
        assert_eq!(r.status, 200, "{host}{path}");
        assert_eq!(r.pool(), *pool, "{host}{path}");
        assert_eq!(r.header("x-echo-path"), Some(path.split('?').next().unwrap()), "{host}{path}");
    }

    // 1,000 requests over 10 keep-alive connections, all answered by the
    // right pool.
    let handles = on_connections(&d, CONNECTIONS, |k, mut c| {
        for i in 0..REQUESTS_PER_CONNECTION {
            let (host, path, pool) = CASES[(k * 7 + i) % CASES.len()];
            let r = c.get(host, path);
            assert_eq!((r.status, r.pool()), (200, pool), "conn {k} request {i}: {host}{path}");
        }
    });
    join_all(handles, "a client thread failed");

    // None of these plain GETs reached the user-space parser.
    let stats = d.stats();
    let mut fast = 0;
    for pool in ["app", "files", "one", "two", "root"] {
        assert_eq!(stats["pools"][pool]["slow_parsed"], 0, "pool {pool} saw slow-path requests: {stats}");
        fast += stats["pools"][pool]["fast_requests"].as_u64().unwrap();
    }
    let total = CASES.len() + CONNECTIONS * REQUESTS_PER_CONNECTION;
    assert_eq!(fast as usize, total, "{stats}");
}

#[test]
fn a_long_head_takes_the_slow_path_and_routes_the_same() {
    let Some(d) = four_pools() else { return };
    let mut c = d.connect();
    let pad = "p".repeat(6000);
    c.send(format!("GET /app/x HTTP/1.1\r\nHost: x.test\r\nX-Pad: {pad}\r\n\r\n").as_bytes());
    let r = c.read_response();
    assert_eq!((r.status, r.pool()), (200, "app"));
    // The connection stays usable (now on the slow path).
    c.get_from("one.test", "/y", "one");
    assert_eq!(d.pool_stat("app", "slow_parsed"), 1);
    assert_eq!(d.pool_stat("one", "slow_parsed"), 1);
    assert!(d.stats()["handoffs"]["head_too_large"].as_u64().unwrap() >= 1);
}

#[test]
fn unrouted_requests_get_404() {
    let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::echo("only", &["*/only/"])], "") else { return };
    let mut c = d.connect();
    let r = c.get("x", "/elsewhere");
    assert_eq!(r.status, 404);
    c.get_from("x", "/only/here", "only");
}

/// `/api` and `/api/` in two pools: `/api` stores the keys `/api\0` and
/// `/api/`, the second shared with the other pool's route. The longer
/// route prefix owns what both match, on the fast path and the slow path
/// alike, however the pools are listed.
#[test]
fn a_prefix_with_and_without_its_slash_in_two_pools() {
    for pools in [
        [PoolDef::echo("bare", &["*/api"]), PoolDef::echo("dir", &["*/api/"])],
        [PoolDef::echo("dir", &["*/api/"]), PoolDef::echo("bare", &["*/api"])],
    ] {
        let Some(d) = Dispatcher::start_if_privileged(&pools, "") else { return };
        let mut c = d.connect();
        for (path, pool) in [("/api", "bare"), ("/api?x=1", "bare"), ("/api/", "dir"), ("/api/v1/x", "dir")] {
            c.get_from("x.test", path, pool);
        }
        assert_eq!(c.get("x.test", "/apix").status, 404);
        // The slow path routes with the same table (a percent-encoded path
        // is routed in user space on its decoded form).
        let r = c.get("x.test", "/api/%761");
        assert_eq!((r.status, r.pool()), (200, "dir"), "slow path");
    }
}
