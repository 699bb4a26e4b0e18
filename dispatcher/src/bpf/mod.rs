//! The kernel objects of one dispatcher instance: loads, configures, pins
//! and attaches the BPF programs, then hands each group of maps to the
//! part that uses it (one owner each, resolved once here; see [`Maps`]).
//!
//! Everything is pinned under `/sys/fs/bpf/<instance>/` (root only), so
//! `bpftool map show pinned /sys/fs/bpf/<instance>/routes` works while the
//! dispatcher runs; [`Kernel`]'s drop removes the pins, and dropping the
//! loaded object detaches the programs.

mod conn_state;
mod counters;
mod guard;
mod rings;
mod route_names;
mod routes;
mod sys;
mod tunnels;

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, MapData, ProgramArray, RingBuf, SockHash},
    programs::{links::CgroupAttachMode, SkMsg, SkSkb, SockOps, Xdp, XdpMode},
    Ebpf, EbpfLoader, VerifierLogLevel,
};
use dispatcher_ebpf::abi::Config as KConfig;

pub use conn_state::ConnTable;
pub use counters::{read_stats, Counters};
pub use guard::{Guard, GuardList};
pub use rings::Rings;
pub use routes::{RouteLookup, RouteTable, Routed};
pub use tunnels::TunnelTable;

use crate::config::Config;

/// The BPF object built by `cargo xtask build` (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dispatcher-ebpf.o"));

const BPF_FS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The maps pinned for bpftool (and `dispatcher stats`) by name; the
/// rings and awake flags are pinned per pool by [`Rings`].
const PINNED_MAPS: &[&str] = &[
    "conns",
    "conn_state",
    "paused",
    "routes",
    "pools",
    "rings",
    "config",
    "pool_stats",
    "handoffs",
    "retrans_stats",
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
    "gate_stats",
    "tunnels",
    "tunnel_ctl",
    "tunnel_seen",
    "tunnel_stats",
];

/// The loaded programs of one instance, and their pins. Holding it keeps
/// the programs attached.
pub struct Kernel {
    _ebpf: Ebpf,
    pin_dir: PathBuf,
}

/// A program and where it is attached: (name, type, attached to).
pub type Attached = (&'static str, &'static str, String);

/// The map groups, each handed to the part that owns it.
pub struct Maps {
    /// `conn_state`: the connections' framing state (connection tasks).
    pub conns: ConnTable,
    /// `routes` and `route_names`, written (registry).
    pub routes: RouteTable,
    /// `routes`, read (the slow path).
    pub lookup: RouteLookup,
    /// `pools`, `rings`, `ring_awake` and the rings themselves (pools and
    /// their supervisors).
    pub rings: Rings,
    /// `pool_stats`, `slow_stats`.
    pub counters: Counters,
    /// The XDP guard's lists, limits and counters.
    pub guard: Guard,
    /// `tunnels`, `tunnel_ctl`, `tunnel_seen` (the splice tasks); None
    /// when tunnels are not spliced.
    pub tunnels: Option<TunnelTable>,
    /// `events`: hand-offs and demands for a worker (taken by the task
    /// that reads it).
    pub events: RingBuf<MapData>,
    /// The programs and where each is attached (for `dispatcher status`).
    pub attached: Vec<Attached>,
}

impl Kernel {
    /// Loads everything for `cfg`. Fails with a message naming what is
    /// missing (root, bpffs, cgroup v2, a verifier rejection with its log).
    /// Pools come after, through [`Rings::add_pool`] (no connection
    /// reaches the programs before the listening socket opens).
    pub fn load(cfg: &Config) -> Result<(Kernel, Maps)> {
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
        // From here on a failure drops `k`, which removes the pins made so far.
        let mut k = Kernel { _ebpf: load_object()?, pin_dir };
        let maps = k.configure(cfg)?;
        Ok((k, maps))
    }

