//! The slow path's request framer: what the kernel hands over, parsed in
//! user space with httparse.
//!
//! It applies the same rules as the kernel scanner where both can decide,
//! and also handles what the kernel leaves to it: long heads, chunked
//! bodies (de-chunked and streamed, the head announcing
//! `LENGTH_UNKNOWN`), large bodies (streamed), encoded or unnormalised paths (routed on their normalised
//! form), and malformed input (a precise 4xx, then the connection closes).

use bytes::{Buf, Bytes, BytesMut};

use super::rules;
use dispatcher_ebpf::abi::LENGTH_UNKNOWN;

/// Longest head the slow path accepts; longer gets 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers a request may have; more gets 431.
pub const MAX_HEADERS: usize = dispatcher_ebpf::scan::MAX_HEADERS as usize;
/// Longest chunk-size line (size and extensions), which nginx does not
/// bound at all; longer gets 400.
const MAX_CHUNK_LINE: usize = 4096;
/// Longest request target; longer gets 414.
pub const MAX_TARGET: usize = 8 * 1024;

/// One thing the framer found in the byte stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A request head. Body bytes (if `content_length > 0`, or it is
    /// `LENGTH_UNKNOWN`: chunked) follow as `Body` events.
    Head(Head),
    /// Body bytes of the last head; `last` ends the request.
    Body { data: Bytes, last: bool },
    /// The trailer section of the last head's chunked body (its field
    /// lines, each ending in CRLF), just before its last `Body`.
    Trailers(Bytes),
    /// The input is not acceptable: answer `status` and close. Nothing
    /// more is parsed.
    Error { status: u16, why: &'static str },
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// The head bytes to forward (rewritten for de-chunked bodies).
    pub bytes: Bytes,
    pub content_length: u64,
    /// Host header value (or the authority of an absolute-form target).
    pub host: Option<Vec<u8>>,
    /// The path the request routes on: decoded and normalised.
    pub route_path: Vec<u8>,
    pub close: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// An upgrade request (HTTP/1.1, `Upgrade`, `Connection: upgrade`, no
    /// body): the parser holds what follows until [`SlowParser::resume`]
    /// (the answer was not a 101) or [`SlowParser::take_rest`] (it was).
    pub upgrade: bool,
    pub method: String,
}

enum State {
    Head,
    /// After an upgrade request: bytes are held, not parsed.
    Upgrade,
    Body {
        left: u64,
    },
    Chunked(Box<Chunked>),
    Done,
}

struct Chunked {
    /// Body bytes so far (against `max_body`).
    total: u64,
    phase: ChunkPhase,
    /// Trailer field lines so far.
    trailers: BytesMut,
}

enum ChunkPhase {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Incremental request framer for one connection.
pub struct SlowParser {
    buf: BytesMut,
    state: State,
    max_body: u64,
}

impl SlowParser {
    pub fn new(max_body: u64) -> Self {
        SlowParser { buf: BytesMut::new(), state: State::Head, max_body }
    }

    /// Whether the parser stopped (after an error).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether part of a request head has arrived (and no more).
    pub fn partial_head(&self) -> bool {
        matches!(self.state, State::Head) && !self.buf.is_empty()
    }

    /// Whether the parser is between requests with nothing buffered.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Head) && self.buf.is_empty()
    }

