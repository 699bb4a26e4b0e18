//! A response, and its HTTP/1.1 serialisation.

use std::{fs::File, os::unix::fs::FileExt, sync::Arc};

use bytes::Bytes;

/// An HTTP response a handler returns.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// A body read from a file as it is sent, instead of `body` (for files
    /// too large to hold in memory).
    pub file: Option<FileBody>,
    /// The open file `body` was read from and where in it `body` starts:
    /// a leased client's socket gets the body with `sendfile` from there,
    /// not copied from `body` (what goes through the dispatcher still is).
    pub(crate) sendfile: Option<(Arc<File>, u64)>,
    /// Close the connection after this response.
    pub close: bool,
}

/// `len` bytes of a file from `offset` on, read as they go out: a response
/// from a large file holds one part in memory (64 KiB), not the file.
#[derive(Debug, Clone)]
pub struct FileBody {
    pub(crate) file: Arc<File>,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl FileBody {
    pub fn new(file: File, offset: u64, len: u64) -> FileBody {
        FileBody { file: Arc::new(file), offset, len }
    }

    /// Reads into `buf` from `at` (relative to the body's start); fewer
    /// bytes than asked only at the file's end (it shrank).
    pub(crate) fn read(&self, at: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], self.offset + at + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

impl Response {
    pub fn new(status: u16) -> Self {
        Response { status, headers: Vec::new(), body: Bytes::new(), file: None, sendfile: None, close: false }
    }

    /// The body is read from `f` as it is sent.
    pub fn file(mut self, f: FileBody) -> Self {
        self.file = Some(f);
        self
    }

    /// The body's length.
    pub(crate) fn body_len(&self) -> u64 {
        self.file.as_ref().map_or(self.body.len() as u64, |f| f.len)
    }

    /// A `text/plain` response.
    pub fn text(status: u16, s: impl Into<String>) -> Self {
        Response::new(status).header("Content-Type", "text/plain; charset=utf-8").body(s.into())
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, b: impl Into<Bytes>) -> Self {
        self.body = b.into();
        self
    }

    pub fn close(mut self) -> Self {
        self.close = true;
        self
    }

    /// The bytes on the wire. `head_only` for HEAD requests (the length is
    /// still the body's); `close` adds `Connection: close`.
    pub fn serialize(&self, head_only: bool, close: bool) -> Vec<u8> {
        let mut out = self.serialize_head(close);
        if !head_only && !self.bodiless() {
            match &self.file {
                Some(f) => {
                    let at = out.len();
                    out.resize(at + f.len as usize, 0);
                    let n = f.read(0, &mut out[at..]).unwrap_or(0);
                    out.truncate(at + n);
                }
                None => out.extend_from_slice(&self.body),
            }
        }
        out
    }

    /// RFC 9112 §6.3: these never have a body, and a Content-Length on a
    /// 304 would claim the representation's length (RFC 9110 §8.6).
    pub(crate) fn bodiless(&self) -> bool {
        self.status < 200 || self.status == 204 || self.status == 304
    }

    /// The status line and header fields, with the blank line.
    pub(crate) fn serialize_head(&self, close: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + 32 * self.headers.len());
        out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status)).as_bytes());
        if !self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("date")) {
            crate::date::push_date_header(&mut out);
        }
        for (n, v) in &self.headers {
            if n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("connection") {
                continue;
            }
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !self.bodiless() {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body_len()).as_bytes());
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_with_length_and_close() {
        let r = Response::text(404, "nope").header("X-A", "1").header("Content-Length", "99");
        let s = String::from_utf8(r.serialize(false, true)).unwrap();
        // The Date line comes first after the status line (its value is
        // checked in `date`).
        let (head, rest) = s.split_once("\r\nDate: ").expect("a Date header");
        assert_eq!(head, "HTTP/1.1 404 Not Found");
        let rest = &rest[crate::date::HTTP_DATE_LEN..];
        assert_eq!(rest, "\r\nContent-Type: text/plain; charset=utf-8\r\nX-A: 1\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope");
        let s = String::from_utf8(r.serialize(true, false)).unwrap();
        assert!(s.ends_with("Content-Length: 4\r\n\r\n"), "{s}");
    }

    #[test]
    fn a_handlers_own_date_is_kept() {
        let r = Response::text(200, "x").header("Date", "Sun, 06 Nov 1994 08:49:37 GMT");
        let s = String::from_utf8(r.serialize(false, false)).unwrap();
        assert_eq!(s.matches("Date: ").count(), 1, "{s}");
        assert!(s.contains("\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"), "{s}");
    }
}
