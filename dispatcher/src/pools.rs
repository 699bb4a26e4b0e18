//! The dispatcher's side of each pool: the control socket of its current
//! worker (slow-path requests out, responses in), its lease socket
//! (connections handed to the worker for direct responses), and the
//! worker's supervision through `activation`.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use dispatcher_ebpf::abi::RecordHeader;
use dispatcher_ebpf::wire::{FrameHeader, LeaseMsg, WorkerFrame, FRAME_HEADER_LEN, MAX_FRAME, NO_ENTRY};
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt, Interest},
    sync::{mpsc, watch},
};
use worker::proto::BATCH_BYTES;

use crate::{config::Pool, conns::Conns, serve::Shared};

/// One pool at run time. A reload that changes a pool's workers makes a
/// new `PoolLink` (new index, new slots) and retires the old one once its
/// queues are empty; one that changes only its routes keeps it.
pub struct PoolLink {
    pub name: String,
    /// Its index in the kernel's `pools` (what routes point to).
    pub index: u32,
    /// Its configuration (routes updated by reloads).
    pub def: Mutex<Pool>,
    /// A reload removed or replaced it: it finishes what it has.
    pub retiring: std::sync::atomic::AtomicBool,
    /// Stops its supervisors; their tasks.
    pub stop: watch::Sender<bool>,
    pub tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Slow-path queue limit (bytes in flight to the workers).
    pub queue_bytes: u64,
    /// Bytes of slow-path requests sent and not yet answered.
    pub inflight: AtomicU64,
    /// The pool's first slot (global index) and its slots (web garden).
    pub first_slot: usize,
    pub slots: Vec<SlotLink>,
    /// The slots rapid-fail protection stopped, and why: the pool is
    /// stopped while any is.
    stopped: Mutex<std::collections::BTreeMap<usize, String>>,
    /// Next slot to try for a slow-path request.
    turn: std::sync::atomic::AtomicUsize,
    /// Its workers' counters, summed (see `worker::proto::RESP_STATS`).
    pub worker_stats: Mutex<[u64; worker::proto::STATS_WORDS]>,
}

/// One worker slot of a pool.
pub struct SlotLink {
    /// Its current worker's control socket, and records waiting for one.
    ctl: Mutex<Ctl>,
    /// Demand (per slot) and start (shared by the pool's slots) signals
    /// for its supervisor.
    pub signals: activation::Signals,
    /// Its worker now (pid, since when), and the crashes it had.
    pub worker: Mutex<Option<(u32, std::time::Instant)>>,
    pub crashes: AtomicU64,
    /// Workers started on it.
    pub starts: AtomicU64,
}

#[derive(Default)]
struct Ctl {
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// Slow-path records sent while no worker runs (bounded by the pool's
    /// queue limit, which the slow path checks before sending).
    waiting: Vec<Bytes>,
}

impl SlotLink {
    fn live(&self) -> bool {
        self.ctl.lock().unwrap().tx.as_ref().is_some_and(|t| !t.is_closed())
    }
}

impl PoolLink {
    pub fn new(p: &Pool, index: u32, first_slot: usize) -> Self {
        let shared = activation::Signals::default();
        let slots = (0..p.max_processes)
            .map(|_| SlotLink {
                ctl: Mutex::new(Ctl::default()),
                signals: activation::Signals {
                    demand: Default::default(),
                    start: shared.start.clone(),
                    start_requests: shared.start_requests.clone(),
                    fault: Default::default(),
                    halt_requests: shared.halt_requests.clone(),
                    halt_start_mark: shared.halt_start_mark.clone(),
                    recycle_requests: shared.recycle_requests.clone(),
                    ops: shared.ops.clone(),
                },
                worker: Mutex::new(None),
                crashes: AtomicU64::new(0),
                starts: AtomicU64::new(0),
            })
            .collect();
        PoolLink {
            name: p.name.clone(),
            index,
            def: Mutex::new(p.clone()),
            retiring: Default::default(),
            stop: watch::channel(false).0,
            tasks: Default::default(),
            queue_bytes: p.queue_bytes as u64,
            inflight: AtomicU64::new(0),
            first_slot,
            slots,
            stopped: Mutex::new(Default::default()),
            turn: Default::default(),
            worker_stats: Mutex::new([0; worker::proto::STATS_WORDS]),
        }
    }

