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
        let mut want = wanted_keys(routes)?;
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

/// The table's keys for `routes` (pool index and its routes), each with the
/// pool that owns it.
fn wanted_keys<'a>(routes: impl IntoIterator<Item = (u32, &'a [Route])>) -> Result<HashMap<(u32, RouteKeyData), u32>> {
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
    Ok(owners.into_iter().map(|(k, (_, pool))| (k, pool)).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(s: &str) -> Route {
        let (host, prefix) = s.split_at(s.find('/').unwrap());
        Route { host: (host != "*").then(|| host.to_string()), prefix: prefix.to_string() }
    }

    /// `/api` stores `/api\0` and `/api/`; `/api/` stores `/api/`. Whatever
    /// order the pools come in, the longer route owns the shared key.
    #[test]
    fn the_longer_route_owns_a_shared_key_in_any_order() {
        let bare = [route("*/api")];
        let dir = [route("*/api/")];
        let shared = {
            let (keys, n) = route_keys(WILDCARD_HOST, b"/api/").unwrap();
            assert_eq!(n, 1);
            (keys[0].prefix_len, keys[0].data)
        };
        for table in [vec![(1, &bare[..]), (2, &dir[..])], vec![(2, &dir[..]), (1, &bare[..])]] {
            let want = wanted_keys(table).unwrap();
            assert_eq!(want.len(), 2, "`/api\\0` and `/api/`");
            assert_eq!(want[&shared], 2, "`/api/` belongs to the `*/api/` route");
            assert_eq!(want.values().filter(|p| **p == 1).count(), 1, "`*/api` keeps `/api\\0`");
        }
    }

    /// Equal claims (hosts that differ only in case hash alike) go to the
    /// lower pool index, not to the order they came in.
    #[test]
    fn equal_claims_go_to_the_lower_pool_index() {
        let upper = [route("A.test/x")];
        let lower = [route("a.test/x")];
        for table in [vec![(4, &upper[..]), (3, &lower[..])], vec![(3, &lower[..]), (4, &upper[..])]] {
            assert!(wanted_keys(table).unwrap().values().all(|p| *p == 3));
        }
    }
}
