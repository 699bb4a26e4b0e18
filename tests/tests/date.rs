//! Every response carries a well-formed `Date` (RFC 9110 §6.6.1): the
//! workers' (the echo and static modes, on the kernel path, leased or
//! not) and the dispatcher's own answers (404 without a route, 400 for a
//! malformed request).

use std::time::SystemTime;

use tests::{privileged, Dispatcher, PoolDef, Response, TempDir};

/// How far a response's `Date` may be from the test's clock (the same
/// machine's: only the formatting's one-second steps and scheduling).
const SKEW_SECS: u64 = 5;

fn assert_date(what: &str, r: &Response) {
    let d = r.header("date").unwrap_or_else(|| panic!("{what}: no Date header: {r:?}"));
    let at = httpdate::parse_http_date(d).unwrap_or_else(|e| panic!("{what}: Date `{d}` is not an HTTP date: {e}"));
    assert!(d.ends_with(" GMT") && d.len() == 29, "{what}: Date `{d}` is not an IMF-fixdate");
    let now = SystemTime::now();
    let off = now.duration_since(at).or_else(|_| at.duration_since(now)).unwrap();
    assert!(off.as_secs() <= SKEW_SECS, "{what}: Date `{d}` is {off:?} off");
}

#[test]
fn every_pool_and_the_dispatcher_send_a_date() {
    if !privileged() {
        return;
    }
    // The static mode serves the request's whole path under its root.
    let site = TempDir::site(&format!("datesite{}", std::process::id()), &[("files/index.html", "<h1>dated</h1>\n")]);
    let dir = site.path.display().to_string();
    let d = Dispatcher::start(
        &[
            PoolDef::echo("echo", &["*/echo"]),
            PoolDef::worker("static", &["*/files/"], &["--pool-header", "static", &dir]),
        ],
        "",
    );
    let mut c = d.connect();
    // The first response goes through the dispatcher, the next ones are
    // written by the worker under its lease.
    for i in 0..3 {
        let r = c.get("x", &format!("/echo/{i}"));
        assert_eq!(r.status, 200);
        assert_date(&format!("echo #{i}"), &r);
    }
    let r = c.get("x", "/files/index.html");
    assert_eq!(r.status, 200, "{r:?}");
    assert_date("static file", &r);
    let r = c.get("x", "/files/missing.txt");
    assert_eq!(r.status, 404, "{r:?}");
    assert_date("static 404", &r);
    let r = c.get("x", "/nowhere");
    assert_eq!(r.status, 404, "{r:?}");
    assert_date("the dispatcher's 404", &r);

    let mut c = d.connect();
    c.send(b"GET /echo/x HTTP/1.1\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 400, "no Host: {r:?}");
    assert_date("the dispatcher's 400", &r);
}
