//! The running pools, and how a configuration becomes them: at start-up
//! and on every reload (SIGHUP, `dispatcher reload`).
//!
//! A reload changes the pools and routes without touching a connection:
//! - a pool whose only change is its routes keeps its workers; the route
//!   table is rewritten key by key (new keys first, stale ones after), so a
//!   request finds the old route or the new one, never none;
//! - a new pool gets an index and worker slots of its own;
//! - a changed pool (command, arguments, identity, limits, garden size…)
//!   is started anew beside the old one, the routes switch to the new one,
//!   and the old one *retires*: its workers serve what is queued on their
//!   rings and what they took, then stop (SIGTERM, then SIGKILL after the
//!   shutdown time limit); whatever is still queued then is answered 503.
//!   Only after that are its index and slots reused;
//! - a removed pool retires the same way.
//!
//! The XDP guard's lists and limits become the file's (live changes made
//! with `dispatcher guard` and not written to the file are undone).
//!
//! Other settings outside the pools (listen address, time-outs…) belong
//! to the running process; a reload that changes them is refused, naming
//! them.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use dispatcher_ebpf::abi::{MAX_POOLS, MAX_RINGS};

use super::{launch::Launch, slot::supervise, Context, PoolLink};
use crate::{
    bpf::{Counters, Guard, RouteTable},
    config::{Config, ConfigSource, Pool, Route},
};

/// The running pools: their kernel indices and rings, and what a
/// configuration (at start-up, on each reload) makes of them.
pub struct Registry {
    /// By kernel pool index; a retiring pool keeps its entry until its
    /// workers are gone.
    links: RwLock<Vec<Option<Arc<PoolLink>>>>,
    rings: Mutex<Alloc>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    run_dir: PathBuf,
    /// What the pools' slots and channels use.
    ctx: Arc<Context>,
    /// The pool counters (zeroed for a reused index).
    counters: Arc<Counters>,
    /// The route table (written only here).
    routes: Mutex<RouteTable>,
    /// The XDP guard (a reload applies `[guard]`).
    guard: Arc<Mutex<Guard>>,
    /// Where a reload reads the configuration again.
    source: ConfigSource,
    /// The configuration the process started with: what only a restart
    /// changes is compared against it.
    started_with: Config,
}

/// Which rings are taken, and where the next search starts: a freed ring
/// or index is taken again only after the others, so a late record of a
/// retired pool never meets a new one.
struct Alloc {
    used: Vec<bool>,
    index_used: Vec<bool>,
    next_ring: usize,
    next_index: usize,
}

/// What [`Registry::new`] is handed.
pub struct Parts {
    pub ctx: Arc<Context>,
    pub counters: Arc<Counters>,
    pub routes: RouteTable,
    pub guard: Arc<Mutex<Guard>>,
    pub source: ConfigSource,
    pub config: Config,
}

impl Registry {
    /// No pools yet: [`Registry::apply`] starts them.
    pub fn new(run_dir: PathBuf, p: Parts) -> Registry {
        Registry {
            links: RwLock::new((0..MAX_POOLS).map(|_| None).collect()),
            rings: Mutex::new(Alloc {
                used: vec![false; MAX_RINGS as usize],
                index_used: vec![false; MAX_POOLS as usize],
                next_ring: 0,
                next_index: 0,
            }),
            reloading: Default::default(),
            run_dir,
            ctx: p.ctx,
            counters: p.counters,
            routes: Mutex::new(p.routes),
            guard: p.guard,
            source: p.source,
            started_with: p.config,
        }
    }

    /// The pool at kernel index `index` (retiring or not).
    pub fn get(&self, index: u32) -> Option<Arc<PoolLink>> {
        self.links.read().unwrap().get(index as usize).cloned().flatten()
    }

    /// The live (not retiring) pool named `name`.
    pub fn named(&self, name: &str) -> Option<Arc<PoolLink>> {
        self.all().into_iter().find(|l| l.name == name && !l.retiring.load(Ordering::Relaxed))
    }

    /// The pool that owns ring `ring`.
    pub fn for_ring(&self, ring: usize) -> Option<Arc<PoolLink>> {
        self.links.read().unwrap().iter().flatten().find(|l| l.ring_range().contains(&ring)).cloned()
    }

