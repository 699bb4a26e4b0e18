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
//!
//! The cost per request is what makes a static server fast, so the
//! common case is one system call: files are opened beneath a directory
//! fd of the root with `openat2(RESOLVE_BENEATH)` (the kernel refuses a
//! way out, no `realpath` walk), and what was found is cached per request
//! path: the file's identity and metadata, its bytes when it is small,
//! which precompressed siblings it has, and its preformatted validators.
//! A request then costs one `fstatat` of the file (plus one of the
//! sibling it sends): a file changed in any way (size, inode, mtime,
//! ctime) is looked up afresh, so a changed file is served fresh at once.
//! Whether a `.br`/`.gz` sibling appeared or went away is looked at again
//! when the file changes or at most [`SIBLING_RECHECK`] after the last
//! look (like nginx's `open_file_cache_valid`, whose common setting is
//! 60 s); a sibling that is sent is checked on every request like the
//! file.

use std::{
    collections::HashMap,
    ffi::{CStr, CString},
    fs::File,
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;

use crate::{FileBody, Request, Response};

/// Files up to this size are kept in memory.
pub const DEFAULT_CACHE_MAX_FILE: u64 = 1 << 20;

/// Cached files of at least this size keep their file open so that leased
/// sockets are sent them with `sendfile`; smaller ones are copied, which
/// costs less than the extra system call (and keeps at most 256 files of
/// the 64 MiB cache open).
pub const SENDFILE_MIN: u64 = 256 << 10;
/// Bytes of files kept in memory at most (the least recently used
/// entries go first past it).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
/// Request paths remembered at most (entries without bytes, e.g. large
/// files, cost memory too).
pub const DEFAULT_CACHE_ENTRIES: usize = 64 << 10;
/// How long the knowledge of which precompressed siblings a file has is
/// trusted while the file itself does not change.
pub const SIBLING_RECHECK: Duration = Duration::from_secs(1);
/// A file modified this recently when it was read is not kept in memory:
/// a same-size rewrite within the filesystem's timestamp granularity
/// (coarse clock ticks; 2 s on FAT) would leave the metadata as it was and
/// the cached bytes stale for good (git's "racy clean" problem).
const RACY: Duration = Duration::from_secs(2);

/// Serves the files under one directory.
pub struct StaticFiles {
    /// The root directory (`O_PATH`): every file is opened beneath it.
    root: OwnedFd,
    /// The root's real path: the target of an absolute symlink must be
    /// under it.
    real_root: PathBuf,
    cache_control: Option<String>,
    /// [`SIBLING_RECHECK`], shorter in unit tests.
    sibling_recheck: Duration,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// By request path relative to the root (decoded and normalised).
    entries: HashMap<PathBuf, Slot>,
    /// Bytes of file content held by `entries`.
    bytes: u64,
    tick: u64,
}

struct Slot {
    entry: Arc<Entry>,
    used: u64,
}

/// What a request path resolved to.
struct Entry {
    file: Rep,
    content_type: &'static str,
    /// The precompressed siblings that exist, are inside the root and are
    /// at least as new as the file, in order of preference (coding, file).
    siblings: Vec<(&'static str, Rep)>,
    /// When the siblings were looked for.
    probed: Instant,
}

impl Entry {
    fn bytes(&self) -> u64 {
        std::iter::once(&self.file)
            .chain(self.siblings.iter().map(|(_, r)| r))
            .filter_map(|r| r.body.as_ref())
            .map(|b| b.len() as u64)
            .sum()
    }
}

/// One file as found: the file asked for or one of its siblings.
struct Rep {
    /// Its path relative to the root, symlink-free when it had to be
    /// resolved in user space (an absolute symlink).
    rel: CString,
    stamp: Stamp,
    /// Its bytes, unless it is too large (or too fresh) to keep.
    body: Option<Bytes>,
    /// The open file behind `body`, for bodies of at least
    /// [`SENDFILE_MIN`] bytes: leased sockets get them with `sendfile`.
    fd: Option<Arc<File>>,
    etag: String,
    last_modified: String,
}

/// What changes when a file changes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    /// Also changes on `chmod` (a file made unreadable is not served from
    /// memory) and on a write that restored the mtime.
    ctime_ns: i128,
}

impl Stamp {
    fn of(st: &libc::stat) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            len: st.st_size as u64,
            mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
            ctime_ns: st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128,
        }
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

/// Why a lookup has to start over.
enum Fail {
    /// The file changed while it was being read.
    Changed,
    Io(std::io::Error),
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Fail {
        Fail::Io(e)
    }
}

impl StaticFiles {
    /// Serves `root`; `cache_control`, if given, goes on every file
    /// response (e.g. `public, max-age=3600`).
    pub fn new(root: impl Into<PathBuf>, cache_control: Option<String>) -> std::io::Result<StaticFiles> {
        let root = root.into();
        let real_root = std::fs::canonicalize(&root)?;
        let path = CString::new(real_root.as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path; the fd returned is ours.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just opened, owned by nobody else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        // openat2 is Linux 5.6; fail at start, not on every request.
        open_beneath(&root, c".").map_err(|e| std::io::Error::new(e.kind(), format!("openat2 of the root: {e}")))?;
        Ok(StaticFiles {
            root,
            real_root,
            cache_control,
            sibling_recheck: SIBLING_RECHECK,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// Answers `req` from the directory.
    pub fn serve(&self, req: &Request) -> Response {
        if req.method != "GET" && req.method != "HEAD" {
            return Response::text(405, "only GET and HEAD\n").header("Allow", "GET, HEAD");
        }
        let Some(key) = relative(req.path()) else {
            return Response::text(400, "bad path\n");
        };
        // A file rewritten between our look and our read is looked up
        // again; one that never holds still gets a 500.
        for _ in 0..3 {
            let found = match self.lookup(&key, req) {
                Some(f) => Ok(f),
                None => self.resolve(&key).map(|e| {
                    let pick = e.siblings.iter().position(|(enc, _)| accepts(req, enc));
                    (e, pick)
                }),
            };
            let (entry, pick) = match found {
                Ok(f) => f,
                Err(Fail::Changed) => continue,
                Err(Fail::Io(e)) => return io_error(&e),
            };
            match self.answer(req, &entry, pick) {
                Ok(r) => return r,
                Err(Fail::Changed) => self.forget(&key),
                Err(Fail::Io(e)) => return io_error(&e),
            }
        }
        Response::text(500, "the file keeps changing\n")
    }

    /// The response for `entry`, sending sibling `pick` if given.
    fn answer(&self, req: &Request, entry: &Entry, pick: Option<usize>) -> Result<Response, Fail> {
        let (rep, encoding) = match pick {
            Some(i) => (&entry.siblings[i].1, Some(entry.siblings[i].0)),
            None => (&entry.file, None),
        };
        let mut head = Response::new(200)
            .header("Content-Type", entry.content_type)
            .header("ETag", rep.etag.clone())
            .header("Last-Modified", rep.last_modified.clone())
            .header("Accept-Ranges", "bytes");
        if let Some(enc) = encoding {
            head = head.header("Content-Encoding", enc);
        }
        if !entry.siblings.is_empty() {
            head = head.header("Vary", "Accept-Encoding");
        }
        if let Some(cc) = &self.cache_control {
            head = head.header("Cache-Control", cc.clone());
        }
        let modified = rep.stamp.modified();
        if not_modified(req, &rep.etag, modified) {
            head.status = 304;
            return Ok(head);
        }
        let len = rep.stamp.len;
        let ranged = range(req, len, &rep.etag, modified);
        let (a, n) = match ranged {
            Ranged::Whole => (0, len),
            Ranged::Part(a, b) => (a, b - a + 1),
            Ranged::Unsatisfiable => {
                return Ok(
                    Response::text(416, "range not satisfiable\n").header("Content-Range", format!("bytes */{len}"))
                );
            }
        };
        if let Ranged::Part(a, b) = ranged {
            head.status = 206;
            head = head.header("Content-Range", format!("bytes {a}-{b}/{len}"));
        }
        Ok(match &rep.body {
            Some(body) => {
                let mut r = head.body(body.slice(a as usize..(a + n) as usize));
                r.sendfile = rep.fd.clone().map(|f| (f, a));
                r
            }
            // Too large (or too fresh) to keep: read as it is sent.
            None => head.file(FileBody::new(self.open_again(rep)?, a, n)),
        })
    }

    /// The cached entry of `key` if the files it names are unchanged (one
    /// `fstatat` each), with the sibling to send to `req`.
    fn lookup(&self, key: &Path, req: &Request) -> Option<(Arc<Entry>, Option<usize>)> {
        let entry = {
            let mut c = self.cache.lock().unwrap();
            c.tick += 1;
            let tick = c.tick;
            let slot = c.entries.get_mut(key)?;
            slot.used = tick;
            slot.entry.clone()
        };
        if entry.probed.elapsed() >= self.sibling_recheck {
            return None;
        }
        // Following symlinks, anywhere: an unchanged stamp (device and
        // inode included) means the very file found beneath the root
        // before, unchanged, so its cached bytes are still the answer;
        // anything else is resolved beneath the root again.
        if stat_at(&self.root, &entry.file.rel).ok()? != entry.file.stamp {
            return None;
        }
        let pick = entry.siblings.iter().position(|(enc, _)| accepts(req, enc));
        if let Some(i) = pick {
            let sib = &entry.siblings[i].1;
            if stat_at(&self.root, &sib.rel).ok()? != sib.stamp {
                return None;
            }
        }
        Some((entry, pick))
    }

    /// Finds what `key` names beneath the root, reads it, and caches it.
    fn resolve(&self, key: &Path) -> Result<Arc<Entry>, Fail> {
        let old = self.cache.lock().unwrap().entries.get(key).map(|s| s.entry.clone());
        let mut name = key.to_path_buf();
        let (mut fd, mut rel) = self.open(&name)?;
        let mut st = fstat(&fd)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            name.push("index.html");
            (fd, rel) = self.open(&name)?;
            st = fstat(&fd)?;
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(std::io::Error::from(std::io::ErrorKind::NotFound).into());
        }
        let reuse = |rel: &CStr, stamp: Stamp| {
            let old = old.as_deref()?;
            std::iter::once(&old.file)
                .chain(old.siblings.iter().map(|(_, r)| r))
                .find(|r| r.rel.as_c_str() == rel && r.stamp == stamp)
                .and_then(|r| r.body.clone())
        };
        let file = rep(fd, rel, &st, None, &reuse)?;
        let mut siblings = Vec::new();
        for (enc, ext) in [("br", "br"), ("gzip", "gz")] {
            // A sibling that is missing, outside the root, not a regular
            // file or older than the file is no sibling.
            let Ok((fd, rel)) = self.open(&sibling(&name, ext)) else { continue };
            let Ok(st) = fstat(&fd) else { continue };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG || Stamp::of(&st).mtime_ns < file.stamp.mtime_ns {
                continue;
            }
            siblings.push((enc, rep(fd, rel, &st, Some(enc), &reuse)?));
        }
        let entry = Arc::new(Entry { file, content_type: content_type(&name), siblings, probed: Instant::now() });
        self.insert(key, entry.clone());
        Ok(entry)
    }

    /// Opens `name` (relative) beneath the root: the kernel refuses `..`
    /// and symlinks that leave it, and absolute symlinks. The latter are
    /// allowed when their target is inside the root (as before, when every
    /// path went through `realpath`): the target is then opened by its
    /// symlink-free path, beneath the root again. Returns the fd and the
    /// relative path opened.
    fn open(&self, name: &Path) -> std::io::Result<(OwnedFd, CString)> {
        let rel = c_path(name)?;
        match open_beneath(&self.root, &rel) {
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let real = std::fs::canonicalize(self.real_root.join(name))?;
                let inner = real.strip_prefix(&self.real_root).map_err(|_| e)?;
                let rel = c_path(inner)?;
                Ok((open_beneath(&self.root, &rel)?, rel))
            }
            r => Ok((r?, rel)),
        }
    }

    /// A file too large (or too fresh) to keep, opened again, as long as
    /// it is still the version `rep` describes.
    fn open_again(&self, rep: &Rep) -> Result<File, Fail> {
        let fd = open_beneath(&self.root, &rep.rel)?;
        if Stamp::of(&fstat(&fd)?) != rep.stamp {
            return Err(Fail::Changed);
        }
        Ok(File::from(fd))
    }

    fn insert(&self, key: &Path, entry: Arc<Entry>) {
        let mut c = self.cache.lock().unwrap();
        c.tick += 1;
        let used = c.tick;
        c.bytes += entry.bytes();
        if let Some(old) = c.entries.insert(key.to_path_buf(), Slot { entry, used }) {
            c.bytes -= old.entry.bytes();
        }
        if c.bytes > DEFAULT_CACHE_BYTES || c.entries.len() > DEFAULT_CACHE_ENTRIES {
            // Down to 7/8 of both limits at once, least recently used
            // first: one sort per many insertions, not a scan per one.
            let mut by_use: Vec<(u64, PathBuf)> = c.entries.iter().map(|(k, s)| (s.used, k.clone())).collect();
            by_use.sort_unstable();
            for (_, k) in by_use {
                if c.bytes <= DEFAULT_CACHE_BYTES / 8 * 7 && c.entries.len() <= DEFAULT_CACHE_ENTRIES / 8 * 7 {
                    break;
                }
                if let Some(gone) = c.entries.remove(&k) {
                    c.bytes -= gone.entry.bytes();
                }
            }
        }
    }

    fn forget(&self, key: &Path) {
        let mut c = self.cache.lock().unwrap();
        if let Some(gone) = c.entries.remove(key) {
            c.bytes -= gone.entry.bytes();
        }
    }
}

/// A [`Rep`] of the open file `fd` at `rel`: its bytes read now if it is
/// small enough to keep (or taken from `reuse`, the previous entry's bytes
/// of that very version).
fn rep(
    fd: OwnedFd,
    rel: CString,
    st: &libc::stat,
    encoding: Option<&str>,
    reuse: &dyn Fn(&CStr, Stamp) -> Option<Bytes>,
) -> Result<Rep, Fail> {
    let stamp = Stamp::of(st);
    let racy = SystemTime::now().duration_since(stamp.modified()).map_or(true, |age| age < RACY);
    let file = File::from(fd);
    let body = match reuse(&rel, stamp) {
        Some(b) => Some(b),
        None if stamp.len <= DEFAULT_CACHE_MAX_FILE && !racy => Some(read_all(&file, stamp.len)?),
        None => None,
    };
    // The very version `body` holds (just read, or the same stamp).
    let fd = body.as_ref().filter(|b| b.len() as u64 >= SENDFILE_MIN).map(|_| Arc::new(file));
    let last_modified = httpdate::fmt_http_date(stamp.modified());
    Ok(Rep { rel, etag: stamp.etag(encoding), last_modified, stamp, body, fd })
}

/// All of the file `f`, which its metadata said is `len` bytes long.
fn read_all(f: &File, len: u64) -> Result<Bytes, Fail> {
    let mut buf = Vec::with_capacity(len as usize);
    // One byte more than expected: a file that grew is a changed file.
    f.take(len + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(Fail::Changed);
    }
    Ok(Bytes::from(buf))
}

/// `openat2(root, rel, O_RDONLY, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
/// `O_NONBLOCK` so that a FIFO in the tree cannot block the worker (it
/// is then refused as not a regular file).
fn open_beneath(root: &OwnedFd, rel: &CStr) -> std::io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; all-zero is its "nothing set".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid dirfd, a NUL-terminated path, and `how` with its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a stat to fill.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// The stamp of the regular file at `rel` under `root` (symlinks followed).
fn stat_at(root: &OwnedFd, rel: &CStr) -> std::io::Result<Stamp> {
    // SAFETY: stat is plain data, filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid dirfd, a NUL-terminated path and a stat to fill.
    if unsafe { libc::fstatat(root.as_raw_fd(), rel.as_ptr(), &mut st, libc::AT_NO_AUTOMOUNT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    }
    Ok(Stamp::of(&st))
}

/// A relative path as a C string; the root itself is `.`.
fn c_path(p: &Path) -> std::io::Result<CString> {
    let b = p.as_os_str().as_bytes();
    Ok(CString::new(if b.is_empty() { &b"."[..] } else { b })?)
}

fn io_error(e: &std::io::Error) -> Response {
    match e.raw_os_error() {
        // ENAMETOOLONG: a segment longer than the file system's names (255
        // bytes) names nothing that can exist.
        Some(libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG) => Response::text(404, "not found\n"),
        // EXDEV: out of the root; ELOOP: a symlink loop or a magic link.
        Some(libc::EACCES | libc::EPERM | libc::EXDEV | libc::ELOOP) => Response::text(403, "forbidden\n"),
        _ if e.kind() == std::io::ErrorKind::NotFound => Response::text(404, "not found\n"),
        _ if e.kind() == std::io::ErrorKind::PermissionDenied => Response::text(403, "forbidden\n"),
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
    Some(root.join(relative(path)?))
}

/// A request path as a path relative to the root (empty for the root):
/// percent-decoded, `.` and empty segments dropped; `..`, NUL and
/// backslashes refused.
fn relative(path: &str) -> Option<PathBuf> {
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
    let mut out = PathBuf::new();
    for c in Path::new(&s).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    // `/file.css/` names a directory, so it is looked for as that
    // directory's index: a file there is a 404 (ENOTDIR), as nginx answers.
    // (Not as a trailing `/`: `Path` equality ignores it, and the cache
    // would serve `file.css`.)
    if s.ends_with('/') && !out.as_os_str().is_empty() {
        out.push("index.html");
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
    use std::os::unix::fs::symlink;

    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request {
        get("/", headers)
    }

    fn get(target: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            conn: 1,
            seq: 0,
            method: "GET".into(),
            target: target.into(),
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

    /// A directory of its own under the temp dir, removed when dropped.
    struct Site(PathBuf);

    impl Site {
        fn new(name: &str) -> Site {
            let p = std::env::temp_dir().join(format!("files-unit-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Site(p)
        }

        /// Writes `name` with a modification time in the past, so its bytes
        /// are old enough to be kept in memory (see `RACY`).
        fn old_file(&self, name: &str, body: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, body).unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
            p
        }

        fn kept(&self, files: &StaticFiles, key: &str) -> bool {
            let c = files.cache.lock().unwrap();
            c.entries.get(Path::new(key)).is_some_and(|s| s.entry.file.body.is_some())
        }
    }

    impl Drop for Site {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn body(r: &Response) -> Vec<u8> {
        match &r.file {
            Some(f) => {
                let mut b = vec![0; f.len as usize];
                assert_eq!(f.read(0, &mut b).unwrap(), b.len());
                b
            }
            None => r.body.to_vec(),
        }
    }

    #[test]
    fn a_file_with_a_trailing_slash_or_an_impossible_name_is_404() {
        let site = Site::new("slash");
        site.old_file("file.css", b"body{}");
        std::fs::create_dir(site.0.join("d")).unwrap();
        site.old_file("d/index.html", b"index");
        let files = StaticFiles::new(&site.0, None).unwrap();
        assert_eq!(files.serve(&get("/file.css", &[])).status, 200);
        assert_eq!(files.serve(&get("/file.css/", &[])).status, 404);
        assert_eq!(files.serve(&get("/file.css/", &[])).status, 404, "and again, from the cache's view");
        assert_eq!(files.serve(&get("/d/", &[])).status, 200);
        assert_eq!(body(&files.serve(&get("/d/", &[]))), b"index");
        let long = format!("/{}", "x".repeat(300));
        assert_eq!(files.serve(&get(&long, &[])).status, 404);
        assert_eq!(files.serve(&get(&format!("/d{long}/y"), &[])).status, 404);
    }

    #[test]
    fn a_changed_file_is_served_fresh_even_with_the_same_size_and_mtime() {
        let site = Site::new("fresh");
        let p = site.old_file("a.txt", b"first");
        let files = StaticFiles::new(&site.0, None).unwrap();
        let r = files.serve(&get("/a.txt", &[]));
        assert_eq!((r.status, &body(&r)[..]), (200, &b"first"[..]));
        assert!(site.kept(&files, "a.txt"), "an old small file is kept in memory");
        assert_eq!(body(&files.serve(&get("/a.txt", &[]))), b"first", "from memory");

        // Same size, and the mtime put back as it was: the ctime changed.
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::write(&p, b"other").unwrap();
        std::fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
        assert_eq!(body(&files.serve(&get("/a.txt", &[]))), b"other");

        // Replaced by a new file (a new inode), as editors and rsync do.
        let tmp = site.old_file("a.txt.tmp", b"third!");
        std::fs::rename(&tmp, &p).unwrap();
        assert_eq!(body(&files.serve(&get("/a.txt", &[]))), b"third!");

        // Made unreadable: refused, not served from memory (ctime again).
        // Root reads anything, so this part only runs unprivileged.
        if unsafe { libc::geteuid() } != 0 {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
            assert_eq!(files.serve(&get("/a.txt", &[])).status, 403);
        }
        std::fs::remove_file(&p).unwrap();
        assert_eq!(files.serve(&get("/a.txt", &[])).status, 404);
    }

    #[test]
    fn a_freshly_written_file_is_not_kept_in_memory() {
        let site = Site::new("racy");
        std::fs::write(site.0.join("new.txt"), b"just written").unwrap();
        let files = StaticFiles::new(&site.0, None).unwrap();
        assert_eq!(body(&files.serve(&get("/new.txt", &[]))), b"just written");
        assert!(!site.kept(&files, "new.txt"), "modified under {RACY:?} ago: read per request");
        assert_eq!(body(&files.serve(&get("/new.txt", &[]))), b"just written");
    }

    #[test]
    fn directories_serve_their_index_and_odd_files_are_not_served() {
        let site = Site::new("index");
        site.old_file("index.html", b"<p>root</p>");
        std::fs::create_dir(site.0.join("sub")).unwrap();
        site.old_file("sub/index.html", b"<p>sub</p>");
        std::fs::create_dir(site.0.join("empty")).unwrap();
        let fifo = CString::new(site.0.join("pipe").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let files = StaticFiles::new(&site.0, None).unwrap();
        let r = files.serve(&get("/", &[]));
        assert_eq!((r.status, &body(&r)[..]), (200, &b"<p>root</p>"[..]));
        assert_eq!(r.headers.iter().find(|(n, _)| n == "Content-Type").unwrap().1, "text/html; charset=utf-8");
        assert_eq!(body(&files.serve(&get("/sub/", &[]))), b"<p>sub</p>");
        assert_eq!(body(&files.serve(&get("/./sub//index.html", &[]))), b"<p>sub</p>");
        assert_eq!(files.serve(&get("/empty", &[])).status, 404);
        assert_eq!(files.serve(&get("/sub/index.html/x", &[])).status, 404);
        // Opened without blocking, then refused: not a regular file.
        assert_eq!(files.serve(&get("/pipe", &[])).status, 404);
        // The directory became a file: found again, not served as before;
        // and a file is no directory (`/sub/` is a 404, `/sub` the file).
        std::fs::remove_dir_all(site.0.join("sub")).unwrap();
        site.old_file("sub", b"a file now");
        assert_eq!(files.serve(&get("/sub/", &[])).status, 404);
        assert_eq!(body(&files.serve(&get("/sub", &[]))), b"a file now");
    }

    #[test]
    fn symlinks_are_followed_only_inside_the_root() {
        let outside = Site::new("outside");
        outside.old_file("secret.txt", b"secret");
        let site = Site::new("links");
        let target = site.old_file("real.txt", b"inside");
        std::fs::create_dir(site.0.join("d")).unwrap();
        symlink("../real.txt", site.0.join("d/rel.txt")).unwrap();
        symlink(&target, site.0.join("abs.txt")).unwrap();
        symlink(outside.0.join("secret.txt"), site.0.join("out-abs.txt")).unwrap();
        let up = format!("../files-unit-{}-outside/secret.txt", std::process::id());
        symlink(&up, site.0.join("out-rel.txt")).unwrap();
        symlink(&outside.0, site.0.join("outdir")).unwrap();
        symlink("/proc/self/root/etc/hostname", site.0.join("magic.txt")).unwrap();
        let files = StaticFiles::new(&site.0, None).unwrap();
        assert_eq!(body(&files.serve(&get("/d/rel.txt", &[]))), b"inside");
        assert_eq!(body(&files.serve(&get("/abs.txt", &[]))), b"inside", "an absolute link into the root");
        for p in ["/out-abs.txt", "/out-rel.txt", "/outdir/secret.txt", "/magic.txt"] {
            assert_eq!(files.serve(&get(p, &[])).status, 403, "{p}");
        }
        // Served once, then pointed out of the root: refused at once.
        assert_eq!(files.serve(&get("/d/rel.txt", &[])).status, 200);
        std::fs::remove_file(site.0.join("d/rel.txt")).unwrap();
        symlink(format!("../{up}"), site.0.join("d/rel.txt")).unwrap();
        assert_eq!(files.serve(&get("/d/rel.txt", &[])).status, 403);
        // The same through a directory swapped for a link out.
        std::fs::create_dir(site.0.join("e")).unwrap();
        site.old_file("e/secret.txt", b"mine");
        assert_eq!(body(&files.serve(&get("/e/secret.txt", &[]))), b"mine");
        std::fs::remove_dir_all(site.0.join("e")).unwrap();
        symlink(&outside.0, site.0.join("e")).unwrap();
        assert_eq!(files.serve(&get("/e/secret.txt", &[])).status, 403);
    }

    #[test]
    fn siblings_are_checked_when_sent_and_looked_for_again_after_the_recheck_time() {
        let site = Site::new("siblings");
        site.old_file("p.html", b"<p>page</p>");
        let mut files = StaticFiles::new(&site.0, None).unwrap();
        files.sibling_recheck = Duration::from_millis(200);
        let gzip = [("Accept-Encoding", "gzip")];
        let r = files.serve(&get("/p.html", &gzip));
        assert_eq!((&body(&r)[..], r.headers.iter().any(|(n, _)| n == "Vary")), (&b"<p>page</p>"[..], false));

        // A new sibling: found once the recheck time has passed.
        std::fs::write(site.0.join("p.html.gz"), b"gz-1").unwrap();
        std::thread::sleep(files.sibling_recheck);
        let r = files.serve(&get("/p.html", &gzip));
        assert_eq!(body(&r), b"gz-1");
        assert!(r.headers.iter().any(|(n, v)| n == "Content-Encoding" && v == "gzip"));
        let r = files.serve(&get("/p.html", &[]));
        assert_eq!(body(&r), b"<p>page</p>");
        assert!(r.headers.iter().any(|(n, v)| n == "Vary" && v == "Accept-Encoding"));

        // The sibling sent is checked on every request: changed, removed.
        std::fs::write(site.0.join("p.html.gz"), b"gz-two").unwrap();
        assert_eq!(body(&files.serve(&get("/p.html", &gzip))), b"gz-two");
        std::fs::remove_file(site.0.join("p.html.gz")).unwrap();
        assert_eq!(body(&files.serve(&get("/p.html", &gzip))), b"<p>page</p>");

        // A sibling older than the file is stale: not sent.
        let gz = site.old_file("p.html.gz", b"old gz");
        std::fs::write(site.0.join("p.html"), b"<p>newer</p>").unwrap();
        assert!(gz.exists());
        assert_eq!(body(&files.serve(&get("/p.html", &gzip))), b"<p>newer</p>");
    }

    #[test]
    fn a_file_larger_than_the_cache_takes_is_read_per_request() {
        let site = Site::new("large");
        let big: Vec<u8> = (0..DEFAULT_CACHE_MAX_FILE as usize + 1).map(|i| (i % 251) as u8).collect();
        let p = site.old_file("big.bin", &big);
        let files = StaticFiles::new(&site.0, None).unwrap();
        let r = files.serve(&get("/big.bin", &[]));
        assert!(r.file.is_some(), "read as it is sent, not into memory");
        assert_eq!(body(&r), &big[..]);
        assert!(!site.kept(&files, "big.bin"));
        let r = files.serve(&get("/big.bin", &[("Range", "bytes=1048576-")]));
        assert_eq!((r.status, &body(&r)[..]), (206, &big[1 << 20..]));
        let mut changed = big.clone();
        changed[7] ^= 1;
        std::fs::write(&p, &changed).unwrap();
        assert_eq!(body(&files.serve(&get("/big.bin", &[]))), &changed[..]);
    }
}
