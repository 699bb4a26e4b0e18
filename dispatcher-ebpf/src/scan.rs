//! Incremental HTTP/1.x request-head scanner.
//!
//! The verdict program feeds it one byte at a time from a `bpf_loop`
//! callback, so the verifier checks [`Scanner::step`] once instead of once per
//! byte, and all state lives in the [`Scanner`] (map memory), never in
//! registers across bytes. Because it is incremental, a head split over
//! segments is scanned exactly once, whatever the split.
//!
//! The scanner is deliberately strict: it accepts only what it can frame
//! and route exactly (origin-form targets, `HTTP/1.0` and `HTTP/1.1`,
//! CRLF line ends, Content-Length bodies). Everything else returns
//! [`Step::Slow`] and the dispatcher's user-space parser (httparse) takes
//! the connection, applying the same routing. Whatever the scanner accepts,
//! httparse accepts with the same method, path, version, Host and
//! Content-Length (checked by a property test).
//!
//! While scanning it also builds the route key: the FNV-1a hash of the
//! lower-cased host (without port and trailing dot) and the path bytes up
//! to `?`.

use crate::limits::{MAX_CONTENT_LENGTH, PATH_KEY_MAX, WILDCARD_HOST};

/// What the caller should do after a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Feed the next byte.
    More,
    /// The byte ended the head (the `\n` of the blank line).
    Done,
    /// The head is not one the kernel frames; the reason is a `slow::*` code.
    Slow(u32),
}

/// Why the scanner refused a head (kept in [`Scanner::slow`], for logs and
/// tests; the kernel counts them all as `reason::UNSUPPORTED`).
pub mod slow {
    pub const BAD_METHOD: u32 = 1;
    pub const NOT_ORIGIN_FORM: u32 = 2;
    pub const BAD_TARGET: u32 = 3;
    /// `%`, `\`, `//` or a dot segment: routing needs the decoded,
    /// normalised path, which user space computes.
    pub const AMBIGUOUS_PATH: u32 = 4;
    pub const BAD_VERSION: u32 = 5;
    pub const BAD_LINE_END: u32 = 6;
    pub const BAD_HEADER_NAME: u32 = 7;
    pub const OBS_FOLD: u32 = 8;
    pub const BAD_HEADER_VALUE: u32 = 9;
    pub const BAD_HOST: u32 = 10;
    pub const DUPLICATE_HOST: u32 = 11;
    pub const MISSING_HOST: u32 = 12;
    pub const BAD_CONTENT_LENGTH: u32 = 13;
    pub const DUPLICATE_CONTENT_LENGTH: u32 = 14;
    pub const TRANSFER_ENCODING: u32 = 15;
    pub const UPGRADE: u32 = 16;
    pub const EXPECT: u32 = 17;
    pub const CONNECTION_OPTIONS: u32 = 18;
    pub const TOO_MANY_HEADERS: u32 = 19;
    pub const METHOD_CONNECT: u32 = 20;
}

/// Headers beyond this count send the request to the slow path (whose
/// limit is the same, so both sides agree on 431).
pub const MAX_HEADERS: u32 = 64;
/// Longest method token the kernel frames.
pub const MAX_METHOD: u32 = 16;
/// Longest Host value the kernel routes.
pub const MAX_HOST: u32 = 255;

const S_METHOD: u32 = 0;
const S_TARGET: u32 = 1;
const S_PATH: u32 = 2;
const S_QUERY: u32 = 3;
const S_VERSION: u32 = 4;
const S_REQ_LF: u32 = 5;
const S_LINE_START: u32 = 6;
const S_NAME: u32 = 7;
const S_VALUE_OWS: u32 = 8;
const S_VALUE: u32 = 9;
const S_HDR_LF: u32 = 10;
const S_END_LF: u32 = 11;
const S_DONE: u32 = 12;

