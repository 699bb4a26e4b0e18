//! A worker's control channel, made fresh for each worker a slot starts:
//! a stream socket whose writer task sends the slow path's request records
//! (in batches) and whose reader task delivers the worker's frames —
//! responses and lease releases to their connections, stop notices,
//! stats and access-log records — and, once the worker is gone, tells
//! the connections what it held and never answered.

use std::{os::fd::OwnedFd, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use dispatcher_ebpf::wire::{FrameHeader, WorkerFrame};
use tokio::sync::mpsc;
use worker::proto::{read_frame, BATCH_BYTES};

use super::link::PoolLink;
use crate::{
    access_log::AccessLog,
    deliver::{lease_socket, Conns, Credit, Frame, Tunnel},
};

/// Makes a control socket for a new worker of `link`: our end is served
/// by a reader (responses → connections) and a writer task. With `leases`,
/// also a lease socket; returns the worker's ends.
pub(super) fn connect(
    link: &Arc<PoolLink>,
    slot: usize,
    conns: &Arc<Conns>,
    leases: bool,
    access_log: Option<AccessLog>,
) -> Result<(OwnedFd, Option<OwnedFd>, Option<OwnedFd>)> {
    let (progress, progress_fd) = worker::progress::ProgressMap::create().context("making a progress map")?;
    let progress = Arc::new(progress);
    let (lease_tx, lease_fd) = match leases {
        true => {
            let (tx, fd) = lease_socket(progress.clone(), conns.clone())?;
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
    let gen = link.slots[slot].ctl.lock().unwrap().connect(tx.clone());
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
        loop {
            let (h, data) = match read_frame::<FrameHeader>(&mut rd).await {
                Ok(f) => f,
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        tracing::error!(pool = %name, "{e}; dropping the worker's socket");
                    }
                    break;
                }
            };
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
                    let f = Frame {
                        seq,
                        data: data.into(),
                        last: false,
                        close: false,
                        ask: None,
                        release,
                        credit: None,
                        tunnel: None,
                    };
                    conns.deliver(conn, f);
                }
                Ok(WorkerFrame::Response { conn, seq, last, close, want_lease, stream, upgrade }) => {
                    let ask = if want_lease { lease_tx.clone() } else { None };
                    let credit = stream.then(|| Credit(tx.clone()));
                    let tunnel = if upgrade && last { lease_tx.clone().map(Tunnel::Worker) } else { None };
                    let data = Bytes::from(data);
                    conns.deliver(conn, Frame { seq, data, last, close, ask, release: None, credit, tunnel });
                }
                Ok(WorkerFrame::BodyRead { conn, seq, len }) => conns.body_read(conn, seq, len),
                Ok(WorkerFrame::Backlogged { conn }) => conns.pause(conn),
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
        // And what it never took: slow-path records still in the channel
        // or unread in the socket when it died (a 256 KiB upload sent as
        // its worker was killed waited for its client's time-out).
        conns.channel_gone(Arc::as_ptr(&link) as usize, slot, gen);
    });
    Ok((theirs.into(), lease_fd, Some(progress_fd)))
}
