//! The lease machine: a connection's lease is asked for with a response,
//! granted (the worker then writes that connection's responses itself, in
//! `seq` order), revoked or given back; what could not be written under it
//! goes through the dispatcher after the release frame that says where the
//! direct writes stopped.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    os::fd::OwnedFd,
    sync::Arc,
};

use super::relay::frame;
use super::socket::Sock;
use super::wire::Wire;
use super::Outbound;
use crate::progress::ProgressMap;
use crate::proto::{LeaseMsg, WorkerFrame, NO_ENTRY};

/// Where a connection stands with this worker's leases (no entry: no
/// lease asked for).
pub(super) enum LeaseState {
    /// Asked for a lease with response `at`. `sent_after`: a later
    /// response already went through the dispatcher, so a grant has to be
    /// given back unused (the dispatcher may not have written it yet).
    Asked {
        at: u32,
        sent_after: bool,
    },
    Leased(Lease),
}

/// A connection this worker writes to itself.
pub(super) struct Lease {
    pub(super) gen: u32,
    /// Its progress entry (the trace the dispatcher reads if we die).
    pub(super) trace: Option<(Arc<ProgressMap>, u32)>,
    /// Bytes of the complete responses written under this lease.
    pub(super) complete_bytes: u64,
    pub(super) sock: Arc<Sock>,
    /// The next response to write; everything before it is in the socket
    /// or in `backlog`.
    pub(super) next: u32,
    /// Responses accepted in order but not yet (fully) in the socket
    /// because its send buffer is full: (seq, bytes still to write, whole
    /// length).
    pub(super) backlog: VecDeque<(u32, Wire, usize)>,
    /// Responses that finished before an earlier one: seq → (bytes, close).
    pub(super) queued: BTreeMap<u32, (Wire, bool)>,
    /// A task waits for the socket to become writable.
    pub(super) flushing: bool,
    /// The client is gone: what is left is dropped.
    pub(super) dead: bool,
    /// Bytes in `backlog`.
    pub(super) backlog_bytes: usize,
    /// The dispatcher was told the client does not read (once a lease).
    pub(super) reported: bool,
}

/// Unwritten answer bytes a lease holds before the dispatcher is told its
/// client does not read them (`WorkerFrame::Backlogged`): 200,000
/// pipelined requests whose 2 kB answers were never read grew a worker to
/// 477 MB before.
const BACKLOG_LIMIT: usize = 1 << 20;

impl Outbound {
    /// Handles one message from the dispatcher's lease socket.
    pub(super) fn on_lease(self: &Arc<Self>, m: LeaseMsg, fd: Option<OwnedFd>) {
        let mut map = self.conns.lock().unwrap();
        let conn = m.conn();
        tracing::debug!(
            msg = ?m,
            fd = fd.is_some(),
            state = map.get(&conn).map(|e| match e {
                LeaseState::Asked { sent_after, .. } =>
                    if *sent_after {
                        "asked-sent-after"
                    } else {
                        "asked"
                    },
                LeaseState::Leased(_) => "leased",
            }),
            "lease message"
        );
        match m {
            // Handled before it gets here (`on_message`).
            LeaseMsg::Tunnel { .. } | LeaseMsg::Splice { .. } => {}
            LeaseMsg::Grant { conn, from, gen, entry } => {
                let usable = matches!(map.get(&conn), Some(LeaseState::Asked { sent_after: false, .. }));
                match fd {
                    Some(fd) if usable => {
                        // Moved into the lease's trace from here on.
                        let (taken, in_flight) = self.loose.as_ref().map_or((0, 0), |l| l.take_out(conn));
                        let sock = Arc::new(Sock::new(fd));
                        let trace = match (&self.progress, entry) {
                            (Some(map), entry) if entry != NO_ENTRY => {
                                // Fresh (a lease on another connection may
                                // have used this entry until its FORGET,
                                // handled before this grant), plus what is
                                // taken and not answered on this one.
                                map.reset(entry, conn, from);
                                if let Some(e) = map.entry(entry) {
                                    e.in_flight.fetch_or(in_flight, std::sync::atomic::Ordering::Release);
                                    e.taken.fetch_max(taken, std::sync::atomic::Ordering::Release);
                                }
                                Some((map.clone(), entry))
                            }
                            _ => None,
                        };
                        let l = Lease {
                            gen,
                            trace,
                            complete_bytes: 0,
                            sock,
                            next: from,
                            backlog: VecDeque::new(),
                            queued: BTreeMap::new(),
                            flushing: false,
                            dead: false,
                            backlog_bytes: 0,
                            reported: false,
                        };
                        map.insert(conn, LeaseState::Leased(l));
                    }
                    _ => {
                        // Stale or unusable: give it back untouched.
                        if matches!(map.get(&conn), Some(LeaseState::Asked { .. })) {
                            map.remove(&conn);
                        }
                        let _ = self.ctl.send(frame(WorkerFrame::Release { conn, seq: from, lease: gen }, &[]));
                    }
                }
            }
            LeaseMsg::Deny { conn, .. } => {
                if matches!(map.get(&conn), Some(LeaseState::Asked { .. })) {
                    map.remove(&conn);
                }
            }
            LeaseMsg::Revoke { conn, gen } => {
                if matches!(map.get(&conn), Some(LeaseState::Leased(l)) if l.gen == gen) {
                    self.release(&mut map, conn);
                }
            }
            LeaseMsg::Forget { conn } => {
                map.remove(&conn);
                if let Some(l) = &self.loose {
                    l.take_out(conn);
                }
            }
        }
    }

