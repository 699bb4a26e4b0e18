//! The route table (`routes`, an LPM trie): written by the registry at
//! start-up and on reloads, read by the slow path with the kernel's own
//! lookup, listed readably in `route_names` for bpftool.

use std::{collections::HashMap, os::fd::AsFd};

use anyhow::{anyhow, Context, Result};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    MapData,
};
use dispatcher_ebpf::{
    abi::{RouteKeyData, RouteValue, WILDCARD_HOST},
    route::{self, request_key, route_keys, RouteKey},
    scan::host_hash,
};

use super::route_names::RouteNames;
use crate::config::Route;

type Trie = LpmTrie<MapData, RouteKeyData, RouteValue>;

/// The writer's side: what the table holds, and the readable list.
pub struct RouteTable {
    trie: Trie,
    /// The table's keys and the pool each points to, as written.
    keys: HashMap<(u32, RouteKeyData), u32>,
    /// The readable list of routes (a display aid: absent when the
    /// kernel refused its hand-made BTF).
    names: Option<RouteNames>,
}

/// The reader's side: the slow path's lookups, with no lock (a second
/// handle on the same map).
pub struct RouteLookup {
    trie: Trie,
}

/// Where a slow-path request routes, mirroring the kernel's lookup.
pub enum Routed {
    Pool(u32),
    NoRoute,
}

impl RouteTable {
    /// Takes the `routes` map; makes the reader's handle on it.
    pub(super) fn new(map: aya::maps::Map, names: Option<RouteNames>) -> Result<(RouteTable, RouteLookup)> {
        let dup = match &map {
            aya::maps::Map::LpmTrie(d) => d.fd().as_fd().try_clone_to_owned().context("duplicating the `routes` fd")?,
            _ => return Err(anyhow!("map `routes` has an unexpected type")),
        };
        let trie: Trie = LpmTrie::try_from(map)?;
        let reader = LpmTrie::try_from(aya::maps::Map::LpmTrie(MapData::from_fd(dup).context("opening `routes`")?))?;
        Ok((RouteTable { trie, keys: HashMap::new(), names }, RouteLookup { trie: reader }))
    }

    /// Makes the route table say what `routes` says (pool index and its
    /// routes): new keys are written first, then stale ones deleted, so a
    /// lookup finds the old route or the new one, never none.
    pub fn set<'a>(&mut self, routes: impl IntoIterator<Item = (u32, &'a [Route])>) -> Result<()> {
        // Key → (length of the route prefix that wrote it, pool). `/app`
        // is stored as `/app\0` and `/app/`, so it shares `/app/` with a
        // route `/app/` of another pool: the longer route prefix owns it
        // (longest prefix wins, as for any other pair), whatever the order
        // the pools come in; equal ones (`A.test/x` and `a.test/x`) go to
        // the lower pool index.
        let mut owners: HashMap<(u32, RouteKeyData), (usize, u32)> = HashMap::new();
        for (pool, rs) in routes {
            for r in rs {
                let h = r.host.as_deref().map(|h| host_hash(h.as_bytes())).unwrap_or(WILDCARD_HOST);
                let (keys, n) = route_keys(h, r.prefix.as_bytes()).map_err(|e| anyhow!("route {r}: {e:?}"))?;
                for k in &keys[..n] {
                    let claim = (r.prefix.len(), pool);
                    owners
                        .entry((k.prefix_len, k.data))
                        .and_modify(|o| {
                            if claim.0 > o.0 || (claim.0 == o.0 && claim.1 < o.1) {
                                *o = claim;
                            }
                        })
                        .or_insert(claim);
                }
            }
        }
        let mut want: HashMap<(u32, RouteKeyData), u32> = owners.into_iter().map(|(k, (_, pool))| (k, pool)).collect();
        let old = std::mem::take(&mut self.keys);
        let mut err = None;
        let mut failed = Vec::new();
        for (k, pool) in &want {
            if old.get(k) != Some(pool) {
                if let Err(e) = self.trie.insert(&Key::new(k.0, k.1), RouteValue { pool: *pool, _pad: 0 }, 0) {
                    err.get_or_insert(anyhow!("inserting a route key: {e}"));
                    failed.push(*k);
                }
            }
        }
        // What the table really holds: a key that failed keeps its old
        // value, if it had one, and is written again by the next reload.
        for k in failed {
            match old.get(&k) {
                Some(p) => want.insert(k, *p),
                None => want.remove(&k),
            };
        }
        for k in old.keys() {
            if !want.contains_key(k) {
                let _ = self.trie.remove(&Key::new(k.0, k.1));
            }
        }
        self.keys = want;
        err.map_or(Ok(()), Err)
    }

    /// Lists the routes readably in `route_names`: (host or `*`, prefix,
    /// pool name, pool index), in match order.
    pub fn list(&mut self, rows: &[(String, String, String, u32)]) -> Result<()> {
        match &mut self.names {
            Some(r) => r.set(rows),
            None => Ok(()),
        }
    }
}

impl RouteLookup {
    /// Routes a request the slow path parsed, with the kernel's own table.
    pub fn route(&self, host: Option<&[u8]>, path: &[u8]) -> Routed {
        let h = match host {
            Some(h) if !dispatcher_ebpf::scan::strip_port(h).is_empty() => host_hash(h),
            _ => WILDCARD_HOST,
        };
        let look = |k: &RouteKey| self.trie.get(&Key::new(k.prefix_len, k.data), 0).ok();
        match route::lookup(&mut request_key(h, path), h, look) {
            Some(v) => Routed::Pool(v.pool),
            None => Routed::NoRoute,
        }
    }
}