    fn configure(&mut self, cfg: &Config) -> Result<Maps> {
        let pin_dir = self.pin_dir.clone();
        let ebpf = &mut self._ebpf;
        let map = |ebpf: &mut Ebpf, name: &str| -> Result<()> {
            ebpf.map_mut(name).ok_or_else(|| anyhow!("BPF object has no map `{name}`")).map(|_| ())
        };
        for name in PINNED_MAPS {
            map(ebpf, name)?;
        }
        let conns_fd = {
            let conns: SockHash<&mut MapData, u64> = SockHash::try_from(ebpf.map_mut("conns").unwrap())?;
            conns.fd().try_clone().context("duplicating the `conns` fd")?
        };
        {
            let step: &mut SkSkb =
                ebpf.program_mut("classify_step").ok_or_else(|| anyhow!("no program classify_step"))?.try_into()?;
            step.load().map_err(verifier("classify_step"))?;
            let fd = step.fd()?.try_clone()?;
            step.pin(pin_dir.join("classify_step")).context("pinning classify_step")?;
            let mut steps: ProgramArray<&mut MapData> =
                ProgramArray::try_from(ebpf.map_mut("steps").ok_or_else(|| anyhow!("BPF object has no map `steps`"))?)?;
            steps.set(0, &fd, 0).context("setting steps[0]")?;
        }
        {
            let verdict: &mut SkSkb =
                ebpf.program_mut("classify").ok_or_else(|| anyhow!("no program classify"))?.try_into()?;
            verdict.load().map_err(verifier("classify"))?;
            verdict.attach(&conns_fd).context("attaching the stream verdict to `conns`")?;
            verdict.pin(pin_dir.join("classify")).context("pinning classify")?;
        }
        let splice = cfg.tunnel_splice && !cfg.lease_gate;
        if splice {
            let tunnels_fd = {
                let t: SockHash<&mut MapData, u64> = SockHash::try_from(ebpf.map_mut("tunnels").unwrap())?;
                t.fd().try_clone().context("duplicating the `tunnels` fd")?
            };
            let verdict: &mut SkSkb =
                ebpf.program_mut("tunnel").ok_or_else(|| anyhow!("no program tunnel"))?.try_into()?;
            verdict.load().map_err(verifier("tunnel"))?;
            verdict.attach(&tunnels_fd).context("attaching the tunnel verdict to `tunnels`")?;
            verdict.pin(pin_dir.join("tunnel")).context("pinning tunnel")?;
        }
        let gate = cfg.lease_gate && initial_pid_namespace();
        if cfg.lease_gate && !gate {
            tracing::warn!(
                "the lease gate is off: this dispatcher is not in the initial pid namespace (a container?), and the \
                 kernel names writers by their pid there; set `fast_path.lease_gate = false` to say so"
            );
        }
        if gate {
            // Before the listening socket opens: the gate covers only the
            // sockets put into `conns` after it is attached.
            let gate: &mut SkMsg =
                ebpf.program_mut("lease_gate").ok_or_else(|| anyhow!("no program lease_gate"))?.try_into()?;
            gate.load().map_err(verifier("lease_gate"))?;
            gate.attach(&conns_fd).context("attaching the lease gate (sk_msg) to `conns`")?;
            gate.pin(pin_dir.join("lease_gate")).context("pinning lease_gate")?;
        }
        {
            let mut c: Array<&mut MapData, KConfig> = Array::try_from(ebpf.map_mut("config").unwrap())?;
            let kc = KConfig {
                max_fast_body: cfg.max_fast_body,
                listen_port: cfg.listen.port() as u32,
                enabled: cfg.fast_path as u32,
                dispatcher_tgid: std::process::id(),
                _pad: 0,
            };
            c.set(0, kc, 0).context("writing `config`")?;
        }
        let cgroup = cgroup2_root()?;
        {
            let cg = fs::File::open(&cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
            let ops: &mut SockOps =
                ebpf.program_mut("track_conn").ok_or_else(|| anyhow!("no program track_conn"))?.try_into()?;
            ops.load().map_err(verifier("track_conn"))?;
            // Through a bpf_link (flags must be 0), which the kernel always
            // attaches in multi mode next to other programs of the cgroup.
            ops.attach(cg.as_fd(), CgroupAttachMode::Single)
                .with_context(|| format!("attaching sockops to cgroup {}", cgroup.display()))?;
            ops.pin(pin_dir.join("track_conn")).context("pinning track_conn")?;
        }
        for name in PINNED_MAPS {
            let path = pin_dir.join(name);
            ebpf.map_mut(name)
                .unwrap()
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }

        // Each group of maps goes to its owner.
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| anyhow!("BPF object has no map `{name}`"));
        let mut guard = Guard::new(&mut take)?;
        guard.setup(&cfg.guard, cfg.listen.port())?;
        // A display aid: its failure costs bpftool's readable routes only.
        let names = match route_names::RouteNames::create(&pin_dir.join("route_names")) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("no `route_names` map (bpftool will show the routes as hashes and bytes only): {e:#}");
                None
            }
        };
        let (routes, lookup) = RouteTable::new(take("routes")?, names)?;
        let holder = if gate { Some(take("lease_holder")?) } else { None };
        let conns = ConnTable::new(take("conn_state")?, take("paused")?, holder)?;
        let rings = Rings::new(pin_dir.clone(), take("pools")?, take("rings")?, take("ring_awake")?)?;
        let counters = Counters::new(take("pool_stats")?, take("slow_stats")?)?;
        let events = RingBuf::try_from(take("events")?)?;
        let tunnels = if splice {
            Some(TunnelTable::new(take("tunnels")?, take("tunnel_ctl")?, take("tunnel_seen")?)?)
        } else {
            None
        };

        let mut attached = vec![
            ("track_conn", "sockops", format!("cgroup {}", cgroup.display())),
            ("classify", "sk_skb stream verdict", "sockhash `conns`".to_string()),
            ("classify_step", "sk_skb (tail call)", "program array `steps`".to_string()),
        ];
        if gate {
            attached.push(("lease_gate", "sk_msg", "sockhash `conns`".to_string()));
        }
        if splice {
            attached.push(("tunnel", "sk_skb stream verdict", "sockhash `tunnels`".to_string()));
        }
        if let Some(iface) = &cfg.iface {
            let mode = attach_guard(ebpf, iface, &pin_dir)?;
            attached.push(("guard", "xdp", format!("{iface} ({mode} mode)")));
            guard.at = Some((iface.clone(), mode));
        }
        Ok(Maps { conns, routes, lookup, rings, counters, guard, tunnels, events, attached })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

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

/// Whether this process is in the initial pid namespace, where the pids
/// the lease gate sees (`bpf_get_current_pid_tgid`) are the ones this
/// process knows (its own, and those the kernel puts in a worker's
/// `SCM_CREDENTIALS`). The initial namespace's inode is fixed
/// (`PROC_PID_INIT_INO`).
fn initial_pid_namespace() -> bool {
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    fs::read_link("/proc/self/ns/pid").is_ok_and(|l| l.to_string_lossy() == format!("pid:[{PROC_PID_INIT_INO}]"))
}

/// Attaches the guard to `iface`: driver mode first, generic mode if the
/// driver has no XDP support. Through a bpf_link, so it goes with this
/// process however it ends (no program left on the interface after a
/// crash). Returns the mode.
fn attach_guard(ebpf: &mut Ebpf, iface: &str, pin_dir: &Path) -> Result<&'static str> {
    let prog: &mut Xdp = ebpf.program_mut("guard").ok_or_else(|| anyhow!("no program guard"))?.try_into()?;
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
    prog.pin(pin_dir.join("guard")).context("pinning guard")?;
    tracing::info!(iface = %iface, mode, "XDP guard attached");
    Ok(mode)
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