    /// Sends a slow-path request head to one of the pool's workers (in
    /// turn among the live ones; the first slot when none runs, which
    /// starts one). Returns the slot (local index) its body must follow.
    pub fn send_head(&self, hdr: RecordHeader, data: &[u8]) -> usize {
        let n = self.slots.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let slot = (0..n).map(|k| (start + k) % n).find(|&s| self.slots[s].live()).unwrap_or(0);
        self.send_record(slot, hdr, data);
        slot
    }

    /// Sends a request record (header + data) to slot `slot`'s worker, or
    /// keeps it for the next worker there (and asks for one).
    pub fn send_record(&self, slot: usize, hdr: RecordHeader, data: &[u8]) {
        let Some(s) = self.slots.get(slot) else { return };
        let mut buf = Vec::with_capacity(hdr.len as usize + 32);
        buf.extend_from_slice(&hdr.to_bytes());
        buf.extend_from_slice(data);
        let mut ctl = s.ctl.lock().unwrap();
        let buf = match &ctl.tx {
            Some(tx) => match tx.send(Bytes::from(buf)) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => Bytes::from(buf),
        };
        ctl.waiting.push(buf);
        drop(ctl);
        s.signals.demand.notify_one();
    }

    /// Connection `conn` closed: its partly sent requests are void. The
    /// workers are told; records still waiting for one are dropped.
    pub fn abort(&self, conn: u64) {
        for s in &self.slots {
            let mut ctl = s.ctl.lock().unwrap();
            match &ctl.tx {
                Some(tx) if !tx.is_closed() => {
                    let _ = tx.send(Bytes::copy_from_slice(&RecordHeader::abort(conn).to_bytes()));
                }
                _ => ctl.waiting.retain(|b| RecordHeader::from_bytes(b).is_none_or(|h| h.conn != conn)),
            }
        }
    }

    /// Asks the pool's stopped supervisor to start again.
    pub fn request_start(&self) {
        if let Some(s) = self.slots.first() {
            s.signals.start_requests.fetch_add(1, Ordering::SeqCst);
            s.signals.start.notify_waiters();
        }
    }

    /// Asks the pool's supervisors to stop its workers and the pool (503
    /// until a start).
    pub fn request_halt(&self) {
        if let Some(s) = self.slots.first() {
            s.signals.halt_start_mark.store(s.signals.start_requests.load(Ordering::SeqCst), Ordering::SeqCst);
            s.signals.halt_requests.fetch_add(1, Ordering::SeqCst);
            s.signals.ops.notify_waiters();
        }
    }

    /// Asks the pool's supervisors to recycle their workers (overlapped:
    /// see `activation::Policy::recycle_interval`).
    pub fn request_recycle(&self) {
        if let Some(s) = self.slots.first() {
            s.signals.recycle_requests.fetch_add(1, Ordering::SeqCst);
            s.signals.ops.notify_waiters();
        }
    }

    /// Why the pool is stopped, if it is.
    pub fn stopped(&self) -> Option<String> {
        self.stopped.lock().unwrap().values().next().cloned()
    }

    /// Its global slot range.
    pub fn slot_range(&self) -> std::ops::Range<usize> {
        self.first_slot..self.first_slot + self.slots.len()
    }

    /// Nothing waits for its workers: its rings are consumed to the end,
    /// no slow-path record waits for a worker, none is unanswered.
    pub fn idle(&self, kernel: &crate::kernel::Kernel) -> bool {
        self.inflight.load(Ordering::Relaxed) == 0
            && self.slot_range().all(|s| !kernel.progress(s).queued)
            && self.slots.iter().all(|s| s.ctl.lock().unwrap().waiting.is_empty())
    }

    /// Answers 503 (saying `why`) to every request still queued on slot
    /// `local` (no worker will take them).
    pub fn answer_leftovers(&self, local: usize, shared: &Shared, why: &str) {
        let heads = shared.kernel.lock().unwrap().drain_ring(self.first_slot + local).unwrap_or_else(|e| {
            tracing::error!(pool = %self.name, "draining slot {local}'s ring: {e:#}");
            Vec::new()
        });
        let waiting = std::mem::take(&mut self.slots[local].ctl.lock().unwrap().waiting);
        let slow = waiting
            .iter()
            .filter_map(|b| RecordHeader::from_bytes(b))
            .filter(|h| h.kind == dispatcher_ebpf::abi::RECORD_HEAD);
        for h in heads.into_iter().chain(slow) {
            let r = crate::connection::local_response(503, why, true, true);
            shared.conns.deliver(h.conn, Frame::whole(h.seq, Bytes::from(r), true));
        }
    }

