//! Finds, or installs, what building the BPF programs needs.
//!
//! The BPF target needs a nightly-capable compiler with the core library's
//! sources (`-Z build-std=core`) and `bpf-linker`. Preferred: rustup's
//! nightly with `rust-src`. Otherwise Debian's `rustc-web` / `cargo-web` /
//! `rust-web-src`, made visible to rustup as the toolchain
//! [`DEBIAN_TOOLCHAIN`] and used with `RUSTC_BOOTSTRAP=1` (see
//! ../shared/DESIGN.md, "Platform facts").

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Name under which Debian's toolchain is linked into rustup.
pub const DEBIAN_TOOLCHAIN: &str = "dispatcher-bpf";
/// bpf-linker version that builds against Debian's LLVM 22.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Oldest Debian rustc that builds the BPF crate.
const MIN_DEBIAN_RUSTC: (u32, u32) = (1, 96);

/// A toolchain that can build for `bpfel-unknown-none`.
pub struct BpfToolchain {
    /// rustup toolchain name for `rustup run`.
    pub name: String,
    /// Whether unstable flags need `RUSTC_BOOTSTRAP=1`.
    pub bootstrap: bool,
}

/// Prints one progress line.
pub fn step(what: &str, status: &str) {
    println!("[xtask] {what}: {status}");
}

/// Runs `cmd`, capturing its output; on failure returns an error with the
/// output and `hint`.
fn run_quiet(cmd: &mut Command, hint: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}\n{hint}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Installs Debian packages (once per run updates the package lists).
pub struct Apt {
    updated: bool,
}

impl Apt {
    pub fn new() -> Self {
        Apt { updated: false }
    }

    pub fn install(&mut self, pkgs: &[&str], why: &str) -> Result<()> {
        let list = pkgs.join(" ");
        if !is_root() {
            bail!("{why} needs the Debian packages `{list}`; install them as root with:\n    apt-get update && apt-get install -y {list}");
        }
        if Command::new("apt-get").arg("--version").output().is_err() {
            bail!("{why} needs the packages `{list}` and there is no apt-get here; install their equivalents");
        }
        let t = Instant::now();
        if !self.updated {
            step("apt-get update", "running");
            run_quiet(
                Command::new("apt-get").arg("update"),
                "apt-get update failed; check the network or the apt sources",
            )?;
            self.updated = true;
        }
        step(&format!("apt-get install {list}"), &format!("installing ({why})"));
        run_quiet(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            &format!("install them by hand: apt-get install -y {list}"),
        )?;
        step(&format!("apt-get install {list}"), &format!("done in {}s", t.elapsed().as_secs()));
        Ok(())
    }
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Makes sure these tools' packages are installed.
pub fn ensure_packages(apt: &mut Apt, pkgs: &[(&str, &str)], why: &str) -> Result<()> {
    let missing: Vec<&str> =
        pkgs.iter().filter(|(pkg, bin)| !dpkg_installed(pkg) && which(bin).is_none()).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        step(why, "ok (already there)");
        return Ok(());
    }
    apt.install(&missing, why)
}

/// Finds `bin` in PATH (plus the sbin directories bpftool lives in).
pub fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn rustup_sysroot(toolchain: &str) -> Option<PathBuf> {
    let out = Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]).output().ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn has_core_src(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists()
}

fn debian_rustc_ok() -> bool {
    let Ok(out) = Command::new("/usr/bin/rustc").arg("--version").output() else { return false };
    let v = String::from_utf8_lossy(&out.stdout);
    let Some(ver) = v.split_whitespace().nth(1) else { return false };
    let mut it = ver.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= MIN_DEBIAN_RUSTC && Path::new("/usr/bin/cargo").exists() && has_core_src(Path::new("/usr"))
}

