//! `cargo xtask`: build, run and test dispatcher.
//!
//! The BPF programs are built for `bpfel-unknown-none` by a toolchain that
//! may not be the one running this (see `toolchain`), then embedded into
//! the `dispatcher` binary through `DISPATCHER_EBPF_OBJ`.

mod bench;
mod toolchain;

use std::{
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use toolchain::{step, Apt};

/// Build, run and test dispatcher.
#[derive(Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Find or install the BPF toolchain, build the BPF programs, then the
    /// user-space binaries (release) into target/release.
    Build {
        /// Build user space in debug mode instead.
        #[arg(long)]
        debug: bool,
    },
    /// Build, then start the dispatcher (as root) with the built-in demo
    /// configuration, or with ARGS passed to `dispatcher serve`
    /// (e.g. `-- --config examples/dispatcher.toml`).
    Run {
        /// Arguments for `dispatcher serve`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build, then measure the same echo logic served standalone, behind
    /// nginx, and behind the dispatcher (fast and slow path), and nginx
    /// serving a directory against a `static` pool, with wrk, interleaved;
    /// writes bench/results/{results.md,results.json,throughput.svg}.
    /// Needs root.
    Bench {
        /// Keep-alive connection counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "16,256,4096")]
        connections: Vec<u32>,
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Interleaved rounds (the figures are medians over them).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Only small responses (skip the 64 KiB, 1 MiB POST and h2load
        /// cases, the static section's 1 MiB file, the cold-start and
        /// recycling runs).
        #[arg(long)]
        small_only: bool,
        /// Sections to run: `echo` (the echo app behind every dispatch
        /// path) and app sections (`static`: nginx serving a directory vs
        /// a `static` pool; `axum`: the axum example on hyper vs in a
        /// pool; `python`: the WSGI example under gunicorn behind nginx's
        /// proxy_pass vs in a proxy pool; `php`: the PHP example under
        /// php-fpm behind nginx's fastcgi_pass vs in a fastcgi pool), and
        /// `tunnel` (bytes through upgraded connections: kernel splice vs
        /// the worker's copy vs nginx). The app sections run at the
        /// --connections counts up to 256.
        #[arg(long, value_delimiter = ',', default_value = "echo,static,axum,python,php,tunnel")]
        only: Vec<String>,
        /// Measure the `dispatcher` and `dispatcher-worker` binaries in DIR
        /// (e.g. copies of an earlier commit's target/release) instead of
        /// building this tree: before/after comparisons in one session.
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Check formatting and lints (cargo fmt, clippy), build, install the
    /// test tools (curl, wrk, bpftool), and run the whole test suite (unit,
    /// property and end-to-end tests; the latter need root).
    Test {
        /// Skip the `cargo fmt --check` and clippy checks that run first
        /// (while iterating on one test; CI never skips them).
        #[arg(long)]
        no_lint: bool,
        /// Arguments for `cargo test` (e.g. `-- --nocapture`, or a filter).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build, then run the soak (`tests/src/soak.rs`) for MINUTES: mixed
    /// load (keep-alive, pipelined, 256 KiB uploads, malformed and
    /// vanishing clients) while workers are killed, recycled and reloaded;
    /// fails if any well-formed request got another's or a wrong answer, or
    /// if the dispatcher's memory or descriptors did not come back. Needs
    /// root. (`cargo xtask test` runs it for one minute.)
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The ecosystem's habits, checked before anything is built so drift
/// fails fast: the tree as `cargo fmt` writes it (rustfmt.toml), and no
/// clippy warning in user space (the BPF programs are linted for their own
/// target by `toolchain::clippy_bpf` when the BPF toolchain has clippy).
fn lint() -> Result<()> {
    let t = Instant::now();
    let has = |tool: &str| Command::new("cargo").args([tool, "--version"]).output().is_ok_and(|o| o.status.success());
    for tool in ["fmt", "clippy"] {
        if !has(tool) {
            let why = format!(
                "`cargo {tool}` is not installed (rustup component add {})",
                if tool == "fmt" { "rustfmt" } else { "clippy" }
            );
            if std::env::var_os("CI").is_some() {
                bail!("{why}; CI needs it");
            }
            step("lint", &format!("{why}; skipping that check"));
        }
    }
    if has("fmt") {
        step("lint", "cargo fmt --all --check");
        let ok = Command::new("cargo").current_dir(workspace_root()).args(["fmt", "--all", "--check"]).status()?;
        if !ok.success() {
            bail!("the tree is not formatted: run `cargo fmt --all` (the diff is above)");
        }
    }
    if has("clippy") {
        step("lint", "cargo clippy --workspace --all-targets -- -D warnings");
        let ok = Command::new("cargo")
            .current_dir(workspace_root())
            .args(["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])
            .status()?;
        if !ok.success() {
            bail!("clippy found warnings (above); fix them or allow one with a reason");
        }
    }
    step("lint", &format!("done in {}s", t.elapsed().as_secs()));
    Ok(())
}

/// Environment variables an outer `cargo run` sets that would confuse an
/// inner cargo using another toolchain.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        let drop = k == "RUSTC"
            || k == "RUSTC_WRAPPER"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k == "RUSTDOC"
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTFLAGS"
            || k == "CARGO"
            || k == "CARGO_TARGET_DIR"
            || k == "CARGO_BUILD_TARGET"
            || k == "CARGO_ENCODED_RUSTFLAGS"
            || k == "CARGO_MANIFEST_DIR"
            || k == "CARGO_MANIFEST_PATH"
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || k == "CARGO_PRIMARY_PACKAGE"
            || k == "CARGO_CRATE_NAME";
        if drop {
            cmd.env_remove(&k);
        }
    }
}

/// Builds the BPF object; returns its path.
fn build_bpf(apt: &mut Apt) -> Result<PathBuf> {
    build_bpf_linted(apt, false)
}

/// The BPF programs' cargo, for subcommand `sub` (`build`, or `clippy`
/// through `cargo` = the toolchain's cargo-clippy).
fn bpf_cargo(tc: &toolchain::BpfToolchain, linker_dir: &Path, cargo: &str, sub: &str) -> Command {
    let root = workspace_root();
    let arch = std::env::consts::ARCH;
    let mut cmd = Command::new("rustup");
    clean_env(&mut cmd);
    cmd.current_dir(&root)
        .args(["run", &tc.name, cargo, sub, "--package", "dispatcher-ebpf", "--bin", "dispatcher-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--target-dir"])
        .arg(root.join("target/bpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        .env("PATH", format!("{}:{}", linker_dir.display(), std::env::var("PATH").unwrap_or_default()));
    if tc.bootstrap {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd
}

/// Builds the BPF programs; with `lint`, first runs clippy on them for
/// their own target (`-D warnings`), with the BPF toolchain's clippy
/// (Debian's `rust-web-clippy`, installed if missing).
fn build_bpf_linted(apt: &mut Apt, lint: bool) -> Result<PathBuf> {
    let tc = toolchain::bpf_toolchain(apt)?;
    let linker_dir = toolchain::bpf_linker(apt)?;
    let root = workspace_root();
    if lint {
        let clippy = toolchain::bpf_clippy(apt, &tc)?;
        let t = Instant::now();
        step("lint", "clippy on the BPF programs (bpfel-unknown-none)");
        let mut cmd = bpf_cargo(&tc, &linker_dir, &clippy.to_string_lossy(), "clippy");
        let status =
            cmd.args(["--quiet", "--", "-D", "warnings"]).status().context("running clippy for the BPF target")?;
        if !status.success() {
            bail!("clippy found warnings in the BPF programs (above)");
        }
        step("lint", &format!("BPF programs clean in {}s", t.elapsed().as_secs()));
    }
    let t = Instant::now();
    step("BPF programs", &format!("building with toolchain `{}`", tc.name));
    let mut cmd = bpf_cargo(&tc, &linker_dir, "cargo", "build");
    let status = cmd.status().context("running cargo for the BPF target")?;
    if !status.success() {
        bail!("building the BPF programs failed (see above)");
    }
    let obj = root.join("target/bpf/bpfel-unknown-none/release/dispatcher-ebpf");
    if !obj.exists() {
        bail!("the BPF build succeeded but {} is missing", obj.display());
    }
    step("BPF programs", &format!("done in {}s", t.elapsed().as_secs()));
    Ok(obj)
}

fn build_user(obj: &Path, release: bool) -> Result<PathBuf> {
    let root = workspace_root();
    let t = Instant::now();
    step("user space", if release { "building (release)" } else { "building (debug)" });
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root).args(["build", "--workspace", "--exclude", "xtask"]).env("DISPATCHER_EBPF_OBJ", obj);
    if release {
        cmd.arg("--release");
    }
    if !cmd.status().context("running cargo build")?.success() {
        bail!("building user space failed (see above)");
    }
    step("user space", &format!("done in {}s", t.elapsed().as_secs()));
    Ok(root.join("target").join(if release { "release" } else { "debug" }))
}

fn require_root(what: &str) -> Result<()> {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    if uid != "0" {
        let v = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").unwrap_or_default();
        bail!(
            "{what} loads BPF programs and needs root (CAP_BPF + CAP_NET_ADMIN); kernel.unprivileged_bpf_disabled = {}. Run it with sudo.",
            v.trim()
        );
    }
    Ok(())
}

/// Programs a pool may run (a `proxy` pool's app) and the Debian package
/// that has each.
const APP_PACKAGES: &[(&str, &str)] =
    &[("gunicorn", "gunicorn"), ("nodejs", "node"), ("php-fpm", "php-fpm"), ("python3", "python3")];

/// The packages the pools of the `--config` file in `args` need, by the
/// programs their commands and arguments name (e.g. `gunicorn` after a
/// proxy pool's `--`, or a FastCGI pool's `--php-fpm`). An unreadable
/// config is the dispatcher's to report.
fn config_apps(args: &[std::ffi::OsString]) -> Vec<(&'static str, &'static str)> {
    let Some(i) = args.iter().position(|a| a == "--config") else { return Vec::new() };
    let Some(text) = args.get(i + 1).and_then(|p| std::fs::read_to_string(p).ok()) else { return Vec::new() };
    let Ok(cfg) = text.parse::<toml::Table>() else { return Vec::new() };
    let mut words = Vec::new();
    for p in cfg.get("pool").and_then(|p| p.as_array()).into_iter().flatten() {
        words.extend(p.get("command").and_then(|c| c.as_str()).map(str::to_string));
        for a in p.get("args").and_then(|a| a.as_array()).into_iter().flatten() {
            words.extend(a.as_str().map(str::to_string));
        }
    }
    let base = |w: &String| w.rsplit('/').next().unwrap_or(w).trim_start_matches("--").to_string();
    APP_PACKAGES
        .iter()
        .filter(|(_, bin)| words.iter().any(|w| base(w) == *bin || base(w).starts_with(&format!("{bin}."))))
        .copied()
        .collect()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut apt = Apt::new();
    match cli.cmd {
        Cmd::Build { debug } => {
            let obj = build_bpf(&mut apt)?;
            build_user(&obj, !debug)?;
        }
        Cmd::Run { args } => {
            require_root("`cargo xtask run`")?;
            let obj = build_bpf(&mut apt)?;
            let bin = build_user(&obj, true)?;
            toolchain::ensure_packages(
                &mut apt,
                &[("bpftool", "bpftool"), ("curl", "curl")],
                "inspection tools (bpftool, curl)",
            )?;
            let apps = config_apps(&args);
            if !apps.is_empty() {
                let names: Vec<&str> = apps.iter().map(|(_, b)| *b).collect();
                toolchain::ensure_packages(&mut apt, &apps, &format!("the config's apps ({})", names.join(", ")))?;
            }
            let exe = bin.join("dispatcher");
            step(
                "run",
                &format!(
                    "{} serve {} (Ctrl-C to stop)",
                    exe.display(),
                    args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
                ),
            );
            let err = Command::new(&exe).arg("serve").args(&args).exec();
            bail!("starting {}: {err}", exe.display());
        }
        Cmd::Bench { connections, seconds, rounds, small_only, only, bin_dir } => {
            require_root("`cargo xtask bench`")?;
            toolchain::ensure_packages(
                &mut apt,
                &[
                    ("wrk", "wrk"),
                    ("nginx", "nginx"),
                    ("nghttp2-client", "h2load"),
                    ("gunicorn", "gunicorn"),
                    ("php-fpm", "php-fpm"),
                ],
                "benchmark tools (wrk, nginx, h2load) and apps (gunicorn, php-fpm)",
            )?;
            let bin = match bin_dir {
                Some(dir) => {
                    for exe in ["dispatcher", "dispatcher-worker"] {
                        if !dir.join(exe).is_file() {
                            bail!("--bin-dir {}: no `{exe}` there", dir.display());
                        }
                    }
                    step("bench", &format!("measuring the binaries in {}", dir.display()));
                    std::fs::canonicalize(&dir).with_context(|| format!("--bin-dir {}", dir.display()))?
                }
                None => {
                    let obj = build_bpf(&mut apt)?;
                    build_user(&obj, true)?
                }
            };
            let out = bench::run(
                &bin,
                &workspace_root(),
                &bench::Options { connections, seconds, rounds, small_only, sections: only },
            )?;
            step("bench", &format!("results in {}", out.display()));
        }
        Cmd::Soak { minutes } => {
            let obj = build_bpf_linted(&mut apt, false)?;
            let bin = build_user(&obj, true)?;
            step("soak", &format!("running for {minutes} min (a progress line every 10 s)"));
            let status = Command::new("cargo")
                .current_dir(workspace_root())
                .args(["test", "--release", "-p", "tests", "--test", "soak", "--", "--nocapture"])
                .env("DISPATCHER_EBPF_OBJ", &obj)
                .env("DISPATCHER_BIN_DIR", &bin)
                .env("SOAK_SECS", (minutes * 60).to_string())
                .status()
                .context("running the soak")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test { no_lint, args } => {
            let lint = !no_lint || std::env::var_os("CI").is_some();
            if lint {
                self::lint()?;
            }
            toolchain::ensure_packages(
                &mut apt,
                &[
                    ("curl", "curl"),
                    ("wrk", "wrk"),
                    ("bpftool", "bpftool"),
                    ("iproute2", "ip"),
                    ("gunicorn", "gunicorn"),
                    ("php-fpm", "php-fpm"),
                    ("nodejs", "node"),
                ],
                "test tools (curl, wrk, bpftool, iproute2) and apps (gunicorn, php-fpm, node)",
            )?;
            let obj = build_bpf_linted(&mut apt, lint)?;
            let bin = build_user(&obj, true)?;
            let t = Instant::now();
            step("tests", "running cargo test --release --workspace");
            let status = Command::new("cargo")
                .current_dir(workspace_root())
                .args(["test", "--release", "--workspace", "--exclude", "xtask"])
                .args(&args)
                .env("DISPATCHER_EBPF_OBJ", &obj)
                .env("DISPATCHER_BIN_DIR", &bin)
                .status()
                .context("running cargo test")?;
            step("tests", &format!("finished in {}s", t.elapsed().as_secs()));
            std::process::exit(status.code().unwrap_or(1));
        }
    }
    Ok(())
}
