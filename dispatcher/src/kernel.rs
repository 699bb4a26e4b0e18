//! Loads, configures, pins and attaches the BPF programs and maps.
//!
//! Everything is pinned under `/sys/fs/bpf/<instance>/` (root only), so
//! `bpftool map show pinned /sys/fs/bpf/<instance>/routes` works while the
//! dispatcher runs; [`Kernel`]'s drop removes the pins, and dropping the
//! loaded object detaches the programs.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, Map, MapData, PerCpuArray, ProgramArray, SockHash,
    },
    programs::{links::CgroupAttachMode, SkSkb, SockOps, Xdp, XdpMode},
    Ebpf, EbpfLoader, VerifierLogLevel,
};
use dispatcher_ebpf::{
    abi::{
        reason, verdict, Config as KConfig, ConnState, GuardConfig, PoolCounters, PoolInfo, RouteKeyData, RouteValue,
        SlowCounters, MAX_POOLS, MAX_SLOTS, UNROUTED, WILDCARD_HOST,
    },
    route::{self, request_key, route_keys, RouteKey},
    scan::host_hash,
};

use crate::config::{Config, Pool, Route};

/// The BPF object built by `cargo xtask build` (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dispatcher-ebpf.o"));

const BPF_FS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The loaded programs and maps of one dispatcher instance.
pub struct Kernel {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// The worker slots in use, by global slot index.
    slots: Vec<Option<SlotMaps>>,
    /// Each pool index's slot count (what `pools` holds while it runs).
    pool_slots: Vec<u32>,
    /// The route table's keys and the pool each points to, as written.
    route_keys: std::collections::HashMap<(u32, RouteKeyData), u32>,
    /// The XDP guard's lists as written, and where it is attached.
    guard_allow: std::collections::BTreeSet<ipnet::IpNet>,
    guard_deny: std::collections::BTreeSet<ipnet::IpNet>,
    guard_at: Option<(String, &'static str)>,
    /// The readable list of routes (see `route_names`).
    route_names: Option<crate::route_names::RouteNames>,
}

/// One worker slot's kernel objects: its ring, its awake flag (see
/// `abi::RING_AWAKE_YES`), their mapped view, and their pins.
struct SlotMaps {
    ring: MapData,
    awake: MapData,
    view: SlotView,
    pins: [PathBuf; 2],
    /// Its pins are there (a replacement may own the paths now).
    pinned: bool,
}

/// What the dispatcher sees of a slot without consuming it: the awake flag
/// (read-write) and the ring's consumer and producer positions (read-only
/// mappings of the ring's first two pages).
struct SlotView {
    flag: *mut std::sync::atomic::AtomicU32,
    pos: *const std::sync::atomic::AtomicU64,
    page: usize,
}

// SAFETY: shared memory accessed only through atomics.
unsafe impl Send for SlotView {}

impl SlotView {
    fn map(flag: &MapData, ring: &MapData) -> Result<SlotView> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map = |fd: i32, len: usize, prot: i32| {
            // SAFETY: a fresh shared mapping of a BPF map's pages.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
            if p == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(p)
            }
        };
        let f = map(flag.fd().as_fd().as_raw_fd(), page, libc::PROT_READ | libc::PROT_WRITE)
            .context("mapping an awake flag")?;
        let r = map(ring.fd().as_fd().as_raw_fd(), 2 * page, libc::PROT_READ).context("mapping a ring's positions")?;
        Ok(SlotView { flag: f as *mut _, pos: r as *const _, page })
    }

    /// Marks the slot workerless, then says whether requests wait on it.
    /// In this order, against the verdict's commit-then-read: either it
    /// sees the mark (and raises a demand) or this sees its record.
    fn vacate(&self) -> bool {
        // SAFETY: mapped for the life of self.
        unsafe { (*self.flag).swap(dispatcher_ebpf::abi::RING_AWAKE_NO_WORKER, std::sync::atomic::Ordering::SeqCst) };
        let (consumed, produced) = self.positions();
        produced != consumed
    }

    /// The ring's consumer and producer positions (bytes).
    fn positions(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        // SAFETY: mapped for the life of self.
        unsafe { ((*self.pos).load(SeqCst), (*self.pos.byte_add(self.page)).load(SeqCst)) }
    }

    fn progress(&self) -> activation::Progress {
        // SAFETY: mapped for the life of self.
        let flag = unsafe { (*self.flag).load(std::sync::atomic::Ordering::SeqCst) };
        let (consumed, produced) = self.positions();
        activation::Progress {
            ready: flag != dispatcher_ebpf::abi::RING_AWAKE_NO_WORKER,
            consumed,
            queued: produced != consumed,
        }
    }
}

