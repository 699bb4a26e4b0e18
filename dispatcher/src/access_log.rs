//! The access log: one line per request in the combined log format
//! (`host - - [time] "request" status bytes "referer" "user-agent"`).
//!
//! Workers report the requests they answer in batches over their control
//! socket (`WorkerFrame::Log` in `dispatcher_ebpf::wire`; a leased connection's responses
//! never pass through the dispatcher); the dispatcher adds the client's
//! address and logs its own answers (404, 503, 502, 408…). Lines go to a
//! writer task through a channel, off the connections' path, and are
//! flushed at least every 100 ms. SIGUSR1 reopens the file (rotate by
//! renaming it, then signalling); with a size limit, the writer renames
//! the file to `<file>.1` itself (replacing an older one) once it passes
//! the limit.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

/// How often the writer flushes what it has.
const FLUSH: Duration = Duration::from_millis(100);

/// A handle to the access log's writer task.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl AccessLog {
    /// Opens (creates, appends to) `path` and starts the writer task.
    pub fn open(path: &Path, max_bytes: u64) -> Result<AccessLog> {
        let file = open_file(path)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(path.to_path_buf(), file, rx, max_bytes));
        Ok(AccessLog { tx })
    }

    /// Logs records a worker sent (`WorkerFrame::Log`), with the
    /// client address of each connection from `peer`.
    pub fn worker_records(&self, data: &[u8], peer: impl Fn(u64) -> Option<SocketAddr>) {
        let mut out = Vec::with_capacity(data.len() + data.len() / 4);
        for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let f: Vec<&[u8]> = line.split(|b| *b == b'\t').collect();
            let [conn, ms, status, bytes, _us, request, referer, ua] = f[..] else { continue };
            let num = |b: &[u8]| std::str::from_utf8(b).ok().and_then(|s| s.parse::<u64>().ok());
            let (Some(conn), Some(ms), Some(status), Some(bytes)) = (num(conn), num(ms), num(status), num(bytes))
            else {
                continue;
            };
            line_into(&mut out, peer(conn), ms, request, status, bytes, referer, ua);
        }
        let _ = self.tx.send(out);
    }

    /// Logs an answer the dispatcher wrote itself, to the request whose
    /// head is `head` (empty: none was parsed).
    pub fn local(&self, peer: Option<SocketAddr>, head: &[u8], status: u16, bytes: usize) {
        let mut out = Vec::new();
        let line = head.split(|b| *b == b'\n').next().unwrap_or_default().strip_suffix(b"\r").unwrap_or_default();
        let header = |name: &str| {
            let mut v = Vec::new();
            match head.split(|b| *b == b'\n').skip(1).find_map(|l| {
                let (n, rest) = l.split_at(l.iter().position(|b| *b == b':')?);
                n.eq_ignore_ascii_case(name.as_bytes()).then(|| rest[1..].trim_ascii())
            }) {
                Some(h) => worker::proto::log_field(&mut v, h),
                None => v.push(b'-'),
            }
            v
        };
        let mut req = Vec::new();
        worker::proto::log_field(&mut req, line);
        let (referer, ua) = (header("referer"), header("user-agent"));
        line_into(
            &mut out,
            peer,
            now_ms(),
            if req.is_empty() { b"-" } else { &req },
            status as u64,
            bytes as u64,
            &referer,
            &ua,
        );
        let _ = self.tx.send(out);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[allow(clippy::too_many_arguments)]
fn line_into(
    out: &mut Vec<u8>,
    peer: Option<SocketAddr>,
    ms: u64,
    request: &[u8],
    status: u64,
    bytes: u64,
    referer: &[u8],
    ua: &[u8],
) {
    const FMT: &[time::format_description::FormatItem<'static>] =
        time::macros::format_description!("[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000");
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let host = peer.map_or("-".to_string(), |p| p.ip().to_string());
    let _ = write!(out, "{host} - - [{}] \"", t.format(FMT).unwrap_or_default());
    out.extend_from_slice(request);
    let _ = write!(out, "\" {status} {bytes} \"");
    out.extend_from_slice(referer);
    out.extend_from_slice(b"\" \"");
    out.extend_from_slice(ua);
    out.extend_from_slice(b"\"\n");
}

fn open_file(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("opening the access log {}", path.display()))
}

async fn write(path: PathBuf, file: std::fs::File, mut rx: mpsc::UnboundedReceiver<Vec<u8>>, max_bytes: u64) {
    let mut size = file.metadata().map_or(0, |m| m.len());
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, file);
    let mut tick = tokio::time::interval(FLUSH);
    let Ok(mut usr1) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) else { return };
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(b) => {
                    if let Err(e) = out.write_all(&b) {
                        tracing::warn!(path = %path.display(), "writing the access log: {e}");
                    }
                    size += b.len() as u64;
                    if max_bytes > 0 && size >= max_bytes {
                        let _ = out.flush();
                        let mut old = path.clone().into_os_string();
                        old.push(".1");
                        match std::fs::rename(&path, &old).map_err(anyhow::Error::from).and_then(|_| open_file(&path)) {
                            Ok(f) => {
                                out = std::io::BufWriter::with_capacity(64 * 1024, f);
                                tracing::info!(path = %path.display(), "access log rotated (size limit)");
                            }
                            Err(e) => tracing::error!(path = %path.display(), "rotating the access log: {e:#}; trying again after another {max_bytes} bytes"),
                        }
                        // Counted afresh either way (no retry per line).
                        size = 0;
                    }
                }
                None => {
                    let _ = out.flush();
                    return;
                }
            },
            _ = tick.tick() => {
                let _ = out.flush();
            }
            _ = usr1.recv() => {
                let _ = out.flush();
                match open_file(&path) {
                    Ok(f) => {
                        size = f.metadata().map_or(0, |m| m.len());
                        out = std::io::BufWriter::with_capacity(64 * 1024, f);
                        tracing::info!(path = %path.display(), "SIGUSR1: access log reopened");
                    }
                    Err(e) => tracing::error!("{e:#}; still writing to the old file"),
                }
            }
        }
    }
}
