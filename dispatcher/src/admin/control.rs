//! The running dispatcher's control socket, `/run/dispatcher/<instance>/control`
//! (root only): one command per line, one answer line (`ok: …` or
//! `error: …`). `dispatcher pool start NAME` is its client.
//!
//! Commands:
//! - `pool-start NAME` / `start NAME`: start a pool that was stopped (by
//!   rapid-fail protection or `stop`).
//! - `stop NAME`: stop a pool's workers; its requests get 503 until a start.
//! - `recycle NAME`: recycle a pool's workers (overlapped).
//! - `status`, `pools`, `routes`, `queues`: JSON (see `inspect`).
//! - `reload`: read the configuration again and apply it (see `registry`).
//! - `guard show`: the XDP guard's state as JSON.
//! - `guard allow|deny add|del CIDR`: change a guard list (next packet on).
//! - `fault supervisor-panic NAME`: makes the supervisor of pool NAME's
//!   first slot panic (to test that activation's failure stops neither
//!   the worker nor the dispatcher); refused unless the dispatcher was
//!   started with `DISPATCHER_FAULTS=1`.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::Context;
use crate::bpf::GuardList;

/// Longest command line accepted.
const MAX_LINE: usize = 4096;
/// How long the client waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket's path for an instance's run directory.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join("control")
}

/// Serves the control socket in `run_dir` until the process exits.
pub fn listen(run_dir: &Path, ctx: Arc<Context>) -> Result<()> {
    let p = path(run_dir);
    let _ = std::fs::remove_file(&p);
    let listener = tokio::net::UnixListener::bind(&p).with_context(|| format!("binding {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", p.display()))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut lines = BufReader::new(rd.take(MAX_LINE as u64 * 16)).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer = match line.trim() {
                        "reload" => match ctx.pools.reload().await {
                            Ok(summary) => format!("ok: reloaded ({summary})"),
                            Err(e) => format!("error: {}", format!("{e:#}").replace('\n', " ")),
                        },
                        line => command(&ctx, line),
                    };
                    if wr.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

fn command(ctx: &Context, line: &str) -> String {
    if line.len() > MAX_LINE {
        return "error: command too long".into();
    }
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(view @ ("status" | "pools" | "routes" | "queues")), None, None) => {
            let v = match view {
                "status" => super::inspect::status(ctx),
                "pools" => super::inspect::pools(ctx),
                "routes" => super::inspect::routes(ctx),
                _ => super::inspect::queues(ctx),
            };
            format!("ok: {v}")
        }
        (Some("stop"), Some(name), None) => match ctx.pools.named(name) {
            None => format!("error: no pool named `{name}`"),
            Some(p) if p.stopped().is_some() => format!("ok: pool `{name}` is already stopped"),
            Some(p) => {
                p.request_halt();
                tracing::info!(pool = %name, "stop requested on the control socket");
                format!("ok: pool `{name}` stopping (its requests get 503 until `dispatcher start {name}`)")
            }
        },
        (Some("recycle"), Some(name), None) => match ctx.pools.named(name) {
            None => format!("error: no pool named `{name}`"),
            Some(p) => {
                p.request_recycle();
                tracing::info!(pool = %name, "recycle requested on the control socket");
                format!("ok: pool `{name}` recycling its workers")
            }
        },
        (Some("pool-start" | "start"), Some(name), None) => match ctx.pools.named(name) {
            None => format!("error: no pool named `{name}`"),
            Some(p) => {
                // Asked for in any case: a stop a supervisor has not seen
                // yet is recorded against the count as it is then.
                let was_stopped = p.stopped().is_some();
                p.request_start();
                tracing::info!(pool = %name, "start requested on the control socket");
                match was_stopped {
                    true => format!("ok: pool `{name}` starting"),
                    false => format!("ok: pool `{name}` is running"),
                }
            }
        },
        (Some("fault"), Some("supervisor-panic"), Some(name)) if std::env::var_os("DISPATCHER_FAULTS").is_some_and(|v| v == "1") => {
            match ctx.pools.named(name) {
                None => format!("error: no pool named `{name}`"),
                Some(p) => {
                    tracing::warn!(pool = %name, "fault injection: making the pool's supervisor panic");
                    p.slots[0].signals.fault.notify_one();
                    format!("ok: fault injected in pool `{name}`")
                }
            }
        }
        (Some("guard"), Some("show"), None) => format!("ok: {}", ctx.pools.guard().lock().unwrap().show()),
        (Some("guard"), Some(list @ ("allow" | "deny")), Some(verb @ ("add" | "del"))) => {
            let list_kind = if list == "allow" { GuardList::Allow } else { GuardList::Deny };
            let Some(cidr) = words.next() else { return "error: missing CIDR".into() };
            let net = match crate::config::parse_cidr(cidr) {
                Ok(n) => n,
                Err(e) => return format!("error: {e}"),
            };
            match ctx.pools.guard().lock().unwrap().change(list_kind, net, verb == "add") {
                Ok(true) => {
                    tracing::info!(list, cidr = %net, "guard list {}", if verb == "add" { "entry added" } else { "entry removed" });
                    format!("ok: {list} list {} {net}", if verb == "add" { "now has" } else { "no longer has" })
                }
                Ok(false) => format!("ok: {list} list unchanged ({net} {})", if verb == "add" { "was there" } else { "was not there" }),
                Err(e) => format!("error: {e:#}"),
            }
        }
        (Some("fault"), ..) => "error: fault injection is off (start the dispatcher with DISPATCHER_FAULTS=1)".into(),
        _ => format!("error: unknown command `{line}` (known: status, pools, routes, queues, start NAME, stop NAME, recycle NAME, reload, guard show, guard allow|deny add|del CIDR)"),
    }
}

/// Sends one command to the instance whose run directory is `run_dir` and
/// returns its answer; an `error:` answer is an error.
pub fn send(run_dir: &Path, cmd: &str) -> Result<String> {
    use std::io::{BufRead, Write};
    let p = path(run_dir);
    let mut s = std::os::unix::net::UnixStream::connect(&p)
        .with_context(|| format!("connecting to {} (is the instance running, and are you root?)", p.display()))?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(&s).read_line(&mut answer).context("reading the answer")?;
    let answer = answer.trim().to_string();
    if let Some(e) = answer.strip_prefix("error: ") {
        bail!("{e}");
    }
    Ok(answer)
}
