//! The application process a `proxy` or `fastcgi` pool runs: started as
//! the worker's child with the address it must listen on, waited for
//! until it accepts connections, stopped with the worker.
//!
//! The worker and the app live and die together: the app gets SIGTERM when
//! the worker exits (even by SIGKILL: `PR_SET_PDEATHSIG`), and the worker
//! exits when the app does ([`Running::exited`]), so activation's restarts,
//! idle time-outs, recycling and rapid-fail protection apply to the app's
//! process. The app runs in a process group of its own, and what is left
//! of the group when it ends is killed: php-fpm's children outlive a
//! SIGKILLed master, serving nobody and holding its socket.

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

/// How the app is told where to listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    /// A free loopback port in `PORT` (and `HOST=127.0.0.1`, and for
    /// `$PORT` in the arguments); the app binds it itself.
    Port,
    /// A listening loopback socket as fd 3, systemd style; `PORT` is set
    /// too, for apps that log it.
    Fds,
    /// A Unix socket path in `SOCKET` (and for `$SOCKET` in the arguments)
    /// for the app to bind, in the worker's temporary directory.
    Unix,
}

/// Where the app listens.
#[derive(Clone, Debug)]
pub enum Addr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl std::str::FromStr for Addr {
    type Err = String;

    /// `unix:/run/php/php-fpm.sock`, `tcp:127.0.0.1:9000` or
    /// `127.0.0.1:9000`.
    fn from_str(s: &str) -> Result<Addr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("`{s}`: no path after unix:"));
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        let tcp = s.strip_prefix("tcp:").unwrap_or(s);
        tcp.parse().map(Addr::Tcp).map_err(|_| format!("`{s}` is neither unix:PATH nor [tcp:]IP:PORT"))
    }
}

/// A connection to the app, either kind.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

impl Addr {
    /// Whether something accepts connections there now.
    pub async fn accepts(&self) -> bool {
        self.connect().await.is_ok()
    }

    /// A new TCP connection to the app (without Nagle); for a TCP address.
    pub async fn connect_tcp(&self) -> std::io::Result<tokio::net::TcpStream> {
        let Addr::Tcp(a) = self else {
            return Err(std::io::Error::other("not a TCP address"));
        };
        let tcp = tokio::net::TcpStream::connect(a).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// A new connection to the app (TCP without Nagle).
    pub async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Addr::Tcp(a) => {
                let tcp = tokio::net::TcpStream::connect(a).await?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
            Addr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        })
    }
}

/// Where an app about to be started will listen, chosen before it starts
/// (a php-fpm pool file names it).
pub struct Listen {
    pub socket: Socket,
    pub addr: Addr,
    /// The socket it inherits (`Socket::Fds`).
    listener: Option<std::net::TcpListener>,
}

impl Listen {
    /// A free loopback port or a fresh socket path in the temporary
    /// directory, as `socket` says.
    pub fn choose(socket: Socket) -> std::io::Result<Listen> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?;
        let addr = match socket {
            Socket::Unix => {
                let path = std::env::temp_dir().join(format!("dispatcher-app-{}.sock", std::process::id()));
                // A previous worker with this pid left it.
                let _ = std::fs::remove_file(&path);
                Addr::Unix(path)
            }
            _ => Addr::Tcp(port),
        };
        // With `PORT` the app binds the port itself: let it go first.
        let listener = (socket == Socket::Fds).then_some(listener);
        Ok(Listen { socket, addr, listener })
    }
}

/// Why an app did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("starting the app `{0}`: {1}")]
    Spawn(String, std::io::Error),
    #[error("the app `{0}` exited before it accepted connections on {1} ({2})")]
    ExitedEarly(String, String, std::process::ExitStatus),
    #[error("the app `{0}` did not accept connections on {1} within {2:?}")]
    NeverListened(String, String, Duration),
    #[error("the app `{0}` exited ({1})")]
    Exited(String, std::process::ExitStatus),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Worker(#[from] crate::Error),
}

/// A started app that accepts connections.
pub struct Running {
    name: String,
    child: tokio::process::Child,
    /// Its pid, and its process group's.
    pgid: i32,
    pub addr: Addr,
}