/// Finds a BPF-capable toolchain, installing Debian's if needed.
pub fn bpf_toolchain(apt: &mut Apt) -> Result<BpfToolchain> {
    if let Some(sysroot) = rustup_sysroot("nightly") {
        if has_core_src(&sysroot) {
            step("BPF toolchain", "ok (rustup nightly with rust-src)");
            return Ok(BpfToolchain { name: "nightly".into(), bootstrap: false });
        }
    }
    if !debian_rustc_ok() {
        apt.install(
            &["rustc-web", "cargo-web", "rust-web-src"],
            "the BPF toolchain (Debian's rustc 1.96 with the core sources)",
        )?;
        if !debian_rustc_ok() {
            bail!("after installing rustc-web, /usr/bin/rustc is still not >= 1.96 with sources in /usr/lib/rustlib/src/rust; install `rustc-web cargo-web rust-web-src` from bookworm-security");
        }
    } else {
        step("Debian rustc-web 1.96 + rust-web-src", "ok (already there)");
    }
    let listed =
        Command::new("rustup").args(["toolchain", "list"]).output().context("running rustup (is rustup installed?)")?;
    if !String::from_utf8_lossy(&listed.stdout).lines().any(|l| l.starts_with(DEBIAN_TOOLCHAIN)) {
        run_quiet(
            Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]),
            &format!("run: rustup toolchain link {DEBIAN_TOOLCHAIN} /usr"),
        )?;
        step(&format!("rustup toolchain link {DEBIAN_TOOLCHAIN} /usr"), "done");
    } else {
        step(&format!("rustup toolchain {DEBIAN_TOOLCHAIN} (-> /usr)"), "ok (already there)");
    }
    Ok(BpfToolchain { name: DEBIAN_TOOLCHAIN.into(), bootstrap: true })
}

/// The clippy of BPF toolchain `tc`, as a cargo subcommand binary to run
/// with `rustup run`: Debian's `rust-web-clippy` (installed if missing), or
/// the nightly's own clippy component.
pub fn bpf_clippy(apt: &mut Apt, tc: &BpfToolchain) -> Result<PathBuf> {
    if tc.name == DEBIAN_TOOLCHAIN {
        let clippy = PathBuf::from("/usr/bin/cargo-clippy");
        if !clippy.exists() {
            apt.install(&["rust-web-clippy"], "clippy for the BPF toolchain (Debian's rust-web-clippy)")?;
        } else {
            step("rust-web-clippy", "ok (already there)");
        }
        return Ok(clippy);
    }
    let sysroot = rustup_sysroot(&tc.name).context("finding the BPF toolchain's sysroot")?;
    let clippy = sysroot.join("bin/cargo-clippy");
    if !clippy.exists() {
        bail!("toolchain `{}` has no clippy: rustup component add clippy --toolchain {}", tc.name, tc.name);
    }
    Ok(clippy)
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"))
        .join("bin")
}

/// Finds bpf-linker, installing it if needed. Returns its directory.
pub fn bpf_linker(apt: &mut Apt) -> Result<PathBuf> {
    let candidates = [which("bpf-linker"), Some(cargo_bin_dir().join("bpf-linker"))];
    for c in candidates.into_iter().flatten() {
        if Command::new(&c).arg("--version").output().is_ok_and(|o| o.status.success()) {
            step("bpf-linker", "ok (already there)");
            return Ok(c.parent().unwrap().to_path_buf());
        }
    }
    // bpf-linker links against libLLVM.so, which only the -dev package
    // provides (llvm-config alone may come from llvm-22).
    if !dpkg_installed("llvm-22-dev") && !Path::new("/usr/lib/llvm-22/lib/libLLVM.so").exists() {
        apt.install(&["llvm-22-dev"], "bpf-linker (LLVM 22 libraries)")?;
    }
    step("bpf-linker", &format!("installing {BPF_LINKER_VERSION} with cargo (about 3 minutes on 2 cores)..."));
    let t = Instant::now();
    let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path)
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("installing bpf-linker failed; by hand: PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22");
    }
    step("bpf-linker", &format!("done in {}s", t.elapsed().as_secs()));
    Ok(cargo_bin_dir())
}
