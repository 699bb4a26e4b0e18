//! A conformance suite of the project's own, written from RFC 9112 and
//! RFC 9110 MUSTs (and the SHOULDs parsers differ on): request smuggling
//! (CL.TE, TE.CL, TE.TE obfuscations, duplicate and signed Content-Length,
//! chunk-size and extension abuse, bare CR/LF, obs-fold, whitespace before
//! the colon), Host rules, 1xx and `Expect`, HEAD without a body, `Date`.
//!
//! Each case is raw bytes sent on a fresh connection, followed by a
//! well-formed `GET /follow` (so a server that mis-frames the case answers
//! the wrong number of requests), and one verdict rule judged on what came
//! back. The same cases and rules judge the dispatcher
//! (`tests/tests/conformance.rs`) and nginx (`cargo xtask bench`, section
//! `conformance`), side by side.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

/// How a case is judged.
#[derive(Clone, Copy, Debug)]
pub enum Rule {
    /// One answer with one of these statuses, then the connection ends
    /// (the follower is never answered).
    Reject(&'static [u16]),
    /// Refused as [`Rule::Reject`] with 400, or served: two answers, both
    /// 2xx, the second the follower's.
    RejectOrServe,
    /// One answer (any status), then the connection ends: RFC 9112 §6.1
    /// for a request with both Content-Length and Transfer-Encoding.
    OneAnswerThenClose,
    /// Two 2xx answers, the second the follower's.
    Serve,
    /// Served, and the first status line is the final one (no 1xx).
    NoInterim,
    /// The first answer (to a HEAD) has no body: the follower's answer
    /// parses right after its head.
    HeadWithoutBody,
    /// Served, with a `Date` field.
    HasDate,
}

/// One case.
pub struct Case {
    pub name: &'static str,
    /// Where the rule comes from.
    pub rfc: &'static str,
    pub wire: Vec<u8>,
    pub rule: Rule,
}

/// What the server did with a case.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Statuses of the answers, in order (1xx included).
    pub statuses: Vec<u16>,
    /// `X-Echo-Path` of each final answer, when the backend reports it.
    pub paths: Vec<Option<String>>,
    /// Whether the first final answer had a `Date` field.
    pub date: bool,
    /// The server ended the connection (EOF or reset) before the time-out.
    pub closed: bool,
}

const FOLLOW: &[u8] = b"GET /follow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

fn case(name: &'static str, rfc: &'static str, wire: &[u8], rule: Rule) -> Case {
    Case { name, rfc, wire: wire.to_vec(), rule }
}

