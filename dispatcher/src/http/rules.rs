//! RFC 9112/9110/3986 rules the slow path's framer checks byte by byte
//! where httparse is silent or lenient: chunk-size lines, trailer fields,
//! `Host` values, request-line versions. Each is strict on purpose: a
//! byte one parser forgives and another does not is how requests are
//! smuggled past a front proxy.

/// Where the next line of `b` ends: `Ok(Some(i))` with `b[i..i + 2]` the
/// CRLF, `Ok(None)` if no line end has arrived yet, `Err` for a bare CR or
/// a bare LF (RFC 9112 §2.2 lets a recipient take a lone LF as a line end
/// only in the start line and fields, never inside chunked framing, where
/// nginx and the kernel scanner both refuse it).
pub fn line_end(b: &[u8]) -> Result<Option<usize>, ()> {
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\n' => return Err(()),
            b'\r' => {
                return match b.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some(i)),
                    Some(_) => Err(()),
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Longest chunk-size the framer reads (16 hex digits fill a u64).
pub const MAX_CHUNK_SIZE_DIGITS: usize = 16;

/// Parses a chunk-size line without its CRLF (RFC 9112 §7.1):
/// `chunk-size [ chunk-ext ]`, where chunk-size is `1*HEXDIG` (no sign,
/// no `0x`, no blanks) and each extension is
/// `BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ]`.
/// Extensions are checked, then ignored.
pub fn chunk_size_line(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > MAX_CHUNK_SIZE_DIGITS {
        return None;
    }
    let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()?;
    let mut rest = &line[digits..];
    while !rest.is_empty() {
        rest = skip_blanks(rest);
        rest = rest.strip_prefix(b";")?;
        rest = skip_blanks(rest);
        let name = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return None;
        }
        rest = &rest[name..];
        let after = skip_blanks(rest);
        if let Some(v) = after.strip_prefix(b"=") {
            let v = skip_blanks(v);
            let n =
                if v.first() == Some(&b'"') { quoted_len(v)? } else { v.iter().take_while(|&&b| is_tchar(b)).count() };
            if n == 0 {
                return None;
            }
            rest = &v[n..];
        } else if after.len() != rest.len() && !after.is_empty() && after[0] != b';' {
            return None;
        } else {
            rest = after;
        }
    }
    Some(size)
}

/// Length of the quoted-string at the start of `v` (RFC 9110 §5.6.4),
/// quotes included.
fn quoted_len(v: &[u8]) -> Option<usize> {
    let mut i = 1;
    while i < v.len() {
        match v[i] {
            b'"' => return Some(i + 1),
            b'\\' => {
                let c = *v.get(i + 1)?;
                if !(c == b'\t' || c == b' ' || (0x21..=0x7e).contains(&c) || c >= 0x80) {
                    return None;
                }
                i += 2;
            }
            c if c == b'\t' || c == b' ' || c == 0x21 || (0x23..=0x5b).contains(&c) || (0x5d..=0x7e).contains(&c) => {
                i += 1
            }
            c if c >= 0x80 => i += 1,
            _ => return None,
        }
    }
    None
}

fn skip_blanks(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    &b[n..]
}

/// RFC 9110 `tchar`.
pub fn is_tchar(b: u8) -> bool {
    dispatcher_ebpf::scan::is_tchar(b)
}

/// A trailer field line without its CRLF (RFC 9112 §7.1.2, §5): a token,
/// a colon right after it, and a value of visible bytes, blanks and
/// obs-text; no obs-fold (a line starting with a blank), no control bytes.
pub fn trailer_field(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else { return false };
    colon > 0
        && line[..colon].iter().all(|&b| is_tchar(b))
        && line[colon + 1..].iter().all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)
}

/// Whether `v` (blanks already trimmed) is a valid `Host` value
/// (RFC 9112 §3.2, RFC 3986 §3.2.2): `uri-host [ ":" port ]`, one of
/// them, no userinfo, no path, no blanks.
///
/// The host is an IP-literal (`[` IPv6 or IPvFuture `]`) or a reg-name of
/// unreserved bytes and sub-delims. Stricter than RFC 3986 in three ways
/// nginx also is: no percent-encoding, no `,` (a list to some proxies,
/// so two hosts) and no empty labels (`a..b`); an empty host is refused
/// too, as nginx does, though RFC 9112 allows it for URIs without an
/// authority (which `http` URIs never are).
pub fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(close) = v.iter().position(|&b| b == b']') else { return false };
        let inner = &v[1..close];
        let ok = !inner.is_empty()
            && inner.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && inner.contains(&b':');
        let future = inner.first().is_some_and(|b| b.eq_ignore_ascii_case(&b'v'))
            && inner.len() > 3
            && inner[1..].iter().all(|&b| is_unreserved(b) || is_sub_delim(b) || b == b':');
        if !(ok || future) {
            return false;
        }
        match &v[close + 1..] {
            [] => (&v[..close + 1], None),
            [b':', port @ ..] => (&v[..close + 1], Some(port)),
            _ => return false,
        }
    } else {
        match v.iter().position(|&b| b == b':') {
            Some(c) => (&v[..c], Some(&v[c + 1..])),
            None => (v, None),
        }
    };
    if host.is_empty() || port.is_some_and(|p| p.len() > 5 || !p.iter().all(u8::is_ascii_digit)) {
        return false;
    }
    if host[0] == b'[' {
        return true;
    }
    host.iter().all(|&b| (is_unreserved(b) || is_sub_delim(b)) && b != b',')
        && !host.windows(2).any(|w| w == b"..")
        && host[0] != b'.'
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(b, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=')
}

