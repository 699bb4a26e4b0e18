//! Host tests of the kernel's head scanner and route keys: the same code
//! the verdict program runs.

use dispatcher_ebpf::{
    abi::{PATH_KEY_MAX, WILDCARD_HOST},
    route::{request_key, route_keys, wildcard, RouteKey, HOST_BITS},
    scan::{flag, host_hash, scan, slow, Scanner, Step},
};
use proptest::prelude::*;

fn done(head: &[u8]) -> Scanner {
    let (r, s) = scan(head);
    assert_eq!(r, Step::Done, "{:?} slow={}", String::from_utf8_lossy(head), s.slow);
    s
}

fn refused(head: &[u8]) -> u32 {
    match scan(head) {
        (Step::Slow(c), _) => c,
        (r, _) => panic!("{:?} was not refused: {r:?}", String::from_utf8_lossy(head)),
    }
}

#[test]
fn plain_get() {
    let h = b"GET /echo/hi?x=1 HTTP/1.1\r\nHost: Example.COM.:8080\r\nAccept: */*\r\n\r\n";
    let s = done(h);
    assert_eq!(s.end as usize, h.len());
    assert_eq!(s.path_key(), b"/echo/hi");
    assert_eq!(s.host_hash, host_hash(b"example.com"));
    assert_eq!(s.content_length, 0);
    assert!(!s.wants_close());
}

#[test]
fn content_length_and_connection() {
    let s = done(b"POST /u HTTP/1.1\r\nhost: a\r\nContent-Length:  42 \r\nConnection: Close\r\n\r\n");
    assert_eq!(s.content_length, 42);
    assert!(s.wants_close());
    let s = done(b"GET / HTTP/1.0\r\n\r\n");
    assert!(s.wants_close());
    assert_eq!(s.host_hash, WILDCARD_HOST);
    let s = done(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert!(!s.wants_close());
}

#[test]
fn what_the_kernel_leaves_to_user_space() {
    let cases: &[(&[u8], u32)] = &[
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", slow::NOT_ORIGIN_FORM),
        (b"GET /a%2fb HTTP/1.1\r\nHost: a\r\n\r\n", slow::AMBIGUOUS_PATH),
        (b"GET /a/../b HTTP/1.1\r\nHost: a\r\n\r\n", slow::AMBIGUOUS_PATH),
        (b"GET //a HTTP/1.1\r\nHost: a\r\n\r\n", slow::AMBIGUOUS_PATH),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", slow::BAD_VERSION),
        (b"GET / HTTP/1.1\nHost: a\n\n", slow::BAD_VERSION),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", slow::TRANSFER_ENCODING),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\n",
            slow::DUPLICATE_CONTENT_LENGTH,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", slow::BAD_CONTENT_LENGTH),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", slow::DUPLICATE_HOST),
        (b"GET / HTTP/1.1\r\nAccept: *\r\n\r\n", slow::MISSING_HOST),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", slow::OBS_FOLD),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", slow::BAD_HEADER_NAME),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", slow::UPGRADE),
        (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", slow::EXPECT),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\r\n", slow::CONNECTION_OPTIONS),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", slow::METHOD_CONNECT),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", slow::NOT_ORIGIN_FORM),
        (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", slow::BAD_HEADER_VALUE),
    ];
    for (h, code) in cases {
        assert_eq!(refused(h), *code, "{:?}", String::from_utf8_lossy(h));
    }
}

#[test]
fn incremental_in_any_split_is_the_same() {
    let h =
        b"PUT /app/x HTTP/1.1\r\nHost: h.example\r\nContent-Length: 7\r\nX-Long: abcdefghijklmnopqrstuvwxyz\r\n\r\n";
    let whole = done(h);
    // One byte at a time is how the kernel sees a head split over segments.
    let mut s = Scanner::new();
    let mut end = None;
    for (i, &b) in h.iter().enumerate() {
        if s.step(b, i as u32) == Step::Done {
            end = Some(i + 1);
            break;
        }
    }
    assert_eq!(end, Some(h.len()));
    assert_eq!(s, whole);
}

#[test]
fn long_paths_are_truncated_in_the_key() {
    let path = format!("/{}", "a".repeat(300));
    let h = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let s = done(h.as_bytes());
    assert_eq!(s.path_key().len(), PATH_KEY_MAX);
    let k = request_key(s.host_hash, s.path_key());
    assert_eq!(k.prefix_len, HOST_BITS + 8 * PATH_KEY_MAX as u32);
}

