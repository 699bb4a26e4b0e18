//! A compromised pool worker, for the lease gate's tests: it answers like
//! any app (`ok PATH`), and a thread of its own keeps a duplicate of every
//! client socket that passes through the process (the sockets leases
//! hand it), as malicious code in an app could. When the file named by
//! `HOSTILE_TRIGGER` appears, it writes a forged response into every
//! socket it kept and reports each write's outcome, one line per socket
//! (`<inode> ok <bytes>` or `<inode> err <errno>`), to the file named by
//! `HOSTILE_REPORT`.

use std::{
    collections::BTreeMap,
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

/// What the forged writes carry: a whole response, so a client that got
/// it would take it for the answer to its next request.
const FORGED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED";

/// A TCP socket of ours: its inode.
fn tcp_inode(fd: RawFd) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let inode: u64 = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()?;
    let (mut domain, mut ty) = (0i32, 0i32);
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt into an i32 of the given length.
    let ok = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, (&raw mut domain).cast(), &mut len) == 0
            && libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut ty).cast(), &mut len) == 0
    };
    (ok && (domain == libc::AF_INET || domain == libc::AF_INET6) && ty == libc::SOCK_STREAM).then_some(inode)
}

fn keep_and_strike() {
    let trigger = std::env::var_os("HOSTILE_TRIGGER");
    let report = std::env::var_os("HOSTILE_REPORT");
    let mut kept: BTreeMap<u64, OwnedFd> = BTreeMap::new();
    loop {
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            for e in dir.flatten() {
                let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else { continue };
                let Some(inode) = tcp_inode(fd) else { continue };
                if kept.contains_key(&inode) || kept.values().any(|k| k.as_raw_fd() == fd) {
                    continue;
                }
                // SAFETY: dup of an fd that is open (it was just listed).
                let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
                if d >= 0 {
                    // SAFETY: a new descriptor, ours alone.
                    kept.insert(inode, unsafe { OwnedFd::from_raw_fd(d) });
                }
            }
        }
        if trigger.as_ref().is_some_and(|t| std::path::Path::new(t).exists()) {
            let mut out = String::new();
            for (inode, fd) in &kept {
                // SAFETY: send(2) of a constant buffer on a socket we hold.
                let n = unsafe { libc::send(fd.as_raw_fd(), FORGED.as_ptr().cast(), FORGED.len(), libc::MSG_NOSIGNAL) };
                match n {
                    n if n >= 0 => out.push_str(&format!("{inode} ok {n}\n")),
                    _ => out.push_str(&format!(
                        "{inode} err {}\n",
                        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
                    )),
                }
            }
            if let Some(r) = &report {
                let _ = std::fs::File::create(r).and_then(|mut f| f.write_all(out.as_bytes()));
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn main() {
    std::thread::spawn(keep_and_strike);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let svc = tower::service_fn(|req: http::Request<worker::Body>| async move {
        let body = format!("ok {}", req.uri().path());
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body))))
    });
    if let Err(e) = rt.block_on(worker::serve(svc)) {
        eprintln!("hostile worker: {e}");
        std::process::exit(1);
    }
}
