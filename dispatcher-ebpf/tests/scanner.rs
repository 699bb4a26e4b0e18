//! Host tests of the kernel's head scanner: the same code the verdict
//! program runs (route keys: tests/route.rs).

use dispatcher_ebpf::{
    abi::{PATH_KEY_MAX, WILDCARD_HOST},
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
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost:  \r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: a,b\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: .a\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nHost: a:123456\r\n\r\n", slow::BAD_HOST),
        (b"GET / HTTP/1.1\r\nConnection: close\r\nContent-Length:\r\nHost: a\r\n\r\n", slow::BAD_CONTENT_LENGTH),
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
                    prop_assert!(!t.is_empty(), "an empty Host is the slow path's (400)");
                    prop_assert_eq!(s.host_hash, host_hash(t.as_bytes()));
                }
                None => prop_assert_eq!(s.host_hash, WILDCARD_HOST),
            }
            let cl = req.headers.iter().find(|x| x.name.eq_ignore_ascii_case("content-length"))
                .map(|x| String::from_utf8_lossy(x.value).trim().parse::<u64>().unwrap()).unwrap_or(0);
            prop_assert_eq!(cl, s.content_length);
        }
        if parsed.is_err() {
            prop_assert!(r != Step::Done);
        }
    }
}