const H_OTHER: u32 = 0;
const H_HOST: u32 = 1;
const H_CONTENT_LENGTH: u32 = 2;
const H_CONNECTION: u32 = 3;

/// Request-head facts the scanner found.
pub mod flag {
    /// HTTP/1.0 (otherwise HTTP/1.1).
    pub const HTTP10: u32 = 1;
    /// A Host header was seen.
    pub const HAS_HOST: u32 = 2;
    /// A Content-Length header was seen.
    pub const HAS_CONTENT_LENGTH: u32 = 4;
    /// `Connection: close`.
    pub const CONN_CLOSE: u32 = 8;
    /// `Connection: keep-alive`.
    pub const CONN_KEEP_ALIVE: u32 = 16;
    /// The path continued past `PATH_KEY_MAX` bytes.
    pub const PATH_TRUNCATED: u32 = 32;
    /// The method was `HEAD` (for the slow path's error responses).
    pub const METHOD_CONNECT_PREFIX: u32 = 64;
}

/// FNV-1a offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// One FNV-1a step over a lower-cased byte.
#[inline(always)]
pub fn host_hash_step(h: u64, b: u8) -> u64 {
    (h ^ lower(b) as u64).wrapping_mul(FNV_PRIME)
}

/// Hash of a host name as routes and requests use it: lower-cased, without
/// port or one trailing dot. Never [`WILDCARD_HOST`].
pub fn host_hash(host: &[u8]) -> u64 {
    let mut name = strip_port(host);
    if let [rest @ .., b'.'] = name {
        name = rest;
    }
    let mut h = FNV_OFFSET;
    for &b in name {
        h = host_hash_step(h, b);
    }
    finish_host_hash(h)
}

/// Maps the one hash value reserved for `*` to another.
#[inline(always)]
pub fn finish_host_hash(h: u64) -> u64 {
    if h == WILDCARD_HOST {
        1
    } else {
        h
    }
}

/// The host part of a Host value (`[::1]:80` → `[::1]`, `a.b:8080` → `a.b`).
pub fn strip_port(host: &[u8]) -> &[u8] {
    let mut in_brackets = false;
    for (i, &b) in host.iter().enumerate() {
        match b {
            b'[' => in_brackets = true,
            b']' => in_brackets = false,
            b':' if !in_brackets => return &host[..i],
            _ => {}
        }
    }
    host
}

#[inline(always)]
fn lower(b: u8) -> u8 {
    if b.is_ascii_uppercase() {
        b | 0x20
    } else {
        b
    }
}

/// RFC 9110 `tchar`.
#[inline(always)]
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
        )
}

/// Bytes a Host value the kernel routes may contain: a reg-name of
/// unreserved bytes (or an IPv4 address) and a port. Anything else
/// (IPv6 literals, sub-delims, percent-encoding) goes to the slow path,
/// which checks the whole RFC 3986 grammar.
#[inline(always)]
fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':')
}

/// Longest port in a Host value (the slow path's limit too).
const MAX_PORT_DIGITS: u32 = 5;

/// Packs up to 8 bytes little-endian, the way the scanner accumulates names.
const fn pack(s: &[u8], from: usize) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < 8 && from + i < s.len() {
        w |= (s[from + i] as u64) << (8 * i);
        i += 1;
    }
    w
}

struct Name {
    len: u32,
    w: [u64; 3],
}

const fn name(s: &[u8]) -> Name {
    Name { len: s.len() as u32, w: [pack(s, 0), pack(s, 8), pack(s, 16)] }
}

const N_HOST: Name = name(b"host");
const N_CONTENT_LENGTH: Name = name(b"content-length");
const N_TRANSFER_ENCODING: Name = name(b"transfer-encoding");
const N_CONNECTION: Name = name(b"connection");
const N_UPGRADE: Name = name(b"upgrade");
const N_EXPECT: Name = name(b"expect");
const V_CLOSE: u64 = pack(b"close", 0);
const V_KEEP_ALIVE: u64 = pack(b"keep-alive", 0);
const V_KEEP_ALIVE_HI: u64 = pack(b"keep-alive", 8);

