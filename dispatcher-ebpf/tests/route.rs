//! Host tests of the route keys: the builder the verdict program and the
//! slow path share ([`set_path`], [`request_key`], [`lookup`]), looked up in
//! an in-test LPM table that answers the way the kernel's trie does, and
//! compared with a naive matcher of the routing rules.

use std::collections::HashMap;

use dispatcher_ebpf::{
    abi::{RouteKeyData, PATH_KEY_MAX, ROUTE_KEY_LEN, WILDCARD_HOST},
    route::{lookup, request_key, route_keys, set_host, set_path, RouteKey, HOST_BITS},
    scan::{host_hash, scan, strip_port, Step},
};
use proptest::prelude::*;

/// A route table as the trie holds it: (prefix length, data) → value. A
/// second entry with the same key replaces the first, as in the trie.
type Table<V> = HashMap<(u32, RouteKeyData), V>;

/// Adds route `host` (None for `*`) + `prefix` with its real trie keys.
fn add<V: Copy>(table: &mut Table<V>, host: Option<&str>, prefix: &str, v: V) {
    let h = host.map(|h| host_hash(h.as_bytes())).unwrap_or(WILDCARD_HOST);
    let (keys, n) = route_keys(h, prefix.as_bytes()).unwrap();
    for k in &keys[..n] {
        table.insert((k.prefix_len, k.data), v);
    }
}

/// Whether the first `bits` bits of `a` and `b` agree.
fn same_prefix(a: &[u8], b: &[u8], bits: u32) -> bool {
    let (bytes, rest) = ((bits / 8) as usize, bits % 8);
    a[..bytes] == b[..bytes] && (rest == 0 || (a[bytes] ^ b[bytes]) >> (8 - rest) == 0)
}

/// One LPM lookup: the stored key with the longest prefix length that is
/// a prefix of `key` (over `key.prefix_len` bits).
fn lpm<V: Copy>(table: &Table<V>, key: &RouteKey) -> Option<V> {
    table
        .iter()
        .filter(|((len, data), _)| *len <= key.prefix_len && same_prefix(data, &key.data, *len))
        .max_by_key(|((len, _), _)| *len)
        .map(|(_, v)| *v)
}

/// The host hash the slow path looks `host` up with (`Kernel::route`): an
/// empty host (or none) is `*`.
fn slow_host_hash(host: &[u8]) -> u64 {
    if strip_port(host).is_empty() {
        WILDCARD_HOST
    } else {
        host_hash(host)
    }
}

/// Routes `path` (up to `?`) for `host` as the slow path does
/// (`Kernel::route`): `request_key`, then the shared host-then-`*` lookup.
fn slow_route<V: Copy>(table: &Table<V>, host: &[u8], path: &[u8]) -> Option<V> {
    let h = slow_host_hash(host);
    lookup(&mut request_key(h, path), h, |k| lpm(table, k))
}

/// A key left over from an earlier request: the builder must overwrite
/// everything a lookup reads (the verdict reuses its connection's key).
fn stale_key() -> RouteKey {
    RouteKey { prefix_len: 7, data: [0xa5; ROUTE_KEY_LEN] }
}

/// Routes a request head as the verdict program does: scan it, fill the
/// key in place from the scanner with `set_path`, look up with `lookup`.
/// Also checks that this key is the slow path's key for `host` + `path`.
fn kernel_route<V: Copy>(table: &Table<V>, head: &[u8], host: &[u8], path: &[u8]) -> Option<V> {
    let (r, s) = scan(head);
    assert_eq!(r, Step::Done, "{:?}", String::from_utf8_lossy(head));
    let mut key = stale_key();
    set_path(&mut key, &s.path, s.path_len);
    set_host(&mut key, s.host_hash);
    let slow = request_key(slow_host_hash(host), path);
    assert_eq!((key.prefix_len, key.data), (slow.prefix_len, slow.data), "{:?}", String::from_utf8_lossy(head));
    let mut key = stale_key();
    set_path(&mut key, &s.path, s.path_len);
    lookup(&mut key, s.host_hash, |k| lpm(table, k))
}

#[test]
fn long_paths_are_truncated_in_the_key() {
    let path = format!("/{}", "a".repeat(300));
    let h = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let (r, s) = scan(h.as_bytes());
    assert_eq!(r, Step::Done);
    assert_eq!(s.path_key().len(), PATH_KEY_MAX);
    let k = request_key(s.host_hash, s.path_key());
    assert_eq!(k.prefix_len, HOST_BITS + 8 * PATH_KEY_MAX as u32);
    let mut kernel = stale_key();
    set_path(&mut kernel, &s.path, s.path_len);
    assert_eq!(kernel.prefix_len, k.prefix_len);
    assert_eq!(kernel.data[8..], k.data[8..]);
}

