//! A static file server for a directory: what the ready worker's `static`
//! mode runs, and what a worker program can use for its own files.
//!
//! - `GET` and `HEAD`; a directory serves its `index.html`.
//! - Validators: a strong `ETag` (size and modification time) and
//!   `Last-Modified`; `If-None-Match` (weak comparison, `*`), or else
//!   `If-Modified-Since`, answer 304 (RFC 9110 §13.1.2, §13.1.3).
//! - `Range: bytes=` with one range answers 206 with `Content-Range`, an
//!   unsatisfiable one 416 with `Content-Range: bytes */<size>`; several
//!   ranges, or an `If-Range` that does not match, get the whole file.
//! - A precompressed sibling (`f.br`, `f.gz`) is sent, with
//!   `Content-Encoding`, to a client that accepts it; every response of a
//!   file that has one says `Vary: Accept-Encoding`.
//! - Paths are percent-decoded; `..`, NUL and backslashes are refused
//!   (400), and so is a path that leaves the root through a symlink (403).
//! - Small files are kept in memory and checked against the file's
//!   metadata on every request (a changed file is served fresh): the old
//!   code read every file through `tokio::fs`, a thread-pool round trip
//!   per request that held the demo page at a third of nginx's rate.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use bytes::Bytes;

use crate::{Request, Response};

/// Files up to this size are kept in memory.
pub const DEFAULT_CACHE_MAX_FILE: u64 = 1 << 20;
/// Bytes of files kept in memory at most (the least recently checked
/// file goes first past it).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// Serves the files under one directory.
pub struct StaticFiles {
    root: PathBuf,
    /// `root`, resolved: a served file's real path must stay under it.
    real_root: PathBuf,
    cache_control: Option<String>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    files: HashMap<PathBuf, Cached>,
    bytes: u64,
    tick: u64,
}

/// A file's bytes and what identifies that version of it.
#[derive(Clone)]
struct Cached {
    stamp: Stamp,
    body: Bytes,
    used: u64,
}

/// What changes when a file changes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    ino: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp { len: m.len(), ino: m.ino(), mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128 }
    }

    /// A strong entity tag of this version (and content coding).
    fn etag(&self, encoding: Option<&str>) -> String {
        match encoding {
            Some(enc) => format!("\"{:x}-{:x}-{enc}\"", self.len, self.mtime_ns),
            None => format!("\"{:x}-{:x}\"", self.len, self.mtime_ns),
        }
    }

    fn modified(&self) -> SystemTime {
        let secs = self.mtime_ns.div_euclid(1_000_000_000);
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    }
}

impl StaticFiles {
    /// Serves `root`; `cache_control`, if given, goes on every file
    /// response (e.g. `public, max-age=3600`).
    pub fn new(root: impl Into<PathBuf>, cache_control: Option<String>) -> std::io::Result<StaticFiles> {
        let root = root.into();
        let real_root = std::fs::canonicalize(&root)?;
        Ok(StaticFiles { root, real_root, cache_control, cache: Mutex::new(Cache::default()) })
    }