impl Drop for SlotView {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mappings.
        unsafe {
            libc::munmap(self.flag as *mut _, self.page);
            libc::munmap(self.pos as *mut _, 2 * self.page);
        }
    }
}

/// Where a slow-path request routes, mirroring the kernel's lookup.
pub enum Routed {
    Pool(u32),
    NoRoute,
}

impl Kernel {
    /// Loads everything for `cfg`. Fails with a message naming what is
    /// missing (root, bpffs, cgroup v2, a verifier rejection with its log).
    pub fn load(cfg: &Config) -> Result<Kernel> {
        if OBJECT.is_empty() {
            bail!("this dispatcher binary was built without its BPF programs; build it with `cargo xtask build` (or run `cargo xtask run`)");
        }
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "loading BPF programs needs root (CAP_BPF and CAP_NET_ADMIN); kernel.unprivileged_bpf_disabled = {}",
                fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").unwrap_or_default().trim()
            );
        }
        ensure_bpffs()?;
        let pin_dir = Path::new(BPF_FS).join(&cfg.instance);
        if pin_dir.exists() {
            // The caller holds the instance lock, so this is a leftover of a
            // run that was killed.
            tracing::warn!(dir = %pin_dir.display(), "removing pins left by an earlier run");
            fs::remove_dir_all(&pin_dir).with_context(|| format!("removing stale {}", pin_dir.display()))?;
        }
        fs::create_dir(&pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
        // Root only: a worker (or anyone) must not reach another pool's
        // ring by path; workers get their own ring as an inherited fd.
        fs::set_permissions(&pin_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("chmod 700 {}", pin_dir.display()))?;
        let mut k = Kernel {
            ebpf: load_object()?,
            pin_dir,
            slots: (0..MAX_SLOTS).map(|_| None).collect(),
            pool_slots: vec![0; MAX_POOLS as usize],
            route_keys: Default::default(),
            guard_allow: Default::default(),
            guard_deny: Default::default(),
            guard_at: None,
            route_names: None,
        };
        // On failure `k` drops here, which removes the pins made so far.
        k.configure(cfg)?;
        Ok(k)
    }

    fn map(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf.map_mut(name).ok_or_else(|| anyhow!("BPF object has no map `{name}`"))
    }

    /// Creates pool index `index`'s rings and awake flags on global slots
    /// `first_slot..` (pinned as `ring_<pool>`, `awake_<pool>`, and
    /// `ring_<pool>@k` for slot k > 0 of a web garden) and opens the pool
    /// in `pools`. Routes to it are written by [`Kernel::set_routes`].
    pub fn add_pool(&mut self, index: u32, p: &Pool, first_slot: usize) -> Result<()> {
        for k in 0..p.max_processes as usize {
            let i = first_slot + k;
            if self.slots.get(i).is_none_or(|s| s.is_some()) {
                bail!("worker slot {i} is not free");
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
            // Kernel object names take [A-Za-z0-9_.] only (a pool name may
            // have `-`); the pin paths keep the pool's name.
            let name: String = format!("ring_{}{suffix}", p.name).replace(['-', '@'], "_").chars().take(15).collect();
            let ring = MapData::create(obj, &name, None).with_context(|| format!("creating the ring of {what}"))?;
            let ring_pin = self.pin_dir.join(format!("ring_{}{suffix}", p.name));
            ring.pin(&ring_pin).with_context(|| format!("pinning the ring of {what}"))?;
            // The worker maps this one page and flips the flag itself.
            let obj = aya_obj::Map::new_from_params(
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
                4,
                4,
                1,
                aya_obj::generated::BPF_F_MMAPABLE,
            );
            let name: String = format!("awake_{}{suffix}", p.name).replace(['-', '@'], "_").chars().take(15).collect();
            let flag =
                MapData::create(obj, &name, None).with_context(|| format!("creating the awake flag of {what}"))?;
            let flag_pin = self.pin_dir.join(format!("awake_{}{suffix}", p.name));
            let view = SlotView::map(&flag, &ring);
            let pinned = flag.pin(&flag_pin).with_context(|| format!("pinning the awake flag of {what}"));
            let maps = SlotMaps { ring, awake: flag, view: view?, pins: [ring_pin, flag_pin], pinned: true };
            // From here on the slot is ours, so a failure below unpins it.
            self.slots[i] = Some(maps);
            pinned?;
            let maps = self.slots[i].as_ref().unwrap();
            let (ring_fd, flag_fd) = (maps.ring.fd().as_fd().as_raw_fd(), maps.awake.fd().as_fd().as_raw_fd());
            update_fd_elem(self.map_raw_fd("ring_awake")?, i as u32, flag_fd)
                .with_context(|| format!("setting slot {i} in `ring_awake`"))?;
            update_fd_elem(self.map_raw_fd("rings")?, i as u32, ring_fd)
                .with_context(|| format!("setting slot {i} in `rings`"))?;
        }
        self.pool_slots[index as usize] = p.max_processes;
        // A reused index starts from zero, not from the retired pool's counts.
        {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
            let mut pc: PerCpuArray<&mut MapData, PoolCounters> = PerCpuArray::try_from(self.map("pool_stats")?)?;
            pc.set(index, aya::maps::PerCpuValues::try_from(vec![PoolCounters::default(); cpus])?, 0)
                .context("zeroing `pool_stats`")?;
            let mut slow: Array<&mut MapData, SlowCounters> = Array::try_from(self.map("slow_stats")?)?;
            slow.set(index, SlowCounters::default(), 0).context("zeroing `slow_stats`")?;
        }
        let mut pools: Array<&mut MapData, PoolInfo> = Array::try_from(self.map("pools")?)?;
        let info = PoolInfo {
            first_slot: first_slot as u32,
            slots: p.max_processes,
            queue_bytes: p.queue_bytes,
            scale_out_bytes: p.scale_out_queue_bytes,
        };
        pools.set(index, info, 0).context("writing `pools`")?;
        Ok(())
    }

    /// Removes the pins of slots `slots` (a replacement of the pool may
    /// take the names); the maps live on until [`Kernel::remove_pool`].
    pub fn unpin_slots(&mut self, slots: std::ops::Range<usize>) {
        for m in self.slots[slots].iter_mut().flatten() {
            if std::mem::take(&mut m.pinned) {
                for p in &m.pins {
                    let _ = fs::remove_file(p);
                }
            }
        }
    }

    /// Pins slots `slots` again (a reload that unpinned them failed).
    pub fn pin_slots(&mut self, slots: std::ops::Range<usize>) {
        for m in self.slots[slots].iter_mut().flatten() {
            if !m.pinned {
                m.pinned = m.ring.pin(&m.pins[0]).is_ok() & m.awake.pin(&m.pins[1]).is_ok();
            }
        }
    }

    /// Closes pool index `index` in `pools` and frees its slots' rings and
    /// flags (no worker may hold them any more).
    pub fn remove_pool(&mut self, index: u32, slots: std::ops::Range<usize>) -> Result<()> {
        self.unpin_slots(slots.clone());
        self.pool_slots[index as usize] = 0;
        {
            let mut pools: Array<&mut MapData, PoolInfo> = Array::try_from(self.map("pools")?)?;
            pools.set(index, PoolInfo::default(), 0).context("writing `pools`")?;
        }
        let (rings, awake) = (self.map_raw_fd("rings")?, self.map_raw_fd("ring_awake")?);
        for i in slots {
            // The verdict takes a slot's ring and flag under RCU: deleting
            // them here is safe while a program runs.
            let _ = delete_elem(rings, i as u32);
            let _ = delete_elem(awake, i as u32);
            self.slots[i] = None;
        }
        Ok(())
    }

    /// Makes the route table say what `routes` says (pool index and its
    /// routes): new keys are written first, then stale ones deleted, so a
    /// lookup finds the old route or the new one, never none.
    pub fn set_routes<'a>(&mut self, routes: impl IntoIterator<Item = (u32, &'a [Route])>) -> Result<()> {
        let mut want = std::collections::HashMap::new();
        for (pool, rs) in routes {
            for r in rs {
                let h = r.host.as_deref().map(|h| host_hash(h.as_bytes())).unwrap_or(WILDCARD_HOST);
                let (keys, n) = route_keys(h, r.prefix.as_bytes()).map_err(|e| anyhow!("route {r}: {e:?}"))?;
                for k in &keys[..n] {
                    want.insert((k.prefix_len, k.data), pool);
                }
            }
        }
        let old = std::mem::take(&mut self.route_keys);
        let mut trie: LpmTrie<&mut MapData, RouteKeyData, RouteValue> = LpmTrie::try_from(self.map("routes")?)?;
        let mut err = None;
        let mut failed = Vec::new();
        for (k, pool) in &want {
            if old.get(k) != Some(pool) {
                if let Err(e) = trie.insert(&Key::new(k.0, k.1), RouteValue { pool: *pool, _pad: 0 }, 0) {
                    err.get_or_insert(anyhow!("inserting a route key: {e}"));
                    failed.push(*k);
                }
            }
        }
        // What the table really holds: a key that failed keeps its old
        // value, if it had one, and is written again by the next reload.
        let mut want = want;
        for k in failed {
            match old.get(&k) {
                Some(p) => want.insert(k, *p),
                None => want.remove(&k),
            };
        }
        for k in old.keys() {
            if !want.contains_key(k) {
                let _ = trie.remove(&Key::new(k.0, k.1));
            }
        }
        self.route_keys = want;
        err.map_or(Ok(()), Err)
    }

    /// Lists the routes readably in `route_names`: (host or `*`, prefix,
    /// pool name, pool index), in match order.
    pub fn list_routes(&mut self, rows: &[(String, String, String, u32)]) -> Result<()> {
        match &mut self.route_names {
            Some(r) => r.set(rows),
            None => Ok(()),
        }
    }

    fn map_raw_fd(&mut self, name: &str) -> Result<std::os::fd::RawFd> {
        map_fd(self.map(name)?).ok_or_else(|| anyhow!("map `{name}` has an unexpected type"))
    }

    /// Loads and attaches the programs; pools come after, through
    /// [`Kernel::add_pool`] (no connection reaches the programs before the
    /// listening socket opens).
    fn configure(&mut self, cfg: &Config) -> Result<()> {
        let conns_fd = {
            let conns: SockHash<&mut MapData, u64> = SockHash::try_from(self.map("conns")?)?;
            conns.fd().try_clone().context("duplicating the `conns` fd")?
        };
        {
            let step: &mut SkSkb = self
                .ebpf
                .program_mut("classify_step")
                .ok_or_else(|| anyhow!("no program classify_step"))?
                .try_into()?;
            step.load().map_err(verifier("classify_step"))?;
            let fd = step.fd()?.try_clone()?;
            step.pin(self.pin_dir.join("classify_step")).context("pinning classify_step")?;
            let mut steps: ProgramArray<&mut MapData> = ProgramArray::try_from(self.map("steps")?)?;
            steps.set(0, &fd, 0).context("setting steps[0]")?;
        }
        {
            let verdict: &mut SkSkb =
                self.ebpf.program_mut("classify").ok_or_else(|| anyhow!("no program classify"))?.try_into()?;
            verdict.load().map_err(verifier("classify"))?;
            verdict.attach(&conns_fd).context("attaching the stream verdict to `conns`")?;
            verdict.pin(self.pin_dir.join("classify")).context("pinning classify")?;
        }
        {
            let mut c: Array<&mut MapData, KConfig> = Array::try_from(self.map("config")?)?;
            c.set(
                0,
                KConfig {
                    max_fast_body: cfg.max_fast_body,
                    listen_port: cfg.listen.port() as u32,
                    enabled: cfg.fast_path as u32,
                },
                0,
            )
            .context("writing `config`")?;
        }
        {
            let cgroup = cgroup2_root()?;
            let cg = fs::File::open(&cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
            let ops: &mut SockOps =
                self.ebpf.program_mut("track_conn").ok_or_else(|| anyhow!("no program track_conn"))?.try_into()?;
            ops.load().map_err(verifier("track_conn"))?;
            // Through a bpf_link (flags must be 0), which the kernel always
            // attaches in multi mode next to other programs of the cgroup.
            ops.attach(cg.as_fd(), CgroupAttachMode::Single)
                .with_context(|| format!("attaching sockops to cgroup {}", cgroup.display()))?;
            ops.pin(self.pin_dir.join("track_conn")).context("pinning track_conn")?;
        }
        self.setup_guard(cfg)?;
        // A display aid: its failure costs bpftool's readable routes only.
        self.route_names = match crate::route_names::RouteNames::create(&self.pin_dir.join("route_names")) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("no `route_names` map (bpftool will show the routes as hashes and bytes only): {e:#}");
                None
            }
        };
        for name in [
            "conns",
            "conn_state",
            "routes",
            "pools",
            "rings",
            "config",
            "pool_stats",
            "handoffs",
            "slow_stats",
            "events",
            "ring_awake",
            "guard_deny_v4",
            "guard_deny_v6",
            "guard_allow_v4",
            "guard_allow_v6",
            "guard_config",
            "guard_rate",
            "guard_stats",
            "guard_conns",
        ] {
            let path = self.pin_dir.join(name);
            self.map(name)?.pin(&path).with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        Ok(())
    }

    /// Writes the guard's settings and lists, and attaches it to the
    /// configured interface: driver mode first, generic mode if the
    /// driver has no XDP support. Attached through a bpf_link, so it goes
    /// with this process however it ends (no program left on the
    /// interface after a crash).
    fn setup_guard(&mut self, cfg: &Config) -> Result<()> {
        let g = &cfg.guard;
        for n in &g.deny {
            self.guard_list(GuardList::Deny, *n, true)?;
        }
        for n in &g.allow {
            self.guard_list(GuardList::Allow, *n, true)?;
        }
        self.write_guard_config(Some((
            cfg.listen.port(),
            g.syn_rate_per_sec,
            g.syn_burst,
            g.max_connections_per_source,
        )))?;
        let Some(iface) = &cfg.iface else { return Ok(()) };
        let prog: &mut Xdp = self.ebpf.program_mut("guard").ok_or_else(|| anyhow!("no program guard"))?.try_into()?;
        prog.load().map_err(verifier("guard"))?;
        let mode = match prog.attach(iface, XdpMode::Driver) {
            Ok(_) => "driver",
            Err(aya::programs::ProgramError::UnknownInterface { .. }) => {
                bail!("interface `{iface}` (field `iface` / --iface) does not exist")
            }
            Err(e) => {
                tracing::info!(iface = %iface, "XDP driver mode unavailable ({e}); using generic mode");
                prog.attach(iface, XdpMode::Skb).with_context(|| format!("attaching the XDP guard to `{iface}`"))?;
                "generic"
            }
        };
        prog.pin(self.pin_dir.join("guard")).context("pinning guard")?;
        tracing::info!(iface = %iface, mode, "XDP guard attached");
        self.guard_at = Some((iface.clone(), mode));
        Ok(())
    }

    /// Writes `guard_config`: the allow lists' sizes, and the port and
    /// rate limit if given (else those already there).
    fn write_guard_config(&mut self, limits: Option<(u16, u32, u32, u32)>) -> Result<()> {
        let (allow_v4, allow_v6) = (
            self.guard_allow.iter().filter(|n| matches!(n, ipnet::IpNet::V4(_))).count() as u32,
            self.guard_allow.iter().filter(|n| matches!(n, ipnet::IpNet::V6(_))).count() as u32,
        );
        let mut c: Array<&mut MapData, GuardConfig> = Array::try_from(self.map("guard_config")?)?;
        let old = c.get(&0, 0).unwrap_or_default();
        let (port, syn_rate, syn_burst, max_connections) = limits
            .map_or((old.port, old.syn_rate, old.syn_burst, old.max_connections), |(p, r, b, m)| (p as u32, r, b, m));
        c.set(0, GuardConfig { port, allow_v4, allow_v6, syn_rate, syn_burst, max_connections }, 0)
            .context("writing `guard_config`")?;
        Ok(())
    }

    /// Adds (`add`) or removes a CIDR on a guard list; takes effect for
    /// the next packet. Returns whether the list changed.
    pub fn guard_list(&mut self, list: GuardList, net: ipnet::IpNet, add: bool) -> Result<bool> {
        let (set, name) = match list {
            GuardList::Allow => (&mut self.guard_allow, "allow"),
            GuardList::Deny => (&mut self.guard_deny, "deny"),
        };
        let changed = if add { set.insert(net) } else { set.remove(&net) };
        if !changed {
            return Ok(false);
        }
        if matches!(list, GuardList::Allow) && !add {
            // The count first: removing the last entry must not leave a
            // moment where the list counts as non-empty and matches none.
            self.write_guard_config(None)?;
        }
        let map = format!("guard_{name}_{}", if matches!(net, ipnet::IpNet::V4(_)) { "v4" } else { "v6" });
        let r = match net {
            ipnet::IpNet::V4(n) => {
                let mut t: LpmTrie<&mut MapData, [u8; 4], u8> = LpmTrie::try_from(self.map(&map)?)?;
                let k = Key::new(n.prefix_len() as u32, n.network().octets());
                if add {
                    t.insert(&k, 1, 0)
                } else {
                    t.remove(&k)
                }
            }
            ipnet::IpNet::V6(n) => {
                let mut t: LpmTrie<&mut MapData, [u8; 16], u8> = LpmTrie::try_from(self.map(&map)?)?;
                let k = Key::new(n.prefix_len() as u32, n.network().octets());
                if add {
                    t.insert(&k, 1, 0)
                } else {
                    t.remove(&k)
                }
            }
        };
        if let Err(e) = r {
            // Keep the set what the map holds.
            let set = if matches!(list, GuardList::Allow) { &mut self.guard_allow } else { &mut self.guard_deny };
            if add {
                set.remove(&net)
            } else {
                set.insert(net)
            };
            if matches!(list, GuardList::Allow) && !add {
                let _ = self.write_guard_config(None);
            }
            return Err(anyhow!("{} {net} in `{map}`: {e}", if add { "adding" } else { "removing" }));
        }
        if matches!(list, GuardList::Allow) && add {
            self.write_guard_config(None)?;
        }
        Ok(true)
    }

    /// Makes the guard's lists and rate limit what `g` says (a reload:
    /// the file wins over earlier live changes). Returns whether anything
    /// changed.
    pub fn guard_replace(&mut self, g: &crate::config::Guard, port: u16) -> Result<bool> {
        // New entries before stale ones go: the lists never open wider
        // (or, for allow, narrower) than either version. Errors are
        // collected; the rest is applied.
        let mut changed = false;
        let mut err = None;
        for (list, want) in [(GuardList::Deny, &g.deny), (GuardList::Allow, &g.allow)] {
            let have: Vec<ipnet::IpNet> =
                if matches!(list, GuardList::Deny) { &self.guard_deny } else { &self.guard_allow }
                    .iter()
                    .copied()
                    .collect();
            for n in want {
                match self.guard_list(list, *n, true) {
                    Ok(c) => changed |= c,
                    Err(e) => _ = err.get_or_insert(e),
                }
            }
            for n in have.iter().filter(|n| !want.contains(n)) {
                match self.guard_list(list, *n, false) {
                    Ok(c) => changed |= c,
                    Err(e) => _ = err.get_or_insert(e),
                }
            }
        }
        let before = self
            .map("guard_config")
            .ok()
            .and_then(|m| Array::<&MapData, GuardConfig>::try_from(&*m).ok()?.get(&0, 0).ok());
        self.write_guard_config(Some((port, g.syn_rate_per_sec, g.syn_burst, g.max_connections_per_source)))?;
        let after = self
            .map("guard_config")
            .ok()
            .and_then(|m| Array::<&MapData, GuardConfig>::try_from(&*m).ok()?.get(&0, 0).ok());
        err.map_or(Ok(changed || before != after), Err)
    }

    /// The guard's state: where it is attached, its lists, its counters.
    pub fn guard_show(&self) -> serde_json::Value {
        let stats = self
            .ebpf
            .map("guard_stats")
            .and_then(|m| PerCpuArray::<&MapData, u64>::try_from(m).ok())
            .map(|a| guard_counters(&a))
            .unwrap_or_default();
        serde_json::json!({
            "iface": self.guard_at.as_ref().map(|(i, _)| i.clone()),
            "mode": self.guard_at.as_ref().map(|(_, m)| *m),
            "allow": self.guard_allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "deny": self.guard_deny.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "counters": stats,
        })
    }

    /// A duplicate fd of slot `slot`'s awake flag, for its worker.
    pub fn awake_fd(&self, slot: usize) -> Result<OwnedFd> {
        self.slot(slot)?.awake.fd().as_fd().try_clone_to_owned().context("duplicating an awake-flag fd")
    }

    /// A duplicate fd of slot `slot`'s ring, for its worker.
    pub fn ring_fd(&self, slot: usize) -> Result<OwnedFd> {
        let fd = self.slot(slot)?.ring.fd().as_fd().try_clone_to_owned().context("duplicating a ring fd")?;
        Ok(fd)
    }

    /// The framing state of connection `cookie`, if the kernel tracks it.
    pub fn conn_state(&self, cookie: u64) -> Option<Box<ConnState>> {
        let map = self.ebpf.map("conn_state")?;
        let fd = map_fd(map)?;
        lookup_boxed::<u64, ConnState>(fd, &cookie)
    }

    /// Forgets connection `cookie` (it closed).
    pub fn forget_conn(&mut self, cookie: u64) {
        if let Ok(m) = self.map("conn_state") {
            if let Ok(mut h) = HashMap::<&mut MapData, u64, ConnState>::try_from(m) {
                let _ = h.remove(&cookie);
            }
        }
    }

    /// Routes a request the slow path parsed, with the kernel's own table.
    pub fn route(&self, host: Option<&[u8]>, path: &[u8]) -> Routed {
        let Some(m) = self.ebpf.map("routes") else { return Routed::NoRoute };
        let Ok(trie) = LpmTrie::<&MapData, RouteKeyData, RouteValue>::try_from(m) else { return Routed::NoRoute };
        let h = match host {
            Some(h) if !dispatcher_ebpf::scan::strip_port(h).is_empty() => host_hash(h),
            _ => WILDCARD_HOST,
        };
        let look = |k: &RouteKey| trie.get(&Key::new(k.prefix_len, k.data), 0).ok();
        match route::lookup(&mut request_key(h, path), h, look) {
            Some(v) => Routed::Pool(v.pool),
            None => Routed::NoRoute,
        }
    }

    /// Bytes queued on slot `slot`'s ring and not consumed yet.
    pub fn queued_bytes(&self, slot: usize) -> u64 {
        self.slot(slot).map_or(0, |s| {
            let (consumed, produced) = s.view.positions();
            produced.saturating_sub(consumed)
        })
    }

    /// Pool index `pool`'s request counters: (queued by the kernel,
    /// parsed by the slow path, found its queue full).
    pub fn pool_requests(&self, pool: u32) -> (u64, u64, u64) {
        let fast = self
            .ebpf
            .map("pool_stats")
            .and_then(|m| PerCpuArray::<&MapData, PoolCounters>::try_from(m).ok())
            .and_then(|a| a.get(&pool, 0).ok())
            .map_or((0, 0), |v| v.iter().fold((0, 0), |(r, q), c| (r + c.fast_requests, q + c.queue_full)));
        let slow = self
            .ebpf
            .map("slow_stats")
            .and_then(|m| Array::<&MapData, SlowCounters>::try_from(m).ok())
            .and_then(|a| a.get(&pool, 0).ok())
            .map_or(0, |c| c.parsed_requests);
        (fast.0, slow, fast.1)
    }

    /// The programs and where each is attached.
    pub fn programs(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut v = vec![
            (
                "track_conn",
                "sockops",
                format!("cgroup {}", cgroup2_root().map(|p| p.display().to_string()).unwrap_or_default()),
            ),
            ("classify", "sk_skb stream verdict", "sockhash `conns`".to_string()),
            ("classify_step", "sk_skb (tail call)", "program array `steps`".to_string()),
        ];
        if let Some((iface, mode)) = &self.guard_at {
            v.push(("guard", "xdp", format!("{iface} ({mode} mode)")));
        }
        v
    }

    /// Adds to the slow-path counters of `pool` (or unrouted).
    pub fn count_slow(&mut self, pool: Option<u32>, parsed: u64, errors: u64) {
        let idx = pool.filter(|p| *p < MAX_POOLS).unwrap_or(UNROUTED);
        if let Ok(m) = self.map("slow_stats") {
            if let Ok(mut a) = Array::<&mut MapData, SlowCounters>::try_from(m) {
                let mut v = a.get(&idx, 0).unwrap_or_default();
                v.parsed_requests += parsed;
                v.errors += errors;
                let _ = a.set(idx, v, 0);
            }
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The ring the verdict program raises events on (hand-offs, see
    /// `parking`; demands for a worker); taken once, by the task that
    /// reads it.
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let m = self.ebpf.take_map("events").ok_or_else(|| anyhow!("BPF object has no map `events`"))?;
        Ok(aya::maps::RingBuf::try_from(m)?)
    }

    fn slot(&self, slot: usize) -> Result<&SlotMaps> {
        self.slots.get(slot).and_then(Option::as_ref).ok_or_else(|| anyhow!("worker slot {slot} is not in use"))
    }

    /// How slot `slot`'s worker is doing with its queue.
    pub fn progress(&self, slot: usize) -> activation::Progress {
        self.slot(slot).map(|s| s.view.progress()).unwrap_or_default()
    }

    /// Marks slot `slot` workerless; true if requests wait on its ring.
    pub fn vacate(&self, slot: usize) -> bool {
        self.slot(slot).is_ok_and(|s| s.view.vacate())
    }

    /// Stops (`false`) or resumes (`true`) queueing on pool `pool` in the
    /// kernel; a stopped pool's requests go to the slow path.
    pub fn set_pool_running(&mut self, pool: usize, running: bool) -> Result<()> {
        let slots = if running { self.pool_slots[pool] } else { 0 };
        let mut pools: Array<&mut MapData, PoolInfo> = Array::try_from(self.map("pools")?)?;
        let mut info = pools.get(&(pool as u32), 0).context("reading `pools`")?;
        info.slots = slots;
        pools.set(pool as u32, info, 0).context("writing `pools`")?;
        Ok(())
    }

    /// Takes every record off slot `slot`'s ring (no worker may be
    /// consuming it) and returns the request heads among them.
    pub fn drain_ring(&self, slot: usize) -> Result<Vec<dispatcher_ebpf::abi::RecordHeader>> {
        let data = MapData::from_fd(self.ring_fd(slot)?).context("opening a ring")?;
        let mut ring = aya::maps::RingBuf::try_from(Map::RingBuf(data))?;
        let mut heads = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(h) = dispatcher_ebpf::abi::RecordHeader::from_bytes(&item) {
                if h.kind == dispatcher_ebpf::abi::RECORD_HEAD {
                    heads.push(h);
                }
            }
        }
        Ok(heads)
    }
}