    /// Writes the queued responses that are next in order.
    pub(super) fn advance(self: &Arc<Self>, map: &mut HashMap<u64, LeaseState>, conn: u64) {
        let Some(LeaseState::Leased(l)) = map.get_mut(&conn) else { return };
        let mut flusher = false;
        let mut give_back = false;
        while let Some((bytes, close)) = l.queued.remove(&l.next) {
            if close {
                // The dispatcher closes connections: it writes this one.
                l.queued.insert(l.next, (bytes, close));
                give_back = true;
                break;
            }
            flusher |= l.push(l.next, bytes);
            l.next = l.next.wrapping_add(1);
        }
        if l.backlog_bytes > BACKLOG_LIMIT && !std::mem::replace(&mut l.reported, true) {
            let _ = self.ctl.send(frame(WorkerFrame::Backlogged { conn }, &[]));
        }
        if flusher {
            self.spawn_flusher(conn, l.gen, l.sock.clone());
        }
        if give_back {
            self.release(map, conn);
        }
    }

    /// Gives `conn`'s lease back: a release frame saying where the direct
    /// writes stopped, then whatever was not written yet, through the
    /// dispatcher.
    pub(super) fn release(&self, map: &mut HashMap<u64, LeaseState>, conn: u64) {
        let Some(LeaseState::Leased(l)) = map.remove(&conn) else { return };
        // The dispatcher lets go of the lease's trace with the release:
        // what is taken and not answered is traced as loose from here on
        // (before the frames below, whose writing clears it).
        if let (Some(loose), Some(e)) = (&self.loose, l.trace.as_ref().and_then(|(m, i)| m.entry(*i))) {
            let t = e.read();
            for back in (1..=64u32.min(t.taken)).rev() {
                let seq = t.taken - back;
                if t.in_flight & (1u64 << (seq % 64)) != 0 {
                    loose.taken(conn, seq);
                }
            }
        }
        let first = l.backlog.front().map_or(l.next, |(s, _, _)| *s);
        let _ = self.ctl.send(frame(WorkerFrame::Release { conn, seq: first, lease: l.gen }, &[]));
        for (seq, rest, _) in l.backlog {
            self.via_ctl(conn, seq, &rest, false, false);
        }
        for (seq, (bytes, close)) in l.queued {
            self.via_ctl(conn, seq, &bytes, close, false);
        }
    }

    pub(super) fn with_lease<R>(&self, conn: u64, gen: u32, f: impl FnOnce(&mut Lease) -> R) -> Option<R> {
        match self.conns.lock().unwrap().get_mut(&conn) {
            Some(LeaseState::Leased(l)) if l.gen == gen => Some(f(l)),
            _ => None,
        }
    }
}