/// Scanner state, and what it found. Lives in map memory in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scanner {
    state: u32,
    /// Bytes of the current token (method, version, name, value).
    tok_len: u32,
    /// Which header the current line is (`H_*`).
    hdr: u32,
    /// Headers seen.
    headers: u32,
    /// `flag::*` bits.
    pub flags: u32,
    /// The `slow::*` code when `step` returned `Slow`.
    pub slow: u32,
    /// Path bytes seen (may exceed `PATH_KEY_MAX`).
    pub path_len: u32,
    /// Byte before the current one in the path (for `//` and dot segments).
    prev: u32,
    /// Host value bytes up to the last non-blank byte.
    host_trim: u32,
    /// Host parsing: 2 after the port colon, 4 after trailing blanks (and
    /// Content-Length's: 8 after trailing blanks).
    host_state: u32,
    /// Head length, once `Done`.
    pub end: u32,
    /// Length of the Connection value up to its last non-blank byte.
    value_trim: u32,
    /// Lower-cased name bytes (first 24) of the current header.
    name_w: [u64; 3],
    /// Lower-cased Connection value bytes (first 16).
    value_w: [u64; 2],
    /// Content-Length value.
    pub content_length: u64,
    /// Running host hash, and the hash before the last host byte (to drop
    /// a trailing dot).
    host_h: u64,
    host_h_prev: u64,
    /// Final host hash (or `WILDCARD_HOST` when there is no Host).
    pub host_hash: u64,
    /// Route key path bytes: the path up to `?`, first `PATH_KEY_MAX` bytes.
    pub path: [u8; PATH_KEY_MAX],
}

impl Default for Scanner {
    /// [`Scanner::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    /// A scanner at the start of a request head.
    pub const fn new() -> Self {
        Scanner {
            state: S_METHOD,
            tok_len: 0,
            hdr: 0,
            headers: 0,
            flags: 0,
            slow: 0,
            path_len: 0,
            prev: 0,
            host_trim: 0,
            host_state: 0,
            end: 0,
            value_trim: 0,
            name_w: [0; 3],
            value_w: [0; 2],
            content_length: 0,
            host_h: 0,
            host_h_prev: 0,
            host_hash: WILDCARD_HOST,
            path: [0; PATH_KEY_MAX],
        }
    }

    /// Whether the client asked to close the connection after this request.
    pub fn wants_close(&self) -> bool {
        if self.flags & flag::HTTP10 != 0 {
            self.flags & flag::CONN_KEEP_ALIVE == 0
        } else {
            self.flags & flag::CONN_CLOSE != 0
        }
    }

    /// Path bytes that enter the route key.
    pub fn path_key(&self) -> &[u8] {
        let n = if (self.path_len as usize) < PATH_KEY_MAX { self.path_len as usize } else { PATH_KEY_MAX };
        &self.path[..n]
    }

    #[inline(always)]
    fn refuse(&mut self, code: u32) -> Step {
        self.slow = code;
        Step::Slow(code)
    }