impl Kernel {
    /// Removes the pins (the maps and programs live on while this process
    /// holds them, and go when it exits).
    pub fn unpin(&self) {
        if let Err(e) = fs::remove_dir_all(&self.pin_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.pin_dir.display(), "could not remove pins: {e}");
            }
        }
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.unpin();
    }
}

/// Counters read from the pinned maps of a running instance.
#[derive(Debug, Default, serde::Serialize)]
pub struct Stats {
    pub pools: Vec<PoolStats>,
    pub handoffs: std::collections::BTreeMap<String, u64>,
    /// The XDP guard's packets by verdict.
    pub guard: std::collections::BTreeMap<String, u64>,
}

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

/// Which guard list.
#[derive(Clone, Copy, Debug)]
pub enum GuardList {
    Allow,
    Deny,
}

/// The guard's packet counters by verdict, summed over CPUs.
fn guard_counters<T: std::borrow::Borrow<MapData>>(a: &PerCpuArray<T, u64>) -> std::collections::BTreeMap<String, u64> {
    (0..verdict::COUNT)
        .map(|v| (verdict::name(v).to_string(), a.get(&v, 0).map(|c| c.iter().sum()).unwrap_or(0)))
        .collect()
}

/// Reads the counters of running instance `instance` from its pins.
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
        stats.guard = guard_counters(&PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(g))?);
    }
    for r in 1..reason::COUNT {
        let total: u64 = ho.get(&r, 0)?.iter().sum();
        stats.handoffs.insert(reason::name(r).to_string(), total);
    }
    Ok(stats)
}

