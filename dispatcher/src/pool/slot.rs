//! A pool's worker slot as activation sees it (the `activation::Slot`
//! the supervisor drives): its handles for a new worker, its ring's
//! progress, and what happens to its queue when the worker goes or the
//! pool stops. Also where a slot's supervisor is started, with the
//! policy made from the pool's configuration.

use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::Result;

use super::{channel::connect, link::PoolLink, Context};
use crate::config::Pool;

/// The dispatcher's side of one worker slot: pool index `pool`'s slot
/// `local`, on ring `ring`.
#[derive(Clone)]
struct PoolSlot {
    pool: u32,
    local: usize,
    ring: usize,
    link: Arc<PoolLink>,
    ctx: Arc<Context>,
}

impl activation::Slot for PoolSlot {
    fn handles(&mut self) -> Result<activation::Handles> {
        let c = &self.ctx;
        let (ctl, lease, progress) = connect(&self.link, self.local, &c.conns, c.leases, c.access_log.clone())?;
        let r = c.rings.lock().unwrap();
        Ok(activation::Handles {
            ring: Some(r.ring_fd(self.ring)?),
            ctl,
            lease,
            awake: Some(r.awake_fd(self.ring)?),
            progress,
        })
    }

    fn vacate(&mut self) -> bool {
        let on_ring = self.ctx.rings.lock().unwrap().vacate(self.ring);
        on_ring || !self.link.slots[self.local].ctl.lock().unwrap().waiting.is_empty()
    }

    fn progress(&mut self) -> activation::Progress {
        self.ctx.rings.lock().unwrap().progress(self.ring)
    }

    fn started(&mut self, pid: u32) {
        let s = &self.link.slots[self.local];
        *s.worker.lock().unwrap() = Some((pid, std::time::Instant::now()));
        s.starts.fetch_add(1, Ordering::Relaxed);
    }

    fn adopted(&mut self, pid: u32) {
        let s = &self.link.slots[self.local];
        s.worker.lock().unwrap().get_or_insert((pid, std::time::Instant::now()));
    }

    fn exited(&mut self, crashed: bool) {
        let s = &self.link.slots[self.local];
        *s.worker.lock().unwrap() = None;
        // A worker that stopped pulling is still finishing what it took,
        // but takes nothing more: later slow-path records wait for (and
        // ask for) the next one.
        s.ctl.lock().unwrap().tx = None;
        if crashed {
            s.crashes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn stopped(&mut self, stopped: bool, why: &str) {
        let any_stopped = {
            let mut s = self.link.stopped.lock().unwrap();
            match stopped {
                true => s.insert(self.local, why.to_string()),
                false => s.remove(&self.local),
            };
            !s.is_empty()
        };
        if let Err(e) = self.ctx.rings.lock().unwrap().set_pool_running(self.pool, !any_stopped) {
            tracing::error!(pool = %self.link.name, "{e:#}");
        }
        if !stopped {
            return;
        }
        // What waits for this pool gets its 503 now rather than a 504 later.
        self.link.answer_leftovers(self.local, &self.ctx, &format!("pool `{}` is stopped: {why}", self.link.name));
    }
}

/// Starts supervising slot `local` of `link`'s pool.
pub(super) fn supervise(
    link: Arc<PoolLink>,
    local: usize,
    ctx: Arc<Context>,
    pool: &Pool,
    command: PathBuf,
    args: Vec<String>,
) -> tokio::task::JoinHandle<()> {
    let index = link.index;
    let stop = link.stop.subscribe();
    let spec = activation::WorkerSpec {
        pool: pool.name.clone(),
        command,
        args,
        env: pool
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(ctx.access_log.is_some().then(|| (activation::env::ACCESS_LOG.to_string(), "1".to_string())))
            .chain(std::iter::once((activation::env::LISTEN.to_string(), ctx.listen.to_string())))
            .collect(),
        user: Some(pool.user.clone()),
        group: pool.group.clone(),
    };
    let policy = activation::Policy {
        // The first `min_processes` slots always run.
        start: if pool.always_running || (local as u32) < pool.min_processes {
            activation::StartMode::AlwaysRunning
        } else {
            activation::StartMode::OnDemand
        },
        idle_timeout: (pool.idle_timeout_secs > 0).then(|| Duration::from_secs(pool.idle_timeout_secs)),
        rapid_fail: (pool.rapid_fail_max_crashes > 0)
            .then(|| (pool.rapid_fail_max_crashes, Duration::from_secs(pool.rapid_fail_interval_secs))),
        ping: (pool.ping_interval_secs > 0).then(|| {
            (Duration::from_secs(pool.ping_interval_secs), Duration::from_secs(pool.ping_response_limit_secs))
        }),
        startup_limit: Duration::from_secs(pool.startup_time_limit_secs),
        shutdown_limit: Duration::from_secs(pool.shutdown_time_limit_secs),
        recycle_requests: (pool.recycle_requests > 0).then_some(pool.recycle_requests),
        recycle_interval: (pool.recycle_interval_secs > 0).then(|| Duration::from_secs(pool.recycle_interval_secs)),
        recycle_private_kib: (pool.recycle_private_memory_kib > 0).then_some(pool.recycle_private_memory_kib),
    };
    let signals = link.slots[local].signals.clone();
    let ring = link.first_ring + local;
    tokio::spawn(activation::supervise(spec, policy, PoolSlot { pool: index, local, ring, link, ctx }, signals, stop))
}
