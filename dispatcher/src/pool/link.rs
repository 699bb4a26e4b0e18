//! One pool at run time ([`PoolLink`]) and its worker slots
//! ([`SlotLink`]): where the slow path sends a pool's requests (to the
//! current worker's control channel, or waiting for the next worker), the
//! operator's requests to its supervisors, and its stopped state.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

use bytes::Bytes;
use dispatcher_ebpf::abi::RecordHeader;
use tokio::sync::{mpsc, watch};

use super::Context;
use crate::{config::Pool, deliver::Frame, http::local_response};

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
    /// The ring of its slot 0 (slot k's is `first_ring + k`) and its
    /// slots (a web garden when more than one).
    pub first_ring: usize,
    pub slots: Vec<SlotLink>,
    /// The slots rapid-fail protection stopped, and why: the pool is
    /// stopped while any is.
    pub(super) stopped: Mutex<std::collections::BTreeMap<usize, String>>,
    /// Next slot to try for a slow-path request.
    turn: std::sync::atomic::AtomicUsize,
    /// Its workers' counters, summed (`WorkerFrame::Stats`, see `dispatcher_ebpf::wire`).
    pub worker_stats: Mutex<[u64; dispatcher_ebpf::wire::STATS_WORDS]>,
}

/// One worker slot of a pool.
pub struct SlotLink {
    /// Its current worker's control socket, and records waiting for one.
    pub(super) ctl: Mutex<Ctl>,
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
pub(super) struct Ctl {
    pub(super) tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// Slow-path records sent while no worker runs (bounded by the pool's
    /// queue limit, which the slow path checks before sending).
    pub(super) waiting: Vec<Bytes>,
    /// Generation of the control channel in `tx` (one per worker): what
    /// is sent on it is lost with it, what waits goes to the next
    /// (`gen + 1`). A connection keeps the generation each of its
    /// requests went to, and answers 502 for those of a channel that
    /// ended without answering them (`deliver::ToConn::ChannelGone`).
    pub(super) gen: u64,
}

impl Ctl {
    /// A new worker's channel: its generation (what waited goes to it).
    pub(super) fn connect(&mut self, tx: mpsc::UnboundedSender<Bytes>) -> u64 {
        self.gen += 1;
        for b in self.waiting.drain(..) {
            let _ = tx.send(b);
        }
        self.tx = Some(tx);
        self.gen
    }
}

impl SlotLink {
    fn live(&self) -> bool {
        self.ctl.lock().unwrap().tx.as_ref().is_some_and(|t| !t.is_closed())
    }
}

impl PoolLink {
    pub fn new(p: &Pool, index: u32, first_ring: usize) -> Self {
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
            first_ring,
            slots,
            stopped: Mutex::new(Default::default()),
            turn: Default::default(),
            worker_stats: Mutex::new([0; dispatcher_ebpf::wire::STATS_WORDS]),
        }
    }

    /// Sends a slow-path request head to one of the pool's workers (in
    /// turn among the live ones; the first slot when none runs, which
    /// starts one). Returns the slot (local index) its body must follow
    /// and the generation of the control channel it went to.
    pub fn send_head(&self, hdr: RecordHeader, data: &[u8]) -> (usize, u64) {
        let n = self.slots.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let slot = (0..n).map(|k| (start + k) % n).find(|&s| self.slots[s].live()).unwrap_or(0);
        let gen = self.send_record(slot, hdr, data);
        (slot, gen)
    }

    /// Sends a request record (header + data) to slot `slot`'s worker, or
    /// keeps it for the next worker there (and asks for one). Returns the
    /// generation of the channel it goes to (see [`Ctl::gen`]).
    pub fn send_record(&self, slot: usize, hdr: RecordHeader, data: &[u8]) -> u64 {
        let Some(s) = self.slots.get(slot) else { return 0 };
        let buf = record(hdr, data);
        let mut ctl = s.ctl.lock().unwrap();
        let buf = match &ctl.tx {
            Some(tx) => match tx.send(buf) {
                Ok(()) => return ctl.gen,
                Err(e) => e.0,
            },
            None => buf,
        };
        ctl.waiting.push(buf);
        let gen = ctl.gen + 1;
        drop(ctl);
        s.signals.demand.notify_one();
        gen
    }

