//! The pools' queues in the kernel: one BPF ring buffer and one awake flag
//! per worker slot, indexed by *ring* (the global index the verdict program
//! selects in `rings` and `ring_awake`, `0..MAX_RINGS`), and each pool's
//! entry in `pools` (its first ring, its slot count, its queue limits).
//!
//! A pool's *slot* k (`0..max_processes`, its web garden) is ring
//! `first_ring + k`. Rings are created at run time, pinned as
//! `ring_<pool>` / `awake_<pool>` (`…@k` for k > 0) and set into the
//! map-of-maps the verdict reads.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, Map, MapData};
use dispatcher_ebpf::abi::{PoolInfo, RecordHeader, MAX_POOLS, MAX_RINGS, RECORD_HEAD, RING_AWAKE_NO_WORKER};

use super::sys::{delete_elem, update_fd_elem};
use crate::config::Pool;

/// The rings, awake flags and pool entries of one instance.
pub struct Rings {
    pin_dir: PathBuf,
    /// `pools`: pool index → its rings and limits.
    pools: Array<MapData, PoolInfo>,
    /// `rings` and `ring_awake`: the map-of-maps the verdict selects from.
    rings_map: MapData,
    awake_map: MapData,
    /// The rings in use, by ring index.
    rings: Vec<Option<RingMaps>>,
    /// Each pool index's slot count (what `pools` holds while it runs).
    pool_slots: Vec<u32>,
}

/// One ring's kernel objects: the ring, its awake flag (see
/// `abi::RING_AWAKE_YES`), their mapped view, and their pins.
struct RingMaps {
    ring: MapData,
    awake: MapData,
    view: RingView,
    pins: [PathBuf; 2],
    /// Which of its pins are there (a replacement may own the paths now).
    pinned: [bool; 2],
}

/// What the dispatcher sees of a ring without consuming it: the awake flag
/// (read-write) and the ring's consumer and producer positions (read-only
/// mappings of the ring's first two pages).
struct RingView {
    flag: memmap2::MmapRaw,
    pos: memmap2::MmapRaw,
    page: usize,
}

impl RingView {
    fn map(flag: &MapData, ring: &MapData) -> Result<RingView> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let f = memmap2::MmapOptions::new().len(page).map_raw(raw(flag)).context("mapping an awake flag")?;
        let r = memmap2::MmapOptions::new()
            .len(2 * page)
            .map_raw_read_only(raw(ring))
            .context("mapping a ring's positions")?;
        Ok(RingView { flag: f, pos: r, page })
    }

    fn flag(&self) -> &AtomicU32 {
        // SAFETY: value 0 of the flag's array, at the start of its page,
        // mapped for the life of self and only accessed atomically.
        unsafe { &*(self.flag.as_mut_ptr() as *const AtomicU32) }
    }

    /// The position at the start of page `k` of the ring (0: consumer,
    /// 1: producer).
    fn position(&self, k: usize) -> &AtomicU64 {
        // SAFETY: within the two mapped pages, aligned, written by the
        // kernel and the consumer with atomic stores only.
        unsafe { &*(self.pos.as_ptr().add(k * self.page) as *const AtomicU64) }
    }

    /// Marks the ring workerless, then says whether requests wait on it.
    /// In this order, against the verdict's commit-then-read: either it
    /// sees the mark (and raises a demand) or this sees its record.
    fn vacate(&self) -> bool {
        self.flag().swap(RING_AWAKE_NO_WORKER, SeqCst);
        let (consumed, produced) = self.positions();
        produced != consumed
    }

    /// The ring's consumer and producer positions (bytes).
    fn positions(&self) -> (u64, u64) {
        (self.position(0).load(SeqCst), self.position(1).load(SeqCst))
    }

    fn progress(&self) -> activation::Progress {
        let flag = self.flag().load(SeqCst);
        let (consumed, produced) = self.positions();
        activation::Progress { ready: flag != RING_AWAKE_NO_WORKER, consumed, queued: produced != consumed }
    }
}

fn raw(m: &MapData) -> RawFd {
    m.fd().as_fd().as_raw_fd()
}