/// What the request line's HTTP-version says (RFC 9112 §2.3), read before
/// httparse (which knows only 1.0 and 1.1).
#[derive(Debug, PartialEq, Eq)]
pub enum Version {
    /// `HTTP/1.0` or `HTTP/1.1`, or the line is not complete yet.
    Known,
    /// `HTTP/1.2`–`HTTP/1.9`, at byte offset `at` of its minor digit: to be
    /// handled as 1.1 ("the highest minor version within that major
    /// version"), which is what the worker is told.
    HigherMinor { at: usize },
    /// A major version other than 1: 505.
    Unsupported,
}

/// Looks at the request line's version token (RFC 9112 §3: `method SP
/// request-target SP HTTP-version CRLF`), complete or still arriving: the
/// answer depends only on its first bytes, so it is the same however the
/// line is cut into reads (a fuzz target found `HTTP/0.1` answered 505
/// whole and 400 byte by byte).
pub fn version(buf: &[u8]) -> Version {
    let line = &buf[..buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len())];
    let mut spaces = line.iter().enumerate().filter(|(_, &b)| b == b' ').map(|(i, _)| i);
    let (Some(_), Some(second)) = (spaces.next(), spaces.next()) else { return Version::Known };
    let tok = &line[second + 1..];
    match tok {
        [b'H', b'T', b'T', b'P', b'/', major, ..] if major.is_ascii_digit() && *major != b'1' => Version::Unsupported,
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor, ..] if (b'2'..=b'9').contains(minor) => {
            Version::HigherMinor { at: second + 8 }
        }
        _ => Version::Known,
    }
}

/// The end of the request line if it has arrived (the index of its LF).
pub fn request_line_len(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines() {
        for (line, want) in [
            (&b"0"[..], Some(0)),
            (b"1a", Some(0x1a)),
            (b"FFFFFFFFFFFFFFFF", Some(u64::MAX)),
            (b"5;name", Some(5)),
            (b"5 ; name = value", Some(5)),
            (b"5;a=b;c;d=\"q;\\\"x\"", Some(5)),
            (b"+3", None),
            (b"-1", None),
            (b"0x5", None),
            (b" 5", None),
            (b"5 ", None),
            (b"", None),
            (b"10000000000000000", None),
            (b"5;", None),
            (b"5;=v", None),
            (b"5;a=", None),
            (b"5;a=\"open", None),
            (b"5;a b", None),
            (b"5x", None),
            (b"5;a=\x01", None),
        ] {
            assert_eq!(chunk_size_line(line), want, "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn line_ends_are_crlf_only() {
        assert_eq!(line_end(b"abc\r\nx"), Ok(Some(3)));
        assert_eq!(line_end(b"abc\r"), Ok(None));
        assert_eq!(line_end(b"abc"), Ok(None));
        assert_eq!(line_end(b"a\nb\r\n"), Err(()));
        assert_eq!(line_end(b"a\rb\r\n"), Err(()));
    }

    #[test]
    fn hosts() {
        for ok in [
            &b"a"[..],
            b"example.com",
            b"example.com.",
            b"a.b:8080",
            b"a:",
            b"127.0.0.1:80",
            b"[::1]",
            b"[::1]:8080",
            b"[2001:db8::7]",
            b"[v1.fe80::a+en1]",
            b"under_score~x",
        ] {
            assert!(valid_host(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b""[..],
            b"a b",
            b"a, b",
            b"a,b",
            b"a/path",
            b"user@a",
            b"a:b",
            b"a:123456",
            b"[::1",
            b"[zz]",
            b"[::1]x",
            b":80",
            b"a..b",
            b".a",
            b"a%20b",
            b"a\tb",
            b"a\x00",
        ] {
            assert!(!valid_host(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn versions() {
        assert_eq!(version(b"GET / HTTP/1.1\r\n"), Version::Known);
        assert_eq!(version(b"GET / HTTP/1.0\n"), Version::Known);
        assert_eq!(version(b"GET / HTTP/1.2"), Version::HigherMinor { at: 13 }, "line still arriving");
        assert_eq!(version(b"GET / HTTP/0"), Version::Unsupported, "line still arriving");
        assert_eq!(version(b"GET / HTTP/"), Version::Known);
        assert_eq!(version(b"GET /HTTP/2"), Version::Known, "in the target");
        assert_eq!(version(b"GET / HTTP/1.2\r\n"), Version::HigherMinor { at: 13 });
        assert_eq!(version(b"GET / HTTP/2.0\r\n"), Version::Unsupported);
        assert_eq!(version(b"GET / HTTP/2\r\n"), Version::Unsupported);
        assert_eq!(version(b"GET / HTTP/3.0\r\n"), Version::Unsupported);
        assert_eq!(version(b"GET / FOO\r\n"), Version::Known, "httparse refuses it: 400");
    }

    #[test]
    fn trailer_fields() {
        assert!(trailer_field(b"X-Sum: 42"));
        assert!(trailer_field(b"X:"));
        assert!(!trailer_field(b"X : 1"));
        assert!(!trailer_field(b" X: 1"));
        assert!(!trailer_field(b"X: a\x01b"));
        assert!(!trailer_field(b"no colon"));
    }
}
