//! The XDP guard's user-space side: its allow and deny lists (IPv4 and
//! IPv6 LPM tries), its limits (`guard_config`), its packet counters, and
//! where it is attached (the program itself is attached at load, see
//! [`super::Kernel::load`]).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, Context, Result};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, Map, MapData, PerCpuArray,
};
use dispatcher_ebpf::abi::{verdict, GuardConfig};
use ipnet::IpNet;

/// Which guard list.
#[derive(Clone, Copy, Debug)]
pub enum GuardList {
    Allow,
    Deny,
}

/// The guard's maps and the lists as written.
pub struct Guard {
    deny_v4: LpmTrie<MapData, [u8; 4], u8>,
    deny_v6: LpmTrie<MapData, [u8; 16], u8>,
    allow_v4: LpmTrie<MapData, [u8; 4], u8>,
    allow_v6: LpmTrie<MapData, [u8; 16], u8>,
    config: Array<MapData, GuardConfig>,
    stats: PerCpuArray<MapData, u64>,
    allow: BTreeSet<IpNet>,
    deny: BTreeSet<IpNet>,
    /// The interface it is attached to, and the XDP mode.
    pub(super) at: Option<(String, &'static str)>,
}

/// The guard's limits: (port, SYN rate per second, SYN burst, connections
/// per source).
type Limits = (u16, u32, u32, u32);

impl Guard {
    pub(super) fn new(mut take: impl FnMut(&str) -> Result<Map>) -> Result<Guard> {
        Ok(Guard {
            deny_v4: LpmTrie::try_from(take("guard_deny_v4")?)?,
            deny_v6: LpmTrie::try_from(take("guard_deny_v6")?)?,
            allow_v4: LpmTrie::try_from(take("guard_allow_v4")?)?,
            allow_v6: LpmTrie::try_from(take("guard_allow_v6")?)?,
            config: Array::try_from(take("guard_config")?)?,
            stats: PerCpuArray::try_from(take("guard_stats")?)?,
            allow: BTreeSet::new(),
            deny: BTreeSet::new(),
            at: None,
        })
    }

    /// Writes the configuration's lists and limits (at start-up).
    pub(super) fn setup(&mut self, g: &crate::config::Guard, port: u16) -> Result<()> {
        for n in &g.deny {
            self.change(GuardList::Deny, *n, true)?;
        }
        for n in &g.allow {
            self.change(GuardList::Allow, *n, true)?;
        }
        self.write_config(Some((port, g.syn_rate_per_sec, g.syn_burst, g.max_connections_per_source)))
    }

    /// Writes `guard_config`: the allow lists' sizes, and the limits if
    /// given (else those already there).
    fn write_config(&mut self, limits: Option<Limits>) -> Result<()> {
        let allow_v4 = self.allow.iter().filter(|n| matches!(n, IpNet::V4(_))).count() as u32;
        let allow_v6 = self.allow.iter().filter(|n| matches!(n, IpNet::V6(_))).count() as u32;
        let old = self.config.get(&0, 0).unwrap_or_default();
        let (port, syn_rate, syn_burst, max_connections) = limits
            .map_or((old.port, old.syn_rate, old.syn_burst, old.max_connections), |(p, r, b, m)| (p as u32, r, b, m));
        let c = GuardConfig { port, allow_v4, allow_v6, syn_rate, syn_burst, max_connections };
        self.config.set(0, c, 0).context("writing `guard_config`")
    }

    /// Adds (`add`) or removes a CIDR on a guard list; takes effect for
    /// the next packet. Returns whether the list changed.
    pub fn change(&mut self, list: GuardList, net: IpNet, add: bool) -> Result<bool> {
        let allow = matches!(list, GuardList::Allow);
        let set = if allow { &mut self.allow } else { &mut self.deny };
        let changed = if add { set.insert(net) } else { set.remove(&net) };
        if !changed {
            return Ok(false);
        }
        if allow && !add {
            // The count first: removing the last entry must not leave a
            // moment where the list counts as non-empty and matches none.
            self.write_config(None)?;
        }
        let name = format!(
            "guard_{}_{}",
            if allow { "allow" } else { "deny" },
            if matches!(net, IpNet::V4(_)) { "v4" } else { "v6" }
        );
        let r = match net {
            IpNet::V4(n) => {
                let t = if allow { &mut self.allow_v4 } else { &mut self.deny_v4 };
                set_entry(t, Key::new(n.prefix_len() as u32, n.network().octets()), add)
            }
            IpNet::V6(n) => {
                let t = if allow { &mut self.allow_v6 } else { &mut self.deny_v6 };
                set_entry(t, Key::new(n.prefix_len() as u32, n.network().octets()), add)
            }
        };
        if let Err(e) = r {
            // Keep the set what the map holds.
            let set = if allow { &mut self.allow } else { &mut self.deny };
            if add {
                set.remove(&net)
            } else {
                set.insert(net)
            };
            if allow && !add {
                let _ = self.write_config(None);
            }
            return Err(anyhow!("{} {net} in `{name}`: {e}", if add { "adding" } else { "removing" }));
        }
        if allow && add {
            self.write_config(None)?;
        }
        Ok(true)
    }

    /// Makes the guard's lists and rate limit what `g` says (a reload:
    /// the file wins over earlier live changes). Returns whether anything
    /// changed.
    pub fn replace(&mut self, g: &crate::config::Guard, port: u16) -> Result<bool> {
        // New entries before stale ones go: the lists never open wider
        // (or, for allow, narrower) than either version. Errors are
        // collected; the rest is applied.
        let mut changed = false;
        let mut err = None;
        for (list, want) in [(GuardList::Deny, &g.deny), (GuardList::Allow, &g.allow)] {
            let have: Vec<IpNet> =
                if matches!(list, GuardList::Deny) { &self.deny } else { &self.allow }.iter().copied().collect();
            for n in want {
                match self.change(list, *n, true) {
                    Ok(c) => changed |= c,
                    Err(e) => _ = err.get_or_insert(e),
                }
            }
            for n in have.iter().filter(|n| !want.contains(n)) {
                match self.change(list, *n, false) {
                    Ok(c) => changed |= c,
                    Err(e) => _ = err.get_or_insert(e),
                }
            }
        }
        let before = self.config.get(&0, 0).ok();
        self.write_config(Some((port, g.syn_rate_per_sec, g.syn_burst, g.max_connections_per_source)))?;
        let after = self.config.get(&0, 0).ok();
        err.map_or(Ok(changed || before != after), Err)
    }

    /// The guard's state: where it is attached, its lists, its counters.
    pub fn show(&self) -> serde_json::Value {
        serde_json::json!({
            "iface": self.at.as_ref().map(|(i, _)| i.clone()),
            "mode": self.at.as_ref().map(|(_, m)| *m),
            "allow": self.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "deny": self.deny.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "counters": counters(&self.stats),
        })
    }
}

/// Adds (`add`) or removes `key` in a guard list's trie.
fn set_entry<K: aya::Pod>(t: &mut LpmTrie<MapData, K, u8>, key: Key<K>, add: bool) -> Result<(), aya::maps::MapError> {
    if add {
        t.insert(&key, 1, 0)
    } else {
        t.remove(&key)
    }
}

/// The guard's packet counters by verdict, summed over CPUs.
pub(super) fn counters<T: std::borrow::Borrow<MapData>>(a: &PerCpuArray<T, u64>) -> BTreeMap<String, u64> {
    (0..verdict::COUNT)
        .map(|v| (verdict::name(v).to_string(), a.get(&v, 0).map(|c| c.iter().sum()).unwrap_or(0)))
        .collect()
}