    pub fn release(&self, bytes: u64) {
        let _ = self.inflight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
    }
}

/// A frame of a response, on its way to a connection.
#[derive(Debug)]
pub struct Frame {
    pub seq: u32,
    pub data: Bytes,
    pub last: bool,
    pub close: bool,
    /// The worker asks for a lease on the connection once this response
    /// is written; the answer goes to this lease socket.
    pub ask: Option<Arc<LeaseTx>>,
    /// Not a response: the worker gives lease `gen` back, having written
    /// every response before `seq` (and possibly a prefix of `seq`, whose
    /// rest follows as ordinary frames).
    pub release: Option<u32>,
}

impl Frame {
    /// A whole response the dispatcher writes.
    pub fn whole(seq: u32, data: Bytes, close: bool) -> Frame {
        Frame { seq, data, last: true, close, ask: None, release: None }
    }
}

/// The dispatcher's end of one worker's lease socket: grants (with the
/// connection's socket), denials, revocations and forgets, in order.
///
/// A message is sent at once when nothing is queued ahead of it, so a
/// grant is in the worker's socket before the client can have read the
/// response that preceded it and sent its next request (which the worker
/// should already write itself); a full socket queues the rest for a
/// writer task.
#[derive(Debug)]
pub struct LeaseTx {
    sock: AsyncFd<OwnedFd>,
    /// The worker's trace of its leased connections (see
    /// `worker::progress`), read after it dies.
    progress: Arc<worker::progress::ProgressMap>,
    /// Messages not sent yet (the front one is the next to go), and the
    /// connections with a lease out (told when the worker dies).
    queue: Mutex<LeaseQueue>,
    wake: tokio::sync::Notify,
    /// The worker is gone (its control or lease socket closed), and with
    /// it whatever it held.
    dead: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct LeaseQueue {
    msgs: std::collections::VecDeque<(LeaseMsg, Option<OwnedFd>)>,
    /// Connection → (generation, progress entry) of the lease it has out
    /// with this worker.
    granted: std::collections::HashMap<u64, (u32, u32)>,
    /// Progress entries given back, and the next never used.
    free: Vec<u32>,
    next_slot: u32,
}

impl LeaseTx {
    /// Sends `msg` (with `fd` passed along for a grant), or queues it.
    /// False when the worker is gone. A grant is recorded, so that if the
    /// worker dies before giving it back the connection hears of it
    /// (after everything the worker sent before dying).
    pub fn send(&self, mut msg: LeaseMsg, fd: Option<OwnedFd>) -> bool {
        let mut q = self.queue.lock().unwrap();
        if self.is_closed() {
            return false;
        }
        if let LeaseMsg::Grant { conn, from, gen, entry } = &mut msg {
            let slot = match q.free.pop() {
                Some(s) => s,
                None if (q.next_slot as usize) < worker::progress::ENTRIES => {
                    q.next_slot += 1;
                    q.next_slot - 1
                }
                None => NO_ENTRY,
            };
            *entry = slot;
            // Fresh before the worker sees it: a worker that dies without
            // reading the grant leaves this, not an earlier lease's trace.
            self.progress.reset(slot, *conn, *from);
            q.granted.insert(*conn, (*gen, slot));
        }
        if q.msgs.is_empty() {
            match send_lease(self.sock.get_ref(), &msg, fd.as_ref()) {
                // `fd` (our duplicate of the client's socket) closes here:
                // the worker has its own now.
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // The message did not go: a grant is not out.
                    tracing::debug!("lease socket: {e}");
                    if let LeaseMsg::Grant { conn, .. } = msg {
                        if let Some((_, slot)) = q.granted.remove(&conn) {
                            if slot != NO_ENTRY {
                                q.free.push(slot);
                            }
                        }
                        return false;
                    }
                    return true;
                }
            }
        }
        q.msgs.push_back((msg, fd));
        self.wake.notify_one();
        true
    }

