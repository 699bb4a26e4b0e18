//! The worker's half of the ring wake-up protocol (`abi::RING_AWAKE_YES`):
//! while the flag says awake, the kernel queues records without waking
//! anyone, which saves an interrupt per record when the worker keeps up.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use dispatcher_ebpf::abi::{RING_AWAKE_NO, RING_AWAKE_NO_WORKER, RING_AWAKE_YES};

/// The slot's flag: value 0 of a one-entry mmapable BPF array.
pub(crate) struct Awake {
    page: NonNull<AtomicU32>,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for Awake {}
unsafe impl Sync for Awake {}

impl Awake {
    pub(crate) fn map(fd: OwnedFd) -> std::io::Result<Awake> {
        // SAFETY: sysconf has no preconditions.
        let len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: a fresh shared mapping of the map's value area.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = NonNull::new(p as *mut AtomicU32).expect("mmap returned null");
        Ok(Awake { page, len, _fd: fd })
    }

    fn flag(&self) -> &AtomicU32 {
        // SAFETY: the mapping lives as long as self; value 0 is at offset 0.
        unsafe { self.page.as_ref() }
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

impl Drop for Awake {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.page.as_ptr() as *mut _, self.len) };
    }
}
