//! A request as a handler sees it.

use bytes::Bytes;

use crate::{pull::reassembly::Raw, Error};

/// Most headers a request may have (the dispatcher's limit too).
pub const MAX_HEADERS: usize = 100;

/// An HTTP request pulled from the pool's queue.
#[derive(Debug, Clone)]
pub struct Request {
    /// The connection (socket cookie) and request number on it; the
    /// response is matched to the request by these.
    pub conn: u64,
    pub seq: u32,
    pub method: String,
    /// The request target as received.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    /// The client asked to close the connection after this request.
    pub close: bool,
    /// The kernel framed it (false: the dispatcher's slow path did).
    pub from_kernel: bool,
    /// The head as received (request line and headers).
    pub raw_head: Bytes,
    /// When the worker took it (for the access log's handling time).
    pub received: std::time::Instant,
}

impl Request {
    pub(crate) fn parse(raw: Raw) -> Result<Request, Error> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&raw.head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(Error::BadHead { conn: raw.conn, seq: raw.seq }),
        }
        Ok(Request {
            conn: raw.conn,
            seq: raw.seq,
            method: req.method.unwrap_or_default().to_string(),
            target: req.path.unwrap_or_default().to_string(),
            version: req.version.unwrap_or(1),
            headers: req.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect(),
            body: raw.body,
            close: raw.close,
            from_kernel: raw.from_kernel,
            raw_head: raw.head,
            received: std::time::Instant::now(),
        })
    }

    /// The target up to `?`.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The query string, without `?`.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// First header of this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    pub fn host(&self) -> Option<&str> {
        self.header("host").and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The request line as received.
    pub fn request_line(&self) -> &[u8] {
        let end = self.raw_head.windows(2).position(|w| w == b"\r\n").unwrap_or(self.raw_head.len());
        &self.raw_head[..end]
    }
}
