//! php-fpm started for one FastCGI pool: a configuration of its own (one
//! FPM pool of a fixed number of children on a Unix socket in the
//! temporary directory), run in the foreground as the worker's child. Its
//! log comes through a FIFO the worker reads into its own log: php-fpm
//! opens its `error_log` by name, and the worker's stderr (the
//! dispatcher's pipe, opened by root) cannot be opened again by name as
//! the pool's user.

use std::path::{Path, PathBuf};

use crate::app::{Addr, Listen, Socket};

/// php-fpm as a FastCGI pool starts it.
#[derive(Clone, Debug)]
pub struct PhpFpm {
    /// Its program; `None`: `php-fpm` or the newest `php-fpmX.Y` in PATH,
    /// /usr/sbin or /usr/local/sbin (Debian names it `php-fpm8.2`).
    pub program: Option<PathBuf>,
    /// Its children (`pm = static`): the PHP requests run at once.
    pub children: usize,
    /// `php_admin_value` lines (`NAME=VALUE`, e.g. `memory_limit=256M`).
    pub ini: Vec<(String, String)>,
}

/// What it takes to start php-fpm with a written configuration.
pub struct Prepared {
    pub command: Vec<String>,
    pub listen: Listen,
    /// The configuration file and the log FIFO, removed when this goes.
    pub files: Files,
}

/// The files written for php-fpm, removed when dropped.
pub struct Files {
    conf: PathBuf,
    log: PathBuf,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.conf);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Copies php-fpm's log lines from the FIFO at `path` into the worker's
/// log while the worker runs. Opened before php-fpm starts (its open would
/// wait for a reader), and for writing too, so that php-fpm reopening it
/// (SIGUSR1) is no end of file.
fn forward_log(path: &Path) -> std::io::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let rx = tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_receiver(path)?;
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(rx).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // php-fpm's own `[date] LEVEL: ` prefix; ours has both.
            let text = line.split_once("] ").map_or(line.as_str(), |(_, t)| t);
            match text.split_once(": ") {
                Some(("WARNING" | "ERROR" | "ALERT", msg)) => tracing::warn!(target: "php-fpm", "{msg}"),
                Some(("NOTICE" | "DEBUG", msg)) => tracing::info!(target: "php-fpm", "{msg}"),
                _ => tracing::info!(target: "php-fpm", "{text}"),
            }
        }
    });
    Ok(())
}

/// Finds php-fpm's program.
pub fn find(program: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = program {
        return match p.components().count() > 1 || p.is_file() {
            true => Ok(p.to_path_buf()),
            false => search(|n| n == p.as_os_str()).ok_or_else(|| format!("`{}` is not in PATH", p.display())),
        };
    }
    search(|n| n == "php-fpm")
        .or_else(|| search(|n| n.to_str().is_some_and(|n| n.starts_with("php-fpm"))))
        .ok_or_else(|| "no php-fpm in PATH, /usr/sbin or /usr/local/sbin (Debian: apt-get install php-fpm)".to_string())
}

/// The last match in name order (so `php-fpm8.3` over `php-fpm8.2`).
fn search(matches: impl Fn(&std::ffi::OsStr) -> bool) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from));
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        let mut found: Vec<PathBuf> =
            rd.flatten().filter(|e| matches(&e.file_name()) && e.path().is_file()).map(|e| e.path()).collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Some(p);
        }
    }
    None
}

impl PhpFpm {
    /// Writes the configuration next to the socket it names.
    pub fn prepare(&self) -> Result<Prepared, String> {
        let program = find(self.program.as_deref())?;
        let listen = Listen::choose(Socket::Unix).map_err(|e| format!("choosing a socket path: {e}"))?;
        let Addr::Unix(sock) = &listen.addr else { unreachable!("a Unix listen address") };
        let conf = sock.with_extension("php-fpm.conf");
        let log = sock.with_extension("php-fpm.log");
        let _ = std::fs::remove_file(&log);
        nix::unistd::mkfifo(&log, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR)
            .map_err(|e| format!("making the log FIFO {}: {e}", log.display()))?;
        let files = Files { conf: conf.clone(), log: log.clone() };
        forward_log(&log).map_err(|e| format!("opening the log FIFO {}: {e}", log.display()))?;
        let mut text = format!(
            "; written by dispatcher-worker for this worker's php-fpm; removed when it stops\n\
             [global]\n\
             error_log = {log}\n\
             log_limit = 8192\n\
             daemonize = no\n\
             \n\
             [dispatcher]\n\
             listen = {sock}\n\
             pm = static\n\
             pm.max_children = {children}\n\
             ; the scripts' environment is the pool's\n\
             clear_env = no\n\
             catch_workers_output = yes\n\
             decorate_workers_output = no\n",
            sock = sock.display(),
            log = log.display(),
            children = self.children.max(1),
        );
        for (k, v) in &self.ini {
            text.push_str(&format!("php_admin_value[{k}] = {v}\n"));
        }
        std::fs::write(&conf, text).map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let mut command = vec![
            program.display().to_string(),
            "--nodaemonize".into(),
            "--fpm-config".into(),
            conf.display().to_string(),
        ];
        // php-fpm refuses root unless told; the pool's `user` is how not
        // to be root.
        if nix::unistd::geteuid().is_root() {
            command.push("--allow-to-run-as-root".into());
        }
        Ok(Prepared { command, listen, files })
    }
}