/// A tiny LPM lookup over route keys, as the kernel's trie answers it.
fn lpm(table: &[(RouteKey, &'static str)], key: &RouteKey) -> Option<&'static str> {
    let mut best: Option<(u32, &'static str)> = None;
    for (r, pool) in table {
        if r.prefix_len > key.prefix_len {
            continue;
        }
        let bits = r.prefix_len as usize;
        let bytes = bits / 8;
        if r.data[..bytes] == key.data[..bytes] && best.is_none_or(|(b, _)| r.prefix_len > b) {
            best = Some((r.prefix_len, pool));
        }
    }
    best.map(|b| b.1)
}

fn lookup(table: &[(RouteKey, &'static str)], host: &[u8], path: &[u8]) -> Option<&'static str> {
    let k = request_key(host_hash(host), path);
    lpm(table, &k).or_else(|| lpm(table, &wildcard(&k)))
}

#[test]
fn route_precedence_and_segment_boundaries() {
    let mut table = Vec::new();
    let mut add = |host: Option<&str>, prefix: &str, pool: &'static str| {
        let h = host.map(|h| host_hash(h.as_bytes())).unwrap_or(WILDCARD_HOST);
        let (keys, n) = route_keys(h, prefix.as_bytes()).unwrap();
        for k in &keys[..n] {
            table.push((*k, pool));
        }
    };
    add(None, "/", "root");
    add(None, "/app", "app");
    add(None, "/app/admin/", "admin");
    add(Some("api.example"), "/", "api");
    add(Some("api.example"), "/v2", "v2");
    assert_eq!(lookup(&table, b"x", b"/"), Some("root"));
    assert_eq!(lookup(&table, b"x", b"/app"), Some("app"));
    assert_eq!(lookup(&table, b"x", b"/app/"), Some("app"));
    assert_eq!(lookup(&table, b"x", b"/app/x"), Some("app"));
    assert_eq!(lookup(&table, b"x", b"/apple"), Some("root"));
    assert_eq!(lookup(&table, b"x", b"/app/admin"), Some("app"));
    assert_eq!(lookup(&table, b"x", b"/app/admin/users"), Some("admin"));
    assert_eq!(lookup(&table, b"API.example.", b"/anything"), Some("api"));
    assert_eq!(lookup(&table, b"api.example:8080", b"/v2/x"), Some("v2"));
    assert_eq!(lookup(&table, b"api.example", b"/v20"), Some("api"));
}

#[test]
fn route_prefixes_are_validated() {
    assert!(route_keys(1, b"noslash").is_err());
    assert!(route_keys(1, b"/a%20").is_err());
    assert!(route_keys(1, b"/a/../b").is_err());
    assert!(route_keys(1, "/".repeat(2).as_bytes()).is_err());
    assert!(route_keys(1, format!("/{}", "a".repeat(PATH_KEY_MAX)).as_bytes()).is_err());
}

// ---- property test against httparse ----

fn token() -> impl Strategy<Value = String> {
    prop::string::string_regex("[A-Za-z0-9!#$&'*+.^_`|~-]{1,12}").unwrap()
}

fn header_value() -> impl Strategy<Value = String> {
    prop::string::string_regex("[ \\t]{0,2}[!-~]([ !-~]{0,20}[!-~])?[ \\t]{0,2}").unwrap()
}

fn path() -> impl Strategy<Value = String> {
    prop::string::string_regex("/[A-Za-z0-9._~!$&'()*+,;=:@/%-]{0,40}(\\?[A-Za-z0-9=&%/?]{0,10})?").unwrap()
}

fn head() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        (token(), header_value()).prop_map(|(n, v)| format!("{n}:{v}")),
        header_value().prop_map(|v| format!("Host:{v}")),
        (0u64..100000).prop_map(|n| format!("Content-Length: {n}")),
        Just("Connection: close".to_string()),
        Just("Connection: keep-alive".to_string()),
        Just("Transfer-Encoding: chunked".to_string()),
    ];
    (
        prop_oneof![Just("GET".to_string()), Just("POST".to_string()), token()],
        path(),
        prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0"), Just("HTTP/1.2"), Just("HTTP/2")],
        prop::collection::vec(header, 0..8),
        prop_oneof![Just("\r\n"), Just("\n")],
        any::<u8>(),
        any::<usize>(),
    )
        .prop_map(|(m, p, v, hs, eol, junk, pos)| {
            let mut s = format!("{m} {p} {v}\r\n");
            for h in hs {
                s.push_str(&h);
                s.push_str("\r\n");
            }
            s.push_str(eol);
            let mut b = s.into_bytes();
            // Sometimes corrupt one byte, to exercise the refusals.
            if junk < 64 {
                let i = pos % b.len();
                b[i] = junk;
            }
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// Whatever the scanner accepts, httparse accepts with the same method,
    /// path, version, Host and Content-Length, and the same head length.
    #[test]
    fn scanner_agrees_with_httparse(h in head()) {
        let (r, s) = scan(&h);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = req.parse(&h);
        if r == Step::Done {
            let n = match parsed {
                Ok(httparse::Status::Complete(n)) => n,
                other => panic!("scanner accepted what httparse did not: {other:?} {:?}", String::from_utf8_lossy(&h)),
            };
            prop_assert_eq!(n, s.end as usize);
            let target = req.path.unwrap();
            let p = target.split('?').next().unwrap().as_bytes();
            prop_assert_eq!(&p[..p.len().min(PATH_KEY_MAX)], s.path_key());
            prop_assert_eq!(req.version.unwrap() == 0, s.flags & flag::HTTP10 != 0);
            prop_assert_eq!(req.method.unwrap().len(), h.iter().position(|&b| b == b' ').unwrap());
            let host = req.headers.iter().find(|x| x.name.eq_ignore_ascii_case("host")).map(|x| x.value);
            match host {
                Some(v) => {
                    let t = String::from_utf8_lossy(v);
                    let t = t.trim_matches([' ', '\t']);
                    if t.is_empty() {
                        prop_assert_eq!(s.host_hash, WILDCARD_HOST);
                    } else {
                        prop_assert_eq!(s.host_hash, host_hash(t.as_bytes()));
                    }
                }
                None => prop_assert_eq!(s.host_hash, WILDCARD_HOST),
            }
            let cl = req.headers.iter().find(|x| x.name.eq_ignore_ascii_case("content-length"))
                .map(|x| String::from_utf8_lossy(x.value).trim().parse::<u64>().unwrap()).unwrap_or(0);
            prop_assert_eq!(cl, s.content_length);
        }
        if matches!(parsed, Err(_)) {
            prop_assert!(r != Step::Done);
        }
    }
}
