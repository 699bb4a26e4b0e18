//! Where a worker leaves a trace of the leased connections it writes to,
//! so that if it dies the dispatcher knows how far each one got.
//!
//! A shared memory file (memfd) the dispatcher makes per worker; a grant
//! names an entry (`LeaseMsg::Grant`'s `entry`). The worker stores, per leased
//! connection, the next response it would write, the bytes of the complete
//! responses it wrote, the length of the one it is writing, and one past
//! the last request it took. After the worker's death the dispatcher
//! compares those bytes with what the socket took: a match means the
//! stream stopped between two responses, so the connection goes on there,
//! and the requests the dead worker took and never answered get 502.
//!
//! Past the lease entries lie [`LOOSE_ENTRIES`] more that the worker
//! manages itself ([`Loose`]): one per connection it took requests of
//! without holding its lease, with the requests taken and not answered
//! yet. A bit is cleared only once the response's last frame is written
//! into the control socket, so after the worker's death every request it
//! took is either answered in what the dispatcher read from that socket or
//! marked here (and answered 502).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

/// Entries per worker: the most connections one worker can hold leases on.
pub const ENTRIES: usize = 65536;
/// Entries for connections without a lease (see [`Loose`]); the first is
/// a header whose `taken` counts the entries used so far.
pub const LOOSE_ENTRIES: usize = 65536;
const MAP_BYTES: usize = (ENTRIES + LOOSE_ENTRIES) * std::mem::size_of::<Entry>();

/// One leased connection's trace. The writer state is double-buffered: a
/// worker killed in the middle of an update leaves the previous state
/// selected (`active` flips with one store, after the new state is
/// written), so what the dispatcher reads is always whole.
#[repr(C)]
#[derive(Default, Debug)]
pub struct Entry {
    pub conn: AtomicU64,
    /// One past the last request taken.
    pub taken: AtomicU32,
    active: AtomicU32,
    /// Requests taken and not answered, bit `seq % 64` (the dispatcher
    /// answers 502 for these, and only these, if the worker dies).
    pub in_flight: AtomicU64,
    states: [State; 2],
}

#[repr(C)]
#[derive(Default, Debug)]
struct State {
    /// Bytes of the complete responses written under the lease.
    complete_bytes: AtomicU64,
    /// The next response to write.
    next: AtomicU32,
    /// Length of response `next` while it is being written (0: none).
    pending: AtomicU32,
}

/// A trace as the dispatcher reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trace {
    pub next: u32,
    pub taken: u32,
    pub complete_bytes: u64,
    /// Length of response `next` if the worker was writing it.
    pub pending: u32,
    /// See [`Entry::in_flight`].
    pub in_flight: u64,
}

impl Entry {
    /// Records the writer's state (the worker's side).
    pub fn record(&self, next: u32, complete_bytes: u64, pending: u32) {
        let spare = (self.active.load(Ordering::Relaxed) ^ 1) as usize & 1;
        let s = &self.states[spare];
        s.complete_bytes.store(complete_bytes, Ordering::Relaxed);
        s.next.store(next, Ordering::Relaxed);
        s.pending.store(pending, Ordering::Relaxed);
        self.active.store(spare as u32, Ordering::Release);
    }

