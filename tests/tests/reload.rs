//! Configuration reload (SIGHUP, `dispatcher reload`): pools and routes
//! added, changed and removed while connections stay open and requests
//! keep being answered.

use std::time::Duration;

use tests::{join_all, on_connections, wait_until, Dispatcher, PoolDef, START_TIMEOUT};

/// How long a change (a worker stopping, a pin going) may take to show.
const SETTLE: Duration = Duration::from_secs(15);

/// Pool `a` on `routes`, where the test can run (`None` skips it).
fn pool_a(routes: &[&str]) -> Option<Dispatcher> {
    Dispatcher::start_if_privileged(&[PoolDef::echo("a", routes)], "")
}

#[test]
fn reload_adds_a_pool_and_a_route_while_a_keepalive_connection_stays_open() {
    let Some(d) = pool_a(&["*/a/"]) else { return };
    let mut c = d.connect();
    let first = c.get_from("x", "/a/1", "a").worker_pid();
    assert_eq!(d.connect().get("x", "/b/1").status, 404);

    d.rewrite(&[PoolDef::echo("a", &["*/a/", "*/c/"]), PoolDef::echo("b", &["*/b/"])], "");
    let (ok, out) = d.reload();
    assert!(ok, "reload failed: {out}\n{}", d.log());
    assert!(out.contains("added: b") && out.contains("new routes: a"), "{out}");

    // The same connection, on to the new pool and the new route; the
    // pool whose routes changed kept its worker.
    for i in 0..5 {
        let r = c.get("x", &format!("/b/{i}"));
        assert_eq!((r.status, r.pool(), r.header("x-echo-path")), (200, "b", Some(format!("/b/{i}").as_str())));
        let r = c.get_from("x", &format!("/c/{i}"), "a");
        assert_eq!(r.worker_pid(), first, "pool a's worker was replaced by a routes-only change");
        c.get_from("x", &format!("/a/{i}"), "a");
    }
    assert!(d.pin_dir().join("ring_b").exists(), "no pin for the new pool's ring");
    assert_eq!(d.pool_stat("b", "fast_requests") + d.pool_stat("b", "slow_parsed"), 5);
}

#[test]
fn sighup_restarts_a_changed_pool_and_removes_a_dropped_one_without_failing_a_request() {
    let running = "start_mode = \"always-running\"";
    let pools = [
        PoolDef { extra: running, ..PoolDef::echo("p", &["*/"]) },
        PoolDef { extra: running, ..PoolDef::echo("gone", &["*/gone/"]) },
    ];
    let Some(d) = Dispatcher::start_if_privileged(&pools, "") else { return };
    assert!(d.wait_log(START_TIMEOUT, |l| l.matches("worker started").count() >= 2), "{}", d.log());
    let old = d.connect().get("x", "/p").worker_pid();
    let gone = d.connect().get("x", "/gone/x").worker_pid();

    // A bounded load on keep-alive connections across the reload.
    const CONNS: usize = 4;
    const REQUESTS: usize = 400;
    let load = on_connections(&d, CONNS, |k, mut c| {
        let mut pids = std::collections::BTreeSet::new();
        for i in 0..REQUESTS {
            pids.insert(c.get_echoed(&format!("/load/{k}/{i}")).worker_pid());
            std::thread::sleep(Duration::from_millis(2));
        }
        pids
    });
    std::thread::sleep(Duration::from_millis(200));
    let changed = "start_mode = \"always-running\"\nenv = { GENERATION = \"2\" }";
    d.rewrite(&[PoolDef { extra: changed, ..PoolDef::echo("p", &["*/"]) }], "");
    d.sighup();
    assert!(d.wait_log(SETTLE, |l| l.contains("configuration reloaded")), "{}", d.log());
    let seen: std::collections::BTreeSet<u32> =
        join_all(load, "a load connection failed").into_iter().flatten().collect();
    let new = d.connect().get("x", "/p").worker_pid();
    assert_ne!(new, old, "the changed pool's worker was not replaced");
    assert!(seen.contains(&new), "no load request reached the new worker: {seen:?}");

    // The removed pool: no route, no worker, no pins.
    let r = d.connect().get("x", "/gone/x");
    assert_eq!((r.status, r.pool()), (200, "p"), "`/gone/` now falls to `*/`");
    wait_until(SETTLE, Duration::from_millis(50), || !d.workers().contains(&gone) && !d.workers().contains(&old));
    assert!(!d.workers().contains(&gone), "the removed pool's worker still runs");
    assert!(!d.workers().contains(&old), "the replaced worker still runs");
    assert!(d.wait_log(SETTLE, |l| l.matches("retired").count() >= 2), "{}", d.log());
    assert!(!d.pin_dir().join("ring_gone").exists());
    assert!(d.pin_dir().join("ring_p").exists());
    assert!(d.stats()["pools"].get("gone").is_none(), "{}", d.stats());
}

#[test]
fn a_reload_that_cannot_apply_changes_nothing_and_says_why() {
    let Some(d) = pool_a(&["*/"]) else { return };
    let mut c = d.connect();
    assert_eq!(c.get("x", "/1").status, 200);

    d.rewrite(
        &[PoolDef::echo("a", &["*/"]), PoolDef { command: Some("no-such-worker"), ..PoolDef::echo("b", &["*/b/"]) }],
        "",
    );
    let (ok, out) = d.reload();
    assert!(!ok && out.contains("no-such-worker"), "{out}");

    d.rewrite(&[PoolDef::echo("a", &["*/"])], "[limits]\nmax_body = 1024");
    let (ok, out) = d.reload();
    assert!(!ok && out.contains("`limits.max_body`") && out.contains("restart"), "{out}");

    std::fs::write(&d.config, "[[pool]]\nname = \"a\"\nroutes = 7\n").unwrap();
    let (ok, out) = d.reload();
    assert!(!ok && out.contains("routes"), "{out}");

    let r = c.get("x", "/b/2");
    assert_eq!((r.status, r.pool()), (200, "a"), "a failed reload changed the routes");
}
