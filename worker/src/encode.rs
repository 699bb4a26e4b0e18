//! HTTP/1.1 response heads and body framing for `http::Response`s: how a
//! response's body is delimited (RFC 9112 §6), chunk and trailer
//! encoding, and the header fields this layer owns (`Content-Length`,
//! `Transfer-Encoding`, `Connection`, `Date`).

use bytes::{BufMut, BytesMut};
use http::{header, HeaderMap, StatusCode};

/// How a response body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked` (HTTP/1.1 clients, unknown length).
    Chunked,
    /// No length: the body ends when the connection closes (HTTP/1.0
    /// clients, unknown length).
    Close,
    /// No body and no length (1xx, 204, 304).
    Bodiless,
    /// A HEAD answer whose length is not known: no length field.
    HeadUnknown,
}

/// Whether a response with this status never has a body (RFC 9112 §6.3).
pub(crate) fn bodiless(status: StatusCode) -> bool {
    status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
}

/// Header fields hop-by-hop or framing: written by this layer only.
fn owned(name: &header::HeaderName) -> bool {
    name == header::CONTENT_LENGTH
        || name == header::TRANSFER_ENCODING
        || name == header::CONNECTION
        || name.as_str() == "keep-alive"
}

/// The handler's own `Content-Length`, if it set a valid one.
pub(crate) fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Whether the handler asked to close the connection after the response.
pub(crate) fn wants_close(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))))
}

/// Writes the status line and header fields, ending with the blank line.
pub(crate) fn head(out: &mut BytesMut, status: StatusCode, headers: &HeaderMap, framing: Framing, close: bool) {
    out.reserve(128 + headers.len() * 32);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("Status").as_bytes());
    out.put_slice(b"\r\n");
    if !headers.contains_key(header::DATE) {
        out.put_slice(b"Date: ");
        out.put_slice(&crate::date::http_date());
        out.put_slice(b"\r\n");
    }
    for (n, v) in headers {
        if owned(n) {
            continue;
        }
        out.put_slice(n.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(v.as_bytes());
        out.put_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.put_slice(b"Content-Length: ");
            out.put_slice(n.to_string().as_bytes());
            out.put_slice(b"\r\n");
        }
        Framing::Chunked => out.put_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::Close | Framing::Bodiless | Framing::HeadUnknown => {}
    }
    if close {
        out.put_slice(b"Connection: close\r\n");
    }
    out.put_slice(b"\r\n");
}

/// Appends `data` framed as `framing` says (a chunk for `Chunked`).
pub(crate) fn data(out: &mut BytesMut, framing: Framing, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    if framing == Framing::Chunked {
        out.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.put_slice(data);
        out.put_slice(b"\r\n");
    } else {
        out.put_slice(data);
    }
}

/// Appends the end of a chunked body: the last chunk and the trailer
/// fields (framing fields are not allowed there, RFC 9110 §6.5.1).
pub(crate) fn end_chunked(out: &mut BytesMut, trailers: Option<&HeaderMap>) {
    out.put_slice(b"0\r\n");
    if let Some(t) = trailers {
        put_fields(out, t, |n| owned(n) || n == header::TRAILER || n == header::HOST);
    }
    out.put_slice(b"\r\n");
}

/// Appends the field lines of `h` but those `skip` says.
fn put_fields(out: &mut BytesMut, h: &HeaderMap, skip: impl Fn(&header::HeaderName) -> bool) {
    for (n, v) in h {
        if skip(n) {
            continue;
        }
        out.put_slice(n.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(v.as_bytes());
        out.put_slice(b"\r\n");
    }
}

/// The head of a `101 Switching Protocols`: the service's fields but the
/// framing ones, and `Connection: Upgrade` (its `Upgrade` field says to
/// what).
pub(crate) fn switching(b: &mut BytesMut, h: &HeaderMap) {
    b.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    put_fields(b, h, |n| n == header::CONNECTION || n == header::CONTENT_LENGTH || n == header::TRANSFER_ENCODING);
    b.extend_from_slice(b"Connection: Upgrade\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: &BytesMut) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn heads_carry_one_framing_and_drop_the_handlers_hop_by_hop_fields() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "999".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        h.insert(header::DATE, "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap());
        let mut b = BytesMut::new();
        head(&mut b, StatusCode::OK, &h, Framing::Chunked, false);
        assert_eq!(
            text(&b),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let mut b = BytesMut::new();
        head(&mut b, StatusCode::NOT_MODIFIED, &HeaderMap::new(), Framing::Bodiless, true);
        let s = text(&b);
        assert!(s.starts_with("HTTP/1.1 304 Not Modified\r\nDate: "), "{s}");
        assert!(s.ends_with(" GMT\r\nConnection: close\r\n\r\n"), "{s}");
        assert!(!s.contains("Content-Length"), "{s}");
    }

    #[test]
    fn chunks_and_trailers() {
        let mut b = BytesMut::new();
        data(&mut b, Framing::Chunked, b"hello world, this is 32 bytes..!");
        data(&mut b, Framing::Chunked, b"");
        let mut t = HeaderMap::new();
        t.insert("x-checksum", "abc".parse().unwrap());
        t.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        end_chunked(&mut b, Some(&t));
        assert_eq!(text(&b), "20\r\nhello world, this is 32 bytes..!\r\n0\r\nx-checksum: abc\r\n\r\n");
        let mut b = BytesMut::new();
        data(&mut b, Framing::Length(3), b"abc");
        assert_eq!(text(&b), "abc");
    }

    #[test]
    fn connection_close_is_found_among_tokens() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "keep-alive".parse().unwrap());
        assert!(!wants_close(&h));
        h.append(header::CONNECTION, "Upgrade, Close".parse().unwrap());
        assert!(wants_close(&h));
        h.insert(header::CONTENT_LENGTH, " 12 ".parse().unwrap());
        assert_eq!(declared_length(&h), Some(12));
    }
}