    /// Connection `conn` has no lease out with this worker any more.
    pub fn settled(&self, conn: u64) {
        let mut q = self.queue.lock().unwrap();
        if let Some((_, slot)) = q.granted.remove(&conn) {
            if slot != NO_ENTRY {
                q.free.push(slot);
            }
        }
    }

    /// What the (dead) worker traced for `conn`'s lease `gen`: (the next
    /// response it would have written, one past the last request it took,
    /// bytes of the complete responses it wrote).
    pub fn trace(&self, conn: u64, slot: u32) -> Option<worker::progress::Trace> {
        let e = self.progress.entry(slot)?;
        (e.conn.load(std::sync::atomic::Ordering::Acquire) == conn).then(|| e.read())
    }

    /// The worker exited (its control socket ended, after every frame it
    /// sent): the leases it still held are lost.
    fn mark_dead(&self, conns: &Conns) {
        let lost: Vec<(u64, (u32, u32))> = {
            let mut q = self.queue.lock().unwrap();
            self.dead.store(true, Ordering::Relaxed);
            q.msgs.clear();
            q.granted.drain().collect()
        };
        for (conn, (gen, slot)) in lost {
            conns.lease_lost(conn, gen, slot);
        }
        self.wake.notify_one();
    }

    /// The worker exited.
    pub fn is_closed(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// Sends what [`LeaseTx::send`] had to queue, as the socket drains.
    async fn write_queued(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            if self.is_closed() {
                // Drops our end of the socket once the last holder goes.
                return;
            }
            loop {
                let blocked = {
                    let mut q = self.queue.lock().unwrap();
                    let Some((msg, fd)) = q.msgs.front() else { break };
                    match send_lease(self.sock.get_ref(), msg, fd.as_ref()) {
                        Ok(()) => {
                            q.msgs.pop_front();
                            false
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                        Err(e) => {
                            tracing::debug!("lease socket: {e}");
                            q.msgs.clear();
                            return;
                        }
                    }
                };
                if blocked {
                    let Ok(mut g) = self.sock.writable().await else { return };
                    g.clear_ready();
                }
            }
        }
    }
}

/// Makes a lease socket pair and the writer task for our end.
fn lease_socket(progress: Arc<worker::progress::ProgressMap>) -> Result<(Arc<LeaseTx>, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .context("lease socketpair")?;
    let fl = nix::fcntl::fcntl(ours.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).context("F_GETFL")?;
    let fl = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(ours.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl)).context("F_SETFL")?;
    // SAFETY: the AsyncFd owns the fd for as long as it is registered.
    let sock = unsafe { AsyncFd::register_with_interest(ours, Interest::WRITABLE) }?;
    let tx = Arc::new(LeaseTx {
        sock,
        progress,
        queue: Default::default(),
        wake: Default::default(),
        dead: Default::default(),
    });
    tokio::spawn(tx.clone().write_queued());
    Ok((tx, theirs))
}

fn send_lease(sock: &OwnedFd, msg: &LeaseMsg, fd: Option<&OwnedFd>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let bytes = msg.encode();
    let iov = [io::IoSlice::new(&bytes)];
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage> = raw.as_ref().map(|r| ControlMessage::ScmRights(r)).into_iter().collect();
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(io::Error::from)
}