/// Every case.
pub fn cases() -> Vec<Case> {
    use Rule::*;
    let chunked = |body: &str| format!("POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
    let smuggle = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    vec![
        // ---- framing: Content-Length and Transfer-Encoding together ----
        case(
            "CL.TE: Content-Length and chunked",
            "9112 6.1, 6.3",
            format!("POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggle}")
                .as_bytes(),
            OneAnswerThenClose,
        ),
        case(
            "TE.CL: chunked and a short Content-Length",
            "9112 6.1, 6.3",
            format!("POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{:x}\r\n{smuggle}\r\n0\r\n\r\n", smuggle.len())
                .as_bytes(),
            OneAnswerThenClose,
        ),
        // ---- TE.TE: obfuscated Transfer-Encoding ----
        case("TE: xchunked", "9112 6.3 (4), 6.1", chunked("0\r\n\r\n").replace("chunked\r\n\r\n", "xchunked\r\n\r\n").as_bytes(), Reject(&[400, 501])),
        case("TE: chunked, identity", "9112 6.3 (4)", chunked("0\r\n\r\n").replace("chunked\r\n\r\n", "chunked, identity\r\n\r\n").as_bytes(), Reject(&[400, 501])),
        case(
            "TE: two fields, chunked then identity",
            "9112 6.3 (4)",
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
            Reject(&[400, 501]),
        ),
        case(
            "TE: whitespace before the colon",
            "9112 5.1",
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            Reject(&[400]),
        ),
        case("TE: vertical tab before chunked", "9110 5.5", chunked("0\r\n\r\n").replace(": chunked", ":\x0bchunked").as_bytes(), Reject(&[400, 501])),
        case(
            "TE: folded onto the previous field (obs-fold)",
            "9112 5.2",
            b"POST /c HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
            RejectOrServe,
        ),
        case("TE: CHUNKED (coding names are case-insensitive)", "9112 7", chunked("3\r\nabc\r\n0\r\n\r\n").replace(": chunked", ": CHUNKED").as_bytes(), Serve),
        // ---- Content-Length ----
        case(
            "CL: two different values",
            "9112 6.3 (5)",
            b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
            Reject(&[400]),
        ),
        case(
            "CL: the same value twice",
            "9110 8.6",
            b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            RejectOrServe,
        ),
        case("CL: a list of one value", "9110 8.6", b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc", RejectOrServe),
        case("CL: signed (+3)", "9110 8.6", b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", Reject(&[400])),
        case("CL: negative", "9110 8.6", b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", Reject(&[400])),
        case("CL: hexadecimal", "9110 8.6", b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc", Reject(&[400])),
        case("CL: a body on a GET is framed", "9112 6.2", b"GET /g HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", Serve),
        // ---- chunked framing ----
        case("chunk size: signed (+3)", "9112 7.1", chunked("+3\r\nabc\r\n0\r\n\r\n").as_bytes(), Reject(&[400])),
        case("chunk size: 0x prefix", "9112 7.1", chunked("0x3\r\nabc\r\n0\r\n\r\n").as_bytes(), Reject(&[400])),
        // Valid grammar, but a size that long is refused by some servers as
        // an overflow guard (RFC 9112 7.1 asks recipients to guard).
        case("chunk size: 17 hex digits", "9112 7.1", chunked("00000000000000003\r\nabc\r\n0\r\n\r\n").as_bytes(), RejectOrServe),
        case("chunk size: bare LF", "9112 7.1, 2.2", chunked("3\nabc\r\n0\r\n\r\n").as_bytes(), Reject(&[400])),
        case("chunk extension: bare LF", "9112 7.1.1", chunked(&format!("3;x\n{smuggle}")).as_bytes(), Reject(&[400])),
        case("chunk extension: well-formed, with BWS", "9112 7.1.1", chunked("3 ; a=b ; c=\"x;y\"\r\nabc\r\n0\r\n\r\n").as_bytes(), Serve),
        case("chunk data: not followed by CRLF", "9112 7.1", chunked("3\r\nabcX\r\n0\r\n\r\n").as_bytes(), Reject(&[400])),
        case("trailer: bare LF", "9112 7.1.2", chunked("0\r\nX: 1\n\r\n").as_bytes(), Reject(&[400])),
        case("trailer: well-formed", "9112 7.1.2", chunked("3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n").as_bytes(), Serve),
        // ---- fields and lines ----
        case("field: bare CR in a value", "9112 2.2", b"GET /f HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", RejectOrServe),
        case("field: NUL in a value", "9110 5.5", b"GET /f HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n", Reject(&[400])),
        case("field: a space in the name", "9110 5.1", b"GET /f HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", Reject(&[400])),
        case("line: an empty line before the request line", "9112 2.2", b"\r\nGET /e HTTP/1.1\r\nHost: x\r\n\r\n", RejectOrServe),
        case("line: LF line ends", "9112 2.2", b"GET /l HTTP/1.1\nHost: x\n\n", RejectOrServe),
        // ---- request line ----
        case("version: HTTP/1.2 is served as 1.1", "9112 2.3", b"GET /v HTTP/1.2\r\nHost: x\r\n\r\n", Serve),
        case("version: HTTP/2.0 in HTTP/1 syntax", "9110 15.6.6", b"GET /v HTTP/2.0\r\nHost: x\r\n\r\n", Reject(&[400, 505])),
        case("target: 100 KiB long", "9112 3", format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100 * 1024)).as_bytes(), Reject(&[414])),
        case("target: absolute-form", "9112 3.2.2", b"GET http://x/a HTTP/1.1\r\nHost: other\r\n\r\n", Serve),
        // ---- Host ----
        case("Host: missing in HTTP/1.1", "9112 3.2", b"GET /h HTTP/1.1\r\n\r\n", Reject(&[400])),
        case("Host: two fields", "9112 3.2", b"GET /h HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", Reject(&[400])),
        case("Host: a space inside", "9112 3.2, 3986 3.2.2", b"GET /h HTTP/1.1\r\nHost: a b\r\n\r\n", Reject(&[400])),
        case("Host: a path", "9112 3.2, 3986 3.2.2", b"GET /h HTTP/1.1\r\nHost: a/b\r\n\r\n", Reject(&[400])),
        case("Host: userinfo", "9112 3.2, 3986 3.2.2", b"GET /h HTTP/1.1\r\nHost: u@a\r\n\r\n", Reject(&[400])),
        // ---- semantics ----
        case(
            "Expect: 100-continue from HTTP/1.0 gets no 1xx",
            "9110 10.1.1, 15.2",
            b"POST /e HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
            NoInterim,
        ),
        case("HEAD: an answer without a body", "9110 9.3.2", b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n", HeadWithoutBody),
        case("Date: sent by an origin with a clock", "9110 6.6.1", b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n", HasDate),
    ]
}

/// Sends `c` (and the follower) to `port` on loopback and reads what comes
/// back until the server closes or `idle` passes without a byte.
pub fn run(port: u16, c: &Case, idle: Duration) -> Outcome {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    s.set_read_timeout(Some(idle)).unwrap();
    let mut wire = c.wire.clone();
    wire.extend_from_slice(FOLLOW);
    // The server may refuse (and reset) before taking it all.
    let _ = s.write_all(&wire);
    let mut buf = Vec::new();
    let mut closed = false;
    let t0 = Instant::now();
    let mut chunk = [0u8; 65536];
    while t0.elapsed() < Duration::from_secs(10) {
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    let head_first = c.wire.starts_with(b"HEAD ");
    let mut out = Outcome { closed, ..Default::default() };
    let mut rest = &buf[..];
    let mut finals = 0;
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = r.parse(rest) else { break };
        let status = r.code.unwrap_or(0);
        let field = |name: &str| {
            r.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_string())
        };
        out.statuses.push(status);
        if status < 200 {
            rest = &rest[n..];
            continue;
        }
        if finals == 0 {
            out.date = field("date").is_some();
        }
        out.paths.push(field("x-echo-path"));
        let no_body = (finals == 0 && head_first) || status == 204 || status == 304;
        finals += 1;
        let mut len =
            if no_body { 0 } else { field("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0) };
        let chunked =
            !no_body && field("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        rest = &rest[n..];
        if chunked {
            // Skip chunks to the end of the body.
            loop {
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else { return out };
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).split(';').next().unwrap().trim(), 16)
                        .unwrap_or(0);
                rest = &rest[(eol + 2).min(rest.len())..];
                if size == 0 {
                    let end = rest.windows(2).position(|w| w == b"\r\n").map_or(rest.len(), |e| e + 2);
                    rest = &rest[end..];
                    break;
                }
                rest = &rest[(size + 2).min(rest.len())..];
            }
            len = 0;
        }
        rest = &rest[len.min(rest.len())..];
    }
    out
}

/// The verdict: `Ok` or what broke the rule.
pub fn judge(c: &Case, o: &Outcome) -> Result<(), String> {
    let finals: Vec<u16> = o.statuses.iter().copied().filter(|s| *s >= 200).collect();
    let ok2 = |s: u16| (200..300).contains(&s);
    let follower_last = || o.paths.last().is_none_or(|p| p.as_deref().is_none_or(|p| p == "/follow"));
    let reject = |allowed: &[u16]| -> Result<(), String> {
        match finals[..] {
            [s] if allowed.contains(&s) && o.closed => Ok(()),
            [s] if allowed.contains(&s) => Err(format!("{s}, but the connection stayed open")),
            _ => Err(format!("answers {:?} (closed: {}); want one of {allowed:?}, then the end", o.statuses, o.closed)),
        }
    };
    let serve = || -> Result<(), String> {
        match finals[..] {
            [a, b] if ok2(a) && ok2(b) && follower_last() => Ok(()),
            _ => Err(format!(
                "answers {:?} {:?} (closed: {}); want two 2xx, the second the follower's",
                o.statuses, o.paths, o.closed
            )),
        }
    };
    match c.rule {
        Rule::Reject(allowed) => reject(allowed),
        Rule::RejectOrServe => reject(&[400]).or_else(|_| serve()),
        Rule::OneAnswerThenClose => match finals[..] {
            [_] if o.closed => Ok(()),
            _ => Err(format!("answers {:?} (closed: {}); want one, then the end", o.statuses, o.closed)),
        },
        Rule::Serve => serve(),
        Rule::NoInterim => match o.statuses.first() {
            Some(s) if *s < 200 => Err(format!("an interim {s} first")),
            Some(s) if ok2(*s) => Ok(()),
            _ => Err(format!("answers {:?}", o.statuses)),
        },
        Rule::HeadWithoutBody => serve(),
        Rule::HasDate => serve().and_then(|_| if o.date { Ok(()) } else { Err("no Date field".into()) }),
    }
}

/// Each case with its verdict, in order.
pub type Verdicts = Vec<(Case, Result<(), String>)>;

/// Runs every case against `port`.
pub fn run_all(port: u16) -> Verdicts {
    cases()
        .into_iter()
        .map(|c| {
            let o = run(port, &c, Duration::from_millis(1500));
            let v = judge(&c, &o);
            (c, v)
        })
        .collect()
}

/// A Markdown table of one or more servers' verdicts, case by case.
pub fn table(columns: &[(&str, &Verdicts)]) -> String {
    let mut s = String::from("| case | RFC |");
    for (name, _) in columns {
        s.push_str(&format!(" {name} |"));
    }
    s.push_str("\n|---|---|");
    for _ in columns {
        s.push_str("---|");
    }
    s.push('\n');
    let n = columns.first().map_or(0, |c| c.1.len());
    for i in 0..n {
        let c = &columns[0].1[i].0;
        s.push_str(&format!("| {} | {} |", c.name, c.rfc));
        for (_, results) in columns {
            match &results[i].1 {
                Ok(()) => s.push_str(" pass |"),
                Err(e) => s.push_str(&format!(" **FAIL**: {} |", e.replace('|', "/"))),
            }
        }
        s.push('\n');
    }
    for (name, results) in columns {
        let pass = results.iter().filter(|r| r.1.is_ok()).count();
        s.push_str(&format!("\n{name}: {pass} of {} pass", results.len()));
    }
    s.push('\n');
    s
}