    /// Feeds byte `b`, the `i`-th byte of the head (from 0).
    #[inline(always)]
    pub fn step(&mut self, b: u8, i: u32) -> Step {
        match self.state {
            S_METHOD => {
                if is_tchar(b) {
                    if self.tok_len >= MAX_METHOD {
                        return self.refuse(slow::BAD_METHOD);
                    }
                    // Remember whether the method is CONNECT (needs a tunnel).
                    let c = b"CONNECT";
                    let t = self.tok_len as usize;
                    if t < c.len() && (t == 0 || self.flags & flag::METHOD_CONNECT_PREFIX != 0) {
                        if b == c[t] {
                            self.flags |= flag::METHOD_CONNECT_PREFIX;
                        } else {
                            self.flags &= !flag::METHOD_CONNECT_PREFIX;
                        }
                    } else {
                        self.flags &= !flag::METHOD_CONNECT_PREFIX;
                    }
                    self.tok_len += 1;
                    Step::More
                } else if b == b' ' && self.tok_len > 0 {
                    if self.flags & flag::METHOD_CONNECT_PREFIX != 0 && self.tok_len == 7 {
                        return self.refuse(slow::METHOD_CONNECT);
                    }
                    self.flags &= !flag::METHOD_CONNECT_PREFIX;
                    self.state = S_TARGET;
                    Step::More
                } else {
                    self.refuse(slow::BAD_METHOD)
                }
            }
            S_TARGET => {
                if b != b'/' {
                    return self.refuse(slow::NOT_ORIGIN_FORM);
                }
                self.path[0] = b'/';
                self.path_len = 1;
                self.prev = b'/' as u32;
                self.state = S_PATH;
                Step::More
            }
            S_PATH => {
                if b == b' ' {
                    return self.path_done(S_VERSION);
                }
                if b == b'?' {
                    return self.path_done(S_QUERY);
                }
                if !(0x21..=0x7e).contains(&b) {
                    return self.refuse(slow::BAD_TARGET);
                }
                if b == b'%' || b == b'\\' || (self.prev == b'/' as u32 && (b == b'/' || b == b'.')) {
                    return self.refuse(slow::AMBIGUOUS_PATH);
                }
                let p = self.path_len as usize;
                if p < PATH_KEY_MAX {
                    self.path[p] = b;
                } else {
                    self.flags |= flag::PATH_TRUNCATED;
                }
                self.path_len += 1;
                self.prev = b as u32;
                Step::More
            }
            S_QUERY => {
                if b == b' ' {
                    self.state = S_VERSION;
                    self.tok_len = 0;
                    Step::More
                } else if (0x21..=0x7e).contains(&b) {
                    Step::More
                } else {
                    self.refuse(slow::BAD_TARGET)
                }
            }
            S_VERSION => {
                let t = self.tok_len;
                let want: u8 = match t {
                    0 => b'H',
                    1 | 2 => b'T',
                    3 => b'P',
                    4 => b'/',
                    5 => b'1',
                    6 => b'.',
                    7 => {
                        if b == b'0' {
                            self.flags |= flag::HTTP10;
                            b'0'
                        } else {
                            b'1'
                        }
                    }
                    _ => b'\r',
                };
                if b != want {
                    return self.refuse(slow::BAD_VERSION);
                }
                if t == 8 {
                    self.state = S_REQ_LF;
                } else {
                    self.tok_len = t + 1;
                }
                Step::More
            }
            S_REQ_LF | S_HDR_LF => {
                if b != b'\n' {
                    return self.refuse(slow::BAD_LINE_END);
                }
                if self.state == S_HDR_LF {
                    if let Step::Slow(c) = self.header_done() {
                        return Step::Slow(c);
                    }
                }
                self.state = S_LINE_START;
                Step::More
            }
            S_LINE_START => {
                if b == b'\r' {
                    self.state = S_END_LF;
                    Step::More
                } else if b == b' ' || b == b'\t' {
                    self.refuse(slow::OBS_FOLD)
                } else if is_tchar(b) {
                    if self.headers >= MAX_HEADERS {
                        return self.refuse(slow::TOO_MANY_HEADERS);
                    }
                    self.headers += 1;
                    self.name_w = [lower(b) as u64, 0, 0];
                    self.tok_len = 1;
                    self.state = S_NAME;
                    Step::More
                } else {
                    self.refuse(slow::BAD_HEADER_NAME)
                }
            }
            S_NAME => {
                if b == b':' {
                    return self.name_done();
                }
                if !is_tchar(b) {
                    return self.refuse(slow::BAD_HEADER_NAME);
                }
                let t = self.tok_len;
                let v = (lower(b) as u64) << (8 * (t & 7));
                if t < 8 {
                    self.name_w[0] |= v;
                } else if t < 16 {
                    self.name_w[1] |= v;
                } else if t < 24 {
                    self.name_w[2] |= v;
                }
                self.tok_len = t + 1;
                Step::More
            }
            S_VALUE_OWS | S_VALUE => {
                if b == b'\r' {
                    self.state = S_HDR_LF;
                    return Step::More;
                }
                let blank = b == b' ' || b == b'\t';
                if !(blank || b >= 0x21) || b == 0x7f {
                    return self.refuse(slow::BAD_HEADER_VALUE);
                }
                if self.state == S_VALUE_OWS {
                    if blank {
                        return Step::More;
                    }
                    self.state = S_VALUE;
                }
                self.value_byte(b, blank)
            }
            S_END_LF => {
                if b != b'\n' {
                    return self.refuse(slow::BAD_LINE_END);
                }
                if self.flags & (flag::HTTP10 | flag::HAS_HOST) == 0 {
                    return self.refuse(slow::MISSING_HOST);
                }
                self.end = i + 1;
                self.state = S_DONE;
                Step::Done
            }
            _ => Step::Done,
        }
    }