/// Makes a control socket for a new worker of `link`: our end is served
/// by a reader (responses → connections) and a writer task. With `leases`,
/// also a lease socket; returns the worker's ends.
fn connect(
    link: &Arc<PoolLink>,
    slot: usize,
    conns: &Arc<Conns>,
    leases: bool,
    access_log: Option<crate::access_log::AccessLog>,
) -> Result<(OwnedFd, Option<OwnedFd>, Option<OwnedFd>)> {
    let (progress, progress_fd) = worker::progress::ProgressMap::create().context("making a progress map")?;
    let progress = Arc::new(progress);
    let (lease_tx, lease_fd) = match leases {
        true => {
            let (tx, fd) = lease_socket(progress.clone())?;
            (Some(tx), Some(fd))
        }
        false => (None, None),
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("socketpair")?;
    ours.set_nonblocking(true)?;
    let ours = tokio::net::UnixStream::from_std(ours)?;
    let (rd, wr) = ours.into_split();
    // Many response frames per read syscall.
    let mut rd = tokio::io::BufReader::with_capacity(BATCH_BYTES, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    {
        let mut ctl = link.slots[slot].ctl.lock().unwrap();
        for b in ctl.waiting.drain(..) {
            let _ = tx.send(b);
        }
        ctl.tx = Some(tx.clone());
    }
    let name = link.name.clone();
    tokio::spawn(async move {
        if let Err(e) = worker::proto::write_batched(wr, rx, |_| {}).await {
            tracing::debug!(pool = %name, "control socket write: {e}");
        }
    });
    let conns = conns.clone();
    let name = link.name.clone();
    let link = link.clone();
    tokio::spawn(async move {
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        loop {
            if rd.read_exact(&mut hdr).await.is_err() {
                break;
            }
            let h = FrameHeader::from_bytes(&hdr).expect("header length");
            if h.len as usize > MAX_FRAME {
                tracing::error!(pool = %name, len = h.len, "oversized response frame; dropping the worker's socket");
                break;
            }
            let mut data = vec![0u8; h.len as usize];
            if rd.read_exact(&mut data).await.is_err() {
                break;
            }
            match WorkerFrame::decode(&h) {
                Ok(WorkerFrame::Stopped) => {
                    // Later slow-path records wait for (and ask for) the next
                    // worker instead of going to one that no longer reads.
                    let mut ctl = link.slots[slot].ctl.lock().unwrap();
                    if ctl.tx.as_ref().is_some_and(|t| t.same_channel(&tx)) {
                        ctl.tx = None;
                    }
                    drop(ctl);
                    link.slots[slot].signals.demand.notify_one();
                }
                Ok(WorkerFrame::Stats) => {
                    let mut s = link.worker_stats.lock().unwrap();
                    for (w, b) in s.iter_mut().zip(data.chunks_exact(8)) {
                        *w += u64::from_le_bytes(b.try_into().expect("8 bytes"));
                    }
                }
                Ok(WorkerFrame::Log) => {
                    if let Some(log) = &access_log {
                        log.worker_records(&data, |c| conns.peer(c));
                    }
                }
                Ok(WorkerFrame::Release { conn, seq, lease }) => {
                    let release = Some(lease);
                    let f = Frame { seq, data: data.into(), last: false, close: false, ask: None, release };
                    conns.deliver(conn, f);
                }
                Ok(WorkerFrame::Response { conn, seq, last, close, want_lease }) => {
                    let ask = if want_lease { lease_tx.clone() } else { None };
                    conns.deliver(conn, Frame { seq, data: Bytes::from(data), last, close, ask, release: None });
                }
                Err(e) => tracing::warn!(pool = %name, "skipping a frame from the worker: {e}"),
            }
        }
        tracing::debug!(pool = %name, "control socket closed");
        {
            // Later slow-path records wait for the next worker (and ask
            // for one) instead of going into a dead socket.
            let mut ctl = link.slots[slot].ctl.lock().unwrap();
            if ctl.tx.as_ref().is_some_and(|t| t.same_channel(&tx)) {
                ctl.tx = None;
            }
        }
        if let Some(l) = lease_tx {
            l.mark_dead(&conns);
        }
        // Every frame it wrote is delivered (above): what its trace still
        // marks was taken and never answered.
        for (conn, taken, in_flight) in progress.loose_unanswered() {
            conns.lost(conn, taken, in_flight);
        }
    });
    Ok((theirs.into(), lease_fd, Some(progress_fd)))
}

/// The dispatcher's side of one worker slot: pool `pool`'s slot `local`,
/// global slot `slot`.
#[derive(Clone)]
struct PoolSlot {
    pool: usize,
    local: usize,
    slot: usize,
    link: Arc<PoolLink>,
    shared: Arc<Shared>,
}

impl activation::Slot for PoolSlot {
    fn handles(&mut self) -> Result<activation::Handles> {
        let (ctl, lease, progress) = connect(
            &self.link,
            self.local,
            &self.shared.conns,
            self.shared.cfg.direct_responses,
            self.shared.access_log.clone(),
        )?;
        let k = self.shared.kernel.lock().unwrap();
        Ok(activation::Handles {
            ring: Some(k.ring_fd(self.slot)?),
            ctl,
            lease,
            awake: Some(k.awake_fd(self.slot)?),
            progress,
        })
    }

    fn vacate(&mut self) -> bool {
        let on_ring = self.shared.kernel.lock().unwrap().vacate(self.slot);
        on_ring || !self.link.slots[self.local].ctl.lock().unwrap().waiting.is_empty()
    }

    fn progress(&mut self) -> activation::Progress {
        self.shared.kernel.lock().unwrap().progress(self.slot)
    }

    fn started(&mut self, pid: u32) {
        let s = &self.link.slots[self.local];
        *s.worker.lock().unwrap() = Some((pid, std::time::Instant::now()));
        s.starts.fetch_add(1, Ordering::Relaxed);
    }

    fn adopted(&mut self, pid: u32) {
        let s = &self.link.slots[self.local];
        s.worker.lock().unwrap().get_or_insert((pid, std::time::Instant::now()));
    }

    fn exited(&mut self, crashed: bool) {
        let s = &self.link.slots[self.local];
        *s.worker.lock().unwrap() = None;
        // A worker that stopped pulling is still finishing what it took,
        // but takes nothing more: later slow-path records wait for (and
        // ask for) the next one.
        s.ctl.lock().unwrap().tx = None;
        if crashed {
            s.crashes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn stopped(&mut self, stopped: bool, why: &str) {
        let any_stopped = {
            let mut s = self.link.stopped.lock().unwrap();
            match stopped {
                true => s.insert(self.local, why.to_string()),
                false => s.remove(&self.local),
            };
            !s.is_empty()
        };
        let mut k = self.shared.kernel.lock().unwrap();
        if let Err(e) = k.set_pool_running(self.pool, !any_stopped) {
            tracing::error!(pool = %self.link.name, "{e:#}");
        }
        if !stopped {
            return;
        }
        drop(k);
        // What waits for this pool gets its 503 now rather than a 504 later.
        self.link.answer_leftovers(self.local, &self.shared, &format!("pool `{}` is stopped: {why}", self.link.name));
    }
}

/// Starts supervising slot `local` of `link`'s pool.
pub fn supervise(
    link: Arc<PoolLink>,
    local: usize,
    shared: Arc<Shared>,
    pool: &Pool,
    command: PathBuf,
    args: Vec<String>,
) -> tokio::task::JoinHandle<()> {
    let index = link.index as usize;
    let stop = link.stop.subscribe();
    let spec = activation::WorkerSpec {
        pool: pool.name.clone(),
        command,
        args,
        env: pool
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(shared.access_log.is_some().then(|| (activation::env::ACCESS_LOG.to_string(), "1".to_string())))
            .collect(),
        user: Some(pool.user.clone()),
        group: pool.group.clone(),
    };
    let policy = activation::Policy {
        // The first `min_processes` slots always run.
        start: if pool.always_running || (local as u32) < pool.min_processes {
            activation::StartMode::AlwaysRunning
        } else {
            activation::StartMode::OnDemand
        },
        idle_timeout: (pool.idle_timeout_secs > 0).then(|| Duration::from_secs(pool.idle_timeout_secs)),
        rapid_fail: (pool.rapid_fail_max_crashes > 0)
            .then(|| (pool.rapid_fail_max_crashes, Duration::from_secs(pool.rapid_fail_interval_secs))),
        ping: (pool.ping_interval_secs > 0).then(|| {
            (Duration::from_secs(pool.ping_interval_secs), Duration::from_secs(pool.ping_response_limit_secs))
        }),
        startup_limit: Duration::from_secs(pool.startup_time_limit_secs),
        shutdown_limit: Duration::from_secs(pool.shutdown_time_limit_secs),
        recycle_requests: (pool.recycle_requests > 0).then_some(pool.recycle_requests),
        recycle_interval: (pool.recycle_interval_secs > 0).then(|| Duration::from_secs(pool.recycle_interval_secs)),
        recycle_private_kib: (pool.recycle_private_memory_kib > 0).then_some(pool.recycle_private_memory_kib),
    };
    let signals = link.slots[local].signals.clone();
    let slot = link.first_slot + local;
    tokio::spawn(activation::supervise(
        spec,
        policy,
        PoolSlot { pool: index, local, slot, link, shared },
        signals,
        stop,
    ))
}