/// Starts `command` (`$PORT` and `$SOCKET` in its arguments replaced) to
/// listen where `listen` says, and waits up to `start_timeout` for it to
/// accept connections.
pub async fn start(command: &[String], listen: Listen, start_timeout: Duration) -> Result<Running, AppError> {
    let name = command.first().cloned().unwrap_or_default();
    let addr = listen.addr.clone();
    // An inherited socket accepts (into its backlog) from the start.
    let socket = listen.socket;
    let inherited = socket == Socket::Fds;
    let mut child = spawn(command, &listen).map_err(|e| AppError::Spawn(name.clone(), e))?;
    drop(listen);
    let pgid = child.id().map_or(0, |p| p as i32);
    tracing::info!(app = %name, %addr, pid = child.id(), socket = ?socket, "app started");
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            kill_group(pgid);
            return Err(AppError::ExitedEarly(name, addr.to_string(), st));
        }
        if inherited || addr.accepts().await {
            break;
        }
        if t0.elapsed() > start_timeout {
            let _ = child.start_kill();
            kill_group(pgid);
            return Err(AppError::NeverListened(name, addr.to_string(), start_timeout));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(app = %name, %addr, after_ms = t0.elapsed().as_millis() as u64, "app accepts connections");
    Ok(Running { name, child, pgid, addr })
}

impl Running {
    /// Resolves when the app exits on its own: the worker's error. What
    /// is left of its process group is killed.
    pub async fn exited(&mut self) -> AppError {
        let r = self.child.wait().await;
        self.kill_group();
        match r {
            Ok(st) => AppError::Exited(self.name.clone(), st),
            Err(e) => AppError::Io(e),
        }
    }

    /// SIGTERM, then SIGKILL after 10 s, then SIGKILL to what is left of
    /// its group; the Unix socket goes.
    pub async fn stop(mut self) {
        if self.pgid > 0 {
            let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        self.kill_group();
        if let Addr::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.pgid)
    }

    fn kill_group(&self) {
        kill_group(self.pgid);
    }
}

/// Serves with `serve` while the app runs: the worker's end (idle,
/// recycled, SIGTERM) stops the app; the app's end is the worker's error.
pub async fn serve_while<F>(mut app: Running, serve: F) -> Result<(), AppError>
where
    F: std::future::Future<Output = Result<(), crate::Error>>,
{
    let served = tokio::select! {
        r = serve => r.map_err(AppError::from),
        e = app.exited() => return Err(e),
    };
    app.stop().await;
    served
}

/// SIGKILL to process group `pgid` (0, "ours", is never meant).
fn kill_group(pgid: i32) {
    if pgid > 0 {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
    }
}

fn spawn(command: &[String], listen: &Listen) -> std::io::Result<tokio::process::Child> {
    let Some((prog, args)) = command.split_first() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command"));
    };
    let (port, socket) = match &listen.addr {
        Addr::Tcp(a) => (a.port().to_string(), String::new()),
        Addr::Unix(path) => (String::new(), path.display().to_string()),
    };
    let args: Vec<String> = args.iter().map(|a| a.replace("$PORT", &port).replace("$SOCKET", &socket)).collect();
    let mut cmd = match listen.socket {
        Socket::Port | Socket::Unix => {
            let mut c = tokio::process::Command::new(prog);
            c.args(&args);
            c
        }
        Socket::Fds => {
            // LISTEN_PID must be the app's own pid: the shell sets it to
            // its own and then becomes the app.
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg("LISTEN_PID=$$ exec \"$0\" \"$@\"").arg(prog).args(&args);
            c.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "http");
            c
        }
    };
    match &listen.addr {
        Addr::Tcp(_) => cmd.env("PORT", &port).env("HOST", "127.0.0.1"),
        Addr::Unix(_) => cmd.env("SOCKET", &socket),
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::inherit()).kill_on_drop(true);
    let fd = listen.listener.as_ref().map(|l| l.as_raw_fd());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 || libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = fd {
                // fd 3, without close-on-exec (dup2 clears it).
                if fd == 3 {
                    let fl = libc::fcntl(3, libc::F_GETFD);
                    libc::fcntl(3, libc::F_SETFD, fl & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Nothing else of the worker's: its ring, control and lease
            // sockets held open by the app kept a dead dispatcher's worker
            // (and the app) alive.
            let first = if fd.is_some() { 4 } else { 3 };
            if libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0 as libc::c_uint) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn addresses_parse() {
        assert!(
            matches!("unix:/run/php/fpm.sock".parse::<Addr>(), Ok(Addr::Unix(p)) if p == Path::new("/run/php/fpm.sock"))
        );
        assert!(matches!("tcp:127.0.0.1:9000".parse::<Addr>(), Ok(Addr::Tcp(a)) if a.port() == 9000));
        assert!(matches!("127.0.0.1:9000".parse::<Addr>(), Ok(Addr::Tcp(_))));
        assert!("unix:".parse::<Addr>().is_err());
        assert!("localhost:9000".parse::<Addr>().unwrap_err().contains("localhost:9000"));
    }
}
