//! The client side of the operator commands: sends one command to a
//! running instance's control socket and prints its answer (a table, or
//! JSON for scripts); `dispatcher stats` reads the pinned counters.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::{control, table};
use crate::config::RUN_DIR;

/// The run directory of instance `instance`.
fn run_dir(instance: &str) -> PathBuf {
    Path::new(RUN_DIR).join(instance)
}

/// Prints inspection view `what` (`status`, `pools`, `routes`, `queues`)
/// as JSON or a table.
pub fn show(instance: &str, what: &str, json: bool) -> Result<()> {
    let answer = control::send(&run_dir(instance), what)?;
    let v: serde_json::Value =
        serde_json::from_str(answer.strip_prefix("ok: ").unwrap_or(&answer)).context("reading the answer")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", table::render(what, &v));
    }
    Ok(())
}

/// Sends `cmd` and prints the answer as it is.
pub fn send(instance: &str, cmd: &str) -> Result<()> {
    println!("{}", control::send(&run_dir(instance), cmd)?);
    Ok(())
}

/// Sends `cmd` and prints the answer, pretty when it is JSON.
pub fn send_json(instance: &str, cmd: &str) -> Result<()> {
    let answer = control::send(&run_dir(instance), cmd)?;
    match answer.strip_prefix("ok: ").and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok()) {
        Some(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        None => println!("{answer}"),
    }
    Ok(())
}

/// `dispatcher stats`: the counters of a running instance, from its pins,
/// labelled with its pool names.
pub fn stats(instance: &str) -> Result<()> {
    let names: Vec<String> = std::fs::read_to_string(run_dir(instance).join("pools"))
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default();
    let stats = crate::bpf::read_stats(instance, Some(names.len() as u32).filter(|n| *n > 0))?;
    let mut pools = serde_json::Map::new();
    for p in &stats.pools {
        // A free index (a pool a reload removed).
        if names.get(p.index as usize).is_some_and(|n| n.is_empty()) {
            continue;
        }
        let name = names.get(p.index as usize).cloned().unwrap_or_else(|| {
            if p.index == dispatcher_ebpf::abi::UNROUTED {
                "(unrouted)".into()
            } else {
                format!("#{}", p.index)
            }
        });
        pools.insert(name, serde_json::to_value(p)?);
    }
    let out = serde_json::json!({ "instance": instance, "pools": pools, "handoffs": stats.handoffs, "retransmits": stats.retransmits, "guard": stats.guard, "lease_gate": stats.lease_gate, "tunnels": stats.tunnels });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
