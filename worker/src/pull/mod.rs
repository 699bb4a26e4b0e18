//! Where a worker's requests come from: the pool's ring (requests the
//! kernel framed) and the control socket (requests the dispatcher's slow
//! path framed, and its aborts), reassembled into whole requests.
//!
//! [`Puller`] is the loop that takes them, one job per part: `ring` reads
//! the ring, `awake` is the worker's half of the ring's wake-up protocol,
//! `control` reads the control socket, [`reassembly`] puts heads and body
//! chunks back together. Each kernel request is traced as taken when its
//! head leaves the ring (see `crate::answer`), so a crash answers it.

mod awake;
mod control;
pub(crate) mod reassembly;
mod ring;

use std::{collections::VecDeque, sync::Arc, time::Duration};

use dispatcher_ebpf::abi::{RecordHeader, REC_SLOW, REC_TRAILERS};
use dispatcher_ebpf::wire::RecordKind;
use tokio::sync::mpsc;

use crate::answer::Outbound;
use crate::body::Piece;
use crate::Error;
pub(crate) use awake::Awake;
pub(crate) use control::spawn_reader;
use reassembly::{Done, Raw, Reassembly};
pub(crate) use ring::Ring;

/// A request taken from the queue: whole, or (streaming mode) its head
/// with the receiver of its body and the body's announced length.
pub(crate) struct Pulled {
    pub(crate) raw: Raw,
    pub(crate) body: Option<(mpsc::UnboundedReceiver<Piece>, u64)>,
}

/// A worker's request queue: its ring and its control socket's records.
pub(crate) struct Puller {
    ring: Option<Ring>,
    /// The ring's awake flag, if the dispatcher passed one.
    awake: Option<Awake>,
    /// `next` found the ring empty and yielded once already.
    yielded: bool,
    /// `next` gives [`Error::Idle`] after this long without a request.
    pub(crate) idle: Option<Duration>,
    /// Requests handed out so far, and the count that recycles the worker.
    served: u64,
    pub(crate) recycle_after: Option<u64>,
    /// No new requests from the queue; finish the ones taken.
    draining: bool,
    frames: mpsc::Receiver<control::Record>,
    reassembly: Reassembly,
    ready: VecDeque<Pulled>,
    /// Where taken requests are traced and malformed ones answered.
    out: Arc<Outbound>,
}

impl Puller {
    /// Pulls from `ring` (woken as `awake` says) and from the control
    /// socket's `frames` (see [`spawn_reader`]).
    pub(crate) fn new(
        ring: Option<Ring>,
        awake: Option<Awake>,
        frames: mpsc::Receiver<control::Record>,
        out: Arc<Outbound>,
    ) -> Puller {
        Puller {
            ring,
            awake,
            yielded: false,
            idle: None,
            served: 0,
            recycle_after: None,
            draining: false,
            frames,
            reassembly: Reassembly::default(),
            ready: VecDeque::new(),
            out,
        }
    }

    /// Hands requests out at their head from now on, bodies streamed (call
    /// before the first `next`).
    pub(crate) fn stream_bodies(&mut self) {
        self.reassembly = Reassembly::streaming();
    }

    /// Stops taking requests from the queue: `next` hands out what was
    /// taken, then gives [`Error::Recycle`].
    pub(crate) fn stop_pulling(&mut self) {
        self.draining = true;
    }

    /// A request from `next` was handed to the application (counted for
    /// recycling).
    pub(crate) fn handed_out(&mut self) {
        self.served += 1;
        if self.recycle_after.is_some_and(|n| self.served >= n) {
            self.draining = true;
        }
    }