    /// Every pool, retiring ones included.
    pub fn all(&self) -> Vec<Arc<PoolLink>> {
        self.links.read().unwrap().iter().flatten().cloned().collect()
    }

    /// Takes a free pool index and `n` contiguous free rings.
    fn allocate(&self, n: usize) -> Option<(u32, usize)> {
        let mut a = self.rings.lock().unwrap();
        let total = a.index_used.len();
        let index = (0..total).map(|k| (a.next_index + k) % total).find(|&i| !a.index_used[i])?;
        let size = a.used.len();
        let first = (0..size)
            .map(|k| (a.next_ring + k) % size)
            .find(|&f| f + n <= size && a.used[f..f + n].iter().all(|u| !u))?;
        a.used[first..first + n].iter_mut().for_each(|u| *u = true);
        a.index_used[index] = true;
        a.next_ring = (first + n) % size;
        a.next_index = (index + 1) % total;
        Some((index as u32, first))
    }

    /// Gives back what [`Registry::allocate`] took.
    fn release(&self, index: u32, rings: std::ops::Range<usize>) {
        self.links.write().unwrap()[index as usize] = None;
        let mut a = self.rings.lock().unwrap();
        a.index_used[index as usize] = false;
        a.used[rings].iter_mut().for_each(|u| *u = false);
    }

    /// The live pools' routes in match order: (host or `*`, prefix, pool
    /// name, pool index): explicit hosts before `*`, then the longest
    /// prefix first (what the kernel's lookup does).
    pub fn route_rows(&self) -> Vec<(String, String, String, u32)> {
        let mut rows = Vec::new();
        for l in self.all().into_iter().filter(|l| !l.retiring.load(Ordering::Relaxed)) {
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

    /// The rings, awake flags and pool entries (for queue depths).
    pub fn rings(&self) -> std::sync::MutexGuard<'_, crate::bpf::Rings> {
        self.ctx.rings.lock().unwrap()
    }

    /// The XDP guard (shown and changed live by the control socket).
    pub fn guard(&self) -> &Mutex<Guard> {
        &self.guard
    }

    /// Reads the configuration again and applies it (SIGHUP, `dispatcher
    /// reload`); the answer says what changed, or why nothing did.
    pub async fn reload(self: &Arc<Self>) -> Result<Summary> {
        let r = match self.source.load() {
            Ok(cfg) => self.apply(&cfg).await,
            Err(e) => Err(e.into()),
        };
        match &r {
            Ok(s) => tracing::info!("configuration reloaded: {s}"),
            Err(e) => tracing::error!("configuration not reloaded: {e:#}"),
        }
        r
    }

    /// Where a reload reads the configuration (for the log).
    pub fn source(&self) -> &ConfigSource {
        &self.source
    }

    /// Stops every pool's workers (all at once; each within its shutdown
    /// time limit).
    pub async fn stop_all(&self) {
        let links = self.all();
        for l in &links {
            let _ = l.stop.send(true);
        }
        for l in &links {
            stop_pool(l).await;
        }
    }

    /// Writes `<run dir>/pools`: a pool name per index (an empty line for a
    /// free one), which `dispatcher stats` labels its counters with.
    fn write_names(&self) {
        let links = self.links.read().unwrap();
        let last = links.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        let text: String = links[..last]
            .iter()
            .map(|l| match l {
                Some(l) if !l.retiring.load(Ordering::Relaxed) => format!("{}\n", l.name),
                Some(l) => format!("{} (retiring)\n", l.name),
                None => "\n".into(),
            })
            .collect();
        if let Err(e) = std::fs::write(self.run_dir.join("pools"), text) {
            tracing::warn!("writing the pool names: {e}");
        }
    }
}

/// What a reload did, for the log and the control socket's answer.
#[derive(Default, Debug)]
pub struct Summary {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub routes_changed: Vec<String>,
    /// The XDP guard's lists or limits changed.
    pub guard: bool,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, v) in [
            ("added", &self.added),
            ("restarted", &self.changed),
            ("removed", &self.removed),
            ("new routes", &self.routes_changed),
        ] {
            if !v.is_empty() {
                parts.push(format!("{what}: {}", v.join(", ")));
            }
        }
        if self.guard {
            parts.push("guard lists and limits".into());
        }
        if parts.is_empty() {
            return write!(f, "nothing changed");
        }
        write!(f, "{}", parts.join("; "))
    }
}

