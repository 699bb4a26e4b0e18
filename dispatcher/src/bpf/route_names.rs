//! `route_names`: a pinned map that `bpftool map dump` prints readably,
//! one entry per configured route in match order: `{host, prefix, pool,
//! pool_index}`. The kernel's own table (`routes`, an LPM trie) is keyed
//! by a hash of the host and the path's bytes, which bpftool can only
//! print as numbers; nothing in the kernel reads this map.
//!
//! bpftool prints an array as a string only when its element type is a
//! BTF `char`, which Rust's debug info never produces, so this map is
//! created with BTF made here: `char`, `unsigned int`, the arrays and the
//! `route_name` struct.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

/// Bytes kept of a host, a prefix and a pool name (NUL-terminated).
pub const HOST_LEN: usize = 64;
pub const PREFIX_LEN: usize = 128;
pub const POOL_LEN: usize = 32;
/// Routes listed at most.
pub const MAX_ENTRIES: u32 = 65536;

/// The map's value, laid out as its BTF says.
#[repr(C)]
struct RouteName {
    host: [u8; HOST_LEN],
    prefix: [u8; PREFIX_LEN],
    pool: [u8; POOL_LEN],
    pool_index: u32,
}

/// The map, open and pinned.
pub struct RouteNames {
    map: OwnedFd,
    len: u32,
}