    /// Feeds received bytes; returns what they completed.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Event> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            let progressed = match &mut self.state {
                State::Done | State::Upgrade => false,
                State::Head => self.head(&mut out),
                State::Body { left } => {
                    if self.buf.is_empty() {
                        false
                    } else {
                        let n = (*left).min(self.buf.len() as u64) as usize;
                        let data = self.buf.split_to(n).freeze();
                        *left -= n as u64;
                        let last = *left == 0;
                        if last {
                            self.state = State::Head;
                        }
                        out.push(Event::Body { data, last });
                        true
                    }
                }
                State::Chunked(_) => self.chunked(&mut out),
            };
            if !progressed || matches!(out.last(), Some(Event::Error { .. })) {
                break;
            }
        }
        out
    }

    /// The upgrade was declined: what the client sent after it is parsed
    /// as HTTP again.
    pub fn resume(&mut self) -> Vec<Event> {
        if matches!(self.state, State::Upgrade) {
            self.state = State::Head;
        }
        self.feed(&[])
    }

    /// The upgrade happened: the bytes held since (the new protocol's);
    /// nothing more is parsed.
    pub fn take_rest(&mut self) -> Bytes {
        self.state = State::Done;
        self.buf.split().freeze()
    }

    /// Bytes held after an upgrade request.
    pub fn held(&self) -> usize {
        match self.state {
            State::Upgrade => self.buf.len(),
            _ => 0,
        }
    }

    fn fail(&mut self, out: &mut Vec<Event>, status: u16, why: &'static str) -> bool {
        self.state = State::Done;
        self.buf.clear();
        out.push(Event::Error { status, why });
        false
    }

    fn head(&mut self, out: &mut Vec<Event>) -> bool {
        if self.buf.is_empty() {
            return false;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if self.buf.len() > MAX_HEAD {
                    // Whatever limit a long target runs into, it is a 414
                    // (nginx's answer), not a 431.
                    if rules::request_line_len(&self.buf).is_none_or(|n| n > MAX_TARGET) {
                        return self.fail(out, 414, "request target too long");
                    }
                    return self.fail(out, 431, "request head too large");
                }
                let target_so_far = self.buf.iter().position(|&b| b == b' ').map_or(0, |sp| self.buf.len() - sp - 1);
                if rules::request_line_len(&self.buf).is_none() && target_so_far > MAX_TARGET {
                    return self.fail(out, 414, "request target too long");
                }
                return false;
            }
            Err(httparse::Error::TooManyHeaders) => return self.fail(out, 431, "too many headers"),
            // RFC 9112 §2.3: HTTP/1.2 and up are handled as 1.1 (httparse
            // refuses them); another major version is not ours to speak.
            // Looked at only once httparse stops at the version, so garbage
            // before it is a 400 however the bytes arrive (a fuzz target
            // found `HTTP/0` after a bad method answered 505 whole and 400
            // byte by byte).
            Err(httparse::Error::Version) => match rules::version(&self.buf) {
                rules::Version::HigherMinor { at } => {
                    self.buf[at] = b'1';
                    return self.head(out);
                }
                rules::Version::Unsupported => return self.fail(out, 505, "HTTP version not supported"),
                rules::Version::Known => return self.fail(out, 400, "malformed request head"),
            },
            Err(_) => return self.fail(out, 400, "malformed request head"),
        };
        let method = req.method.unwrap_or("").to_string();
        let target = req.path.unwrap_or("");
        let version = req.version.unwrap_or(1);
        if target.len() > MAX_TARGET {
            return self.fail(out, 414, "request target too long");
        }
        if n > MAX_HEAD {
            return self.fail(out, 431, "request head too large");
        }
        let mut host: Option<Vec<u8>> = None;
        let mut hosts = 0;
        let mut cl: Option<u64> = None;
        let mut te: Option<Vec<u8>> = None;
        let mut close = version == 0;
        let mut expect_continue = false;
        let (mut upgrade_field, mut upgrade_token) = (false, false);
        for h in req.headers.iter() {
            let v = trim(h.value);
            if h.name.eq_ignore_ascii_case("host") {
                hosts += 1;
                host = Some(v.to_vec());
            } else if h.name.eq_ignore_ascii_case("content-length") {
                let Some(x) = parse_len(v) else { return self.fail(out, 400, "invalid Content-Length") };
                if cl.is_some_and(|c| c != x) {
                    return self.fail(out, 400, "conflicting Content-Length headers");
                }
                cl = Some(x);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                if te.is_some() {
                    return self.fail(out, 501, "several Transfer-Encoding headers");
                }
                te = Some(v.to_ascii_lowercase());
            } else if h.name.eq_ignore_ascii_case("connection") {
                for tok in v.split(|&b| b == b',').map(trim) {
                    if tok.eq_ignore_ascii_case(b"upgrade") {
                        upgrade_token = true;
                    }
                    if tok.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if tok.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                        close = false;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade_field = !v.is_empty();
            } else if h.name.eq_ignore_ascii_case("expect") && version == 1 {
                // RFC 9110 §10.1.1: an HTTP/1.0 request's expectation is
                // ignored (and so never gets a 100, §15.2).
                if v.eq_ignore_ascii_case(b"100-continue") {
                    expect_continue = true;
                } else {
                    return self.fail(out, 417, "unsupported Expect");
                }
            }
        }
        if hosts > 1 {
            return self.fail(out, 400, "several Host headers");
        }
        if version == 1 && hosts == 0 {
            return self.fail(out, 400, "HTTP/1.1 request without Host");
        }
        if host.as_deref().is_some_and(|h| !rules::valid_host(h)) {
            return self.fail(out, 400, "invalid Host header");
        }
        // The target: origin-form routes on its path; absolute-form on its
        // authority and path (RFC 9112 §3.2.2: the Host field is then
        // ignored), and the worker is given the origin form with the
        // authority as Host, as an origin server expects; CONNECT and `*`
        // are not served.
        let mut absolute: Option<(&str, &str)> = None;
        let path_part: &str = if let Some(rest) = strip_http_scheme(target) {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let authority = &rest[..end];
            if !rules::valid_host(authority.as_bytes()) {
                return self.fail(out, 400, "invalid authority in the request target");
            }
            host = Some(authority.as_bytes().to_vec());
            let origin = if rest[end..].starts_with('/') { &rest[end..] } else { "/" };
            absolute = Some((authority, &rest[end..]));
            origin
        } else if target.starts_with('/') {
            target
        } else if method == "CONNECT" {
            return self.fail(out, 405, "CONNECT is not supported");
        } else if target == "*" && method == "OPTIONS" {
            "/"
        } else {
            return self.fail(out, 400, "invalid request target");
        };
        let rewrite = absolute.map(|(authority, rest)| {
            let origin = if rest.starts_with('/') { rest.to_string() } else { format!("/{rest}") };
            (authority.to_string(), origin)
        });
        let path_only = path_part.split(['?', '#']).next().unwrap_or("/");
        let Some(route_path) = normalize_path(path_only.as_bytes()) else {
            return self.fail(out, 400, "invalid percent-encoding in path");
        };
        let mut head_bytes = self.buf.split_to(n).freeze();
        if let Some((authority, origin)) = &rewrite {
            head_bytes = rewrite_origin_form(&head_bytes, authority, origin);
        }
        let mut head = Head {
            bytes: head_bytes,
            content_length: 0,
            host,
            route_path,
            close,
            expect_continue,
            upgrade: false,
            method,
        };
        match te {
            Some(te) => {
                // Only `chunked` (as the last and only coding) is framed.
                if te != b"chunked" {
                    return self.fail(out, 501, "unsupported Transfer-Encoding");
                }
                if cl.is_some() {
                    return self.fail(out, 400, "both Transfer-Encoding and Content-Length");
                }
                // Streamed as it is de-chunked: the worker's body ends with
                // the last record, not at a length.
                head.bytes = rewrite_dechunked(&head.bytes);
                head.content_length = LENGTH_UNKNOWN;
                out.push(Event::Head(head));
                self.state =
                    State::Chunked(Box::new(Chunked { total: 0, phase: ChunkPhase::Size, trailers: BytesMut::new() }));
                true
            }
            None => {
                let cl = cl.unwrap_or(0);
                if cl > self.max_body {
                    return self.fail(out, 413, "request body too large");
                }
                head.content_length = cl;
                // RFC 9110 §7.8: what follows an upgrade request is the
                // new protocol's if the answer is 101; hold it until then.
                // (An upgrade with a body is served as a plain request.)
                head.upgrade = version == 1 && upgrade_field && upgrade_token && cl == 0 && !close;
                let upgrade = head.upgrade;
                out.push(Event::Head(head));
                if cl > 0 {
                    self.state = State::Body { left: cl };
                } else if upgrade {
                    self.state = State::Upgrade;
                    return false;
                }
                true
            }
        }
    }

    fn chunked(&mut self, out: &mut Vec<Event>) -> bool {
        let State::Chunked(c) = &mut self.state else { return false };
        match c.phase {
            ChunkPhase::Size => {
                let eol = match rules::line_end(&self.buf) {
                    Ok(Some(eol)) => eol,
                    Ok(None) if self.buf.len() > MAX_CHUNK_LINE => {
                        return self.fail(out, 400, "chunk size line too long")
                    }
                    Ok(None) => return false,
                    Err(()) => return self.fail(out, 400, "bare CR or LF in a chunk size line"),
                };
                if eol > MAX_CHUNK_LINE {
                    return self.fail(out, 400, "chunk size line too long");
                }
                let Some(size) = rules::chunk_size_line(&self.buf[..eol]) else {
                    return self.fail(out, 400, "invalid chunk size line");
                };
                self.buf.advance(eol + 2);
                if c.total.saturating_add(size) > self.max_body {
                    return self.fail(out, 413, "request body too large");
                }
                c.phase = if size == 0 { ChunkPhase::Trailers } else { ChunkPhase::Data(size) };
                true
            }
            ChunkPhase::Data(left) => {
                if self.buf.is_empty() {
                    return false;
                }
                let n = left.min(self.buf.len() as u64) as usize;
                c.total += n as u64;
                out.push(Event::Body { data: self.buf.split_to(n).freeze(), last: false });
                c.phase = if left == n as u64 { ChunkPhase::DataEnd } else { ChunkPhase::Data(left - n as u64) };
                true
            }
            ChunkPhase::DataEnd => {
                if self.buf.len() < 2 {
                    return false;
                }
                if &self.buf[..2] != b"\r\n" {
                    return self.fail(out, 400, "chunk data not followed by CRLF");
                }
                self.buf.advance(2);
                c.phase = ChunkPhase::Size;
                true
            }
            ChunkPhase::Trailers => {
                let eol = match rules::line_end(&self.buf) {
                    Ok(Some(eol)) => eol,
                    Ok(None) if self.buf.len() > MAX_HEAD => return self.fail(out, 431, "trailers too large"),
                    Ok(None) => return false,
                    Err(()) => return self.fail(out, 400, "bare CR or LF in the trailer section"),
                };
                if eol > 0 {
                    // A trailer field, passed on as a trailer (never merged
                    // into the head, RFC 9110 §6.5.1); the whole section is
                    // bounded like a head.
                    if !rules::trailer_field(&self.buf[..eol]) {
                        return self.fail(out, 400, "malformed trailer field");
                    }
                    if c.trailers.len() + eol + 2 > MAX_HEAD {
                        return self.fail(out, 431, "trailers too large");
                    }
                    c.trailers.extend_from_slice(&self.buf[..eol + 2]);
                    self.buf.advance(eol + 2);
                    return true;
                }
                self.buf.advance(2);
                let trailers = std::mem::take(&mut c.trailers).freeze();
                self.state = State::Head;
                if !trailers.is_empty() {
                    out.push(Event::Trailers(trailers));
                }
                out.push(Event::Body { data: Bytes::new(), last: true });
                true
            }
        }
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v.iter().position(|b| !matches!(b, b' ' | b'\t')).unwrap_or(v.len());
    let e = v.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(s, |e| e + 1);
    &v[s..e.max(s)]
}