/// A kernel object name for `what` of pool `pool`: [A-Za-z0-9_.] only (a
/// pool name may have `-`) and at most 15 bytes; the pin paths keep the
/// pool's name.
fn object_name(what: &str, pool: &str, suffix: &str) -> String {
    format!("{what}_{pool}{suffix}").replace(['-', '@'], "_").chars().take(15).collect()
}

impl Rings {
    pub(super) fn new(pin_dir: PathBuf, pools: Map, rings: Map, awake: Map) -> Result<Rings> {
        let data = |m: Map, name: &str| match m {
            Map::ArrayOfMaps(d) => Ok(d),
            _ => Err(anyhow!("map `{name}` has an unexpected type")),
        };
        Ok(Rings {
            pin_dir,
            pools: Array::try_from(pools)?,
            rings_map: data(rings, "rings")?,
            awake_map: data(awake, "ring_awake")?,
            rings: (0..MAX_RINGS).map(|_| None).collect(),
            pool_slots: vec![0; MAX_POOLS as usize],
        })
    }

    /// Creates pool index `index`'s rings and awake flags on rings
    /// `first_ring..` (pinned as `ring_<pool>`, `awake_<pool>`, and
    /// `ring_<pool>@k` for slot k > 0 of a web garden) and opens the pool
    /// in `pools`. Routes to it are written by the route table.
    pub fn add_pool(&mut self, index: u32, p: &Pool, first_ring: usize) -> Result<()> {
        for k in 0..p.max_processes as usize {
            let i = first_ring + k;
            if self.rings.get(i).is_none_or(|s| s.is_some()) {
                bail!("ring {i} is not free");
            }
            // Slot 0 of a pool keeps the plain names. Pins of other slots
            // are `ring_<pool>@<k>` (`@` cannot occur in a pool name, so no
            // clash with a pool's; bpffs refuses `.`).
            let suffix = if k == 0 { String::new() } else { format!("@{k}") };
            let what = format!("pool `{}` slot {k}", p.name);
            let obj = aya_obj::Map::new_from_params(
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
                0,
                0,
                p.ring_bytes,
                0,
            );
            let ring = MapData::create(obj, &object_name("ring", &p.name, &suffix), None)
                .with_context(|| format!("creating the ring of {what}"))?;
            // The worker maps this one page and flips the flag itself.
            let obj = aya_obj::Map::new_from_params(
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
                4,
                4,
                1,
                aya_obj::generated::BPF_F_MMAPABLE,
            );
            let flag = MapData::create(obj, &object_name("awake", &p.name, &suffix), None)
                .with_context(|| format!("creating the awake flag of {what}"))?;
            let view = RingView::map(&flag, &ring)?;
            let pins =
                [format!("ring_{}{suffix}", p.name), format!("awake_{}{suffix}", p.name)].map(|n| self.pin_dir.join(n));
            // From here on the ring is ours: a failure below is undone by
            // `remove_pool`, which removes the pins made (and only those).
            let maps = self.rings[i].insert(RingMaps { ring, awake: flag, view, pins, pinned: [false; 2] });
            maps.ring.pin(&maps.pins[0]).with_context(|| format!("pinning the ring of {what}"))?;
            maps.pinned[0] = true;
            maps.awake.pin(&maps.pins[1]).with_context(|| format!("pinning the awake flag of {what}"))?;
            maps.pinned[1] = true;
            let maps = self.rings[i].as_ref().unwrap();
            update_fd_elem(raw(&self.awake_map), i as u32, raw(&maps.awake))
                .with_context(|| format!("setting ring {i} in `ring_awake`"))?;
            update_fd_elem(raw(&self.rings_map), i as u32, raw(&maps.ring))
                .with_context(|| format!("setting ring {i} in `rings`"))?;
        }
        self.pool_slots[index as usize] = p.max_processes;
        let info = PoolInfo {
            first_ring: first_ring as u32,
            slots: p.max_processes,
            queue_bytes: p.queue_bytes,
            scale_out_bytes: p.scale_out_queue_bytes,
        };
        self.pools.set(index, info, 0).context("writing `pools`")?;
        Ok(())
    }

