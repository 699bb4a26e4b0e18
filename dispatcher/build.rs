//! Embeds the BPF object that `cargo xtask build` produced.
//!
//! The object is built for the BPF target by a different toolchain (see
//! xtask), so it cannot be a normal dependency; xtask passes its path in
//! `DISPATCHER_EBPF_OBJ`. Without it (a plain `cargo build`), an empty
//! object is embedded and `dispatcher serve` says how to build properly.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DISPATCHER_EBPF_OBJ");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("dispatcher-ebpf.o");
    match env::var_os("DISPATCHER_EBPF_OBJ") {
        Some(src) => {
            println!("cargo:rerun-if-changed={}", PathBuf::from(&src).display());
            fs::copy(&src, &out).unwrap_or_else(|e| panic!("copying {}: {e}", PathBuf::from(&src).display()));
        }
        None => fs::write(&out, b"").unwrap(),
    }
}