#[test]
fn route_precedence_and_segment_boundaries() {
    let mut table = Table::new();
    add(&mut table, None, "/", "root");
    add(&mut table, None, "/app", "app");
    add(&mut table, None, "/app/admin/", "admin");
    add(&mut table, Some("api.example"), "/", "api");
    add(&mut table, Some("api.example"), "/v2", "v2");
    let lookup = slow_route;
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

// ---- property test against a naive matcher ----

/// A route as configured: host (None for `*`) and path prefix.
type Route = (Option<&'static str>, String);

/// The routing rules written plainly: among the routes of the request's
/// host, else among those of `*`, the longest prefix that matches on a
/// segment boundary (`/app` matches `/app` and `/app/x`, never `/apple`;
/// `/app/` matches what starts with it). The value is the route's index.
fn naive_route(routes: &[Route], host: Option<&str>, path: &str) -> Option<usize> {
    let matches = |p: &str| {
        if p.ends_with('/') {
            path.starts_with(p)
        } else {
            path == p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'))
        }
    };
    let best = |h: Option<&str>| {
        (routes.iter().enumerate())
            .filter(|(_, (rh, p))| *rh == h && matches(p))
            .max_by_key(|(_, (_, p))| p.len())
            .map(|(i, _)| i)
    };
    host.and_then(|h| best(Some(h))).or_else(|| best(None))
}

/// Path segments that are prefixes of one another (`ap`, `app`, `apple`),
/// and one long enough that paths cross the key's `PATH_KEY_MAX` bytes
/// and the longest allowed prefix (`/` + it + `/apple` is 119 bytes).
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("ap".to_string()),
        Just("app".to_string()),
        Just("apple".to_string()),
        Just("b".to_string()),
        Just("L".repeat(112)),
    ]
}

/// `/`, or `/seg/seg...` with or without a trailing `/`.
fn prefix() -> impl Strategy<Value = String> {
    (prop::collection::vec(segment(), 0..4), any::<bool>()).prop_map(|(segs, slash)| {
        let mut p = format!("/{}", segs.join("/"));
        if slash && !segs.is_empty() {
            p.push('/');
        }
        p
    })
}

fn route_host() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![Just(None), Just(Some("a.example")), Just(Some("b.example"))]
}

/// Routes the config would accept, one per (host, prefix). `P` and `P/`
/// under one host are kept apart: both store the key `P/`, and which of
/// them owns it is the dispatcher's route table's rule (the longer route;
/// `dispatcher/src/bpf/routes.rs` and its tests), not something the keys
/// alone decide.
fn routes() -> impl Strategy<Value = Vec<Route>> {
    prop::collection::vec((route_host(), prefix()), 0..12).prop_map(|rs| {
        let mut out: Vec<Route> = Vec::new();
        for (h, p) in rs {
            let twin = p.strip_suffix('/').map_or_else(|| format!("{p}/"), str::to_string);
            let taken = out.iter().any(|(oh, op)| *oh == h && (*op == p || *op == twin));
            if !taken && route_keys(1, p.as_bytes()).is_ok() {
                out.push((h, p));
            }
        }
        out
    })
}

/// A request's Host header: none (HTTP/1.0 without one, so `*` only), a
/// routed host (written as clients may: case, port, trailing dot), or a
/// host no route names.
fn request_host() -> impl Strategy<Value = Option<(&'static str, &'static str)>> {
    // (header value, the host it names)
    prop_oneof![
        Just(None),
        Just(Some(("a.example", "a.example"))),
        Just(Some(("B.Example.:8080", "b.example"))),
        Just(Some(("c.example", "c.example"))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The kernel's lookup (scanner → `set_path` → `lookup` over the LPM
    /// table of `route_keys`) and the slow path's (`request_key` →
    /// `lookup`) route every request where the naive matcher does.
    #[test]
    fn lpm_lookup_agrees_with_naive_matcher(
        routes in routes(),
        host in request_host(),
        path in prefix(),
        query in any::<bool>(),
    ) {
        let mut table = Table::new();
        for (i, (h, p)) in routes.iter().enumerate() {
            add(&mut table, *h, p, i);
        }
        let q = if query { "?x=/y" } else { "" };
        let (head, header) = match host {
            Some((value, _)) => (format!("GET {path}{q} HTTP/1.1\r\nHost: {value}\r\n\r\n"), value.as_bytes()),
            None => (format!("GET {path}{q} HTTP/1.0\r\n\r\n"), &b""[..]),
        };
        let want = naive_route(&routes, host.map(|h| h.1), &path);
        prop_assert_eq!(slow_route(&table, header, path.as_bytes()), want, "{:?} {}", routes, head);
        prop_assert_eq!(kernel_route(&table, head.as_bytes(), header, path.as_bytes()), want, "{:?} {}", routes, head);
    }
}