fn sys_bpf<T>(cmd: i64, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is the attribute struct of `cmd`, zero-padded.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// The BTF blob: types 1 `char`, 2 `unsigned int`, 3-5 the arrays,
/// 6 `struct route_name`.
fn btf() -> Vec<u8> {
    let mut strs = vec![0u8];
    let mut name = |s: &str| {
        let off = strs.len() as u32;
        strs.extend_from_slice(s.as_bytes());
        strs.push(0);
        off
    };
    let (char_, uint, route_name) = (name("char"), name("unsigned int"), name("route_name"));
    let (host, prefix, pool, pool_index) = (name("host"), name("prefix"), name("pool"), name("pool_index"));
    let mut t: Vec<u32> = Vec::new();
    const INT: u32 = 1;
    const ARRAY: u32 = 3;
    const STRUCT: u32 = 4;
    const BTF_INT_CHAR: u32 = 2;
    // 1: char (1 byte, 8 bits, CHAR encoding)
    t.extend([char_, INT << 24, 1, (BTF_INT_CHAR << 24) | 8]);
    // 2: unsigned int
    t.extend([uint, INT << 24, 4, 32]);
    // 3..5: char[HOST_LEN], char[PREFIX_LEN], char[POOL_LEN]
    for n in [HOST_LEN, PREFIX_LEN, POOL_LEN] {
        t.extend([0, ARRAY << 24, 0, 1, 2, n as u32]);
    }
    // 6: struct route_name { host; prefix; pool; pool_index }
    t.extend([route_name, (STRUCT << 24) | 4, std::mem::size_of::<RouteName>() as u32]);
    t.extend([host, 3, 0]);
    t.extend([prefix, 4, (HOST_LEN * 8) as u32]);
    t.extend([pool, 5, ((HOST_LEN + PREFIX_LEN) * 8) as u32]);
    t.extend([pool_index, 2, ((HOST_LEN + PREFIX_LEN + POOL_LEN) * 8) as u32]);
    let types: Vec<u8> = t.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut b = Vec::new();
    b.extend_from_slice(&0xeb9fu16.to_le_bytes());
    b.push(1); // version
    b.push(0); // flags
    b.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
    b.extend_from_slice(&0u32.to_le_bytes()); // type_off
    b.extend_from_slice(&(types.len() as u32).to_le_bytes());
    b.extend_from_slice(&(types.len() as u32).to_le_bytes()); // str_off
    b.extend_from_slice(&(strs.len() as u32).to_le_bytes());
    b.extend_from_slice(&types);
    b.extend_from_slice(&strs);
    b
}

impl RouteNames {
    /// Creates the map and pins it at `pin`.
    pub fn create(pin: &std::path::Path) -> Result<RouteNames> {
        let blob = btf();
        let mut log = vec![0u8; 4096];
        #[repr(C)]
        struct BtfLoad {
            btf: u64,
            log_buf: u64,
            btf_size: u32,
            log_size: u32,
            log_level: u32,
            // Zero: kernels before 6.4 refuse non-zero bytes past the
            // attribute they know (and this would be padding otherwise).
            log_true_size: u32,
        }
        let mut a = BtfLoad {
            btf: blob.as_ptr() as u64,
            log_buf: log.as_mut_ptr() as u64,
            btf_size: blob.len() as u32,
            log_size: log.len() as u32,
            log_level: 1,
            log_true_size: 0,
        };
        let btf = sys_bpf(18, &mut a).map_err(|e| {
            let msg = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned();
            anyhow::anyhow!("loading the BTF of `route_names`: {e}: {msg}")
        })?;
        // SAFETY: a new fd from the kernel.
        let btf = unsafe { OwnedFd::from_raw_fd(btf as i32) };
        #[repr(C)]
        #[derive(Default)]
        struct MapCreate {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
            inner_map_fd: u32,
            numa_node: u32,
            map_name: [u8; 16],
            map_ifindex: u32,
            btf_fd: u32,
            btf_key_type_id: u32,
            btf_value_type_id: u32,
            btf_vmlinux_value_type_id: u32,
            map_extra: u64,
        }
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"route_names");
        const BPF_MAP_TYPE_HASH: u32 = 1;
        const BPF_F_NO_PREALLOC: u32 = 1;
        let mut c = MapCreate {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: 4,
            value_size: std::mem::size_of::<RouteName>() as u32,
            max_entries: MAX_ENTRIES,
            map_flags: BPF_F_NO_PREALLOC,
            map_name: name,
            btf_fd: btf.as_raw_fd() as u32,
            btf_key_type_id: 2,
            btf_value_type_id: 6,
            ..Default::default()
        };
        let fd = sys_bpf(0, &mut c).context("creating `route_names`")?;
        // SAFETY: a new fd from the kernel.
        let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).context("pin path")?;
        #[repr(C)]
        struct ObjPin {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let mut p = ObjPin { pathname: path.as_ptr() as u64, bpf_fd: map.as_raw_fd() as u32, file_flags: 0 };
        sys_bpf(6, &mut p).with_context(|| format!("pinning `route_names` at {}", pin.display()))?;
        Ok(RouteNames { map, len: 0 })
    }

    /// Makes the map list `routes` (host or `*`, prefix, pool name, pool
    /// index), in this order.
    pub fn set(&mut self, routes: &[(String, String, String, u32)]) -> Result<()> {
        if routes.len() > MAX_ENTRIES as usize {
            bail!("more than {MAX_ENTRIES} routes to list in `route_names`");
        }
        let text = |s: &str, out: &mut [u8]| {
            let n = s.len().min(out.len() - 1);
            out[..n].copy_from_slice(&s.as_bytes()[..n]);
        };
        for (i, (host, prefix, pool, index)) in routes.iter().enumerate() {
            let mut v =
                RouteName { host: [0; HOST_LEN], prefix: [0; PREFIX_LEN], pool: [0; POOL_LEN], pool_index: *index };
            text(host, &mut v.host);
            text(prefix, &mut v.prefix);
            text(pool, &mut v.pool);
            self.update(i as u32, Some(&v))?;
        }
        for i in routes.len() as u32..self.len {
            self.update(i, None)?;
        }
        self.len = routes.len() as u32;
        Ok(())
    }

    fn update(&self, key: u32, value: Option<&RouteName>) -> Result<()> {
        let fd = self.map.as_raw_fd();
        match value {
            Some(v) => super::sys::update_elem(fd, &key, v),
            None => super::sys::delete_elem(fd, &key),
        }
        .context("writing `route_names`")
    }
}
