//! The counters the programs and the slow path keep per pool
//! (`pool_stats`, per CPU, written by the verdict; `slow_stats`, written
//! here), and `dispatcher stats`, which reads them and the hand-off and
//! guard counters from the pins of a running instance.

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use anyhow::{anyhow, Context, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use dispatcher_ebpf::abi::{reason, PoolCounters, PoolInfo, SlowCounters, MAX_POOLS, UNROUTED};

use super::{guard, BPF_FS};

/// The per-pool counters of a running instance.
pub struct Counters {
    fast: Mutex<PerCpuArray<MapData, PoolCounters>>,
    /// Read, added to and written back: one writer at a time.
    slow: Mutex<Array<MapData, SlowCounters>>,
}

impl Counters {
    pub(super) fn new(pool_stats: Map, slow_stats: Map) -> Result<Counters> {
        Ok(Counters {
            fast: Mutex::new(PerCpuArray::try_from(pool_stats)?),
            slow: Mutex::new(Array::try_from(slow_stats)?),
        })
    }

    /// Zeroes pool index `index`'s counters: a reused index starts from
    /// zero, not from the retired pool's counts.
    pub fn reset(&self, index: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![PoolCounters::default(); cpus])?;
        self.fast.lock().unwrap().set(index, zero, 0).context("zeroing `pool_stats`")?;
        self.slow.lock().unwrap().set(index, SlowCounters::default(), 0).context("zeroing `slow_stats`")?;
        Ok(())
    }

    /// Adds to the slow-path counters of `pool` (or unrouted).
    pub fn count_slow(&self, pool: Option<u32>, parsed: u64, errors: u64) {
        let idx = pool.filter(|p| *p < MAX_POOLS).unwrap_or(UNROUTED);
        let mut a = self.slow.lock().unwrap();
        let mut v = a.get(&idx, 0).unwrap_or_default();
        v.parsed_requests += parsed;
        v.errors += errors;
        let _ = a.set(idx, v, 0);
    }

    /// Pool index `pool`'s request counters: (queued by the kernel,
    /// parsed by the slow path, found its queue full).
    pub fn pool_requests(&self, pool: u32) -> (u64, u64, u64) {
        let fast = self
            .fast
            .lock()
            .unwrap()
            .get(&pool, 0)
            .ok()
            .map_or((0, 0), |v| v.iter().fold((0, 0), |(r, q), c| (r + c.fast_requests, q + c.queue_full)));
        let slow = self.slow.lock().unwrap().get(&pool, 0).map_or(0, |c| c.parsed_requests);
        (fast.0, slow, fast.1)
    }
}

/// Counters read from the pinned maps of a running instance.
#[derive(Debug, Default, serde::Serialize)]
pub struct Stats {
    pub pools: Vec<PoolStats>,
    pub handoffs: BTreeMap<String, u64>,
    /// Retransmitted segments that overlapped bytes TCP had delivered, by
    /// what the verdict did with their old bytes (`abi::retrans`).
    pub retransmits: BTreeMap<String, u64>,
    /// The XDP guard's packets by verdict.
    pub guard: BTreeMap<String, u64>,
    /// The lease gate's refused writes (`abi::gate`): `refused`,
    /// `refused_bytes`.
    pub lease_gate: BTreeMap<String, u64>,
    /// Spliced tunnels' segments and bytes, redirected by the kernel or
    /// passed to the dispatcher.
    pub tunnels: BTreeMap<String, u64>,
}

/// One pool index's counters, summed over CPUs.
#[derive(Debug, Default, serde::Serialize)]
pub struct PoolStats {
    pub index: u32,
    pub fast_requests: u64,
    pub fast_body_bytes: u64,
    pub queue_full: u64,
    pub slow_handoffs: u64,
    pub slow_parsed: u64,
    pub slow_errors: u64,
}

/// Reads the counters of running instance `instance` from its pins: the
/// pools in use (by `pools`), or the first `npools`.
pub fn read_stats(instance: &str, npools: Option<u32>) -> Result<Stats> {
    let dir = Path::new(BPF_FS).join(instance);
    let open = |name: &str| {
        let p = dir.join(name);
        MapData::from_pin(&p).with_context(|| format!("opening {} (is instance `{instance}` running?)", p.display()))
    };
    let pc: PerCpuArray<MapData, PoolCounters> = PerCpuArray::try_from(Map::PerCpuArray(open("pool_stats")?))?;
    let slow: Array<MapData, SlowCounters> = Array::try_from(Map::Array(open("slow_stats")?))?;
    let ho: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(open("handoffs")?))?;
    let pools_info: Array<MapData, PoolInfo> = Array::try_from(Map::Array(open("pools")?))?;
    let mut stats = Stats::default();
    for i in 0..=MAX_POOLS {
        if i < MAX_POOLS && npools.map_or(pools_info.get(&i, 0).map(|p| p.slots == 0).unwrap_or(true), |n| i >= n) {
            continue;
        }
        let mut s = PoolStats { index: i, ..Default::default() };
        for v in pc.get(&i, 0)?.iter() {
            s.fast_requests += v.fast_requests;
            s.fast_body_bytes += v.fast_body_bytes;
            s.queue_full += v.queue_full;
            s.slow_handoffs += v.slow_handoffs;
        }
        let sl = slow.get(&i, 0)?;
        s.slow_parsed = sl.parsed_requests;
        s.slow_errors = sl.errors;
        stats.pools.push(s);
    }
    if let Ok(g) = open("guard_stats") {
        stats.guard = guard::counters(&PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(g))?);
    }
    if let Ok(m) = open("retrans_stats") {
        let m: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(m))?;
        use dispatcher_ebpf::abi::retrans;
        let names = [
            (retrans::TRIMMED, "trimmed"),
            (retrans::TRIMMED_BYTES, "trimmed_bytes"),
            (retrans::DROPPED, "dropped"),
            (retrans::UNTRIMMED, "untrimmed"),
            (retrans::NO_SEQ, "no_seq"),
        ];
        for (i, name) in names {
            stats.retransmits.insert(name.to_string(), m.get(&i, 0)?.iter().sum());
        }
    }
    if let Ok(m) = open("gate_stats") {
        let m: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(m))?;
        use dispatcher_ebpf::abi::gate;
        for (i, name) in [(gate::REFUSED, "refused"), (gate::REFUSED_BYTES, "refused_bytes")] {
            stats.lease_gate.insert(name.to_string(), m.get(&i, 0)?.iter().sum());
        }
    }
    if let Ok(m) = open("tunnel_stats") {
        let m: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(m))?;
        use dispatcher_ebpf::abi::tunnel;
        let names = [
            (tunnel::REDIRECTED, "redirected"),
            (tunnel::REDIRECTED_BYTES, "redirected_bytes"),
            (tunnel::PASSED, "passed"),
            (tunnel::PASSED_BYTES, "passed_bytes"),
        ];
        for (i, name) in names {
            stats.tunnels.insert(name.to_string(), m.get(&i, 0)?.iter().sum());
        }
    }
    for r in 1..reason::COUNT {
        let total: u64 = ho.get(&r, 0)?.iter().sum();
        stats.handoffs.insert(reason::name(r).to_string(), total);
    }
    Ok(stats)
}