fn load_object() -> Result<Ebpf> {
    // DISPATCHER_VERIFIER_LOG=1 prints the verifier's whole log on a
    // rejection (it is long); otherwise only its summary.
    let level = if std::env::var_os("DISPATCHER_VERIFIER_LOG").is_some() {
        VerifierLogLevel::VERBOSE | VerifierLogLevel::STATS
    } else {
        VerifierLogLevel::STATS
    };
    EbpfLoader::new().verifier_log_level(level).load(OBJECT).context("loading the BPF object")
}

fn verifier(prog: &'static str) -> impl Fn(aya::programs::ProgramError) -> anyhow::Error {
    move |e| match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            anyhow!("the verifier rejected program `{prog}`: {io_error}\n{verifier_log}")
        }
        e => anyhow!("loading program `{prog}`: {e}"),
    }
}

fn ensure_bpffs() -> Result<()> {
    let st = nix::sys::statfs::statfs(BPF_FS).with_context(|| format!("statfs {BPF_FS}"))?;
    if st.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), BPF_FS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mounting the BPF filesystem on {BPF_FS}"))?;
    Ok(())
}

/// The cgroup v2 mount point (the sockops program attaches to its root).
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 2 && f[2] == "cgroup2" {
            return Ok(PathBuf::from(f[1]));
        }
    }
    bail!("no cgroup v2 hierarchy is mounted (needed to attach the sockops program); mount one with `mount -t cgroup2 none /sys/fs/cgroup`")
}