    /// Answers `req` from the directory.
    pub fn serve(&self, req: &Request) -> Response {
        if req.method != "GET" && req.method != "HEAD" {
            return Response::text(405, "only GET and HEAD\n").header("Allow", "GET, HEAD");
        }
        let Some(mut p) = map_path(&self.root, req.path()) else {
            return Response::text(400, "bad path\n");
        };
        let mut meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(e) => return io_error(&e),
        };
        if meta.is_dir() {
            p.push("index.html");
            meta = match std::fs::metadata(&p) {
                Ok(m) => m,
                Err(e) => return io_error(&e),
            };
        }
        if !meta.is_file() {
            return Response::text(404, "not found\n");
        }
        if !self.inside(&p) {
            return Response::text(403, "forbidden\n");
        }
        // A precompressed sibling the client accepts, if it is as fresh.
        let (mut send, mut encoding, mut has_sibling) = (p.clone(), None, false);
        for (enc, ext) in [("br", "br"), ("gzip", "gz")] {
            let sib = sibling(&p, ext);
            let Ok(m) = std::fs::metadata(&sib) else { continue };
            if !m.is_file() || m.modified().ok() < meta.modified().ok() || !self.inside(&sib) {
                continue;
            }
            has_sibling = true;
            if encoding.is_none() && accepts(req, enc) {
                (send, encoding) = (sib, Some((enc, m)));
            }
        }
        let stamp = Stamp::of(encoding.as_ref().map_or(&meta, |(_, m)| m));
        // The validators are the representation's: each encoding has its own.
        let etag = stamp.etag(encoding.as_ref().map(|(enc, _)| *enc));
        let modified = stamp.modified();
        let mut head = Response::new(200)
            .header("Content-Type", content_type(&p))
            .header("ETag", etag.clone())
            .header("Last-Modified", httpdate::fmt_http_date(modified))
            .header("Accept-Ranges", "bytes");
        if let Some((enc, _)) = encoding {
            head = head.header("Content-Encoding", enc);
        }
        if has_sibling {
            head = head.header("Vary", "Accept-Encoding");
        }
        if let Some(cc) = &self.cache_control {
            head = head.header("Cache-Control", cc.clone());
        }
        if not_modified(req, &etag, modified) {
            head.status = 304;
            return head;
        }
        let body = match self.read(&send, stamp) {
            Ok(b) => b,
            Err(e) => return io_error(&e),
        };
        match range(req, body.len() as u64, &etag, modified) {
            Ranged::Whole => head.body(body),
            Ranged::Part(a, b) => {
                head.status = 206;
                head.header("Content-Range", format!("bytes {a}-{b}/{}", body.len()))
                    .body(body.slice(a as usize..b as usize + 1))
            }
            Ranged::Unsatisfiable => {
                let len = body.len();
                Response::text(416, "range not satisfiable\n").header("Content-Range", format!("bytes */{len}"))
            }
        }
    }

    /// Whether `p`'s real path (symlinks followed) is under the root.
    fn inside(&self, p: &Path) -> bool {
        std::fs::canonicalize(p).is_ok_and(|r| r.starts_with(&self.real_root))
    }

    /// The bytes of the file at `p`, whose metadata says `stamp`: from
    /// memory when that version is cached.
    fn read(&self, p: &Path, stamp: Stamp) -> std::io::Result<Bytes> {
        let cacheable = stamp.len <= DEFAULT_CACHE_MAX_FILE;
        if cacheable {
            let mut c = self.cache.lock().unwrap();
            c.tick += 1;
            let tick = c.tick;
            if let Some(f) = c.files.get_mut(p).filter(|f| f.stamp == stamp) {
                f.used = tick;
                return Ok(f.body.clone());
            }
        }
        let body = Bytes::from(std::fs::read(p)?);
        // Read as it was when stat'ed: otherwise the next request looks again.
        if cacheable && body.len() as u64 == stamp.len {
            let mut c = self.cache.lock().unwrap();
            if let Some(old) = c.files.remove(p) {
                c.bytes -= old.body.len() as u64;
            }
            while c.bytes + stamp.len > DEFAULT_CACHE_BYTES {
                let Some(victim) = c.files.iter().min_by_key(|(_, f)| f.used).map(|(k, _)| k.clone()) else { break };
                let gone = c.files.remove(&victim).expect("just found");
                c.bytes -= gone.body.len() as u64;
            }
            c.bytes += stamp.len;
            let used = c.tick;
            c.files.insert(p.to_path_buf(), Cached { stamp, body: body.clone(), used });
        }
        Ok(body)
    }
}

fn io_error(e: &std::io::Error) -> Response {
    match e.kind() {
        std::io::ErrorKind::NotFound => Response::text(404, "not found\n"),
        std::io::ErrorKind::PermissionDenied => Response::text(403, "forbidden\n"),
        _ => Response::text(500, "could not read the file\n"),
    }
}

/// `f.html` → `f.html.gz`.
fn sibling(p: &Path, ext: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// The request header `name` as text.
fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.header(name).and_then(|v| std::str::from_utf8(v).ok())
}

/// Whether `Accept-Encoding` accepts `enc` (listed with a q above 0).
fn accepts(req: &Request, enc: &str) -> bool {
    let Some(v) = header(req, "accept-encoding") else { return false };
    v.split(',').any(|item| {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim();
        let q = parts.find_map(|p| p.trim().strip_prefix("q=")).and_then(|q| q.trim().parse::<f32>().ok());
        name.eq_ignore_ascii_case(enc) && q.is_none_or(|q| q > 0.0)
    })
}

/// RFC 9110 §13.1.2 and §13.1.3: `If-None-Match` (weak comparison), or
/// when it is absent, `If-Modified-Since`.
fn not_modified(req: &Request, etag: &str, modified: SystemTime) -> bool {
    if let Some(inm) = header(req, "if-none-match") {
        let tag = etag.trim_start_matches("W/");
        return inm.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == tag);
    }
    header(req, "if-modified-since")
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .is_some_and(|since| modified <= since)
}

/// What a `Range` asks of a body of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Ranged {
    Whole,
    /// First and last byte, inclusive.
    Part(u64, u64),
    Unsatisfiable,
}

/// RFC 9110 §14: one `bytes=` range; several, another unit, a malformed
/// header or a stale `If-Range` mean the whole body.
fn range(req: &Request, len: u64, etag: &str, modified: SystemTime) -> Ranged {
    let Some(spec) = header(req, "range").and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ranged::Whole;
    };
    if let Some(ir) = header(req, "if-range") {
        let fresh = match httpdate::parse_http_date(ir) {
            Ok(t) => t == modified,
            // An entity tag: strong comparison.
            Err(_) => !ir.starts_with("W/") && ir == etag,
        };
        if !fresh {
            return Ranged::Whole;
        }
    }
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return Ranged::Whole };
    let num =
        |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u64>().ok()).flatten();
    match (first.trim(), last.trim()) {
        ("", suffix) => match num(suffix) {
            Some(0) => Ranged::Unsatisfiable,
            Some(n) if len > 0 => Ranged::Part(len.saturating_sub(n), len - 1),
            Some(_) => Ranged::Unsatisfiable,
            None => Ranged::Whole,
        },
        (a, b) => {
            let Some(a) = num(a) else { return Ranged::Whole };
            let b = match b {
                "" => len.saturating_sub(1),
                b => match num(b) {
                    Some(b) if b >= a => b.min(len.saturating_sub(1)),
                    _ => return Ranged::Whole,
                },
            };
            if a >= len {
                Ranged::Unsatisfiable
            } else {
                Ranged::Part(a, b)
            }
        }
    }
}

