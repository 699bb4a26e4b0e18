//! The worker's half of the ring wake-up protocol (`abi::RING_AWAKE_YES`):
//! while the flag says awake, the kernel queues records without waking
//! anyone, which saves an interrupt per record when the worker keeps up.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering},
};

use dispatcher_ebpf::abi::{RING_AWAKE_NO, RING_AWAKE_NO_WORKER, RING_AWAKE_YES};

/// The slot's flag: value 0 of a one-entry mmapable BPF array.
pub(crate) struct Awake {
    page: memmap2::MmapRaw,
    _fd: OwnedFd,
}

impl Awake {
    pub(crate) fn map(fd: OwnedFd) -> std::io::Result<Awake> {
        // The map's value area: its first page.
        let page = memmap2::MmapOptions::new().len(page_size()).map_raw(fd.as_raw_fd())?;
        Ok(Awake { page, _fd: fd })
    }

    fn flag(&self) -> &AtomicU32 {
        // SAFETY: the mapping lives as long as self; value 0 is at offset 0,
        // aligned (a page), and only ever accessed atomically.
        unsafe { &*(self.page.as_mut_ptr() as *const AtomicU32) }
    }

    /// Draining: no wake-ups needed.
    pub(crate) fn set_awake(&self) {
        self.flag().store(RING_AWAKE_YES, Ordering::Relaxed);
    }

    /// About to sleep. The caller must look at the ring once more
    /// afterwards (the store is ordered before that look).
    pub(crate) fn set_asleep(&self) {
        self.flag().swap(RING_AWAKE_NO, Ordering::SeqCst);
    }
}

impl Awake {
    /// This worker will not look at the ring again: the slot is
    /// workerless (the kernel raises a demand for the next request, and
    /// the supervisor may start the next worker at once).
    pub(crate) fn set_stopped(&self) {
        self.flag().swap(RING_AWAKE_NO_WORKER, Ordering::SeqCst);
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