    /// Reads the trace (the dispatcher's side, after the worker died).
    pub fn read(&self) -> Trace {
        let s = &self.states[self.active.load(Ordering::Acquire) as usize & 1];
        Trace {
            next: s.next.load(Ordering::Relaxed),
            taken: self.taken.load(Ordering::Relaxed),
            complete_bytes: s.complete_bytes.load(Ordering::Relaxed),
            pending: s.pending.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// A worker's entries, mapped.
#[derive(Debug)]
pub struct ProgressMap {
    /// `ENTRIES` entries, then `LOOSE_ENTRIES` loose ones (shared memory
    /// accessed only through atomics).
    map: memmap2::MmapRaw,
}

impl ProgressMap {
    /// Makes a new zeroed map (pages are allocated as they are touched);
    /// returns it and the fd to hand the worker.
    pub fn create() -> io::Result<(ProgressMap, OwnedFd)> {
        // SAFETY: a name and flags; the kernel returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"dispatcher-progress".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = MAP_BYTES;
        // SAFETY: resizing our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let map = Self::map_fd(&fd)?;
        Ok((map, fd))
    }

    /// Maps a map made by [`ProgressMap::create`] (the worker's side).
    pub fn map(fd: OwnedFd) -> io::Result<ProgressMap> {
        Self::map_fd(&fd)
    }

    fn map_fd(fd: &OwnedFd) -> io::Result<ProgressMap> {
        Ok(ProgressMap { map: memmap2::MmapOptions::new().len(MAP_BYTES).map_raw(fd.as_raw_fd())? })
    }

    fn entries(&self) -> *const Entry {
        self.map.as_ptr() as *const Entry
    }

    pub fn entry(&self, i: u32) -> Option<&Entry> {
        // SAFETY: in bounds of the mapping, which lives as long as self.
        ((i as usize) < ENTRIES).then(|| unsafe { &*self.entries().add(i as usize) })
    }

    fn loose(&self, i: u32) -> Option<&Entry> {
        // SAFETY: in bounds of the mapping, which lives as long as self.
        ((i as usize) < LOOSE_ENTRIES).then(|| unsafe { &*self.entries().add(ENTRIES + i as usize) })
    }

    /// After the worker's death: per connection it had no lease on, one
    /// past the last request it took and the bits (`seq % 64`) of those it
    /// did not answer.
    pub fn loose_unanswered(&self) -> Vec<(u64, u32, u64)> {
        let used = self.loose(0).map_or(0, |h| h.taken.load(Ordering::Acquire)).min(LOOSE_ENTRIES as u32);
        (1..used)
            .filter_map(|i| self.loose(i))
            .map(|e| {
                (e.conn.load(Ordering::Acquire), e.taken.load(Ordering::Acquire), e.in_flight.load(Ordering::Acquire))
            })
            .filter(|(conn, _, bits)| *conn != 0 && *bits != 0)
            .collect()
    }

    /// Starts entry `i` for a new lease on `conn` from response `from`
    /// (the dispatcher does before the grant; the worker again on it).
    pub fn reset(&self, i: u32, conn: u64, from: u32) {
        if let Some(e) = self.entry(i) {
            e.conn.store(conn, Ordering::Relaxed);
            e.taken.store(from, Ordering::Relaxed);
            e.in_flight.store(0, Ordering::Relaxed);
            e.record(from, 0, 0);
        }
    }
}

/// The worker's side of the loose entries: which connection has which.
pub struct Loose {
    map: std::sync::Arc<ProgressMap>,
    inner: std::sync::Mutex<LooseInner>,
}

struct LooseInner {
    by_conn: std::collections::HashMap<u64, u32>,
    free: Vec<u32>,
    next: u32,
}

impl Loose {
    pub fn new(map: std::sync::Arc<ProgressMap>) -> Loose {
        let inner = LooseInner { by_conn: Default::default(), free: Vec::new(), next: 1 };
        Loose { map, inner: std::sync::Mutex::new(inner) }
    }

    /// Request `seq` of `conn` was taken (its head left the ring).
    pub fn taken(&self, conn: u64, seq: u32) {
        let mut l = self.inner.lock().unwrap();
        let i = match l.by_conn.get(&conn) {
            Some(i) => *i,
            None => {
                let i = match l.free.pop() {
                    Some(i) => i,
                    None if (l.next as usize) < LOOSE_ENTRIES => {
                        l.next += 1;
                        if let Some(h) = self.map.loose(0) {
                            h.taken.store(l.next, Ordering::Release);
                        }
                        l.next - 1
                    }
                    // Full: this connection goes untraced (a crash leaves
                    // its request to the response time-out).
                    None => return,
                };
                if let Some(e) = self.map.loose(i) {
                    e.in_flight.store(0, Ordering::Relaxed);
                    e.taken.store(seq, Ordering::Relaxed);
                    e.conn.store(conn, Ordering::Release);
                }
                l.by_conn.insert(conn, i);
                i
            }
        };
        if let Some(e) = self.map.loose(i) {
            e.taken.fetch_max(seq.wrapping_add(1), Ordering::Release);
            e.in_flight.fetch_or(1u64 << (seq % 64), Ordering::Release);
        }
    }

    /// `frames` (whole response frames, as written into the control
    /// socket) are out: their requests are answered.
    pub fn written(&self, mut frames: &[u8]) {
        use dispatcher_ebpf::wire::{FrameHeader, WorkerFrame, FRAME_HEADER_LEN};
        let mut l = self.inner.lock().unwrap();
        if l.by_conn.is_empty() {
            return;
        }
        while let Some(h) = frames.get(..FRAME_HEADER_LEN).and_then(FrameHeader::from_bytes) {
            frames = frames.get(FRAME_HEADER_LEN + h.len as usize..).unwrap_or(&[]);
            let Ok(WorkerFrame::Response { conn, seq, last: true, .. }) = WorkerFrame::decode(&h) else { continue };
            let Some(&i) = l.by_conn.get(&conn) else { continue };
            let Some(e) = self.map.loose(i) else { continue };
            let bit = 1u64 << (seq % 64);
            if e.in_flight.fetch_and(!bit, Ordering::Release) == bit {
                // Nothing left: the entry is free again.
                e.conn.store(0, Ordering::Release);
                l.by_conn.remove(&conn);
                l.free.push(i);
            }
        }
    }

    /// Takes `conn`'s entry out (a lease's trace carries it on, or the
    /// connection is gone): (one past the last taken, unanswered bits).
    pub fn take_out(&self, conn: u64) -> (u32, u64) {
        let mut l = self.inner.lock().unwrap();
        let Some(i) = l.by_conn.remove(&conn) else { return (0, 0) };
        l.free.push(i);
        let Some(e) = self.map.loose(i) else { return (0, 0) };
        let r = (e.taken.load(Ordering::Relaxed), e.in_flight.swap(0, Ordering::Relaxed));
        e.conn.store(0, Ordering::Release);
        r
    }
}