    /// Sends a record that follows a head (body, trailers) to the worker
    /// that has the head: generation `gen` of slot `slot`'s channel (or,
    /// `None`, whoever takes the slot's ring). A record for a channel that
    /// is gone is dropped (its request gets 502 when the channel's end
    /// reaches the connection): given to the next worker, it would be a
    /// body without a head, which that worker refuses with a 400.
    pub fn send_follow(&self, slot: usize, gen: Option<u64>, hdr: RecordHeader, data: &[u8]) {
        let Some(gen) = gen else {
            self.send_record(slot, hdr, data);
            return;
        };
        let Some(s) = self.slots.get(slot) else { return };
        let ctl = s.ctl.lock().unwrap();
        if gen == ctl.gen + 1 {
            // The head waits for the next worker: so does this.
            drop(ctl);
            self.send_record(slot, hdr, data);
            return;
        }
        let Some(tx) = ctl.tx.as_ref().filter(|_| gen == ctl.gen) else { return };
        let _ = tx.send(record(hdr, data));
    }

    /// Request `seq` of connection `conn` will not be answered by slot
    /// `slot`'s next worker (the one it was sent to died): its records
    /// still waiting there are dropped (they would reach that worker
    /// without their head).
    pub fn forget_request(&self, slot: usize, conn: u64, seq: u32) {
        if let Some(s) = self.slots.get(slot) {
            s.ctl
                .lock()
                .unwrap()
                .waiting
                .retain(|b| RecordHeader::from_bytes(b).is_none_or(|h| h.conn != conn || h.seq != seq));
        }
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

    /// Its rings (the global indices of its slots' rings).
    pub fn ring_range(&self) -> std::ops::Range<usize> {
        self.first_ring..self.first_ring + self.slots.len()
    }

    /// Nothing waits for its workers: its rings are consumed to the end,
    /// no slow-path record waits for a worker, none is unanswered.
    pub fn idle(&self, ctx: &Context) -> bool {
        let rings = ctx.rings.lock().unwrap();
        self.inflight.load(Ordering::Relaxed) == 0
            && self.ring_range().all(|r| !rings.progress(r).queued)
            && self.slots.iter().all(|s| s.ctl.lock().unwrap().waiting.is_empty())
    }

    /// Answers 503 (saying `why`) to every request still queued on slot
    /// `local` (no worker will take them).
    pub fn answer_leftovers(&self, local: usize, ctx: &Context, why: &str) {
        let heads = ctx.rings.lock().unwrap().drain(self.first_ring + local).unwrap_or_else(|e| {
            tracing::error!(pool = %self.name, "draining slot {local}'s ring: {e:#}");
            Vec::new()
        });
        let waiting = std::mem::take(&mut self.slots[local].ctl.lock().unwrap().waiting);
        let slow = waiting
            .iter()
            .filter_map(|b| RecordHeader::from_bytes(b))
            .filter(|h| h.kind == dispatcher_ebpf::abi::RECORD_HEAD);
        for h in heads.into_iter().chain(slow) {
            let r = local_response(503, why, true, true);
            ctx.conns.deliver(h.conn, Frame::whole(h.seq, Bytes::from(r), true));
        }
    }

    pub fn release(&self, bytes: u64) {
        let _ = self.inflight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
    }
}

/// A request record as it goes into a control socket: header, then data.
fn record(hdr: RecordHeader, data: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(hdr.len as usize + 32);
    buf.extend_from_slice(&hdr.to_bytes());
    buf.extend_from_slice(data);
    Bytes::from(buf)
}
