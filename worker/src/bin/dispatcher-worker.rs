//! The ready worker: pulls requests from its pool's queue and answers them
//! by echoing them back or by serving files from a directory.

use std::path::{Component, Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};
use worker::{Request, Response, Worker};

/// A dispatcher worker. Started by the dispatcher with its pool's queue
/// handles (DISPATCHER_RING_FD, DISPATCHER_CTL_FD); not useful on its own.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Add `X-Dispatcher-Pool: <pool>` and `X-Dispatcher-Worker: <pid>` to
    /// every response, to see which pool and process answered.
    #[arg(long)]
    pool_header: bool,
    /// Serve HTTP on this address standalone instead of pulling from a
    /// dispatcher pool (the benchmarks' no-dispatch baseline).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Clone)]
enum Mode {
    /// Answer 200 with the request echoed back: the request line, the
    /// headers as received, a blank line, then the body. A path ending in
    /// `/bytes/N` is answered with N bytes instead (at most 64 MiB; the
    /// benchmarks' large responses); a path containing `/delay/MS/` is
    /// answered after MS milliseconds (at most 60 s; a slow application).
    Echo,
    /// Serve the files under DIR (GET and HEAD; a directory serves its
    /// index.html).
    Static {
        /// Directory to serve.
        dir: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(cli))
}

async fn handle(mode: Mode, req: Request) -> Response {
    match mode {
        Mode::Echo => {
            // A slow application, for tests and benchmarks.
            if let Some(ms) = segment_after(req.path(), "/delay/") {
                tokio::time::sleep(std::time::Duration::from_millis(ms.min(MAX_DELAY_MS))).await;
            }
            echo(&req)
        }
        Mode::Static { dir } => serve_file(&dir, &req).await,
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Some(addr) = cli.listen {
        tracing::info!(%addr, pid = std::process::id(), "serving standalone");
        let mode = cli.mode.clone();
        worker::standalone::serve(addr, move |req| handle(mode.clone(), req)).await?;
        return Ok(());
    }
    let mut w = Worker::from_env()?;
    let pid = std::process::id();
    let mode_name = match &cli.mode {
        Mode::Echo => "echo".to_string(),
        Mode::Static { dir } => format!("static {}", dir.display()),
    };
    tracing::info!(pool = w.pool(), mode = %mode_name, pid, "worker ready");
    let pool = w.pool().to_string();
    let responder = w.responder();
    // Requests being handled; an idle exit waits for them.
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // SIGTERM: stop pulling, finish what was taken, exit cleanly.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut terminated = false;
    loop {
        let got = tokio::select! {
            r = w.receive() => r,
            _ = sigterm.recv() => {
                tracing::info!(pool = %pool, pid, "SIGTERM; finishing the requests taken");
                terminated = true;
                w.stop_pulling();
                continue;
            }
        };
        let req = match got {
            Ok(r) => r,
            Err(worker::Error::Closed) => return Ok(()),
            Err(e @ (worker::Error::Idle | worker::Error::Recycle)) => {
                // Let the handlers in flight answer first.
                while busy.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                match terminated {
                    true => tracing::info!(pool = %pool, pid, "stopped; exiting"),
                    false => tracing::info!(pool = %pool, pid, "{e}; exiting"),
                }
                w.finish().await;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let mode = cli.mode.clone();
        let responder = responder.clone();
        let pool = pool.clone();
        let tag = cli.pool_header;
        let busy = busy.clone();
        busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let mut resp = handle(mode, req.clone()).await;
            if tag {
                resp = resp.header("X-Dispatcher-Pool", pool).header("X-Dispatcher-Worker", pid.to_string());
            }
            let _ = responder.respond(&req, resp).await;
            busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

/// Longest `/delay/MS` wait.
const MAX_DELAY_MS: u64 = 60_000;

/// The number in `path` right after `marker` (`/delay/250/x` → 250).
fn segment_after(path: &str, marker: &str) -> Option<u64> {
    let (_, rest) = path.split_once(marker)?;
    rest.split('/').next()?.parse().ok()
}

/// Largest `/bytes/N` answer.
const MAX_SIZED_REPLY: usize = 64 << 20;

fn echo(req: &Request) -> Response {
    if let Some(n) = req.path().rsplit_once("/bytes/").and_then(|(_, n)| n.parse::<usize>().ok()) {
        if n > MAX_SIZED_REPLY {
            return Response::text(413, "at most 64 MiB\n");
        }
        return Response::new(200).header("Content-Type", "application/octet-stream").body(vec![b'x'; n]);
    }
    let mut body = Vec::with_capacity(req.raw_head.len() + req.body.len());
    body.extend_from_slice(&req.raw_head);
    body.extend_from_slice(&req.body);
    Response::new(200)
        .header("Content-Type", "application/octet-stream")
        .header("X-Echo-Method", req.method.clone())
        .header("X-Echo-Path", req.path().to_string())
        .header("X-Echo-Host", req.host().unwrap_or("").to_string())
        .header("X-Echo-Body-Length", req.body.len().to_string())
        .body(body)
}

/// Maps a request path to a file under `root`: percent-decoded; `..`,
/// NUL and backslashes refused.
fn map_path(root: &Path, path: &str) -> Option<PathBuf> {
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

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css",
        "js" => "text/javascript",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        _ => "application/octet-stream",
    }
}

async fn serve_file(root: &Path, req: &Request) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::text(405, "only GET and HEAD\n").header("Allow", "GET, HEAD");
    }
    let Some(mut p) = map_path(root, req.path()) else {
        return Response::text(400, "bad path\n");
    };
    if tokio::fs::metadata(&p).await.map(|m| m.is_dir()).unwrap_or(false) {
        p.push("index.html");
    }
    match tokio::fs::read(&p).await {
        Ok(data) => Response::new(200).header("Content-Type", content_type(&p)).body(data),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Response::text(404, "not found\n"),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Response::text(403, "forbidden\n"),
        Err(_) => Response::text(500, "could not read the file\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
