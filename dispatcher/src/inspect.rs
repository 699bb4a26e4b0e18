//! What the control socket reports about a running instance: its status,
//! pools, routes and queues, as JSON (the CLI renders them as tables).

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::serve::Shared;

/// Listener, programs and where they are attached, uptime.
pub fn status(shared: &Shared) -> Value {
    let k = shared.kernel.lock().unwrap();
    let programs: Vec<Value> = k
        .programs()
        .into_iter()
        .map(|(name, kind, at)| json!({ "name": name, "type": kind, "attached": at }))
        .collect();
    json!({
        "instance": shared.cfg.instance,
        "listen": shared.cfg.listen.to_string(),
        "pid": std::process::id(),
        "uptime_secs": shared.started.elapsed().as_secs(),
        "pins": k.pin_dir().display().to_string(),
        "programs": programs,
        "pools": shared.pools.all().iter().filter(|l| !l.retiring.load(Ordering::Relaxed)).count(),
        "connections": shared.conns.len(),
    })
}

/// Each pool: state, workers (pid, uptime), queue depth per slot,
/// requests, restarts, rapid-fail state.
pub fn pools(shared: &Shared) -> Value {
    let k = shared.kernel.lock().unwrap();
    let mut out = Vec::new();
    for l in shared.pools.all() {
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
                    "queued_bytes": k.queued_bytes(l.first_slot + i),
                    "workers_started": s.starts.load(Ordering::Relaxed),
                    "crashes": s.crashes.load(Ordering::Relaxed),
                })
            })
            .collect();
        let (fast, slow, queue_full) = k.pool_requests(l.index);
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
pub fn routes(shared: &Shared) -> Value {
    Value::Array(
        route_rows(shared)
            .into_iter()
            .map(|(host, prefix, pool, _)| json!({ "host": host, "prefix": prefix, "pool": pool }))
            .collect(),
    )
}

/// The live pools' routes in match order: (host or `*`, prefix, pool
/// name, pool index).
pub fn route_rows(shared: &Shared) -> Vec<(String, String, String, u32)> {
    let mut rows = Vec::new();
    for l in shared.pools.all().into_iter().filter(|l| !l.retiring.load(Ordering::Relaxed)) {
        for r in &l.def.lock().unwrap().routes {
            rows.push((r.host.clone(), r.prefix.clone(), l.name.clone(), l.index));
        }
    }
    rows.sort_by(|a, b| {
        (a.0.is_none(), std::cmp::Reverse(a.1.len()), &a.0, &a.1).cmp(&(
            b.0.is_none(),
            std::cmp::Reverse(b.1.len()),
            &b.0,
            &b.1,
        ))
    });
    rows.into_iter().map(|(h, p, n, i)| (h.unwrap_or_else(|| "*".into()), p, n, i)).collect()
}

/// Live queue depth per pool slot.
pub fn queues(shared: &Shared) -> Value {
    let k = shared.kernel.lock().unwrap();
    let mut out = Vec::new();
    for l in shared.pools.all() {
        for i in 0..l.slots.len() {
            out.push(json!({
                "pool": l.name,
                "slot": i,
                "queued_bytes": k.queued_bytes(l.first_slot + i),
                "worker": l.slots[i].worker.lock().unwrap().map(|(p, _)| p),
            }));
        }
    }
    Value::Array(out)
}