    /// The next complete request, from the ring or the control socket.
    pub(crate) async fn next(&mut self) -> Result<Pulled, Error> {
        loop {
            if let Some(raw) = self.ready.pop_front() {
                return Ok(raw);
            }
            if self.draining && self.reassembly.pending() == 0 {
                // Slow-path requests already sent to us are ours too.
                if let Ok((hdr, data)) = self.frames.try_recv() {
                    self.push(&hdr, &data);
                    continue;
                }
                self.stopped();
                return Err(Error::Recycle);
            }
            if self.drain_ring() {
                continue;
            }
            if self.awake.is_some() && !std::mem::replace(&mut self.yielded, true) {
                // Let the handlers of what was just received run (and
                // answer) before going to sleep; requests that arrive
                // meanwhile are queued without waking us.
                tokio::task::yield_now().await;
                continue;
            }
            self.yielded = false;
            if let Some(a) = &self.awake {
                // Records queued from here on wake us; one that was queued
                // without a wake-up before this point is seen here.
                a.set_asleep();
                if self.drain_ring() {
                    if let Some(a) = &self.awake {
                        a.set_awake();
                    }
                    continue;
                }
            }
            let has_ring = self.ring.is_some();
            let ring = self.ring.as_mut();
            let idle = self.idle;
            tokio::select! {
                _ = async { tokio::time::sleep(idle.unwrap_or_default()).await }, if idle.is_some() => {
                    // An open tunnel (an upgraded connection) is work: no
                    // idle exit while one is.
                    let tunnels = self.out.tunnels_open.load(std::sync::atomic::Ordering::Relaxed);
                    if self.ready.is_empty() && !self.drain_ring() && tunnels == 0 {
                        self.stopped();
                        return Err(Error::Idle);
                    }
                }
                r = async { ring.unwrap().readable().await }, if has_ring => r.map_err(Error::Control)?,
                f = self.frames.recv() => {
                    let Some((hdr, data)) = f else { return Err(Error::Closed) };
                    // A body the kernel began on the ring goes on here once
                    // the ring filled up: its ring records were committed
                    // before the dispatcher read what follows them, so
                    // taking the ring first keeps the body in order (the
                    // select above may pick this branch with both ready;
                    // the reassembly would refuse the body otherwise).
                    self.drain_ring();
                    self.push(&hdr, &data);
                }
            }
            if let Some(a) = &self.awake {
                a.set_awake();
            }
        }
    }

    /// Done with the ring for good (recycled, stopped or idle): later
    /// calls never look at it again, and the slot says so, so the next
    /// worker may start while this one answers what it took.
    fn stopped(&mut self) {
        self.draining = true;
        if let Some(a) = &self.awake {
            a.set_stopped();
        }
        self.out.send_stopped();
    }

    fn push(&mut self, hdr: &RecordHeader, data: &[u8]) {
        deliver(&mut self.reassembly, &mut self.ready, &self.out, hdr, data);
    }

    /// Takes every record the ring holds; true if there were any. Records
    /// are reassembled straight from ring memory (one copy).
    fn drain_ring(&mut self) -> bool {
        let Puller { ring, reassembly, ready, out, draining, .. } = self;
        let Some(ring) = ring.as_mut() else { return false };
        ring.drain(|item| {
            if let Some((hdr, data)) = ring::split(item) {
                deliver(reassembly, ready, out, &hdr, data);
            }
            // Stop once every request taken is whole: the rest is the
            // next worker's.
            !(*draining && reassembly.pending() == 0)
        })
    }
}

fn deliver(
    reassembly: &mut Reassembly,
    ready: &mut VecDeque<Pulled>,
    out: &Arc<Outbound>,
    hdr: &RecordHeader,
    data: &[u8],
) {
    let kind = hdr.record_kind();
    if kind == Ok(RecordKind::Abort) {
        // The connection is gone: nothing of it is owed any more.
        out.abandoned(hdr.conn);
    } else if kind == Ok(RecordKind::Head) && hdr.flags & REC_SLOW == 0 && !reassembly.is_aborted(hdr.conn) {
        // Ours from its head on (the rest of its body follows on this
        // ring, which the next worker would not know what to do with):
        // traced, so a crash answers it 502.
        out.taken(hdr.conn, hdr.seq);
    } else if kind == Ok(RecordKind::Body)
        && hdr.flags & REC_SLOW != 0
        && hdr.flags & REC_TRAILERS == 0
        && !reassembly.streams()
        && !data.is_empty()
    {
        // Collected bodies count as read when they arrive (streamed ones
        // when the handler takes them, see `crate::body`): the
        // dispatcher's upload window must keep opening.
        out.body_read(hdr.conn, hdr.seq, data.len() as u32);
    }
    match reassembly.push(hdr, data) {
        Some(Done::Request(raw)) => ready.push_back(Pulled { raw, body: None }),
        Some(Done::Streaming(raw, rx, len)) => ready.push_back(Pulled { raw, body: Some((rx, len)) }),
        Some(Done::Unread { conn, seq, len }) => out.body_read(conn, seq, len.min(u32::MAX as u64) as u32),
        Some(Done::Invalid { conn, seq }) => out.reject(conn, seq),
        None => {}
    }
}