fn parse_len(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 15 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `rest` of an absolute-form `http` or `https` target (the scheme is
/// case-insensitive, RFC 3986 §3.1), after its `://`.
fn strip_http_scheme(target: &str) -> Option<&str> {
    let colon = target.find("://")?;
    let scheme = &target[..colon];
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")).then(|| &target[colon + 3..])
}

/// The head of an absolute-form request as the worker gets it: the
/// request line with the origin-form target, and `Host` set to the
/// target's authority (replacing whatever Host the client sent).
fn rewrite_origin_form(head: &[u8], authority: &str, origin: &str) -> Bytes {
    let mut out = Vec::with_capacity(head.len() + authority.len());
    let mut lines = split_lines(head);
    if let Some(first) = lines.next() {
        let sp1 = first.iter().position(|&b| b == b' ').unwrap_or(0);
        let sp2 = first.iter().rposition(|&b| b == b' ').unwrap_or(first.len());
        out.extend_from_slice(&first[..sp1 + 1]);
        out.extend_from_slice(origin.as_bytes());
        out.extend_from_slice(&first[sp2..]);
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(authority.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for line in lines {
        let is_host = line.iter().position(|&b| b == b':').is_some_and(|c| line[..c].eq_ignore_ascii_case(b"host"));
        if !is_host {
            out.extend_from_slice(line);
        }
    }
    Bytes::from(out)
}

/// Removes the Transfer-Encoding header from a head (the body will be
/// forwarded de-chunked).
fn rewrite_dechunked(head: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(head.len());
    for line in split_lines(head) {
        let is_te =
            line.iter().position(|&b| b == b':').is_some_and(|c| line[..c].eq_ignore_ascii_case(b"transfer-encoding"));
        if !is_te {
            out.extend_from_slice(line);
        }
    }
    Bytes::from(out)
}

/// Lines of a head, each with its line end.
fn split_lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = head;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1);
        let (l, r) = rest.split_at(n);
        rest = r;
        Some(l)
    })
}