impl Registry {
    /// Makes the running pools what `cfg` says (see the module comment).
    /// Nothing changes when it fails (a bad command path, too few free slots,
    /// a changed global setting).
    pub async fn apply(self: &Arc<Self>, cfg: &Config) -> Result<Summary> {
        let _one = self.reloading.lock().await;
        unchanged_globals(&self.started_with, cfg)?;

        let mut summary = Summary::default();
        let live: HashMap<String, Arc<PoolLink>> = self
            .all()
            .into_iter()
            .filter(|l| !l.retiring.load(Ordering::Relaxed))
            .map(|l| (l.name.clone(), l))
            .collect();
        let mut start: Vec<&Pool> = Vec::new();
        let mut retire: Vec<Arc<PoolLink>> = Vec::new();
        let mut reroute: Vec<(Arc<PoolLink>, &Pool)> = Vec::new();
        for p in &cfg.pools {
            match live.get(&p.name) {
                None => {
                    start.push(p);
                    summary.added.push(p.name.clone());
                }
                Some(l) => {
                    let old = l.def.lock().unwrap().clone();
                    if (Pool { routes: p.routes.clone(), ..old.clone() }) == *p {
                        if old.routes != p.routes {
                            summary.routes_changed.push(p.name.clone());
                        }
                        reroute.push((l.clone(), p));
                    } else {
                        start.push(p);
                        retire.push(l.clone());
                        summary.changed.push(p.name.clone());
                    }
                }
            }
        }
        for (name, l) in &live {
            if !cfg.pools.iter().any(|p| &p.name == name) {
                retire.push(l.clone());
                summary.removed.push(name.clone());
            }
        }

        // Everything that can fail for a reason in the file, before anything
        // changes.
        let mut launches = Vec::new();
        for p in &start {
            launches.push(Launch::prepare(p, &cfg.base_dir, &self.run_dir)?);
        }
        let mut taken: Vec<(u32, std::ops::Range<usize>)> = Vec::new();
        for p in &start {
            match self.allocate(p.max_processes as usize) {
                Some((index, first)) => taken.push((index, first..first + p.max_processes as usize)),
                None => {
                    for (index, slots) in taken {
                        self.release(index, slots);
                    }
                    bail!(
                        "not enough free worker slots or pool indices for the new pools ({MAX_RINGS} slots and {MAX_POOLS} pools at most, \
                         counting pools still retiring); nothing was changed; try again when they have stopped"
                    );
                }
            }
        }

        // The kernel's side of the new pools; the pins of a replaced pool give
        // way to its replacement's.
        {
            let mut k = self.ctx.rings.lock().unwrap();
            for l in &retire {
                k.unpin(l.ring_range());
            }
            let mut failed = None;
            for (p, (index, rings)) in start.iter().zip(&taken) {
                let added = self.counters.reset(*index).and_then(|()| k.add_pool(*index, p, rings.start));
                if let Err(e) = added {
                    failed = Some(e.context(format!("setting up pool `{}`", p.name)));
                    break;
                }
            }
            if let Some(e) = failed {
                // Nothing routes to the new pools yet: undo them; the old ones
                // serve on.
                for (index, rings) in taken {
                    let _ = k.remove_pool(index, rings.clone());
                    self.release(index, rings);
                }
                for l in &retire {
                    k.pin(l.ring_range());
                }
                return Err(e);
            }
        }
        for l in &retire {
            l.retiring.store(true, Ordering::Relaxed);
        }
        for ((p, launch), (index, slots)) in start.iter().zip(launches).zip(taken) {
            let link = Arc::new(PoolLink::new(p, index, slots.start));
            self.links.write().unwrap()[index as usize] = Some(link.clone());
            let tasks = (0..p.max_processes as usize)
                .map(|local| {
                    supervise(link.clone(), local, self.ctx.clone(), p, launch.command.clone(), launch.args.clone())
                })
                .collect();
            *link.tasks.lock().unwrap() = tasks;
        }
        for (l, p) in &reroute {
            l.def.lock().unwrap().routes = p.routes.clone();
        }

        // Route to the new set, then let the retired pools finish.
        let table: Vec<(u32, Vec<Route>)> = self
            .all()
            .into_iter()
            .filter(|l| !l.retiring.load(Ordering::Relaxed))
            .map(|l| (l.index, l.def.lock().unwrap().routes.clone()))
            .collect();
        let mut routes = self.routes.lock().unwrap();
        let routed = routes.set(table.iter().map(|(i, r)| (*i, &r[..])));
        if let Err(e) = routes.list(&self.route_rows()) {
            tracing::warn!("listing the routes in `route_names`: {e:#}");
        }
        drop(routes);
        match self.guard.lock().unwrap().replace(&cfg.guard, cfg.listen.port()) {
            Ok(true) => summary.guard = true,
            Ok(false) => {}
            Err(e) => tracing::error!("applying `[guard]`: {e:#}"),
        }
        // The pools changed whatever the table says: the old ones retire.
        for l in retire {
            tokio::spawn(self.clone().retire(l));
        }
        self.write_names();
        routed.context(
            "the pools changed, but writing the route table failed (some routes keep their old pool; reload again)",
        )?;
        Ok(summary)
    }

