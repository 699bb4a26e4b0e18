//! The raw `bpf(2)` map commands that aya's typed maps do not cover: a
//! lookup into a heap value, updates of map-of-maps entries by fd, and
//! deletes by key, all on a map fd that the caller owns.

use std::os::fd::RawFd;

/// `union bpf_attr` for the map element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

fn map_cmd<K>(cmd: libc::c_long, map: RawFd, key: &K, value: u64) -> std::io::Result<()> {
    let attr = ElemAttr { map_fd: map as u32, _pad: 0, key: key as *const K as u64, value, flags: 0 };
    // SAFETY: a map element command with a correctly sized attr; the
    // callers pass keys and values of the map's sizes.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, &attr as *const ElemAttr, std::mem::size_of::<ElemAttr>()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf_map_lookup_elem` into a heap value (`ConnState` is too large for
/// comfortable stack copies).
pub fn lookup_boxed<K, V: Copy>(map: RawFd, key: &K) -> Option<Box<V>> {
    let mut val: Box<std::mem::MaybeUninit<V>> = Box::new_uninit();
    // The kernel writes value_size bytes, which is size_of::<V>() for the
    // callers' maps.
    map_cmd(BPF_MAP_LOOKUP_ELEM, map, key, val.as_mut_ptr() as u64).ok()?;
    // SAFETY: the kernel filled the value.
    Some(unsafe { val.assume_init() })
}

/// `bpf_map_update_elem` with a key and value of the map's sizes.
pub fn update_elem<K, V>(map: RawFd, key: &K, value: &V) -> std::io::Result<()> {
    map_cmd(BPF_MAP_UPDATE_ELEM, map, key, value as *const V as u64)
}

/// `bpf_map_update_elem` of a map-of-maps entry (the value is a map fd).
pub fn update_fd_elem(map: RawFd, index: u32, fd: RawFd) -> std::io::Result<()> {
    update_elem(map, &index, &(fd as u32))
}

/// `bpf_map_delete_elem` of the entry with key `key`.
pub fn delete_elem<K>(map: RawFd, key: &K) -> std::io::Result<()> {
    map_cmd(BPF_MAP_DELETE_ELEM, map, key, 0)
}