    /// Removes the pins of rings `rings` (a replacement of the pool may
    /// take the names); the maps live on until [`Rings::remove_pool`].
    pub fn unpin(&mut self, rings: std::ops::Range<usize>) {
        for m in self.rings[rings].iter_mut().flatten() {
            for (p, pinned) in m.pins.iter().zip(&mut m.pinned) {
                if std::mem::take(pinned) {
                    let _ = fs::remove_file(p);
                }
            }
        }
    }

    /// Pins rings `rings` again (a reload that unpinned them failed).
    pub fn pin(&mut self, rings: std::ops::Range<usize>) {
        for m in self.rings[rings].iter_mut().flatten() {
            if !m.pinned[0] {
                m.pinned[0] = m.ring.pin(&m.pins[0]).is_ok();
            }
            if !m.pinned[1] {
                m.pinned[1] = m.awake.pin(&m.pins[1]).is_ok();
            }
        }
    }

    /// Closes pool index `index` in `pools` and frees its rings and flags
    /// (no worker may hold them any more).
    pub fn remove_pool(&mut self, index: u32, rings: std::ops::Range<usize>) -> Result<()> {
        self.unpin(rings.clone());
        self.pool_slots[index as usize] = 0;
        self.pools.set(index, PoolInfo::default(), 0).context("writing `pools`")?;
        for i in rings {
            // The verdict takes a ring and its flag under RCU: deleting
            // them here is safe while a program runs.
            let _ = delete_elem(raw(&self.rings_map), &(i as u32));
            let _ = delete_elem(raw(&self.awake_map), &(i as u32));
            self.rings[i] = None;
        }
        Ok(())
    }

    fn ring(&self, ring: usize) -> Result<&RingMaps> {
        self.rings.get(ring).and_then(Option::as_ref).ok_or_else(|| anyhow!("ring {ring} is not in use"))
    }

    /// A duplicate fd of ring `ring`'s awake flag, for its worker.
    pub fn awake_fd(&self, ring: usize) -> Result<OwnedFd> {
        self.ring(ring)?.awake.fd().as_fd().try_clone_to_owned().context("duplicating an awake-flag fd")
    }

    /// A duplicate fd of ring `ring`, for its worker.
    pub fn ring_fd(&self, ring: usize) -> Result<OwnedFd> {
        self.ring(ring)?.ring.fd().as_fd().try_clone_to_owned().context("duplicating a ring fd")
    }

    /// Bytes queued on ring `ring` and not consumed yet.
    pub fn queued_bytes(&self, ring: usize) -> u64 {
        self.ring(ring).map_or(0, |s| {
            let (consumed, produced) = s.view.positions();
            produced.saturating_sub(consumed)
        })
    }

    /// How ring `ring`'s worker is doing with its queue.
    pub fn progress(&self, ring: usize) -> activation::Progress {
        self.ring(ring).map(|s| s.view.progress()).unwrap_or_default()
    }

    /// Marks ring `ring` workerless; true if requests wait on it.
    pub fn vacate(&self, ring: usize) -> bool {
        self.ring(ring).is_ok_and(|s| s.view.vacate())
    }

    /// Stops (`false`) or resumes (`true`) queueing on pool `pool` in the
    /// kernel; a stopped pool's requests go to the slow path.
    pub fn set_pool_running(&mut self, pool: u32, running: bool) -> Result<()> {
        let slots = if running { self.pool_slots[pool as usize] } else { 0 };
        let mut info = self.pools.get(&pool, 0).context("reading `pools`")?;
        info.slots = slots;
        self.pools.set(pool, info, 0).context("writing `pools`")?;
        Ok(())
    }

    /// Takes every record off ring `ring` (no worker may be consuming it)
    /// and returns the request heads among them.
    pub fn drain(&self, ring: usize) -> Result<Vec<RecordHeader>> {
        let data = MapData::from_fd(self.ring_fd(ring)?).context("opening a ring")?;
        let mut ring = aya::maps::RingBuf::try_from(Map::RingBuf(data))?;
        let mut heads = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(h) = RecordHeader::from_bytes(&item) {
                if h.kind == RECORD_HEAD {
                    heads.push(h);
                }
            }
        }
        Ok(heads)
    }
}
