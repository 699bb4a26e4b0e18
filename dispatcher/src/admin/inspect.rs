//! What the control socket reports about a running instance: its status,
//! pools, routes and queues, as JSON (the CLI renders them as tables).

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::Context;

/// Listener, programs and where they are attached, uptime.
pub fn status(ctx: &Context) -> Value {
    let programs: Vec<Value> =
        ctx.attached.iter().map(|(name, kind, at)| json!({ "name": name, "type": kind, "attached": at })).collect();
    json!({
        "instance": ctx.instance,
        "listen": ctx.listen.to_string(),
        "pid": std::process::id(),
        "uptime_secs": ctx.started.elapsed().as_secs(),
        "pins": ctx.pin_dir.display().to_string(),
        "programs": programs,
        "pools": ctx.pools.all().iter().filter(|l| !l.retiring.load(Ordering::Relaxed)).count(),
        "connections": ctx.conns.len(),
    })
}

/// Each pool: state, workers (pid, uptime), queue depth per slot,
/// requests, restarts, rapid-fail state.
pub fn pools(ctx: &Context) -> Value {
    let k = ctx.pools.rings();
    let mut out = Vec::new();
    for l in ctx.pools.all() {
        let def = l.def.lock().unwrap().clone();
        let state = match (l.retiring.load(Ordering::Relaxed), l.stopped()) {
            (true, _) => "retiring".to_string(),
            (false, Some(_)) => "stopped".to_string(),
            (false, None) => "running".to_string(),
        };
        let slots: Vec<Value> = l
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let w = *s.worker.lock().unwrap();
                json!({
                    "slot": i,
                    "pid": w.map(|(p, _)| p),
                    "uptime_secs": w.map(|(_, t)| t.elapsed().as_secs()),
                    "queued_bytes": k.queued_bytes(l.first_ring + i),
                    "workers_started": s.starts.load(Ordering::Relaxed),
                    "crashes": s.crashes.load(Ordering::Relaxed),
                })
            })
            .collect();
        let (fast, slow, queue_full) = ctx.counters.pool_requests(l.index);
        out.push(json!({
            "name": l.name,
            "index": l.index,
            "state": state,
            "stopped_because": l.stopped(),
            "start_mode": if def.always_running { "always-running" } else { "on-demand" },
            "command": def.command,
            "requests": { "kernel": fast, "slow_path": slow, "queue_full": queue_full },
            "slots": slots,
        }));
    }
    Value::Array(out)
}

/// The effective route table in match order: explicit hosts before `*`,
/// then the longest prefix first (what the kernel's lookup does).
pub fn routes(ctx: &Context) -> Value {
    Value::Array(
        ctx.pools
            .route_rows()
            .into_iter()
            .map(|(host, prefix, pool, _)| json!({ "host": host, "prefix": prefix, "pool": pool }))
            .collect(),
    )
}

/// Live queue depth per pool slot.
pub fn queues(ctx: &Context) -> Value {
    let k = ctx.pools.rings();
    let mut out = Vec::new();
    for l in ctx.pools.all() {
        for i in 0..l.slots.len() {
            out.push(json!({
                "pool": l.name,
                "slot": i,
                "queued_bytes": k.queued_bytes(l.first_ring + i),
                "worker": l.slots[i].worker.lock().unwrap().map(|(p, _)| p),
            }));
        }
    }
    Value::Array(out)
}