    #[inline(always)]
    fn path_done(&mut self, next: u32) -> Step {
        self.state = next;
        self.tok_len = 0;
        Step::More
    }

    #[inline(always)]
    fn name_is(&self, n: &Name) -> bool {
        self.tok_len == n.len && self.name_w[0] == n.w[0] && self.name_w[1] == n.w[1] && self.name_w[2] == n.w[2]
    }

    #[inline(always)]
    fn name_done(&mut self) -> Step {
        self.hdr = H_OTHER;
        self.state = S_VALUE_OWS;
        let known = if self.name_is(&N_HOST) {
            H_HOST
        } else if self.name_is(&N_CONTENT_LENGTH) {
            H_CONTENT_LENGTH
        } else if self.name_is(&N_CONNECTION) {
            H_CONNECTION
        } else if self.name_is(&N_TRANSFER_ENCODING) {
            return self.refuse(slow::TRANSFER_ENCODING);
        } else if self.name_is(&N_UPGRADE) {
            return self.refuse(slow::UPGRADE);
        } else if self.name_is(&N_EXPECT) {
            return self.refuse(slow::EXPECT);
        } else {
            H_OTHER
        };
        self.tok_len = 0;
        if known == H_HOST {
            if self.flags & flag::HAS_HOST != 0 {
                return self.refuse(slow::DUPLICATE_HOST);
            }
            self.flags |= flag::HAS_HOST;
            self.hdr = H_HOST;
            self.host_h = FNV_OFFSET;
            self.host_h_prev = FNV_OFFSET;
            self.host_trim = 0;
            self.host_state = 0;
            self.value_trim = 0;
        } else if known == H_CONTENT_LENGTH {
            if self.flags & flag::HAS_CONTENT_LENGTH != 0 {
                return self.refuse(slow::DUPLICATE_CONTENT_LENGTH);
            }
            self.flags |= flag::HAS_CONTENT_LENGTH;
            self.hdr = H_CONTENT_LENGTH;
            self.content_length = 0;
            // Not left over from a Connection value: an empty
            // Content-Length must stay empty (and be refused).
            self.value_trim = 0;
        } else if known == H_CONNECTION {
            if self.flags & (flag::CONN_CLOSE | flag::CONN_KEEP_ALIVE) != 0 {
                return self.refuse(slow::CONNECTION_OPTIONS);
            }
            self.hdr = H_CONNECTION;
            self.value_w = [0, 0];
            self.value_trim = 0;
        }
        Step::More
    }

