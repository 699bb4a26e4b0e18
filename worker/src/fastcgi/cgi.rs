//! CGI/1.1 (RFC 3875) over FastCGI: which script a request runs, the
//! parameters it gets, and the head of its answer.
//!
//! Scripts are found the way the usual nginx configuration for PHP finds
//! them (`fastcgi_split_path_info ^(.+\.php)(/.*)$`, `try_files $uri
//! =404`, `index index.php`, optionally `try_files $uri $uri/
//! /index.php?$query_string`): the decoded path, `.`/`..` resolved inside
//! the root, up to its first segment ending in `.php` is the script and
//! the rest is `PATH_INFO`. The script must be a file under the root, so
//! an uploaded `evil.jpg/x.php` never runs `evil.jpg`.

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use bytes::BytesMut;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::record::put_pair;
use crate::ClientAddr;

/// Where a FastCGI pool's scripts are and how a path finds one.
#[derive(Clone, Debug)]
pub struct Site {
    /// The document root (absolute, symlinks resolved).
    root: PathBuf,
    /// Run for a path naming a directory (`index.php`).
    index: String,
    /// Run for a path that names no script and no directory with an
    /// index (`/index.php`, a front controller); `None`: 404.
    front: Option<String>,
    /// Parameters every request gets (`--param NAME=VALUE`), after the
    /// CGI ones, so they can override them.
    extra: Vec<(String, String)>,
    /// Where clients connect (`DISPATCHER_LISTEN`): SERVER_ADDR and
    /// SERVER_PORT, as nginx's `$server_addr` and `$server_port`.
    server: Option<std::net::SocketAddr>,
}

/// The script a request runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    /// `SCRIPT_NAME`: its path under the root, from `/`.
    pub name: Vec<u8>,
    /// `SCRIPT_FILENAME`.
    pub filename: PathBuf,
    /// `PATH_INFO`: what followed the script's segment (may be empty).
    pub path_info: Vec<u8>,
}

/// Why a request runs no script.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 400: a path that leaves the root, or with a NUL or an encoded `/`
    /// in a segment.
    BadPath,
    /// 404.
    NotFound,
}

const SCRIPT_EXT: &[u8] = b".php";

