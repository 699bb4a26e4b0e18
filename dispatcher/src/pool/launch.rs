//! What a pool's worker is started from: its command, found the way a
//! shell would (relative to the configuration file, next to this binary,
//! in PATH), and its arguments, with `@demo-static` turned into the
//! built-in demo site.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::config::Pool;

/// The demo site built into the binary (`@demo-static` in the demo config).
const DEMO_FILES: &[(&str, &[u8])] = &[
    ("index.html", include_bytes!("../../../demo/static/index.html")),
    ("style.css", include_bytes!("../../../demo/static/style.css")),
];

/// A pool's worker command and arguments, resolved.
pub(super) struct Launch {
    pub command: PathBuf,
    pub args: Vec<String>,
}

impl Launch {
    /// Resolves `p`'s command and arguments; fails naming the pool.
    pub fn prepare(p: &Pool, base_dir: &Path, run_dir: &Path) -> Result<Launch> {
        let command = resolve_command(&p.command, base_dir).with_context(|| format!("pool `{}`", p.name))?;
        let args = p
            .args
            .iter()
            .map(|a| match a.as_str() {
                "@demo-static" => materialize_demo(run_dir).map(|d| d.display().to_string()),
                _ => Ok(a.clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Launch { command, args })
    }
}

/// Finds a worker command: a path is taken relative to the config's
/// directory; a bare name is looked for next to this binary, then in PATH.
fn resolve_command(cmd: &str, base: &Path) -> Result<PathBuf> {
    if cmd.contains('/') {
        let p = base.join(cmd);
        if p.exists() {
            return Ok(p);
        }
        bail!("worker command `{cmd}` not found (looked at {})", p.display());
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        let p = dir.join(cmd);
        if p.exists() {
            return Ok(p);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(cmd);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(anyhow!("worker command `{cmd}` not found next to the dispatcher binary or in PATH"))
}

/// Writes the demo site into the run directory; returns where.
fn materialize_demo(run_dir: &Path) -> Result<PathBuf> {
    let dir = run_dir.join("demo-static");
    fs::create_dir_all(&dir)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    for (name, data) in DEMO_FILES {
        let p = dir.join(name);
        fs::write(&p, data)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
    }
    Ok(dir)
}