/// The path a request routes on: percent-decoded, `\` as `/`, repeated
/// slashes collapsed, dot segments resolved (as HTTP.sys canonicalises
/// before routing). `None` for an invalid percent-encoding.
pub fn normalize_path(path: &[u8]) -> Option<Vec<u8>> {
    let mut dec = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            let h = path.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?;
            dec.push(v);
            i += 3;
        } else {
            dec.push(if b == b'\\' { b'/' } else { b });
            i += 1;
        }
    }
    let mut segs: Vec<&[u8]> = Vec::new();
    let trailing = dec.ends_with(b"/") || dec.ends_with(b"/.") || dec.ends_with(b"/..");
    for seg in dec.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = vec![b'/'];
    for (k, s) in segs.iter().enumerate() {
        if k > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(s);
    }
    if trailing && !segs.is_empty() {
        out.push(b'/');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(ev: &[Event]) -> Vec<&Head> {
        ev.iter().filter_map(|e| if let Event::Head(h) = e { Some(h) } else { None }).collect()
    }

    #[test]
    fn pipelined_requests_split_anywhere() {
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: y\r\nContent-Length: 5\r\n\r\nhelloGET /c HTTP/1.1\r\nHost: z\r\n\r\n";
        for split in 0..input.len() {
            let mut p = SlowParser::new(1 << 20);
            let mut ev = p.feed(&input[..split]);
            ev.extend(p.feed(&input[split..]));
            let hs = heads(&ev);
            assert_eq!(hs.len(), 3, "split {split}");
            assert_eq!(hs[1].content_length, 5);
            let body: Vec<u8> = ev
                .iter()
                .filter_map(|e| if let Event::Body { data, .. } = e { Some(data.to_vec()) } else { None })
                .flatten()
                .collect();
            assert_eq!(body, b"hello");
            assert!(p.is_idle());
        }
    }

    #[test]
    fn errors_have_the_right_status() {
        let cases: &[(&[u8], u16)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n", 413),
            (b"\x01\x02garbage\r\n\r\n", 400),
            (b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 405),
            // Host values (RFC 9112 §3.2, RFC 3986).
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a/path\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
            (b"GET / HTTP/1.0\r\nHost: \r\n\r\n", 400),
            (b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            // Versions (RFC 9112 §2.3).
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            (b"GET / HTTP/3\r\nHost: a\r\n\r\n", 505),
        ];
        for (input, status) in cases {
            let mut p = SlowParser::new(1 << 20);
            let ev = p.feed(input);
            assert!(
                matches!(ev.last(), Some(Event::Error { status: s, .. }) if s == status),
                "{:?} -> {ev:?}",
                String::from_utf8_lossy(input)
            );
            assert!(p.is_done());
        }
        let mut p = SlowParser::new(1 << 20);
        let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(matches!(p.feed(&big).last(), Some(Event::Error { status: 431, .. })));
    }

    #[test]
    fn long_targets_get_414_whatever_limit_they_reach() {
        for len in [MAX_TARGET + 1, MAX_HEAD + 10, 100 * 1024] {
            let mut wire = b"GET /".to_vec();
            wire.extend(std::iter::repeat_n(b'a', len));
            let mut p = SlowParser::new(1 << 20);
            // Without its line end (still arriving) and with it.
            let ev = p.feed(&wire);
            assert!(matches!(ev.last(), Some(Event::Error { status: 414, .. })), "{len}: {ev:?}");
            wire.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
            let mut p = SlowParser::new(1 << 20);
            let ev = p.feed(&wire);
            assert!(matches!(ev.last(), Some(Event::Error { status: 414, .. })), "{len}: {ev:?}");
        }
    }

    #[test]
    fn higher_minor_versions_are_served_as_1_1() {
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"GET /x HTTP/1.2\r\nHost: a\r\n\r\n");
        let h = heads(&ev)[0];
        assert!(h.bytes.starts_with(b"GET /x HTTP/1.1\r\n"), "{:?}", h.bytes);
        assert!(!h.close);
    }

    #[test]
    fn expect_from_http_1_0_is_ignored() {
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx");
        assert!(!heads(&ev)[0].expect_continue);
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"POST / HTTP/1.0\r\nExpect: something\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(heads(&ev).len(), 1, "{ev:?}");
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        assert!(heads(&ev)[0].expect_continue);
    }

    #[test]
    fn absolute_form_is_given_to_the_worker_in_origin_form() {
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"GET HTTP://Other.Example:8080/x/../y?q=1 HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n");
        let h = heads(&ev)[0];
        assert_eq!(h.host.as_deref(), Some(&b"Other.Example:8080"[..]));
        assert_eq!(h.route_path, b"/y");
        assert_eq!(
            std::str::from_utf8(&h.bytes).unwrap(),
            "GET /x/../y?q=1 HTTP/1.1\r\nHost: Other.Example:8080\r\nX: 1\r\n\r\n"
        );
        // No path, a query only, and HTTP/1.0 without a Host.
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"GET http://b?x HTTP/1.0\r\n\r\n");
        assert_eq!(std::str::from_utf8(&heads(&ev)[0].bytes).unwrap(), "GET /?x HTTP/1.0\r\nHost: b\r\n\r\n");
    }

    /// The chunked framing cases that desynchronised the connection or
    /// left the client waiting: each is a 400 and nothing after it is
    /// parsed (a pipelined request behind it is never answered).
    #[test]
    fn malformed_chunk_framing_is_a_400_and_the_end() {
        for bad in [
            &b"+3\r\nabc\r\n0\r\n\r\n"[..],
            b"-0\r\n\r\n",
            b"0x3\r\nabc\r\n0\r\n\r\n",
            b" 3\r\nabc\r\n0\r\n\r\n",
            b"3 \r\nabc\r\n0\r\n\r\n",
            b"3;a\nb\r\nabc\r\n0\r\n\r\n",
            b"3;a\rb\r\nabc\r\n0\r\n\r\n",
            b"3\nabc\r\n0\r\n\r\n",
            b"3\r\nabc\n0\r\n\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
            b"0\r\n X: 1\r\n\r\n",
            b"0\n\r\n",
            b"00000000000000003\r\nabc\r\n0\r\n\r\n",
        ] {
            let mut wire = b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            wire.extend_from_slice(bad);
            wire.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n");
            let mut p = SlowParser::new(1 << 20);
            let ev = p.feed(&wire);
            assert_eq!(heads(&ev).len(), 1, "{:?}: {ev:?}", String::from_utf8_lossy(bad));
            assert!(
                matches!(ev.last(), Some(Event::Error { status: 400, .. })),
                "{:?}: {ev:?}",
                String::from_utf8_lossy(bad)
            );
            assert!(p.is_done());
            assert!(p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").is_empty());
        }
        // A bare LF is refused as soon as it arrives, not when a CRLF does.
        let mut p = SlowParser::new(1 << 20);
        p.feed(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(p.feed(b"3;x\n").last(), Some(Event::Error { status: 400, .. })));
        // Extensions that are well formed are accepted and ignored.
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(
            b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 ; a=b ; c=\"x;y\"\r\nabc\r\n0;z\r\n\r\n",
        );
        assert!(matches!(ev.last(), Some(Event::Body { last: true, .. })), "{ev:?}");
    }

    #[test]
    fn chunked_bodies_stream_de_chunked_with_an_unknown_length() {
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhel");
        let h = heads(&ev)[0];
        assert_eq!(h.content_length, LENGTH_UNKNOWN);
        let text = std::str::from_utf8(&h.bytes).unwrap().to_ascii_lowercase();
        assert!(!text.contains("transfer-encoding") && !text.contains("content-length"), "{text}");
        assert!(matches!(&ev[1], Event::Body { data, last: false } if &data[..] == b"hel"));
        let ev = p.feed(b"lo\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\n");
        let body: Vec<u8> = ev
            .iter()
            .flat_map(|e| match e {
                Event::Body { data, .. } => data.to_vec(),
                Event::Trailers(t) => {
                    assert_eq!(&t[..], b"T: 1\r\n");
                    Vec::new()
                }
                _ => panic!("{e:?}"),
            })
            .collect();
        assert_eq!(body, b"lo world");
        assert!(matches!(ev.last(), Some(Event::Body { data, last: true }) if data.is_empty()));
        assert!(p.is_idle());
    }

    #[test]
    fn chunked_trailers_are_passed_on_and_checked() {
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 42\r\nX-B: y\r\n\r\n");
        let n = ev.len();
        assert!(matches!(&ev[n - 2], Event::Trailers(t) if &t[..] == b"X-Sum: 42\r\nX-B: y\r\n"), "{ev:?}");
        assert!(matches!(&ev[n - 1], Event::Body { data, last: true } if data.is_empty()));
        // No trailers: no event.
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert!(!ev.iter().any(|e| matches!(e, Event::Trailers(_))), "{ev:?}");
        // A line that is no field: 400.
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nnot a field\r\n\r\n");
        assert!(matches!(ev.last(), Some(Event::Error { status: 400, .. })), "{ev:?}");
        // Too many: 431.
        let mut p = SlowParser::new(1 << 20);
        let mut wire = b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
        for i in 0..2000 {
            wire.extend_from_slice(format!("X-{i}: {}\r\n", "v".repeat(40)).as_bytes());
        }
        let ev = p.feed(&wire);
        assert!(matches!(ev.last(), Some(Event::Error { status: 431, .. })), "{ev:?}");
    }

    #[test]
    fn a_chunked_body_split_anywhere_streams_the_same_bytes() {
        let mut wire = b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut want = Vec::new();
        for (i, n) in [1usize, 15, 16, 255, 4096].iter().enumerate() {
            let data: Vec<u8> = (0..*n).map(|k| (k + i) as u8).collect();
            wire.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            wire.extend_from_slice(&data);
            wire.extend_from_slice(b"\r\n");
            want.extend_from_slice(&data);
        }
        wire.extend_from_slice(b"0\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n");
        for step in [1usize, 2, 3, 7, 64, 1000] {
            let mut p = SlowParser::new(1 << 20);
            let mut got = Vec::new();
            let mut ended = false;
            let mut heads = 0;
            for piece in wire.chunks(step) {
                for e in p.feed(piece) {
                    match e {
                        Event::Head(_) => heads += 1,
                        Event::Body { data, last } => {
                            assert!(!ended);
                            got.extend_from_slice(&data);
                            ended = last;
                        }
                        Event::Error { status, why } => panic!("step {step}: {status} {why}"),
                        Event::Trailers(_) => panic!("step {step}: no trailers were sent"),
                    }
                }
            }
            assert_eq!((got.len(), ended, heads), (want.len(), true, 2), "step {step}");
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn a_chunked_body_over_max_body_is_refused_when_it_gets_there() {
        let mut p = SlowParser::new(10);
        let ev = p.feed(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n");
        assert_eq!(ev.len(), 2, "{ev:?}");
        let ev = p.feed(b"8\r\n");
        assert!(matches!(ev[..], [Event::Error { status: 413, .. }]), "{ev:?}");
        // A Content-Length body as large as max_body allows streams.
        let mut p = SlowParser::new(4 << 30);
        let ev = p.feed(b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 1073741824\r\n\r\n");
        assert_eq!(heads(&ev)[0].content_length, 1 << 30);
    }

    #[test]
    fn paths_normalise_like_http_sys() {
        let n = |p: &str| String::from_utf8(normalize_path(p.as_bytes()).unwrap()).unwrap();
        assert_eq!(n("/a/../b"), "/b");
        assert_eq!(n("/%61pp/x"), "/app/x");
        assert_eq!(n("//app//x/"), "/app/x/");
        assert_eq!(n("/app/."), "/app/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/a\\b"), "/a/b");
        assert!(normalize_path(b"/%4").is_none());
    }

    #[test]
    fn upgrade_requests_hold_what_follows_until_answered() {
        let req = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let mut p = SlowParser::new(1 << 20);
        let mut wire = req.to_vec();
        wire.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
        let ev = p.feed(&wire);
        assert_eq!(heads(&ev).len(), 1);
        assert!(heads(&ev)[0].upgrade);
        assert!(p.feed(b"more").is_empty(), "held, not parsed");
        assert_eq!(p.held(), 31 + 4);
        // Declined: the next request is parsed.
        let ev = p.resume();
        assert_eq!(heads(&ev).len(), 1);
        assert!(!heads(&ev)[0].upgrade);
        // Accepted: the rest is the new protocol's.
        let mut p = SlowParser::new(1 << 20);
        let mut wire = req.to_vec();
        wire.extend_from_slice(b"\x81\x05hello");
        assert_eq!(heads(&p.feed(&wire)).len(), 1);
        assert_eq!(&p.take_rest()[..], b"\x81\x05hello");
        // Not upgrades: no Connection token, HTTP/1.0, a body.
        for r in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 1\r\n\r\nx",
        ] {
            let mut p = SlowParser::new(1 << 20);
            let ev = p.feed(r);
            assert!(!heads(&ev)[0].upgrade, "{:?}", String::from_utf8_lossy(r));
        }
    }

    #[test]
    fn connection_semantics() {
        let mut p = SlowParser::new(1 << 20);
        let ev = p.feed(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: foo, close\r\n\r\n");
        let hs = heads(&ev);
        assert_eq!(hs.iter().map(|h| h.close).collect::<Vec<_>>(), vec![true, false, true]);
    }

    mod differential {
        use super::*;
        use dispatcher_ebpf::scan::{scan, Step};
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = String> {
            prop::string::string_regex("[ \\t]{0,2}[!-~]([ !-~]{0,12}[!-~])?[ \\t]{0,2}").unwrap()
        }

        fn head() -> impl Strategy<Value = Vec<u8>> {
            let header = prop_oneof![
                (prop::string::string_regex("[A-Za-z0-9-]{1,10}").unwrap(), value())
                    .prop_map(|(n, v)| format!("{n}:{v}")),
                value().prop_map(|v| format!("Host:{v}")),
                prop::string::string_regex("[a-z0-9._~:\\[\\]-]{0,12}").unwrap().prop_map(|v| format!("Host: {v}")),
                (0u64..1000).prop_map(|n| format!("Content-Length: {n}")),
                Just("Content-Length:".to_string()),
                Just("Connection: close".to_string()),
            ];
            (
                prop::string::string_regex("/[A-Za-z0-9._~!$&'()*+,;=:@/%-]{0,20}(\\?[a-z=&]{0,6})?").unwrap(),
                prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0")],
                prop::collection::vec(header, 0..5),
                any::<u8>(),
                any::<usize>(),
            )
                .prop_map(|(p, v, hs, junk, pos)| {
                    let mut s = format!("GET {p} {v}\r\n");
                    for h in hs {
                        s.push_str(&h);
                        s.push_str("\r\n");
                    }
                    s.push_str("\r\n");
                    let mut b = s.into_bytes();
                    if junk < 32 {
                        let i = pos % b.len();
                        b[i] = junk;
                    }
                    b
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

            /// Whatever head the kernel frames, the slow path frames the
            /// same way (one head of the same length, the same host and
            /// Content-Length): a connection handed over mid-stream reads on
            /// exactly where the kernel stopped, and neither accepts what the
            /// other would answer with a 400.
            #[test]
            fn slow_path_agrees_with_the_kernel_scanner(h in head()) {
                let (r, s) = scan(&h);
                if r == Step::Done {
                    let mut p = SlowParser::new(1 << 20);
                    let ev = p.feed(&h);
                    let Some(Event::Head(head)) = ev.first() else {
                        return Err(TestCaseError::fail(format!("kernel framed, slow path: {ev:?} for {:?}", String::from_utf8_lossy(&h))));
                    };
                    prop_assert_eq!(head.bytes.len(), s.end as usize);
                    prop_assert_eq!(head.content_length, s.content_length);
                    let hash = head.host.as_deref().map_or(dispatcher_ebpf::limits::WILDCARD_HOST, dispatcher_ebpf::scan::host_hash);
                    prop_assert_eq!(hash, s.host_hash);
                }
            }
        }
    }
}