/// Maps a request path to a file under `root`: percent-decoded; `..`,
/// NUL and backslashes refused.
pub fn map_path(root: &Path, path: &str) -> Option<PathBuf> {
    let bytes = path.as_bytes();
    let mut dec = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            dec.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            dec.push(bytes[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(dec).ok()?;
    if s.contains('\0') || s.contains('\\') {
        return None;
    }
    let mut out = root.to_path_buf();
    for c in Path::new(&s).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The media type of a file, by its extension.
pub fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css",
        "js" | "mjs" => "text/javascript",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request {
        Request {
            conn: 1,
            seq: 0,
            method: "GET".into(),
            target: "/".into(),
            version: 1,
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect(),
            body: Bytes::new(),
            close: false,
            from_kernel: true,
            raw_head: Bytes::new(),
            received: std::time::Instant::now(),
        }
    }

    #[test]
    fn paths_stay_under_the_root() {
        let r = Path::new("/srv");
        assert_eq!(map_path(r, "/a/b.html"), Some(PathBuf::from("/srv/a/b.html")));
        assert_eq!(map_path(r, "/a%20b"), Some(PathBuf::from("/srv/a b")));
        assert_eq!(map_path(r, "/"), Some(PathBuf::from("/srv")));
        assert_eq!(map_path(r, "/../etc/passwd"), None);
        assert_eq!(map_path(r, "/a/%2e%2e/%2e%2e/etc"), None);
        assert_eq!(map_path(r, "/a%00"), None);
        assert_eq!(map_path(r, "/%zz"), None);
    }

    #[test]
    fn ranges() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let r = |v: &str| range(&req(&[("Range", v)]), 100, "\"e\"", t);
        assert_eq!(r("bytes=0-9"), Ranged::Part(0, 9));
        assert_eq!(r("bytes=90-"), Ranged::Part(90, 99));
        assert_eq!(r("bytes=-10"), Ranged::Part(90, 99));
        assert_eq!(r("bytes=-1000"), Ranged::Part(0, 99));
        assert_eq!(r("bytes=50-1000"), Ranged::Part(50, 99));
        assert_eq!(r("bytes=100-"), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-6"), Ranged::Whole);
        assert_eq!(r("bytes=9-1"), Ranged::Whole);
        assert_eq!(r("items=0-1"), Ranged::Whole);
        assert_eq!(r("bytes=a-b"), Ranged::Whole);
        let ir = |v: &str| range(&req(&[("Range", "bytes=0-0"), ("If-Range", v)]), 100, "\"e\"", t);
        assert_eq!(ir("\"e\""), Ranged::Part(0, 0));
        assert_eq!(ir("\"old\""), Ranged::Whole);
        assert_eq!(ir("W/\"e\""), Ranged::Whole, "If-Range compares strongly");
        assert_eq!(ir(&httpdate::fmt_http_date(t)), Ranged::Part(0, 0));
        assert_eq!(ir(&httpdate::fmt_http_date(t + Duration::from_secs(1))), Ranged::Whole);
    }

    #[test]
    fn conditionals() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let nm = |h: &[(&str, &str)]| not_modified(&req(h), "\"e\"", t);
        assert!(nm(&[("If-None-Match", "\"e\"")]));
        assert!(nm(&[("If-None-Match", "\"x\", W/\"e\"")]), "weak comparison");
        assert!(nm(&[("If-None-Match", "*")]));
        assert!(!nm(&[("If-None-Match", "\"x\"")]));
        assert!(nm(&[("If-Modified-Since", &httpdate::fmt_http_date(t))]));
        assert!(!nm(&[("If-Modified-Since", &httpdate::fmt_http_date(t - Duration::from_secs(1)))]));
        // If-None-Match wins over If-Modified-Since.
        assert!(!nm(&[("If-None-Match", "\"x\""), ("If-Modified-Since", &httpdate::fmt_http_date(t))]));
        assert!(!nm(&[("If-Modified-Since", "yesterday")]));
    }

    #[test]
    fn accept_encoding() {
        assert!(accepts(&req(&[("Accept-Encoding", "gzip, deflate")]), "gzip"));
        assert!(accepts(&req(&[("Accept-Encoding", "br;q=0.5")]), "br"));
        assert!(!accepts(&req(&[("Accept-Encoding", "gzip;q=0")]), "gzip"));
        assert!(!accepts(&req(&[("Accept-Encoding", "deflate")]), "gzip"));
        assert!(!accepts(&req(&[]), "gzip"));
    }
}