    #[inline(always)]
    fn value_byte(&mut self, b: u8, blank: bool) -> Step {
        let t = self.tok_len;
        self.tok_len = t + 1;
        match self.hdr {
            H_HOST => {
                if blank {
                    self.host_state |= 4;
                    return Step::More;
                }
                if self.host_state & 4 != 0 || !is_host_byte(b) || t >= MAX_HOST {
                    return self.refuse(slow::BAD_HOST);
                }
                let first = self.host_trim == 0;
                self.host_trim = t + 1;
                if self.host_state & 2 != 0 {
                    // The port: digits only, at most five.
                    self.value_trim += 1;
                    if !b.is_ascii_digit() || self.value_trim > MAX_PORT_DIGITS {
                        return self.refuse(slow::BAD_HOST);
                    }
                } else if b == b':' {
                    if first {
                        return self.refuse(slow::BAD_HOST);
                    }
                    self.host_state |= 2;
                } else {
                    // No empty label: not `.a`, not `a..b` (nginx's rule too).
                    if b == b'.' && (first || self.prev == b'.' as u32) {
                        return self.refuse(slow::BAD_HOST);
                    }
                    self.host_h_prev = self.host_h;
                    self.host_h = host_hash_step(self.host_h, b);
                    self.prev = b as u32;
                }
                Step::More
            }
            H_CONTENT_LENGTH => {
                if blank {
                    self.host_state |= 8;
                    return Step::More;
                }
                if self.host_state & 8 != 0 || !b.is_ascii_digit() {
                    return self.refuse(slow::BAD_CONTENT_LENGTH);
                }
                self.content_length = self.content_length * 10 + (b - b'0') as u64;
                if self.content_length > MAX_CONTENT_LENGTH {
                    return self.refuse(slow::BAD_CONTENT_LENGTH);
                }
                self.value_trim = t + 1;
                Step::More
            }
            H_CONNECTION => {
                if !blank {
                    self.value_trim = t + 1;
                }
                let v = (lower(b) as u64) << (8 * (t & 7));
                if t < 8 {
                    self.value_w[0] |= v;
                } else if t < 16 {
                    self.value_w[1] |= v;
                }
                Step::More
            }
            _ => Step::More,
        }
    }

    #[inline(always)]
    fn header_done(&mut self) -> Step {
        match self.hdr {
            H_HOST => {
                // A trailing dot names the same host: hash without it.
                let h = if self.prev == b'.' as u32 { self.host_h_prev } else { self.host_h };
                // An empty Host is a 400 (the slow path says so).
                if self.host_trim == 0 {
                    return self.refuse(slow::BAD_HOST);
                }
                self.host_hash = finish_host_hash(h);
                self.host_state = 0;
                self.value_trim = 0;
            }
            H_CONTENT_LENGTH => {
                if self.value_trim == 0 {
                    return self.refuse(slow::BAD_CONTENT_LENGTH);
                }
                self.host_state = 0;
            }
            H_CONNECTION => {
                let n = self.value_trim;
                if n == 5 && self.value_w[0] & 0xff_ffff_ffff == V_CLOSE && self.value_w[1] == 0 {
                    self.flags |= flag::CONN_CLOSE;
                } else if n == 10 && self.value_w[0] == V_KEEP_ALIVE && self.value_w[1] & 0xffff == V_KEEP_ALIVE_HI {
                    self.flags |= flag::CONN_KEEP_ALIVE;
                } else {
                    return self.refuse(slow::CONNECTION_OPTIONS);
                }
            }
            _ => {}
        }
        self.hdr = H_OTHER;
        self.tok_len = 0;
        Step::More
    }
}

/// Scans a whole head on the host: the same steps the kernel takes.
pub fn scan(head: &[u8]) -> (Step, Scanner) {
    let mut s = Scanner::new();
    for (i, &b) in head.iter().enumerate() {
        match s.step(b, i as u32) {
            Step::More => {}
            r => return (r, s),
        }
    }
    (Step::More, s)
}