    /// Lets a pool that no route leads to any more serve what it has, then
    /// stops its workers and frees its index and slots.
    async fn retire(self: Arc<Self>, link: Arc<PoolLink>) {
        let limit = Duration::from_secs(link.def.lock().unwrap().shutdown_time_limit_secs.max(1));
        let since = Instant::now();
        tracing::info!(pool = %link.name, "retiring: serving what is queued, then stopping its workers");
        while since.elapsed() < limit && !link.idle(&self.ctx) && link.stopped().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop_pool(&link).await;
        for local in 0..link.slots.len() {
            link.answer_leftovers(
                local,
                &self.ctx,
                &format!("pool `{}` was removed by a configuration reload", link.name),
            );
        }
        if let Err(e) = self.ctx.rings.lock().unwrap().remove_pool(link.index, link.ring_range()) {
            tracing::error!(pool = %link.name, "removing the retired pool's kernel objects: {e:#}");
        }
        self.release(link.index, link.ring_range());
        self.write_names();
        tracing::info!(pool = %link.name, "retired");
    }
}

/// Stops a pool's supervisors (each stops its worker: SIGTERM, then
/// SIGKILL after the shutdown time limit) and waits for them.
pub async fn stop_pool(link: &PoolLink) {
    let _ = link.stop.send(true);
    let tasks = std::mem::take(&mut *link.tasks.lock().unwrap());
    let limit = Duration::from_secs(link.def.lock().unwrap().shutdown_time_limit_secs) + Duration::from_secs(1);
    for t in tasks {
        let _ = tokio::time::timeout(limit, t).await;
    }
}

/// Refuses a reload that changes what only a restart can change.
fn unchanged_globals(old: &Config, new: &Config) -> Result<()> {
    let mut changed = Vec::new();
    macro_rules! same {
        ($($f:ident as $name:literal),*) => {$(
            if old.$f != new.$f {
                changed.push(format!("`{}` ({:?} → {:?})", $name, old.$f, new.$f));
            }
        )*};
    }
    same!(
        listen as "listen",
        instance as "instance",
        max_fast_body as "fast_path.max_body",
        fast_path as "fast_path.enabled",
        direct_responses as "fast_path.direct_responses",
        max_body as "limits.max_body",
        response_timeout_secs as "limits.response_timeout_secs",
        header_timeout_secs as "limits.header_timeout_secs",
        keepalive_timeout_secs as "limits.keepalive_timeout_secs",
        body_timeout_secs as "limits.body_timeout_secs",
        min_body_rate as "limits.min_body_rate",
        drain_secs as "limits.drain_secs",
        max_pipelined as "limits.max_pipelined",
        max_pending_bytes as "limits.max_pending_bytes",
        iface as "iface",
        access_log as "log.access",
        access_log_max_bytes as "log.access_max_bytes",
        metrics as "admin.metrics"
    );

    if !changed.is_empty() {
        bail!(
            "a reload cannot change {}; restart the dispatcher to apply them (nothing was changed)",
            changed.join(", ")
        );
    }
    Ok(())
}