fn map_fd(map: &Map) -> Option<std::os::fd::RawFd> {
    let data: &MapData = match map {
        Map::HashMap(d) | Map::Array(d) | Map::ArrayOfMaps(d) | Map::LpmTrie(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

/// `bpf_map_lookup_elem` into a heap value (ConnState is too large for
/// comfortable stack copies).
fn lookup_boxed<K, V: Copy>(fd: std::os::fd::RawFd, key: &K) -> Option<Box<V>> {
    let mut val: Box<std::mem::MaybeUninit<V>> = Box::new_uninit();
    let attr =
        ElemAttr { map_fd: fd as u32, _pad: 0, key: key as *const K as u64, value: val.as_mut_ptr() as u64, flags: 0 };
    // SAFETY: BPF_MAP_LOOKUP_ELEM (1) with a correctly sized attr; the
    // kernel writes value_size bytes, which is size_of::<V>() for this map.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 1, &attr as *const ElemAttr, std::mem::size_of::<ElemAttr>()) };
    if r != 0 {
        return None;
    }
    // SAFETY: the kernel filled the value.
    Some(unsafe { val.assume_init() })
}

/// `union bpf_attr` for the map element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_map_update_elem` of a map-of-maps entry (the value is a map fd).
fn update_fd_elem(map: std::os::fd::RawFd, index: u32, fd: std::os::fd::RawFd) -> std::io::Result<()> {
    update_elem(map, &index, &(fd as u32))
}

/// `bpf_map_update_elem` with a key and value of the map's sizes.
pub(crate) fn update_elem<K, V>(map: std::os::fd::RawFd, key: &K, value: &V) -> std::io::Result<()> {
    let attr = ElemAttr {
        map_fd: map as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags: 0,
    };
    // SAFETY: BPF_MAP_UPDATE_ELEM (2); the caller's key and value have the
    // map's sizes.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 2, &attr as *const ElemAttr, std::mem::size_of::<ElemAttr>()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf_map_delete_elem` of an entry with a u32 key.
pub(crate) fn delete_elem(map: std::os::fd::RawFd, index: u32) -> std::io::Result<()> {
    let attr = ElemAttr { map_fd: map as u32, _pad: 0, key: &index as *const u32 as u64, value: 0, flags: 0 };
    // SAFETY: BPF_MAP_DELETE_ELEM (3) with a 4-byte key.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 3, &attr as *const ElemAttr, std::mem::size_of::<ElemAttr>()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