impl Site {
    pub fn new(
        root: &Path,
        index: String,
        front: Option<String>,
        extra: Vec<(String, String)>,
    ) -> std::io::Result<Site> {
        let root = std::fs::canonicalize(root)?;
        if !root.is_dir() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory"));
        }
        let front = front.map(|f| if f.starts_with('/') { f } else { format!("/{f}") });
        let server = std::env::var(dispatcher_ebpf::launch::env::LISTEN).ok().and_then(|a| a.parse().ok());
        Ok(Site { root, index, front, extra, server })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The script for request path `path` (the URI's path, still
    /// percent-encoded).
    pub fn resolve(&self, path: &str) -> Result<Script, Refusal> {
        let segs = segments(path)?;
        let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
        if let Some(i) = segs.iter().position(|s| s.len() > SCRIPT_EXT.len() && s.ends_with(SCRIPT_EXT)) {
            let name = join(&segs[..=i]);
            let mut path_info = match i + 1 < segs.len() {
                true => join(&segs[i + 1..]),
                false => Vec::new(),
            };
            if trailing && i + 1 < segs.len() {
                path_info.push(b'/');
            }
            return self.script(name, path_info).ok_or(Refusal::NotFound);
        }
        let dir = self.file(&join(&segs));
        if dir.is_dir() {
            let mut name = join(&segs);
            if name.last() != Some(&b'/') {
                name.push(b'/');
            }
            name.extend_from_slice(self.index.as_bytes());
            if let Some(s) = self.script(name, Vec::new()) {
                return Ok(s);
            }
        }
        match &self.front {
            Some(f) => self.script(f.as_bytes().to_vec(), Vec::new()).ok_or(Refusal::NotFound),
            None => Err(Refusal::NotFound),
        }
    }

    fn file(&self, name: &[u8]) -> PathBuf {
        self.root.join(OsStr::from_bytes(name.strip_prefix(b"/").unwrap_or(name)))
    }

    fn script(&self, name: Vec<u8>, path_info: Vec<u8>) -> Option<Script> {
        let filename = self.file(&name);
        filename.is_file().then_some(Script { name, filename, path_info })
    }

    /// The `FCGI_PARAMS` stream for `req` running `script`: CGI/1.1's
    /// meta-variables, then the request's fields as `HTTP_*`, then the
    /// pool's own.
    pub fn params(&self, req: &http::request::Parts, script: &Script, content_length: Option<u64>) -> BytesMut {
        let mut b = BytesMut::with_capacity(1024);
        let mut p = |n: &str, v: &[u8]| put_pair(&mut b, n.as_bytes(), v);
        p("GATEWAY_INTERFACE", b"CGI/1.1");
        p("SERVER_SOFTWARE", concat!("dispatcher/", env!("CARGO_PKG_VERSION")).as_bytes());
        let proto = match req.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        p("SERVER_PROTOCOL", proto.as_bytes());
        p("REQUEST_SCHEME", b"http");
        p("REQUEST_METHOD", req.method.as_str().as_bytes());
        let target = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
        p("REQUEST_URI", target.as_bytes());
        p("QUERY_STRING", req.uri.query().unwrap_or("").as_bytes());
        p("DOCUMENT_ROOT", self.root.as_os_str().as_bytes());
        p("SCRIPT_NAME", &script.name);
        p("SCRIPT_FILENAME", script.filename.as_os_str().as_bytes());
        let mut uri = script.name.clone();
        uri.extend_from_slice(&script.path_info);
        p("DOCUMENT_URI", &uri);
        if !script.path_info.is_empty() {
            p("PATH_INFO", &script.path_info);
            p("PATH_TRANSLATED", self.file(&script.path_info).as_os_str().as_bytes());
        }
        if let Some(ct) = req.headers.get(header::CONTENT_TYPE) {
            p("CONTENT_TYPE", ct.as_bytes());
        }
        if let Some(n) = content_length {
            p("CONTENT_LENGTH", n.to_string().as_bytes());
        }
        if let Some(ClientAddr(a)) = req.extensions.get::<ClientAddr>() {
            p("REMOTE_ADDR", a.ip().to_string().as_bytes());
            p("REMOTE_PORT", a.port().to_string().as_bytes());
        }
        let host = req.headers.get(header::HOST).map(|h| h.as_bytes()).unwrap_or(b"");
        let (name, port) = split_host(host);
        p("SERVER_NAME", if name.is_empty() { b"localhost" } else { name });
        match self.server {
            Some(a) => {
                p("SERVER_ADDR", a.ip().to_string().as_bytes());
                p("SERVER_PORT", a.port().to_string().as_bytes());
            }
            None => p("SERVER_PORT", port.unwrap_or(b"80")),
        }
        // php-cgi's cgi.force_redirect refuses to run without it.
        p("REDIRECT_STATUS", b"200");
        for name in req.headers.keys() {
            // Content-Type and -Length have their own variables. A field
            // with `_` would pass for one with `-` (nginx drops them too),
            // and HTTP_PROXY is the httpoxy hole (CVE-2016-5385).
            if name == header::CONTENT_TYPE
                || name == header::CONTENT_LENGTH
                || name.as_str().contains('_')
                || name.as_str() == "proxy"
            {
                continue;
            }
            let sep: &[u8] = if name == header::COOKIE { b"; " } else { b", " };
            let mut value = Vec::new();
            for (i, v) in req.headers.get_all(name).iter().enumerate() {
                if i > 0 {
                    value.extend_from_slice(sep);
                }
                value.extend_from_slice(v.as_bytes());
            }
            let var: String = "HTTP_"
                .chars()
                .chain(name.as_str().chars().map(|c| if c == '-' { '_' } else { c.to_ascii_uppercase() }))
                .collect();
            p(&var, &value);
        }
        for (n, v) in &self.extra {
            p(n, v.as_bytes());
        }
        b
    }
}

/// The decoded, resolved segments of `path`; `..` may not leave the root.
fn segments(path: &str) -> Result<Vec<Vec<u8>>, Refusal> {
    if !path.starts_with('/') {
        return Err(Refusal::NotFound);
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    for raw in path.split('/') {
        let seg: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
        if seg.contains(&0) || seg.contains(&b'/') {
            return Err(Refusal::BadPath);
        }
        match &seg[..] {
            b"" | b"." => {}
            b".." => {
                out.pop().ok_or(Refusal::BadPath)?;
            }
            _ => out.push(seg),
        }
    }
    Ok(out)
}

fn join(segs: &[Vec<u8>]) -> Vec<u8> {
    let mut p = Vec::new();
    for s in segs {
        p.push(b'/');
        p.extend_from_slice(s);
    }
    if p.is_empty() {
        p.push(b'/');
    }
    p
}

/// `example.org:8080` → (`example.org`, `8080`); `[::1]:80` → (`[::1]`, `80`).
fn split_host(host: &[u8]) -> (&[u8], Option<&[u8]>) {
    let colon = match host.iter().rposition(|&c| c == b':') {
        Some(i) if !host[i..].contains(&b']') => i,
        _ => return (host, None),
    };
    (&host[..colon], Some(&host[colon + 1..]).filter(|p| !p.is_empty()))
}

/// The head of a script's answer: its status and header fields.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// What `Content-Length` said, if it did (the field itself is dropped:
    /// the worker frames the answer).
    pub length: Option<u64>,
}

/// The most a script's header section may be.
pub const MAX_HEAD: usize = 64 << 10;

/// Parses the CGI header section at the start of `out` (RFC 3875 §6):
/// `Ok(None)` while incomplete, else the head and where the body starts.
/// `Status: 404 Not Found` sets the status; a `Location` without one is a
/// 302 (as nginx answers a local redirect too).
pub fn parse_head(out: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let (len, parsed) = match httparse::parse_headers(out, &mut fields) {
        Ok(httparse::Status::Complete((len, parsed))) => (len, parsed),
        Ok(httparse::Status::Partial) if out.len() > MAX_HEAD => {
            return Err(format!("its header section is over {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("its header section is malformed ({e})")),
    };
    let mut status = None;
    let mut headers = HeaderMap::new();
    let mut length = None;
    for f in parsed.iter() {
        if f.name.eq_ignore_ascii_case("status") {
            let code = f.value.get(..3).and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.parse::<u16>().ok());
            status = Some(
                code.and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| format!("Status: `{}`", String::from_utf8_lossy(f.value)))?,
            );
            continue;
        }
        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| format!("field name `{}`", f.name))?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| format!("the value of `{}`", f.name))?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(f.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
            length = Some(n.ok_or_else(|| format!("Content-Length: `{}`", String::from_utf8_lossy(f.value)))?);
            continue;
        }
        headers.append(name, value);
    }
    crate::proxy::strip_hop_by_hop(&mut headers);
    let status = status.unwrap_or(match headers.contains_key(header::LOCATION) {
        true => StatusCode::FOUND,
        false => StatusCode::OK,
    });
    Ok(Some((Head { status, headers, length }, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(front: Option<&str>) -> (tempdir::Dir, Site) {
        let d = tempdir::Dir::new();
        std::fs::create_dir_all(d.0.join("blog/posts")).unwrap();
        std::fs::create_dir_all(d.0.join("up/evil.jpg")).unwrap();
        for f in ["index.php", "info.php", "blog/index.php", "a b.php"] {
            std::fs::write(d.0.join(f), "<?php").unwrap();
        }
        std::fs::write(d.0.join("up/evil.jpg/x.txt"), "").unwrap();
        let s = Site::new(&d.0, "index.php".into(), front.map(String::from), vec![]).unwrap();
        (d, s)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let p = std::env::temp_dir().join(format!("cgi-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn names(s: &Site, path: &str) -> Result<(String, String), Refusal> {
        s.resolve(path).map(|x| (String::from_utf8(x.name).unwrap(), String::from_utf8(x.path_info).unwrap()))
    }

    #[test]
    fn scripts_path_info_and_indexes() {
        let (_d, s) = site(None);
        let ok = |a: &str, b: &str| Ok((a.to_string(), b.to_string()));
        assert_eq!(names(&s, "/info.php"), ok("/info.php", ""));
        assert_eq!(names(&s, "/info.php/a/b"), ok("/info.php", "/a/b"));
        assert_eq!(names(&s, "/info.php/a/"), ok("/info.php", "/a/"));
        assert_eq!(names(&s, "/"), ok("/index.php", ""));
        assert_eq!(names(&s, "/blog/"), ok("/blog/index.php", ""));
        assert_eq!(names(&s, "/blog"), ok("/blog/index.php", ""));
        assert_eq!(names(&s, "/a%20b.php"), ok("/a b.php", ""));
        assert_eq!(names(&s, "/blog/../info.php"), ok("/info.php", ""));
        assert_eq!(names(&s, "/nope.php"), Err(Refusal::NotFound));
        assert_eq!(names(&s, "/style.css"), Err(Refusal::NotFound));
        assert_eq!(names(&s, "/blog/posts/"), Err(Refusal::NotFound));
        // A directory named like an image with a script-looking tail.
        assert_eq!(names(&s, "/up/evil.jpg/x.php"), Err(Refusal::NotFound));
        assert_eq!(names(&s, "/../etc/passwd"), Err(Refusal::BadPath));
        assert_eq!(names(&s, "/%2e%2e/x.php"), Err(Refusal::BadPath));
        assert_eq!(names(&s, "/info.php%00.txt"), Err(Refusal::BadPath));
        assert_eq!(names(&s, "/a%2fb.php"), Err(Refusal::BadPath));
    }

    #[test]
    fn a_front_controller_takes_what_names_no_script() {
        let (_d, s) = site(Some("index.php"));
        assert_eq!(names(&s, "/posts/42"), Ok(("/index.php".into(), "".into())));
        assert_eq!(names(&s, "/blog/"), Ok(("/blog/index.php".into(), "".into())));
        // A script that is not there is still a 404.
        assert_eq!(names(&s, "/nope.php"), Err(Refusal::NotFound));
    }

    fn decode(mut b: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let len = |b: &mut &[u8]| -> usize {
            if b[0] < 128 {
                let n = b[0] as usize;
                *b = &b[1..];
                n
            } else {
                let n = u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]) as usize;
                *b = &b[4..];
                n
            }
        };
        while !b.is_empty() {
            let (n, v) = (len(&mut b), len(&mut b));
            out.push((String::from_utf8_lossy(&b[..n]).into(), String::from_utf8_lossy(&b[n..n + v]).into()));
            b = &b[n + v..];
        }
        out
    }

    #[test]
    fn params_carry_cgi_variables_and_fields() {
        let (_d, s) = site(None);
        let req = http::Request::post("/info.php/x?a=1&b=2")
            .header("host", "example.org:8080")
            .header("content-type", "text/plain")
            .header("content-length", "5")
            .header("x-thing", "1")
            .header("x-thing", "2")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x_sneaky", "1")
            .header("proxy", "http://evil")
            .extension(ClientAddr("192.0.2.1:4444".parse().unwrap()))
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let script = s.resolve(parts.uri.path()).unwrap();
        let vars = decode(&s.params(&parts, &script, Some(5)));
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("REQUEST_METHOD"), Some("POST"));
        assert_eq!(get("REQUEST_URI"), Some("/info.php/x?a=1&b=2"));
        assert_eq!(get("QUERY_STRING"), Some("a=1&b=2"));
        assert_eq!(get("SCRIPT_NAME"), Some("/info.php"));
        assert_eq!(get("PATH_INFO"), Some("/x"));
        assert_eq!(get("SCRIPT_FILENAME").map(PathBuf::from), Some(s.root().join("info.php")));
        assert_eq!(get("CONTENT_LENGTH"), Some("5"));
        assert_eq!(get("CONTENT_TYPE"), Some("text/plain"));
        assert_eq!(get("REMOTE_ADDR"), Some("192.0.2.1"));
        assert_eq!(get("REMOTE_PORT"), Some("4444"));
        assert_eq!(get("SERVER_NAME"), Some("example.org"));
        assert_eq!(get("SERVER_PORT"), Some("8080"));
        assert_eq!(get("HTTP_X_THING"), Some("1, 2"));
        assert_eq!(get("HTTP_COOKIE"), Some("a=1; b=2"));
        assert_eq!(get("HTTP_HOST"), Some("example.org:8080"));
        for absent in ["HTTP_X_SNEAKY", "HTTP_PROXY", "HTTP_CONTENT_LENGTH", "HTTP_CONTENT_TYPE"] {
            assert_eq!(get(absent), None, "{absent}");
        }
    }

    #[test]
    fn answer_heads_parse() {
        let (h, n) = parse_head(b"Status: 404 Not Found\r\nContent-Type: text/html\r\n\r\nbody").unwrap().unwrap();
        assert_eq!((h.status, n), (StatusCode::NOT_FOUND, 50));
        assert_eq!(h.headers["content-type"], "text/html");
        let (h, _) = parse_head(b"Location: /there\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.status, StatusCode::FOUND);
        let (h, _) = parse_head(b"Content-Length: 4\r\nConnection: close\r\nX-A: 1\r\n\r\nbody").unwrap().unwrap();
        assert_eq!((h.status, h.length), (StatusCode::OK, Some(4)));
        assert!(h.headers.get("content-length").is_none() && h.headers.get("connection").is_none());
        assert!(parse_head(b"Content-Type: text/html\r\n").unwrap().is_none());
        assert!(parse_head(b"Status: abc\r\n\r\n").unwrap_err().contains("Status"));
        assert!(parse_head(b"Bad Field\r\n\r\n").is_err());
        assert!(parse_head(&vec![b'a'; MAX_HEAD + 1]).is_err());
    }
}
